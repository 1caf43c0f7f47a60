"""Ray Data on a shardify output: `shardify.ray_dataset`, and `ray.data.read_webdataset` over
shards of one data type, checked against the manifest and the shards read with tarfile.

One local Ray instance for the module (2 CPUs, no dashboard): starting Ray takes seconds.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import ray
from helpers import converted_copy, read_shards, summary_of
from PIL import Image

import shardify
from shardify.loader import manifest_rows
from shardify.profiles.battery.sample import SynthResult

# Columns compared value for value (lists and floats come back as arrays / numpy scalars).
SCALARS = ("split", "shard", "offset", "sample_bytes", "group", "battery_id", "data_type",
           "label", "is_normal", "width", "height", "image_ext", "image_bytes", "crc32")


@pytest.fixture(scope="module")
def out(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample dataset in 32 KiB shards: several per split, CT and photo shards side by side."""
    return converted_copy(dataset.root, tmp_path_factory, "ray", "--shard-size", "32KiB")


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, object_store_memory=100 * 2**20)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
        ray.shutdown()


def manifest(out: Path, split: str) -> dict[str, dict]:
    return {row["key"]: row for row in pq.read_table(out / "manifest.parquet").to_pylist()
            if row["split"] == split}


def test_ray_dataset_rows_are_manifest_rows_with_decoded_images(out: Path) -> None:
    tars = read_shards(out)
    for split, info in summary_of(out)["splits"].items():
        expected = manifest(out, split)
        got = shardify.ray_dataset(out, split).take_all()
        assert len(got) == len(expected) == info["samples"]
        assert sorted(row["key"] for row in got) == sorted(expected)
        for row in got:
            want, members = expected[row["key"]], tars[row["key"]]
            assert {c: row[c] for c in SCALARS} == {c: want[c] for c in SCALARS}
            assert row["label"] == int(members["cls"])
            assert orjson.loads(row["label_json"]) == orjson.loads(members["json"])
            pixels = np.asarray(Image.open(io.BytesIO(members[want["image_ext"]])).convert("RGB"))
            assert np.array_equal(row["image"], pixels)


def test_ray_dataset_select_and_raw(out: Path) -> None:
    expected = [r for r in manifest(out, "test").values() if r["data_type"] == "rgb"]
    got = shardify.ray_dataset(out, "test", select={"data_type": "rgb"}, decode="raw").take_all()
    assert sorted((r["key"], zlib.crc32(r["image"])) for r in got) == sorted(
        (r["key"], r["crc32"]) for r in expected)
    with pytest.raises(ValueError, match="decode must be one of numpy, raw"):
        shardify.ray_dataset(out, decode="pil")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no val samples"):
        shardify.ray_dataset(out, "val", select={"group": "ct-999"})


@pytest.mark.parametrize("data_type", ["ct", "rgb"])
def test_read_webdataset_reads_the_shards_of_one_data_type(out: Path, data_type: str) -> None:
    """Ray's own reader with its defaults: one column per member extension, so one data type's
    shards (one image format) at a time; the manifest lists them."""
    rows = manifest_rows(out, "train", {"data_type": data_type}).to_pylist()
    shards = sorted({str(out / row["shard"]) for row in rows})
    got = ray.data.read_webdataset(shards).take_all()
    tars = read_shards(out)
    assert sorted(sample["__key__"] for sample in got) == sorted(row["key"] for row in rows)
    expected = {row["key"]: row for row in rows}
    for sample in got:
        row = expected[sample["__key__"]]
        assert sample["cls"] == row["label"]
        assert sample["json"]["data_info"]["battery_ids"] == row["battery_id"]
        image = np.asarray(Image.open(io.BytesIO(tars[row["key"]][row["image_ext"]])))
        assert np.array_equal(sample[row["image_ext"]], image)
