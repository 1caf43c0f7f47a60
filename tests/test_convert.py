"""End to end on the synthetic AI-Hub-shaped dataset: what goes in comes out, exactly once.

`synthesize` counts what it planted while it writes, so it is an oracle independent of the
converter. Shards are read back with `webdataset` and `tarfile`, sources with `zipfile`.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import manifest_rows, zip_member

from shardify.cli import main
from shardify.profiles import strip_bom
from shardify.profiles.battery.sample import SynthResult

SHARD_SIZE = 64 * 1024


def run_convert(source: Path, out: Path, *extra: str) -> int:
    return main(["convert", str(source), "--out", str(out), "--shard-size", str(SHARD_SIZE),
                 "--quiet", *extra])


@pytest.fixture(scope="module")
def converted(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    assert run_convert(dataset.root, out) == 0
    return out


def shard_samples(out: Path) -> dict[str, dict]:
    """Every sample of every shard, read with webdataset, keyed by sample key."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*/shard-*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            assert sample["__key__"] not in samples, f"{sample['__key__']} written twice"
            samples[sample["__key__"]] = {**sample, "shard": shard.relative_to(out).as_posix()}
    return samples


def test_every_sample_equals_its_zip_members(dataset: SynthResult, converted: Path) -> None:
    rows = manifest_rows(converted)
    samples = shard_samples(converted)
    assert len(rows) == len(samples) == dataset.samples
    for row in rows:
        sample = samples[row["key"]]
        assert sample["shard"] == row["shard"]
        image = zip_member(dataset.root / row["source_archive"], row["source_member"])
        label = zip_member(dataset.root / row["label_archive"], row["label_member"])
        assert sample[row["image_ext"]] == image
        assert sample["json"] == strip_bom(label)
        assert sample["cls"] == str(row["label"]).encode()
        assert len(image) == row["image_bytes"]


def test_counts_match_what_was_planted(dataset: SynthResult, converted: Path) -> None:
    rows = manifest_rows(converted)
    rejects = pq.read_table(converted / "rejects.parquet").to_pylist()
    assert Counter(r["reason"] for r in rejects) == Counter(dataset.rejects)
    assert all(r["detail"] and r["source_member"] for r in rejects)
    batteries = defaultdict(set)
    for row in rows:
        batteries[row["data_type"]].add(row["battery_id"])
    assert {k: len(v) for k, v in batteries.items()} == dataset.batteries
    summary = (converted / "summary.json").read_text()
    assert f'"identical_duplicates": {dataset.identical_duplicates}' in summary
    assert f'"ignored_members": {dataset.ignored}' in summary


def test_every_input_member_is_accounted_for(dataset: SynthResult, converted: Path) -> None:
    """Each zip member is in a sample, a reject row, an identical copy, or ignored junk."""
    total = sum(len(zipfile.ZipFile(p).infolist()) for p in dataset.root.rglob("*.zip"))
    rows = manifest_rows(converted)
    rejects = pq.read_table(converted / "rejects.parquet").num_rows
    assert total == 2 * len(rows) + rejects + dataset.identical_duplicates + dataset.ignored


def test_no_battery_in_two_splits_and_all_splits_used(converted: Path) -> None:
    splits_of = defaultdict(set)
    for row in manifest_rows(converted):
        splits_of[row["group"]].add(row["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    used = Counter(next(iter(s)) for s in splits_of.values())
    assert set(used) == {"train", "val", "test"}
    assert used["train"] > used["test"] > 0


def test_split_is_stratified_by_defect(converted: Path) -> None:
    """Within each data_type, defect and normal batteries both reach train and test."""
    kinds = defaultdict(lambda: defaultdict(set))
    for row in manifest_rows(converted):
        kinds[(row["data_type"], row["group"])]["split"].add(row["split"])
        kinds[(row["data_type"], row["group"])]["defect"].add(row["label"])
    for data_type in ("ct", "rgb"):
        for has_defect in (True, False):
            splits = {
                next(iter(v["split"]))
                for (dt, _), v in kinds.items()
                if dt == data_type and (1 in v["defect"]) == has_defect
            }
            assert {"train", "test"} <= splits, (data_type, has_defect, splits)


def test_shards_are_plain_ustar_and_ordered(converted: Path) -> None:
    rows = manifest_rows(converted)
    for shard in sorted(converted.glob("*/shard-*.tar")):
        raw = shard.read_bytes()
        name = shard.relative_to(converted).as_posix()
        assert len(raw) <= SHARD_SIZE or sum(r["shard"] == name for r in rows) == 1
        assert {r["split"] for r in rows if r["shard"] == name} == {shard.parent.name}
        assert len({r["data_type"] for r in rows if r["shard"] == name}) == 1, name
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        for info in members:
            assert raw[info.offset + 257 : info.offset + 263] == b"ustar\x00"
            assert (info.mode, info.mtime, info.uid, info.gid) == (0o444, 0, 0, 0)
            assert info.type == tarfile.REGTYPE and not info.pax_headers
            assert len(info.name.encode("ascii")) < 100
        names = [info.name.split(".", 1) for info in members]
        assert len(names) % 3 == 0
        for image, label, cls in zip(names[::3], names[1::3], names[2::3], strict=True):
            assert image[0] == label[0] == cls[0]
            assert (image[1] in ("jpg", "png"), label[1], cls[1]) == (True, "json", "cls")
        assert len({image[1] for image in names[::3]}) == 1, f"{name}: one image format"


def test_manifest_offsets_point_at_each_sample(converted: Path) -> None:
    rows = manifest_rows(converted)
    for row in rows:
        with open(converted / row["shard"], "rb") as handle:
            handle.seek(row["offset"])
            header = handle.read(512)
        info = tarfile.TarInfo.frombuf(header, "ascii", "strict")
        assert info.name == f"{row['key']}.{row['image_ext']}"
        assert info.size == row["image_bytes"]


def test_order_and_battery_packing(converted: Path) -> None:
    """Samples ordered by (battery, key); a battery that fits one shard is not split."""
    rows = manifest_rows(converted)
    by_split = defaultdict(list)
    for row in rows:
        by_split[row["split"]].append(row)
    for split_rows in by_split.values():
        order = [(r["data_type"], r["battery_id"], r["key"]) for r in split_rows]
        assert order == sorted(order)
        shards_of = defaultdict(set)
        size_of = Counter()
        for row in split_rows:
            shards_of[row["group"]].add(row["shard"])
            size_of[row["group"]] += row["sample_bytes"]
        for group, shards in shards_of.items():
            if size_of[group] + 1024 <= SHARD_SIZE:
                assert len(shards) == 1, group


def test_same_inputs_give_identical_bytes(dataset: SynthResult, converted: Path,
                                          tmp_path: Path) -> None:
    """Determinism, also when the dataset folder has moved (names are relative)."""
    moved = tmp_path / "moved"
    shutil.copytree(dataset.root, moved / dataset.root.name)
    again = tmp_path / "again"
    assert run_convert(moved / dataset.root.name, again) == 0
    first = sorted(p.relative_to(converted) for p in converted.rglob("*.tar"))
    assert first == sorted(p.relative_to(again) for p in again.rglob("*.tar"))
    for name in [*first, Path("manifest.parquet"), Path("rejects.parquet")]:
        assert (converted / name).read_bytes() == (again / name).read_bytes(), name


def test_other_seed_changes_split_not_content(dataset: SynthResult, converted: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "seed"
    assert run_convert(dataset.root, out, "--seed", "7") == 0
    base = {r["key"]: r for r in manifest_rows(converted)}
    other = {r["key"]: r for r in manifest_rows(out)}
    assert base.keys() == other.keys()
    assert any(base[k]["split"] != other[k]["split"] for k in base)
    assert all(base[k]["crc32"] == other[k]["crc32"] for k in base)


def test_empty_split_writes_no_shards(dataset: SynthResult, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_convert(dataset.root, out, "--split", "80/0/20") == 0
    assert not (out / "val").exists()
    assert {r["split"] for r in manifest_rows(out)} == {"train", "test"}


def test_strict_exits_1_on_rejects(dataset: SynthResult, tmp_path: Path) -> None:
    assert run_convert(dataset.root, tmp_path / "out", "--strict") == 1


def test_manifest_path_and_overwrite(dataset: SynthResult, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    """Other options into the same OUT are refused, unless --overwrite: then no stale shard."""
    out, manifest = tmp_path / "out", tmp_path / "manifests" / "demo.parquet"
    assert run_convert(dataset.root, out, "--shard-size", "16KiB") == 0
    many = set(out.rglob("shard-*.tar"))
    assert run_convert(dataset.root, out) == 2
    assert "shard_size 16384 -> 65536" in capsys.readouterr().err
    assert set(out.rglob("shard-*.tar")) == many
    assert run_convert(dataset.root, out, "--manifest", str(manifest), "--overwrite") == 0
    assert set(out.rglob("shard-*.tar")) < many
    assert manifest.read_bytes() == (out / "manifest.parquet").read_bytes()
    assert (tmp_path / "manifests" / "demo.summary.json").is_file()
    shards = {r["shard"] for r in manifest_rows(out)}
    assert all((out / shard).is_file() for shard in shards)


def test_verify_passes_clean_output_and_names_damage(converted: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(converted)]) == 0
    damaged = tmp_path / "damaged"
    shutil.copytree(converted, damaged)
    row = manifest_rows(damaged)[0]
    shard = damaged / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["offset"] + 512 + 20] ^= 0xFF
    shard.write_bytes(bytes(data))
    victim = sorted(damaged.glob("test/shard-*.tar"))[0]
    victim.unlink()
    capsys.readouterr()
    assert main(["verify", str(damaged)]) == 1
    printed = capsys.readouterr().out
    assert f"{row['shard']}:{row['key']}: image crc32 differs" in printed
    assert f"{victim.relative_to(damaged).as_posix()}: shard file is missing" in printed


def test_image_decodes(converted: Path) -> None:
    """The bytes are real images: Pillow opens a JPEG and a PNG from the shards."""
    from PIL import Image

    seen = set()
    for sample in shard_samples(converted).values():
        for ext in ("jpg", "png"):
            if ext in sample and ext not in seen:
                Image.open(io.BytesIO(sample[ext])).verify()
                seen.add(ext)
    assert seen == {"jpg", "png"}


def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """`shardify ARGS | true` with the reader already gone: every write to stdout fails."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([sys.executable, "-m", "shardify", *args], stdout=writer,
                              stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(writer)


@pytest.mark.parametrize("command", ["convert", "scan", "verify", "report"])
def test_closed_stdout_ends_quietly(dataset: SynthResult, converted: Path, tmp_path: Path,
                                    command: str) -> None:
    """Like coreutils in `| head`: no message, exit 141; a convert still finishes its output."""
    out = tmp_path / "out"
    args = {"convert": ["convert", str(dataset.root), "--out", str(out), "--shard-size",
                        str(SHARD_SIZE), "--quiet"],
            "scan": ["scan", str(dataset.root)],
            "verify": ["verify", str(converted)],
            "report": ["report", str(converted)]}[command]
    done = run_into_closed_pipe(*args)
    assert (done.returncode, done.stderr.decode()) == (141, "")
    if command == "convert":
        assert (out / "summary.json").exists() and not list(out.rglob("*.partial"))
        assert main(["verify", str(out)]) == 0
