"""Turn one planned shard into a tar file: read members, check them, write plain USTAR.

A shard is the unit of work (and later of parallelism and resume). It is written under a
temporary name, flushed, then renamed, so a file named `shard-NNNNNN.tar` is always complete.
Headers are USTAR only (no PAX), with fixed mtime, uid/gid 0 and mode 0444, so that GNU tar,
webdataset and wids (which reads only the 100-byte name field) all read the same thing, and the
same inputs give the same bytes.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import struct
import sys
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import deflate
import numpy as np

from .archives.model import Archive, Member
from .archives.reader import ArchiveReader
from .errors import MemberError
from .plan.pairing import Sample, member_refs
from .profiles import strip_bom
from .rejects import Reason, Reject

BLOCK = 512
TAR_END_SIZE = 2 * BLOCK
MTIME = 0
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
JPEG_SOS = 0xDA
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IHDR, PNG_IDAT, PNG_IEND = b"IHDR", b"IDAT", b"IEND"
PNG_IHDR_LENGTH = 13
PNG_CHUNK_HEAD = struct.Struct(">I4s")  # length, type; then the data and a 4-byte CRC
PNG_CHUNK_OVERHEAD = PNG_CHUNK_HEAD.size + 4
CLASS_BYTES = {0: b"0", 1: b"1"}
PR_SET_PDEATHSIG = 1
SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_STEP = 32 * 2**20
UNPUBLISHED_PER_WORKER = 2  # shards written or being written, not yet durable
TAIL_BYTES = 2**20  # the journal records the CRC-32 of each shard's last MiB (resume checks it)
_SYNC_FILE_RANGE = getattr(ctypes.CDLL(None), "sync_file_range", None) \
    if sys.platform == "linux" else None


@dataclass
class ShardResult:
    """A finished shard: the samples written, in shard order, where each landed (offset, size,
    image and label CRC-32 as columns: enough for a manifest row and random access), its rejects
    and its size."""

    name: str
    samples: list[Sample]
    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64
    image_crc32s: np.ndarray  # uint32
    label_crc32s: np.ndarray  # uint32, of the label as written (without BOM)
    rejects: list[Reject] = field(default_factory=list)
    bytes_out: int = 0

    @property
    def split(self) -> str:
        return self.name.split("/", 1)[0]


LOCATION = np.dtype([("archive", "i4"), ("offset", "i8"), ("compressed", "i8"), ("size", "i8"),
                     ("crc", "u4"), ("method", "u2"), ("flags", "u2"), ("name_len", "u2")])
LOCATION_COLUMNS = (("offset", "header_offset"), ("compressed", "compressed_size"),
                    ("size", "file_size"), ("crc", "crc32"), ("method", "method"),
                    ("flags", "flags"), ("name_len", "raw_name_len"))


class ShardJob(NamedTuple):
    """One shard to write, as plain compact data: what a worker process is sent.

    Member locations are numpy records (a few dozen bytes per sample, pickled in one piece), so
    a worker holds far less than the plan's objects would take. Members already known to be
    unusable carry their problem in `problems`, keyed by (sample index, 0 image / 1 label).
    """

    name: str
    keys: list[str]
    image_exts: list[str]
    classes: bytes
    images: np.ndarray
    labels: np.ndarray
    problems: dict[tuple[int, int], tuple[str, str]]
    archives: tuple[Archive, ...]


def shard_job(name: str, samples: tuple[Sample, ...]) -> ShardJob:
    """The job for a shard, its member locations read from the tables' columns in bulk."""
    refs = member_refs(samples)
    records, count = refs.records(), len(samples)
    locations = np.zeros(2 * count, LOCATION)
    locations["archive"] = refs.which
    for ours, theirs in LOCATION_COLUMNS:
        locations[ours] = records[theirs]
    problems = {divmod(i, count)[::-1]: problem for i, problem in refs.problems().items()}
    return ShardJob(name, [s.key for s in samples], [s.image_ext for s in samples],
                    b"".join(CLASS_BYTES[s.fields.label] for s in samples),
                    locations[:count], locations[count:], problems,
                    tuple(table.archive for table in refs.tables))


def expand(samples: tuple[Sample, ...], entry: dict) -> ShardResult:
    """The ShardResult of a shard's entry (from a worker, or the journal), with the plan's samples.

    Entries name samples by key (`[key, offset, size, image CRC-32, label CRC-32]`) and rejects
    by sample index; the names of the rejected members come from the plan, so workers never need
    them. Raises ValueError for an entry of another shape (a journal of an older build).
    """
    by_key = {sample.key: sample for sample in samples}
    rows = entry["samples"]
    numbers = np.array([row[1:] for row in rows], np.int64).reshape(len(rows), 4)
    rejects = [Reject(samples[i].key, reason, member.archive.name, member.name, detail)
               for i, reason, detail in entry["rejects"]
               for member in (samples[i].image, samples[i].label)]
    return ShardResult(entry["shard"], [by_key[row[0]] for row in rows], numbers[:, 0],
                       numbers[:, 1], numbers[:, 2].astype(np.uint32),
                       numbers[:, 3].astype(np.uint32), rejects, entry["bytes"])


def padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def sample_tar_size(sample: Sample) -> int:
    """Bytes a sample takes in a tar: three headers plus the padded image, label and class."""
    return 3 * BLOCK + padded(sample.image_size) + padded(sample.label_size) + padded(1)


NAME_FIELD, SIZE_FIELD, CHECKSUM_FIELD = slice(0, 100), slice(124, 136), slice(148, 156)


def _header_template() -> tuple[bytes, int]:
    """tarfile's own USTAR header for our fixed fields, with name, size and checksum blanked.

    Returns the template and the checksum of its fixed part. Patching three fields is ~10x
    faster than `TarInfo.tobuf` (25 us per member), which matters at 1.2M members.
    """
    info = tarfile.TarInfo("")
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o444, MTIME, 0, 0, "", ""
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict"))
    header[NAME_FIELD] = bytes(100)
    header[SIZE_FIELD] = bytes(12)
    header[CHECKSUM_FIELD] = b" " * 8
    return bytes(header), sum(header)


HEADER_TEMPLATE, HEADER_SUM = _header_template()
MAX_MEMBER_SIZE = 8**11 - 1


def ustar_header(name: str, size: int) -> bytes:
    """A USTAR header for a read-only regular file, byte for byte what `tarfile` writes.

    Raises ValueError if the name is not ASCII or too long, or the size needs more than USTAR.
    """
    raw_name = name.encode("ascii")
    if len(raw_name) > 99 or size > MAX_MEMBER_SIZE:
        raise ValueError(f"{name!r} ({size} bytes) does not fit a USTAR header")
    size_field = b"%011o\0" % size
    checksum = HEADER_SUM + sum(raw_name) + sum(size_field)
    header = bytearray(HEADER_TEMPLATE)
    header[: len(raw_name)] = raw_name
    header[SIZE_FIELD] = size_field
    header[CHECKSUM_FIELD] = b"%06o\0 " % checksum
    return bytes(header)


def image_problem(data: bytes, ext: str) -> str | None:
    """Why the bytes are not a complete image of the named kind, or None if they look whole.

    Cheap structural check: JPEG has SOI, a marker chain up to SOS and an EOI after it; PNG is
    walked chunk by chunk (see `_png_problem`). Decoding pixels would cost more than the whole
    conversion.
    """
    if ext == "png":
        return _png_problem(data)
    if not data.startswith(JPEG_SOI):
        return "not a JPEG (no SOI marker)"
    scan_start = _jpeg_scan_start(data)
    if scan_start is None:
        return "JPEG is cut off before its image data (no SOS marker)"
    if data.rfind(JPEG_EOI, scan_start) < 0:
        return "JPEG is cut off (no EOI marker after the image data)"
    return None


def _png_problem(data: bytes) -> str | None:
    """Signature, IHDR (13 bytes) first, every chunk (length, type, data, CRC) within the bytes,
    an IDAT, and IEND last, ending exactly at the end: bytes after IEND are refused too (real
    PNGs end there, and a chunk after IEND means the file is not what it claims). CRCs are not
    checked: a bad image CRC in the zip is caught by the member's CRC-32 already.
    """
    if not data.startswith(PNG_SIGNATURE):
        return "not a PNG (no PNG signature)"
    pos, seen_idat = len(PNG_SIGNATURE), False
    while pos + PNG_CHUNK_OVERHEAD <= len(data):
        length, chunk_type = PNG_CHUNK_HEAD.unpack_from(data, pos)
        end = pos + PNG_CHUNK_OVERHEAD + length
        if end > len(data):
            return (f"PNG is cut off (its {chunk_type.decode('latin-1')!r} chunk at offset {pos} "
                    f"runs {end - len(data)} bytes past the end)")
        if pos == len(PNG_SIGNATURE) and (chunk_type != PNG_IHDR or length != PNG_IHDR_LENGTH):
            return "PNG does not start with an IHDR chunk of 13 bytes"
        if chunk_type == PNG_IEND:
            if not seen_idat:
                return "PNG has no IDAT chunk before IEND"
            if end != len(data):
                return f"PNG has {len(data) - end} bytes after its IEND chunk"
            return None
        seen_idat = seen_idat or chunk_type == PNG_IDAT
        pos = end
    return "PNG is cut off (no IEND chunk)"


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset just past the first SOS segment header, walking the marker segments from SOI."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == JPEG_SOS:
            return pos + 2 + length
        pos += 2 + length
    return None


Job = tuple[str, tuple[Sample, ...]]
_WORKER_READER: ArchiveReader | None = None


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Worker processes for writing shards, forked now, while this process is still small.

    Forking after planning would map the whole plan into every worker (counted again in each
    one's RSS); forked first, a worker holds only the shards it is sent. None for one worker.
    However the block ends (done, error, Ctrl-C, a worker killed), no worker outlives it.
    """
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"),
                               initializer=_worker_setup, initargs=(os.getpid(),))
    try:
        pool.submit(int).result()  # with fork, the first task starts every worker at once
        yield pool
    finally:
        # Stop the workers first (SIGKILL: they ignore SIGTERM); the pool then fails what was
        # left, and shuts down at once.
        for child in multiprocessing.active_children():
            child.kill()
        pool.shutdown(wait=True)


def write_shards(jobs: list[Job], out_dir: Path, pool: ProcessPoolExecutor | None,
                 on_published: Callable[[dict], None], workers: int = 1) -> None:
    """Write every (shard name, samples) job; `on_published(entry)` as each shard is in place.

    With a pool (of `workers` processes), each worker is sent a compact ShardJob and writes
    whole shards with its own file descriptors. A shard is written under a temporary name; one
    thread of this process then makes it durable, renames it into place and calls
    `on_published` (`publish`), so writers do not wait for the disk, unless it falls behind: at
    most UNPUBLISHED_PER_WORKER shards per writer are being written or waiting to be published,
    so a kill -9 or a power cut costs only those. However this ends (done, an error, Ctrl-C),
    every shard already written is published before it returns or raises; stopping the workers
    is left to `worker_pool`.
    """
    executor = pool if len(jobs) > 1 else None  # a single shard is written here
    limit = UNPUBLISHED_PER_WORKER * (1 if executor is None else workers)
    todo = deque(jobs)
    writing: set[Future[dict]] = set()
    publishing: set[Future[None]] = set()
    with ThreadPoolExecutor(1, thread_name_prefix="shardify-publish") as publisher, \
            ArchiveReader() as reader:

        def start(name: str, samples: tuple[Sample, ...]) -> Future[dict]:
            if executor is not None:
                return executor.submit(_write_job, shard_job(name, samples), out_dir)
            written: Future[dict] = Future()
            written.set_result(write_shard(shard_job(name, samples), out_dir, reader))
            return written

        def settle() -> None:
            """Hand each written shard to the publisher; a failed write or publish raises."""
            for future in [future for future in writing if future.done()]:
                writing.discard(future)
                publishing.add(publisher.submit(publish, out_dir, future.result(), on_published))
            for future in [future for future in publishing if future.done()]:
                publishing.discard(future)
                future.result()

        try:
            while True:
                settle()
                while todo and len(writing) + len(publishing) < limit:
                    writing.add(start(*todo.popleft()))
                    settle()
                if not writing and not publishing:
                    return
                wait(writing | publishing, return_when=FIRST_COMPLETED)
        finally:
            for future in writing:  # written, but not handed over yet when this stopped
                if future.done() and not future.cancelled() and future.exception() is None:
                    publisher.submit(publish, out_dir, future.result(), on_published)


def _worker_setup(parent: int) -> None:
    """Workers leave Ctrl-C and SIGTERM (sent to every process by `timeout`, systemd) to the
    main process `parent`, which stops them; they die with it if it is killed.

    The death signal only covers a parent that dies after it is set: a parent already gone
    (killed between the fork and here) shows as another parent, and the worker exits now
    instead of waiting forever for work, holding the caller's stdout and stderr.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc.disable()  # plan records hold no cycles; collecting them would only cost time
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _write_job(job: ShardJob, out_dir: Path) -> dict:
    global _WORKER_READER
    if _WORKER_READER is None:
        _WORKER_READER = ArchiveReader()
    return write_shard(job, out_dir, _WORKER_READER)


def partial_path(out_dir: Path, name: str) -> Path:
    """Where shard `name` is written before `publish` renames it into place."""
    final = out_dir / name
    return final.with_name(f".{final.name}.partial")


def write_shard(job: ShardJob, out_dir: Path, reader: ArchiveReader) -> dict:
    """Write shard `job.name` to its partial path; return its entry (see `expand`).

    Samples whose members fail a check are left out and listed as rejects.
    """
    partial = partial_path(out_dir, job.name)
    partial.parent.mkdir(parents=True, exist_ok=True)
    written: list[list] = []
    rejects: list[list] = []
    images, labels = job.images.tolist(), job.labels.tolist()
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = flushed = 0
        for i, key in enumerate(job.keys):
            image = _member(job, images[i], job.problems.get((i, 0)))
            label = _member(job, labels[i], job.problems.get((i, 1)))
            payloads = _read_sample(reader, image, label, job.image_exts[i])
            if isinstance(payloads, list):
                rejects.append([i, *payloads])
                continue
            chunks = _sample_chunks(key, job.image_exts[i], job.classes[i : i + 1], *payloads)
            size = _write_all(fd, chunks)
            written.append([key, offset, size, image.crc32, deflate.crc32(payloads[1])])
            offset += size
            if offset - flushed >= WRITEBACK_STEP:
                _start_writeback(fd, flushed, offset - flushed)
                flushed = offset
        _write_all(fd, [bytes(TAR_END_SIZE)])
        size = offset + TAR_END_SIZE
        tail = os.pread(fd, TAIL_BYTES, max(0, size - TAIL_BYTES))  # from the page cache
    except BaseException:
        os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    os.close(fd)
    return {"shard": job.name, "bytes": size, "tail_crc32": deflate.crc32(tail),
            "samples": written, "rejects": rejects}


def publish(out_dir: Path, entry: dict, on_published: Callable[[dict], None]) -> None:
    """Move a written shard into place, then `on_published(entry)`."""
    move_into_place(partial_path(out_dir, entry["shard"]), out_dir / entry["shard"])
    on_published(entry)


def move_into_place(partial: Path, final: Path) -> None:
    """Flush a written file to disk, rename it to `final`, then sync the folder: after a power
    cut, `final` is there complete or not at all (shards, and the index files too)."""
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(partial, final)
    _fsync_dir(final.parent)


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a written range to disk now, without waiting (Linux sync_file_range).

    The final fdatasync then waits only for the last few MiB instead of the whole shard, so
    making each shard durable overlaps with reading the next samples.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, ctypes.c_int64(offset), ctypes.c_int64(length),
                         SYNC_FILE_RANGE_WRITE)


def _member(job: ShardJob, location: tuple, problem: tuple[str, str] | None) -> Member:
    archive, offset, compressed, size, crc, method, flags, name_len = location
    return Member(job.archives[archive], "", offset, compressed, size, crc, method, flags,
                  name_len, problem)


def _write_all(fd: int, chunks: list[bytes]) -> int:
    """writev until every byte is written (a regular file may take a large write in parts)."""
    total = sum(map(len, chunks))
    done = os.writev(fd, chunks)
    if done < total:
        rest = b"".join(chunks)[done:]
        while rest:
            rest = rest[os.write(fd, rest):]
    return total


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: after a power cut the shard is there under its final name."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_sample(reader: ArchiveReader, image: Member, label: Member,
                 ext: str) -> tuple[bytes, bytes] | list[str]:
    """Both payloads, checked (label without BOM); or [reason, detail] if the pair is rejected."""
    try:
        image_bytes = reader.read(image)
    except MemberError as error:
        return [error.reason, f"image: {error}"]
    problem = image_problem(image_bytes, ext)
    if problem:
        return [Reason.BAD_IMAGE, problem]
    try:
        label_bytes = reader.read(label)
    except MemberError as error:
        return [error.reason, f"label: {error}"]
    return image_bytes, strip_bom(label_bytes)


def _sample_chunks(key: str, ext: str, cls: bytes, image: bytes, label: bytes) -> list[bytes]:
    """Header, payload and padding of the image, label and class members, in that order."""
    chunks: list[bytes] = []
    for member_ext, payload in ((ext, image), ("json", label), ("cls", cls)):
        chunks.append(ustar_header(f"{key}.{member_ext}", len(payload)))
        chunks.append(payload)
        chunks.append(bytes(padded(len(payload)) - len(payload)))
    return chunks
