"""Find the archives under the SOURCE arguments, whatever shape the download has, and read them.

An archive is a sequence of byte ranges (extents) in files on disk: a plain zip is one extent; the
download tool's offset-named pieces, a multi-volume set or a zip inside `download.tar` are several
extents or a slice of the tar; a stored zip inside a zip is a slice of its parent. Nothing is ever
merged, unpacked or written next to the sources: every read is a `pread` on a read-only descriptor.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import deflate
import numpy as np

from .pathnames import path_text

METHOD_STORED = 0
METHOD_DEFLATED = 8
METHOD_DEFLATE64 = 9
SUPPORTED_METHODS = {METHOD_STORED: "stored", METHOD_DEFLATED: "deflate",
                     METHOD_DEFLATE64: "deflate64"}
LOCAL_HEADER_SIZE = 30
LOCAL_SLACK = 64  # room for a local extra field, so most members take a single pread
INLINE_READ = 64 * 2**10
WINDOW = 4 * 2**20  # read_many: bytes read at once for neighbouring small members
WINDOW_GAP = 64 * 2**10
MAX_NESTED_INFLATE = 512 * 2**20
MAX_OPEN_FILES = 64  # descriptors an ArchiveReader keeps open at once
INFLATE64_CHUNK = 1024  # input per step: Deflate64 output past a lying size stays < ~30 MB

PIECE = re.compile(r"^(?P<zip>.+\.zip)\.part(?P<offset>\d+)$", re.IGNORECASE)
VOLUME = re.compile(r"^(?P<stem>.+)\.z(?P<number>\d{2,})$", re.IGNORECASE)


class ArchiveError(Exception):
    """An archive that cannot be read at all; the message says why, for the user."""


class MemberError(Exception):
    """One member that cannot be read; `reason` is the reject reason, the message its detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range of a file on disk: `length` bytes from `offset` of `path`.

    A path of None is a hole (a missing download piece): it reads as zero bytes.
    """

    path: Path | None
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Archive:
    """One zip to read, however it was delivered.

    `name` is how the manifest names it: the zip's path relative to the SOURCE (or the tar) it was
    found in (as `path_text` shows it: valid text even where the folder's name is not UTF-8), the
    same whether it came whole, as pieces or inside a tar. `extents` hold its bytes
    in order; a deflated zip inside a zip has none and is inflated from `parent` when read.
    `volume_starts` gives each volume's offset for multi-volume sets (zip offsets are per disk).
    """

    name: str
    kind: str
    extents: tuple[Extent, ...] = ()
    parent: Member | None = None
    volume_starts: tuple[int, ...] = (0,)
    notes: tuple[str, ...] = ()
    broken: str | None = None

    @property
    def size(self) -> int:
        if self.parent is not None:
            return self.parent.file_size
        return sum(extent.length for extent in self.extents)


class Member(NamedTuple):
    """One file inside an archive, located well enough to read it with a single `pread`.

    `problem` is (reject reason, detail) for a member already known to be unusable (zip bomb,
    overlap, unsupported method, inside a broken archive); reading it raises that.
    """

    archive: Archive
    name: str
    header_offset: int
    compressed_size: int
    file_size: int
    crc32: int
    method: int
    flags: int
    raw_name_len: int
    problem: tuple[str, str] | None = None

    @property
    def base_name(self) -> str:
        return self.name.rsplit("/", 1)[-1]


MEMBER_COLUMNS = np.dtype([("header_offset", "<i8"), ("compressed_size", "<i8"),
                           ("file_size", "<i8"), ("crc32", "<u4"), ("method", "<u2"),
                           ("flags", "<u2"), ("raw_name_len", "<u2")])


@dataclass(eq=False)
class MemberTable:
    """The members of one archive as columns: names, one numpy record per member, problems.

    Names are stored as Arrow stores strings: UTF-8 bytes back to back (`name_data`) and n + 1
    offsets (`name_offsets`). A 200k-member archive costs ~34 bytes a member plus its name,
    instead of several Python objects per member, and is classified and paired with vectorised
    operations; `names` and `member(row)` build Python objects only where they are needed.
    """

    archive: Archive
    name_data: bytes
    name_offsets: np.ndarray  # int64, len(columns) + 1
    columns: np.ndarray  # MEMBER_COLUMNS, one row per member
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def from_names(cls, archive: Archive, names: list[str], columns: np.ndarray,
                   problems: dict[int, tuple[str, str]] | None = None) -> MemberTable:
        data = "".join(names).encode()
        lengths = map(len, names) if len(data) == sum(map(len, names)) else (
            len(name.encode()) for name in names)
        offsets = np.zeros(len(names) + 1, np.int64)
        offsets[1:] = np.cumsum(np.fromiter(lengths, np.int64, len(names)))
        table = cls(archive, data, offsets, columns, problems or {})
        table.__dict__["names"] = names
        return table

    @classmethod
    def from_members(cls, archive: Archive, members: list[Member]) -> MemberTable:
        columns = np.array([m[2:9] for m in members], dtype=MEMBER_COLUMNS) if members \
            else np.zeros(0, MEMBER_COLUMNS)
        return cls.from_names(archive, [m.name for m in members], columns,
                              {row: m.problem for row, m in enumerate(members)
                               if m.problem is not None})

    def __len__(self) -> int:
        return len(self.columns)

    @cached_property
    def names(self) -> list[str]:
        """Every name as a str, built on first use and kept (for callers that need them all)."""
        return self._names_of(slice(None))

    def _names_of(self, rows: np.ndarray | slice) -> list[str]:
        """Names of `rows` in bulk: slices of one decoded text when the names are ASCII."""
        starts, ends = self.name_offsets[:-1], self.name_offsets[1:]
        bounds = zip(starts[rows].tolist(), ends[rows].tolist(), strict=True)
        if self.name_data.isascii():
            text = self.name_data.decode("ascii")
            return [text[a:b] for a, b in bounds]
        return [self.name_data[a:b].decode() for a, b in bounds]

    def name(self, row: int) -> str:
        """One name, without building them all."""
        if "names" in self.__dict__:
            return self.names[row]
        return self.name_data[self.name_offsets[row] : self.name_offsets[row + 1]].decode()

    def member(self, row: int) -> Member:
        return Member(self.archive, self.name(row), *self.columns[row].tolist(),
                      self.problems.get(row))

    def names_of(self, rows: list[int]) -> list[str]:
        """The names of `rows`, without keeping every name (400k names take ~40 MB)."""
        if "names" in self.__dict__:
            return list(map(self.names.__getitem__, rows))
        if len(rows) * 4 < len(self):
            return list(map(self.name, rows))
        return self._names_of(np.asarray(rows, np.int64))

    def members(self, rows: list[int] | None = None) -> list[Member]:
        """Member records for `rows` (all by default), built in bulk."""
        rows = list(range(len(self))) if rows is None else rows
        archive, problems = self.archive, self.problems
        return [Member(archive, name, *values, problems.get(row)) for row, name, values
                in zip(rows, self.names_of(rows), self.columns[rows].tolist(), strict=True)]

    def take(self, rows: np.ndarray) -> MemberTable:
        """The table of the given rows only (ascending), their problems kept."""
        renumber = {int(old): new for new, old in enumerate(rows.tolist())}
        return MemberTable.from_names(
            self.archive, [self.names[row] for row in rows.tolist()], self.columns[rows],
            {renumber[row]: problem for row, problem in self.problems.items()
             if row in renumber})


@dataclass
class MemberRefs:
    """Many (table, row) references, grouped by table so their columns are read in bulk."""

    tables: list[MemberTable]  # the distinct tables referenced
    which: np.ndarray  # int32 per reference: its table's position in `tables`
    rows: np.ndarray  # int64 per reference

    @classmethod
    def of(cls, tables: list[MemberTable], rows: list[int]) -> MemberRefs:
        distinct = list(dict.fromkeys(tables))
        number = {id(table): i for i, table in enumerate(distinct)}
        return cls(distinct, np.fromiter(map(number.__getitem__, map(id, tables)), np.int32,
                                         len(tables)), np.array(rows, np.int64))

    def _groups(self) -> Iterator[tuple[MemberTable, np.ndarray]]:
        """Each table with the positions of the references into it."""
        if len(self.tables) == 1:
            yield self.tables[0], np.arange(len(self.rows))
            return
        for t, table in enumerate(self.tables):
            yield table, np.flatnonzero(self.which == t)

    def records(self) -> np.ndarray:
        """The MEMBER_COLUMNS record of each reference."""
        found = np.zeros(len(self.rows), MEMBER_COLUMNS)
        for table, at in self._groups():
            found[at] = table.columns[self.rows[at]]
        return found

    def names(self) -> list[str]:
        found = [""] * len(self.rows)
        for table, at in self._groups():
            for i, name in zip(at.tolist(), table.names_of(self.rows[at].tolist()), strict=True):
                found[i] = name
        return found

    def problems(self) -> dict[int, tuple[str, str]]:
        """The known problem of each flawed reference, by position."""
        return {i: problem for table, at in self._groups() if table.problems
                for i, row in zip(at.tolist(), self.rows[at].tolist(), strict=True)
                if (problem := table.problems.get(row)) is not None}


class Reject(NamedTuple):
    """One input that did not become (part of) a sample, and why."""

    key: str
    reason: str
    source_archive: str
    source_member: str
    detail: str


@dataclass
class Discovery:
    """The archives found, and the inputs that could not be made into an archive at all."""

    archives: list[Archive] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def find_archives(sources: list[str]) -> Discovery:
    """Resolve SOURCE arguments (folders, zips, pieces, volumes, tars) to archives.

    Raises FileNotFoundError for a SOURCE that does not exist.
    """
    found = Discovery()
    seen: set[Path] = set()
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = _walk(path, found)
            root = path
        elif path.is_file():
            # A piece or volume named alone brings the rest of its set from the same folder.
            files = sorted(p for p in path.parent.iterdir() if p.is_file()
                           and _set_name(p.name) == _set_name(path.name))
            root = path.parent
        elif os.path.lexists(source):
            raise FileNotFoundError(f"source {path_text(source)} {_not_a_file(source)}")
        else:
            raise FileNotFoundError(f"source not found: {path_text(source)}")
        fresh = [p for p in files if p.resolve() not in seen]
        seen.update(p.resolve() for p in fresh)
        files_by_name = {p.relative_to(root).as_posix(): Extent(p, 0, p.stat().st_size)
                         for p in fresh}
        _collect(files_by_name, "", found)
    found.archives = _unique_names(found.archives)
    return found


def _walk(folder: Path, found: Discovery) -> list[Path]:
    """Every regular file below `folder`, following symbolic links, each real folder listed once.

    A link to a folder already listed (a loop, or a second way in) adds nothing; links are
    followed after the folders themselves, so a file reachable both ways keeps its real path
    below SOURCE. A folder that cannot be listed, and an entry that is neither file nor folder
    (FIFO, socket, device, dangling link), become rejects, not gaps; a FIFO is never opened.
    """

    def reject(path: Path, detail: str) -> None:
        """`detail` holds `{}` where the entry's name goes (names may hold braces themselves)."""
        name = path_text(path.relative_to(folder).as_posix())
        found.rejects.append(Reject("", "bad-archive", name, "", detail.replace("{}", name, 1)))

    files: list[Path] = []
    listed: set[tuple[int, int]] = set()
    folders, linked = [folder], []
    while folders or linked:
        top = folders.pop() if folders else linked.pop()
        try:
            info = top.stat()
            if (info.st_dev, info.st_ino) in listed:
                continue
            listed.add((info.st_dev, info.st_ino))
            with os.scandir(top) as listing:
                entries = sorted(listing, key=lambda entry: entry.name, reverse=True)
        except OSError as error:
            reject(top, f"folder {{}} cannot be read: {error.strerror}")
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_file():
                files.append(path)
            elif entry.is_dir():
                (linked if entry.is_symlink() else folders).append(path)
            else:
                reject(path, f"{{}} {_not_a_file(path)}: not read")
    return sorted(files)


def _not_a_file(path: Path | str) -> str:
    """What a path that is neither a regular file nor a folder is, said for the user."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        return f"cannot be read: {error.strerror}"
    kinds = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
             stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
    return f"is {kinds.get(stat.S_IFMT(mode), 'not a regular file')}, not a file or folder"


def _unique_names(archives: list[Archive]) -> list[Archive]:
    """Archives sorted by name; a name seen again (the same zip delivered twice) gets `#2`."""
    ordered = sorted(archives, key=lambda a: (a.name, a.kind, str(a.extents[0].path),
                                              a.extents[0].offset))
    counts: dict[str, int] = defaultdict(int)
    unique = []
    for archive in ordered:
        counts[archive.name] += 1
        if counts[archive.name] > 1:
            archive = replace(archive, name=f"{archive.name} #{counts[archive.name]}")
        unique.append(archive)
    return unique


def _set_name(name: str) -> str:
    """The zip a file belongs to: `X.zip` for `X.zip`, `X.zip.part123`, `X.z01`."""
    piece = PIECE.match(name)
    if piece:
        return piece["zip"]
    volume = VOLUME.match(name)
    if volume:
        return f"{volume['stem']}.zip"
    return name


def _collect(files: dict[str, Extent], container: str, found: Discovery) -> None:
    """Group files (on disk, or members of one tar) into archives: zips, pieces, volumes, tars."""
    files = _shown_names(files)
    pieces: dict[str, list[tuple[int, str, Extent]]] = defaultdict(list)
    volumes: dict[str, list[tuple[int, Extent]]] = defaultdict(list)
    zips: dict[str, Extent] = {}
    for name, extent in files.items():
        lower = name.lower()
        piece, volume = PIECE.match(name), VOLUME.match(name)
        if piece:
            pieces[piece["zip"]].append((int(piece["offset"]), name, extent))
        elif volume:
            volumes[f"{volume['stem']}.zip"].append((int(volume["number"]), extent))
        elif lower.endswith(".zip"):
            zips[name] = extent
        elif lower.endswith(".tar") and not container:
            _collect_tar(name, extent, found)
    kind_prefix = f"{container}: " if container else ""
    for zip_name, parts in pieces.items():
        problem = _piece_problem(parts)
        whole = zips.pop(zip_name, None)
        total = sum(extent.length for _, _, extent in parts)
        if whole is not None and problem is None and whole.length > total:
            # A missing last piece leaves no gap to see; the complete merge beside them shows it.
            problem = (f"they hold {total} bytes, the merged zip {whole.length}: the last "
                       "piece(s) are missing")
        if problem and whole is not None:
            found.archives.append(Archive(zip_name, f"{kind_prefix}zip", (whole,), notes=(
                f"pieces beside it are unusable ({problem}); read the merged zip",)))
            continue
        notes = (f"pieces used; the merged {zip_name} beside them was not read",) if whole else ()
        if problem:
            # Skipped, but its directory is still read where the pieces allow, so its members
            # are listed (as rejects) instead of their partners turning into orphans.
            found.archives.append(Archive(zip_name, f"{kind_prefix}pieces (broken)",
                                          _positioned(parts), broken=(
                                              f"pieces of {zip_name}: {problem}; archive "
                                              "skipped")))
            continue
        extents = tuple(extent for _, _, extent in sorted(parts, key=lambda p: p[0]))
        found.archives.append(Archive(zip_name, f"{kind_prefix}pieces", extents, notes=notes))
    for zip_name, parts in volumes.items():
        last = zips.pop(zip_name, None)
        numbers = sorted(number for number, _ in parts)
        if last is None or numbers != list(range(1, len(numbers) + 1)):
            found.rejects.append(Reject("", "bad-archive", zip_name, "", _volume_problem(
                zip_name, numbers, last is not None)))
            continue
        extents = (*(extent for _, extent in sorted(parts, key=lambda p: p[0])), last)
        starts = tuple(sum(e.length for e in extents[:i]) for i in range(len(extents)))
        found.archives.append(Archive(zip_name, f"{kind_prefix}volumes", extents,
                                      volume_starts=starts))
    for zip_name, extent in zips.items():
        kind = f"{kind_prefix}zip" if container else "zip"
        found.archives.append(Archive(zip_name, kind, (extent,)))


def _shown_names(files: dict[str, Extent]) -> dict[str, Extent]:
    """`files` under names that can be shown and stored (`path_text`), each still distinct: a
    name whose CP949 reading is already taken (by the UTF-8 name beside it) stays escaped."""
    converted = {name: text for name in files if (text := path_text(name)) != name}
    if not converted:
        return files
    shown = {name: extent for name, extent in files.items() if name not in converted}
    for name, text in converted.items():
        shown[text if text not in shown else path_text(name, read_cp949=False)] = files[name]
    return shown


def _positioned(parts: list[tuple[int, str, Extent]]) -> tuple[Extent, ...]:
    """Pieces placed at the offsets their names give: gaps become holes, overlaps are trimmed."""
    extents: list[Extent] = []
    end = 0
    for offset, _, extent in sorted(parts, key=lambda p: p[0]):
        if offset > end:
            extents.append(Extent(None, 0, offset - end))
            end = offset
        skip = end - offset
        if extent.length > skip:
            extents.append(Extent(extent.path, extent.offset + skip, extent.length - skip))
            end = offset + extent.length
    return tuple(extents)


def _piece_problem(parts: list[tuple[int, str, Extent]]) -> str | None:
    """Why offset-named pieces do not make one contiguous file, or None if they do."""
    by_offset: dict[int, list[tuple[str, Extent]]] = defaultdict(list)
    for offset, name, extent in parts:
        by_offset[offset].append((name, extent))
    for offset, copies in sorted(by_offset.items()):
        if len(copies) > 1:
            names = ", ".join(name for name, _ in copies)
            return f"duplicate piece for offset {offset}: {names}"
    expected = 0
    for offset, copies in sorted(by_offset.items()):
        name, extent = copies[0]
        if offset > expected:
            return f"missing piece at offset {expected} (next piece {name} starts at {offset})"
        if offset < expected:
            return f"piece {name} at offset {offset} overlaps the piece before, which ends at " \
                   f"{expected}"
        expected = offset + extent.length
    return None


def _volume_problem(zip_name: str, numbers: list[int], has_last: bool) -> str:
    if not has_last:
        return f"multi-volume set {zip_name}: the last volume {zip_name} is missing"
    missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
    return f"multi-volume set {zip_name}: missing volume(s) " + ", ".join(
        f".z{n:02d}" for n in missing)


def _collect_tar(name: str, extent: Extent, found: Discovery) -> None:
    """The zips and pieces inside a tar (download.tar), as slices of it: never unpacked.

    A tar may list one name twice (a piece set delivered twice): as when extracting, the last
    copy counts, unless it is cut shorter than an earlier one. A tar cut off (a download
    interrupted, or still arriving) gives what it holds: the members before the cut, the one cut
    short as far as it goes (read as a truncated zip, or a gap in a piece set), and a
    `truncated` row for the tar.
    """
    entries: dict[str, Extent] = {}
    cut = None
    try:
        with tarfile.open(extent.path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                present = max(0, min(info.size, extent.length - info.offset_data))
                if present < info.size:
                    cut = (f"member {path_text(info.name)} has {present} of its {info.size} "
                           "bytes")
                earlier = entries.get(info.name)
                if earlier is None or present >= earlier.length:
                    entries[info.name] = Extent(extent.path, info.offset_data, present)
            if cut is None and not _tar_end_found(extent, tar.offset):
                cut = (f"no end-of-archive blocks after its last member; "
                       f"{extent.length - tar.offset} bytes follow it")
    except (tarfile.TarError, OSError) as error:
        if not entries:
            detail = (f"{name}: cannot read: {error.strerror}" if isinstance(error, OSError)
                      else _not_a_tar(name, _first_bytes(extent.path), error))
            found.rejects.append(Reject("", "bad-archive", name, "", detail))
            return
        cut = f"{error} after {len(entries)} members"
    if cut is not None:
        found.rejects.append(Reject("", "truncated", name, "", (
            f"{name} is cut off ({cut}): the zips and pieces before the cut are read; "
            "download it again for the rest")))
    _collect(entries, name, found)


def _first_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(64)


def _tar_end_found(extent: Extent, end: int) -> bool:
    """Whether two zero blocks (the end-of-archive marker) follow the last member at `end`."""
    with open(extent.path, "rb") as handle:
        handle.seek(end)
        marker = handle.read(1024)
    return len(marker) == 1024 and not any(marker)


def _not_a_tar(name: str, start: bytes, error: Exception) -> str:
    text = start.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"{")):
        return (f"{name} is not a tar file but a web page or error message (starts with "
                f"{start[:30]!r}): the download probably failed or its permission expired; "
                "download it again")
    return f"{name} is not a readable tar file: {error}"


def _pread_fully(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, fewer only at the end of the file: one pread returns at most
    ~2 GiB on Linux, so a larger read takes several."""
    parts: list[bytes] = []
    done = 0
    while done < size:
        part = os.pread(fd, size - done, offset + done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)  # one part (the usual case) is returned as it is, not copied


class ArchiveReader:
    """Reads bytes of archives and members with positioned reads on cached descriptors.

    Each process makes its own reader: file descriptors are never shared across fork.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._inflated: dict[str, bytes] = {}

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._inflated.clear()

    def pread(self, archive: Archive, size: int, offset: int) -> bytes:
        """Up to `size` bytes at `offset` of the archive (fewer only at its end)."""
        if archive.parent is not None:
            return self._nested_bytes(archive)[offset : offset + size]
        chunks = []
        start = 0
        for extent in archive.extents:
            end = start + extent.length
            if offset < end and size > 0:
                skip = max(0, offset - start)
                take = min(size, extent.length - skip)
                chunk = bytes(take) if extent.path is None else _pread_fully(
                    self._fd(extent.path), take, extent.offset + skip)
                chunks.append(chunk)
                size -= len(chunk)
                offset += len(chunk)
                if len(chunk) < take:
                    break
            start = end
        return b"".join(chunks)

    def read(self, member: Member) -> bytes:
        """Return the member's uncompressed bytes, CRC-checked; raise MemberError if unusable."""
        # Small members come with their header in one read; large ones are read on their own,
        # so the payload is not copied out of a bigger buffer.
        inline = member.compressed_size if member.compressed_size <= INLINE_READ else 0
        return self._read(member, None, 0, inline)

    def read_many(self, members: list[Member]) -> Iterator[tuple[Member, bytes | MemberError]]:
        """Each member with its bytes or its MemberError, in order; neighbours share one read.

        For many small members (400k labels), one pread per window of neighbours instead of one
        per member; members should come sorted by archive and offset.
        """
        i = 0
        while i < len(members):
            first = members[i]
            end, j = _upper_end(first), i + 1
            while j < len(members) and members[j].archive is first.archive \
                    and first.header_offset <= members[j].header_offset < end + WINDOW_GAP \
                    and _upper_end(members[j]) - first.header_offset <= WINDOW:
                end, j = max(end, _upper_end(members[j])), j + 1
            window = b""
            if j - i > 1:
                try:
                    window = self.pread(first.archive, end - first.header_offset,
                                        first.header_offset)
                except OSError:
                    window = b""
            for member in members[i:j]:
                try:
                    yield member, self._read(member, window,
                                             member.header_offset - first.header_offset,
                                             member.compressed_size)
                except MemberError as error:
                    yield member, error
            i = j

    def _read(self, member: Member, window: bytes | None, at: int, inline: int) -> bytes:
        """The member's bytes from `window[at:]` when it holds them, else from the archive."""
        if member.problem is not None:
            raise MemberError(*member.problem)
        try:
            chunk = memoryview(window)[at:] if window else self.pread(
                member.archive, LOCAL_HEADER_SIZE + member.raw_name_len + LOCAL_SLACK + inline,
                member.header_offset)
            if len(chunk) < LOCAL_HEADER_SIZE or chunk[:4] != b"PK\x03\x04":
                raise MemberError("bad-crc", f"no local header at offset {member.header_offset}")
            start = LOCAL_HEADER_SIZE + int.from_bytes(chunk[26:28], "little") \
                + int.from_bytes(chunk[28:30], "little")
            if start + member.compressed_size <= len(chunk):
                raw = bytes(chunk[start : start + member.compressed_size])
            else:
                # Not all in the chunk (a large member): one read of exactly the payload, so its
                # bytes are not copied again; the few bytes already read are read twice.
                raw = self.pread(member.archive, member.compressed_size,
                                 member.header_offset + start)
        except OSError as error:
            raise MemberError("bad-crc", f"read error: {error}") from None
        if len(raw) != member.compressed_size:
            raise MemberError("truncated", "member data is cut off")
        data = inflate(raw, member.method, member.file_size)
        if len(data) != member.file_size:
            raise MemberError("bad-crc", f"size {len(data)} != {member.file_size} in directory")
        crc = deflate.crc32(data)
        if crc != member.crc32:
            raise MemberError("bad-crc", f"crc32 {crc:08x} != {member.crc32:08x} in directory")
        return data

    def _nested_bytes(self, archive: Archive) -> bytes:
        """A deflated zip inside a zip is inflated once and kept while it is in use.

        The cache holds at most MAX_NESTED_INFLATE bytes: the least recently used goes first.
        """
        data = self._inflated.pop(archive.name, None)
        if data is None:
            assert archive.parent is not None
            data = self.read(archive.parent)
            while self._inflated and sum(map(len, self._inflated.values())) + len(data) \
                    > MAX_NESTED_INFLATE:
                del self._inflated[next(iter(self._inflated))]
        self._inflated[archive.name] = data
        return data

    def _fd(self, path: Path) -> int:
        """An open descriptor for `path`; the least recently used is closed past MAX_OPEN_FILES.

        A zip in small pieces can be thousands of files: keeping all open would hit the limit.
        """
        fd = self._fds.pop(path, None)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_FILES:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd  # (re)inserted last: dict order is the recency order
        return fd


def _upper_end(member: Member) -> int:
    """Where a member's bytes end at the latest (its local extra field may be a little longer)."""
    return member.header_offset + LOCAL_HEADER_SIZE + member.raw_name_len + LOCAL_SLACK \
        + member.compressed_size


def inflate(raw: bytes, method: int, size: int) -> bytes:
    """Uncompress member data into exactly `size` bytes, never more (bomb-safe).

    libdeflate (`deflate`) inflates about twice as fast as zlib here and needs the size up front,
    which the central directory gives; data that inflates to another size is an error.
    """
    if method == METHOD_STORED:
        return raw
    try:
        if method == METHOD_DEFLATED:
            return deflate.deflate_decompress(raw, size) if size else b""
        if method == METHOD_DEFLATE64:
            return _inflate64(raw, size)
    except (deflate.DeflateError, ValueError) as error:
        raise MemberError("bad-crc", f"inflate failed: {error or 'corrupt or wrong size'}"
                          ) from None
    raise MemberError("unsupported-method", f"compression method {method}")


def _inflate64(raw: bytes, size: int) -> bytes:
    """Deflate64 has no output limit: feed small input chunks, stop once past `size` bytes."""
    import inflate64  # Deflate64 is rare; its import costs ~40 ms (importlib.metadata)

    inflater = inflate64.Inflater()
    out: list[bytes] = []
    produced = 0
    for start in range(0, len(raw), INFLATE64_CHUNK):
        out.append(inflater.inflate(raw[start : start + INFLATE64_CHUNK]))
        produced += len(out[-1])
        if produced > size or inflater.eof:
            break
    return b"".join(out)
