"""Assign whole batteries to train/val/test: seeded, deterministic and stratified.

Splitting by image leaks a battery's slices into both sides; here the unit is the group (battery),
so no group can ever appear in two splits. The profile gives each group a stratum (the battery
set: its data_type, and whether it has a defect image); strata are split separately in the same
ratio, so every split sees every kind.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Iterable

from ..profiles import DatasetProfile, Fields, Stratum
from .pairing import Sample

SPLITS = ("train", "val", "test")


def parse_ratios(text: str) -> tuple[float, float, float]:
    """Parse `70/10/20` (or `0.8/0/0.2`) into fractions of 1; raise ValueError if malformed."""
    usage = f"split must be three numbers train/val/test, e.g. 70/10/20: {text!r}"
    parts = text.split("/")
    if len(parts) != len(SPLITS):
        raise ValueError(usage)
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ValueError(usage) from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or not 0 < sum(values) < math.inf:
        raise ValueError(f"split ratios must be finite numbers >= 0, not all 0: {text!r}")
    total = sum(values)
    train, val, test = (v / total for v in values)
    return train, val, test


def group_strata(samples: Iterable[Sample], profile: DatasetProfile) -> list[tuple[str, Stratum]]:
    """Each group (battery) with its stratum, from all its samples' fields, sorted by group."""
    fields: dict[str, list[Fields]] = defaultdict(list)
    for sample in samples:
        fields[sample.fields.group].append(sample.fields)
    return [(group, profile.stratum(fields[group])) for group in sorted(fields)]


def assign_splits(
    groups: Iterable[tuple[str, Stratum]],
    ratios: tuple[float, float, float],
    seed: int,
) -> dict[str, str]:
    """Map each group to a split. `groups` yields (group, stratum).

    Per balance unit (the battery set: data_type), the groups of the highest rank (defect
    batteries), shuffled, are followed by those of the next rank, shuffled, and each in turn goes
    to the split furthest below its share so far. Every rank is thus spread in the ratio, and
    the unit's totals stay within one group of the ratio.
    """
    strata: dict[Stratum, set[str]] = defaultdict(set)
    for group, stratum in groups:
        strata[stratum].add(group)
    assignment: dict[str, str] = {}
    for balance in sorted({stratum.balance for stratum in strata}):
        ordered: list[str] = []
        for rank in sorted({s.rank for s in strata if s.balance == balance}, reverse=True):
            members = sorted(strata[Stratum(balance, rank)])
            random.Random(_stratum_seed(seed, balance, rank)).shuffle(members)
            ordered += members
        assigned = [0] * len(SPLITS)
        for position, group in enumerate(ordered, start=1):
            deficits = [r * position - n for r, n in zip(ratios, assigned, strict=True)]
            choice = deficits.index(max(deficits))
            assigned[choice] += 1
            assignment[group] = SPLITS[choice]
    return assignment


def _stratum_seed(seed: int, balance: str, rank: int) -> int:
    """A seed per stratum that does not depend on Python's hash randomisation."""
    digest = hashlib.sha256(f"{seed}/{balance}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "big")
