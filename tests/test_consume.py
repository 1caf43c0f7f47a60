"""`convert --consume-sources`: sources deleted (or holes punched in a tar) as their contents
land in durable shards, on real small filesystems (tmpfs, ramfs mounted by the tests), with
kill -9 at the dangerous moments; the output always byte-identical to a conversion onto a large
disk, and every deleted byte in a shard."""

from __future__ import annotations

import io
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import manifest_rows, output_files, read_shards
from test_downloads import (
    Pair,
    image_entries,
    label_entries,
    make_pairs,
    needs_zip_tool,
    spanned_zip,
    write_pieces,
    zip_bytes,
)

from shardify.archives.model import Extent
from shardify.cli import main
from shardify.plan.release import ReleasePlan, ReleaseUnit, peak_growth, release_order
from shardify.plan.shards import PlannedShard
from shardify.synth import ZIP_DEFLATED, ZIP_STORED, ZipEntry, flip_byte, write_zip

SHARD_SIZE = "64KiB"
KILL_RUNNER = """
import os, signal, sys
import shardify.consume as consume
from shardify.output.store import OutputStore
point, after = sys.argv[1], int(sys.argv[2])
calls = [0]
def killing(function):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        calls[0] += 1
        if calls[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped
if point == "journal":  # a shard journaled, its sources not yet released
    OutputStore.append_journal = killing(OutputStore.append_journal)
elif point == "deletion":  # a source deleted, its release not yet recorded
    consume.release = killing(consume.release)
else:  # a release recorded as done (its intent line came before the deletion)
    record = OutputStore.append_release
    def recorded(store, entry):
        record(store, entry)
        if entry["state"] == "released":
            calls[0] += 1
            if calls[0] == after:
                os.kill(os.getpid(), signal.SIGKILL)
    OutputStore.append_release = recorded
from shardify.cli import main
sys.exit(main(sys.argv[3:]))
"""


# --- inputs --------------------------------------------------------------------------------


def clean_download(data: Path, zips: int = 4, per_zip: int = 18, side: int = 40
                   ) -> dict[str, list[Pair]]:
    """Image zips of stored noise PNGs (they do not compress), two batteries each, and a label
    zip per image zip; no rejects anywhere. Returns the pairs by image zip name."""
    data.mkdir(parents=True, exist_ok=True)
    found = {}
    for z in range(zips):
        pairs = make_pairs(per_zip, f"z{z}", ext="png", side=side, first_battery=101 + 2 * z,
                           batteries=2)
        write_zip(data / f"TS_{z}.zip", image_entries(pairs, method=ZIP_STORED))
        write_zip(data / f"TL_{z}.zip", label_entries(pairs))
        found[f"TS_{z}.zip"] = pairs
    return found


def one_zip_each(data: Path, count: int, tag: str, *, side: int, batteries: int) -> None:
    """TS.zip (stored noise PNGs) and TL.zip, members in name order as AI Hub's zips have
    them: a battery's images are neighbours."""
    data.mkdir(parents=True)
    pairs = sorted(make_pairs(count, tag, ext="png", side=side, batteries=batteries),
                   key=lambda pair: pair.stem)
    write_zip(data / "TS.zip", image_entries(pairs, method=ZIP_STORED))
    write_zip(data / "TL.zip", label_entries(pairs))


def convert(cwd: Path, *extra: str, sources: tuple[str, ...] = ("data",)) -> int:
    """`shardify convert` run in `cwd` (relative SOURCE and OUT: the summaries match)."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return main(["convert", *sources, "--out", "out", "--shard-size", SHARD_SIZE,
                     "--quiet", *extra])
    finally:
        os.chdir(previous)


def reference(tmp: Path, build: object) -> dict[str, bytes]:
    """The output of a plain conversion on the large disk."""
    folder = tmp / "reference"
    folder.mkdir()
    build(folder / "data")  # type: ignore[operator]
    assert convert(folder) == 0
    return output_files(folder / "out")


def written(out: Path) -> dict[str, bytes]:
    """The output without what only a consuming run writes."""
    return {name: data for name, data in output_files(out).items() if name != "consumed.json"}


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def release_lines(out: Path) -> list[dict]:
    """OUT's release records: an intent line (`releasing`) before each release, a `released`
    line after it."""
    path = out / ".shardify" / "released.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def used(path: Path) -> int:
    info = os.statvfs(path)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


@contextmanager
def mounted(path: Path, kind: str, size: int | None = None) -> Iterator[Path]:
    """A fresh filesystem of `kind` (tmpfs, ramfs) at `path` for the test's duration."""
    path.mkdir()
    options = ["-o", f"size={size}"] if size else []
    done = subprocess.run(["mount", "-t", kind, *options, kind, str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount {kind} here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def member_spans(zip_path: Path) -> dict[str, tuple[int, int]]:
    """Each member's bytes in the zip (local header to the end of its data), read with
    zipfile and the local header itself: what a piece must keep until its member is written."""
    spans = {}
    with zipfile.ZipFile(zip_path) as archive, open(zip_path, "rb") as raw:
        for info in archive.infolist():
            raw.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", raw.read(4))
            end = info.header_offset + 30 + name_len + extra_len + info.compress_size
            spans[info.filename] = (info.header_offset, end)
    return spans


# --- a drive too small for sources and output ----------------------------------------------


@pytest.mark.slow
def test_consuming_fits_a_drive_too_small_for_sources_and_output(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture
                                                                  ) -> None:
    """On a tmpfs that holds the sources and part of the output, a plain convert is refused
    for space; --consume-sources --yes fits, writes the large disk's bytes and deletes every
    source; verify passes without the sources."""
    expected = reference(tmp_path, clean_download)
    sources = sum(p.stat().st_size for p in (tmp_path / "reference" / "data").iterdir())
    output = sum(map(len, expected.values()))
    # Dry run on the large disk: the plan says the worst point; size the small drive for it.
    trial = tmp_path / "trial"
    clean_download(trial / "data")
    capsys.readouterr()
    assert convert(trial, "--consume-sources", "--yes") == 0
    said = capsys.readouterr().err
    assert "4 source files" not in said and "8 source files" in said, said
    peak = _said_bytes(said.split("worst point, ", 1)[1])
    size = sources + peak + 128 * 1024
    assert size < sources + output, (size, sources, output)  # both would not fit
    with mounted(tmp_path / "small", "tmpfs", size) as small:
        clean_download(small / "data")
        assert convert(small) == 3  # not enough space: sources + output
        assert "not enough space" in capsys.readouterr().err
        shutil.rmtree(small / "out", ignore_errors=True)
        assert convert(small, "--consume-sources", "--yes") == 0
        assert written(small / "out") == expected
        assert files_under(small / "data") == []
        consumed = json.loads((small / "out" / "consumed.json").read_bytes())
        assert sorted(consumed["released"]) == sorted(
            [f"TS_{z}.zip" for z in range(4)] + [f"TL_{z}.zip" for z in range(4)])
        assert consumed["kept"] == {}
        assert consumed["bytes_freed"] == sources
        assert main(["verify", str(small / "out")]) == 0
        capsys.readouterr()
        assert main(["verify", str(small / "out"), "--sources", str(small / "data")]) == 0
        said = capsys.readouterr().out
        assert f"{len(manifest_rows(small / 'out'))} samples not compared" in said


def _said_bytes(text: str) -> int:
    number, unit = text.split()[:2]
    return int(float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit])


# --- kill -9 at the dangerous moments -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("point", "after", "resume"), [
    ("journal", 3, ("--consume-sources", "--yes")),
    ("deletion", 2, ("--consume-sources", "--yes")),
    ("release", 1, ("--consume-sources", "--yes")),
    ("release", 3, ()),
], ids=["after-a-journal-line", "after-a-deletion", "after-a-release-line",
        "resumed-without-consuming"])
def test_kill_9_then_the_same_command_resumes_to_identical_output(
        tmp_path: Path, point: str, after: int, resume: tuple[str, ...]) -> None:
    """Killed between a shard's journal line and its sources' deletion, between a deletion and
    its record, or after a record: the same command (needing no released source) finishes
    with the large disk's bytes. Resumed without --consume-sources, nothing more is deleted."""
    expected = reference(tmp_path, clean_download)
    run = tmp_path / "run"
    clean_download(run / "data")
    command = ["convert", "data", "--out", "out", "--shard-size", SHARD_SIZE, "--quiet",
               "--consume-sources", "--yes"]
    killed = subprocess.run([sys.executable, "-c", KILL_RUNNER, point, str(after), *command],
                            cwd=run, capture_output=True, stdin=subprocess.DEVNULL)
    assert killed.returncode == -9, killed.stderr.decode()
    assert not (run / "out" / "summary.json").exists()
    left = files_under(run / "data")
    assert 0 < len(left) < 8 or point == "journal", left
    assert convert(run, *resume) == 0
    assert written(run / "out") == expected
    remaining = files_under(run / "data")
    if resume:
        assert remaining == []
    else:
        assert remaining == left  # only the consuming run deletes
    released = [entry["unit"] for entry in release_lines(run / "out")
                if entry["state"] == "released"]
    assert len(released) == len(set(released)) == 8 - len(remaining)
    assert main(["verify", str(run / "out")]) == 0


# --- pieces, one by one ---------------------------------------------------------------------


@pytest.mark.slow
def test_pieces_are_released_one_by_one_and_never_before_their_members(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One image zip as 48 KiB pieces on a tmpfs: each release is one piece; each released
    piece's members (their local header to their data's end, read with zipfile) are all in
    journaled shards by then; space is freed while shards are still to come; the used space
    (statvfs at every journal line) stays under sources + output."""
    from shardify.output.store import OutputStore

    piece = 48 * 1024
    spans: dict[str, tuple[int, int]] = {}

    def build(data: Path) -> None:
        one_zip_each(data, 60, "p", side=40, batteries=10)
        spans.update(member_spans(data / "TS.zip"))
        write_pieces((data / "TS.zip").read_bytes(), data, "TS.zip", piece)
        (data / "TS.zip").unlink()

    expected = reference(tmp_path, build)
    pieces = len(list((tmp_path / "reference" / "data").glob("TS.zip.part*")))
    sources = sum(p.stat().st_size for p in (tmp_path / "reference" / "data").iterdir())
    output = sum(map(len, expected.values()))
    with mounted(tmp_path / "small", "tmpfs", 4 * (sources + output)) as small:
        build(small / "data")
        start = used(small)
        journaled: list[str] = []
        events: list[tuple[str, list[str]]] = []
        peak = [0]
        append_journal, append_release = OutputStore.append_journal, OutputStore.append_release

        def journal(store: OutputStore, entry: dict) -> None:
            append_journal(store, entry)
            journaled.append(entry["shard"])
            peak[0] = max(peak[0], used(small) - start)

        def release(store: OutputStore, entry: dict) -> None:
            append_release(store, entry)
            if entry["state"] == "released":
                events.append((entry["unit"], list(journaled)))

        monkeypatch.setattr(OutputStore, "append_journal", journal)
        monkeypatch.setattr(OutputStore, "append_release", release)
        assert convert(small, "--consume-sources", "--yes", "--workers", "1") == 0
        assert written(small / "out") == expected
    shard_of = _shard_of_keys(expected)
    piece_events = [(unit, done) for unit, done in events if unit.startswith("TS.zip.part")]
    assert len(piece_events) == pieces
    for unit, done in piece_events:
        offset = int(unit.removeprefix("TS.zip.part"))
        inside = [name for name, (lo, hi) in spans.items() if lo < offset + piece and offset < hi]
        for name in inside:
            stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            assert shard_of[stem] in done, (unit, name)
    first_release = len(piece_events[0][1])
    assert first_release < len(journaled), "a piece should go while shards remain"
    assert peak[0] < output, (peak[0], output)


def _shard_of_keys(files: dict[str, bytes]) -> dict[str, str]:
    """Which shard each key is in, read from the shard files with tarfile."""
    found = {}
    for name, data in files.items():
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for info in tar:
                    found[info.name.split(".", 1)[0]] = name
    return found


# --- what is kept, what is refused ----------------------------------------------------------


def test_an_archive_holding_a_bad_crc_member_is_kept(tmp_path: Path) -> None:
    """A member whose CRC fails while its shard is written keeps its zip and its label's zip;
    every other source goes."""
    data = tmp_path / "data"
    pairs = clean_download(data)
    damaged = pairs["TS_1.zip"][4]
    flip_byte(data / "TS_1.zip", f"img/{damaged.stem}.png")
    assert convert(tmp_path, "--consume-sources", "--yes") == 0
    assert files_under(data) == ["TL_1.zip", "TS_1.zip"]
    kept = json.loads((tmp_path / "out" / "consumed.json").read_bytes())["kept"]
    assert set(kept) == {"TS_1.zip", "TL_1.zip"}
    assert all(damaged.stem in why and "bad-crc" in why for why in kept.values()), kept
    assert damaged.stem not in read_shards(tmp_path / "out")


def test_a_source_on_read_only_media_is_refused_before_any_work(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture
                                                                ) -> None:
    data = tmp_path / "data"
    clean_download(data)
    before = files_under(data)
    view = tmp_path / "view"
    view.mkdir()
    bind = subprocess.run(["mount", "--bind", str(data), str(view)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        assert convert(tmp_path, "--consume-sources", "--yes", sources=("view",)) == 2
    finally:
        subprocess.run(["umount", str(view)], check=True)
    error = capsys.readouterr().err
    assert "read-only media" in error and "nothing was deleted or written" in error
    assert error.count("\n") == 1
    assert files_under(data) == before and not (tmp_path / "out").exists()


def test_a_source_of_another_user_is_refused(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    clean_download(data)
    os.chown(data / "TL_2.zip", 65534, 65534)
    if (data / "TL_2.zip").stat().st_uid == os.geteuid():
        pytest.skip("cannot give a file to another user here")
    assert convert(tmp_path, "--consume-sources", "--yes") == 2
    assert "TL_2.zip belongs to another user (uid 65534)" in capsys.readouterr().err
    assert len(files_under(data)) == 8 and not (tmp_path / "out").exists()


def test_without_a_terminal_it_needs_yes(tmp_path: Path) -> None:
    clean_download(tmp_path / "data")
    done = subprocess.run([sys.executable, "-m", "shardify", "convert", "data", "--out", "out",
                           "--consume-sources"], cwd=tmp_path, capture_output=True,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr.decode().strip().endswith("without a terminal to ask on, give --yes "
                                                 "to agree")
    assert len(files_under(tmp_path / "data")) == 8 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("answer", ["n", "y"])
def test_on_a_terminal_it_asks_once(tmp_path: Path, answer: str) -> None:
    """On a terminal the plan is shown and the question asked; `n` deletes and writes
    nothing, `y` consumes."""
    clean_download(tmp_path / "data")
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "shardify", "convert", "data", "--out",
                                "out", "--shard-size", SHARD_SIZE, "--quiet",
                                "--consume-sources"], cwd=tmp_path, stdin=terminal,
                               stdout=terminal, stderr=terminal)
    os.close(terminal)
    shown = b""
    while b"[y/N]" not in shown:
        shown += os.read(controller, 4096)
    os.write(controller, f"{answer}\n".encode())
    code = process.wait(timeout=120)
    os.close(controller)
    assert b"8 source files" in shown and b"disk use on OUT's drive" in shown
    assert shown.count(b"[y/N]") == 1
    if answer == "n":
        assert code == 2
        assert len(files_under(tmp_path / "data")) == 8
        assert not (tmp_path / "out" / "summary.json").exists()
    else:
        assert code == 0
        assert files_under(tmp_path / "data") == []


def test_consuming_refuses_transforms_and_a_changed_or_overwritten_run(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Transforms would lose the originals; once sources are released, the output holds their
    only copy: --overwrite and other options are refused, the same command finishes."""
    data = tmp_path / "data"
    clean_download(data)
    assert convert(tmp_path, "--consume-sources", "--yes", "--resize", "16") == 2
    assert "cannot be combined with --crop, --resize" in capsys.readouterr().err
    killed = subprocess.run([sys.executable, "-c", KILL_RUNNER, "release", "2", "convert",
                             "data", "--out", "out", "--shard-size", SHARD_SIZE, "--quiet",
                             "--consume-sources", "--yes"], cwd=tmp_path, capture_output=True)
    assert killed.returncode == -9
    assert convert(tmp_path, "--overwrite") == 2
    assert "holds the only copy of 2 source files" in capsys.readouterr().err
    assert convert(tmp_path, "--seed", "5") == 2
    assert "re-run the same command" in capsys.readouterr().err
    (data / "TS_0.zip").rename(tmp_path / "TS_0.zip")  # a source the rest still needs
    assert convert(tmp_path) == 2
    error = capsys.readouterr().err
    assert "source TS_0.zip is gone, but" in error and "put it back" in error
    (tmp_path / "TS_0.zip").rename(data / "TS_0.zip")
    assert convert(tmp_path) == 0  # the same plan, not consuming any more
    assert len(files_under(data)) == 6


@needs_zip_tool
def test_a_volume_set_goes_as_a_whole(tmp_path: Path) -> None:
    """`zip -s 64k` volumes are one source: all deleted together, once all is written."""
    pairs = make_pairs(8, "v", ext="png", side=128)
    spanned, _ = spanned_zip(tmp_path, pairs)
    volumes = sorted(p.name for p in spanned.glob("images.z*"))
    assert len(volumes) >= 5
    assert convert(tmp_path, "--consume-sources", "--yes", sources=("spanned",)) == 0
    assert files_under(spanned) == []
    releases = release_lines(tmp_path / "out")
    assert [(entry["unit"], entry["state"]) for entry in releases if "images" in entry["unit"]] \
        == [("images.zip (volume set)", "releasing"), ("images.zip (volume set)", "released")]
    assert {entry["unit"] for entry in releases} == {"images.zip (volume set)", "labels.zip"}
    assert len(read_shards(tmp_path / "out")) == 8


@pytest.mark.parametrize("method", [ZIP_STORED, ZIP_DEFLATED], ids=["stored", "deflated"])
def test_zips_inside_a_zip_release_the_outer_zip(tmp_path: Path, method: int) -> None:
    """Labels in zips inside a label zip (as other AI Hub sets deliver them): the outer zip goes
    once every inner zip's labels are written."""
    data = tmp_path / "data"
    data.mkdir()
    pairs = make_pairs(12, "n", ext="png", side=24)
    write_zip(data / "TS.zip", image_entries(pairs))
    inner = [ZipEntry(f"part{i}.zip", zip_bytes(label_entries(pairs[i::2]), tmp_path), method)
             for i in range(2)]
    write_zip(data / "TL.zip", inner)
    assert convert(tmp_path, "--consume-sources", "--yes") == 0
    assert files_under(data) == []
    assert len(read_shards(tmp_path / "out")) == 12


# --- download.tar: holes punched ------------------------------------------------------------


def build_tar(folder: Path, tar_path: Path, piece: int | None = None) -> dict[str, bytes]:
    """A tar of the zips in `folder` (pieces of `piece` bytes for the image zips), the zips
    removed; returns the tar's members."""
    members = {}
    for zip_path in sorted(folder.glob("*.zip")):
        data = zip_path.read_bytes()
        if piece and zip_path.name.startswith("TS_"):
            members |= {f"{zip_path.name}.part{o}": data[o : o + piece]
                        for o in range(0, len(data), piece)}
        else:
            members[zip_path.name] = data
        zip_path.unlink()
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return members


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_download_tar_has_holes_punched_and_goes_when_consumed(tmp_path: Path) -> None:
    """Zips and pieces inside download.tar: each freed by punching holes; the tar deleted when
    nothing is left in it; the output the large disk's."""
    def build(data: Path) -> None:
        clean_download(data)
        build_tar(data, data / "download.tar", piece=40 * 1024)

    expected = reference(tmp_path, build)
    run = tmp_path / "run"
    build(run / "data")
    assert convert(run, "--consume-sources", "--yes") == 0
    assert written(run / "out") == expected
    assert files_under(run / "data") == []
    releases = [entry for entry in release_lines(run / "out") if entry["state"] == "released"]
    assert {entry["how"] for entry in releases[:-1]} == {"holes punched"}
    assert releases[-1]["unit"].endswith("download.tar")
    assert releases[-1]["how"] == "deleted (emptied)"


def test_download_tar_holding_a_reject_keeps_it_with_the_rest_punched_out(
        tmp_path: Path) -> None:
    """One zip in the tar holds a bad-CRC member: the tar stays, that zip's (and its labels')
    bytes intact in it, every other zip's bytes freed (the file's allocated size shrinks)."""
    data = tmp_path / "data"
    pairs = clean_download(data, per_zip=30, side=64)
    flip_byte(data / "TS_3.zip", f"img/{pairs['TS_3.zip'][0].stem}.png")
    members = build_tar(data, data / "download.tar")
    tar_path = data / "download.tar"
    before = allocated(tar_path)
    assert convert(tmp_path, "--consume-sources", "--yes") == 0
    assert files_under(data) == ["download.tar"]
    kept = {"TS_3.zip", "TL_3.zip"}
    freed = sum(len(data) for name, data in members.items() if name not in kept)
    assert allocated(tar_path) <= before - freed + 16 * 4096  # block edges stay allocated
    with tarfile.open(tar_path) as tar:
        assert sorted(tar.getnames()) == sorted(members)  # the headers are all there
        for info in tar:
            extracted = tar.extractfile(info)
            assert extracted is not None
            body = extracted.read()
            if info.name in kept:
                assert body == members[info.name]
            else:
                assert body.count(0) == len(body), info.name  # a hole reads as zeros


def test_download_tar_on_a_filesystem_without_holes_is_kept_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """ramfs cannot punch holes: the plan says the tar is kept whole, and it is, unchanged."""
    with mounted(tmp_path / "ram", "ramfs") as ram:
        clean_download(ram / "data")
        build_tar(ram / "data", ram / "data" / "download.tar")
        original = (ram / "data" / "download.tar").read_bytes()
        capsys.readouterr()
        # ramfs has no size, and says 0 bytes free
        assert convert(ram, "--consume-sources", "--yes", "--no-space-check") == 0
        said = capsys.readouterr().err
        assert "cannot punch holes: the tar is kept whole" in said
        assert (ram / "data" / "download.tar").read_bytes() == original
        assert len(read_shards(ram / "out")) == 4 * 18


# --- the plan's arithmetic (pure) ------------------------------------------------------------


def _plan_of(sizes: list[int], needs: list[set[str]]) -> ReleasePlan:
    units = [ReleaseUnit(f"{i}.zip", (Extent(Path(f"{i}.zip"), 0, size),), True)
             for i, size in enumerate(sizes)]
    return ReleasePlan(units, [frozenset(n) for n in needs], {}, [()] * len(units), {}, {}, {})


def test_peak_growth_counts_the_shards_in_flight_and_the_releases_before_them() -> None:
    """Unit 0 (100 B) waits for s1, unit 1 (50 B) for s2 and s3. With one shard in flight the
    worst point is writing s1 or s3 (+80 B); with two, writing s1 while s2 is written too."""
    plan = _plan_of([100, 50], [{"s1"}, {"s2", "s3"}])
    order = [PlannedShard(name, "train", (), size)
             for name, size in (("s1", 80), ("s2", 60), ("s3", 40))]
    waiting = {0: {"s1"}, 1: {"s2", "s3"}}
    assert peak_growth(plan, waiting, order, 1, block=1) == 80
    assert peak_growth(plan, waiting, order, 2, block=1) == 140
    assert peak_growth(plan, {}, order, 1, block=1) == 180  # sources on another drive: no help
    assert peak_growth(plan, waiting, order, 1) == 3 * 4096 - 100  # whole 4 KiB blocks


def test_release_order_writes_first_what_frees_most_per_byte() -> None:
    """Unit 0 frees 100 B for 40 B of shards (s3), unit 1 50 B for 80 B (s1): s3 first, then
    s1; s2, which no unit waits for, last."""
    plan = _plan_of([100, 50], [{"s3"}, {"s1"}])
    todo = [PlannedShard(name, "train", (), size)
            for name, size in (("s1", 80), ("s2", 60), ("s3", 40))]
    assert [shard.name for shard in release_order(plan, todo, set())] == ["s3", "s1", "s2"]
