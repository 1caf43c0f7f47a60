"""The AI Hub "battery defect image" dataset (71687): its rules, in one place.

Everything shardify knows about this dataset lives in this package: the label schema and its
fields (`labels.py`); the battery as the group a split never divides, the stratum and the sample
order; the manifest's dataset columns; which label values are image coordinates; the report's
dataset sections; and the sample data (`sample.py`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

from .. import CardText, Fields, Geometry, ReportSection, Stratum
from .labels import BatteryFields, parse_label


@cache
def battery_columns() -> pa.Schema:
    """The manifest's dataset columns (built on first use: pyarrow is not imported before the
    workers are forked)."""
    import pyarrow as pa

    return pa.schema([
        ("group", pa.string()),
        ("battery_id", pa.int64()),
        ("data_type", pa.string()),
        ("type", pa.string()),
        ("form", pa.string()),
        ("label", pa.int8()),
        ("is_normal", pa.bool_()),
        ("swelling", pa.bool_()),
        ("defect_types", pa.list_(pa.string())),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ])

COLUMN_DESCRIPTIONS = MappingProxyType({
    "group": "the battery, {data_type}-{battery_id} (ct-101): a split never divides one",
    "battery_id": "data_info.battery_ids, the battery's number (numbered per data_type)",
    "data_type": "data_info.data_type, lower-cased: ct (CT slices) or rgb (exterior photos)",
    "type": "data_info.type (cell or module)",
    "form": "data_info.form (pouch or cylindrical)",
    "label": "the class in .cls: 0 normal, 1 defect (image_info.is_normal false)",
    "is_normal": "image_info.is_normal",
    "swelling": "swelling.swelling; null when absent or not true/false",
    "defect_types": "the distinct defects[].name values, in order of appearance",
    "width": "image_info.width; with a transform, the written image's width",
    "height": "image_info.height; with a transform, the written image's height",
})
CARD = CardText(
    title="AI Hub battery defect images (dataset 71687)",
    about=(
        "Images of batteries from the AI Hub dataset 71687, \"배터리 불량 이미지 데이터\" "
        "(battery defect image data): CT slices (`data_type` ct, JPEG) and exterior photos "
        "(`data_type` rgb, PNG) of cells and modules, each with its label JSON as AI Hub "
        "published it: the battery (`data_info`), whether the image is normal "
        "(`image_info.is_normal`), swelling, the battery outline and the defects' polygons "
        "(`defects[].points`)."),
    terms=(
        "The images and labels are AI Hub's (https://www.aihub.or.kr, dataset 71687), "
        "published under AI Hub's terms of use, which may restrict who may use the data, "
        "for what, and whether it may be shared or published (for instance on the Hugging "
        "Face Hub)."),
)

# The outline polygon comes in two layouts (swelling.battery_outline as a flat list, or a
# top-level battery_outline.points); defect polygons are flat lists too.
GEOMETRY = Geometry(
    point_lists=(("swelling", "battery_outline"), ("battery_outline", "points"),
                 ("defects", "*", "points")),
    size=(("image_info", "width"), ("image_info", "height")),
    outline=(("swelling", "battery_outline"), ("battery_outline", "points")),
    defects=(("defects", "*", "points"),))


@dataclass(frozen=True)
class BatteryProfile:
    """The battery set's `DatasetProfile`."""

    name: str = "battery"
    version: int = 1
    image_extensions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(
        {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}))
    label_extension: str = ".json"
    class_names: tuple[str, ...] = ("normal", "defect")
    group_noun: str = "battery"
    group_unit: str = "batteries"
    geometry: Geometry = GEOMETRY
    card: CardText = CARD

    @property
    def columns(self) -> pa.Schema:
        return battery_columns()

    @property
    def column_descriptions(self) -> Mapping[str, str]:
        return COLUMN_DESCRIPTIONS

    def parse_label(self, raw: bytes | bytearray) -> BatteryFields:
        return parse_label(raw)

    def sample_order(self, fields: Fields, key: str) -> tuple[str, int, str]:
        """By data_type, battery, key: a battery's slices are contiguous, in name order."""
        assert isinstance(fields, BatteryFields)
        return fields.data_type, fields.battery_id, key

    def shard_family(self, fields: Fields) -> str:
        """CT slices and exterior photos never share a shard."""
        assert isinstance(fields, BatteryFields)
        return fields.data_type

    def stratum(self, fields: Sequence[Fields]) -> Stratum:
        """Batteries are balanced per data_type; those with a defect image are spread first."""
        first = fields[0]
        assert isinstance(first, BatteryFields)
        return Stratum(first.data_type, int(any(f.label == 1 for f in fields)))

    def column_values(self, fields: Sequence[Fields]) -> dict[str, list[Any]]:
        battery = [f for f in fields if isinstance(f, BatteryFields)]
        assert len(battery) == len(fields)
        return {
            "group": [f.group for f in battery],
            "battery_id": [f.battery_id for f in battery],
            "data_type": [f.data_type for f in battery],
            "type": [f.type for f in battery],
            "form": [f.form for f in battery],
            "label": [f.label for f in battery],
            "is_normal": [f.is_normal for f in battery],
            "swelling": [f.swelling for f in battery],
            "defect_types": [list(f.defect_types) for f in battery],
            "width": [f.width for f in battery],
            "height": [f.height for f in battery],
        }

    def scan_counts(self, fields: Iterable[Fields]) -> dict[str, Any]:
        """Batteries per data_type, and how many images show a defect."""
        batteries: dict[str, set[int]] = defaultdict(set)
        defects = 0
        for f in fields:
            assert isinstance(f, BatteryFields)
            batteries[f.data_type].add(f.battery_id)
            defects += f.label
        return {"batteries": {dt: len(ids) for dt, ids in sorted(batteries.items())},
                "defect_images": defects}

    def report_sections(self, manifest: pa.Table, by_split: Mapping[str, pa.Table]
                        ) -> list[ReportSection]:
        """By data_type and form; defect types (case-folded); swelling."""
        return [_by_kind(manifest, list(by_split)), _defect_types(by_split),
                _swelling(by_split)]

    def synthesize(self, dest: Path, *, seed: int = 0, scale: int = 1) -> Any:
        from .sample import synthesize

        return synthesize(dest, seed=seed, scale=scale)


def _by_kind(manifest: pa.Table, splits: Sequence[str]) -> ReportSection:
    grouped = manifest.group_by(["split", "data_type", "form", "label"]).aggregate(
        [("key", "count")])
    kinds: dict[tuple[str, str, str], dict[str, int]] = {}
    for row in grouped.to_pylist():
        counts = kinds.setdefault((row["split"], row["data_type"], row["form"] or "-"),
                                  {"normal": 0, "defect": 0})
        counts["defect" if row["label"] else "normal"] += row["key_count"]
    rows = [(split, data_type, form, counts["normal"], counts["defect"])
            for (split, data_type, form), counts in sorted(
                kinds.items(), key=lambda item: (splits.index(item[0][0]), item[0][1:]))]
    lines = tuple(f"  {s:<6} {dt:<5} {form:<12} normal {n:>7}  defect {d:>7}"
                  for s, dt, form, n, d in rows)
    return ReportSection("by data_type and form", lines,
                         (("split", "data_type", "form", "normal", "defect"), tuple(rows)))


def _defect_types(by_split: Mapping[str, pa.Table]) -> ReportSection:
    import pyarrow.compute as pc

    counts = {split: dict(Counter(pc.utf8_lower(pc.list_flatten(rows["defect_types"]))
                                  .to_pylist()).most_common())
              for split, rows in by_split.items()}
    lines = tuple(f"  {split:<6} " + (", ".join(f"{name} {n}" for name, n in found.items())
                                     or "none") for split, found in counts.items())
    return ReportSection("defect types (images containing each, case-folded)", lines,
                         bars=counts, bars_axis="images containing the defect")


def _swelling(by_split: Mapping[str, pa.Table]) -> ReportSection:
    lines = []
    for split, rows in by_split.items():
        counts = Counter(rows["swelling"].to_pylist()).most_common()
        lines.append(f"  {split:<6} " + ", ".join(f"{k} {v}" for k, v in counts))
    return ReportSection("swelling", tuple(lines))


PROFILE = BatteryProfile()
