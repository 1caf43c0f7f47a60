"""The sample images draw what their labels say: an object inside the outline polygon and
defects of their colour inside the defect polygons (what cropping and resizing rely on).

Read with zipfile, PIL and json only; a sample is accepted here as the converter would accept
it (one image and one parseable label per stem, both readable), which must give synth.samples.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from shardify.profiles.battery.sample import (
    CT_BACKGROUND,
    CT_OBJECT,
    CT_SIZE,
    DEFECT_COLOURS,
    RGB_BACKGROUND,
    RGB_SIZE,
    SynthResult,
)

TOLERANCE = 25  # how far (per band) a decoded pixel may be from the colour painted


def _read(root: Path) -> dict[str, tuple[set[bytes], set[bytes]]]:
    """Stem -> (distinct image bytes, distinct label bytes), junk and bad CRCs left out."""
    found: dict[str, tuple[set[bytes], set[bytes]]] = defaultdict(lambda: (set(), set()))
    for path in sorted(root.rglob("*.zip")):
        with zipfile.ZipFile(path, metadata_encoding="cp949") as zf:
            for info in zf.infolist():
                base = info.filename.rsplit("/", 1)[-1]
                if info.is_dir() or base.startswith("._") or "." not in base:
                    continue
                stem, ext = base.rsplit(".", 1)
                kind = {"jpg": 0, "jpeg": 0, "png": 0, "json": 1}.get(ext.lower())
                if kind is None:
                    continue
                try:
                    found[stem][kind].add(zf.read(info))
                except zipfile.BadZipFile:
                    continue
    return found


@pytest.fixture(scope="module")
def accepted(dataset: SynthResult) -> list[tuple[str, Image.Image, dict[str, Any]]]:
    samples = []
    for stem, (images, labels) in sorted(_read(dataset.root).items()):
        if len(images) != 1 or len(labels) != 1:
            continue  # orphans and same-stem duplicates
        try:
            label = json.loads(next(iter(labels)).decode("utf-8-sig"))
            image = Image.open(io.BytesIO(next(iter(images))))
            image.load()
        except (ValueError, OSError):
            continue
        if "is_normal" not in label["image_info"]:
            continue
        samples.append((stem, image, label))
    assert len(samples) == dataset.samples
    return samples


def _outline(label: dict[str, Any]) -> list[int] | None:
    points = label["swelling"].get("battery_outline")
    return label.get("battery_outline", {}).get("points") if points is None else points


def _usable(points: list[int] | None) -> bool:
    return points is not None and len(points) >= 6 and len(points) % 2 == 0


def _mask(size: tuple[int, int], points: list[float]) -> np.ndarray:
    mask = Image.new("1", size)
    ImageDraw.Draw(mask).polygon(points, fill=1, outline=1)
    return np.asarray(mask)


def _area(points: list[int]) -> float:
    xs, ys = np.array(points[0::2], float), np.array(points[1::2], float)
    return abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2


def _object(image: Image.Image) -> np.ndarray:
    """Pixels that are not background: brighter than half-way to the object on CT slices,
    clearly off the table's grey on photos."""
    pixels = np.asarray(image).astype(int)
    if image.mode == "L":
        return np.asarray(pixels > (CT_BACKGROUND + CT_OBJECT) // 2)
    return np.asarray(np.abs(pixels - RGB_BACKGROUND).max(axis=2) > 40)


def _near(pixels: np.ndarray, colour: tuple[int, ...]) -> bool:
    diff = np.abs(pixels.astype(int).reshape(len(pixels), -1) - np.array(colour))
    return bool(diff.max() <= TOLERANCE)


def test_images_and_label_sizes(accepted: list[tuple[str, Image.Image, dict[str, Any]]]) -> None:
    for stem, image, label in accepted:
        ct = label["data_info"]["data_type"] == "ct"
        assert (image.format, image.mode) == (("JPEG", "L") if ct else ("PNG", "RGB")), stem
        assert image.size == (CT_SIZE if ct else RGB_SIZE), stem
        info = label["image_info"]
        assert (info["width"], info["height"]) == image.size, stem


def test_object_lies_inside_its_outline(
    accepted: list[tuple[str, Image.Image, dict[str, Any]]],
) -> None:
    checked = 0
    for stem, image, label in accepted:
        points = _outline(label)
        obj = _object(image)
        ct = image.mode == "L"
        share = obj.mean()
        assert (0.03 <= share <= 0.05) if ct else (0.05 <= share <= 0.15), (stem, share)
        if not _usable(points):
            continue
        assert points is not None
        assert 12 <= len(points) // 2 <= 24, stem
        inside = _mask(image.size, points)
        assert not (obj & ~inside).any(), stem  # every object pixel within the polygon
        ys, xs = np.nonzero(obj)
        box = min(points[0::2]), min(points[1::2]), max(points[0::2]), max(points[1::2])
        assert box[0] <= xs.min() and box[1] <= ys.min(), stem
        assert xs.max() <= box[2] and ys.max() <= box[3], stem
        # Tight: the polygon's box is the object's, give or take a few pixels.
        slack = (xs.min() - box[0], ys.min() - box[1], box[2] - xs.max(), box[3] - ys.max())
        assert max(slack) <= 5, (stem, slack)
        w, h = image.size
        assert min(box[:2]) > 0 and box[2] < w - 1 and box[3] < h - 1, stem  # well inside
        if ct:
            assert 0.02 <= _area(points) / (w * h) <= 0.06, stem
        checked += 1
    assert checked > len(accepted) // 2


def test_defects_have_their_colour_inside_the_object(
    accepted: list[tuple[str, Image.Image, dict[str, Any]]],
) -> None:
    names: set[str] = set()
    for stem, image, label in accepted:
        obj = _object(image)
        for defect in label["defects"] or []:
            points = defect["points"]
            if not _usable(points):
                continue
            assert 6 <= len(points) // 2 <= 10, stem
            colour = DEFECT_COLOURS[defect["name"].lower()]
            names.add(defect["name"].lower())
            pixels = np.asarray(image)
            inside = _mask(image.size, points)
            assert inside.sum() >= 100, stem  # radius >= 6
            assert _near(pixels[inside], colour), stem
            assert not (inside & ~obj).any(), stem
            # Halved, the polygon's interior (one pixel in from its edge) keeps the colour.
            half = image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)
            core = Image.fromarray(_mask(half.size, [v / 2 for v in points]))
            core_mask = np.asarray(core.convert("L").filter(ImageFilter.MinFilter(3))) > 0
            assert core_mask.sum() >= 9, stem
            assert _near(np.asarray(half)[core_mask], colour), stem
    assert names == set(DEFECT_COLOURS)


def test_both_outline_layouts_and_unusable_lists_are_counted(
    dataset: SynthResult, accepted: list[tuple[str, Image.Image, dict[str, Any]]],
) -> None:
    top: dict[str, set[int]] = defaultdict(set)
    nested: dict[str, set[int]] = defaultdict(set)
    missing: dict[str, int] = defaultdict(int)
    no_outline = odd = odd_defects = 0
    for _, _, label in accepted:
        data_type, battery = label["data_info"]["data_type"], label["data_info"]["battery_ids"]
        keys = list(label)
        if "battery_outline" in label:
            assert keys.index("battery_outline") == keys.index("swelling") + 1
            assert "battery_outline" not in label["swelling"]
            top[data_type].add(battery)
        elif "battery_outline" in label["swelling"]:
            nested[data_type].add(battery)
        else:
            missing[data_type] += 1
        assert [k for k in keys if k != "battery_outline"] == [
            "data_info", "swelling", "defects", "image_info"]
        outline = _outline(label)
        no_outline += not _usable(outline)
        lists = ([] if outline is None else [outline]) + [
            d["points"] for d in label["defects"] or []]
        odd += sum(len(p) % 2 for p in lists)
        odd_defects += sum(len(d["points"]) % 2 for d in label["defects"] or [])
    for data_type in ("ct", "rgb"):
        assert len(top[data_type]) >= 2 and nested[data_type], data_type
        assert missing[data_type] >= 1, data_type
    assert odd_defects >= 1
    assert no_outline > sum(missing.values())  # short and odd outlines too
    assert (dataset.no_outline, dataset.odd_point_lists) == (no_outline, odd)
