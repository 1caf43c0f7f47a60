"""How large transformed samples will be, measured on a few of them before planning.

The planner cuts shards on sizes known in advance; a transform's output size is not. A few
samples of each source image type are transformed in the main process, and the largest
output/source ratio seen (with a margin) sizes every sample of that type: shards then end
early rather than past `--shard-size`, and the disk check is made on the same estimate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from ..archives.reader import ArchiveReader
from ..errors import MemberError
from ..plan.pairing import Sample
from ..profiles import Geometry, strip_bom
from .options import TransformOptions
from .sample import ImageError, transform_sample

SAMPLES_PER_TYPE = 8
MARGIN = 1.15
Ratios = dict[str, tuple[float, float]]  # source image ext -> (image ratio, label ratio)


def size_ratios(samples: Sequence[Sample], reader: ArchiveReader, options: TransformOptions,
                geometry: Geometry) -> Ratios:
    """Per source image type, the written/source byte ratios of image and label to plan with.

    Samples are taken evenly spaced in the given order; those that cannot be read or decoded
    are skipped (the writer rejects them). A type none of whose samples could be transformed
    is planned at its source size.
    """
    by_ext: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_ext[sample.image_ext].append(sample)
    ratios: Ratios = {}
    for ext, group in sorted(by_ext.items()):
        step = max(1, len(group) // SAMPLES_PER_TYPE)
        found = [_ratios(reader, sample, options, geometry) for sample in group[::step]
                 [:SAMPLES_PER_TYPE]]
        measured = [ratio for ratio in found if ratio is not None]
        if measured:
            ratios[ext] = (max(r[0] for r in measured) * MARGIN,
                           max(r[1] for r in measured) * MARGIN)
    return ratios


def _ratios(reader: ArchiveReader, sample: Sample, options: TransformOptions,
            geometry: Geometry) -> tuple[float, float] | None:
    try:
        image, label = reader.read(sample.image), strip_bom(reader.read(sample.label))
        done = transform_sample(image, label, sample.image_ext, options, geometry)
    except (MemberError, ImageError, ValueError):
        return None
    return len(done.image) / max(1, len(image)), len(done.label) / max(1, len(label))
