"""Dataset profiles: everything that knows one dataset's labels, behind one small interface.

The converter, planner, writer, manifest, scan, verify and report know only this interface; the
battery set is its one implementation (`profiles/battery`). A second AI Hub dataset of the same
"images zip + one JSON per image" shape is one new module implementing `DatasetProfile`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import numbers
import reprlib
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeGuard, cast

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


def parse_fields(profile: DatasetProfile, raw: bytes | bytearray) -> Fields:
    """`profile.parse_label(raw)`, any exception a profile raises on one label (a KeyError of
    a user's `label["x"]`) said as that label's BadLabel: a reject, not a traceback mid-run."""
    from ..errors import BadLabel

    try:
        return profile.parse_label(raw)
    except (BadLabel, MemoryError):  # a MemoryError is the machine's, not the label's
        raise
    except Exception as error:
        raise BadLabel(f"profile {profile.name} failed on this label: {type(error).__name__}: "
                       f"{error}") from None


class LabelFields:
    """Each label's fields as a conversion keeps them (`parse_fields`, then checked): a class
    outside the profile's names, a group that is not text, a value its column's type cannot
    hold are that label's BadLabel, not a wrong `.cls` or an Arrow error once the shards are
    written. List values become tuples (fields are hashed); equal fields are kept, and
    checked, once (a battery's labels share theirs)."""

    def __init__(self, profile: DatasetProfile) -> None:
        self.profile, self.classes = profile, len(profile.class_names)
        schema = profile.columns
        self.checks = [(name, str(kind), _accepts(kind)) for name, kind in
                       zip(schema.names, schema.types, strict=True)
                       if name not in ("group", "label")]
        self.seen: dict[Fields, Fields] = {}

    def __call__(self, raw: bytes | bytearray) -> Fields:
        fields = parse_fields(self.profile, raw)
        try:
            known = self.seen.get(fields)
        except TypeError:  # unhashable: lists among the values
            fields = self._hashable(fields)
            known = self.seen.get(fields)
        if known is not None:
            return known
        self._check(fields)
        self.seen[fields] = fields
        return fields

    def _hashable(self, fields: Fields) -> Fields:
        from ..errors import BadLabel

        make = getattr(type(fields), "_make", None)  # a NamedTuple's
        if make is not None:
            fields = make(tuple(v) if isinstance(v, list) else v
                          for v in cast(tuple, fields))
            try:
                hash(fields)
                return fields
            except TypeError:
                pass
        raise BadLabel(f"profile {self.profile.name} gave fields that are not a NamedTuple of "
                       f"column values: {reprlib.repr(fields)}")

    def _check(self, fields: Fields) -> None:
        from ..errors import BadLabel

        name, group, label = self.profile.name, getattr(fields, "group", None), \
            getattr(fields, "label", None)
        if not isinstance(group, str) or not group:
            raise BadLabel(f"profile {name} gave a group that is not non-empty text: "
                           f"{reprlib.repr(group)}")
        if not _integer(label) or not 0 <= label < self.classes:
            raise BadLabel(f"profile {name} gave class {reprlib.repr(label)}, not a number "
                           f"from 0 to {self.classes - 1} (it names {self.classes} classes)")
        for column, kind, accepts in self.checks:
            value = getattr(fields, column, _MISSING)
            if value is _MISSING:
                raise BadLabel(f"profile {name}: its fields have no {column}, one of its columns")
            if value is not None and not accepts(value):
                raise BadLabel(f"profile {name} gave {column} {reprlib.repr(value)}, which its "
                               f"{kind} column cannot hold")


_MISSING = object()
SEQUENCES = (list, tuple)


def _integer(value: Any) -> TypeGuard[int]:
    """An integer, numpy's too, but not a bool."""
    return type(value) is int or (isinstance(value, numbers.Integral)
                                  and not isinstance(value, bool))


def _accepts(kind: pa.DataType) -> Callable[[Any], bool]:
    """Whether a value fits a column of type `kind` (None always does: a null)."""
    import numpy as np
    import pyarrow as pa

    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        item = _accepts(kind.value_type)
        return lambda v: isinstance(v, SEQUENCES) and all(x is None or item(x) for x in v)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return lambda v: isinstance(v, str)
    bools = (bool, np.bool_)
    if pa.types.is_boolean(kind):
        return lambda v: isinstance(v, bools)
    if pa.types.is_integer(kind):
        bits = kind.bit_width - pa.types.is_signed_integer(kind)
        low = -(1 << bits) if pa.types.is_signed_integer(kind) else 0
        return lambda v: (_integer(v) or (isinstance(v, float) and v.is_integer())) \
            and low <= v < 1 << bits  # 640.0 is 640; 640.5 is refused (Arrow would cut it)
    if pa.types.is_floating(kind):
        return lambda v: type(v) is float or _integer(v) or (
            isinstance(v, numbers.Real) and not isinstance(v, bools))
    return lambda v: True  # a type not listed here: pyarrow decides


BUILT_IN = {"battery": "shardify.profiles.battery", "bees-71667": "shardify.profiles.bees",
            "thermal-514": "shardify.profiles.thermal"}
"""Built-in profile name -> the module whose `PROFILE` it is."""

REQUIRED = ("name", "version", "image_extensions", "label_extension", "class_names",
            "group_noun", "group_unit", "columns", "column_descriptions", "card", "geometry",
            "options", "option_values", "with_options", "parse_label", "sample_order",
            "shard_family", "stratum", "column_values", "scan_counts", "report_sections",
            "synthesize")
"""What a profile module's `PROFILE` must have (the `DatasetProfile` members)."""

NEEDED_COLUMNS = ("group", "label", "width", "height")
USER_MODULE = "shardify_user_profile_"  # + a hash of its path: a user profile's module name


def get_profile(spec: str = "battery", values: Mapping[str, str] | None = None
                ) -> DatasetProfile:
    """The profile `spec` names (a built-in name, or a path to a `.py` file defining
    `PROFILE`) with the `-P` option `values` set; UsageError (one line) when it cannot be had."""
    from ..errors import UsageError

    if spec in BUILT_IN:
        profile = _module_profile(importlib.import_module(BUILT_IN[spec]), spec)
    elif spec.endswith(".py"):
        profile = _file_profile(Path(spec))
    else:
        raise UsageError(f"unknown dataset profile {spec!r} (built in: {', '.join(BUILT_IN)}; "
                         "or the path of a .py file)")
    return _checked_classes(configure(profile, values or {}, spec), spec)


def _checked_classes(profile: DatasetProfile, spec: str) -> DatasetProfile:
    """The profile, if its class names (as its options make them) can be the `.cls` classes:
    distinct non-empty texts, as many as its `label` column can number."""
    from ..errors import UsageError

    try:
        names = profile.class_names
        most = 1 << (profile.columns.field("label").type.bit_width - 1)  # an integer column
    except Exception as error:
        raise UsageError(f"profile {spec}: its class names or label column cannot be had: "
                         f"{type(error).__name__}: {error}") from None
    if not isinstance(names, tuple | list) or not names or \
            not all(isinstance(n, str) and n.strip() for n in names) or \
            len(set(names)) != len(names) or len(names) > most:
        raise UsageError(f"profile {spec}: class_names must be distinct, non-empty texts (at "
                         f"least one, at most {most}), not {reprlib.repr(names)}")
    taken = sorted({*names, profile.group_unit} & {"shards", "samples", "bytes"} |
                   ({profile.group_unit} & set(names)))
    if taken:  # summary.json counts each split's samples, groups and classes side by side
        raise UsageError(f"profile {spec}: {', '.join(taken)} cannot name a class or the "
                         "groups (class names, group_unit, shards, samples and bytes are the "
                         "summary's counts of each split)")
    return profile


def configure(profile: DatasetProfile, values: Mapping[str, str], spec: str) -> DatasetProfile:
    """`profile` with `values` set: UsageError for an option it lacks or a value it refuses."""
    from ..errors import UsageError

    options = profile.options
    for key, value in values.items():
        if key not in options:
            known = ", ".join(options) or "none"
            raise UsageError(f"profile {spec} has no option {key!r} (its options: {known})")
        allowed = options[key].choices
        if allowed is not None and value not in allowed:
            raise UsageError(f"profile {spec}: {key} must be one of {', '.join(allowed)}, "
                             f"not {value!r}")
    if not values:
        return profile
    try:
        return profile.with_options({**profile.option_values, **values})
    except ValueError as error:
        raise UsageError(f"profile {spec}: {error}") from None
    except Exception as error:  # a user's with_options (or __init__) failing
        raise UsageError(f"profile {spec}: its options cannot be set: "
                         f"{type(error).__name__}: {error}") from None


def parse_profile_options(pairs: Sequence[str]) -> dict[str, str]:
    """`-P key=value` arguments as a dict; ValueError for one without `=`."""
    values: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"-P takes key=value, not {pair!r}")
        values[key.strip()] = value.strip()
    return values


def _file_profile(path: Path) -> DatasetProfile:
    """Load a user's profile module from its file. It is registered in `sys.modules` under a
    name made from its absolute path, so what it defines pickles (the saved plan, workers)."""
    from ..errors import UsageError

    if not path.is_file():
        raise UsageError(f"profile file {path} does not exist")
    resolved = path.resolve()
    name = USER_MODULE + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    if name in sys.modules:
        return _module_profile(sys.modules[name], str(path))
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    if str(resolved.parent) not in sys.path:  # it may import modules beside it
        sys.path.append(str(resolved.parent))
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:  # whatever a user's module raises: one line
        del sys.modules[name]
        where = ""
        if isinstance(error, SyntaxError):
            where = f" (line {error.lineno})"
        raise UsageError(f"profile file {path} cannot be loaded{where}: "
                         f"{type(error).__name__}: {error}") from None
    return _module_profile(module, str(path))


def _module_profile(module: ModuleType, spec: str) -> DatasetProfile:
    """The module's `PROFILE`, checked for every member the interface has."""
    from ..errors import UsageError
    from ..output.manifest import COLUMN_DESCRIPTIONS  # the manifest's own columns

    profile = getattr(module, "PROFILE", None)
    if profile is None:
        raise UsageError(f"profile {spec} defines no PROFILE (the DatasetProfile object)")
    if isinstance(profile, type):
        raise UsageError(f"profile {spec}: PROFILE is the class {profile.__name__}, not an "
                         f"object: PROFILE = {profile.__name__}()")
    missing = []
    for member in REQUIRED:
        try:
            getattr(profile, member)
        except AttributeError:
            missing.append(member)
        except Exception as error:  # a property of its own failing
            raise UsageError(f"profile {spec}: its {member} cannot be had: "
                             f"{type(error).__name__}: {error}") from None
    if missing:
        raise UsageError(f"profile {spec}: PROFILE lacks {', '.join(missing)} (see the "
                         "README's \"Writing a profile\")")
    names = profile.columns.names
    lacking = [name for name in NEEDED_COLUMNS if name not in names]
    if lacking:
        raise UsageError(f"profile {spec}: its columns lack {', '.join(lacking)}")
    clashing = sorted({name for name in names if name in COLUMN_DESCRIPTIONS} |
                      {name for name, count in Counter(names).items() if count > 1})
    if clashing:
        raise UsageError(f"profile {spec}: its columns {', '.join(clashing)} repeat a name or "
                         "take one of the manifest's own: rename them")
    return profile
