"""The index a training job reads: one Parquet row per sample, the rejects, and a JSON summary.

Files are written under a temporary name and renamed, so a manifest that exists is complete.
Nothing time- or host-dependent goes in, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .pairing import IMAGE, LABEL, member_refs
from .rejects import Reject
from .split import SPLITS
from .write import ShardResult, move_into_place

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("sample_bytes", pa.int64()),
        ("group", pa.string()),
        ("battery_id", pa.int64()),
        ("data_type", pa.string()),
        ("type", pa.string()),
        ("form", pa.string()),
        ("label", pa.int8()),
        ("is_normal", pa.bool_()),
        ("swelling", pa.bool_()),
        ("defect_types", pa.list_(pa.string())),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_ext", pa.string()),
        ("image_bytes", pa.int64()),
        ("crc32", pa.uint32()),
        ("label_bytes", pa.int64()),
        ("label_crc32", pa.uint32()),
        ("source_archive", pa.string()),
        ("source_member", pa.string()),
        ("label_archive", pa.string()),
        ("label_member", pa.string()),
    ],
    metadata={b"shardify": __version__.encode()},  # how --manifest knows a file it may replace
)
MANIFEST_BATCH = 65536
PARQUET_MAGIC = b"PAR1"
MAX_SUMMARY_BYTES = 64 * 2**20  # far above a real summary; a larger file is not one
REJECT_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("key", "reason", "source_archive", "source_member", "detail")]
)


def manifest_table(results: list[ShardResult]) -> pa.Table:
    """One row per written sample, in shard order, built column by column a batch at a time.

    Columns, not one dict per row, and Python lists for one batch only: at 400k samples, whole
    columns of Python objects would take ~150 MB on top of the table.
    """
    return pa.Table.from_batches(
        [_manifest_batch(result, start, start + MANIFEST_BATCH) for result in results
         for start in range(0, len(result.samples), MANIFEST_BATCH)], schema=MANIFEST_SCHEMA)


def _manifest_batch(result: ShardResult, start: int, stop: int) -> pa.RecordBatch:
    samples = result.samples[start:stop]
    fields = [sample.fields for sample in samples]
    sources = [member_refs(samples, [role]) for role in (IMAGE, LABEL)]
    archives = [[table.archive.name for table in refs.tables] for refs in sources]
    columns = {
        "key": [s.key for s in samples],
        "split": [result.split] * len(samples),
        "shard": [result.name] * len(samples),
        "offset": result.offsets[start:stop],
        "sample_bytes": result.sizes[start:stop],
        "group": [f.group for f in fields],
        "battery_id": [f.battery_id for f in fields],
        "data_type": [f.data_type for f in fields],
        "type": [f.type for f in fields],
        "form": [f.form for f in fields],
        "label": [f.label for f in fields],
        "is_normal": [f.is_normal for f in fields],
        "swelling": [f.swelling for f in fields],
        "defect_types": [list(f.defect_types) for f in fields],
        "width": [f.width for f in fields],
        "height": [f.height for f in fields],
        "image_ext": [s.image_ext for s in samples],
        "image_bytes": [s.image_size for s in samples],
        "crc32": result.image_crc32s[start:stop],
        "label_bytes": [s.label_size for s in samples],
        "label_crc32": result.label_crc32s[start:stop],
        "source_archive": pa.DictionaryArray.from_arrays(sources[IMAGE].which, archives[IMAGE]),
        "source_member": sources[IMAGE].names(),
        "label_archive": pa.DictionaryArray.from_arrays(sources[LABEL].which, archives[LABEL]),
        "label_member": sources[LABEL].names(),
    }
    return pa.RecordBatch.from_pydict(columns, schema=MANIFEST_SCHEMA)


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


def write_wids_indexes(out: Path, samples: dict[str, int]) -> None:
    """OUT/{split}.wids.json for each split with samples (`samples`: per shard, how many),
    atomically; an empty split's is removed, so a stale index never points at shards a later
    run deleted."""
    samples = {name: count for name, count in samples.items() if count}
    for split in SPLITS:
        path = out / f"{split}.wids.json"
        shards = sorted(name for name in samples if name.startswith(f"{split}/"))
        if not shards:
            path.unlink(missing_ok=True)
            continue
        entries = [(name, samples[name], (out / name).stat().st_size) for name in shards]
        write_json(wids_index(split, entries), path)


def summary_beside(manifest: Path) -> Path:
    """Where `--manifest PATH` puts its summary: PATH's `.summary.json` sibling."""
    return manifest.with_suffix(".summary.json")


def is_shardify_manifest(path: Path) -> bool:
    """Whether `path` is a Parquet file whose schema carries shardify's marker."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(PARQUET_MAGIC))
            handle.seek(-len(PARQUET_MAGIC), os.SEEK_END)
            tail = handle.read()
        if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
            return False
        return b"shardify" in (pq.read_schema(path).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def is_shardify_summary(path: Path) -> bool:
    """Whether `path` is a summary JSON that shardify wrote (its version and splits in it)."""
    try:
        if path.stat().st_size > MAX_SUMMARY_BYTES:
            return False
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(document, dict) and "shardify" in document and "splits" in document


def write_parquet(table: pa.Table, path: Path) -> None:
    """Written through a Python file: Arrow's own paths must be UTF-8, OUT's name need not be."""
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
    move_into_place(partial, path)


def read_parquet(path: Path, **options: object) -> pa.Table:
    """A Parquet file read through a Python file, whatever bytes its path holds."""
    with open(path, "rb") as handle:
        return pq.read_table(handle, **options)


def write_json(document: dict, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    move_into_place(partial, path)
