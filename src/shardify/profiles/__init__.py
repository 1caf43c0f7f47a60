"""Dataset profiles: everything that knows one dataset's labels, behind one small interface.

The converter, planner, writer, manifest, scan, verify and report know only this interface
(`DatasetProfile` and the plain data it answers in). Its implementations: `battery/` (AI Hub
71687, the default), `bees.py` and `thermal.py` on `base.JsonProfile`, and any user's profile
file; `load.py` gets one by name or path with its `-P` options, `fields.py` checks what a
profile makes of each label before a conversion keeps it.
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
    Boxes are axis-aligned: `corner_boxes` are [x1, y1, x2, y2] lists, `xywh_boxes` are
    {"x", "y", "width", "height"} objects; a transform keeps them in their form, corners
    ordered (x1 <= x2, y1 <= y2) however the image was turned.
    """

    point_lists: tuple[tuple[str, ...], ...]
    size: tuple[tuple[str, ...], tuple[str, ...]]
    outline: tuple[tuple[str, ...], ...] = ()
    defects: tuple[tuple[str, ...], ...] = ()
    corner_boxes: tuple[tuple[str, ...], ...] = ()
    xywh_boxes: tuple[tuple[str, ...], ...] = ()


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

    @property
    def root(self) -> Path: ...
    @property
    def samples(self) -> int: ...
    @property
    def rejects(self) -> dict[str, int]: ...
    @property
    def identical_duplicates(self) -> int: ...
    @property
    def ignored(self) -> int: ...


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

    @property
    def options(self) -> Mapping[str, ProfileOption]:
        """The `-P key=value` options it takes (none: an empty mapping)."""
        ...

    @property
    def option_values(self) -> Mapping[str, str]:
        """Every option's value in this profile (manifest metadata, run fingerprint)."""
        ...

    def with_options(self, values: Mapping[str, str]) -> DatasetProfile:
        """This profile with every option set to `values` (all of them, already checked
        against `options`' choices); ValueError for a value it still refuses."""
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


@dataclass(frozen=True)
class ProfileOption:
    """One `-P key=value` a profile takes: its default, the values it allows (None: any text)
    and what it does (`shardify profiles` prints it)."""

    default: str
    help: str
    choices: tuple[str, ...] | None = None
