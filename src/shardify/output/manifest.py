"""The indexes a training job reads: one Parquet row per sample, the rejects, wids indexes.

Built from the shards' entries (what was written) and the profile's columns; the output store
writes them. Nothing time- or host-dependent goes in, so the same inputs give identical files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..errors import UsageError
from ..plan.pairing import IMAGE, LABEL, member_refs
from ..plan.split import SPLITS
from ..profiles import DatasetProfile, get_profile
from ..rejects import Reject
from ..write.shard import ShardResult
from .store import MANIFEST_MARKER, wids_index_name

LOCATION_COLUMNS = [
    ("key", pa.string()),
    ("split", pa.string()),
    ("shard", pa.string()),
    ("offset", pa.int64()),
    ("sample_bytes", pa.int64()),
]
MEMBER_COLUMNS = [
    ("image_ext", pa.string()),
    ("image_bytes", pa.int64()),
    ("crc32", pa.uint32()),
    ("label_bytes", pa.int64()),
    ("label_crc32", pa.uint32()),
    ("source_archive", pa.string()),
    ("source_member", pa.string()),
    ("label_archive", pa.string()),
    ("label_member", pa.string()),
]


def manifest_schema(profile: DatasetProfile) -> pa.Schema:
    """Where each sample is, the profile's dataset columns, then its image, label and sources.

    The metadata names shardify (how --manifest knows a file it may replace) and the profile
    (how readers know which one made the file).
    """
    return pa.schema([*LOCATION_COLUMNS, *profile.columns, *MEMBER_COLUMNS], metadata={
        MANIFEST_MARKER: __version__.encode(), b"profile": profile.name.encode()})


def profile_of(schema: pa.Schema) -> DatasetProfile | None:
    """The profile a manifest names in its metadata, or None if it names none shardify knows.

    A manifest that names none was written before profiles existed: by the battery rules.
    """
    name = (schema.metadata or {}).get(b"profile", b"battery").decode(errors="replace")
    try:
        return get_profile(name)
    except UsageError:
        return None


MANIFEST_BATCH = 65536
REJECT_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("key", "reason", "source_archive", "source_member", "detail")]
)


def manifest_table(results: list[ShardResult], profile: DatasetProfile) -> pa.Table:
    """One row per written sample, in shard order, built column by column a batch at a time.

    Columns, not one dict per row, and Python lists for one batch only: at 400k samples, whole
    columns of Python objects would take ~150 MB on top of the table.
    """
    schema = manifest_schema(profile)
    return pa.Table.from_batches(
        [_manifest_batch(result, start, start + MANIFEST_BATCH, profile, schema)
         for result in results for start in range(0, len(result.samples), MANIFEST_BATCH)],
        schema=schema)


def _manifest_batch(result: ShardResult, start: int, stop: int, profile: DatasetProfile,
                    schema: pa.Schema) -> pa.RecordBatch:
    samples = result.samples[start:stop]
    sources = [member_refs(samples, [role]) for role in (IMAGE, LABEL)]
    archives = [[table.archive.name for table in refs.tables] for refs in sources]
    columns = {
        "key": [s.key for s in samples],
        "split": [result.split] * len(samples),
        "shard": [result.name] * len(samples),
        "offset": result.offsets[start:stop],
        "sample_bytes": result.sizes[start:stop],
        **profile.column_values([sample.fields for sample in samples]),
        "image_ext": [s.image_ext for s in samples],
        "image_bytes": result.image_sizes[start:stop],
        "crc32": result.image_crc32s[start:stop],
        "label_bytes": result.label_sizes[start:stop],
        "label_crc32": result.label_crc32s[start:stop],
        "source_archive": pa.DictionaryArray.from_arrays(sources[IMAGE].which, archives[IMAGE]),
        "source_member": sources[IMAGE].names(),
        "label_archive": pa.DictionaryArray.from_arrays(sources[LABEL].which, archives[LABEL]),
        "label_member": sources[LABEL].names(),
    }
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def rejects_table(rejects: Iterable[Reject]) -> pa.Table:
    """Rejects sorted by reason, key and member, so the file does not depend on discovery order."""
    ordered = sorted(rejects, key=lambda r: (r.reason, r.key, r.source_archive, r.source_member))
    return pa.Table.from_pylist(
        [
            {
                "key": r.key,
                "reason": r.reason,
                "source_archive": r.source_archive,
                "source_member": r.source_member,
                "detail": r.detail,
            }
            for r in ordered
        ],
        schema=REJECT_SCHEMA,
    )


def wids_index(split: str, shards: list[tuple[str, int, int]]) -> dict:
    """The split's shards as a `wids` shard index, so `wids.ShardListDataset` can address any
    sample by number without scanning the shards first.

    `shards` are (path relative to OUT, samples, bytes) in shard order; URLs stay relative, so
    wids resolves them against the index's own folder and OUT can be moved like the manifest.
    """
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "shardlist": [{"url": url, "nsamples": count, "filesize": size}
                      for url, count, size in shards],
        "name": split,
    }


def wids_indexes(results: list[ShardResult]) -> dict[str, dict | None]:
    """Each split's wids index file name and content, from what the shards hold; None for a
    split without samples (its file is removed: a stale index never points at shards a later
    run deleted)."""
    indexes: dict[str, dict | None] = {}
    for split in SPLITS:
        shards = [(r.name, len(r.samples), r.bytes_out) for r in results
                  if r.split == split and r.samples]
        indexes[wids_index_name(split)] = wids_index(split, shards) if shards else None
    return indexes


def read_parquet(path: Path, **options: Any) -> pa.Table:
    """A Parquet file read through a Python file, whatever bytes its path holds."""
    with open(path, "rb") as handle:
        # No read-ahead threads: left running on a Python file, they abort the process at exit.
        return pq.read_table(handle, pre_buffer=False, **options)


def read_schema(path: Path) -> pa.Schema:
    """A Parquet file's schema (with its metadata), read through a Python file."""
    with open(path, "rb") as handle:
        return pq.read_schema(handle)
