"""Adversarial checks of `convert --consume-sources`: every source byte deleted must be in a
durable shard, and every resume must finish with the large disk's output or refuse.

Most tests here reproduced a bug found in a review (wrong-order merges, unreadable inner zips,
resumes from another folder, damaged shards, --overwrite after a deletion, tars and volume sets
the filesystem will not delete); the property test of piece boundaries held up from the start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from helpers import manifest_rows, output_files
from test_consume import (
    KILL_RUNNER,
    SHARD_SIZE,
    build_tar,
    clean_download,
    convert,
    files_under,
    one_zip_each,
    release_lines,
    written,
)
from test_downloads import (
    image_entries,
    label_entries,
    make_pairs,
    string_order,
    write_pieces,
    zip_bytes,
)

from shardify.archives.reader import ArchiveReader
from shardify.convert import ConvertOptions, _plan
from shardify.plan.release import release_plan
from shardify.synth import ZIP_DEFLATED, ZIP_STORED, ZipEntry, write_zip
from shardify.write.executor import Inline


def killed_run(cwd: Path, point: str, after: int, *sources: str) -> None:
    """A consuming convert in `cwd`, killed with SIGKILL at `point` (see KILL_RUNNER)."""
    command = ["convert", *(sources or ("data",)), "--out", "out", "--shard-size", SHARD_SIZE,
               "--quiet", "--consume-sources", "--yes"]
    done = subprocess.run([sys.executable, "-c", KILL_RUNNER, point, str(after), *command],
                          cwd=cwd, capture_output=True, stdin=subprocess.DEVNULL)
    assert done.returncode == -9, done.stderr.decode()


def released_units(out: Path) -> list[dict]:
    return release_lines(out)


# --- 1. a zip merged in the wrong order: one file, several "whole" units -----------------------


def test_a_wrong_order_merge_is_not_deleted_before_all_its_members_are_written(
        tmp_path: Path) -> None:
    def build(data: Path) -> None:
        one_zip_each(data, 40, "w", side=24, batteries=8)
        raw = (data / "TS.zip").read_bytes()
        piece = 4096
        (data / "TS.zip").write_bytes(b"".join(raw[o : o + piece]
                                               for o in string_order(len(raw), piece)))

    for folder in ("reference", "run"):
        build(tmp_path / folder / "data")
    assert convert(tmp_path / "reference") == 0
    assert len(manifest_rows(tmp_path / "reference" / "out")) == 40
    assert convert(tmp_path / "run", "--shard-size", "16KiB", "--consume-sources", "--yes") == 0
    rows = manifest_rows(tmp_path / "run" / "out")
    assert len(rows) == 40, f"only {len(rows)} of 40 samples written; TS.zip deleted early"


# --- 2. a zip inside a zip that cannot be read ---------------------------------------------------


@pytest.mark.parametrize("method", [ZIP_STORED, ZIP_DEFLATED], ids=["stored", "deflated"])
def test_an_outer_zip_holding_an_unreadable_inner_zip_is_kept(tmp_path: Path,
                                                              method: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    pairs = make_pairs(6, "n", ext="png", side=16)
    write_zip(data / "TS.zip", image_entries(pairs))
    unreadable = b"not a zip, but the user's only copy of something " * 20
    write_zip(data / "TL.zip", [ZipEntry("labels.zip", zip_bytes(label_entries(pairs), tmp_path),
                                         method),
                                ZipEntry("extra/more.zip", unreadable, method)])
    assert convert(tmp_path, "--consume-sources", "--yes") == 0
    assert "TL.zip" in files_under(data)


# --- 3. resumed from another folder: relative SOURCE paths -------------------------------------


def test_a_resume_from_another_folder_deletes_nothing_there(tmp_path: Path) -> None:
    """A run that released sources of `a/data` is continued only with those (its plan names
    files by absolute path): the same relative command in `b` is refused, nothing deleted."""
    first, second = tmp_path / "a", tmp_path / "b"
    clean_download(first / "data")
    clean_download(second / "data")  # e.g. the user's backup copy, or another download
    out = str(tmp_path / "out")
    command = ["convert", "data", "--out", out, "--shard-size", SHARD_SIZE, "--quiet",
               "--consume-sources", "--yes"]
    killed = subprocess.run([sys.executable, "-c", KILL_RUNNER, "release", "2", *command],
                            cwd=first, capture_output=True, stdin=subprocess.DEVNULL)
    assert killed.returncode == -9
    done = subprocess.run([sys.executable, "-m", "shardify", *command], cwd=second,
                          capture_output=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr.decode()
    assert "other SOURCE arguments" in done.stderr.decode()
    assert len(files_under(second / "data")) == 8
    done = subprocess.run([sys.executable, "-m", "shardify", *command], cwd=first,
                          capture_output=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and files_under(first / "data") == []


# --- 4. a shard damaged after its sources were released ----------------------------------------


def test_a_shard_damaged_after_its_sources_went_is_not_thrown_away(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture
                                                                    ) -> None:
    clean_download(tmp_path / "data")
    killed_run(tmp_path, "release", 4)
    journal = (tmp_path / "out" / ".shardify" / "journal.jsonl").read_bytes().splitlines()
    shard = tmp_path / "out" / json.loads(journal[0])["shard"]
    with open(shard, "r+b") as handle:  # a bad sector, a cut copy: most samples still readable
        handle.truncate(shard.stat().st_size - 100)
    damaged = shard.read_bytes()
    code = convert(tmp_path, "--consume-sources", "--yes")
    capsys.readouterr()
    assert code != 0, "the run finished without the damaged shard's samples"
    assert shard.read_bytes() == damaged  # refused, and the damaged shard left for salvage


# --- 5. killed after the first deletion, before its record -------------------------------------


def test_overwrite_is_refused_once_a_source_is_gone_even_unrecorded(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clean_download(tmp_path / "data")
    killed_run(tmp_path, "deletion", 1)
    assert len(files_under(tmp_path / "data")) == 7
    assert [entry["state"] for entry in released_units(tmp_path / "out")] == ["releasing"]
    assert convert(tmp_path, "--seed", "3") == 2
    error = capsys.readouterr().err
    assert "re-run the same command" in error and "--overwrite" not in error
    assert convert(tmp_path, "--overwrite") == 2  # it would discard the deleted zip's only copy
    assert "holds the only copy" in capsys.readouterr().err


def test_overwrite_is_refused_after_releases_even_without_the_plan_file(tmp_path: Path) -> None:
    clean_download(tmp_path / "data")
    killed_run(tmp_path, "release", 2)
    (tmp_path / "out" / ".shardify" / "plan.pickle").unlink()
    assert convert(tmp_path, "--overwrite") == 2


# --- 6. a saved plan reused although nothing was released --------------------------------------


def test_a_saved_plan_with_nothing_released_does_not_hide_new_inputs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    clean_download(data)
    killed_run(tmp_path, "journal", 1)
    assert not released_units(tmp_path / "out") and len(files_under(data)) == 8
    late = make_pairs(10, "late", ext="png", side=40, first_battery=201, batteries=2)
    write_zip(data / "TS_9.zip", image_entries(late, method=ZIP_STORED))
    write_zip(data / "TL_9.zip", label_entries(late))
    code = convert(tmp_path)
    assert code != 0 or len(manifest_rows(tmp_path / "out")) == 72 + 10


# --- 7. download.tar emptied, killed before it is deleted ---------------------------------------


def test_an_emptied_tar_is_deleted_on_resume(tmp_path: Path) -> None:
    data = tmp_path / "data"
    clean_download(data, zips=2)
    build_tar(data, data / "download.tar")
    killed_run(tmp_path, "release", 4)  # the tar's 4 zips punched, the tar not yet deleted
    assert files_under(data) == ["download.tar"]
    assert convert(tmp_path, "--consume-sources", "--yes") == 0
    assert files_under(data) == []


# --- 8. unit names must be unique: a volume set inside download.tar -----------------------------


def test_releases_after_a_resume_count_each_volume_once(tmp_path: Path) -> None:
    import tarfile

    from test_downloads import ZIP_TOOL, spanned_zip
    if ZIP_TOOL is None:
        pytest.skip("needs the zip tool")
    spanned, _ = spanned_zip(tmp_path, make_pairs(8, "v", ext="png", side=128))
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "download.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(spanned.iterdir()):
            tar.add(path, arcname=path.name)
    size = (data / "download.tar").stat().st_size
    killed_run(tmp_path, "release", 3)
    assert convert(tmp_path, "--consume-sources", "--yes") == 0
    consumed = json.loads((tmp_path / "out" / "consumed.json").read_bytes())
    assert len(consumed["released"]) == len(set(consumed["released"]))
    assert consumed["bytes_freed"] <= size


# --- 9. what held up: pieces never go before a member whose bytes lie in them ------------------


def _odd_zip(path: Path, seed: int) -> dict[str, tuple[int, int]]:
    """A zip written byte by byte: long local extra fields, some members with data descriptors
    (sizes zero in the local header), some with a Zip64 local extra, a central directory in
    shuffled order. Returns each member's span: local header to the end of its data (and
    descriptor)."""
    rng = random.Random(seed)
    pairs = make_pairs(24, f"o{seed}", ext="png", side=20, batteries=6)
    body, central, spans = bytearray(), [], {}
    for pair in pairs:
        name = f"img/{pair.stem}.png".encode()
        data, crc = pair.image, zlib.crc32(pair.image)
        descriptor, zip64 = rng.random() < 0.3, rng.random() < 0.3
        extra = struct.pack("<HH", 0xCAFE, n := rng.choice([0, 7, 700, 5000])) + bytes(n)
        flags = 0x800 | (0x8 if descriptor else 0)
        sizes = (0, 0) if descriptor else (len(data), len(data))
        if zip64 and not descriptor:
            extra += struct.pack("<HHQQ", 1, 16, len(data), len(data))
            sizes = (0xFFFFFFFF, 0xFFFFFFFF)
        start = len(body)
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, flags, 0, 0, 0x21,
                            0 if descriptor else crc, *sizes, len(name), len(extra))
        body += name + extra + data
        if descriptor:
            body += struct.pack("<4s3L", b"PK\x07\x08", crc, len(data), len(data))
        spans[name.decode()] = (start, len(body))
        central.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, flags, 0, 0, 0x21,
                                   crc, len(data), len(data), len(name), 0, 0, 0, 0,
                                   0o644 << 16, start) + name)
    rng.shuffle(central)
    directory = b"".join(central)
    path.write_bytes(bytes(body) + directory + struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, len(central), len(central), len(directory),
        len(body), 0))
    write_zip(path.with_name("TL.zip"), label_entries(pairs))
    return spans


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_piece_waits_for_fewer_shards_than_its_members_are_in(tmp_path: Path,
                                                                 seed: int) -> None:
    """The release plan of odd zips cut into pieces of odd sizes, and of sizes that make a
    member end exactly on a boundary: each piece waits for the shard of every member whose
    bytes (zipfile-independent spans) touch it."""
    data = tmp_path / "data"
    data.mkdir()
    spans = _odd_zip(data / "TS.zip", seed)
    raw = (data / "TS.zip").read_bytes()
    ends = sorted(end for _, end in spans.values())
    for piece in (997, 4096, 12345, ends[3], ends[10] // 2):
        for old in data.glob("TS.zip.part*"):
            old.unlink()
        write_pieces(raw, data, "TS.zip", piece)
        (data / "TS.zip").rename(tmp_path / "TS.zip")
        options = ConvertOptions([str(data)], tmp_path / "out", 16 * 1024, "70/10/20",
                                 (0.7, 0.1, 0.2))
        with ArchiveReader() as reader:
            index, pairing, shards, _ = _plan(options, reader, Inline(reader))
        (tmp_path / "TS.zip").rename(data / "TS.zip")
        assert len(pairing.samples) == 24 and not index.rejects and not pairing.rejects
        plan = release_plan(index, pairing, shards)
        shard_of = {sample.image.name: shard.name for shard in shards
                    for sample in shard.samples}
        for unit, needs in zip(plan.units, plan.needs, strict=True):
            if not unit.name.startswith("TS.zip.part"):
                continue
            start = int(unit.name.removeprefix("TS.zip.part"))
            for member, (lo, hi) in spans.items():
                if lo < start + unit.size and start < hi:
                    assert shard_of[member] in needs, (piece, unit.name, member)


# --- helpers for the record ---------------------------------------------------------------------


def test_the_killed_runs_leave_what_this_module_expects(tmp_path: Path) -> None:
    """The kill harness works here: a run killed after its 2nd release leaves 6 of 8 zips and
    two lines, and the same command then finishes with the large disk's bytes."""
    reference = tmp_path / "reference"
    clean_download(reference / "data")
    assert convert(reference) == 0
    run = tmp_path / "run"
    clean_download(run / "data")
    killed_run(run, "release", 2)
    assert len(files_under(run / "data")) == 6
    assert [entry["state"] for entry in released_units(run / "out")] == ["releasing",
                                                                         "released"] * 2
    assert convert(run, "--consume-sources", "--yes") == 0
    assert written(run / "out") == output_files(reference / "out")
    shutil.rmtree(reference)
    assert os.listdir(run / "data") == []


# --- 10. a deletion refused by the filesystem ---------------------------------------------------


def _chattr(flag: str, path: Path) -> None:
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr {flag} not possible here: {done.stderr.decode().strip()}")


def test_a_tar_that_cannot_be_deleted_is_refused_first_or_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    clean_download(data, zips=2)
    build_tar(data, data / "download.tar")
    _chattr("+a", data)  # files in it can be written, not removed
    try:
        code = convert(tmp_path, "--consume-sources", "--yes")
    finally:
        _chattr("-a", data)
    assert code in (0, 2)
    assert code == 2 or (tmp_path / "out" / "summary.json").exists()


def test_a_volume_set_is_never_left_half_deleted_and_called_kept(tmp_path: Path) -> None:
    from test_downloads import ZIP_TOOL, spanned_zip
    if ZIP_TOOL is None:
        pytest.skip("needs the zip tool")
    spanned, _ = spanned_zip(tmp_path, make_pairs(8, "v", ext="png", side=128))
    volumes = len(list(spanned.glob("images.z*")))
    _chattr("+i", spanned / "images.zip")  # the last volume cannot be deleted
    try:
        assert convert(tmp_path, "--consume-sources", "--yes", sources=("spanned",)) == 0
        left = len(list(spanned.glob("images.z*")))
    finally:
        _chattr("-i", spanned / "images.zip")
    kept = json.loads((tmp_path / "out" / "consumed.json").read_bytes())["kept"]
    assert "images.zip (volume set)" not in kept or left == volumes, (
        f"said kept, but {volumes - left} of its {volumes} volumes were deleted")
