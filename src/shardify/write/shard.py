"""Write one planned shard: read its members, check them, write the tar into a staging file.

A shard is the unit of work, of parallelism, of progress and of resume. A worker gets a compact
`ShardJob` (plain numpy records, never an open ZipFile) and returns the shard's entry: what was
really written (each sample's offset, sizes and CRCs, the rejects, the shard's size and the CRC
of its last MiB, the labels' JSON type). That entry, not the plan, is the truth the manifest and
the journal record.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import deflate
import numpy as np

from ..archives.model import MEMBER_COLUMNS, Archive, Member
from ..archives.reader import ArchiveReader, Payload
from ..errors import MemberError
from ..plan.pairing import Sample, member_refs
from ..profiles import Geometry, strip_bom
from ..rejects import Reason, Reject
from ..transform.options import TransformOptions
from .images import image_problem
from .label_types import NULL, label_type, merge
from .tar import TAR_END_SIZE, class_bytes, sample_chunks

SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_STEP = 32 * 2**20
TAIL_BYTES = 2**20  # the entry records the CRC-32 of the shard's last MiB (resume checks it)
_SYNC_FILE_RANGE = getattr(ctypes.CDLL(None), "sync_file_range", None) \
    if sys.platform == "linux" else None
ENTRY_COLUMNS = 6  # per written sample, after its key (see `expand`)
# With a transform, then: width, height, source width, source height, crop box (x0, y0, x1, y1;
# -1s for none), unmapped point lists, and last the scale (a float).
PLACEMENT_COLUMNS = 9
WIDTH, HEIGHT, SOURCE_WIDTH, SOURCE_HEIGHT, UNMAPPED = 0, 1, 2, 3, 8
CROP_BOX = slice(4, 8)
NO_BOX = (-1, -1, -1, -1)


class ShardSink(Protocol):
    """Where a shard's bytes go until it is published (the output store)."""

    def create_staged_shard(self, name: str) -> int:
        """A new, empty staging file for shard `name`, opened for writing."""
        ...

    def discard_staged_shard(self, name: str) -> None:
        ...

    def finish_staged_shard(self, name: str) -> None:
        """The writer is done with shard `name` (on the machine that wrote it: an object store
        uploads it from there, so a cluster's tasks need no shared disk with the driver)."""
        ...


@dataclass
class ShardResult:
    """A finished shard: the samples written, in shard order, and per sample (as columns) where
    it landed and what was written: enough for a manifest row and random access."""

    name: str
    samples: list[Sample]
    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64: the sample's three members in the shard
    image_sizes: np.ndarray  # int64
    image_crc32s: np.ndarray  # uint32
    label_sizes: np.ndarray  # int64, of the label as written (without BOM)
    label_crc32s: np.ndarray  # uint32
    rejects: list[Reject] = field(default_factory=list)
    bytes_out: int = 0
    placements: np.ndarray | None = None  # int64 (samples, PLACEMENT_COLUMNS); None: as source
    scales: np.ndarray | None = None  # float64
    label_type: Any = NULL  # the JSON type of the labels written (see label_types)

    @property
    def split(self) -> str:
        return self.name.split("/", 1)[0]


# A member's location in a job: which of the job's archives, then the member table's columns.
LOCATION = np.dtype([("archive", "<i4"), *MEMBER_COLUMNS.descr])


class ShardJob(NamedTuple):
    """One shard to write, as plain compact data: what a worker process is sent.

    Member locations are numpy records (a few dozen bytes per sample, pickled in one piece), so
    a worker holds far less than the plan's objects would take. Members already known to be
    unusable carry their problem in `problems`, keyed by (sample index, 0 image / 1 label).
    """

    name: str
    keys: list[str]
    image_exts: list[str]
    classes: list[bytes]
    images: np.ndarray
    labels: np.ndarray
    problems: dict[tuple[int, int], tuple[Reason, str]]
    archives: tuple[Archive, ...]
    transform: tuple[TransformOptions, Geometry] | None = None  # None: sources' bytes as they are
    limit: int | None = None  # bytes: a sample that would pass it starts a continuation shard
    made: dict[int, Made] | None = None  # samples the size probe already prepared, by index


def shard_job(name: str, samples: tuple[Sample, ...],
              transform: tuple[TransformOptions, Geometry] | None = None,
              limit: int | None = None, made: Mapping[str, Made] | None = None) -> ShardJob:
    """The job for a shard, its member locations read from the tables' columns in bulk;
    `made` (by key) are samples already prepared (the size probe's), not transformed again."""
    refs = member_refs(samples)
    records, count = refs.records(), len(samples)
    locations = np.zeros(2 * count, LOCATION)
    locations["archive"] = refs.which
    for column in MEMBER_COLUMNS.names or ():
        locations[column] = records[column]
    problems = {divmod(i, count)[::-1]: problem for i, problem in refs.problems().items()}
    return ShardJob(name, [s.key for s in samples], [s.image_ext for s in samples],
                    [class_bytes(s.fields.label) for s in samples],
                    locations[:count], locations[count:], problems,
                    tuple(table.archive for table in refs.tables), transform, limit,
                    {i: made[s.key] for i, s in enumerate(samples) if s.key in made}
                    if made else None)


def expand(samples: tuple[Sample, ...], entry: dict) -> ShardResult:
    """The ShardResult of a shard's entry (from a worker, or the journal), with the plan's samples.

    Entries name samples by key (`[key, offset, sample bytes, image bytes, image CRC-32, label
    bytes, label CRC-32]`) and rejects by sample index; the names of the rejected members come
    from the plan, so workers never need them. Raises ValueError for an entry that does not fit
    the plan (a damaged line), KeyError for one without the labels' type (an older build's).
    """
    by_key = {sample.key: sample for sample in samples}
    rows = entry["samples"]
    if not all(isinstance(row, list) and row and row[0] in by_key for row in rows) or not all(
            isinstance(i, int) and 0 <= i < len(samples) for i, _, _ in entry["rejects"]):
        raise ValueError(f"entry of {entry['shard']} does not fit the plan")
    numbers = np.array([row[1:1 + ENTRY_COLUMNS] for row in rows], np.int64).reshape(
        len(rows), ENTRY_COLUMNS)
    placements = scales = None
    if rows and len(rows[0]) > 1 + ENTRY_COLUMNS:
        tails = [row[1 + ENTRY_COLUMNS:] for row in rows]
        if not all(len(tail) == PLACEMENT_COLUMNS + 1 for tail in tails):
            raise ValueError(f"entry of {entry['shard']} does not fit the plan")
        placements = np.array([tail[:-1] for tail in tails], np.int64)
        scales = np.array([tail[-1] for tail in tails], np.float64)
    rejects = [Reject(samples[i].key, Reason(reason), member.archive.name, member.name, detail)
               for i, reason, detail in entry["rejects"]
               for member in (samples[i].image, samples[i].label)]
    crc = np.uint32
    return ShardResult(entry["shard"], [by_key[row[0]] for row in rows], numbers[:, 0],
                       numbers[:, 1], numbers[:, 2], numbers[:, 3].astype(crc), numbers[:, 4],
                       numbers[:, 5].astype(crc), rejects, entry["bytes"], placements, scales,
                       entry["label_type"])


def write_shard(job: ShardJob, sink: ShardSink, reader: ArchiveReader) -> dict:
    """Write shard `job.name` to its staging file; return its entry (see `expand`).

    Samples whose members fail a check are left out and listed as rejects. With a `limit`, a
    sample that would make a non-empty shard pass it ends the shard: the entry's `rest` is its
    index, and the samples from there on are the continuation shard's.
    """
    written: list[list] = []
    rejects: list[list] = []
    rest = None
    labels_type: Any = NULL
    images, labels = job.images.tolist(), job.labels.tolist()
    fd = sink.create_staged_shard(job.name)
    try:
        offset = flushed = 0
        with reader.reading_ahead(_remote_members(job, images, labels)):
            for i, key in enumerate(job.keys):
                sample = _prepared(job, i, images[i], labels[i], reader)
                if isinstance(sample, list):
                    rejects.append([i, *sample])
                    continue
                chunks = sample_chunks(key, sample.ext, sample.image, sample.label,
                                       job.classes[i])
                if job.limit is not None and written and \
                        offset + sum(map(len, chunks)) + TAR_END_SIZE > job.limit:
                    rest = i
                    break
                size = write_all(fd, chunks)
                written.append([key, offset, size, len(sample.image), sample.image_crc,
                                len(sample.label), deflate.crc32(sample.label),
                                *sample.placement])
                labels_type = merge(labels_type, label_type(sample.label))
                offset += size
                if offset - flushed >= WRITEBACK_STEP:
                    _start_writeback(fd, flushed, offset - flushed)
                    flushed = offset
        write_all(fd, [bytes(TAR_END_SIZE)])
        size = offset + TAR_END_SIZE
        tail = os.pread(fd, TAIL_BYTES, max(0, size - TAIL_BYTES))  # from the page cache
    except BaseException:
        os.close(fd)
        sink.discard_staged_shard(job.name)
        raise
    os.close(fd)
    if written:  # a shard with no sample is not kept (see convert's publish)
        sink.finish_staged_shard(job.name)
    entry = {"shard": job.name, "bytes": size, "tail_crc32": deflate.crc32(tail),
             "samples": written, "rejects": rejects, "label_type": labels_type}
    if rest is not None:
        entry["rest"] = rest
    return entry


def probe_shard(job: ShardJob, reader: ArchiveReader) -> list[Made]:
    """Transform a job's samples without writing them: what the planner's size estimate is
    measured on (`probe_sizes`), kept so that the writer does not transform them again."""
    assert job.transform is not None
    images, labels = job.images.tolist(), job.labels.tolist()
    with reader.reading_ahead(_remote_members(job, images, labels)):
        return [_prepared(job, i, images[i], labels[i], reader) for i in range(len(job.keys))]


def probe_sizes(made: Made) -> tuple[int, int, int, int] | None:
    """(source image bytes, source label bytes, written image bytes, written label bytes) of a
    probed sample, or None for one the writer rejects."""
    if isinstance(made, list):
        return None
    return (made.source_image_bytes, made.source_label_bytes, len(made.image),
            len(made.label))


class PreparedSample(NamedTuple):
    """A sample ready for its shard: what is written, and what it was made from."""

    ext: str
    image: Payload
    label: Payload
    image_crc: int
    placement: list  # the entry's PLACEMENT_COLUMNS and scale; empty without a transform
    source_image_bytes: int
    source_label_bytes: int


Made = PreparedSample | list  # a sample ready for its shard, or [reason, detail] of its reject


def _prepared(job: ShardJob, i: int, image_location: tuple, label_location: tuple,
              reader: ArchiveReader) -> PreparedSample | list:
    """Sample `i` of `job` read, checked and (if asked) transformed; or [reason, detail]."""
    if job.made is not None and i in job.made:
        return job.made[i]
    image = _member(job, image_location, job.problems.get((i, 0)))
    label = _member(job, label_location, job.problems.get((i, 1)))
    payloads = _read_sample(reader, image, label, job.image_exts[i])
    if isinstance(payloads, list):
        return payloads
    image_bytes, label_bytes = payloads
    ext = job.image_exts[i]
    if job.transform is None:
        return PreparedSample(ext, image_bytes, label_bytes, image.crc32, [], len(image_bytes),
                         len(label_bytes))
    from ..transform.sample import ImageError, LabelError, transform_sample  # Pillow: if needed

    try:
        done = transform_sample(image_bytes, label_bytes, ext, *job.transform)
    except ImageError as error:
        return [Reason.BAD_IMAGE, str(error)]
    except LabelError as error:
        return [Reason.BAD_LABEL, str(error)]
    placement = [done.width, done.height, done.source_width, done.source_height,
                 *(done.crop_box or NO_BOX), done.unmapped_point_lists, done.scale]
    return PreparedSample(job.transform[0].output_ext(ext), done.image, done.label,
                     deflate.crc32(done.image), placement, len(image_bytes), len(label_bytes))


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a written range to disk now, without waiting (Linux sync_file_range).

    The final fdatasync then waits only for the last few MiB instead of the whole shard, so
    making each shard durable overlaps with reading the next samples.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, ctypes.c_int64(offset), ctypes.c_int64(length),
                         SYNC_FILE_RANGE_WRITE)


def _remote_members(job: ShardJob, images: list[tuple], labels: list[tuple]) -> list[Member]:
    """The members the job will read, if its archives are remote: they are then fetched in
    windows of neighbours (`ArchiveReader.reading_ahead`), not one request each. Local reads
    need no plan."""
    if not any(archive.remote for archive in job.archives):
        return []
    made = job.made or {}
    return [_member(job, location, None) for i in range(len(job.keys)) if i not in made
            for role, location in enumerate((images[i], labels[i]))
            if (i, role) not in job.problems]


def _member(job: ShardJob, location: tuple, problem: tuple[Reason, str] | None) -> Member:
    """A Member record for reading, from a job's location record (names are not needed)."""
    archive, *columns = location
    return Member.at(job.archives[archive], "", columns, problem)


def write_all(fd: int, chunks: list[Payload]) -> int:
    """writev until every byte is written (a regular file may take a large write in parts)."""
    total = sum(map(len, chunks))
    done = os.writev(fd, chunks)
    if done < total:
        rest = b"".join(chunks)[done:]
        while rest:
            rest = rest[os.write(fd, rest):]
    return total


def _read_sample(reader: ArchiveReader, image: Member, label: Member,
                 ext: str) -> tuple[Payload, Payload] | list:
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
