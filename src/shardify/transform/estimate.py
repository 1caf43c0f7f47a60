"""How large transformed samples will be, measured on a few of them before planning.

The planner cuts shards on sizes known in advance; a transform's output size is not. A few
samples of each source image type are transformed (by the idle workers, before any shard is
written), and the upper quartile of the written/source ratios seen, with a margin, sizes every
sample of that type. Most shards then end a little early; one that has no room left for a
sample ends there, and the writer continues it in a continuation shard (`write_shard`'s limit),
so a shard never passes `--shard-size` unless a single sample does. The disk check is made on
the same estimate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from ..plan.pairing import Sample

SAMPLES_PER_TYPE = 8
PROBES_PER_JOB = 2  # small jobs, so the workers share them evenly
MARGIN = 1.15
Ratios = dict[str, tuple[float, float]]  # source image ext -> (image ratio, label ratio)


def probe_samples(samples: Sequence[Sample]) -> list[Sample]:
    """Up to SAMPLES_PER_TYPE samples of each source image type, evenly spaced over the given
    order from its first to its last (deterministic: the same inputs give the same plan)."""
    by_ext: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_ext[sample.image_ext].append(sample)
    chosen: list[Sample] = []
    for _, group in sorted(by_ext.items()):
        last = len(group) - 1  # first and last included: the whole range of groups is seen
        picks = {round(i * last / (SAMPLES_PER_TYPE - 1)) for i in range(SAMPLES_PER_TYPE)}
        chosen += [group[i] for i in sorted(picks)]
    return chosen


def size_ratios(probed: Sequence[Sample], sizes: Sequence[tuple[int, int, int, int] | None]
                ) -> Ratios:
    """Per source image type, the (image, label) written/source byte ratios to plan with (upper
    quartile, with the margin), from each probed sample's (source image, source label, written
    image, written label) bytes.

    Samples the writer would reject (None) are left out; a type none of whose samples could be
    transformed is planned at its source size.
    """
    found: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for sample, size in zip(probed, sizes, strict=True):
        if size is not None:
            found[sample.image_ext].append((size[2] / max(1, size[0]), size[3] / max(1, size[1])))
    return {ext: (_upper_quartile([r[0] for r in ratios]) * MARGIN,
                  _upper_quartile([r[1] for r in ratios]) * MARGIN)
            for ext, ratios in sorted(found.items())}


def _upper_quartile(values: list[float]) -> float:
    """The value three quarters of the way up the sorted values, rounded up: of 8 probes the
    7th, so one outlier does not make every shard small (of 2-4 probes, the largest)."""
    ordered = sorted(values)
    return ordered[(3 * (len(ordered) - 1) + 3) // 4]
