"""Order samples and cut them into shards: cheap, pure and deterministic.

Order is (split, kind, the profile's sample order) so a group's (battery's) samples are
contiguous. A kind is the profile's shard family (data_type) with the written image format:
samples of two kinds never share a shard, so every shard has one schema (one image column) for
readers that type columns per file (Ray, Hugging Face). A shard keeps whole groups while they fit
the size limit; a group larger than the limit fills consecutive shards. A shard exceeds the
limit only when a single sample is larger than the limit on its own. Sizes and formats come from
the caller (the tar layout, the transform options), so planning knows no file format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby

from ..profiles import DatasetProfile
from .pairing import Sample
from .split import SPLITS

# How shards are cut, recorded with the run's options: an output cut another way (before shards
# held one kind each) is not resumed, and the message says why.
SHARD_KINDS = "family+format"


@dataclass(frozen=True, slots=True)
class PlannedShard:
    """One shard to write: which samples, in which order, and its expected size."""

    name: str  # path relative to OUT; it is what the manifest records
    split: str
    samples: tuple[Sample, ...]
    expected_bytes: int


@dataclass(frozen=True)
class ShardSizes:
    """What a sample and a shard's end take on disk (the tar layout's numbers)."""

    sample_bytes: Callable[[Sample], int]
    end_bytes: int
    image_ext: Callable[[Sample], str]  # the format the sample's image is written in


def plan_shards(samples: Iterable[Sample], split_of_group: Mapping[str, str], shard_size: int,
                profile: DatasetProfile, sizes: ShardSizes,
                shard_name: Callable[[str, int], str]) -> list[PlannedShard]:
    """Cut every split's samples, kind by kind in the profile's order, into shards of at most
    `shard_size` bytes; `shard_name(split, index)` names them."""
    by_split: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for sample in samples:
        by_split[split_of_group[sample.fields.group]].append(sample)
    shards: list[PlannedShard] = []
    for split in SPLITS:
        def kind(sample: Sample) -> tuple[str, str]:
            return profile.shard_family(sample.fields), sizes.image_ext(sample)

        ordered = sorted(by_split[split],
                         key=lambda s: (kind(s), profile.sample_order(s.fields, s.key)))
        cut = [contents for _, of_kind in groupby(ordered, key=kind)
               for contents in _cut([list(g) for _, g in groupby(of_kind, key=_group)],
                                    shard_size, sizes)]
        for index, contents in enumerate(cut):
            size = sum(map(sizes.sample_bytes, contents)) + sizes.end_bytes
            shards.append(PlannedShard(shard_name(split, index), split, tuple(contents), size))
    return shards


def _group(sample: Sample) -> str:
    return sample.fields.group


def continued(shard: PlannedShard, rest: int, name: str) -> PlannedShard:
    """The shard `name` that takes `shard`'s samples from index `rest` on (the writer found no
    room for them: transformed samples came out larger than planned)."""
    return PlannedShard(name, shard.split, shard.samples[rest:], 0)


def _cut(groups: list[list[Sample]], limit: int, sizes: ShardSizes) -> list[list[Sample]]:
    shards: list[list[Sample]] = []
    current: list[Sample] = []
    used = sizes.end_bytes
    for group in groups:
        group_bytes = sum(map(sizes.sample_bytes, group))
        if current and used + group_bytes > limit and sizes.end_bytes + group_bytes <= limit:
            shards.append(current)
            current, used = [], sizes.end_bytes
        for sample in group:
            size = sizes.sample_bytes(sample)
            if current and used + size > limit:
                shards.append(current)
                current, used = [], sizes.end_bytes
            current.append(sample)
            used += size
    if current:
        shards.append(current)
    return shards
