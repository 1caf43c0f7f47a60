"""`JsonProfile`: what every "images + one JSON per image" profile shares, so a profile states
only its own rules: which fields make the class, the group and the extra columns.

A subclass sets the class attributes below and writes one method, `fields`, from the parsed
label to a NamedTuple with at least `group`, `label`, `width` and `height` and one field per
extra column. Everything else (JSON decoding, the manifest's columns, the split's strata, scan
figures, the report's class table, `-P` options) is done here. The built-in bees-71667 and
thermal-514 profiles are such subclasses; so can a user's profile file be (see the README).
"""

from __future__ import annotations

import reprlib
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ..errors import BadLabel, UsageError
from . import CardText, Fields, Geometry, ProfileOption, ReportSection, Stratum, strip_bom

if TYPE_CHECKING:
    import pyarrow as pa

COLUMN_TYPES = ("string", "int64", "float64", "bool", "list<string>", "list<int64>")


@dataclass(frozen=True)
class Column:
    """One dataset column of the manifest: its name, type (one of COLUMN_TYPES) and what it
    holds. Its values are the same-named field of each sample's fields."""

    name: str
    type: str
    description: str


def arrow_type(name: str) -> pa.DataType:
    """The pyarrow type a COLUMN_TYPES name stands for."""
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(),
             "bool": pa.bool_(), "list<string>": pa.list_(pa.string()),
             "list<int64>": pa.list_(pa.int64())}
    if name not in types:
        raise ValueError(f"column type {name!r} is not one of {', '.join(COLUMN_TYPES)}")
    return types[name]


class JsonProfile:
    """A `DatasetProfile` for one-JSON-per-image datasets; subclasses set what is theirs."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    image_extensions: ClassVar[Mapping[str, str]] = MappingProxyType(
        {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"})
    label_extension: ClassVar[str] = ".json"
    group_noun: ClassVar[str] = "group"
    group_unit: ClassVar[str] = "groups"
    group_description: ClassVar[str] = "the group: a split never divides one"
    label_description: ClassVar[str] = "the class in .cls, a position in the class names"
    extra_columns: ClassVar[tuple[Column, ...]] = ()
    geometry: ClassVar[Geometry] = Geometry(point_lists=(),
                                            size=(("image", "width"), ("image", "height")))
    card: ClassVar[CardText] = CardText("", "", "")
    options: ClassVar[Mapping[str, ProfileOption]] = MappingProxyType({})

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self.option_values: Mapping[str, str] = MappingProxyType(
            {key: option.default for key, option in self.options.items()} | dict(values or {}))

    def with_options(self, values: Mapping[str, str]) -> JsonProfile:
        return type(self)(values)

    @property
    def class_names(self) -> tuple[str, ...]:
        """`.cls` i names class_names[i]; a property, so options may change them."""
        raise NotImplementedError(f"profile {self.name} names no classes")

    def fields(self, label: dict[str, Any]) -> Fields:
        """The sample's fields from its label JSON object; raise BadLabel saying what is
        missing or malformed (the reject's detail)."""
        raise NotImplementedError(f"profile {self.name} does not say how to read a label")

    def parse_label(self, raw: bytes | bytearray) -> Fields:
        return self.fields(json_object(raw))

    @property
    def columns(self) -> pa.Schema:
        import pyarrow as pa

        return pa.schema([("group", pa.string()), ("label", pa.int16()),
                          *((c.name, arrow_type(c.type)) for c in self.extra_columns),
                          ("width", pa.int32()), ("height", pa.int32())])

    @property
    def column_descriptions(self) -> Mapping[str, str]:
        return {"group": self.group_description, "label": self.label_description,
                **{c.name: c.description for c in self.extra_columns},
                "width": "the image's width in pixels (with a transform, the written image's)",
                "height": "the image's height in pixels (with a transform, the written image's)"}

    def sample_order(self, fields: Fields, key: str) -> tuple[str, str]:
        """By group, then key: a group's samples are contiguous, in name order."""
        return fields.group, key

    def shard_family(self, fields: Fields) -> str:
        """One family: any samples may share a shard."""
        return ""

    def stratum(self, fields: Sequence[Fields]) -> Stratum:
        """Each combination of classes a group has is spread in the ratio, rarest (highest
        class numbers) first, so every class's groups are spread."""
        return Stratum("", sum(1 << label for label in {f.label for f in fields}))

    def column_values(self, fields: Sequence[Fields]) -> dict[str, list[Any]]:
        return column_lists(fields, self.columns.names)

    def scan_counts(self, fields: Iterable[Fields]) -> dict[str, Any]:
        """How many groups, and images per class."""
        groups: set[str] = set()
        classes: Counter[int] = Counter()
        for f in fields:
            groups.add(f.group)
            classes[f.label] += 1
        names = self.class_names
        return {self.group_unit: len(groups),
                "images_per_class": {names[n]: classes[n] for n in range(len(names))}}

    def report_sections(self, manifest: pa.Table, by_split: Mapping[str, pa.Table]
                        ) -> list[ReportSection]:
        """Per split, the groups that have each class."""
        names = self.class_names
        rows = []
        for split, table in by_split.items():
            groups: dict[int, set[str]] = {}
            for group, label in zip(table["group"].to_pylist(), table["label"].to_pylist(),
                                    strict=True):
                groups.setdefault(label, set()).add(group)
            rows.append((split, *(len(groups.get(n, ())) for n in range(len(names)))))
        lines = tuple(f"  {split:<6} " + ", ".join(f"{name} {n}" for name, n in
                                                  zip(names, counts, strict=True))
                      for split, *counts in rows)
        return [ReportSection(f"{self.group_unit} having each class", lines,
                              (("split", *names), tuple(rows)))]

    def synthesize(self, dest: Path, *, seed: int = 0, scale: int = 1) -> Any:
        raise UsageError(f"profile {self.name} has no sample-data generator")


def column_lists(fields: Sequence[Fields], names: Sequence[str]) -> dict[str, list[Any]]:
    """Each named column's values: the same-named field of every sample's fields (tuples, as
    fields hold lists to stay hashable, become lists)."""
    return {name: [list(v) if isinstance(v, tuple) else v
                   for v in (getattr(f, name) for f in fields)]
            for name in names}


def json_object(raw: bytes | bytearray) -> dict[str, Any]:
    """Label bytes (a BOM allowed) as a JSON object; BadLabel when they are not one."""
    try:
        document = orjson.loads(strip_bom(raw))
    except orjson.JSONDecodeError as error:
        raise BadLabel(f"not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise BadLabel("not a JSON object")
    return document


def value_at(document: Any, path: str) -> Any:
    """The value at a dotted `path` ("colony.id") of a JSON object, None where absent."""
    for step in path.split("."):
        if not isinstance(document, dict):
            return None
        document = document.get(step)
    return document


def required(document: Any, path: str) -> Any:
    """The value at `path`; BadLabel naming it when absent or null."""
    value = value_at(document, path)
    if value is None:
        raise BadLabel(f"missing {path}")
    return value


def shown(value: Any) -> str:
    """A label value for a reject's detail: its repr, shortened only when it is nested too deep
    to print (a hostile label: repr would recurse without bound)."""
    try:
        return repr(value)
    except RecursionError:
        return reprlib.repr(value)


def text(value: Any) -> str | None:
    """Stripped and interned: a handful of values repeated on 400k labels are stored once."""
    return sys.intern(value.strip()) if isinstance(value, str) else None


def key_text(value: Any, path: str) -> str:
    """A group id: a non-empty string, or an integer (as its digits); BadLabel otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return sys.intern(str(value))
    if isinstance(value, str) and value.strip():
        return sys.intern(value.strip())
    raise BadLabel(f"missing {path}" if value is None
                   else f"{path} is not an id: {shown(value)}")


def pixels(value: Any) -> int | None:
    """A pixel size, or None when it is not a plausible one (the manifest column is int32)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None
