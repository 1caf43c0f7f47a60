"""Training-side throughput: samples/s decoded to 224x224 numpy arrays, with N worker processes.

- shards: `shardify.open_dataset(OUT, "train")`, each worker process taking its share of the
  shards the way DataLoader workers do (webdataset reads WORKER/NUM_WORKERS);
- zips: the same samples read from the original zips with `zipfile` in random order, each worker
  a share of them (what users do without shards).

usage: python loader_bench.py OUT SOURCE WORKERS   (prints one JSON line)
"""

from __future__ import annotations

import io
import os
import random
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
from PIL import Image

import shardify

SIZE = (224, 224)


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize(SIZE))


def from_shards(out: str, worker: int, workers: int) -> int:
    os.environ.update(WORKER=str(worker), NUM_WORKERS=str(workers))
    return sum(to_array(image).shape == (*SIZE, 3)
               for image, _, _ in shardify.open_dataset(out, "train", seed=0))


def from_zips(source: str, members: list[tuple[str, str]]) -> int:
    archives: dict[str, zipfile.ZipFile] = {}
    done = 0
    for archive, name in members:
        if archive not in archives:
            archives[archive] = zipfile.ZipFile(Path(source) / archive)
        image = Image.open(io.BytesIO(archives[archive].read(name)))
        done += to_array(image).shape == (*SIZE, 3)
    return done


def main(out: str, source: str, workers: int) -> dict:
    rows = pq.read_table(Path(out) / "manifest.parquet").to_pylist()
    train = [(r["source_archive"], r["source_member"]) for r in rows if r["split"] == "train"]
    random.Random(0).shuffle(train)
    with ProcessPoolExecutor(workers) as pool:
        started = time.perf_counter()
        shards = sum(pool.map(from_shards, [out] * workers, range(workers), [workers] * workers))
        shard_seconds = time.perf_counter() - started
        started = time.perf_counter()
        zips = sum(pool.map(from_zips, [source] * workers,
                            [train[i::workers] for i in range(workers)]))
        zip_seconds = time.perf_counter() - started
    assert shards == zips == len(train), (shards, zips, len(train))
    return {"samples": len(train), "workers": workers,
            "shards_per_s": shards / shard_seconds, "zips_per_s": zips / zip_seconds}


if __name__ == "__main__":
    print(orjson.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))).decode())
