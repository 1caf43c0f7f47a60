"""The manifest rows a loader reads and the samples they point at, without webdataset or torch.

Every loader (`loader.py`'s webdataset pipeline, `indexed.py`'s torch Dataset, `ray_data.py`)
shares these. Ray's workers import only this module: `import webdataset` imports torch (2 s).
OUT is read through its store: a local folder, or a URL (a sample is one ranged read there).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from .output.manifest import read_parquet, read_schema
from .output.store import MANIFEST, Store, output_store, shard_order
from .plan.split import SPLITS
from .storage import RemotePath
from .write.tar import LABEL_EXT, sample_members

Decode = Literal["pil", "numpy", "raw"]
Select: TypeAlias = pc.Expression | Mapping[str, Any] | None
Sample = tuple[Any, int, dict[str, Any]]  # (image, label, meta)
DECODES = ("pil", "numpy", "raw")


def select_expression(split: str, select: Select, columns: list[str]) -> pc.Expression:
    """`split` and `select` as one Arrow filter over a manifest with `columns`.

    `select` is an Expression, or a dict shorthand: `{"data_type": "ct", "form": ("pouch",
    "cylindrical")}` means equal for plain values and "in" for tuples, lists and sets.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    expression = pc.field("split") == split
    if select is None:
        return expression
    if isinstance(select, pc.Expression):
        return expression & select
    for column, value in select.items():
        if column not in columns:
            raise ValueError(f"select: the manifest has no column {column!r} "
                             f"(columns: {', '.join(columns)})")
        if isinstance(value, tuple | list | set | frozenset):
            expression &= pc.field(column).isin(list(value))
        else:
            expression &= pc.field(column) == value
    return expression


def manifest_rows(out: Path | str | RemotePath, split: str = "train", select: Select = None, *,
                  storage_options: dict[str, object] | None = None) -> pa.Table:
    """The split's manifest rows that match `select`, in shard then offset order.

    That is the order of the samples on disk, hence of `open_indexed`'s sample numbers. `out`
    is a folder or a URL (`s3://bucket/prefix`, opened with `storage_options`).
    """
    return store_rows(output_store(out, storage_options), split, select)


def store_rows(store: Store, split: str, select: Select) -> pa.Table:
    """`manifest_rows` of an output store."""
    with store.open(MANIFEST) as handle:
        filters = select_expression(split, select, read_schema(handle).names)
        table = read_parquet(handle, filters=filters)
    shards = sorted(pc.unique(table.column("shard")).to_pylist(), key=shard_order)
    rank = pc.index_in(table.column("shard"), value_set=pa.array(shards, pa.string()))
    return table.append_column("_shard_rank", rank).sort_by(
        [("_shard_rank", "ascending"), ("offset", "ascending")]).drop_columns(["_shard_rank"])


def selected_rows(store: Store, split: str, select: Select) -> pa.Table:
    """`manifest_rows`, refusing an empty selection: a loader of nothing is a mistake."""
    rows = store_rows(store, split, select)
    if rows.num_rows == 0:
        raise ValueError(f"no {split} samples in {store.shown} match select={select!r}")
    return rows


def check_decode(decode: str, choices: tuple[str, ...]) -> None:
    """Refuse an unknown `decode` before any work, naming the choices (the loaders differ)."""
    if decode not in choices:
        raise ValueError(f"decode must be one of {', '.join(choices)}, got {decode!r}")


def decode_image(data: bytes, decode: Decode) -> Any:
    """Image bytes as an RGB PIL image, an HxWx3 uint8 array, or unchanged.

    RGB for CT slices too, so that batches mixing CT and exterior photos stack.
    """
    if decode == "raw":
        return data
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return image if decode == "pil" else np.array(image)


def sample_tuple(members: Mapping[str, bytes], row: dict[str, Any], decode: Decode) -> Sample:
    """A sample's members (extension -> bytes) and manifest row as (image, label, meta).

    `meta` is the manifest row updated with the label JSON: the only shared name is `swelling`,
    where the JSON's object (holding the manifest's bool and the battery outline) is kept.
    """
    meta = {**row, **orjson.loads(members["json"])}
    return decode_image(members[row["image_ext"]], decode), int(members["cls"]), meta


def read_members(store: Store, row: Mapping[str, Any]) -> dict[str, bytes]:
    """The members (extension -> bytes) of the sample `row` describes, from its shard in OUT
    (`write.tar.sample_members`: one read, no scan, nothing written: a read-only OUT works)."""
    return sample_members(store.read_range(row["shard"], row["offset"], row["sample_bytes"]),
                          row)


def image_and_label(store: Store, row: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """The written image and label of the sample `row` describes (verify's and the report's
    view of a sample)."""
    members = read_members(store, row)
    return members[row["image_ext"]], members[LABEL_EXT]


def shard_spans(rows: pa.Table) -> dict[str, tuple[int, int]]:
    """Row range of each shard in `rows` (sorted by shard)."""
    runs = pc.run_end_encode(rows.column("shard").combine_chunks())
    ends = runs.run_ends.to_pylist()
    return {shard: (first, end) for shard, first, end
            in zip(runs.values.to_pylist(), [0, *ends[:-1]], ends, strict=True)}
