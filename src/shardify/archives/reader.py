"""Reading archives: positioned reads on read-only descriptors, or ranged requests to remote
storage; inflate, CRC checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import deflate

from ..errors import MemberError, SourceUnreadable
from ..rejects import Reason
from ..storage import RemotePath, storage_errors
from .model import (
    METHOD_DEFLATE64,
    METHOD_DEFLATED,
    METHOD_STORED,
    Archive,
    Member,
)

LOCAL_HEADER_SIZE = 30
LOCAL_SLACK = 64  # room for a local extra field, so most members take a single pread
INLINE_READ = 64 * 2**10
WINDOW = 4 * 2**20  # read_many: bytes read at once for neighbouring small members
WINDOW_GAP = 64 * 2**10
MAX_NESTED_INFLATE = 512 * 2**20
MAX_OPEN_FILES = 64  # descriptors an ArchiveReader keeps open at once
Payload = bytes | bytearray  # a member's bytes (libdeflate inflates into a bytearray)
INFLATE64_CHUNK = 1024  # input per step: Deflate64 output past a lying size stays < ~30 MB
# Remote storage: a request costs about as much as a few MB of transfer, so neighbouring
# members are fetched together (gaps of up to REMOTE_GAP are read and dropped), and small reads
# (directory probes, local headers) fetch a whole REMOTE_BLOCK, kept for the reads that follow.
REMOTE_WINDOW = 16 * 2**20
REMOTE_GAP = 256 * 2**10
REMOTE_BLOCK = 64 * 2**10
KEPT_BLOCKS = 16  # blocks kept per reader (at most 1 MiB each: an archive's tail)
HELD_WINDOW_BYTES = 64 * 2**20  # read-ahead windows held at once (the least recently used go)


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


@dataclass(eq=False)
class _Window:
    """Neighbouring members of one archive, fetched in one request when the first is read.

    `waiting` maps each member not read yet ((archive id, header offset)) to where its bytes
    end at the latest; the bytes are dropped once all are read. Dropped early (to bound
    memory), the window is fetched again when next needed: only the span of those waiting.
    """

    archive: Archive
    waiting: dict[tuple[int, int], int]
    start: int = 0  # where `data` starts in the archive
    data: bytes | None = None


class ArchiveReader:
    """Reads bytes of archives and members with positioned reads on cached descriptors, or
    ranged requests for remote archives (`requests` counts them, `bytes_fetched` their bytes).

    Each process makes its own reader: file descriptors are never shared across fork (a remote
    filesystem is opened again in each process, see `storage`).
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._inflated: dict[str, Payload] = {}
        self._kept: list[tuple[RemotePath, int, bytes]] = []  # remote blocks, last used last
        self._ahead: dict[tuple[int, int], _Window] = {}
        self._held: dict[int, _Window] = {}  # windows holding bytes, least recently used first
        self.requests = 0
        self.bytes_fetched = 0

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close_files()
        self._inflated.clear()
        self._kept.clear()

    def close_files(self) -> None:
        """Close every cached descriptor: a source deleted while open would keep its space
        until then (`--consume-sources`)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def pread(self, archive: Archive, size: int, offset: int) -> bytes:
        """Up to `size` bytes at `offset` of the archive (fewer only at its end)."""
        if archive.parent is not None:
            return bytes(self._nested_bytes(archive)[offset : offset + size])
        chunks = []
        start = 0
        for extent in archive.extents:
            end = start + extent.length
            if offset < end and size > 0:
                skip = max(0, offset - start)
                take = min(size, extent.length - skip)
                path = extent.path
                if path is None:
                    chunk = bytes(take)
                elif isinstance(path, RemotePath):
                    chunk = self._remote_read(path, take, extent.offset + skip,
                                              extent.offset + extent.length)
                else:
                    chunk = _pread_fully(self._fd(path), take, extent.offset + skip)
                chunks.append(chunk)
                size -= len(chunk)
                offset += len(chunk)
                if len(chunk) < take:
                    break
            start = end
        return b"".join(chunks)

    def read(self, member: Member) -> Payload:
        """Return the member's uncompressed bytes, CRC-checked; raise MemberError if unusable."""
        if self._ahead:
            key = (id(member.archive), member.header_offset)
            window = self._ahead.pop(key, None)
            if window is not None and (data := self._window_bytes(window, key)):
                return self._read(member, data, member.header_offset - window.start,
                                  member.compressed_size)
        # Small members come with their header in one read; large ones are read on their own,
        # so the payload is not copied out of a bigger buffer. A remote member always comes
        # with its header: one request, not two.
        inline = member.compressed_size if member.compressed_size <= INLINE_READ \
            or member.archive.remote else 0
        return self._read(member, None, 0, inline)

    @contextmanager
    def reading_ahead(self, members: list[Member]) -> Iterator[None]:
        """Inside, `read` takes these members (of remote archives) from windows of neighbours:
        one request per window, made when the first of its members is read, in any order.

        At most HELD_WINDOW_BYTES are held: the least recently used window is dropped for a
        new one, and fetched again (its members not read yet) if needed later.
        """
        ahead = sorted({(id(m.archive), m.header_offset): m for m in members
                        if m.problem is None and m.archive.remote}.values(),
                       key=lambda m: (id(m.archive), m.header_offset))
        i = 0
        while i < len(ahead):
            j, _ = _neighbours(ahead, i, REMOTE_WINDOW, REMOTE_GAP)
            window = _Window(ahead[i].archive, {(id(m.archive), m.header_offset): _upper_end(m)
                                                for m in ahead[i:j]})
            self._ahead.update(dict.fromkeys(window.waiting, window))
            i = j
        try:
            yield
        finally:
            self._ahead.clear()
            self._held.clear()

    def read_many(self, members: list[Member]) -> Iterator[tuple[Member, Payload | MemberError]]:
        """Each member with its bytes or its MemberError, in order; neighbours share one read.

        For many small members (400k labels), one pread per window of neighbours instead of one
        per member; members should come sorted by archive and offset.
        """
        i = 0
        while i < len(members):
            first = members[i]
            j, end = _neighbours(members, i, *((REMOTE_WINDOW, REMOTE_GAP)
                                               if first.archive.remote else (WINDOW, WINDOW_GAP)))
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

    def _read(self, member: Member, window: bytes | None, at: int, inline: int) -> Payload:
        """The member's bytes from `window[at:]` when it holds them, else from the archive."""
        if member.problem is not None:
            raise MemberError(*member.problem)
        try:
            chunk = memoryview(window)[at:] if window else self.pread(
                member.archive, LOCAL_HEADER_SIZE + member.raw_name_len + LOCAL_SLACK + inline,
                member.header_offset)
            if len(chunk) < LOCAL_HEADER_SIZE or chunk[:4] != b"PK\x03\x04":
                raise MemberError(Reason.BAD_CRC,
                                  f"no local header at offset {member.header_offset}")
            start = LOCAL_HEADER_SIZE + int.from_bytes(chunk[26:28], "little") \
                + int.from_bytes(chunk[28:30], "little")
            if start + member.compressed_size <= len(chunk):
                raw = bytes(chunk[start : start + member.compressed_size])
            else:
                # Not all in the chunk (a large member): one read of exactly the payload, so its
                # bytes are not copied again; the few bytes already read are read twice.
                raw = self.pread(member.archive, member.compressed_size,
                                 member.header_offset + start)
        except (FileNotFoundError, SourceUnreadable):
            raise  # the source itself is gone or refused (not this member): an error
        except OSError as error:
            raise MemberError(Reason.BAD_CRC, f"read error: {error}") from None
        if len(raw) != member.compressed_size:
            raise MemberError(Reason.TRUNCATED, "member data is cut off")
        data = inflate(raw, member.method, member.file_size)
        if len(data) != member.file_size:
            raise MemberError(Reason.BAD_CRC,
                              f"size {len(data)} != {member.file_size} in directory")
        crc = deflate.crc32(data)
        if crc != member.crc32:
            raise MemberError(Reason.BAD_CRC, f"crc32 {crc:08x} != {member.crc32:08x} in directory")
        return data

    def prefetch(self, archive: Archive, size: int, offset: int) -> None:
        """Fetch `size` bytes at `offset` of a remote archive now (one request per file) and
        keep them: the many small reads that follow inside them (an end record, a Zip64
        locator, a central directory) cost no request. Nothing to do for local archives."""
        if not archive.remote:
            return
        start = 0
        for extent in archive.extents:
            lo, hi = max(offset, start), min(offset + size, start + extent.length)
            path = extent.path
            if lo < hi and isinstance(path, RemotePath):
                at = extent.offset + lo - start
                if self._kept_bytes(path, hi - lo, at) is None:
                    self._keep(path, at, self._fetch(path, hi - lo, at))
            start += extent.length

    def _remote_read(self, path: RemotePath, size: int, offset: int, limit: int) -> bytes:
        """`size` bytes at `offset` of a remote file, from a kept block if one holds them; a
        small read fetches a whole block (up to `limit`, its extent's end) and keeps it."""
        kept = self._kept_bytes(path, size, offset)
        if kept is not None:
            return kept
        if size >= REMOTE_BLOCK:
            return self._fetch(path, size, offset)
        block = self._fetch(path, min(REMOTE_BLOCK, limit - offset), offset)
        self._keep(path, offset, block)
        return block[:size]

    def _kept_bytes(self, path: RemotePath, size: int, offset: int) -> bytes | None:
        for i, (kept_path, start, block) in enumerate(self._kept):
            if kept_path == path and start <= offset and offset + size <= start + len(block):
                self._kept.append(self._kept.pop(i))
                return block[offset - start : offset - start + size]
        return None

    def _keep(self, path: RemotePath, offset: int, block: bytes) -> None:
        if len(self._kept) >= KEPT_BLOCKS:
            del self._kept[0]
        self._kept.append((path, offset, block))

    def _fetch(self, path: RemotePath, size: int, offset: int) -> bytes:
        """One ranged request; whatever storage raises becomes an OSError naming the file."""
        self.requests += 1
        try:
            data = path.fs().cat_file(path.path, start=offset, end=offset + size)
        except FileNotFoundError:
            raise
        except storage_errors() as error:
            raise SourceUnreadable(f"cannot read {path}: {error}") from None
        self.bytes_fetched += len(data)
        return bytes(data)

    def _window_bytes(self, window: _Window, key: tuple[int, int]) -> bytes:
        """The bytes of a read-ahead window holding member `key`, fetched if not held (b"" if
        that failed: the member is then read on its own); dropped once all its members are
        read."""
        if window.data is None:
            window.start = min(offset for _, offset in window.waiting)
            size = max(window.waiting.values()) - window.start
            held = sum(len(w.data or b"") for w in self._held.values())
            while self._held and held + size > HELD_WINDOW_BYTES:
                dropped = self._held.pop(next(iter(self._held)))
                held -= len(dropped.data or b"")
                dropped.data = None
            try:
                window.data = self.pread(window.archive, size, window.start)
            except OSError:
                window.data = b""
        self._held.pop(id(window), None)
        data = window.data
        del window.waiting[key]
        if window.waiting:
            self._held[id(window)] = window  # (re)inserted last: the most recently used
        else:
            window.data = None
        return data

    def _nested_bytes(self, archive: Archive) -> Payload:
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


def _neighbours(members: list[Member], i: int, limit: int, gap: int) -> tuple[int, int]:
    """(j, end): members[i:j] lie within `limit` bytes of the first's header, each at most
    `gap` bytes after the one before, in one archive; `end` is where their bytes end."""
    first = members[i]
    end, j = _upper_end(first), i + 1
    while j < len(members) and members[j].archive is first.archive \
            and first.header_offset <= members[j].header_offset < end + gap \
            and _upper_end(members[j]) - first.header_offset <= limit:
        end, j = max(end, _upper_end(members[j])), j + 1
    return j, end


def _upper_end(member: Member) -> int:
    """Where a member's bytes end at the latest (its local extra field may be a little longer)."""
    return member.header_offset + LOCAL_HEADER_SIZE + member.raw_name_len + LOCAL_SLACK \
        + member.compressed_size


def inflate(raw: bytes, method: int, size: int) -> Payload:
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
        raise MemberError(Reason.BAD_CRC, f"inflate failed: {error or 'corrupt or wrong size'}"
                          ) from None
    raise MemberError(Reason.UNSUPPORTED_METHOD, f"compression method {method}")


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
