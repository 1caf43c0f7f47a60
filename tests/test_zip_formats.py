"""Zip variants met in AI Hub downloads: each must convert byte-exact, or be rejected cleanly.

Every test builds small zips, runs `shardify convert` in-process, and reads the result back with
`tarfile` and `pyarrow.parquet` only, comparing shard members with the bytes that went in.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import struct
import subprocess
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from helpers import read_shards
from PIL import Image

from shardify.archives.discovery import find_archives
from shardify.archives.reader import ArchiveReader
from shardify.archives.zipdir import list_members
from shardify.cli import main
from shardify.synth import ZIP_DEFLATED, ZIP_STORED, ZipEntry, write_zip

SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,80}")
REJECT_COLUMNS = ["key", "reason", "source_archive", "source_member", "detail"]
ZIP_TOOL = shutil.which("zip")
needs_zip_tool = pytest.mark.skipif(ZIP_TOOL is None, reason="Info-ZIP `zip` is not installed")
FLAG_ENCRYPTED = 0x1
FLAG_DATA_DESCRIPTOR = 0x8
FLAG_UTF8 = 0x800
ZIP64_FILLER = 66_000  # more members than the 16-bit EOCD count can hold
PREFIX = b"\x7fELF" + bytes(996)  # 1000 bytes, like a self-extractor stub before the zip


def image_bytes(name: str) -> bytes:
    """A valid 8x8 JPEG, or PNG if `name` ends in .png (any case), with pixels seeded by `name`."""
    kind = "PNG" if name.lower().endswith(".png") else "JPEG"
    pixels = random.Random(name).randbytes(8 * 8 * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (8, 8), pixels).save(buffer, kind)
    return buffer.getvalue()


def label_bytes(file_name: str, data_type: str = "ct", battery_id: int = 101) -> bytes:
    """A minimal label the converter accepts, for a normal image."""
    label = {
        "data_info": {"data_type": data_type, "battery_ids": battery_id, "type": "cell",
                      "form": "pouch"},
        "swelling": {"swelling": False},
        "defects": None,
        "image_info": {"width": 8, "height": 8, "file_name": file_name, "is_normal": True},
    }
    return json.dumps(label, ensure_ascii=False).encode()


def image_entry(name: str, method: int = ZIP_DEFLATED, encoding: str = "utf-8") -> ZipEntry:
    """A zip member `name` holding a valid image of the kind its extension names."""
    return ZipEntry(name, image_bytes(name), method, encoding)


def label_entry(name: str, method: int = ZIP_DEFLATED, encoding: str = "utf-8",
                data_type: str = "ct", battery_id: int = 101) -> ZipEntry:
    """A zip member `name` holding a valid label whose file_name is the member's base name."""
    base = name.rsplit("/", 1)[-1]
    return ZipEntry(name, label_bytes(base, data_type, battery_id), method, encoding)


@dataclass
class Output:
    """What one `shardify convert` run produced, read back independently of shardify."""

    exit_code: int
    samples: dict[str, dict[str, bytes]]  # key -> tar member extension -> payload
    manifest: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    summary: dict[str, Any]

    def row(self, source_member: str) -> dict[str, Any]:
        (row,) = (r for r in self.manifest if r["source_member"] == source_member)
        return row


def convert(out: Path, *sources: Path, strict: bool = False) -> Output:
    """Run `shardify convert` in-process and read every output file back."""
    argv = ["convert", *map(str, sources), "--out", str(out), "--quiet"]
    exit_code = main([*argv, "--strict"] if strict else argv)
    assert exit_code in (0, 1), f"convert stopped with exit code {exit_code}"
    samples = read_shards(out)
    rejects = pq.read_table(out / "rejects.parquet")
    assert rejects.column_names == REJECT_COLUMNS
    return Output(
        exit_code,
        samples,
        pq.read_table(out / "manifest.parquet").to_pylist(),
        rejects.to_pylist(),
        json.loads((out / "summary.json").read_text()),
    )


def assert_sample(output: Output, key: str, image: ZipEntry, label: ZipEntry, ext: str) -> None:
    """The shard holds exactly image, label and class 0 under `key`, bytes as in the zips."""
    assert output.samples[key] == {ext: image.data, "json": label.data, "cls": b"0"}


def run_zip_tool(folder: Path, names: list[str], *options: str) -> bytes:
    """The archive Info-ZIP `zip` writes to a pipe, as `zip - files > out.zip` does."""
    assert ZIP_TOOL is not None
    done = subprocess.run([ZIP_TOOL, "-q", *options, "-", *names], cwd=folder,
                          stdout=subprocess.PIPE, check=True)
    return done.stdout


def write_files(folder: Path, entries: list[ZipEntry]) -> list[str]:
    """Write entries as files under `folder` (for the `zip` tool); return their names."""
    for entry in entries:
        path = folder / entry.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(entry.data)
    return [entry.name for entry in entries]


def with_raw_name(path: Path, placeholder: str, raw: bytes) -> None:
    """Replace `placeholder` (ASCII, in one member's name) by raw name bytes of the same length."""
    data = path.read_bytes()
    assert len(raw) == len(placeholder)
    assert data.count(placeholder.encode()) == 2  # local header + central directory
    path.write_bytes(data.replace(placeholder.encode(), raw))


def listing(path: Path) -> list[tuple[str, int, int, int, int, int]]:
    """(name, header offset, sizes, CRC, method) of every member, as zipfile sees them."""
    with zipfile.ZipFile(path) as archive:
        return [(i.filename, i.header_offset, i.compress_size, i.file_size, i.CRC,
                 i.compress_type) for i in archive.infolist()]


def member_listing(path: Path) -> list[tuple[str, int, int, int, int, int]]:
    """The same facts as `listing`, from shardify's own central-directory parser."""
    (archive,) = find_archives([str(path)]).archives
    with ArchiveReader() as reader:
        _, table = list_members(archive, reader)
    return [(m.name, m.header_offset, m.compressed_size, m.file_size, m.crc32, m.method)
            for m in table.members()]


@dataclass(frozen=True)
class Zip64Set:
    """A Zip64 image zip, its label zip, and the members that must come out of them."""

    images_zip: Path
    labels_zip: Path
    images: list[ZipEntry]
    labels: list[ZipEntry]


@pytest.fixture(scope="module")
def zip64_set(tmp_path_factory: pytest.TempPathFactory) -> Zip64Set:
    """An image zip with 66,003 members (one image first, two after the filler) and its labels."""
    folder = tmp_path_factory.mktemp("zip64")
    stems = [f"CT_cell_pouch_101_x_{n:03d}" for n in (1, 2, 3)]
    images = [image_entry(f"CT/{stem}.jpg", ZIP_STORED) for stem in stems]
    labels = [label_entry(f"labels/{stem}.json") for stem in stems]
    filler = (ZipEntry(f"filler/{n:05d}.txt", b"", ZIP_STORED) for n in range(ZIP64_FILLER))
    write_zip(folder / "images.zip", [images[0], *filler, *images[1:]])
    write_zip(folder / "labels.zip", labels)
    return Zip64Set(folder / "images.zip", folder / "labels.zip", images, labels)


def test_zip64_archive_with_more_than_65535_members(zip64_set: Zip64Set, tmp_path: Path) -> None:
    """The member count past 65,535 lives only in the Zip64 EOCD record: every member is listed
    at zipfile's offsets, and images placed after member 65,535 convert byte-identical."""
    data = zip64_set.images_zip.read_bytes()
    eocd = data.rfind(b"PK\x05\x06")
    assert struct.unpack_from("<H", data, eocd + 10)[0] == 0xFFFF  # 16-bit count saturated
    assert data[eocd - 20 : eocd - 16] == b"PK\x06\x07"  # Zip64 locator
    assert data[eocd - 76 : eocd - 72] == b"PK\x06\x06"  # Zip64 EOCD record

    expected = listing(zip64_set.images_zip)
    assert len(expected) == ZIP64_FILLER + 3
    assert member_listing(zip64_set.images_zip) == expected

    output = convert(tmp_path / "out", zip64_set.images_zip, zip64_set.labels_zip, strict=True)
    assert output.exit_code == 0
    assert output.rejects == []
    assert output.summary["other_files"] == {".txt": ZIP64_FILLER}
    assert sorted(output.samples) == [f"CT_cell_pouch_101_x_{n:03d}" for n in (1, 2, 3)]
    for image, label in zip(zip64_set.images, zip64_set.labels, strict=True):
        key = image.name.removeprefix("CT/").removesuffix(".jpg")
        assert_sample(output, key, image, label, "jpg")


MakeZips = Callable[[Path, list[ZipEntry], list[ZipEntry]], None]


def streamed_by_zip_tool(folder: Path, images: list[ZipEntry], labels: list[ZipEntry]) -> None:
    """images.zip and labels.zip in `folder`, as `zip - files > x.zip` writes them."""
    stage = folder.parent / "stage"
    (folder / "images.zip").write_bytes(run_zip_tool(stage, write_files(stage, images)))
    (folder / "labels.zip").write_bytes(run_zip_tool(stage, write_files(stage, labels)))


def streamed_by_write_zip(folder: Path, images: list[ZipEntry], labels: list[ZipEntry]) -> None:
    """images.zip and labels.zip in `folder`, as zipfile writes them to an unseekable file."""
    write_zip(folder / "images.zip", images, stream=True)
    write_zip(folder / "labels.zip", labels, stream=True)


@pytest.mark.parametrize(
    "make_zips",
    [pytest.param(streamed_by_zip_tool, marks=needs_zip_tool), streamed_by_write_zip],
    ids=["zip-to-stdout", "write_zip-stream"],
)
def test_data_descriptors(make_zips: MakeZips, tmp_path: Path) -> None:
    """Zips written to a pipe carry sizes and CRCs after the data (flag bit 3), not in the local
    header: members are still read from the central directory and come out byte-identical."""
    images = [image_entry("TS/CT_cell_pouch_101_x_001.jpg"),
              image_entry("TS/CT_cell_pouch_101_x_002.jpg", ZIP_STORED),
              image_entry("TS/RGB_cell_pouch_0001_001.png")]
    labels = [label_entry("TL/CT_cell_pouch_101_x_001.json", ZIP_STORED),
              label_entry("TL/CT_cell_pouch_101_x_002.json"),
              label_entry("TL/RGB_cell_pouch_0001_001.json", data_type="rgb", battery_id=1)]
    source = tmp_path / "source"
    source.mkdir()
    make_zips(source, images, labels)
    for path in source.glob("*.zip"):
        with zipfile.ZipFile(path) as archive:
            assert all(i.flag_bits & FLAG_DATA_DESCRIPTOR for i in archive.infolist()), path

    output = convert(tmp_path / "out", source, strict=True)
    assert output.exit_code == 0
    assert output.rejects == []
    assert_sample(output, "CT_cell_pouch_101_x_001", images[0], labels[0], "jpg")
    assert_sample(output, "CT_cell_pouch_101_x_002", images[1], labels[1], "jpg")
    assert_sample(output, "RGB_cell_pouch_0001_001", images[2], labels[2], "png")


def test_member_name_encodings(tmp_path: Path) -> None:
    """CP949 without the UTF-8 flag, UTF-8 with it, NFD, `\\` separators and bytes that are not
    CP949 (read as CP437) all decode to names that pair across zips; the manifest shows the real
    (NFC) names and non-ASCII stems get safe, deterministic, distinct keys."""
    cp949 = "배터리/RGB_배터리_0003_001.png"
    utf8 = "외관/RGB_외관_0003_002.png"
    nfd = unicodedata.normalize("NFD", "맥/RGB_배터리_0003_003.png")
    backslash = "folder\\CT_cell_pouch_101_x_006.jpg"
    not_cp949 = b"\x80\xff" * 3
    placeholder = "QzQzQz"
    rgb = {"data_type": "rgb", "battery_id": 3}
    images = [image_entry(cp949, encoding="cp949"), image_entry(utf8), image_entry(nfd),
              image_entry(backslash), image_entry(f"odd/CT_cell_pouch_101_x_{placeholder}.jpg")]
    labels = [label_entry("라벨/RGB_배터리_0003_001.json", **rgb),
              label_entry("라벨/RGB_외관_0003_002.json", encoding="cp949", **rgb),
              label_entry("라벨/RGB_배터리_0003_003.json", **rgb),
              label_entry("labels/CT/CT_cell_pouch_101_x_006.json"),
              ZipEntry(f"labels/CT_cell_pouch_101_x_{placeholder}.json", label_bytes("odd.jpg"))]
    source = tmp_path / "source"
    source.mkdir()
    for name, entries in (("images.zip", images), ("labels.zip", labels)):
        write_zip(source / name, entries)
        with_raw_name(source / name, placeholder, not_cp949)
    with pytest.raises(UnicodeDecodeError):
        not_cp949.decode("cp949")
    with zipfile.ZipFile(source / "images.zip") as archive:
        flags = [i.flag_bits & FLAG_UTF8 for i in archive.infolist()]
    assert flags == [0, FLAG_UTF8, FLAG_UTF8, 0, 0]

    output = convert(tmp_path / "out", source, strict=True)
    assert output.exit_code == 0
    assert output.rejects == []
    odd_name = f"odd/CT_cell_pouch_101_x_{not_cp949.decode('cp437')}.jpg"
    nfc = unicodedata.normalize("NFC", nfd)
    sources = [cp949, utf8, nfc, "folder/CT_cell_pouch_101_x_006.jpg", odd_name]
    assert sorted(r["source_member"] for r in output.manifest) == sorted(sources)
    keys = [output.row(name)["key"] for name in sources]
    assert keys[3] == "CT_cell_pouch_101_x_006"
    assert len(set(keys)) == len(keys)
    for key, image, label in zip(keys, images, labels, strict=True):
        assert SAFE_KEY.fullmatch(key), key
        assert_sample(output, key, image, label, image.name[-3:])
    again = convert(tmp_path / "again", source)
    assert [again.row(name)["key"] for name in sources] == keys


def test_utf8_names_without_utf8_flag(tmp_path: Path) -> None:
    """macOS Archive Utility and Info-ZIP `zip` on Linux write UTF-8 names (NFD on macOS) without
    flag bit 11; such an image should pair with its CP949-named label and show its real name."""
    stem = "RGB_배터리_0003_001"
    raw = unicodedata.normalize("NFD", f"배터리/{stem}").encode()
    placeholder = "Q" * len(raw)
    source = tmp_path / "source"
    source.mkdir()
    write_zip(source / "images.zip", [image_entry(f"{placeholder}.png")])
    with_raw_name(source / "images.zip", placeholder, raw)
    write_zip(source / "labels.zip",
              [label_entry(f"{stem}.json", encoding="cp949", data_type="rgb", battery_id=3)])
    with zipfile.ZipFile(source / "images.zip") as archive:
        assert not archive.infolist()[0].flag_bits & FLAG_UTF8

    output = convert(tmp_path / "out", source)
    assert output.rejects == []
    assert [r["source_member"] for r in output.manifest] == [f"배터리/{stem}.png"]


@pytest.mark.parametrize("zip64", [False, True], ids=["plain", "zip64"])
def test_bytes_prepended_to_zip(zip64: bool, zip64_set: Zip64Set, tmp_path: Path) -> None:
    """1000 bytes before the zip (self-extractor stub) shift every offset alike: the parser finds
    the shift, member offsets are the unprefixed ones + 1000, and samples are byte-identical."""
    source = tmp_path / "source"
    source.mkdir()
    if zip64:
        plain = zip64_set.images_zip
        images, labels = zip64_set.images, zip64_set.labels
        shutil.copy(zip64_set.labels_zip, source / "labels.zip")
    else:
        stems = ["CT_cell_pouch_101_x_001", "CT_cell_pouch_101_x_002"]
        images = [image_entry(f"CT/{stem}.jpg") for stem in stems]
        labels = [label_entry(f"labels/{stem}.json") for stem in stems]
        plain = tmp_path / "plain.zip"
        write_zip(plain, images)
        write_zip(source / "labels.zip", labels)
    prefixed = source / "images.zip"
    prefixed.write_bytes(PREFIX + plain.read_bytes())

    shifted = [(n, offset + len(PREFIX), *rest) for n, offset, *rest in member_listing(plain)]
    assert member_listing(prefixed) == shifted

    output = convert(tmp_path / "out", source, strict=True)
    assert output.exit_code == 0
    assert output.rejects == []
    assert len(output.samples) == len(images)
    for image, label in zip(images, labels, strict=True):
        key = image.name.removeprefix("CT/").removesuffix(".jpg")
        assert_sample(output, key, image, label, "jpg")


def test_html_saved_as_zip(tmp_path: Path) -> None:
    """An HTML error page named .zip is one `bad-archive` reject; the other archives convert,
    exit 0 by default and 1 with --strict."""
    source = tmp_path / "source"
    source.mkdir()
    image = image_entry("CT/CT_cell_pouch_101_x_001.jpg")
    label = label_entry("CT_cell_pouch_101_x_001.json")
    write_zip(source / "images.zip", [image])
    write_zip(source / "labels.zip", [label])
    (source / "TS_broken.zip").write_bytes(
        b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>\n"
    )

    output = convert(tmp_path / "out", source)
    assert output.exit_code == 0
    assert [(r["key"], r["reason"], r["source_archive"], r["source_member"])
            for r in output.rejects] == [("", "bad-archive", "TS_broken.zip", "")]
    assert "not a zip" in output.rejects[0]["detail"]
    assert output.summary["rejects"] == {"bad-archive": 1}
    assert_sample(output, "CT_cell_pouch_101_x_001", image, label, "jpg")

    strict = convert(tmp_path / "strict", source, strict=True)
    assert strict.exit_code == 1
    assert strict.rejects == output.rejects
    assert strict.samples == output.samples


@needs_zip_tool
def test_unsupported_methods_and_encryption(tmp_path: Path) -> None:
    """A bzip2 image, an LZMA label and a password-protected image each reject their pair as
    `unsupported-method` (image and label rows); the good pair still converts."""
    source = tmp_path / "source"
    source.mkdir()
    good = image_entry("CT/CT_cell_pouch_101_x_001.jpg")
    bzip2 = image_entry("CT/CT_cell_pouch_101_x_002.jpg", zipfile.ZIP_BZIP2)
    write_zip(source / "images.zip", [good, bzip2, image_entry("CT/CT_cell_pouch_101_x_003.jpg")])
    stems = [f"CT_cell_pouch_101_x_{n:03d}" for n in (1, 2, 3, 4)]
    labels = [label_entry(f"{stem}.json") for stem in stems]
    labels[2] = label_entry(f"{stems[2]}.json", zipfile.ZIP_LZMA)
    write_zip(source / "labels.zip", labels)
    stage = tmp_path / "stage"
    names = write_files(stage, [image_entry(f"{stems[3]}.jpg")])
    (source / "secret.zip").write_bytes(run_zip_tool(stage, names, "-P", "secret"))
    with zipfile.ZipFile(source / "secret.zip") as archive:
        assert archive.infolist()[0].flag_bits & FLAG_ENCRYPTED

    output = convert(tmp_path / "out", source)
    assert output.exit_code == 0
    rows = {(r["key"], r["reason"], r["source_archive"], r["source_member"])
            for r in output.rejects}
    assert rows == {
        (stems[1], "unsupported-method", "images.zip", f"CT/{stems[1]}.jpg"),
        (stems[1], "unsupported-method", "labels.zip", f"{stems[1]}.json"),
        (stems[2], "unsupported-method", "images.zip", f"CT/{stems[2]}.jpg"),
        (stems[2], "unsupported-method", "labels.zip", f"{stems[2]}.json"),
        (stems[3], "unsupported-method", "secret.zip", f"{stems[3]}.jpg"),
        (stems[3], "unsupported-method", "labels.zip", f"{stems[3]}.json"),
    }
    why = {stems[1]: "method 12", stems[2]: "method 14", stems[3]: "encrypted"}
    assert all(why[r["key"]] in r["detail"] for r in output.rejects), output.rejects
    assert list(output.samples) == [stems[0]]
    assert_sample(output, stems[0], good, labels[0], "jpg")


def test_junk_members_ignored_and_counted(tmp_path: Path) -> None:
    """Folders, AppleDouble files (also shadowing a real image's name) and desktop litter are
    skipped without a reject and counted in summary.json `ignored_members`."""
    stem = "CT_cell_pouch_101_x_001"
    image = image_entry(f"원천데이터/CT/{stem}.jpg")
    label = label_entry(f"라벨/{stem}.json")
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(58)
    image_junk = [
        ZipEntry("원천데이터/", method=ZIP_STORED, name_encoding="cp949"),
        ZipEntry("원천데이터/CT/", method=ZIP_STORED),
        ZipEntry(f"__MACOSX/원천데이터/CT/._{stem}.jpg", apple_double),
        ZipEntry(f"원천데이터/CT/._{stem}.jpg", apple_double),
        ZipEntry("원천데이터/CT/Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(56)),
        ZipEntry("원천데이터/desktop.ini", b"[.ShellClassInfo]\r\n"),
    ]
    label_junk = [
        ZipEntry("라벨/", method=ZIP_STORED),
        ZipEntry("라벨/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(56)),
        ZipEntry(f"__MACOSX/라벨/._{stem}.json", apple_double),
    ]
    source = tmp_path / "source"
    source.mkdir()
    write_zip(source / "images.zip", [*image_junk[:2], image, *image_junk[2:]])
    write_zip(source / "labels.zip", [label_junk[0], label, *label_junk[1:]])

    output = convert(tmp_path / "out", source, strict=True)
    assert output.exit_code == 0
    assert output.rejects == []
    assert output.summary["ignored_members"] == len(image_junk) + len(label_junk)
    assert output.summary["other_files"] == {}
    assert list(output.samples) == [stem]
    assert_sample(output, stem, image, label, "jpg")


def test_extension_case(tmp_path: Path) -> None:
    """.JPG, .jpeg and .PNG images pair with .json/.JSON labels; the shard member is the key with
    a lower-case extension, .jpeg written as .jpg, and the manifest says the same."""
    pairs = [
        ("CT_cell_pouch_101_x_001.JPG", "CT_cell_pouch_101_x_001.json", "jpg"),
        ("CT_cell_pouch_101_x_002.jpeg", "CT_cell_pouch_101_x_002.JSON", "jpg"),
        ("CT_cell_pouch_101_x_003.Jpeg", "CT_cell_pouch_101_x_003.Json", "jpg"),
        ("RGB_cell_pouch_0001_001.PNG", "RGB_cell_pouch_0001_001.JSON", "png"),
    ]
    images = [image_entry(f"img/{image}") for image, _, _ in pairs]
    labels = [label_entry(f"lbl/{label}") for _, label, _ in pairs]
    source = tmp_path / "source"
    source.mkdir()
    write_zip(source / "images.zip", images)
    write_zip(source / "labels.zip", labels)

    output = convert(tmp_path / "out", source, strict=True)
    assert output.exit_code == 0
    assert output.rejects == []
    for (name, _, ext), image, label in zip(pairs, images, labels, strict=True):
        key = name.rsplit(".", 1)[0]
        assert_sample(output, key, image, label, ext)
        assert output.row(f"img/{name}")["image_ext"] == ext


def test_unusable_directory_with_whole_data_loses_nothing(tmp_path: Path) -> None:
    """`zip -fz -` writes a Zip64 end record that readers cannot use; the members are all there,
    so they are rebuilt from their local headers and nothing is reported lost."""
    stems = ["CT_cell_pouch_101_x_001", "CT_cell_pouch_101_x_002"]
    stage, source = tmp_path / "stage", tmp_path / "source"
    stage.mkdir()
    source.mkdir()
    images = [image_entry(f"{stem}.jpg") for stem in stems]
    (source / "images.zip").write_bytes(
        run_zip_tool(stage, write_files(stage, images), "-fz"))
    write_zip(source / "labels.zip", [label_entry(f"{stem}.json") for stem in stems])
    with pytest.raises((zipfile.BadZipFile, OSError)), \
            zipfile.ZipFile(source / "images.zip") as archive:
        archive.testzip()
    output = convert(tmp_path / "out", source)
    assert output.rejects == []
    for stem, image in zip(stems, images, strict=True):
        assert output.samples[stem]["jpg"] == image.data
    [notes] = [a["notes"] for a in output.summary["archives"] if a["name"] == "images.zip"]
    assert "nothing lost" in " ".join(notes)


def test_large_compressed_inner_zip_is_refused(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A deflated zip inside a zip over the in-memory limit becomes a reject, not a memory spike."""
    from shardify.archives import zipdir as zipindex

    stem = "CT_cell_pouch_101_x_001"
    inner = tmp_path / "inner.zip"
    write_zip(inner, [label_entry(f"{stem}.json")])
    source = tmp_path / "source"
    source.mkdir()
    write_zip(source / "images.zip", [image_entry(f"{stem}.jpg")])
    write_zip(source / "labels.zip", [ZipEntry("inner.zip", inner.read_bytes(), ZIP_DEFLATED)])
    monkeypatch.setattr(zipindex, "MAX_NESTED_INFLATE", 10)
    output = convert(tmp_path / "out", source)
    reasons = {(r["reason"], r["source_member"]) for r in output.rejects}
    assert ("bad-archive", "inner.zip") in reasons and ("orphan-image", f"{stem}.jpg") in reasons
    assert "larger than" in next(r["detail"] for r in output.rejects if r["source_member"]
                                 == "inner.zip")


def test_entry_count_modulo_65536_still_lists_every_member(tmp_path: Path) -> None:
    """Some writers store the entry count modulo 65536: every entry in the directory counts."""
    stems = [f"CT_cell_pouch_101_x_{n:03d}" for n in range(3)]
    source = tmp_path / "source"
    source.mkdir()
    write_zip(source / "images.zip", [image_entry(f"{stem}.jpg") for stem in stems])
    write_zip(source / "labels.zip", [label_entry(f"{stem}.json") for stem in stems])
    data = bytearray((source / "images.zip").read_bytes())
    end = data.rindex(b"PK\x05\x06")
    struct.pack_into("<2H", data, end + 8, 1, 1)  # entries on this disk, entries in all
    (source / "images.zip").write_bytes(bytes(data))
    output = convert(tmp_path / "out", source)
    assert output.rejects == []
    assert sorted(output.samples) == stems


def test_damaged_compressed_inner_zip_is_a_reject(tmp_path: Path) -> None:
    """A deflated zip inside a zip whose CRC is wrong: a reject row, the run goes on."""
    stem = "CT_cell_pouch_101_x_001"
    inner = tmp_path / "inner.zip"
    write_zip(inner, [label_entry(f"{stem}.json")])
    source = tmp_path / "source"
    source.mkdir()
    write_zip(source / "images.zip", [image_entry(f"{stem}.jpg"), image_entry("CT_ok_1.jpg")])
    write_zip(source / "labels.zip", [ZipEntry("inner.zip", inner.read_bytes(), ZIP_DEFLATED),
                                      label_entry("CT_ok_1.json")])
    data = bytearray((source / "labels.zip").read_bytes())
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 16, 0)  # the inner zip's CRC in the directory
    (source / "labels.zip").write_bytes(bytes(data))
    output = convert(tmp_path / "out", source)
    assert ("bad-crc", "inner.zip") in {(r["reason"], r["source_member"]) for r in output.rejects}
    assert "CT_ok_1" in output.samples


def test_empty_zips_are_a_note_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    """A valid 22-byte zip, beside the others and stored inside one: listed with 0 members and
    a note, in convert, scan and verify --sources; no reject, the rest converts."""
    stem = "CT_cell_pouch_101_x_001"
    empty = io.BytesIO()
    zipfile.ZipFile(empty, "w").close()
    assert len(empty.getvalue()) == 22
    source = tmp_path / "source"
    source.mkdir()
    (source / "empty.zip").write_bytes(empty.getvalue())
    image, label = image_entry(f"{stem}.jpg"), label_entry(f"{stem}.json")
    write_zip(source / "images.zip", [image, ZipEntry("inner/empty.zip", empty.getvalue(),
                                                      ZIP_STORED)])
    write_zip(source / "labels.zip", [label])
    out = tmp_path / "out"
    output = convert(out, source)
    assert output.exit_code == 0 and output.rejects == []
    assert_sample(output, stem, image, label, "jpg")
    listed = {a["name"]: a for a in output.summary["archives"]}
    for name in ("empty.zip", "images.zip/inner/empty.zip"):
        assert listed[name]["members"] == 0
        assert "empty zip" in " ".join(listed[name]["notes"])

    capsys.readouterr()
    assert main(["scan", str(source), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    scanned = {a["name"]: a for a in report["archives"]}
    assert scanned["empty.zip"]["members"] == 0 and report["problems"] == {}
    assert "empty zip" in " ".join(scanned["images.zip/inner/empty.zip"]["notes"])
    assert main(["verify", str(out), "--sources", str(source)]) == 0
    assert "verify: OK" in capsys.readouterr().out


FAKE_END_RECORDS = {
    # a record at the very end claiming an empty directory: the members would vanish
    "empty-directory": struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0, 0, 0, 0, 0),
    # a record claiming a directory in the member data, followed by more comment text
    "mid-comment": struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 46, 0, 0) + b" (copy)",
    # a record whose comment length reaches the end, but whose directory is not where it says
    "reaches-the-end": struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 46, 10, 4) + b"tail",
}


@pytest.mark.parametrize("fake", FAKE_END_RECORDS)
def test_end_record_inside_the_archive_comment_is_not_trusted(tmp_path: Path, fake: str) -> None:
    """Zips written by Python's zipfile whose comment holds a fake end-of-central-directory
    record: the real record (its comment reaching the end, its directory just before it) wins."""
    stems = [f"CT_cell_pouch_101_x_{n:03d}" for n in range(3)]
    source = tmp_path / "source"
    source.mkdir()
    entries = {"images.zip": [image_entry(f"{stem}.jpg") for stem in stems],
               "labels.zip": [label_entry(f"{stem}.json") for stem in stems]}
    for zip_name, members in entries.items():
        with zipfile.ZipFile(source / zip_name, "w", zipfile.ZIP_DEFLATED) as archive:
            for entry in members:
                archive.writestr(entry.name, entry.data)
            archive.comment = b"made by a tool; " + FAKE_END_RECORDS[fake]
    output = convert(tmp_path / "out", source)
    assert output.rejects == []
    for stem, image, label in zip(stems, entries["images.zip"], entries["labels.zip"],
                                  strict=True):
        assert_sample(output, stem, image, label, "jpg")
    assert all(a["notes"] == [] for a in output.summary["archives"])
