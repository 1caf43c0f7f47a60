"""The training side: `open_dataset` (webdataset) and `open_indexed` (wids) on a converted
synthetic dataset, checked against the manifest read directly and the source zips.

The data is `synthesize(scale=2)`: 360 samples, 247 in train over 22 batteries of about 11
samples. Converted twice: 32 KiB shards (56 train shards, less than a battery each) and 128 KiB
shards (22 train shards, one battery each, like real shards that hold whole batteries).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from helpers import read_shards
from PIL import Image

import shardify
from shardify.cli import main
from shardify.profiles.battery.sample import SynthResult, synthesize

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_autoencoder.py"
BATCH = 64


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


def meta_key(meta: dict) -> str:
    return meta["key"]


def test_fluent_pipeline_in_torch_dataloader_workers(small: Path) -> None:
    """webdataset's fluent methods on open_dataset, through two DataLoader workers: each split's
    samples once each, with the manifest's labels and images equal to Pillow's decode."""
    tars = read_shards(small)
    summary = orjson.loads((small / "summary.json").read_bytes())
    for split, info in summary["splits"].items():
        expected = {r["key"]: r for r in rows(small, split)}
        pipeline = (shardify.open_dataset(small, split, decode="numpy", seed=0)
                    .map_tuple(halve, None, meta_key).shuffle(20).listed(8))
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
        got = [sample for batch in loader for sample in batch]
        assert len(got) == len(expected) == info["samples"]
        assert sorted(key for _, _, key in got) == sorted(expected)
        for image, label, key in got:
            row = expected[key]
            assert label == row["label"]
            assert np.array_equal(image.numpy(), halve(decoded(tars[key][row["image_ext"]])))

    batches = list(shardify.open_dataset(small, "test", decode="raw", shuffle=0, mix=1)
                   .map_tuple(len, None, meta_key).batched(16))
    assert {len(keys) for _, _, keys in batches[:-1]} == {16} and len(batches) > 2
    flat = [(int(size), int(label), key) for sizes, labels, keys in batches
            for size, label, key in zip(sizes, labels, keys, strict=True)]
    assert flat == [(r["image_bytes"], r["label"], r["key"]) for r in rows(small, "test")]


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


@pytest.fixture(scope="module")
def read_only(small: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`small` mounted read-only (a bind mount remounted ro): as root, permissions would not
    stop wids' lock file, a mount does. Without mount rights, a copy without write permission
    (which stops a non-root user)."""
    mountpoint = tmp_path_factory.mktemp("read-only") / "out"
    mountpoint.mkdir()
    bind = ["mount", "--bind", str(small), str(mountpoint)]
    remount = ["mount", "-o", "remount,ro,bind", str(mountpoint)]
    mounted = shutil.which("mount") is not None and subprocess.run(
        bind, capture_output=True, check=False).returncode == 0
    if mounted:
        subprocess.run(remount, check=True, capture_output=True)
    elif os.geteuid() == 0:
        pytest.skip("cannot mount a read-only copy here, and root ignores file permissions")
    else:
        shutil.rmtree(mountpoint.parent)
        shutil.copytree(small, mountpoint)
        for path in [mountpoint, *mountpoint.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    with pytest.raises(OSError, match=r"Read-only|Permission"):
        (mountpoint / "train" / "probe.lock").touch()
    yield mountpoint
    if mounted:
        subprocess.run(["umount", str(mountpoint)], check=True)


def decoded(image: bytes) -> np.ndarray:
    """An image as open_dataset's "numpy" decode promises (RGB), decoded here with Pillow."""
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))


def halve(image: np.ndarray) -> np.ndarray:
    """A transform: every second row and column."""
    return np.ascontiguousarray(image[::2, ::2])


def test_open_indexed_on_read_only_out_with_a_sampler(read_only: Path) -> None:
    expected = rows(read_only)
    tars = read_shards(read_only)
    indexed = shardify.open_indexed(read_only, decode="numpy", transform=halve)
    assert isinstance(indexed, torch.utils.data.Dataset)
    assert len(indexed) == len(expected)
    sampler = torch.utils.data.RandomSampler(indexed, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(indexed, sampler=sampler, batch_size=None,
                                         num_workers=2)
    got = {}
    for image, label, meta in loader:
        row = next(r for r in expected if r["key"] == meta["key"])
        assert label == row["label"] == int(tars[row["key"]]["cls"])
        assert isinstance(image, torch.Tensor)  # the DataLoader's default_convert
        assert np.array_equal(image.numpy(), halve(decoded(tars[row["key"]][row["image_ext"]])))
        got[meta["key"]] = meta
    assert sorted(got) == sorted(r["key"] for r in expected)
    assert all(got[r["key"]]["data_info"]["battery_ids"] == r["battery_id"] for r in expected)
    assert not list(read_only.rglob("*.lock"))


def test_open_indexed_numbers_like_the_manifest(small: Path) -> None:
    expected = rows(small)
    raw = shardify.open_indexed(small, decode="raw")
    for i in (0, 1, len(expected) // 2, len(expected) - 1):
        assert raw[i][2]["key"] == expected[i]["key"]
        assert raw[i - len(expected)][2]["key"] == expected[i]["key"]  # negative: from the end
        assert zlib.crc32(raw[i][0]) == expected[i]["crc32"]
    for i in (len(expected), -len(expected) - 1):
        with pytest.raises(IndexError, match="out of range"):
            raw[i]
    image, _, meta = shardify.open_indexed(small, "test", decode="pil")[-1]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert meta["key"] == rows(small, "test")[-1]["key"]

    # select, and a subset sampler over it
    wanted = [r for r in rows(small, "test") if r["data_type"] == "rgb"]
    subset = shardify.open_indexed(small, "test", select={"data_type": "rgb"}, decode="raw")
    picks = [1, 3, len(wanted) - 1]
    sampler = torch.utils.data.SubsetRandomSampler(picks)
    got = [meta["key"] for _, _, meta in torch.utils.data.DataLoader(
        subset, sampler=sampler, batch_size=None)]
    assert sorted(got) == sorted(wanted[i]["key"] for i in picks)
    with pytest.raises(ValueError, match="no test samples"):
        shardify.open_indexed(small, "test", select={"group": "ct-999"})
    with pytest.raises(ValueError, match="decode must be"):
        shardify.open_indexed(small, decode="torch")  # type: ignore[arg-type]


def test_wids_reads_the_index_files_of_a_read_only_out(read_only: Path, tmp_path: Path) -> None:
    """For users of wids itself: `{split}.wids.json` numbers samples as the manifest does;
    on a read-only OUT, wids needs a writable `cache_dir` (it copies the shards there)."""
    import wids

    expected = rows(read_only)
    dataset = wids.ShardListDataset(str(read_only / "train.wids.json"),
                                    cache_dir=str(tmp_path), transformations=[])
    assert len(dataset) == len(expected)
    for i in (0, len(expected) // 3, len(expected) - 1):
        sample = dataset[i]
        assert sample["__key__"] == expected[i]["key"]
        assert zlib.crc32(sample["." + expected[i]["image_ext"]].read()) == expected[i]["crc32"]
    dataset.close()


def test_example_trains_an_autoencoder(per_battery: Path) -> None:
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


def test_package_lists_its_api_and_imports_light() -> None:
    """`dir(shardify)` shows the loaders, which are imported only on first use; Ray's workers
    import `ray_data` without webdataset (which imports torch); py.typed marks the package typed
    (setuptools puts it in the wheel)."""
    probe = ("import json, sys, shardify; "
             "heavy = {'webdataset', 'torch', 'ray', 'pyarrow', 'PIL'}; "
             "names, first = dir(shardify), sorted(heavy & set(sys.modules)); "
             "import shardify.ray_data; "
             "print(json.dumps([names, first, sorted(heavy & set(sys.modules))]))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)
    names, on_import, for_ray = orjson.loads(result.stdout)
    assert {"open_dataset", "open_indexed", "ray_dataset", "__version__"} <= set(names)
    assert on_import == [] and for_ray == ["PIL", "pyarrow"]
    assert shardify.ray_dataset.__module__ == "shardify.ray_data"
    assert (Path(shardify.__file__).parent / "py.typed").is_file()
    with pytest.raises(AttributeError, match="no attribute 'open_everything'"):
        shardify.open_everything  # noqa: B018


def test_missing_optional_libraries_name_the_extra(small: Path) -> None:
    probe = ("import sys; sys.modules['torch'] = sys.modules['ray'] = None; import shardify\n"
             "for call in ('open_indexed', 'ray_dataset'):\n"
             "    try: getattr(shardify, call)(sys.argv[1])\n"
             "    except ModuleNotFoundError as error: print(error)\n")
    result = subprocess.run([sys.executable, "-c", probe, str(small)], capture_output=True,
                            text=True, timeout=60, check=True)
    indexed, ray = result.stdout.splitlines()
    assert indexed.startswith("open_indexed needs torch (") and "'shardify[train]'" in indexed
    assert ray.startswith("ray_dataset needs Ray Data (") and "'shardify[ray]'" in ray
