"""Training from a shardify output: a streaming webdataset pipeline, and random access by sample
number (`open_indexed`, in `indexed.py`, which needs torch).

Shards hold one battery after another, so reading them one at a time gives batches of one or two
batteries, and a shuffle buffer smaller than a shard cannot fix that. `open_dataset` therefore
reads several shards at once in each worker and interleaves them before the shuffle buffer.

The manifest is the index: `select` filters its rows, only the shards holding matching rows are
opened, and each sample's manifest row travels with it into `meta`. OUT may be a URL
(`s3://bucket/prefix`): the manifest and the shards are then read through fsspec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import webdataset as wds
from webdataset import tariterators
from webdataset.compat import FluidInterface

from .output.remote import RemoteOutputStore
from .output.store import Store, output_store
from .rows import (
    DECODES,
    Decode,
    Sample,
    Select,
    check_decode,
    manifest_rows,
    sample_tuple,
    select_expression,
    selected_rows,
    shard_spans,
)
from .storage import RemotePath, is_url

if TYPE_CHECKING:
    from .indexed import IndexedDataset

__all__ = ["manifest_rows", "open_dataset", "open_indexed", "select_expression", "shard_url"]
Item = tuple[dict[str, Any], dict[str, Any]]  # (webdataset sample, manifest row)
Out = Path | str | RemotePath  # a folder, or a URL such as s3://bucket/prefix


def shard_url(out: Out, shard: str, base_url: str | None = None) -> str:
    """Where to read `shard` (a manifest path, relative to OUT) from.

    Without `base_url`, a path under OUT (a URL under a URL OUT); a `base_url` holding `{shard}`
    has it replaced (`pipe:curl -s https://host/shards/{shard}`); any other is a prefix
    (`file:///mnt/shards`, `https://host/shards`).
    """
    if base_url is None:
        if isinstance(out, RemotePath) or is_url(str(out)):
            return f"{str(out).rstrip('/')}/{shard}"
        return str(Path(out) / shard)
    if "{shard}" in base_url:
        return base_url.replace("{shard}", shard)
    return f"{base_url.rstrip('/')}/{shard}"


class Interleave:
    """Pipeline stage: shard URLs -> (sample, manifest row), from `mix` open shards in turn.

    Only samples with a row in `rows` come out: that is how `select` applies inside a shard.
    Rows become dicts one open shard at a time, never for the whole split. With a `store` (a
    URL OUT), the "URLs" are shard names read through it; else webdataset opens them.
    """

    def __init__(self, rows: pa.Table, spans: dict[str, tuple[int, int]], mix: int,
                 store: Store | None) -> None:
        self.rows = rows
        self.spans = spans  # url -> (first, end) row numbers of its shard in `rows`
        self.mix = mix
        self.store = store

    def __call__(self, shards: Iterable[dict[str, Any]]) -> Iterator[Item]:
        pending = iter(shards)
        active: list[Iterator[Item]] = []
        while True:
            active += [self.samples(shard["url"])
                       for shard in islice(pending, self.mix - len(active))]
            if not active:
                return
            for source in list(active):
                item = next(source, None)
                if item is None:
                    active.remove(source)
                else:
                    yield item

    def samples(self, url: str) -> Iterator[Item]:
        first, end = self.spans[url]
        wanted = {row["key"]: row for row in self.rows.slice(first, end - first).to_pylist()}
        for sample in self.tar_samples(url):
            row = wanted.get(sample["__key__"])
            if row is not None:
                yield sample, row

    def tar_samples(self, url: str) -> Iterator[dict[str, Any]]:
        """The shard's samples as webdataset groups them, the shard closed after."""
        if self.store is None:
            yield from wds.tarfile_samples([{"url": url}])
            return
        with self.store.open(url) as stream:
            yield from tariterators.group_by_keys(
                tariterators.tar_file_expander([{"url": url, "stream": stream}]))


class ToTuple:
    """(sample, row) -> (image, label, meta), after the shuffle buffer so that it holds bytes."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode

    def __call__(self, item: Item) -> Sample:
        sample, row = item
        return sample_tuple(sample, row, self.decode)


class Pipeline(wds.DataPipeline, FluidInterface):
    """A DataPipeline with webdataset's fluent methods (`.map_tuple`, `.batched`, `.shuffle`,
    ...), as `wds.WebDataset` is: stages appended to it run after the (image, label, meta) one."""


def open_dataset(out: Out, split: str = "train", *, select: Select = None,
                 decode: Decode = "pil", shuffle: int = 1000, resample: bool = False,
                 mix: int = 8, base_url: str | None = None, seed: int | None = None,
                 storage_options: dict[str, object] | None = None) -> Pipeline:
    """A webdataset pipeline of (image, label, meta) for one split of a shardify output.

    It has `wds.WebDataset`'s fluent methods: `open_dataset(OUT).map_tuple(f, g, h).batched(64)`.

    - `select`: manifest filter (see `select_expression`); only shards with matches are read.
    - `decode`: "pil" (RGB image), "numpy" (HxWx3 uint8) or "raw" (the image bytes).
    - `shuffle`: samples in the shuffle buffer; shard order is shuffled too when > 0. 0 reads
      shards in manifest order (evaluation; with `mix=1`, samples too, else `mix` shards
      interleave); 1 shuffles the shard order only.
    - `mix`: shards each worker reads at once, taking a sample from each in turn.
    - `resample`: draw shards with replacement, endlessly and independently in each worker and
      node (multi-node training; bound an epoch with `.with_epoch(n)`). Otherwise shards are
      split between nodes and DataLoader workers: each sample once per epoch.
    - `base_url`: read shards from there instead of OUT (see `shard_url`).
    - `seed`: makes shard and sample order repeatable (varying by epoch); None: random.
    - `storage_options`: fsspec options for a URL `out` (`{"endpoint_url": ...}`).
    """
    check_decode(decode, DECODES)
    if mix < 1 or shuffle < 0:
        raise ValueError(f"mix must be >= 1 and shuffle >= 0, got mix={mix}, shuffle={shuffle}")
    store = output_store(out, storage_options)
    rows = selected_rows(store, split, select)
    remote = store if isinstance(store, RemoteOutputStore) and base_url is None else None
    spans = {shard if remote else shard_url(out, shard, base_url): span
             for shard, span in shard_spans(rows).items()}
    urls = list(spans)
    if resample:
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed or 0,
                                                 deterministic=seed is not None)]
    else:
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
        if shuffle:
            stages.append(_shuffle(len(urls), len(urls), seed))
    stages.append(Interleave(rows, spans, mix, remote))
    if shuffle > 1:
        stages.append(_shuffle(shuffle, min(shuffle, 100), seed))
    stages.append(wds.map(ToTuple(decode)))
    return Pipeline(*stages)


def _shuffle(size: int, initial: int, seed: int | None) -> Any:
    """A shuffle buffer: repeatable per (seed, epoch) with a seed, random without."""
    if seed is None:
        return wds.shuffle(size, initial=initial)
    return wds.detshuffle(size, initial=initial, seed=seed)


def open_indexed(out: Out, split: str = "train", *, select: Select = None,
                 decode: Decode = "pil", transform: Callable[[Any], Any] | None = None,
                 storage_options: dict[str, object] | None = None) -> IndexedDataset:
    """A map-style torch Dataset of the split's samples: `dataset[i]` is (image, label, meta)
    of row i of `manifest_rows(out, split, select)`, decoded as `open_dataset` does, with
    `transform` applied to the image (a torchvision transform, say). Negative i count from the
    end. Works with any sampler and DataLoader workers, and on a read-only copy of OUT; on a
    URL OUT (with `storage_options`), a sample is one ranged read.
    Needs torch: `pip install 'shardify[train]'`.
    """
    check_decode(decode, DECODES)
    try:
        from .indexed import IndexedDataset
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"open_indexed needs torch ({error}); "
                                  "pip install 'shardify[train]'") from error
    store = output_store(out, storage_options)
    return IndexedDataset(store, selected_rows(store, split, select), decode, transform)
