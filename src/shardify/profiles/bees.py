"""AI Hub honeybee disease images (dataset 71667): ~312k 1920x1080 JPEGs, one JSON each.

The fields this profile relies on (the README lists them too):
- `colony.id`: the group. Images of one colony never go to two splits.
- `annotations[].category_id`: the class. An image's class is its most frequent category
  (a tie goes to the lowest id); every category it has is in the `categories` column.
  Category ids count from 1; `-P categories=a,b,...` names them (category 1 is a).
- `annotations[].bbox`: geometry, as [x1, y1, x2, y2] corners, although the dataset's
  documents say [x, y, w, h]: the `area` field agrees with the corner reading.
- `collection.device`, `collection.datetime`: extra columns, as written.
- `image.width`, `image.height`: the image size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from ..errors import BadLabel
from . import CardText, DatasetProfile, Geometry, ProfileOption
from .base import Column, JsonProfile, key_text, pixels, required, shown, text, value_at
from .samples import SampleDownload, SamplePair, render, write_download

CATEGORIES = 10  # category names by default: category_1 ... category_10


class BeeFields(NamedTuple):
    group: str  # colony.id
    label: int  # the most frequent category, as a class number (category_id - 1)
    categories: tuple[int, ...]  # every category_id the image has, ascending
    boxes: int
    device: str | None
    datetime: str | None
    width: int | None
    height: int | None


class BeesProfile(JsonProfile):
    """Colonies are the groups; the most frequent annotated category is the class."""

    name = "bees-71667"
    version = 1
    group_noun = "colony"
    group_unit = "colonies"
    group_description = "colony.id: a split never divides a colony"
    label_description = ("the class in .cls: the image's most frequent annotations[]."
                         "category_id (ties: the lowest), minus 1")
    extra_columns = (
        Column("categories", "list<int64>", "every annotations[].category_id, ascending"),
        Column("boxes", "int64", "how many annotations the image has"),
        Column("device", "string", "collection.device"),
        Column("datetime", "string", "collection.datetime, as written"),
    )
    geometry = Geometry(point_lists=(), size=(("image", "width"), ("image", "height")),
                        corner_boxes=(("annotations", "*", "bbox"),))
    card = CardText(
        title="AI Hub honeybee disease images (dataset 71667)",
        about=("Photos of honeybee frames from the AI Hub dataset 71667 (꿀벌 질병 이미지), "
               "each with its label JSON as AI Hub published it: the colony (`colony.id`), "
               "the device and time of collection, and boxes around bees and signs of "
               "disease (`annotations[].bbox`, [x1, y1, x2, y2]) with their category."),
        terms=("The images and labels are AI Hub's (https://www.aihub.or.kr, dataset 71667), "
               "published under AI Hub's terms of use, which may restrict who may use the "
               "data, for what, and whether it may be shared or published."))
    options = MappingProxyType({"categories": ProfileOption(
        str(CATEGORIES), "the class names: a number N (category_1 ... category_N) or the "
        "names, comma-separated, the first naming category_id 1; a category_id beyond them "
        "is a bad-label reject")})

    @property
    def class_names(self) -> tuple[str, ...]:
        return category_names(self.option_values["categories"])

    def with_options(self, values: Mapping[str, str]) -> BeesProfile:
        names = category_names(values["categories"])
        if not names or not all(names) or len(set(names)) != len(names):
            raise ValueError("categories must be a number from 1 or distinct, non-empty "
                             f"names separated by commas: {values['categories']!r}")
        return BeesProfile(values)

    def fields(self, label: dict[str, Any]) -> BeeFields:
        colony = key_text(value_at(label, "colony.id"), "colony.id")
        annotations = required(label, "annotations")
        if not isinstance(annotations, list) or not annotations:
            raise BadLabel("annotations is empty or not a list: the image has no category")
        counts: Counter[int] = Counter()
        for number, annotation in enumerate(annotations):
            category = annotation.get("category_id") if isinstance(annotation, dict) else None
            if not isinstance(category, int) or isinstance(category, bool) or category < 1:
                raise BadLabel(f"annotations[{number}].category_id is not a category number "
                               f"from 1: {shown(category)}")
            counts[category] += 1
        names = self.class_names
        if max(counts) > len(names):
            raise BadLabel(f"category_id {max(counts)} has no name ({len(names)} categories; "
                           "-P categories=... names more)")
        most = max(counts.items(), key=lambda item: (item[1], -item[0]))[0]
        return BeeFields(colony, most - 1, tuple(sorted(counts)), len(annotations),
                         text(value_at(label, "collection.device")),
                         text(value_at(label, "collection.datetime")),
                         pixels(value_at(label, "image.width")),
                         pixels(value_at(label, "image.height")))

    def synthesize(self, dest: Path, *, seed: int = 0, scale: int = 1) -> SampleDownload:
        return synthesize(dest, seed=seed, scale=scale)


def category_names(value: str) -> tuple[str, ...]:
    """`-P categories`: N -> category_1 ... category_N; otherwise the comma-separated names."""
    if value.strip().isdigit():
        return tuple(f"category_{n}" for n in range(1, int(value) + 1))
    return tuple(name.strip() for name in value.split(","))


PROFILE: DatasetProfile = BeesProfile()

SIZE = (192, 108)  # the real 1920x1080, a tenth


def synthesize(dest: Path, *, seed: int = 0, scale: int = 1) -> SampleDownload:
    """12 colonies per scale, 4 photos each per scale, and the planted rejects: the colony's
    main category cycles 1-4 so every class has colonies to spread over the splits."""
    rng = np.random.default_rng(seed)
    pairs = []
    for colony in range(1, 12 * scale + 1):
        for number in range(1, 4 * scale + 1):
            main = (colony - 1) % 4 + 1
            categories = [main] * 2 + [int(rng.integers(1, 5))]
            pairs.append(_pair(rng, f"C{colony:03d}", number, categories))
    for number in range(1, 6):  # the planted rejects' pairs
        pairs.append(_pair(rng, "C900", number, [1]))
    return write_download(dest, "71667.꿀벌 질병 이미지", "honeybee", pairs, _drop_colony)


def _pair(rng: np.random.Generator, colony: str, number: int, categories: list[int]
          ) -> SamplePair:
    boxes = []
    for _ in categories:
        x1, y1 = int(rng.integers(0, SIZE[0] - 30)), int(rng.integers(0, SIZE[1] - 24))
        boxes.append([x1, y1, x1 + int(rng.integers(12, 30)), y1 + int(rng.integers(10, 24))])
    stem = f"HB_{colony}_{number:04d}"
    label = {
        "image": {"filename": stem + ".jpg", "width": SIZE[0], "height": SIZE[1]},
        "colony": {"id": colony},
        "collection": {"device": ("Galaxy S22", "iPhone 13")[number % 2],
                       "datetime": f"2023-06-{number % 28 + 1:02d} 10:{number % 60:02d}:00"},
        "annotations": [{"id": n + 1, "category_id": category, "bbox": box,
                         "area": (box[2] - box[0]) * (box[3] - box[1])}
                        for n, (category, box) in enumerate(zip(categories, boxes, strict=True))],
    }
    most = Counter(categories).most_common()
    top = min(c for c, n in most if n == most[0][1])
    image = render(rng, SIZE, boxes, 110, (250, 200, 40))
    return SamplePair(stem, image, label, colony, f"category_{top}")


def _drop_colony(label: dict[str, Any]) -> None:
    del label["colony"]
