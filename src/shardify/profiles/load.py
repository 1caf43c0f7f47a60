"""Getting a profile: a built-in one by name, or a user's file by path, with its `-P` options,
checked for everything the interface needs before any work starts (one-line errors)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import reprlib
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

from ..errors import UsageError
from . import DatasetProfile

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
SMALLEST_LABEL_COLUMN = 128  # classes an int8 label column numbers (0..127)
USER_MODULE = "shardify_user_profile_"  # + a hash of its path: a user profile's module name


def get_profile(spec: str = "battery", values: Mapping[str, str] | None = None
                ) -> DatasetProfile:
    """The profile `spec` names (a built-in name, or a path to a `.py` file defining
    `PROFILE`) with the `-P` option `values` set; UsageError (one line) when it cannot be had."""
    if spec in BUILT_IN:  # checked by the test suite (test_seams), not here: checking builds
        # the columns, which imports pyarrow, and convert forks its workers after this
        profile: DatasetProfile = importlib.import_module(BUILT_IN[spec]).PROFILE
    elif spec.endswith(".py"):
        profile = _file_profile(Path(spec))
    else:
        raise UsageError(f"unknown dataset profile {spec!r} (built in: {', '.join(BUILT_IN)}; "
                         "or the path of a .py file)")
    return _checked_classes(configure(profile, values or {}, spec), spec)


def _checked_classes(profile: DatasetProfile, spec: str) -> DatasetProfile:
    """The profile, if its class names (as its options make them) can be the `.cls` classes:
    distinct non-empty texts, as many as its `label` column can number."""
    try:
        names = profile.class_names
        most = SMALLEST_LABEL_COLUMN
        if len(names) > most:  # more than any integer label column holds: ask this one's
            most = 1 << (profile.columns.field("label").type.bit_width - 1)
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
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise UsageError(f"profile {spec}: its columns {', '.join(repeated)} repeat a name: "
                         "rename them")
    return profile
