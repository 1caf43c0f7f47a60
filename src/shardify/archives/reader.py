"""Reading archives: positioned reads on read-only descriptors, inflate, CRC checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import deflate

from ..errors import MemberError
from ..rejects import Reason
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
        self._inflated: dict[str, Payload] = {}

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close_files()
        self._inflated.clear()

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
                chunk = bytes(take) if extent.path is None else _pread_fully(
                    self._fd(extent.path), take, extent.offset + skip)
                chunks.append(chunk)
                size -= len(chunk)
                offset += len(chunk)
                if len(chunk) < take:
                    break
            start = end
        return b"".join(chunks)

    def read(self, member: Member) -> Payload:
        """Return the member's uncompressed bytes, CRC-checked; raise MemberError if unusable."""
        # Small members come with their header in one read; large ones are read on their own,
        # so the payload is not copied out of a bigger buffer.
        inline = member.compressed_size if member.compressed_size <= INLINE_READ else 0
        return self._read(member, None, 0, inline)

    def read_many(self, members: list[Member]) -> Iterator[tuple[Member, Payload | MemberError]]:
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
        except FileNotFoundError:
            raise  # the source itself is gone (deleted while in use): no reject, an error
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
