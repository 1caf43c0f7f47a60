"""`verify --sources` on a transformed output: do the written pixels come from the sources?

A sample of images is decoded from its source, transformed again with the recorded options, and
compared pixel by pixel with the decoded shard image; the label must map to the same JSON. With
the same image library version the pixels must be identical; another version may round
differently, so a small mean difference is allowed then.
"""

from __future__ import annotations

import io
import os

import numpy as np
import orjson
from PIL import Image

from .archives.model import Member
from .archives.reader import ArchiveReader
from .errors import MemberError
from .output.store import Store
from .profiles import DatasetProfile, strip_bom
from .rows import image_and_label
from .transform.options import TransformOptions, library_version
from .transform.sample import ImageError, LabelError, transform_sample

PIXEL_CHECKS = 32  # images re-transformed per verify
OTHER_LIBRARY_MEAN_DIFFERENCE = 1.5  # grey levels, when another Pillow wrote the shards


def check_pixels(rows: list[dict], members: dict[tuple[str, str], Member],
                 reader: ArchiveReader, out: Store, recorded: dict, profile: DatasetProfile
                 ) -> list[tuple[str, str]]:
    """(where, what) for each sampled image whose written pixels or label do not match."""
    options = TransformOptions(recorded["crop"], recorded["crop_margin"], recorded["resize"],
                               recorded["format"], recorded["quality"])
    exact = recorded.get("library") == library_version()
    step = max(1, len(rows) // PIXEL_CHECKS)
    problems = []
    for row in rows[::step][:PIXEL_CHECKS]:
        where = f"{row['shard']}:{row['key']}"
        image = members.get((row["source_archive"], row["source_member"]))
        label = members.get((row["label_archive"], row["label_member"]))
        if image is None or label is None:
            continue  # named by the source comparison already
        source_ext = os.path.splitext(image.name)[1].lower()
        try:
            again = transform_sample(reader.read(image), strip_bom(reader.read(label)),
                                     profile.image_extensions.get(source_ext, row["image_ext"]),
                                     options, profile.geometry)
            written, written_label = image_and_label(out, row)
            difference = _difference(_pixels(again.image), _pixels(written))
        except (MemberError, ImageError, LabelError, OSError, ValueError) as error:
            problems.append((where, f"cannot re-check the pixels: {error}"))
            continue
        if difference is None:
            problems.append((where, "written image size differs from a new transform of its "
                             "source"))
        elif difference > (0.0 if exact else OTHER_LIBRARY_MEAN_DIFFERENCE):
            problems.append((where, f"written pixels differ from a new transform of the source "
                             f"(mean difference {difference:.2f})"))
        if orjson.loads(again.label) != orjson.loads(written_label):
            problems.append((where, "written label differs from its source label mapped again"))
    return problems


def _pixels(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGBA" if "A" in image.mode else image.mode),
                              dtype=np.int32)  # 16-bit values fit
    except Exception as error:  # an undecodable written image is a finding, not a crash
        raise ImageError(f"written image cannot be decoded: {error}") from None


def _difference(first: np.ndarray, second: np.ndarray) -> float | None:
    """Mean absolute difference, or None when the shapes differ."""
    if first.shape != second.shape:
        return None
    return float(np.abs(first - second).mean())
