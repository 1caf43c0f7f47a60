"""The training side: `open_dataset` (webdataset) and `open_indexed` (wids) on a converted
synthetic dataset, checked against the manifest read directly and the source zips.

The data is `synthesize(scale=2)`: 360 samples, 247 in train over 22 batteries of about 11
samples. Converted twice: 32 KiB shards (56 train shards, less than a battery each) and 128 KiB
shards (22 train shards, one battery each, like real shards that hold whole batteries).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import types
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import zip_member
from PIL import Image

import shardify
from shardify.cli import main
from shardify.loader import manifest_rows
from shardify.profiles.battery.sample import SynthResult, synthesize

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_autoencoder.py"
BATCH = 64
T = TypeVar("T")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    return synthesize(tmp_path_factory.mktemp("src"), scale=2)


def convert(dataset: SynthResult, out: Path, shard_size: str, *extra: str) -> Path:
    assert main(["convert", str(dataset.root), "--out", str(out), "--shard-size", shard_size,
                 "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def small(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 KiB shards: many of them, a battery spans two or three."""
    return convert(dataset, tmp_path_factory.mktemp("small") / "out", "32KiB")


@pytest.fixture(scope="module")
def per_battery(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128 KiB shards: one battery each."""
    return convert(dataset, tmp_path_factory.mktemp("large") / "out", "128KiB")


def rows(out: Path, split: str = "train") -> list[dict]:
    """The split's manifest rows read without the loader's filter, in shard/offset order."""
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    mine = [row for row in table if row["split"] == split]
    return sorted(mine, key=lambda row: (row["shard"], row["offset"]))


def keys(samples: Iterable[tuple]) -> list[str]:
    return [meta["key"] for _, _, meta in samples]


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL webdataset opens (its tar reader calls `gopen.gopen(url)`)."""
    urls: list[str] = []
    real = wds.gopen

    def record(url: str, *args: object, **kwargs: object) -> object:
        urls.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr("webdataset.tariterators.gopen.gopen", record)
    return urls


def test_samples_are_image_label_meta_in_manifest_order(small: Path) -> None:
    expected = rows(small)
    raw = list(shardify.open_dataset(small, decode="raw", mix=1, shuffle=0))
    assert [meta["key"] for _, _, meta in raw] == [r["key"] for r in expected]
    for (image, label, meta), row in zip(raw, expected, strict=True):
        assert zlib.crc32(image) == row["crc32"] and len(image) == row["image_bytes"]
        assert label == row["label"] == (not meta["image_info"]["is_normal"])
        assert {k: meta[k] for k in row if k != "swelling"} == {
            k: v for k, v in row.items() if k != "swelling"}
        assert meta["swelling"]["swelling"] == row["swelling"]  # the label JSON's object wins
        assert meta["data_info"]["battery_ids"] == row["battery_id"]

    first = next(iter(shardify.open_dataset(small, decode="pil", shuffle=0)))
    assert isinstance(first[0], Image.Image) and first[0].mode == "RGB"
    assert first[0].size == (first[2]["width"], first[2]["height"])
    array, _, meta = next(iter(shardify.open_dataset(small, decode="numpy", shuffle=0)))
    assert array.dtype == np.uint8 and array.shape == (meta["height"], meta["width"], 3)


def batteries_per_batch(out: Path, **options: object) -> list[int]:
    """Distinct batteries in each full batch of one epoch."""
    groups = [meta["group"] for _, _, meta in shardify.open_dataset(out, decode="raw", **options)]
    return [len(set(groups[i:i + BATCH])) for i in range(0, len(groups) - BATCH + 1, BATCH)]


def test_mixing_shards_puts_more_batteries_in_a_batch(small: Path, per_battery: Path) -> None:
    # The mixing alone: same shard order (seeded shuffle), no sample shuffle buffer.
    # Measured: [6, 7, 7] batteries per batch unmixed, [8, 16, 14] mixed (mean 6.7 -> 12.7).
    unmixed = batteries_per_batch(per_battery, mix=1, shuffle=1, seed=0)
    mixed = batteries_per_batch(per_battery, mix=8, shuffle=1, seed=0)
    assert len(unmixed) == len(mixed) == 3
    assert max(unmixed) <= 7 and min(mixed) >= 8
    assert np.mean(mixed) >= 1.8 * np.mean(unmixed)

    # A plain shard-by-shard stream against the defaults, on many small shards.
    # Measured: [6, 6, 7] plain; [20, 20, 22] with defaults (mix 8, shuffled shards, buffer 1000).
    plain = batteries_per_batch(small, mix=1, shuffle=0)
    default = batteries_per_batch(small, seed=0)
    assert max(plain) <= 7
    assert min(default) >= 2 * max(plain)


@pytest.mark.parametrize("select", [
    (pc.field("data_type") == "ct") & (pc.field("label") == 0),
    {"data_type": "ct", "label": 0, "form": ("pouch", "cylindrical")},
])
def test_select_opens_only_matching_shards(small: Path, opened: list[str],
                                           select: object) -> None:
    wanted = [r for r in rows(small) if r["data_type"] == "ct" and r["label"] == 0]
    got = keys(shardify.open_dataset(small, select=select, decode="raw", seed=1))
    assert sorted(got) == sorted(r["key"] for r in wanted)
    assert sorted(opened) == sorted({str(small / r["shard"]) for r in wanted})
    assert len(opened) < len(list((small / "train").glob("shard-*.tar")))


def test_select_shorthand_in_and_errors(small: Path) -> None:
    groups = {"ct-102", "rgb-4"}
    got = keys(shardify.open_dataset(small, select={"group": groups, "is_normal": True},
                                     decode="raw", mix=1, shuffle=0))
    assert got == [r["key"] for r in rows(small) if r["group"] in groups and r["is_normal"]]
    assert got
    with pytest.raises(ValueError, match="no column 'colour'"):
        shardify.open_dataset(small, select={"colour": "blue"})
    with pytest.raises(ValueError, match="no train samples"):
        shardify.open_dataset(small, select={"group": "ct-999"})
    with pytest.raises(ValueError, match="decode must be"):
        shardify.open_dataset(small, decode="torch")  # type: ignore[arg-type]


def test_base_url_replaces_out(small: Path, tmp_path: Path, opened: list[str]) -> None:
    """Manifest in one folder, shards elsewhere, read through `pipe:cat` and `file://`."""
    index_only, mirror = tmp_path / "index", tmp_path / "mirror"
    index_only.mkdir()
    shutil.copy(small / "manifest.parquet", index_only)
    shutil.copytree(small / "test", mirror / "test")
    expected = [r["key"] for r in rows(small, "test")]
    for base_url in (f"pipe:cat {mirror}/{{shard}}", mirror.as_uri()):
        opened.clear()
        got = keys(shardify.open_dataset(index_only, "test", decode="raw", mix=1, shuffle=0,
                                         base_url=base_url))
        assert got == expected
        assert opened and all(url.startswith(base_url.split("{")[0]) for url in opened)


@pytest.mark.parametrize(("nodes", "workers"), [(1, 2), (2, 2)])
def test_workers_and_nodes_see_each_sample_once(small: Path, monkeypatch: pytest.MonkeyPatch,
                                                nodes: int, workers: int) -> None:
    """webdataset reads RANK/WORLD_SIZE and WORKER/NUM_WORKERS (pytorch_worker_info) before
    asking torch, so each DataLoader worker on each node can be played in turn, without torch."""
    monkeypatch.setenv("WORLD_SIZE", str(nodes))
    monkeypatch.setenv("NUM_WORKERS", str(workers))
    parts = []
    for rank in range(nodes):
        for worker in range(workers):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORKER", str(worker))
            parts.append(keys(shardify.open_dataset(small, decode="raw")))
    everything = [key for part in parts for key in part]
    assert all(parts) and len(everything) == len(set(everything))
    assert sorted(everything) == sorted(r["key"] for r in rows(small))


def test_torch_dataloader_workers_see_each_sample_once(small: Path) -> None:
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(shardify.open_dataset(small, decode="raw"),
                                         batch_size=None, num_workers=2)
    got = keys(loader)
    assert sorted(got) == sorted(r["key"] for r in rows(small))


def test_resampled_stream_is_endless_and_selected(small: Path) -> None:
    train = {r["key"] for r in rows(small) if r["data_type"] == "rgb"}
    stream = iter(shardify.open_dataset(small, select={"data_type": "rgb"}, decode="raw",
                                        resample=True, seed=0))
    got = [next(stream)[2]["key"] for _ in range(2 * len(train))]
    assert set(got) <= train and len(set(got)) > len(train) // 2


def test_wids_index_files(small: Path, dataset: SynthResult, tmp_path: Path) -> None:
    summary = orjson.loads((small / "summary.json").read_bytes())
    for split, info in summary["splits"].items():
        index = orjson.loads((small / f"{split}.wids.json").read_bytes())
        assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        assert [s["url"] for s in index["shardlist"]] == info["shards"]
        assert sum(s["nsamples"] for s in index["shardlist"]) == info["samples"]
        assert all(s["filesize"] == (small / s["url"]).stat().st_size for s in index["shardlist"])

    # An empty split has no index, and a re-run that empties a split removes the stale one.
    out = convert(dataset, tmp_path / "out", "1MiB")
    assert (out / "val.wids.json").is_file()
    convert(dataset, out, "1MiB", "--split", "80/0/20", "--overwrite")
    assert not (out / "val.wids.json").exists() and (out / "test.wids.json").is_file()


@pytest.fixture
def wids_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The real wids package. It imports torch at the top only for base classes and its
    DistributedChunkedSampler; without torch (CI), minimal stand-ins satisfy those imports."""
    if importlib.util.find_spec("torch") is None:
        class Dataset(Generic[T]):
            pass

        data = types.ModuleType("torch.utils.data")
        data.Dataset = data.Sampler = Dataset  # type: ignore[attr-defined]
        for name in ("torch", "torch.distributed", "torch.utils"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "torch.utils.data", data)
    return importlib.import_module("wids")


def test_open_indexed_random_access(small: Path, dataset: SynthResult, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    wids_module: types.ModuleType) -> None:
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "cache"))
    expected = rows(small)
    indexed = shardify.open_indexed(small, "train")
    assert isinstance(indexed, wids_module.ShardListDataset)
    assert len(indexed) == len(expected) == manifest_rows(small).num_rows
    jpg = next(i for i, r in enumerate(expected) if r["image_ext"] == "jpg")
    png = next(i for i, r in enumerate(expected) if r["image_ext"] == "png")
    for i in (len(expected) - 1, png, 0, len(expected) // 2, jpg, 3):
        row, sample = expected[i], indexed[i]
        image = sample["." + row["image_ext"]].read()  # wids gives file objects
        assert sample["__key__"] == row["key"]
        assert zlib.crc32(image) == row["crc32"]
        assert image == zip_member(dataset.root / row["source_archive"], row["source_member"])
        assert int(sample[".cls"].read()) == row["label"]
    indexed.close()
    assert not list((tmp_path / "cache").glob("*.tar")), "local shards must be read in place"
    assert not list((small / "train").glob("*.lock"))


def test_example_trains_an_autoencoder(per_battery: Path) -> None:
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, str(EXAMPLE), str(per_battery), "--steps", "20"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "trained 20 steps on normal ct images" in result.stdout
    assert "test reconstruction error" in result.stdout and "defect" in result.stdout


def test_example_without_torch_says_so(per_battery: Path) -> None:
    hide_torch = ("import runpy, sys; sys.modules['torch'] = None; "
                  f"sys.argv = [{str(EXAMPLE)!r}, {str(per_battery)!r}]; "
                  f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_torch], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "PyTorch is not installed" in result.stdout
