"""Assign whole batteries to train/val/test: seeded, deterministic and stratified.

Splitting by image leaks a battery's slices into both sides; here the unit is the group (battery),
so no group can ever appear in two splits. Within each data_type, batteries with and without a
defect image are split separately in the same ratio, so every split sees both kinds.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Iterable

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


def assign_splits(
    groups: Iterable[tuple[str, str, bool]],
    ratios: tuple[float, float, float],
    seed: int,
) -> dict[str, str]:
    """Map each group to a split. `groups` yields (group, data_type, has_defect).

    Per data_type, defect batteries (shuffled) are followed by the others (shuffled), and each in
    turn goes to the split furthest below its share so far. Both kinds are thus spread in the
    ratio, and the data_type's totals stay within one battery of the ratio.
    """
    strata: dict[tuple[str, bool], set[str]] = defaultdict(set)
    for group, data_type, has_defect in groups:
        strata[(data_type, has_defect)].add(group)
    assignment: dict[str, str] = {}
    for data_type in sorted({data_type for data_type, _ in strata}):
        ordered: list[str] = []
        for has_defect in (True, False):
            stratum = sorted(strata.get((data_type, has_defect), ()))
            random.Random(_stratum_seed(seed, data_type, has_defect)).shuffle(stratum)
            ordered += stratum
        assigned = [0] * len(SPLITS)
        for position, group in enumerate(ordered, start=1):
            deficits = [r * position - n for r, n in zip(ratios, assigned, strict=True)]
            choice = deficits.index(max(deficits))
            assigned[choice] += 1
            assignment[group] = SPLITS[choice]
    return assignment


def _stratum_seed(seed: int, data_type: str, has_defect: bool) -> int:
    """A seed per stratum that does not depend on Python's hash randomisation."""
    digest = hashlib.sha256(f"{seed}/{data_type}/{int(has_defect)}".encode()).digest()
    return int.from_bytes(digest[:8], "big")
