"""What a conversion keeps of a label: the profile's fields, checked.

A profile is code (a user's too): whatever it raises on one label, or a value its own columns
cannot hold, becomes that label's `BadLabel` reject with the reason, never a traceback mid-run
or an Arrow error once the shards are written.
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard, cast

from ..errors import BadLabel
from . import DatasetProfile, Fields

if TYPE_CHECKING:
    import pyarrow as pa


def parse_fields(profile: DatasetProfile, raw: bytes | bytearray) -> Fields:
    """`profile.parse_label(raw)`, any exception a profile raises on one label (a KeyError of
    a user's `label["x"]`) said as that label's BadLabel: a reject, not a traceback mid-run."""
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
