"""One sample through the transform: the written image, its label mapped to it, and what was done.

What the worker calls for each sample when a transform is asked for. The label's points follow
the pixels: orient (EXIF), crop, scale. Labels are assumed to describe the stored pixels, unless
their size fields give the upright size of a rotated image (then they describe that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..profiles import Geometry
from .geometry import (
    Box,
    Placement,
    crop_box,
    locations,
    map_label,
    orient_point,
    outline_points,
)
from .options import TransformOptions
from .pixels import ImageError, open_image, render

__all__ = ["ImageError", "LabelError", "Transformed", "transform_sample"]


class LabelError(Exception):
    """The label cannot describe the written image (a mapped value does not fit JSON's
    64-bit integers); the message is the reject's detail."""


@dataclass(frozen=True)
class Transformed:
    """A transformed sample: the bytes to write and the manifest's description of them."""

    image: bytes
    label: bytes
    width: int
    height: int
    source_width: int  # upright, as the output is
    source_height: int
    crop_box: Box | None  # in upright source pixels; None: the whole image
    scale: float  # output / source, along the longer side of what was kept
    unmapped_point_lists: int


def transform_sample(image_bytes: bytes | bytearray, label_bytes: bytes | bytearray,
                     source_ext: str, options: TransformOptions, geometry: Geometry
                     ) -> Transformed:
    """Transform one image and map its label; ImageError if the image cannot be decoded or
    written as asked, LabelError if its label cannot be mapped."""
    source = open_image(image_bytes)
    document = orjson.loads(label_bytes)
    width, height = source.upright_size
    label_orientation = _label_orientation(document, geometry, source.orientation,
                                           (width, height), (source.width, source.height))
    box = None
    if options.crop == "outline":
        points = outline_points(document, geometry)
        if points is not None:
            upright = [c for x, y in zip(points[0::2], points[1::2], strict=True)
                       for c in orient_point(x, y, label_orientation, source.width,
                                             source.height)]
            box = crop_box(upright, options.crop_margin, width, height)
    kept = box or Box(0, 0, width, height)
    scale = 1.0
    if options.resize is not None:
        scale = min(1.0, options.resize / max(kept.width, kept.height))
    placement = Placement(kept, max(1, round(kept.width * scale)),
                          max(1, round(kept.height * scale)))
    ext = options.output_ext(source_ext)
    image = render(source, kept, (placement.width, placement.height), ext, options.quality)
    unmapped = map_label(document, geometry, label_orientation,
                         (source.width, source.height), placement)
    try:
        label = orjson.dumps(document)
    except TypeError as error:
        raise LabelError(f"label coordinates out of range once mapped: {error}") from None
    return Transformed(image, label, placement.width, placement.height, width, height, box,
                       scale, unmapped)


def _label_orientation(document: Any, geometry: Geometry, orientation: int,
                       upright: tuple[int, int], stored: tuple[int, int]) -> int:
    """The EXIF turn the label's points still need: none when the label's size fields already
    give the upright size of a turned image (it was labelled upright)."""
    if orientation == 1 or upright == stored:
        return orientation
    declared = tuple(next((parent[key] for parent, key in locations(document, path)), None)
                     for path in geometry.size)
    return 1 if declared == upright else orientation
