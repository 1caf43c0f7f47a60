"""Order samples and cut them into shards: cheap, pure and deterministic.

Order is (split, battery, key) so a battery's samples are contiguous. A shard keeps whole batteries
while they fit the size limit; a battery larger than the limit fills consecutive shards. A shard
exceeds the limit only when a single sample is larger than the limit on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby

from .pairing import Sample
from .split import SPLITS
from .write import TAR_END_SIZE, sample_tar_size


@dataclass(frozen=True, slots=True)
class PlannedShard:
    """One shard to write: which samples, in which order, and its expected size."""

    split: str
    index: int
    samples: tuple[Sample, ...]
    expected_bytes: int

    @property
    def name(self) -> str:
        """Path relative to OUT; it is what the manifest records."""
        return f"{self.split}/shard-{self.index:06d}.tar"


def sample_order(sample: Sample) -> tuple[str, int, str]:
    return sample.fields.data_type, sample.fields.battery_id, sample.key


def plan_shards(
    samples: Iterable[Sample], split_of_group: Mapping[str, str], shard_size: int
) -> list[PlannedShard]:
    """Cut every split's samples, in battery order, into shards of at most `shard_size` bytes."""
    by_split: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for sample in samples:
        by_split[split_of_group[sample.fields.group]].append(sample)
    shards: list[PlannedShard] = []
    for split in SPLITS:
        ordered = sorted(by_split[split], key=sample_order)
        batteries = [list(g) for _, g in groupby(ordered, key=lambda s: s.fields.group)]
        for index, contents in enumerate(_cut(batteries, shard_size)):
            size = sum(sample_tar_size(s) for s in contents) + TAR_END_SIZE
            shards.append(PlannedShard(split, index, tuple(contents), size))
    return shards


def _cut(batteries: list[list[Sample]], limit: int) -> list[list[Sample]]:
    shards: list[list[Sample]] = []
    current: list[Sample] = []
    used = TAR_END_SIZE
    for battery in batteries:
        battery_bytes = sum(sample_tar_size(s) for s in battery)
        if current and used + battery_bytes > limit and TAR_END_SIZE + battery_bytes <= limit:
            shards.append(current)
            current, used = [], TAR_END_SIZE
        for sample in battery:
            size = sample_tar_size(sample)
            if current and used + size > limit:
                shards.append(current)
                current, used = [], TAR_END_SIZE
            current.append(sample)
            used += size
    if current:
        shards.append(current)
    return shards
