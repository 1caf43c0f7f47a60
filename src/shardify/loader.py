"""Training from a shardify output: a streaming webdataset pipeline, and random access by sample
number (`open_indexed`, in `indexed.py`, which needs torch).

Shards hold one battery after another, so reading them one at a time gives batches of one or two
batteries, and a shuffle buffer smaller than a shard cannot fix that. `open_dataset` therefore
reads several shards at once in each worker and interleaves them before the shuffle buffer.

The manifest is the index: `select` filters its rows, only the shards holding matching rows are
opened, and each sample's manifest row travels with it into `meta`.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import webdataset as wds
from PIL import Image
from webdataset.compat import FluidInterface

from .output.manifest import read_parquet, read_schema
from .output.store import MANIFEST, shard_order
from .plan.split import SPLITS

if TYPE_CHECKING:
    from .indexed import IndexedDataset

Decode = Literal["pil", "numpy", "raw"]
Select: TypeAlias = pc.Expression | Mapping[str, Any] | None
Item = tuple[dict[str, Any], dict[str, Any]]  # (webdataset sample, manifest row)
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


def manifest_rows(out: Path | str, split: str = "train", select: Select = None) -> pa.Table:
    """The split's manifest rows that match `select`, in shard then offset order.

    That is the order of the samples on disk, hence of `open_indexed`'s sample numbers.
    """
    path = Path(out) / MANIFEST
    filters = select_expression(split, select, read_schema(path).names)
    table = read_parquet(path, filters=filters)
    shards = sorted(pc.unique(table.column("shard")).to_pylist(), key=shard_order)
    rank = pc.index_in(table.column("shard"), value_set=pa.array(shards, pa.string()))
    return table.append_column("_shard_rank", rank).sort_by(
        [("_shard_rank", "ascending"), ("offset", "ascending")]).drop_columns(["_shard_rank"])


def selected_rows(out: Path | str, split: str, select: Select) -> pa.Table:
    """`manifest_rows`, refusing an empty selection: a loader of nothing is a mistake."""
    rows = manifest_rows(out, split, select)
    if rows.num_rows == 0:
        raise ValueError(f"no {split} samples in {out} match select={select!r}")
    return rows


def shard_url(out: Path | str, shard: str, base_url: str | None = None) -> str:
    """Where to read `shard` (a manifest path, relative to OUT) from.

    Without `base_url`, a local path under OUT; a `base_url` holding `{shard}` has it replaced
    (`pipe:curl -s https://host/shards/{shard}`); any other is a prefix (`file:///mnt/shards`,
    `https://host/shards`).
    """
    if base_url is None:
        return str(Path(out) / shard)
    if "{shard}" in base_url:
        return base_url.replace("{shard}", shard)
    return f"{base_url.rstrip('/')}/{shard}"


def check_decode(decode: str, choices: tuple[str, ...]) -> None:
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


class Interleave:
    """Pipeline stage: shard URLs -> (sample, manifest row), from `mix` open shards in turn.

    Only samples with a row in `rows` come out: that is how `select` applies inside a shard.
    Rows become dicts one open shard at a time, never for the whole split.
    """

    def __init__(self, rows: pa.Table, spans: dict[str, tuple[int, int]], mix: int) -> None:
        self.rows = rows
        self.spans = spans  # url -> (first, end) row numbers of its shard in `rows`
        self.mix = mix

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
        for sample in wds.tarfile_samples([{"url": url}]):
            row = wanted.get(sample["__key__"])
            if row is not None:
                yield sample, row


def sample_tuple(members: Mapping[str, bytes], row: dict[str, Any], decode: Decode) -> Sample:
    """A sample's members (extension -> bytes) and manifest row as (image, label, meta).

    `meta` is the manifest row updated with the label JSON: the only shared name is `swelling`,
    where the JSON's object (holding the manifest's bool and the battery outline) is kept.
    """
    meta = {**row, **orjson.loads(members["json"])}
    return decode_image(members[row["image_ext"]], decode), int(members["cls"]), meta


def read_members(path: Path | str, row: Mapping[str, Any]) -> dict[str, bytes]:
    """The members (extension -> bytes) of the sample `row` describes, from its shard at `path`.

    One pread of the row's `sample_bytes` at its `offset` (no scan of the shard, nothing
    written: a read-only copy of OUT works); tarfile parses the sample's headers.
    """
    with open(path, "rb") as handle:
        data = os.pread(handle.fileno(), row["sample_bytes"], row["offset"])
    prefix = f"{row['key']}."
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            member = tar.extractfile(info)
            if not info.name.startswith(prefix) or member is None:
                raise ValueError(f"{path} at offset {row['offset']}: {info.name!r} is not a "
                                 f"member of sample {row['key']!r}; the manifest does not "
                                 "describe this shard (shardify verify OUT)")
            members[info.name.removeprefix(prefix)] = member.read()
    return members


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


def open_dataset(out: Path | str, split: str = "train", *, select: Select = None,
                 decode: Decode = "pil", shuffle: int = 1000, resample: bool = False,
                 mix: int = 8, base_url: str | None = None,
                 seed: int | None = None) -> Pipeline:
    """A webdataset pipeline of (image, label, meta) for one split of a shardify output.

    It has `wds.WebDataset`'s fluent methods: `open_dataset(OUT).map_tuple(f, g, h).batched(64)`.

    - `select`: manifest filter (see `select_expression`); only shards with matches are read.
    - `decode`: "pil" (RGB image), "numpy" (HxWx3 uint8) or "raw" (the image bytes).
    - `shuffle`: samples in the shuffle buffer; shard order is shuffled too when > 0. 0 reads
      everything in manifest order (evaluation); 1 shuffles the shard order only.
    - `mix`: shards each worker reads at once, taking a sample from each in turn.
    - `resample`: draw shards with replacement, endlessly and independently in each worker and
      node (multi-node training; bound an epoch with `.with_epoch(n)`). Otherwise shards are
      split between nodes and DataLoader workers: each sample once per epoch.
    - `base_url`: read shards from there instead of OUT (see `shard_url`).
    - `seed`: makes shard and sample order repeatable (varying by epoch); None: random.
    """
    check_decode(decode, DECODES)
    if mix < 1 or shuffle < 0:
        raise ValueError(f"mix must be >= 1 and shuffle >= 0, got mix={mix}, shuffle={shuffle}")
    rows = selected_rows(out, split, select)
    spans = {shard_url(out, shard, base_url): span for shard, span in shard_spans(rows).items()}
    urls = list(spans)
    if resample:
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed or 0,
                                                 deterministic=seed is not None)]
    else:
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
        if shuffle:
            stages.append(_shuffle(len(urls), len(urls), seed))
    stages.append(Interleave(rows, spans, mix))
    if shuffle > 1:
        stages.append(_shuffle(shuffle, min(shuffle, 100), seed))
    stages.append(wds.map(ToTuple(decode)))
    return Pipeline(*stages)


def shard_spans(rows: pa.Table) -> dict[str, tuple[int, int]]:
    """Row range of each shard in `rows` (sorted by shard)."""
    runs = pc.run_end_encode(rows.column("shard").combine_chunks())
    ends = runs.run_ends.to_pylist()
    return {shard: (first, end) for shard, first, end
            in zip(runs.values.to_pylist(), [0, *ends[:-1]], ends, strict=True)}


def _shuffle(size: int, initial: int, seed: int | None) -> Any:
    """A shuffle buffer: repeatable per (seed, epoch) with a seed, random without."""
    if seed is None:
        return wds.shuffle(size, initial=initial)
    return wds.detshuffle(size, initial=initial, seed=seed)


def open_indexed(out: Path | str, split: str = "train", *, select: Select = None,
                 decode: Decode = "pil", transform: Callable[[Any], Any] | None = None
                 ) -> IndexedDataset:
    """A map-style torch Dataset of the split's samples: `dataset[i]` is (image, label, meta)
    of row i of `manifest_rows(out, split, select)`, decoded as `open_dataset` does, with
    `transform` applied to the image (a torchvision transform, say). Negative i count from the
    end. Works with any sampler and DataLoader workers, and on a read-only copy of OUT.
    Needs torch: `pip install 'shardify[train]'`.
    """
    check_decode(decode, DECODES)
    try:
        from .indexed import IndexedDataset
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"open_indexed needs torch ({error}); "
                                  "pip install 'shardify[train]'") from error
    rows = selected_rows(out, split, select)
    return IndexedDataset(Path(out), rows, decode, transform)
