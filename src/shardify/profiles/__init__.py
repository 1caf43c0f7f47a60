"""Dataset profiles: everything that knows one dataset's labels, behind one small interface.

The converter, planner, writer, manifest, scan, verify and report know only this interface; the
battery set is its one implementation (`profiles/battery`). A second AI Hub dataset of the same
"images zip + one JSON per image" shape is one new module implementing `DatasetProfile`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:  # pyarrow is imported where tables are built, not by every command
    import pyarrow as pa

BOM = b"\xef\xbb\xbf"


def strip_bom(raw: bytes | bytearray) -> bytes | bytearray:
    """Label bytes without a UTF-8 BOM (some exporters write one): what shards hold."""
    return raw[len(BOM) :] if raw.startswith(BOM) else raw


class Fields(Protocol):
    """What generic code reads from a sample's parsed label; a profile's fields hold more."""

    @property
    def group(self) -> str:
        """The unit a split never divides (a battery): samples of one group share a split."""
        ...

    @property
    def label(self) -> int:
        """The class index written to `.cls` (a position in `DatasetProfile.class_names`)."""
        ...


class Stratum(NamedTuple):
    """Where a group goes in the stratified split.

    Groups with the same `balance` are split together, each split getting its share of them;
    within it, the groups of each `rank` are shuffled and taken highest rank first, so every
    rank (e.g. batteries with a defect) is spread in the ratio too.
    """

    balance: str
    rank: int


@dataclass(frozen=True)
class Geometry:
    """Which label values are image coordinates (for transforms that crop or scale).

    Paths are key sequences into the label JSON; `"*"` steps into every item of a list.
    `point_lists` are flat [x1, y1, x2, y2, ...] lists in source pixels; `size` is the
    (width, height) pair that describes the image; `outline` are the point lists (of those)
    that outline the object `--crop outline` crops to, the first one present counting;
    `defects` are the point lists (of those) that outline a defect: the masks `export` draws.
    """

    point_lists: tuple[tuple[str, ...], ...]
    size: tuple[tuple[str, ...], tuple[str, ...]]
    outline: tuple[tuple[str, ...], ...] = ()
    defects: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class ReportSection:
    """One dataset-specific part of `shardify report`: text lines, and for HTML a table."""

    title: str
    lines: tuple[str, ...]
    table: tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]] | None = None
    bars: dict[str, dict[str, int]] | None = None  # per split, count per name: a bar plot
    bars_axis: str = ""


@dataclass(frozen=True)
class CardText:
    """What a dataset card says about the data itself, which only the profile knows."""

    title: str
    about: str  # Markdown: what the images and labels are, where they come from
    terms: str  # Markdown: whose terms of use govern the data, and where they are stated


class SampleData(Protocol):
    """What the sample-data generator planted: what a correct conversion must report."""

    root: Path
    samples: int
    rejects: dict[str, int]
    identical_duplicates: int
    ignored: int


class DatasetProfile(Protocol):
    """One dataset's rules. Implementations are plain immutable objects; all methods are pure."""

    @property
    def name(self) -> str:
        """How the profile is named (manifest metadata, run fingerprint)."""
        ...

    @property
    def version(self) -> int:
        """Changes whenever a rule changes what a conversion writes (part of the fingerprint)."""
        ...

    @property
    def image_extensions(self) -> Mapping[str, str]:
        """Lower-case extension with dot (1-4 letters) -> the image type written (`.jpeg`: jpg)."""
        ...

    @property
    def label_extension(self) -> str:
        ...

    @property
    def class_names(self) -> tuple[str, ...]:
        """`.cls` i names class_names[i]."""
        ...

    @property
    def group_noun(self) -> str:
        """What a group is, for messages: "battery"."""
        ...

    @property
    def group_unit(self) -> str:
        """The same in the plural, for summaries: "batteries"."""
        ...

    @property
    def columns(self) -> pa.Schema:
        """The manifest's dataset columns, in order. They include `group` and `label` (what
        `Fields` has) and the image's `width` and `height` (int32, null when unknown), which
        verify, report and the loader read."""
        ...

    @property
    def column_descriptions(self) -> Mapping[str, str]:
        """What each of `columns` holds (the manifest's metadata says it to its readers)."""
        ...

    @property
    def card(self) -> CardText:
        """The dataset-specific text of the dataset card convert writes (OUT/README.md)."""
        ...

    @property
    def geometry(self) -> Geometry:
        ...

    def parse_label(self, raw: bytes | bytearray) -> Fields:
        """The label's fields; raise BadLabel (its message is the reject detail)."""
        ...

    def sample_order(self, fields: Fields, key: str) -> tuple[Any, ...]:
        """Sort key of a sample within a split: a group's samples must come out contiguous."""
        ...

    def shard_family(self, fields: Fields) -> str:
        """Samples of different families never share a shard (the battery set: data_type), so
        a shard holds one kind of image and column-typed readers see one schema per shard."""
        ...

    def stratum(self, fields: Sequence[Fields]) -> Stratum:
        """The stratum of a group, from all its samples' fields."""
        ...

    def column_values(self, fields: Sequence[Fields]) -> dict[str, list[Any]]:
        """The dataset columns of manifest rows, one list per name in `columns`."""
        ...

    def scan_counts(self, fields: Iterable[Fields]) -> dict[str, Any]:
        """Dataset figures `shardify scan` shows (e.g. batteries per data_type)."""
        ...

    def report_sections(self, manifest: pa.Table, by_split: Mapping[str, pa.Table]
                        ) -> list[ReportSection]:
        """The report's dataset sections, from the manifest and its rows per split (in split
        order)."""
        ...

    def synthesize(self, dest: Path, *, seed: int = 0, scale: int = 1) -> SampleData:
        """Write this dataset's sample data under `dest` (the demo's and the tests' input)."""
        ...


def get_profile(name: str = "battery") -> DatasetProfile:
    """The built-in profile called `name`; UsageError for an unknown one."""
    from ..errors import UsageError

    if name == "battery":
        from .battery import PROFILE

        return PROFILE
    raise UsageError(f"unknown dataset profile {name!r} (built in: battery)")
