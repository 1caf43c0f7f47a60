"""The JSON types of the labels written, merged over every label of a run.

A dataset card declares the label's type for every sample at once: Hugging Face `datasets`
otherwise guesses it from the first few samples and fails on a field that is null there and a
number later. Workers note the type of each label they write, and a shard's entry carries the
merge: a resumed run merges the same per-shard types as an uninterrupted one.

A type is plain JSON (it goes through the journal): "null", "bool", "int", "float", "str",
["list", item type], {field: type, ...} (fields in the order first seen), or "json" where
values disagree (a string here, a number there) and only "any JSON" describes them all.
"""

from __future__ import annotations

from typing import Any

import orjson

NULL, BOOL, INT, FLOAT, STR, JSON, LIST = "null", "bool", "int", "float", "str", "json", "list"
LOW, HIGH = -(2**63), 2**63 - 1  # an int64 column's range; other integers are "json"
MAX_DEPTH = 32  # deeper values are "json": no recursion without bound on a hostile label
_LEAVES = {type(None): NULL, bool: BOOL, float: FLOAT, str: STR}
_NUMBERS = frozenset((int, float))


def label_type(label: bytes | bytearray) -> Any:
    """The type of a label's JSON (valid: the planner has parsed it)."""
    return value_type(orjson.loads(label))


def value_type(value: Any, depth: int = 0) -> Any:
    """The type of a JSON value as orjson parses it.

    A worker types every label it writes, so the common cases cost no call: an object's
    scalar fields are typed inline, a list of numbers (a polygon) by the set of its types.
    """
    kind = type(value)
    if kind is dict and depth < MAX_DEPTH:
        leaves = _LEAVES
        return {name: leaves.get(type(item)) or (
            INT if type(item) is int and LOW <= item <= HIGH else value_type(item, depth + 1))
            for name, item in value.items()}
    if kind in _LEAVES:
        return _LEAVES[kind]
    if kind is int:
        return INT if LOW <= value <= HIGH else JSON
    if kind is not list or depth >= MAX_DEPTH:
        return JSON
    kinds = set(map(type, value))
    if value and kinds <= _NUMBERS:
        if int in kinds and not LOW <= min(value) <= max(value) <= HIGH:
            return [LIST, JSON]
        return [LIST, FLOAT if float in kinds else INT]
    item: Any = NULL
    for element in value:
        item = merge(item, value_type(element, depth + 1))
    return [LIST, item]


def merge(a: Any, b: Any) -> Any:
    """The narrowest type that describes values of type `a` and of type `b`.

    Null joins anything (a field missing or null in some labels); an int joins a float as a
    float; lists merge their items, objects their fields (a's order, then b's new ones).
    """
    if a == b or b == NULL:
        return a
    if a == NULL:
        return b
    if isinstance(a, str) and isinstance(b, str):
        return FLOAT if {a, b} == {INT, FLOAT} else JSON
    if isinstance(a, list) and isinstance(b, list):
        return [LIST, merge(a[1], b[1])]
    if isinstance(a, dict) and isinstance(b, dict):
        return {name: merge(a.get(name, NULL), b.get(name, NULL)) for name in {**a, **b}}
    return JSON
