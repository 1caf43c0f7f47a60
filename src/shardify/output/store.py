"""The output folder, OUT: every name in it, every write to it and every removal from it.

One owner, so that the guarantees hold everywhere: a file is written under a staging name,
flushed, renamed into place and its folder synced (after a power cut it is there whole or not
at all); shardify removes only the files it writes; one run at a time holds the lock; the
journal records each shard once it is in place. Readers (verify, report, loader) take the names
from here. `OutputStore` is OUT on a local POSIX filesystem; `output.remote.RemoteOutputStore`
is OUT at an fsspec URL (object storage); `output_store` picks one.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import deflate
import orjson

from ..errors import UsageError
from ..pathnames import path_text
from ..plan.split import SPLITS
from ..storage import Location, RemotePath, location
from ..write.shard import TAIL_BYTES

if TYPE_CHECKING:  # pyarrow is imported when a table is written, after the workers are forked
    import pyarrow as pa

    from .remote import RemoteOutputStore

MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
SUMMARY = "summary.json"
CARD = "README.md"  # the dataset card (see output.card)
CONSUMED = "consumed.json"  # what --consume-sources released and kept
STATE_DIR = ".shardify"
RUN_FILE = "run.json"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "lock"
PLAN_FILE = "plan.pickle"  # a consuming run's plan: it resumes without the sources it released
RELEASES_FILE = "released.jsonl"  # the sources a consuming run released, one line each
PARQUET_MAGIC = b"PAR1"
MANIFEST_MARKER = b"shardify"  # a key of the manifest's metadata (see output.manifest)
MAX_SUMMARY_BYTES = 64 * 2**20  # far above a real summary; a larger file is not one


def wids_index_name(split: str) -> str:
    return f"{split}.wids.json"


INDEX_FILES = (MANIFEST, REJECTS, CARD, CONSUMED, SUMMARY,
               *(wids_index_name(split) for split in SPLITS))


def shard_glob(split: str) -> str:
    """The pattern of a split's shard files, relative to OUT (continuations match it too)."""
    return f"{split}/shard-*.tar"


def shard_name(split: str, index: int) -> str:
    """A shard's path relative to OUT: what the manifest, summary and journal record."""
    return f"{split}/shard-{index:06d}.tar"


def continuation_name(name: str) -> str:
    """The shard that takes the samples a shard had no room for: `shard-000003.tar` ->
    `shard-000003_1.tar` -> `shard-000003_2.tar` (matched by `shard-*.tar`; `shard_order` sorts
    them right after the shard they continue)."""
    stem = name.removesuffix(".tar")
    base, _, part = stem.rpartition("_")
    if base and part.isdigit():
        return f"{base}_{int(part) + 1}.tar"
    return f"{stem}_1.tar"


def shard_order(name: str) -> tuple[str, int]:
    """A key that sorts shard names in the order they were written: each continuation right
    after the shard it continues, `_9` before `_10` (plain name order puts `_10` before `_2`)."""
    stem = name.removesuffix(".tar")
    base, _, part = stem.rpartition("_")
    return (base, int(part)) if base and part.isdigit() else (stem, 0)


def summary_beside(manifest: Path) -> Path:
    """Where `--manifest PATH` puts its summary: PATH's `.summary.json` sibling."""
    return manifest.with_suffix(".summary.json")


def is_shardify_manifest(path: Path) -> bool:
    """Whether `path` is a Parquet file whose metadata carries shardify's marker (read from its
    footer's bytes: no pyarrow before the workers are forked)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(PARQUET_MAGIC))
            size = handle.seek(0, os.SEEK_END)
            if head != PARQUET_MAGIC or size < 2 * len(PARQUET_MAGIC) + 4:
                return False
            handle.seek(size - 8)
            footer_length, tail = int.from_bytes(handle.read(4), "little"), handle.read(4)
            if tail != PARQUET_MAGIC or footer_length > size - 12:
                return False
            handle.seek(size - 8 - footer_length)
            return MANIFEST_MARKER in handle.read(footer_length)
    except OSError:
        return False


def is_shardify_summary(path: Path) -> bool:
    """Whether `path` is a summary JSON that shardify wrote (its version and splits in it)."""
    try:
        if path.stat().st_size > MAX_SUMMARY_BYTES:
            return False
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(document, dict) and "shardify" in document and "splits" in document


def staging_path(final: Path) -> Path:
    """Where `final` is written before it is moved into place."""
    return final.with_name(f".{final.name}.partial")


def move_into_place(staged: Path, final: Path) -> None:
    """Flush a written file to disk, rename it to `final`, then sync the folder: after a power
    cut, `final` is there complete or not at all."""
    fd = os.open(staged, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(staged, final)
    fsync_folder(final.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """`path` holds `data` whole, or keeps what it held: staged, flushed, renamed, synced."""
    _write_staged(path, lambda handle: handle.write(data))


def write_parquet_atomically(path: Path, table: pa.Table) -> None:
    """As `write_atomically`; written through a Python file: Arrow's own paths must be UTF-8,
    OUT's name need not be."""
    import pyarrow.parquet as pq

    _write_staged(path, lambda handle: pq.write_table(table, handle, compression="zstd"))


def _write_staged(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path`'s staging file with `write`, then move it into place; however the writing
    ends (an error, Ctrl-C), no staging file is left beside `path`."""
    staged = staging_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(staged, "wb") as handle:
            write(handle)
        move_into_place(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def json_bytes(document: dict) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"


def tail_crc32(path: Path) -> int:
    """CRC-32 of a file's last TAIL_BYTES (what the journal records for each shard)."""
    with open(path, "rb") as handle:
        handle.seek(max(0, handle.seek(0, os.SEEK_END) - TAIL_BYTES))
        return deflate.crc32(handle.read())


@dataclass(frozen=True)
class RunRecord:
    """The options and plan fingerprint of the run that owns an output folder."""

    fingerprint: str
    options: dict

    def to_json(self) -> bytes:
        return orjson.dumps({"fingerprint": self.fingerprint, "options": self.options},
                            option=orjson.OPT_INDENT_2)

    @classmethod
    def parse(cls, data: bytes) -> RunRecord | None:
        """The record in a run file's bytes, or None (unreadable: the run starts afresh)."""
        try:
            document = orjson.loads(data)
            return cls(document["fingerprint"], document["options"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None


def journal_entry(data: bytes) -> dict | None:
    """A journal entry's JSON, or None for a torn or foreign one (that shard is redone)."""
    try:
        entry = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("shard"), str) else None


class Store(Protocol):
    """OUT as convert, the shard writers and the readers use it: `OutputStore` (a local folder)
    or `output.remote.RemoteOutputStore` (an fsspec URL), made by `output_store`."""

    shown: str  # OUT as messages show it
    disk: str  # the local disk shards are written on before they are published, as shown

    def is_output(self) -> bool:
        """Whether OUT holds shardify's state (an earlier run, finished or not)."""
        ...

    def free_bytes(self) -> int:
        """Free bytes on `disk`."""
        ...

    def create_staged_shard(self, name: str) -> int:
        ...

    def discard_staged_shard(self, name: str) -> None:
        ...

    def finish_staged_shard(self, name: str) -> None:
        ...

    def publish_shard(self, name: str) -> None:
        """Put a written shard in place under its name, whole and durable."""
        ...

    def remove_staged_shards(self) -> None:
        ...

    def shard_files(self) -> list[str]:
        ...

    def prepare(self, keep: set[str]) -> None:
        """Remove what shardify wrote in OUT that this run will not keep."""
        ...

    def write_json(self, name: str, document: dict) -> None:
        ...

    def write_text(self, name: str, text: str) -> None:
        ...

    def write_parquet(self, name: str, table: pa.Table) -> None:
        ...

    def remove(self, name: str) -> None:
        ...

    def read_run(self) -> RunRecord | None:
        ...

    def start_run(self, record: RunRecord, *, keep_journal: bool) -> None:
        ...

    def append_journal(self, entry: dict) -> None:
        ...

    def journal(self) -> Iterator[dict]:
        """Journal entries whose shard is in OUT with the recorded size and tail CRC; a
        continuation's after the shard it continues."""
        ...

    def claim(self) -> Callable[[], None]:
        """Hold OUT for this run (UsageError if another run holds it); returns the release."""
        ...

    def read_plan(self) -> bytes | None:
        ...

    def releases(self) -> list[dict]:
        ...

    def exists(self, name: str) -> bool:
        """Whether the file `name` (relative to OUT) is there."""
        ...

    def read_bytes(self, name: str) -> bytes:
        ...

    def open(self, name: str) -> BinaryIO:
        """The file `name`, open for reading (seekable)."""
        ...

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        """`size` bytes of the file `name` from `offset` (fewer at its end)."""
        ...


def output_store(out: Location | str, options: dict[str, object] | None = None
                 ) -> OutputStore | RemoteOutputStore:
    """The store of OUT: a local folder, or an fsspec URL opened with `options` (a RemotePath
    keeps its own)."""
    where = out if isinstance(out, RemotePath) else location(out, options)
    if isinstance(where, RemotePath):
        from .remote import RemoteOutputStore  # fsspec only for a URL

        return RemoteOutputStore(where)
    return OutputStore(where)


class OutputStore:
    """OUT on a local filesystem. Picklable (a path): workers write staged shards through it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE_DIR
        self.shown = self.disk = path_text(root)

    # -- names -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """The file `name` (relative to OUT, e.g. `train/shard-000000.tar`, MANIFEST)."""
        return self.root / name

    def is_output(self) -> bool:
        return self.state.is_dir()

    def free_bytes(self) -> int:
        """Free bytes on the filesystem that holds (or will hold) OUT."""
        return shutil.disk_usage(nearest_existing(self.root)).free

    # -- shards ------------------------------------------------------------------------------
    def create_staged_shard(self, name: str) -> int:
        """A new, empty staging file for shard `name`, opened for writing."""
        staged = staging_path(self.path(name))
        staged.parent.mkdir(parents=True, exist_ok=True)
        return os.open(staged, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def discard_staged_shard(self, name: str) -> None:
        staging_path(self.path(name)).unlink(missing_ok=True)

    def finish_staged_shard(self, name: str) -> None:
        """Nothing to do where it was written: `publish_shard` makes it durable, in place."""

    def publish_shard(self, name: str) -> None:
        """Move a written shard into place, durably."""
        final = self.path(name)
        move_into_place(staging_path(final), final)

    def shard_files(self) -> list[str]:
        """The names of the shard files in OUT, sorted."""
        return sorted(p.relative_to(self.root).as_posix() for split in SPLITS
                      for p in self.root.glob(shard_glob(split)))

    def remove_staged_shards(self) -> None:
        for split in SPLITS:
            for path in (self.root / split).glob(".shard-*.tar.partial"):
                path.unlink(missing_ok=True)

    def prepare(self, keep: set[str]) -> None:
        """Remove what shardify wrote in OUT that this run will not keep.

        Only shardify's own files are touched: shard files, their staging files, the index files.
        """
        for name in INDEX_FILES:
            self.path(name).unlink(missing_ok=True)
            staging_path(self.path(name)).unlink(missing_ok=True)
        for split in SPLITS:
            folder = self.root / split
            if not folder.is_dir():
                continue
            for path in [*folder.glob("shard-*.tar"), *folder.glob(".shard-*.tar.partial")]:
                if path.relative_to(self.root).as_posix() not in keep:
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()

    # -- small files -------------------------------------------------------------------------
    def write_json(self, name: str, document: dict) -> None:
        write_atomically(self.path(name), json_bytes(document))

    def write_text(self, name: str, text: str) -> None:
        write_atomically(self.path(name), text.encode())

    def write_parquet(self, name: str, table: pa.Table) -> None:
        write_parquet_atomically(self.path(name), table)

    def size(self, name: str) -> int:
        return self.path(name).stat().st_size

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def read_bytes(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def open(self, name: str) -> BinaryIO:
        return open(self.path(name), "rb")

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        fd = os.open(self.path(name), os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    # -- run record, journal, lock -----------------------------------------------------------
    def read_run(self) -> RunRecord | None:
        """The record of the run that owns OUT, or None (none yet, or unreadable: start afresh)."""
        path = self.state / RUN_FILE
        return RunRecord.parse(path.read_bytes()) if path.is_file() else None

    def start_run(self, record: RunRecord, *, keep_journal: bool) -> None:
        """Record the run that owns OUT, durably; the journal is kept only for the same run."""
        self.state.mkdir(parents=True, exist_ok=True)
        if not keep_journal:
            for name in (JOURNAL_FILE, PLAN_FILE, RELEASES_FILE):
                (self.state / name).unlink(missing_ok=True)
        write_atomically(self.state / RUN_FILE, record.to_json())

    def append_journal(self, entry: dict) -> None:
        """Record a finished shard's entry, flushed to disk before the shard counts as done."""
        self._append_line(JOURNAL_FILE, entry)

    def _append_line(self, name: str, entry: dict) -> None:
        """One JSON line, durable before this returns (a new file's folder entry too)."""
        path = self.state / name
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, orjson.dumps(entry) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_folder(self.state)

    def save_plan(self, write: Callable[[BinaryIO], object]) -> None:
        """Keep a consuming run's plan in OUT, durably, before any source is released
        (`write` streams it into the staged file: a 400k-sample plan is ~80 MB)."""
        _write_staged(self.state / PLAN_FILE, write)

    def read_plan(self) -> bytes | None:
        path = self.state / PLAN_FILE
        return path.read_bytes() if path.is_file() else None

    def append_release(self, entry: dict) -> None:
        """Record a source being released (`state` releasing, before it is touched) or released
        (after it is gone)."""
        self._append_line(RELEASES_FILE, entry)

    def releases(self) -> list[dict]:
        """The sources released into OUT so far (a torn last line is skipped)."""
        path = self.state / RELEASES_FILE
        if not path.is_file():
            return []
        found = []
        for line in path.read_bytes().splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("unit"), str):
                found.append(entry)
        return found

    def journal(self) -> Iterator[dict]:
        """The journal's entries whose shard file still has the recorded size and tail CRC.

        Only each shard's last MiB is read back (a re-run over 500 GB of shards must not read
        them all); shards are only ever renamed into place whole, so this catches a replaced or
        cut file. A torn last line (a crash while appending) is skipped: that shard is redone.
        """
        path = self.state / JOURNAL_FILE
        if not path.is_file():
            return
        for line in path.read_bytes().splitlines():
            entry = journal_entry(line)
            if entry is None:
                continue
            shard = self.path(entry["shard"])
            if shard.is_file() and shard.stat().st_size == entry.get("bytes") \
                    and tail_crc32(shard) == entry.get("tail_crc32"):
                yield entry

    def lock(self) -> int:
        """Lock OUT for this run (released when the descriptor is closed or the process ends);
        BlockingIOError if another shardify process holds it."""
        self.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise
        return fd

    def claim(self) -> Callable[[], None]:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            return functools.partial(os.close, self.lock())
        except BlockingIOError:
            raise UsageError(f"another shardify convert is writing to {self.shown}; wait for "
                             "it, or choose another --out") from None


def nearest_existing(path: Path) -> Path:
    """`path`, or the closest folder above it that exists (OUT may not be created yet)."""
    existing = path.resolve()
    while not existing.exists():
        existing = existing.parent
    return existing
