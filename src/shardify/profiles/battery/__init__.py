"""The AI Hub "battery defect image" dataset (71687): its rules, in one place.

Everything shardify knows about this dataset lives in this package: the label schema and its
fields (`labels.py`); the battery as the group a split never divides, the stratum and the sample
order; the manifest's dataset columns; which label values are image coordinates; the report's
dataset sections; and the sample data (`sample.py`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

from .. import CardText, DatasetProfile, Fields, Geometry, ProfileOption, ReportSection, Stratum
from ..base import column_lists
from .labels import DEFAULT_RULES, DEFECT_TYPE_CLASSES, BatteryFields, Rules, parse_label


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
        ("without_defects", pa.bool_()),
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
    "without_defects": "image_info.is_normal false, yet no defects listed and no swelling",
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


OPTIONS = MappingProxyType({
    "group": ProfileOption("data_type+battery", "what a split never divides: a battery of one "
                           "data type (ct-101), or battery: the battery_ids across data types "
                           "(101: CT and RGB of battery 101 in one split, for fusion models)",
                           ("data_type+battery", "battery")),
    "classes": ProfileOption("normal-defect", "the classes in .cls: normal-defect (0 normal, "
                             "1 defect), or defect-type: CT " + ", ".join(DEFECT_TYPE_CLASSES[:5])
                             + " (0-4) and RGB " + ", ".join(DEFECT_TYPE_CLASSES[5:])
                             + " (5-8)", ("normal-defect", "defect-type")),
    "normal_without_defects": ProfileOption(
        "false", "true: a label with is_normal false but no defects and no swelling counts as "
        "normal", ("false", "true")),
})


@dataclass(frozen=True)
class BatteryProfile:
    """The battery set's `DatasetProfile`."""

    name: str = "battery"
    version: int = 2
    image_extensions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(
        {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}))
    label_extension: str = ".json"
    group_noun: str = "battery"
    group_unit: str = "batteries"
    geometry: Geometry = GEOMETRY
    card: CardText = CARD
    rules: Rules = DEFAULT_RULES

    @property
    def options(self) -> Mapping[str, ProfileOption]:
        return OPTIONS

    @property
    def option_values(self) -> Mapping[str, str]:
        rules = self.rules
        return {"group": "battery" if rules.by_battery else "data_type+battery",
                "classes": "defect-type" if rules.defect_type else "normal-defect",
                "normal_without_defects": str(rules.normal_without_defects).lower()}

    def with_options(self, values: Mapping[str, str]) -> BatteryProfile:
        return replace(self, rules=Rules(values["group"] == "battery",
                                         values["classes"] == "defect-type",
                                         values["normal_without_defects"] == "true"))

    @property
    def class_names(self) -> tuple[str, ...]:
        return DEFECT_TYPE_CLASSES if self.rules.defect_type else ("normal", "defect")

    @property
    def columns(self) -> pa.Schema:
        return battery_columns()

    @property
    def column_descriptions(self) -> Mapping[str, str]:
        described = dict(COLUMN_DESCRIPTIONS)
        if self.rules.by_battery:
            described["group"] = ("the battery, data_info.battery_ids (101): CT and RGB images "
                                  "of one id share it; a split never divides one")
        if self.rules.defect_type:
            described["label"] = ("the class in .cls, a position in the class names: CT by "
                                  "type and defect, RGB by defect (both: mixed)")
        if self.rules.normal_without_defects:
            described["label"] += "; without_defects labels count as normal"
        return described

    def parse_label(self, raw: bytes | bytearray) -> BatteryFields:
        return parse_label(raw, self.rules)

    def sample_order(self, fields: Fields, key: str) -> tuple[str, int, str]:
        """By data_type, battery, key: a battery's slices are contiguous, in name order."""
        assert isinstance(fields, BatteryFields)
        return fields.data_type, fields.battery_id, key

    def shard_family(self, fields: Fields) -> str:
        """CT slices and exterior photos never share a shard."""
        assert isinstance(fields, BatteryFields)
        return fields.data_type

    def stratum(self, fields: Sequence[Fields]) -> Stratum:
        """Batteries are balanced per data_type (per combination of them when grouped by
        battery_ids). Normal/defect: those with a defect image are spread first. Defect-type:
        each combination of classes a battery has is spread, rarest classes first."""
        battery = [f for f in fields if isinstance(f, BatteryFields)]
        balance = "+".join(sorted({f.data_type for f in battery}))
        labels = {f.label for f in battery}
        if self.rules.defect_type:
            return Stratum(balance, sum(1 << label for label in labels))
        return Stratum(balance, int(1 in labels))

    def column_values(self, fields: Sequence[Fields]) -> dict[str, list[Any]]:
        return column_lists(fields, battery_columns().names)

    def scan_counts(self, fields: Iterable[Fields]) -> dict[str, Any]:
        """Batteries per data_type and how many ids every data type has; images per class;
        labels that say not normal yet list no defect and no swelling (`without_defects`)."""
        batteries: dict[str, set[int]] = defaultdict(set)
        classes: Counter[int] = Counter()
        without_defects = 0
        for f in fields:
            assert isinstance(f, BatteryFields)
            batteries[f.data_type].add(f.battery_id)
            classes[f.label] += 1
            without_defects += f.without_defects
        both = set.intersection(*batteries.values()) if len(batteries) > 1 else set()
        names = self.class_names
        return {"batteries": {dt: len(ids) for dt, ids in sorted(batteries.items())},
                "battery_ids_in_every_data_type": len(both),
                "images_per_class": {names[n]: classes[n] for n in range(len(names))},
                "not_normal_without_defects": without_defects}

    def report_sections(self, manifest: pa.Table, by_split: Mapping[str, pa.Table]
                        ) -> list[ReportSection]:
        """By data_type and form; battery ids in both data types; defect types (case-folded);
        swelling."""
        return [_by_kind(manifest, list(by_split), self.class_names), _shared_ids(manifest),
                _defect_types(by_split), _swelling(by_split)]

    def synthesize(self, dest: Path, *, seed: int = 0, scale: int = 1) -> Any:
        from .sample import synthesize

        return synthesize(dest, seed=seed, scale=scale)


def _by_kind(manifest: pa.Table, splits: Sequence[str], names: Sequence[str]) -> ReportSection:
    """Images per class (those that occur) per split, data_type and form."""
    grouped = manifest.group_by(["split", "data_type", "form", "label"]).aggregate(
        [("key", "count")]).to_pylist()
    shown = [name for n, name in enumerate(names)
             if len(names) == 2 or any(row["label"] == n for row in grouped)]
    kinds: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for row in grouped:
        kinds[row["split"], row["data_type"], row["form"] or "-"][names[row["label"]]] += \
            row["key_count"]
    rows = [(split, data_type, form, *(counts[name] for name in shown))
            for (split, data_type, form), counts in sorted(
                kinds.items(), key=lambda item: (splits.index(item[0][0]), item[0][1:]))]
    lines = tuple(f"  {s:<6} {dt:<5} {form:<12} " + "  ".join(
        f"{name} {n:>7}" for name, n in zip(shown, counts, strict=True) if n or len(shown) == 2)
        for s, dt, form, *counts in rows)
    return ReportSection("by data_type and form", lines,
                         (("split", "data_type", "form", *shown), tuple(rows)))


def _shared_ids(manifest: pa.Table) -> ReportSection:
    """Battery ids both data types have (users pair them for CT+RGB fusion models), and
    whether each such id's images all landed in one split."""
    splits_of: dict[int, set[str]] = defaultdict(set)
    types_of: dict[int, set[str]] = defaultdict(set)
    for row in manifest.select(["battery_id", "data_type", "split"]).to_pylist():
        types_of[row["battery_id"]].add(row["data_type"])
        splits_of[row["battery_id"]].add(row["split"])
    every = set().union(*types_of.values()) if types_of else set()
    shared = sorted(i for i, types in types_of.items() if len(every) > 1 and types == every)
    together = sum(len(splits_of[i]) == 1 for i in shared)
    lines = (f"  {len(shared)} of {len(types_of)} battery ids occur in every data type "
             f"({', '.join(sorted(every))}); {together} of them have all their images in one "
             "split (-P group=battery puts them there)",)
    return ReportSection("battery ids in both data types", lines)


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


PROFILE: DatasetProfile = BatteryProfile()
