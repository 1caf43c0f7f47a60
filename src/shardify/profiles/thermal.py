"""AI Hub thermal images of power equipment (dataset 514): one JSON per infrared image.

The fields this profile relies on (the README lists them too):
- `metadata.location` and `metadata.equipment_id`: the group. The group is the equipment an
  image shows: every image of one piece of equipment, from any angle or day, lands in one
  split. Equipment ids are numbered per location, so the group is `location/equipment_id`;
  `-P group=location` groups a whole location instead (stricter: no site in two splits).
- `annotations[].attributes.status`: the class. `normal` or `정상` (case and spaces ignored)
  on every annotation is class 0 (normal); any other status is class 1 (fault). All statuses are
  in the `statuses` column.
- `annotations[].data`: geometry, {x, y, width, height} boxes in pixels.
- `metadata.equipment_type`: an extra column. `image.width`, `image.height`: the size.
Per-pixel temperature CSVs beside the images in some releases are not read: `convert`
counts them under "other files".
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from ..errors import BadLabel
from . import CardText, DatasetProfile, Geometry, ProfileOption
from .base import Column, JsonProfile, key_text, pixels, required, shown, text, value_at
from .samples import SampleDownload, SamplePair, render, write_download

NORMAL = frozenset({"normal", "정상"})  # the status of a part without fault, English or Korean


class ThermalFields(NamedTuple):
    group: str
    label: int  # 0 normal, 1 fault
    location: str
    equipment_id: str
    equipment_type: str | None
    statuses: tuple[str, ...]  # distinct annotations[].attributes.status, as written
    boxes: int
    width: int | None
    height: int | None


class ThermalProfile(JsonProfile):
    """The equipment an image shows is the group; any non-normal status makes it a fault."""

    name = "thermal-514"
    version = 1
    group_noun = "equipment"
    group_unit = "equipment"
    group_description = ("metadata.location/metadata.equipment_id (with -P group=location, "
                         "the location): a split never divides one")
    label_description = ("the class in .cls: 0 normal (every annotations[].attributes.status "
                         "normal), 1 fault")
    extra_columns = (
        Column("location", "string", "metadata.location"),
        Column("equipment_id", "string", "metadata.equipment_id"),
        Column("equipment_type", "string", "metadata.equipment_type"),
        Column("statuses", "list<string>", "the distinct annotations[].attributes.status"),
        Column("boxes", "int64", "how many annotations the image has"),
    )
    geometry = Geometry(point_lists=(), size=(("image", "width"), ("image", "height")),
                        xywh_boxes=(("annotations", "*", "data"),))
    card = CardText(
        title="AI Hub thermal images of power equipment (dataset 514)",
        about=("Infrared images of power equipment from the AI Hub dataset 514, each with "
               "its label JSON as AI Hub published it: where and which equipment "
               "(`metadata`), and boxes (`annotations[].data`) with each part's status "
               "(`annotations[].attributes.status`: normal or a fault)."),
        terms=("The images and labels are AI Hub's (https://www.aihub.or.kr, dataset 514), "
               "published under AI Hub's terms of use, which may restrict who may use the "
               "data, for what, and whether it may be shared or published."))
    options = MappingProxyType({"group": ProfileOption(
        "equipment", "what a split never divides: the equipment (location/equipment_id) or "
        "the whole location", ("equipment", "location"))})

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("normal", "fault")

    def fields(self, label: dict[str, Any]) -> ThermalFields:
        location = key_text(value_at(label, "metadata.location"), "metadata.location")
        equipment = key_text(value_at(label, "metadata.equipment_id"), "metadata.equipment_id")
        annotations = required(label, "annotations")
        if not isinstance(annotations, list) or not annotations:
            raise BadLabel("annotations is empty or not a list: the image has no status")
        statuses = []
        for number, annotation in enumerate(annotations):
            status = text(value_at(annotation, "attributes.status"))
            if not status:
                raise BadLabel(f"annotations[{number}].attributes.status is missing or not "
                               f"text: {shown(value_at(annotation, 'attributes.status'))}")
            statuses.append(status)
        fault = any(status.lower().replace(" ", "") not in NORMAL for status in statuses)
        group = location if self.option_values["group"] == "location" else \
            f"{location}/{equipment}"
        return ThermalFields(group, int(fault), location, equipment,
                             text(value_at(label, "metadata.equipment_type")),
                             tuple(dict.fromkeys(statuses)), len(annotations),
                             pixels(value_at(label, "image.width")),
                             pixels(value_at(label, "image.height")))

    def synthesize(self, dest: Path, *, seed: int = 0, scale: int = 1) -> SampleDownload:
        return synthesize(dest, seed=seed, scale=scale, grouped_by=self.option_values["group"])


PROFILE: DatasetProfile = ThermalProfile()

SIZE = (160, 120)
FAULTS = ("overheat", "Arc Trace", "loose connection")


def synthesize(dest: Path, *, seed: int = 0, scale: int = 1, grouped_by: str = "equipment"
               ) -> SampleDownload:
    """3 locations x 4 pieces of equipment per scale, 3 photos each per scale, and the
    planted rejects. Every other piece has a fault on some photos; equipment ids repeat across
    locations (E01 at each), as they are numbered per location."""
    rng = np.random.default_rng(seed)
    pairs = []
    for site in range(1, 3 * scale + 1):
        for piece in range(1, 4 * scale + 1):
            for number in range(1, 3 * scale + 1):
                faulty = piece % 2 == 0 and number % 2 == 1
                pairs.append(_pair(rng, f"S{site:02d}", f"E{piece:02d}", number, faulty,
                                   grouped_by))
    for number in range(1, 6):  # the planted rejects' pairs
        pairs.append(_pair(rng, "S99", "E99", number, False, grouped_by))
    return write_download(dest, "514.전력설비 열화상 이미지", "thermal", pairs, _drop_status,
                          _temperatures)


def _pair(rng: np.random.Generator, location: str, equipment: str, number: int, faulty: bool,
          grouped_by: str) -> SamplePair:
    boxes, annotations = [], []
    for n in range(2):
        x, y = int(rng.integers(0, SIZE[0] - 40)), int(rng.integers(0, SIZE[1] - 30))
        width, height = int(rng.integers(12, 40)), int(rng.integers(10, 30))
        boxes.append([x, y, x + width, y + height])
        status = FAULTS[number % len(FAULTS)] if faulty and n == 0 else "normal"
        annotations.append({"id": n + 1, "data": {"x": x, "y": y, "width": width,
                                                   "height": height},
                            "attributes": {"status": status, "part": ("bushing", "clamp")[n]}})
    stem = f"TH_{location}_{equipment}_{number:03d}"
    label = {
        "image": {"filename": stem + ".jpg", "width": SIZE[0], "height": SIZE[1]},
        "metadata": {"location": location, "equipment_id": equipment,
                     "equipment_type": ("transformer", "switchgear")[int(equipment[1:]) % 2],
                     "captured_at": f"2022-08-{number % 28 + 1:02d}T14:00:00"},
        "annotations": annotations,
    }
    group = location if grouped_by == "location" else f"{location}/{equipment}"
    image = render(rng, SIZE, boxes, 60, (255, 230, 120))
    return SamplePair(stem, image, label, group, "fault" if faulty else "normal")


def _temperatures(pair: SamplePair) -> tuple[str, bytes]:
    """A per-pixel temperature CSV (a coarse one: 4x3 cells), as some releases ship."""
    rows = [",".join(f"{30 + (x + y) % 7:.1f}" for x in range(4)) for y in range(3)]
    return pair.stem + ".csv", ("\n".join(rows) + "\n").encode()


def _drop_status(label: dict[str, Any]) -> None:
    del label["annotations"][0]["attributes"]["status"]
