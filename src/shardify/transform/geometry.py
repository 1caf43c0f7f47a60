"""Label coordinates through a transform: where the crop box comes from, and where points go.

Pure functions over the label's parsed JSON and the profile's `Geometry` (which values are image
coordinates). A transform is an `Affine` per axis: orient (EXIF), then crop, then scale; points
are mapped through it, and the label's size fields become the output size. Point lists that are
not flat [x1, y1, x2, y2, ...] numbers (odd length, other values) are left as they were, and
counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..profiles import Geometry

# Coordinates are continuous (a pixel's left edge is x, its right edge x + 1), so a flip is W - x.
ROTATED = frozenset({5, 6, 7, 8})  # these swap width and height


class Box(NamedTuple):
    """A crop box in pixels: left, top, right, bottom (right and bottom exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass(frozen=True)
class Placement:
    """How an upright source image becomes the written one: the crop box (upright pixels) and
    the output size. Points map as ((x - x0) * sx, (y - y0) * sy)."""

    box: Box
    width: int
    height: int

    @property
    def sx(self) -> float:
        return self.width / self.box.width

    @property
    def sy(self) -> float:
        return self.height / self.box.height


# EXIF orientation -> (swap the axes, then flip the first, flip the second), as PIL's
# exif_transpose turns the pixels.
TURNS = {1: (False, False, False), 2: (False, True, False), 3: (False, True, True),
         4: (False, False, True), 5: (True, False, False), 6: (True, True, False),
         7: (True, True, True), 8: (True, False, True)}


def orient_point(x: float, y: float, orientation: int, width: int, height: int
                 ) -> tuple[float, float]:
    """A stored point of a `width` x `height` image in the upright image (EXIF orientation)."""
    swap, flip_first, flip_second = TURNS.get(orientation, TURNS[1])
    first, second, first_size, second_size = (y, x, height, width) if swap else \
        (x, y, width, height)
    return (first_size - first if flip_first else first,
            second_size - second if flip_second else second)


def _point_list_locations(document: Any, geometry: Geometry) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every value a geometry path names that is present."""
    for path in geometry.point_lists:
        yield from locations(document, path)


def locations(node: Any, path: tuple[str, ...]) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every value `path` names in `node` (`"*"`: each item of a list)."""
    step, rest = path[0], path[1:]
    children: list[tuple[Any, Any]]
    if step == "*":
        children = list(enumerate(node)) if isinstance(node, list) else []
    elif isinstance(node, dict) and step in node:
        children = [(step, node[step])]
    else:
        children = []
    for key, child in children:
        if rest:
            yield from locations(child, rest)
        else:
            yield node, key


def flat_points(value: Any) -> list[float] | None:
    """A flat [x1, y1, ...] list of numbers of even length, or None if it is not one."""
    if not isinstance(value, list) or len(value) % 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return None
    return value


def outline_points(document: Any, geometry: Geometry) -> list[float] | None:
    """The first outline the label has (the profile's outline paths, in order), as a flat
    point list of at least three points; None when there is none usable."""
    for path in geometry.outline:
        for parent, key in locations(document, path):
            points = flat_points(parent[key])
            if points is not None and len(points) >= 6:
                return points
    return None


def crop_box(points: list[float], margin: int, width: int, height: int) -> Box | None:
    """The points' bounding box widened by `margin` on every side and clamped to the image;
    None when it has no area inside the image (a degenerate or misplaced outline)."""
    xs, ys = points[0::2], points[1::2]
    if not (max(xs) > min(xs) and max(ys) > min(ys)):
        return None  # all points on one line: no area to crop to
    box = Box(max(0, math.floor(min(xs)) - margin), max(0, math.floor(min(ys)) - margin),
              min(width, math.ceil(max(xs)) + margin), min(height, math.ceil(max(ys)) + margin))
    return box if box.width > 0 and box.height > 0 else None


def map_label(document: Any, geometry: Geometry, orientation: int, stored: tuple[int, int],
              placement: Placement) -> int:
    """Map every point list in `document` (in place) from the stored image to the written one,
    set its size fields to the output size; return how many point lists were left unmapped."""
    width, height = stored
    unmapped = 0

    def move(points: list[float]) -> list[float]:
        mapped: list[float] = []
        for x, y in zip(points[0::2], points[1::2], strict=True):
            ux, uy = orient_point(x, y, orientation, width, height)
            mapped += _place(ux, placement.box.x0, placement.sx), \
                _place(uy, placement.box.y0, placement.sy)
        return mapped

    for parent, key in list(_point_list_locations(document, geometry)):
        points = flat_points(parent[key])
        if points is None:
            unmapped += isinstance(parent[key], list)
            continue
        parent[key] = move(points)
    for path in geometry.corner_boxes:
        for parent, key in list(locations(document, path)):
            corners = flat_points(parent[key])
            if corners is None or len(corners) != 4:
                unmapped += 1
                continue
            parent[key] = _ordered(move(corners))
    for path in geometry.xywh_boxes:
        for parent, key in list(locations(document, path)):
            corners = xywh_corners(parent[key])
            if corners is None:
                unmapped += 1
                continue
            x1, y1, x2, y2 = _ordered(move(corners))
            parent[key] = {**parent[key], "x": x1, "y": y1, "width": _size(x2, x1),
                           "height": _size(y2, y1)}
    for path, value in zip(geometry.size, (placement.width, placement.height), strict=True):
        for parent, key in list(locations(document, path)):
            parent[key] = value
    return unmapped


def xywh_corners(value: Any) -> list[float] | None:
    """An {"x", "y", "width", "height"} box as [x1, y1, x2, y2], or None if it is not one."""
    if not isinstance(value, dict):
        return None
    numbers = flat_points([value.get(name) for name in ("x", "y", "width", "height")])
    if numbers is None:
        return None
    x, y, w, h = numbers
    return [x, y, x + w, y + h]


def _ordered(corners: list[float]) -> list[float]:
    """Two mapped corners as [left, top, right, bottom] (a flip swaps them)."""
    x1, y1, x2, y2 = corners
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def _size(end: float, start: float) -> float:
    """A box side from its mapped edges; rounded like the edges so no float noise is added."""
    side = end - start
    return side if isinstance(side, int) else round(side, 2)


def _place(value: float, origin: int, scale: float) -> float:
    """One coordinate, shifted and scaled; integers stay integers when nothing is scaled."""
    shifted = value - origin
    if scale == 1.0:
        return shifted
    return round(shifted * scale, 2)
