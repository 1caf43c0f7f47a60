"""Random access by sample number: a map-style torch Dataset over the manifest's byte ranges.

The manifest already says where every sample is (shard, offset, sample_bytes), so a sample is
one pread: nothing is indexed when a shard is first opened and nothing is written (wids' reader
mmaps and scans each shard and creates a `.lock` file beside it, which fails on a read-only
copy of OUT, and it numbers negative indexes wrongly). The `{split}.wids.json` files convert
writes stay for readers that use wids directly.

This module imports torch: `loader.open_indexed` imports it on first use.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, SupportsIndex

import pyarrow as pa
from torch.utils.data import Dataset

from .output.store import Store
from .rows import Decode, Sample, read_members, sample_tuple


class IndexedDataset(Dataset[Sample]):
    """`dataset[i]`: (image, label, meta) of row i of `rows` (manifest rows of shards in OUT,
    read through its store: a pread of a local file, or one ranged read of an object)."""

    def __init__(self, store: Store, rows: pa.Table, decode: Decode,
                 transform: Callable[[Any], Any] | None) -> None:
        self.store = store
        self.rows = rows
        # Whole columns: a row from their scalars takes 25 us, a table slice's to_pylist 140 us.
        self.columns = [(name, rows.column(name).combine_chunks()) for name in rows.column_names]
        self.decode: Decode = decode
        self.transform = transform

    def __len__(self) -> int:
        return self.rows.num_rows

    def __getitem__(self, index: SupportsIndex) -> Sample:
        i = operator.index(index)  # ints, numpy and 0-d torch integers, as samplers give
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        row = {name: column[i].as_py() for name, column in self.columns}
        image, label, meta = sample_tuple(read_members(self.store, row), row, self.decode)
        return (image if self.transform is None else self.transform(image)), label, meta
