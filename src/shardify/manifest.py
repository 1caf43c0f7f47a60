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

from .sources import Reject
from .write import WrittenSample

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
        ("source_archive", pa.string()),
        ("source_member", pa.string()),
        ("label_archive", pa.string()),
        ("label_member", pa.string()),
    ]
)
REJECT_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("key", "reason", "source_archive", "source_member", "detail")]
)


def manifest_table(written: Iterable[WrittenSample]) -> pa.Table:
    """One row per written sample, in shard order."""
    rows = []
    for item in written:
        sample, fields = item.sample, item.sample.fields
        rows.append(
            {
                "key": sample.key,
                "split": item.shard.split("/", 1)[0],
                "shard": item.shard,
                "offset": item.offset,
                "sample_bytes": item.size,
                "group": fields.group,
                "battery_id": fields.battery_id,
                "data_type": fields.data_type,
                "type": fields.type,
                "form": fields.form,
                "label": fields.label,
                "is_normal": fields.is_normal,
                "swelling": fields.swelling,
                "defect_types": list(fields.defect_types),
                "width": fields.width,
                "height": fields.height,
                "image_ext": sample.image_ext,
                "image_bytes": sample.image.file_size,
                "crc32": item.image_crc32,
                "label_bytes": sample.label_size,
                "source_archive": sample.image.archive.name,
                "source_member": sample.image.name,
                "label_archive": sample.label.archive.name,
                "label_member": sample.label.name,
            }
        )
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


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


def write_parquet(table: pa.Table, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, partial, compression="zstd")
    _publish(partial, path)


def write_json(document: dict, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    _publish(partial, path)


def _publish(partial: Path, path: Path) -> None:
    """Flush, then rename into place: a reader never sees a half-written file."""
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
