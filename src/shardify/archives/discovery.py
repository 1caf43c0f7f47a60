"""Find the archives under the SOURCE arguments, whatever shape the download has, and read them.

An archive is a sequence of byte ranges (extents) in files on disk: a plain zip is one extent; the
download tool's offset-named pieces, a multi-volume set or a zip inside `download.tar` are several
extents or a slice of the tar; a stored zip inside a zip is a slice of its parent. Nothing is ever
merged, unpacked or written next to the sources: every read is a `pread` on a read-only descriptor,
or a ranged request for files in remote storage (an fsspec URL such as `s3://bucket/prefix`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from ..errors import UsageError
from ..pathnames import path_text
from ..rejects import Reason, Reject
from ..storage import RemotePath, location, storage_errors
from .model import (
    Archive,
    Extent,
)

PIECE = re.compile(r"^(?P<zip>.+\.zip)\.part(?P<offset>\d+)$", re.IGNORECASE)
VOLUME = re.compile(r"^(?P<stem>.+)\.z(?P<number>\d{2,})$", re.IGNORECASE)
TAR_READAHEAD = 2**16


@dataclass
class Discovery:
    """The archives found, and the inputs that could not be made into an archive at all."""

    archives: list[Archive] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def find_archives(sources: list[str],
                  storage_options: dict[str, object] | None = None) -> Discovery:
    """Resolve SOURCE arguments (folders, zips, pieces, volumes, tars) to archives.

    A SOURCE may be an fsspec URL (`s3://bucket/prefix`, opened with `storage_options`): its
    files are listed with their sizes and read in place, as local ones are. Raises
    FileNotFoundError for a SOURCE that does not exist, UsageError for remote storage that
    cannot be listed (access denied, unreachable).
    """
    found = Discovery()
    seen: set[Path | str] = set()
    for source in sources:
        where = location(source, storage_options)
        files = _remote_files(where) if isinstance(where, RemotePath) else _local_files(
            where, source, found)
        fresh = {name: extent for name, extent in files.items() if _real(extent) not in seen}
        seen.update(map(_real, fresh.values()))
        _collect(fresh, "", found)
    found.archives = _unique_names(found.archives)
    return found


def _real(extent: Extent) -> Path | str:
    """What tells two ways to the same file apart: its resolved path, or its URL."""
    path = extent.path
    assert path is not None  # a file found, never a hole
    return path.url if isinstance(path, RemotePath) else path.resolve()


def _local_files(path: Path, source: str, found: Discovery) -> dict[str, Extent]:
    """The files of a local SOURCE (`path`, given as `source`) by name below it (for a file:
    the other files of its set beside it)."""
    if path.is_dir():
        files = _walk(path, found)
        root = path
    elif path.is_file():
        # A piece or volume named alone brings the rest of its set from the same folder.
        files = sorted(p for p in path.parent.iterdir() if p.is_file()
                       and _set_name(p.name) == _set_name(path.name))
        root = path.parent
    elif os.path.lexists(path):
        raise FileNotFoundError(f"source {path_text(source)} {_not_a_file(path)}")
    else:
        raise FileNotFoundError(f"source not found: {path_text(source)}")
    return {p.relative_to(root).as_posix(): Extent(p, 0, p.stat().st_size) for p in files}


def _remote_files(source: RemotePath) -> dict[str, Extent]:
    """The files of a remote SOURCE by name below it (for a file: the other files of its set
    beside it), from one recursive listing with sizes."""
    fs = source.fs()
    try:
        fs.invalidate_cache()  # a listing kept from earlier in this process may be stale
        info = fs.info(source.path)
        if info["type"] == "file":
            root, _, base = info["name"].rpartition("/")
            listing = {entry["name"]: entry for entry in fs.ls(root, detail=True)
                       if _set_name(entry["name"].rpartition("/")[2]) == _set_name(base)}
        else:
            root = info["name"]
            listing = fs.find(root, detail=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"source not found: {source}") from None
    except PermissionError as error:
        raise UsageError(f"source {source}: access denied ({error}): check the credentials "
                         "(environment, ~/.aws, --storage-option)") from None
    except storage_errors() as error:
        raise UsageError(f"source {source} cannot be listed: {error}") from None
    return {name[len(root):].lstrip("/"): Extent(RemotePath(source.protocol, name,
                                                            source.options), 0, entry["size"])
            for name, entry in sorted(listing.items())
            if entry["type"] == "file" and not name.endswith("/")}


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
        found.rejects.append(Reject("", Reason.BAD_ARCHIVE, name, "",
                                    detail.replace("{}", name, 1)))

    files: list[Path] = []
    listed: set[tuple[int, int]] = set()
    folders: list[Path] = [folder]
    linked: list[Path] = []
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
    for zip_name, numbered in volumes.items():
        last = zips.pop(zip_name, None)
        numbers = sorted(number for number, _ in numbered)
        if last is None or numbers != list(range(1, len(numbers) + 1)):
            found.rejects.append(Reject("", Reason.BAD_ARCHIVE, zip_name, "", _volume_problem(
                zip_name, numbers, last is not None)))
            continue
        extents = (*(extent for _, extent in sorted(numbered, key=lambda p: p[0])), last)
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
    problem: Exception | None = None
    assert extent.path is not None  # a tar file, never a hole
    try:
        with _opened(extent.path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
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
            if cut is None and not _tar_end_found(handle, tar.offset):
                cut = (f"no end-of-archive blocks after its last member; "
                       f"{extent.length - tar.offset} bytes follow it")
    except tarfile.TarError as error:
        problem = error
    except storage_errors() as error:
        problem = error
    if problem is not None:
        if not entries:
            detail = (_not_a_tar(name, _first_bytes(extent.path), problem)
                      if isinstance(problem, tarfile.TarError) else
                      f"{name}: cannot read: {getattr(problem, 'strerror', None) or problem}")
            found.rejects.append(Reject("", Reason.BAD_ARCHIVE, name, "", detail))
            return
        cut = f"{problem} after {len(entries)} members"
    if cut is not None:
        found.rejects.append(Reject("", Reason.TRUNCATED, name, "", (
            f"{name} is cut off ({cut}): the zips and pieces before the cut are read; "
            "download it again for the rest")))
    _collect(entries, name, found)


def _opened(path: Path | RemotePath) -> BinaryIO:
    """A file opened for reading: a remote one reads ahead a little at each seek, so each tar
    header costs one request."""
    if isinstance(path, RemotePath):
        opened: BinaryIO = path.fs().open(path.path, "rb", block_size=TAR_READAHEAD,
                                          cache_type="readahead")
        return opened
    return open(path, "rb")


def _first_bytes(path: Path | RemotePath) -> bytes:
    with _opened(path) as handle:
        return handle.read(64)


def _tar_end_found(handle: BinaryIO, end: int) -> bool:
    """Whether two zero blocks (the end-of-archive marker) follow the last member at `end`."""
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
