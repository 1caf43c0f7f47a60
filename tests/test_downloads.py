"""Downloads as AI Hub delivers them, read where they lie: pieces, download.tar, wrong-order
merges, truncated zips, multi-volume sets, nested zips and hostile members.

Every case is built from small zips in a temporary folder and converted in-process with
`shardify.cli.main`. Outputs are compared byte for byte with the conversion of the correctly
merged zips, or read back with `tarfile`/`webdataset` and compared with the bytes that went in.
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import shutil
import signal
import stat
import struct
import subprocess
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import inflate64
import pytest
import webdataset as wds
from helpers import (
    manifest_rows,
    output_files,
    read_shards,
    reject_rows,
    split_in_place,
    summary_of,
    write_pieces,
)
from PIL import Image

from shardify.archives.reader import inflate
from shardify.cli import main
from shardify.profiles.battery.sample import SynthResult, synthesize
from shardify.synth import ZIP_DEFLATED, ZIP_STORED, ZipEntry, write_zip

ZIP_TOOL = shutil.which("zip")
needs_zip_tool = pytest.mark.skipif(ZIP_TOOL is None, reason="Info-ZIP `zip` is not installed")
FLAG_ENCRYPTED = 0x1
FLAG_UTF8 = 0x800
METHOD_DEFLATE64 = 9
LOCAL = struct.Struct("<4s5H3L2H")
CENTRAL = struct.Struct("<4s6H3L5H2L")
EOCD = struct.Struct("<4s4H2LH")
DOS_DATE = 0x5721  # 2023-09-01


# --- building inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """An image and its label, paired by stem; `battery` goes into the label."""

    stem: str
    image: bytes
    label: bytes
    ext: str
    battery: int


def image_bytes(seed: str, ext: str = "jpg", side: int = 8) -> bytes:
    """A valid image with noise pixels seeded by `seed` (a noise PNG barely compresses)."""
    pixels = random.Random(seed).randbytes(side * side * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buffer, "PNG" if ext == "png" else "JPEG")
    return buffer.getvalue()


def make_pairs(count: int, tag: str, *, ext: str = "jpg", side: int = 8,
               first_battery: int = 101, batteries: int = 3) -> list[Pair]:
    """`count` pairs named like CT slices; `tag` keeps stems apart between sets."""
    pairs = []
    for i in range(count):
        battery = first_battery + i % batteries
        stem = f"CT_cell_pouch_{battery:03d}_{tag}_{i:03d}"
        label = {
            "data_info": {"data_type": "ct", "battery_ids": battery, "type": "cell",
                          "form": "pouch"},
            "swelling": {"swelling": False},
            "defects": None,
            "image_info": {"width": side, "height": side, "file_name": f"{stem}.{ext}",
                           "is_normal": True},
        }
        pairs.append(Pair(stem, image_bytes(stem, ext, side), json.dumps(label).encode(), ext,
                          battery))
    return pairs


def image_entries(pairs: list[Pair], folder: str = "img/",
                  method: int = ZIP_DEFLATED) -> list[ZipEntry]:
    return [ZipEntry(f"{folder}{p.stem}.{p.ext}", p.image, method) for p in pairs]


def label_entries(pairs: list[Pair], folder: str = "lbl/") -> list[ZipEntry]:
    return [ZipEntry(f"{folder}{p.stem}.json", p.label) for p in pairs]


def zip_bytes(entries: list[ZipEntry], tmp: Path) -> bytes:
    """The bytes `write_zip` produces for `entries` (for zips nested in zips or tars)."""
    scratch = tmp / ".scratch.zip"
    write_zip(scratch, entries)
    data = scratch.read_bytes()
    scratch.unlink()
    return data


def string_order(size: int, piece: int) -> list[int]:
    """Piece offsets in the order a string sort of `X.zip.part<offset>` names puts them."""
    return sorted(range(0, size, piece), key=str)


@dataclass(frozen=True)
class RawEntry:
    """A member written byte by byte, so its headers can say what zipfile never would.

    `payload` is stored as is (already compressed); `alias_of` makes a central directory entry
    with no data of its own, pointing at that member's local header.
    """

    name: str
    payload: bytes
    method: int
    crc: int
    size: int
    flags: int = FLAG_UTF8
    alias_of: str | None = None


def raw_zip(path: Path, entries: list[RawEntry]) -> None:
    body, central = bytearray(), bytearray()
    offsets: dict[str, int] = {}
    for entry in entries:
        name = entry.name.encode()
        if entry.alias_of is None:
            offsets[entry.name] = len(body)
            body += LOCAL.pack(b"PK\x03\x04", 20, entry.flags, entry.method, 0, DOS_DATE,
                               entry.crc, len(entry.payload), entry.size, len(name), 0)
            body += name + entry.payload
        central += CENTRAL.pack(b"PK\x01\x02", 20, 20, entry.flags, entry.method, 0, DOS_DATE,
                                entry.crc, len(entry.payload), entry.size, len(name), 0, 0, 0,
                                0, 0o644 << 16, offsets[entry.alias_of or entry.name])
        central += name
    count = len(entries)
    path.write_bytes(bytes(body + central)
                     + EOCD.pack(b"PK\x05\x06", 0, 0, count, count, len(central), len(body), 0))


def deflate64(data: bytes) -> bytes:
    deflater = inflate64.Deflater()
    return deflater.deflate(data) + deflater.flush()


def zipfile_reads(path: Path) -> bool:
    """Whether Python's zipfile reads every member (the "Bad magic number" check)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def synth_zips(root: Path) -> list[Path]:
    return sorted(root.rglob("*.zip"))


# --- running and reading back ------------------------------------------------------------------


def run_convert(out: Path, *sources: Path | str) -> int:
    return main(["convert", *map(str, sources), "--out", str(out), "--quiet"])


def run_scan(capsys: pytest.CaptureFixture[str], *sources: Path | str,
             as_json: bool = False) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["scan", *map(str, sources), *(["--json"] if as_json else [])])
    return code, capsys.readouterr().out


def delivered(out: Path) -> dict[str, bytes]:
    """The shards and the manifest: what must not depend on how the zips were delivered."""
    return output_files(out, "manifest.parquet")


def assert_samples(out: Path, pairs: list[Pair]) -> None:
    """Each pair is in the shards exactly as it went in: image, label JSON and class."""
    samples = read_shards(out)
    for pair in pairs:
        assert samples[pair.stem] == {pair.ext: pair.image, "json": pair.label, "cls": b"0"}


def reasons_by_member(out: Path) -> dict[str, str]:
    """Reject reason per member base name (archive-level rows under their archive's name)."""
    return {(r["source_member"] or r["source_archive"]).rsplit("/", 1)[-1]: r["reason"]
            for r in reject_rows(out)}


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under `root`: size, mtime (ns) and, for files, a CRC-32."""
    state = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        crc = zlib.crc32(path.read_bytes()) if path.is_file() else 0
        state[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns, crc)
    return state


class Hang(Exception):
    """Raised by `deadline`; not an OSError, so the CLI cannot turn it into an exit code."""


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging forever."""

    def expired(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- the synthetic dataset and its conversion from whole zips: the reference --------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    return synthesize(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def reference(synth: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Shards and manifest from the whole, correctly merged zips."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_convert(out, synth.root.parent) == 0
    files = delivered(out)
    assert len(files) > 1 and len(manifest_rows(out)) == synth.samples
    return files


def copy_synth(synth: SynthResult, tmp: Path) -> Path:
    """A copy of the synthetic tree, the same below the returned SOURCE (so archive names match).

    Archive names are relative to the SOURCE and so start with the dataset's long Korean folder.
    """
    source = tmp / "copy"
    shutil.copytree(synth.root, source / synth.root.name)
    return source


# --- 1. offset-named pieces --------------------------------------------------------------------


@pytest.mark.parametrize("piece", [1000, 777, 4096, 1 << 20])
def test_pieces_are_read_in_place_like_the_merged_zip(
    synth: SynthResult, reference: dict[str, bytes], tmp_path: Path, piece: int
) -> None:
    """Every zip as `X.zip.part<offset>` pieces (created shuffled; for small pieces string order
    is not numeric order) converts to the same shard and manifest bytes as the merged zips."""
    root = copy_synth(synth, tmp_path)
    sizes = {z.name: z.stat().st_size for z in synth_zips(root)}
    for number, zip_path in enumerate(synth_zips(root)):
        split_in_place(zip_path, piece, seed=number)
    assert not synth_zips(root)
    if piece < 5000:
        longest = max(sizes.values())
        assert longest // piece >= 11
        assert string_order(longest, piece) != list(range(0, longest, piece))

    out = tmp_path / "out"
    assert run_convert(out, root) == 0
    assert delivered(out) == reference
    kinds = {a["name"].rsplit("/", 1)[-1]: a["kind"] for a in summary_of(out)["archives"]}
    assert kinds == dict.fromkeys(sizes, "pieces")


def test_thousands_of_pieces_stay_within_the_open_file_limit(
    synth: SynthResult, reference: dict[str, bytes], tmp_path: Path
) -> None:
    """Small pieces mean many files: they are not all kept open (soft limit lowered to 256)."""
    root = copy_synth(synth, tmp_path)
    count = sum(split_in_place(z, 300, seed=i) for i, z in enumerate(synth_zips(root)))
    assert count > 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        code = run_convert(tmp_path / "out", root)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert code == 0
    assert delivered(tmp_path / "out") == reference


def test_one_piece_named_as_source_brings_its_whole_set(tmp_path: Path) -> None:
    """`shardify convert X.zip.part0` reads every piece of X.zip from that folder."""
    pairs = make_pairs(12, "p", side=16)
    src = tmp_path / "src"
    src.mkdir()
    write_zip(src / "images.zip", image_entries(pairs))
    write_pieces(zip_bytes(label_entries(pairs), tmp_path), src, "labels.zip", 1000)
    out = tmp_path / "out"
    assert run_convert(out, src / "images.zip", src / "labels.zip.part0") == 0
    assert_samples(out, pairs)
    assert reject_rows(out) == []


@pytest.mark.parametrize("broken", ["merge-cut-short", "last-piece-missing"])
def test_pieces_beside_their_merged_zip_the_complete_one_is_read(
    tmp_path: Path, broken: str
) -> None:
    """Pieces and a merged X.zip side by side: an interrupted merge (out of disk) loses to the
    pieces; pieces missing their last one (no gap to see) lose to the complete merge."""
    pairs = make_pairs(10, "m", side=32)
    whole = tmp_path / "whole"
    whole.mkdir()
    write_zip(whole / "images.zip", image_entries(pairs))
    write_zip(whole / "labels.zip", label_entries(pairs))
    src = tmp_path / "src"
    shutil.copytree(whole, src)
    data = (src / "images.zip").read_bytes()
    count = write_pieces(data, src, "images.zip", 2000)
    if broken == "merge-cut-short":
        (src / "images.zip").write_bytes(data[: len(data) // 2])
        kind, note = "pieces", "was not read"
    else:
        (src / f"images.zip.part{(count - 1) * 2000}").unlink()
        kind, note = "zip", "last piece(s) are missing"

    out, out_whole = tmp_path / "out", tmp_path / "out-whole"
    assert run_convert(out, src) == 0
    assert run_convert(out_whole, whole) == 0
    assert delivered(out) == delivered(out_whole)
    assert_samples(out, pairs)
    [archive] = [a for a in summary_of(out)["archives"] if a["name"] == "images.zip"]
    assert archive["kind"] == kind and note in " ".join(archive["notes"])


# --- 2. broken piece sets ----------------------------------------------------------------------


def broken_piece_set(src: Path, how: str, tmp: Path) -> tuple[list[Pair], list[Pair], str]:
    """A good set a_*.zip and a set whose b_images.zip pieces are broken `how`.

    Returns (good pairs, pairs lost with the broken archive, what the error must say).
    """
    good, lost = make_pairs(6, "a"), make_pairs(12, "b", first_battery=201)
    write_zip(src / "a_images.zip", image_entries(good))
    write_zip(src / "a_labels.zip", label_entries(good))
    write_zip(src / "b_labels.zip", label_entries(lost))
    data = zip_bytes(image_entries(lost), tmp)
    assert len(data) > 6000
    write_pieces(data, src, "b_images.zip", 1000)
    if how == "missing":
        (src / "b_images.zip.part3000").unlink()
        return good, lost, "missing piece at offset 3000"
    if how == "duplicate":  # the same offset written two ways, as a re-download may name it
        (src / "b_images.zip.part03000").write_bytes(data[3000:4000])
        return good, lost, "duplicate piece for offset 3000"
    (src / "b_images.zip.part3000").write_bytes(data[3000:4500])  # overlaps part4000
    return good, lost, "at offset 4000 overlaps"


@pytest.mark.parametrize("how", ["missing", "duplicate", "overlap"])
def test_broken_piece_set_is_a_bad_archive_and_the_rest_converts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """A missing, duplicated or overlapping piece: one `bad-archive` row naming the zip and the
    offset, and each of its members (with its label partner) rejected as unreadable rather than
    left to look like orphans; the scan shows the same; the other archives still convert."""
    src = tmp_path / "src"
    src.mkdir()
    good, lost, expected = broken_piece_set(src, how, tmp_path)
    out = tmp_path / "out"
    assert run_convert(out, src) == 0
    bad = [r for r in reject_rows(out) if r["reason"] == "bad-archive"]
    [archive_row] = [r for r in bad if not r["source_member"]]
    assert archive_row["source_archive"] == "b_images.zip"
    assert "b_images.zip" in archive_row["detail"] and expected in archive_row["detail"]
    member_rows = {(r["key"], r["source_archive"]) for r in bad if r["source_member"]}
    assert member_rows == {(p.stem, zip_name) for p in lost
                           for zip_name in ("b_images.zip", "b_labels.zip")}
    assert all(expected in r["detail"] for r in bad)
    assert_samples(out, good)
    assert {r["key"] for r in manifest_rows(out)} == {p.stem for p in good}
    assert not [r for r in reject_rows(out) if r["reason"].startswith("orphan")]
    [listed] = [a for a in summary_of(out)["archives"] if a["name"] == "b_images.zip"]
    assert listed["members"] == len(lost) and "broken" in listed["kind"]

    code, text = run_scan(capsys, src)
    assert code == 0
    assert "bad-archive" in text and expected in text


def test_broken_piece_set_delivered_twice_stays_broken(tmp_path: Path) -> None:
    """The same broken set under two SOURCE folders: the second copy (`#2`) is skipped as
    broken too, not read as if its pieces were contiguous."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    good, lost, expected = broken_piece_set(first, "missing", tmp_path)
    shutil.copytree(first, second)
    out = tmp_path / "out"
    assert run_convert(out, first, second) == 0
    archive_rows = [r for r in reject_rows(out) if not r["source_member"]]
    assert {(r["reason"], r["source_archive"]) for r in archive_rows} == {
        ("bad-archive", "b_images.zip"), ("bad-archive", "b_images.zip #2")}
    assert all(expected in r["detail"] for r in archive_rows)
    listed = {a["name"]: a["kind"] for a in summary_of(out)["archives"]}
    assert listed["b_images.zip"] == listed["b_images.zip #2"] == "pieces (broken)"
    assert {r["key"] for r in manifest_rows(out)} == {p.stem for p in good}
    assert not {p.stem for p in lost} & {r["key"] for r in manifest_rows(out)}


# --- 2b. folders: links, loops and entries that are not files --------------------------------


def test_linked_folders_are_followed_once_and_odd_entries_are_rejects(tmp_path: Path) -> None:
    """A link to a folder elsewhere is followed; a loop and a second way into a folder add
    nothing; a FIFO (never opened), a socket and a dangling link are each a `bad-archive` row."""
    pairs = make_pairs(6, "s")
    elsewhere, src = tmp_path / "elsewhere", tmp_path / "src"
    elsewhere.mkdir()
    (src / "real").mkdir(parents=True)
    write_zip(elsewhere / "labels.zip", label_entries(pairs))
    write_zip(src / "real" / "images.zip", image_entries(pairs))
    (src / "labels").symlink_to(elsewhere, target_is_directory=True)
    (src / "real" / "again").symlink_to(src / "real", target_is_directory=True)
    (src / "another").symlink_to(src / "real", target_is_directory=True)
    os.mkfifo(src / "stream.zip")
    os.mknod(src / "server.sock", stat.S_IFSOCK | 0o600)
    (src / "gone.zip").symlink_to(tmp_path / "nowhere.zip")
    out = tmp_path / "out"
    with deadline(60):
        assert run_convert(out, src) == 0
    assert_samples(out, pairs)
    assert {r["key"] for r in manifest_rows(out)} == {p.stem for p in pairs}
    assert sorted(a["name"] for a in summary_of(out)["archives"]) == ["labels/labels.zip",
                                                                   "real/images.zip"]
    bad = {r["source_archive"]: r["detail"] for r in reject_rows(out)
           if r["reason"] == "bad-archive"}
    assert len(reject_rows(out)) == len(bad) == 3
    assert "FIFO" in bad["stream.zip"] and "socket" in bad["server.sock"]
    assert "dangling" in bad["gone.zip"] and "nowhere.zip" in bad["gone.zip"]


def test_symlink_loop_as_source_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SOURCE that is a loop of links: one line naming it, exit 2, no OUT made."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    out = tmp_path / "out"
    for command in (["convert", str(tmp_path / "a"), "--out", str(out), "--quiet"],
                    ["scan", str(tmp_path / "a")]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "symbolic link loop" in err
    assert not out.exists()


# --- 3. download.tar ---------------------------------------------------------------------------


def build_download_tar(root: Path, tar_path: Path, *, twice: str | None = None) -> None:
    """A GNU tar of every zip under `root` (names relative to it): CT zips as shuffled 1000-byte
    pieces, the others whole. The pieces of `twice` are listed a second time at the end."""
    members: list[tuple[str, bytes]] = []
    for number, zip_path in enumerate(synth_zips(root)):
        name, data = zip_path.relative_to(root).as_posix(), zip_path.read_bytes()
        if "_CT_" not in name:
            members.append((name, data))
            continue
        offsets = list(range(0, len(data), 1000))
        random.Random(number).shuffle(offsets)
        members += [(f"{name}.part{o}", data[o : o + 1000]) for o in offsets]
    if twice:
        members += [(n, d) for n, d in members if n.startswith(f"{twice}.part")]
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("twice", [False, True], ids=["once", "piece-set-twice"])
def test_download_tar_is_read_in_place_like_the_merged_zips(
    synth: SynthResult, reference: dict[str, bytes], tmp_path: Path, twice: bool
) -> None:
    """Zips and pieces inside download.tar (GNU long names) convert to the same bytes as the
    merged zips, with nothing extracted beside the tar; a piece set listed twice works too."""
    top = synth.root.parent
    label_zip = next(z for z in synth_zips(top) if z.name == "TL_CT_Datasets_label.zip")
    twice_name = label_zip.relative_to(top).as_posix() if twice else None
    tar_dir = tmp_path / "download"
    tar_dir.mkdir()
    tar_path = tar_dir / "download.tar"
    build_download_tar(top, tar_path, twice=twice_name)
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    assert max(len(n.encode()) for n in names) > 100
    assert b"././@LongLink" in tar_path.read_bytes()
    if twice_name:
        assert len(names) > len(set(names))
    before = snapshot(tmp_path)

    out = tmp_path / "out"
    assert run_convert(out, tar_path if twice else tar_dir) == 0
    assert delivered(out) == reference
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before
    kinds = sorted({a["kind"] for a in summary_of(out)["archives"]})
    assert kinds == ["download.tar: pieces", "download.tar: zip"]


@pytest.mark.parametrize("where", ["in-member-data", "in-a-header", "between-members"])
def test_download_tar_cut_off_gives_what_it_holds(tmp_path: Path, where: str) -> None:
    """An interrupted (or still arriving) download.tar: the whole zip before the cut converts,
    the piece set cut short is read as a truncated zip, and the tar gets a `truncated` row."""
    pairs = make_pairs(8, "d", side=32)
    images = zip_bytes(image_entries(pairs), tmp_path)
    members = [("labels.zip", zip_bytes(label_entries(pairs), tmp_path))]
    members += [(f"images.zip.part{o}", images[o : o + 2000]) for o in range(0, len(images), 2000)]
    src = tmp_path / "src"
    src.mkdir()
    tar_path = src / "download.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tar_path) as tar:
        piece = tar.getmember("images.zip.part4000")
    cut, available = {"in-member-data": (piece.offset_data + 300, 4300),
                      "in-a-header": (piece.offset + 200, 4000),
                      "between-members": (piece.offset, 4000)}[where]
    tar_path.write_bytes(tar_path.read_bytes()[:cut])
    with zipfile.ZipFile(io.BytesIO(images)) as zf:
        starts = [info.header_offset for info in zf.infolist()] + [images.index(b"PK\x01\x02")]
    complete = [p for k, p in enumerate(pairs) if starts[k + 1] <= available]
    assert 0 < len(complete) < len(pairs)

    out = tmp_path / "out"
    assert run_convert(out, src) == 0
    assert_samples(out, complete)
    assert {r["key"] for r in manifest_rows(out)} == {p.stem for p in complete}
    rows = reject_rows(out)
    [tar_row] = [r for r in rows if r["source_archive"] == "download.tar"]
    assert tar_row["reason"] == "truncated" and "cut off" in tar_row["detail"]
    assert any(r["source_archive"] == "images.zip" and r["reason"] == "truncated" for r in rows)
    assert not any(r["source_archive"] == "labels.zip" and r["reason"] == "truncated"
                   and not r["key"] for r in rows)


HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>AI Hub</title></head><body><h1>403</h1>"
             b"<p>Your download permission has expired.</p></body></html>\n")


def test_html_page_saved_as_download_tar_alone_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error page where the tar should be, as the only source: one line, exit 2, no OUT."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "download.tar").write_bytes(HTML_PAGE)
    for command in (["convert", str(src), "--out", str(tmp_path / "out"), "--quiet"],
                    ["scan", str(src)]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert "download.tar" in err and "not a tar" in err and "web page" in err
    assert not (tmp_path / "out").exists()


def test_html_page_saved_as_download_tar_beside_good_zips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Beside good zips the page is a `bad-archive` row (and a scan problem); the rest converts."""
    src = tmp_path / "src"
    src.mkdir()
    pairs = make_pairs(4, "h")
    write_zip(src / "images.zip", image_entries(pairs))
    write_zip(src / "labels.zip", label_entries(pairs))
    (src / "download.tar").write_bytes(HTML_PAGE)
    out = tmp_path / "out"
    assert run_convert(out, src) == 0
    assert_samples(out, pairs)
    [bad] = reject_rows(out)
    assert (bad["reason"], bad["source_archive"]) == ("bad-archive", "download.tar")
    assert "web page" in bad["detail"]

    code, text = run_scan(capsys, src, as_json=True)
    assert code == 0
    report = json.loads(text)
    assert report["problems"] == {"bad-archive": 1}
    assert "web page" in report["problem_details"][0]["detail"]


# --- 4. zips merged in the wrong order ---------------------------------------------------------


def merge_in_string_order(zip_path: Path, piece: int) -> bool:
    """Rewrite the zip as `cat` of its pieces sorted as strings; True if that changed it."""
    data = zip_path.read_bytes()
    scrambled = b"".join(data[o : o + piece] for o in string_order(len(data), piece))
    zip_path.write_bytes(scrambled)
    return scrambled != data


def test_wrong_order_merge_is_detected_reported_and_read_right(
    synth: SynthResult, reference: dict[str, bytes], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Pieces of 1 KiB (a scaled-down 1 GiB) concatenated in string order: same output as the
    right merge, and summary notes and scan say "wrong order" and point at the .part files."""
    root = copy_synth(synth, tmp_path)
    scrambled = {z.name for z in synth_zips(root) if merge_in_string_order(z, 1024)}
    assert len(scrambled) >= 3
    for zip_path in synth_zips(root):
        assert zipfile_reads(zip_path) == (zip_path.name not in scrambled)

    out = tmp_path / "out"
    assert run_convert(out, root) == 0
    assert delivered(out) == reference
    noted = {}
    for archive in summary_of(out)["archives"]:
        notes = " ".join(archive["notes"])
        noted[archive["name"].rsplit("/", 1)[-1]] = "wrong order" in notes and ".part" in notes
    assert {name for name, flagged in noted.items() if flagged} == scrambled

    code, text = run_scan(capsys, root)
    assert code == 0
    assert text.count("wrong order") >= len(scrambled)


def test_pieces_beside_a_wrong_order_merge_are_used(
    synth: SynthResult, reference: dict[str, bytes], tmp_path: Path
) -> None:
    """With the pieces still beside the broken merge, the pieces are read (and that is noted)."""
    root = copy_synth(synth, tmp_path)
    for number, zip_path in enumerate(synth_zips(root)):
        data = zip_path.read_bytes()
        write_pieces(data, zip_path.parent, zip_path.name, 1024, seed=number)
        merge_in_string_order(zip_path, 1024)
    out = tmp_path / "out"
    assert run_convert(out, root) == 0
    assert delivered(out) == reference
    for archive in summary_of(out)["archives"]:
        assert archive["kind"] == "pieces"
        assert "was not read" in " ".join(archive["notes"])


def write_zip_of_size(path: Path, entries: list[ZipEntry], size: int) -> None:
    """A zip of exactly `size` bytes: `entries` and a stored filler member padding it."""
    write_zip(path, [*entries, ZipEntry("img/filler.bin", b"", ZIP_STORED)])
    padding = bytes(size - path.stat().st_size)
    write_zip(path, [*entries, ZipEntry("img/filler.bin", padding, ZIP_STORED)])
    assert path.stat().st_size == size


def test_wrong_order_merge_of_any_piece_size_is_read_right(tmp_path: Path) -> None:
    """Pieces of a size that is no power of two, merged in string order: found from the central
    directory's offsets and read in the right order."""
    pairs = make_pairs(8, "w", side=16)
    whole, src = tmp_path / "whole", tmp_path / "src"
    whole.mkdir()
    write_zip(whole / "labels.zip", label_entries(pairs))
    # 91 pieces of 1111 bytes: string order scrambles them but keeps part99990, the last, last
    piece, size = 1111, 99_990 + 1100
    write_zip_of_size(whole / "images.zip", image_entries(pairs), size)
    data = (whole / "images.zip").read_bytes()
    assert EOCD.unpack_from(data, data.rindex(b"PK\x05\x06"))[6] >= size - 1100
    assert string_order(size, piece)[-1] == 99_990
    shutil.copytree(whole, src)
    assert merge_in_string_order(src / "images.zip", piece)
    out, out_whole = tmp_path / "out", tmp_path / "out-whole"
    assert run_convert(out, src) == 0
    assert run_convert(out_whole, whole) == 0
    assert delivered(out) == delivered(out_whole)
    assert reject_rows(out) == []
    [notes] = [a["notes"] for a in summary_of(out)["archives"] if a["name"] == "images.zip"]
    assert f"pieces of {piece} bytes" in " ".join(notes) and ".part" in " ".join(notes)


def test_local_headers_not_where_the_directory_says_is_not_called_truncated(
    tmp_path: Path
) -> None:
    """A whole directory pointing at bytes that are not local headers (damage, or a merge in an
    order that cannot be undone): a `bad-archive` row saying so and what to do, not `truncated`."""
    pairs = make_pairs(12, "x", side=16)
    src = tmp_path / "src"
    src.mkdir()
    write_zip(src / "images.zip", image_entries(pairs))
    write_zip(src / "labels.zip", label_entries(pairs))
    data = bytearray((src / "images.zip").read_bytes())
    middle = len(data) // 2
    data[middle - 1500 : middle + 1500] = bytes(3000)
    (src / "images.zip").write_bytes(bytes(data))
    out = tmp_path / "out"
    assert run_convert(out, src) == 0
    [row] = [r for r in reject_rows(out) if not r["source_member"]]
    assert (row["reason"], row["source_archive"]) == ("bad-archive", "images.zip")
    assert "wrong order" in row["detail"] and "damaged" in row["detail"]
    assert ".part" in row["detail"] and "download it again" in row["detail"]
    assert not [r for r in reject_rows(out) if r["reason"] == "truncated"]


# --- 5. truncated zips -------------------------------------------------------------------------


CUTS = ["in-central-directory", "in-member-data", "after-a-member"]


@pytest.mark.parametrize("stream", [False, True], ids=["sizes-in-header", "data-descriptor"])
@pytest.mark.parametrize("cut", CUTS)
def test_truncated_zip_gives_every_complete_member(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: str, stream: bool
) -> None:
    """A zip cut short: complete members convert byte-exact, a member cut in half is a
    `truncated` reject with its label, and the lost tail (bytes, last member) is reported."""
    pairs = make_pairs(6, "t", side=32)
    src = tmp_path / "src"
    src.mkdir()
    images = src / "images.zip"
    write_zip(images, image_entries(pairs), stream=stream)
    write_zip(src / "labels.zip", label_entries(pairs))
    data = images.read_bytes()
    with zipfile.ZipFile(images) as zf:
        starts = [info.header_offset for info in zf.infolist()]
        assert all(bool(info.flag_bits & 0x8) == stream for info in zf.infolist())
    central = data.index(b"PK\x01\x02")
    starts.append(central)
    if cut == "in-central-directory":
        size, complete, half = central + 60, 6, None
    elif cut == "in-member-data":
        size, complete, half = starts[3] + 600, 3, 3
    else:
        size, complete, half = starts[4], 4, None
    images.write_bytes(data[:size])

    out = tmp_path / "out"
    assert run_convert(out, src) == 0
    assert_samples(out, pairs[:complete])
    assert {r["key"] for r in manifest_rows(out)} == {p.stem for p in pairs[:complete]}
    rows = reject_rows(out)
    [archive_row] = [r for r in rows if r["reason"] == "truncated" and not r["source_member"]]
    assert archive_row["source_archive"] == "images.zip"
    lost = size - starts[complete]
    last = f"img/{pairs[complete - 1].stem}.jpg"
    for text in (archive_row["detail"], " ".join(summary_of(out)["archives"][0]["notes"])):
        assert "truncated" in text and f"{lost} bytes" in text and last in text
    cut_rows = [r for r in rows if r["reason"] == "truncated" and r["source_member"]]
    if half is None:
        assert cut_rows == []
    else:
        assert sorted(r["source_member"] for r in cut_rows) == [
            f"img/{pairs[half].stem}.jpg", f"lbl/{pairs[half].stem}.json"]
    orphans = {r["key"] for r in rows if r["reason"] == "orphan-label"}
    assert orphans == {p.stem for p in pairs[complete + (half is not None):]}

    code, text = run_scan(capsys, src)
    assert code == 0
    assert f"{lost} bytes" in text and last in text


# --- 6. multi-volume zips ----------------------------------------------------------------------


def spanned_zip(tmp: Path, pairs: list[Pair]) -> tuple[Path, Path]:
    """images.z01, .z02, ..., images.zip made by `zip -s 64k`, and the same files as one zip."""
    stage = tmp / "stage"
    (stage / "img").mkdir(parents=True)
    for pair in pairs:
        (stage / "img" / f"{pair.stem}.{pair.ext}").write_bytes(pair.image)
    spanned, whole = tmp / "spanned", tmp / "whole"
    for folder, split in ((spanned, ["-s", "64k"]), (whole, [])):
        folder.mkdir()
        subprocess.run([str(ZIP_TOOL), "-q", "-X", "-r", *split, str(folder / "images.zip"),
                        "img"], cwd=stage, check=True)
        write_zip(folder / "labels.zip", label_entries(pairs))
    return spanned, whole


@needs_zip_tool
def test_multi_volume_zip_reads_as_one_archive(tmp_path: Path) -> None:
    """`zip -s 64k` volumes convert like the same files zipped whole, byte for byte."""
    pairs = make_pairs(8, "v", ext="png", side=128)
    spanned, whole = spanned_zip(tmp_path, pairs)
    volumes = sorted(p.name for p in spanned.glob("images.z*"))
    assert len(volumes) >= 5 and volumes[0] == "images.z01" and volumes[-1] == "images.zip"

    out, out_whole = tmp_path / "out", tmp_path / "out-whole"
    assert run_convert(out, spanned) == 0
    assert run_convert(out_whole, whole) == 0
    assert_samples(out, pairs)
    assert delivered(out) == delivered(out_whole)
    kinds = {a["name"]: a["kind"] for a in summary_of(out)["archives"]}
    assert kinds == {"images.zip": "volumes", "labels.zip": "zip"}
    assert reject_rows(out) == []


@needs_zip_tool
@pytest.mark.parametrize("gone", ["first", "middle", "last-numbered", "final-zip"])
def test_multi_volume_zip_missing_a_volume_is_a_bad_archive(tmp_path: Path, gone: str) -> None:
    """Any missing volume (.z01, one in the middle, the last .zNN, or the .zip) is a clear
    `bad-archive` naming it; nothing is recovered from the mismatched bytes."""
    pairs = make_pairs(8, "v", ext="png", side=128)
    spanned, _ = spanned_zip(tmp_path, pairs)
    numbered = sorted(spanned.glob("images.z[0-9]*"))
    victim = {"first": numbered[0], "middle": numbered[len(numbered) // 2],
              "last-numbered": numbered[-1], "final-zip": spanned / "images.zip"}[gone]
    victim.unlink()

    out = tmp_path / "out"
    assert run_convert(out, spanned) == 0
    bad = [r for r in reject_rows(out) if r["source_archive"] == "images.zip"]
    assert [r["reason"] for r in bad] == ["bad-archive"]
    missing = victim.name if gone == "final-zip" else victim.suffix
    assert missing in bad[0]["detail"] and "missing" in bad[0]["detail"]
    assert manifest_rows(out) == []
    assert {r["reason"] for r in reject_rows(out)} == {"bad-archive", "orphan-label"}


# --- 7. nested zips ----------------------------------------------------------------------------


def test_nested_zips_are_descended_into_and_pair_across(tmp_path: Path) -> None:
    """A label zip of zips (stored, deflated, and a stored zip inside a deflated one) and an
    image zip holding a stored zip: every member is found and pairs across archives."""
    pairs = make_pairs(12, "n")
    src = tmp_path / "src"
    src.mkdir()
    direct, nested_images = pairs[:8], pairs[8:]
    inner_images = zip_bytes(image_entries(nested_images, "more/"), tmp_path)
    write_zip(src / "images.zip", [*image_entries(direct),
                                   ZipEntry("img/more.zip", inner_images, ZIP_STORED)])
    stored = zip_bytes(label_entries(pairs[:4], "a/"), tmp_path)
    deflated = zip_bytes(label_entries(pairs[4:8], "b/"), tmp_path)
    deepest = zip_bytes(label_entries(pairs[8:]), tmp_path)
    middle = zip_bytes([ZipEntry("deeper/c.zip", deepest, ZIP_STORED)], tmp_path)
    write_zip(src / "labels.zip", [ZipEntry("x/a.zip", stored, ZIP_STORED),
                                   ZipEntry("x/b.zip", deflated, ZIP_DEFLATED),
                                   ZipEntry("deep.zip", middle, ZIP_DEFLATED)])
    out = tmp_path / "out"
    assert run_convert(out, src) == 0
    assert reject_rows(out) == []
    assert_samples(out, pairs)
    where = {r["key"]: (r["source_archive"], r["label_archive"]) for r in manifest_rows(out)}
    assert where[pairs[0].stem] == ("images.zip", "labels.zip/x/a.zip")
    assert where[pairs[5].stem] == ("images.zip", "labels.zip/x/b.zip")
    assert where[pairs[9].stem] == ("images.zip/img/more.zip", "labels.zip/deep.zip/deeper/c.zip")
    kinds = {a["name"]: a["kind"] for a in summary_of(out)["archives"]}
    assert kinds["labels.zip/x/a.zip"] == "nested zip"
    assert kinds["labels.zip/x/b.zip"] == "nested zip (deflated)"
    assert kinds["images.zip/img/more.zip"] == "nested zip"


# --- 8. hostile members ------------------------------------------------------------------------


def test_hostile_members_become_rejects_and_the_run_goes_on(tmp_path: Path) -> None:
    """Bombs (by ratio and by declared size), overlapping entries, bzip2, LZMA and encrypted
    members are rejected with the right reason, without hanging; a Deflate64 member is read."""
    names = ["ok", "zeros", "declared", "overlap1", "overlap2", "bzip2", "lzma", "encrypted",
             "deflate64", "lying64"]
    pairs = {name: p for name, p in zip(names, make_pairs(len(names), "h"), strict=True)}
    src = tmp_path / "src"
    src.mkdir()
    write_zip(src / "labels.zip", label_entries(list(pairs.values())))

    def member(name: str) -> str:
        return f"img/{pairs[name].stem}.jpg"

    write_zip(src / "images.zip", [
        ZipEntry(member("ok"), pairs["ok"].image),
        ZipEntry(member("zeros"), bytes(50_000_000)),  # ~1000:1
        ZipEntry(member("bzip2"), pairs["bzip2"].image, zipfile.ZIP_BZIP2),
        ZipEntry(member("lzma"), pairs["lzma"].image, zipfile.ZIP_LZMA),
    ])
    image = pairs["deflate64"].image
    lying = deflate64(bytes(20_000_000))
    victim = pairs["overlap1"].image
    raw_zip(src / "raw.zip", [
        RawEntry(member("deflate64"), deflate64(image), METHOD_DEFLATE64, zlib.crc32(image),
                 len(image)),
        RawEntry(member("lying64"), lying, METHOD_DEFLATE64, 0, 5000),
        RawEntry(member("declared"), b"\x03\x00", ZIP_DEFLATED, 0, 0xFFFFFFF0),
        RawEntry(member("overlap1"), victim, ZIP_STORED, zlib.crc32(victim), len(victim)),
        RawEntry(member("overlap2"), victim, ZIP_STORED, zlib.crc32(victim), len(victim),
                 alias_of=member("overlap1")),
        RawEntry(member("encrypted"), pairs["encrypted"].image, ZIP_STORED,
                 zlib.crc32(pairs["encrypted"].image), len(pairs["encrypted"].image),
                 flags=FLAG_UTF8 | FLAG_ENCRYPTED),
    ])
    with zipfile.ZipFile(src / "raw.zip") as zf:  # the hand-made zip is a zip
        assert zf.read(member("overlap1")) == victim

    out = tmp_path / "out"
    with deadline(60):
        assert run_convert(out, src) == 0
    assert_samples(out, [pairs["ok"], pairs["deflate64"]])
    assert {r["key"] for r in manifest_rows(out)} == {pairs["ok"].stem, pairs["deflate64"].stem}
    expected = {"zeros": "bomb", "declared": "bomb", "overlap1": "overlap",
                "overlap2": "overlap", "bzip2": "unsupported-method",
                "lzma": "unsupported-method", "encrypted": "unsupported-method",
                "lying64": "bad-crc"}
    got: dict[str, set[str]] = {}
    for row in reject_rows(out):
        got.setdefault(row["key"], set()).add(f"{row['reason']} {row['source_archive']}")
    for name, reason in expected.items():
        image_zip = "raw.zip" if name in ("declared", "overlap1", "overlap2", "encrypted",
                                          "lying64") else "images.zip"
        assert got.pop(pairs[name].stem) == {f"{reason} {image_zip}", f"{reason} labels.zip"}
    assert got == {}


def test_member_declaring_a_huge_compressed_size_is_not_read(tmp_path: Path) -> None:
    """A 1.1 GiB (sparse) zip whose one entry claims 1.1 GiB of deflate data for 100 bytes is a
    `bomb`: the reader never allocates what a lying header asks for."""
    pairs = make_pairs(2, "s")
    src = tmp_path / "src"
    src.mkdir()
    write_zip(src / "labels.zip", label_entries(pairs))
    write_zip(src / "images.zip", image_entries(pairs[:1]))
    name = f"img/{pairs[1].stem}.jpg".encode()
    csize = (1 << 30) + (100 << 20)
    header = LOCAL.pack(b"PK\x03\x04", 20, FLAG_UTF8, ZIP_DEFLATED, 0, DOS_DATE, 0, csize, 100,
                        len(name), 0) + name
    central = CENTRAL.pack(b"PK\x01\x02", 20, 20, FLAG_UTF8, ZIP_DEFLATED, 0, DOS_DATE, 0, csize,
                           100, len(name), 0, 0, 0, 0, 0o644 << 16, 0) + name
    with open(src / "huge.zip", "wb") as handle:
        handle.write(header)
        handle.seek(len(header) + csize)
        handle.write(central + EOCD.pack(b"PK\x05\x06", 0, 0, 1, 1, len(central),
                                         len(header) + csize, 0))
    if (src / "huge.zip").stat().st_blocks * 512 > 1 << 24:
        pytest.skip("the temporary folder does not keep files sparse")
    out = tmp_path / "out"
    with deadline(30):
        assert run_convert(out, src) == 0
    assert_samples(out, pairs[:1])
    assert reasons_by_member(out) == {f"{pairs[1].stem}.jpg": "bomb",
                                      f"{pairs[1].stem}.json": "bomb"}


def test_lying_deflate64_member_inflates_only_a_bounded_amount() -> None:
    """Deflate64 has no output limit of its own: a member that inflates to 100 MB while
    declaring 1000 bytes stops early instead of producing it all."""
    raw = deflate64(bytes(100_000_000))
    assert len(raw) < 10_000
    assert len(inflate(raw, METHOD_DEFLATE64, 1000)) < 64 << 20
    image = image_bytes("d64", "png", 64)
    assert inflate(deflate64(image), METHOD_DEFLATE64, len(image)) == image


# --- 9 and 10. scan on a mix; sources are only read -------------------------------------------


@dataclass(frozen=True)
class Mix:
    root: Path
    src: Path
    pairs: list[Pair]


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> Mix:
    """One folder with every delivery: a plain zip, pieces, a download.tar holding a zip and
    pieces, a multi-volume set (if `zip` exists), nested zips, and a broken piece set."""
    root = tmp_path_factory.mktemp("mix")
    src = root / "src"
    src.mkdir()
    a, b, c = make_pairs(6, "a"), make_pairs(14, "b", first_battery=111), make_pairs(
        6, "c", ext="png", side=128, first_battery=121)
    write_zip(src / "a_images.zip", image_entries(a))
    write_pieces(zip_bytes(label_entries(a), root), src, "a_labels.zip", 1000)
    members = [("b_images.zip", zip_bytes(image_entries(b), root))]
    labels = zip_bytes(label_entries(b), root)
    members += [(f"b_labels.zip.part{o}", labels[o : o + 1000]) for o in range(0, len(labels),
                                                                              1000)]
    with tarfile.open(src / "download.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pairs = a + b
    if ZIP_TOOL is not None:
        stage = root / "stage"
        (stage / "img").mkdir(parents=True)
        for pair in c:
            (stage / "img" / f"{pair.stem}.png").write_bytes(pair.image)
        subprocess.run([ZIP_TOOL, "-q", "-X", "-r", "-s", "64k", str(src / "c_images.zip"),
                        "img"], cwd=stage, check=True)
        shutil.rmtree(stage)
        inner = zip_bytes(label_entries(c), root)
        write_zip(src / "c_labels.zip", [ZipEntry("nested/c.zip", inner, ZIP_DEFLATED)])
        pairs += c
    broken = zip_bytes(label_entries(make_pairs(40, "x")), root)
    write_pieces(broken, src, "x_labels.zip", 1000)
    (src / "x_labels.zip.part2000").unlink()
    return Mix(root, src, pairs)


def test_scan_shows_every_kind_of_delivery_and_writes_nothing(
    mix: Mix, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`scan` lists each archive with its kind and counts, pairs, batteries, problems and the
    estimated size, as text and as JSON; nothing is written anywhere under the folder."""
    monkeypatch.chdir(mix.root)
    before = snapshot(mix.root)
    code, text = run_scan(capsys, mix.src)
    assert code == 0
    code, raw = run_scan(capsys, mix.src, as_json=True)
    assert code == 0
    assert snapshot(mix.root) == before

    report = json.loads(raw)
    rows = {row["name"]: row for row in report["archives"]}
    expected = {"a_images.zip": ("zip", 6, 0), "a_labels.zip": ("pieces", 0, 6),
                "b_images.zip": ("download.tar: zip", 14, 0),
                "b_labels.zip": ("download.tar: pieces", 0, 14),
                "x_labels.zip": ("pieces (broken)", 0, 40)}
    if ZIP_TOOL is not None:
        expected |= {"c_images.zip": ("volumes", 6, 0), "c_labels.zip": ("zip", 0, 0),
                     "c_labels.zip/nested/c.zip": ("nested zip (deflated)", 0, 6)}
    assert {n: (r["kind"], r["images"], r["labels"]) for n, r in rows.items()} == expected
    for name, row in rows.items():
        folders = 1 if name == "c_images.zip" else 0  # `zip -r` stores the img/ folder
        assert row["members"] == row["images"] + row["labels"] + row["other"] + folders
        assert row["bytes"] > 0
    assert report["pairs"] == report["images"] == len(mix.pairs)
    assert report["labels"] == len(mix.pairs) + 40  # the broken set's members are listed
    assert report["dataset"]["batteries"] == {"ct": len({p.battery for p in mix.pairs})}
    assert report["problems"] == {"bad-archive": 41}
    [problem] = [p for p in report["problem_details"] if not p["member"]]
    assert problem["archive"] == "x_labels.zip" and "offset 2000" in problem["detail"]
    assert report["estimated_output_bytes"] > sum(len(p.image) for p in mix.pairs)

    for name, (kind, images, labels) in expected.items():
        assert f"  {name}\n      {kind}, " in text
        assert f"{rows[name]['members']} members: {images} images, {labels} labels" in text
    assert f"pairs {len(mix.pairs)}" in text
    assert f"batteries: ct {report['dataset']['batteries']['ct']}" in text
    assert "bad-archive: x_labels.zip" in text and "offset 2000" in text
    assert "estimated output:" in text


def test_convert_of_the_mix_reads_sources_only_and_matches_scan(
    mix: Mix, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After converting every kind of delivery, no file or folder under the sources changed
    (sizes, mtimes, contents); every pair is in the shards (read with webdataset too) and
    scan's size estimate matches the shards written."""
    before = snapshot(mix.root)
    out = tmp_path / "out"
    assert run_convert(out, mix.src) == 0
    assert snapshot(mix.root) == before
    assert_samples(out, mix.pairs)
    shards = sorted(out.glob("*/shard-*.tar"))
    seen = {}
    for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False):
        seen[sample["__key__"]] = sample
    by_stem = {p.stem: p for p in mix.pairs}
    assert set(seen) == set(by_stem)
    for key, sample in seen.items():
        assert sample[by_stem[key].ext] == by_stem[key].image
    _, raw = run_scan(capsys, mix.src, as_json=True)
    estimate = json.loads(raw)["estimated_output_bytes"]
    written = sum(s.stat().st_size for s in shards)
    assert estimate - 3 * 1024 == written - len(shards) * 1024

