"""The columnar member index: vectorised parsing and classification agree with plain rules.

The fast paths (signature search over the central directory, names cut out in one step, kinds and
stems found by byte position) are checked here against `zipfile` and against a name-by-name
statement of the pairing rules, on tricky and on random names.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest

from shardify.archives.discovery import find_archives
from shardify.archives.model import MEMBER_COLUMNS, Archive, MemberRefs, MemberTable
from shardify.archives.reader import INLINE_READ, ArchiveReader
from shardify.archives.zipdir import _entry_starts, is_junk, list_members
from shardify.errors import ArchiveError
from shardify.plan.pairing import (
    IMAGE,
    JUNK,
    LABEL,
    OTHER,
    SAFE_KEY,
    FileTypes,
    classify,
    split_name,
)
from shardify.profiles.load import get_profile

PROFILE = get_profile()
IMAGE_EXTENSIONS = PROFILE.image_extensions
LABEL_EXTENSION = PROFILE.label_extension
KNOWN_EXTENSIONS = {*IMAGE_EXTENSIONS, LABEL_EXTENSION}
FILE_TYPES = FileTypes.of(PROFILE)

TRICKY_NAMES = [
    "CT/CT_cell_pouch_101_x_006.jpg", "CT_1.JPG", "x.jpeg", "x.JPEG", "y.Json", "z.png", "Z.PnG",
    "noext", "dir/", "dir/sub/", ".jpg", "a/.jpg", "._CT.jpg", "a/._CT.json", "__MACOSX/a/CT.jpg",
    "a/__MACOSX/b.png", "Thumbs.db", "a/desktop.ini", "a/.DS_Store", "a b.png", "a.b.c.json",
    "x" * 80 + ".json", "x" * 81 + ".jpg", "weird.jp", "weird.jpgx", "f.tar.gz", "a/b.c/d",
    "a.d/b.jpg", "trailing.", "a/b/", "-_-.png", "json", ".json.jpg", "a..jpg", "x.json/y",
]


def reference_kind(name: str) -> tuple[int, str | None]:
    """The pairing rules, one name at a time: (kind, stem for images and labels)."""
    base = name.rsplit("/", 1)[-1]
    stem, ext = split_name(base)
    if base.startswith("._") or name.endswith("/") or (
            ("__MACOSX/" in name or ext not in KNOWN_EXTENSIONS) and is_junk(name)):
        return JUNK, None
    if ext == LABEL_EXTENSION:
        return LABEL, stem
    if ext in IMAGE_EXTENSIONS:
        return IMAGE, stem
    return OTHER, None


def check_against_reference(names: list[str]) -> None:
    table = MemberTable.from_names(Archive("t.zip", "zip"), names,
                                   np.zeros(len(names), MEMBER_COLUMNS))
    table.__dict__.pop("names")  # classify must work from the name bytes alone
    found = classify(table, FILE_TYPES)
    expected = [reference_kind(name) for name in names]
    assert found.kinds.tolist() == [kind for kind, _ in expected]
    for kind in (IMAGE, LABEL):
        rows = [row for row, (k, _) in enumerate(expected) if k == kind]
        assert found.rows[kind].tolist() == rows
        assert found.stems[kind] == [expected[row][1] for row in rows]
    image_rows = found.rows[IMAGE].tolist()
    assert [FILE_TYPES.image_types[t] for t in found.image_types.tolist()] == [
        IMAGE_EXTENSIONS[split_name(names[row].rsplit("/", 1)[-1])[1]] for row in image_rows]
    stems = found.stems[IMAGE] + found.stems[LABEL]
    assert found.unsafe == {stem for stem in stems if not SAFE_KEY.fullmatch(stem)}


@pytest.mark.parametrize("extra", [[], ["배터리_01.jpg", "폴더/CT_2.json", "été.png"]],
                         ids=["ascii", "unicode"])
def test_classify_tricky_names(extra: list[str]) -> None:
    check_against_reference(TRICKY_NAMES + extra)


@pytest.mark.parametrize("seed", range(5))
def test_classify_random_names(seed: int) -> None:
    rng = random.Random(seed)
    pieces = ["/", ".", "._", "jpg", "JPEG", "png", "json", "Json", "a", "Z", "_", "-", " ",
              "__MACOSX/", "thumbs.db", "가", "x" * 40]
    names = ["".join(rng.choices(pieces, k=rng.randint(1, 8))) for _ in range(3000)]
    if seed % 2:
        names = [name for name in names if name.isascii()]
    check_against_reference(names)


def test_table_names_round_trip() -> None:
    names = ["a.jpg", "배터리/b.json", "", "c/d.png"]
    table = MemberTable.from_names(Archive("t.zip", "zip"), names,
                                   np.zeros(len(names), MEMBER_COLUMNS))
    assert [table.name(row) for row in range(len(names))] == names
    table.__dict__.pop("names")
    assert table.names == names
    assert [table.name(row) for row in range(len(names))] == names
    assert table.take(np.array([1, 3])).names == ["배터리/b.json", "c/d.png"]


def test_member_refs_agree_with_row_lookups() -> None:
    """Bulk reads of (table, row) references across tables give what member(row) gives."""
    rng = random.Random(3)
    tables = []
    for number in range(3):
        names = [f"t{number}/{'배' if row % 7 == 0 else ''}m{row}.jpg" for row in range(50)]
        columns = np.zeros(len(names), MEMBER_COLUMNS)
        columns["header_offset"] = np.arange(len(names)) * 1000 + number
        columns["crc32"] = [rng.getrandbits(32) for _ in names]
        tables.append(MemberTable.from_names(Archive(f"{number}.zip", "zip"), names, columns,
                                             {5: ("bad-crc", "x")} if number == 1 else {}))
        tables[-1].__dict__.pop("names")
    refs = [(rng.choice(tables), rng.randrange(50)) for _ in range(400)] + [(tables[1], 5)]
    found = MemberRefs.of([t for t, _ in refs], [row for _, row in refs])
    members = [table.member(row) for table, row in refs]
    assert found.names() == [m.name for m in members]
    assert found.records().tolist() == [tuple(m[2:9]) for m in members]
    assert [found.tables[t].archive for t in found.which] == [m.archive for m in members]
    assert found.problems() == {i: m.problem for i, m in enumerate(members) if m.problem}
    assert not any("names" in table.__dict__ for table in tables)  # names were not all kept


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_large_members_with_local_extra_fields_read_exactly(tmp_path: Path,
                                                            method: int) -> None:
    """Members larger than one inline read, behind local extra fields of several sizes."""
    path = tmp_path / "large.zip"
    payloads = {f"m{n}.png": random.Random(n).randbytes(INLINE_READ * 3 + n) for n in range(4)}
    with zipfile.ZipFile(path, "w", method) as archive:
        for n, (name, payload) in enumerate(payloads.items()):
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            info.extra = b"\xfe\xca" + (n * 30).to_bytes(2, "little") + bytes(n * 30)
            archive.writestr(info, payload)
    (archive,) = find_archives([str(path)]).archives
    with ArchiveReader() as reader:
        _, table = list_members(archive, reader)
        assert {m.name: reader.read(m) for m in table.members()} == payloads


def test_short_reads_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pread returns at most ~2 GiB on Linux: a larger member must not look cut off."""
    path = tmp_path / "big.zip"
    payload = random.Random(1).randbytes(INLINE_READ * 4)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("big.png", payload)
    (archive,) = find_archives([str(path)]).archives
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, size, offset: real(fd, min(size, 1000), offset))
    with ArchiveReader() as reader:
        _, table = list_members(archive, reader)
        assert reader.read(table.member(0)) == payload


def directory_listing(path: Path) -> list[tuple[str, int, int, int, int, int]]:
    (archive,) = find_archives([str(path)]).archives
    with ArchiveReader() as reader:
        _, table = list_members(archive, reader)
    return [(m.name, m.header_offset, m.compressed_size, m.file_size, m.crc32, m.method)
            for m in table.members()]


def test_entry_signature_inside_names_and_extra_fields(tmp_path: Path) -> None:
    """A central-directory signature inside a name or extra field must not start an entry."""
    path = tmp_path / "tricky.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for number in range(50):
            info = zipfile.ZipInfo(f"PK\x01\x02/{number:03d}PK\x01\x02.jpg")
            if number % 3 == 0:
                info.extra = b"\xfe\xca\x08\x00PK\x01\x02PK\x01\x02"  # a private 8-byte field
            archive.writestr(info, bytes([number]) * (number + 1))
    with zipfile.ZipFile(path) as archive:
        expected = [(i.filename, i.header_offset, i.compress_size, i.file_size, i.CRC,
                     i.compress_type) for i in archive.infolist()]
    assert directory_listing(path) == expected


def forty_member_zip(path: Path) -> tuple[list[tuple], int]:
    """A 40-member zip; its listing by zipfile and where its central directory starts."""
    with zipfile.ZipFile(path, "w") as archive:
        for number in range(40):
            archive.writestr(f"CT_{number:03d}.jpg", bytes([number]) * 50)
    with zipfile.ZipFile(path) as archive:
        return [(i.filename, i.header_offset, i.compress_size, i.file_size, i.CRC,
                 i.compress_type) for i in archive.infolist()], archive.start_dir


def test_damaged_directory_entry_is_found_and_members_recovered(tmp_path: Path) -> None:
    """A damaged entry makes the directory unusable; the local headers still list every member."""
    path = tmp_path / "damaged.zip"
    expected, start_dir = forty_member_zip(path)
    data = bytearray(path.read_bytes())
    entry_20 = start_dir + 20 * (46 + len("CT_000.jpg"))
    data[entry_20 : entry_20 + 4] = b"PK\x09\x09"
    path.write_bytes(bytes(data))
    assert directory_listing(path) == expected
    (archive,) = find_archives([str(path)]).archives
    with ArchiveReader() as reader:
        found, _ = list_members(archive, reader)
    assert any("entry 20 is damaged" in note and "nothing lost" in note for note in found.notes)


@pytest.mark.parametrize(("cut", "entry"), [(10, 39), (50, 39), (60, 38)])
def test_cut_off_directory_names_the_cut_entry(tmp_path: Path, cut: int, entry: int) -> None:
    path = tmp_path / "whole.zip"
    _, start_dir = forty_member_zip(path)
    data = path.read_bytes()
    directory = data[start_dir : data.rfind(b"PK\x05\x06")]
    with pytest.raises(ArchiveError, match=f"entry {entry} is cut off"):
        _entry_starts(Archive("cut.zip", "zip"), directory[:-cut])
