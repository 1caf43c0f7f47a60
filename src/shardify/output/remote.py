"""OUT at an fsspec URL (`s3://bucket/prefix`, `memory://...`): the guarantees of a local OUT in
object storage, where nothing is renamed and no file is appended to.

- A shard is written to a staging file on local disk (a folder per OUT under the temp folder;
  the executor keeps at most UNPUBLISHED_PER_WORKER shards per worker unpublished) and uploaded
  by the publisher: one PUT, or a multipart upload that the server completes at the end, so an
  object under a shard's name is always whole. The staging folder is removed however the run
  ends; after a kill -9 the next run of the same OUT on this machine removes it.
- The journal is one small object per finished shard (`.shardify/journal/<shard>.json`),
  written after the shard; resume lists them and checks each shard's size and the CRC-32 of
  its last MiB (one ranged read per shard).
- The lock is a lease object (`.shardify/lease.json`: host, boot, pid, renewal time), created
  only if absent and renewed every LEASE_RENEWAL seconds. A second run refuses it, unless its
  holder is gone: a process of this machine that no longer runs, or a lease not renewed for
  LEASE_TIMEOUT seconds (another machine's run that died). A run that loses its lease
  publishes nothing more.
- Index files are single PUTs, `summary.json` last; prepare removes only shardify's names (and
  aborts its unfinished multipart uploads). No free-space check: object storage has no figure.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import deflate
import orjson

from ..errors import RunFailed, UsageError
from ..pathnames import path_text
from ..plan.split import SPLITS
from ..storage import RemotePath
from ..write.shard import TAIL_BYTES
from .store import (
    INDEX_FILES,
    RUN_FILE,
    STATE_DIR,
    RunRecord,
    journal_entry,
    json_bytes,
    nearest_existing,
    shard_order,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from fsspec import AbstractFileSystem

JOURNAL_DIR = f"{STATE_DIR}/journal"
LEASE_FILE = f"{STATE_DIR}/lease.json"
LEASE_RENEWAL = 30.0  # seconds between renewals of a held lease
LEASE_TIMEOUT = 180.0  # a lease not renewed for this long is a dead run's
READ_BLOCK = 8 * 2**20  # read-ahead of a streamed file (a tar read from start to end)
CONDITIONAL_PUTS = {"s3", "s3a"}  # s3fs: PUTs take If-Match / If-None-Match; S3's own API
BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
PROCESS_LOCAL = {"memory"}  # filesystems a worker process does not share with the driver


def journal_name(shard: str) -> str:
    """The journal object of a shard (`train/shard-000001.tar` ->
    `.shardify/journal/train/shard-000001.tar.json`)."""
    return f"{JOURNAL_DIR}/{shard}.json"


def is_shard_name(name: str) -> bool:
    """Whether `name` (relative to OUT) is a shard's: `{split}/shard-*.tar`, one level deep."""
    split, _, base = name.partition("/")
    return split in SPLITS and "/" not in base and fnmatch.fnmatchcase(base, "shard-*.tar")


class RemoteOutputStore:
    """OUT at an fsspec URL. Picklable (a RemotePath and the staging folder's path): workers
    write staged shards through it; the lease stays with the process that holds it."""

    def __init__(self, root: RemotePath) -> None:
        self.root = root
        self.shown = root.url
        self.base = self.fs._strip_protocol(root.url).rstrip("/")  # memory:// adds a "/"
        digest = hashlib.sha256(root.url.encode()).hexdigest()[:16]
        self.staging = Path(tempfile.gettempdir()) / f"shardify-staging-{digest}"
        self.disk = f"{path_text(self.staging)} (the staging folder of {root.url}; TMPDIR)"
        self._lease: Lease | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lease": None}

    # -- names -------------------------------------------------------------------------------
    @property
    def fs(self) -> AbstractFileSystem:
        return self.root.fs()

    def key(self, name: str) -> str:
        """The filesystem path of `name` (relative to OUT), without the protocol."""
        return f"{self.base}/{name}"

    def files(self, under: str = "") -> dict[str, int]:
        """Every object under OUT, or under its folder `under` (name relative to OUT -> size),
        listed now."""
        self.fs.invalidate_cache(self.base)
        try:
            found = self.fs.find(self.key(under) if under else self.base, detail=True)
        except FileNotFoundError:
            return {}
        prefix = f"{self.base}/"
        return {path.removeprefix(prefix): info["size"] for path, info in found.items()
                if path.startswith(prefix) and info.get("type") != "directory"}

    def check_access(self) -> dict[str, int]:
        """`files()`; or fail now, in one line, for a missing bucket, bad credentials or an
        unreachable endpoint, before hours of work."""
        bucket = self.base.split("/", 1)[0]
        try:
            if self.root.protocol in BUCKET_PROTOCOLS:
                self.fs.info(bucket)
            return self.files()
        except FileNotFoundError:
            raise UsageError(f"{self.shown}: the bucket {bucket} does not exist") from None
        except PermissionError as error:
            raise UsageError(f"{self.shown}: access denied ({error}); check the credentials "
                             "(environment, ~/.aws, --storage-option key=... secret=...)"
                             ) from None
        except Exception as error:  # the backend's own errors: a bad endpoint, a timeout
            raise UsageError(f"{self.shown}: cannot be reached ({type(error).__name__}: "
                             f"{error})") from None

    def is_output(self) -> bool:
        return bool(self.files(STATE_DIR))

    def free_bytes(self) -> int:
        return shutil.disk_usage(nearest_existing(self.staging)).free

    # -- shards ------------------------------------------------------------------------------
    def staged(self, name: str) -> Path:
        return self.staging / f"{name}.partial"

    def create_staged_shard(self, name: str) -> int:
        staged = self.staged(name)
        staged.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(staged, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def discard_staged_shard(self, name: str) -> None:
        self.staged(name).unlink(missing_ok=True)

    def finish_staged_shard(self, name: str) -> None:
        """Upload a written shard from the machine that wrote it (a worker, a Ray task on any
        node), then free its staging file. s3fs makes one PUT, or a multipart upload completed
        at its end: the object appears whole. It counts as done only once the driver journals
        it (`publish_shard`); a resume redoes an object without a journal entry. A `memory://`
        filesystem lives in one process: its shards are uploaded by the driver instead."""
        if self.root.protocol not in PROCESS_LOCAL:
            self._upload(name)

    def publish_shard(self, name: str) -> None:
        """Check that this run still holds the lease before the shard's journal entry is
        written; upload the shard if its writer did not (`memory://`)."""
        self._check_lease()
        if self.staged(name).exists():
            self._upload(name)

    def _upload(self, name: str) -> None:
        self.fs.put_file(str(self.staged(name)), self.key(name))
        self.discard_staged_shard(name)

    def shard_files(self) -> list[str]:
        return sorted(name for name in self.files() if is_shard_name(name))

    def remove_staged_shards(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def prepare(self, keep: set[str]) -> None:
        """Remove shardify's own objects this run will not keep (index files, shards), its
        unfinished multipart uploads, and staging files a killed run left on this machine."""
        self._check_lease()
        self.remove_staged_shards()
        stale = [self.key(name) for name in self.files()
                 if name in INDEX_FILES or (is_shard_name(name) and name not in keep)]
        if stale:
            self.fs.rm(stale)
        self._abort_uploads()

    def _abort_uploads(self) -> None:
        """Abort the multipart uploads of shardify's names under OUT that a killed run left
        (S3 keeps their parts, billed and invisible, until then)."""
        if self.root.protocol not in CONDITIONAL_PUTS:  # s3fs: S3's API at hand
            return
        bucket, _, prefix = self.base.partition("/")
        start = f"{prefix}/" if prefix else ""
        listed = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=start)
        for upload in listed.get("Uploads", []):
            name = upload["Key"].removeprefix(start)
            if is_shard_name(name) or name in INDEX_FILES:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                                UploadId=upload["UploadId"])

    # -- small files -------------------------------------------------------------------------
    def _put(self, name: str, data: bytes) -> None:
        self._check_lease()
        self.fs.pipe_file(self.key(name), data)

    def write_json(self, name: str, document: dict) -> None:
        self._put(name, json_bytes(document))

    def write_text(self, name: str, text: str) -> None:
        self._put(name, text.encode())

    def write_parquet(self, name: str, table: pa.Table) -> None:
        """Written to a local file first (a 400k-row manifest is tens of MB), then uploaded."""
        import pyarrow.parquet as pq

        self._check_lease()
        with tempfile.NamedTemporaryFile(suffix=".parquet") as staged:
            pq.write_table(table, staged, compression="zstd")
            staged.flush()
            self.fs.put_file(staged.name, self.key(name))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(name))

    # -- reading -----------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self.key(name))
        return bool(self.fs.isfile(self.key(name)))

    def read_bytes(self, name: str) -> bytes:
        return bytes(self.fs.cat_file(self.key(name)))

    def open(self, name: str) -> BinaryIO:
        self.fs.invalidate_cache(self.key(name))
        handle: BinaryIO = self.fs.open(self.key(name), "rb", block_size=READ_BLOCK,
                                        cache_type="readahead")
        return handle

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        return bytes(self.fs.cat_file(self.key(name), start=offset, end=offset + size))

    # -- run record, journal, lease ----------------------------------------------------------
    def read_run(self) -> RunRecord | None:
        try:
            return RunRecord.parse(self.read_bytes(f"{STATE_DIR}/{RUN_FILE}"))
        except FileNotFoundError:
            return None

    def start_run(self, record: RunRecord, *, keep_journal: bool) -> None:
        if not keep_journal:
            entries = [self.key(name) for name in self.files(JOURNAL_DIR)]
            if entries:
                self.fs.rm(entries)
        self._put(f"{STATE_DIR}/{RUN_FILE}", record.to_json())

    def append_journal(self, entry: dict) -> None:
        """Record a finished shard, after its upload: one object per shard (a shard redone
        replaces its entry)."""
        self._put(journal_name(entry["shard"]), orjson.dumps(entry))

    def journal(self) -> Iterator[dict]:
        """One listing, the entries read concurrently, then one ranged read of each listed
        shard's last MiB (a resume over 500 GB of shards reads 1 MiB of each)."""
        files = self.files()
        names = [name for name in files if name.startswith(f"{JOURNAL_DIR}/")]
        if not names:
            return
        found = self.fs.cat([self.key(name) for name in names], on_error="omit")
        entries = [entry for data in found.values() if (entry := journal_entry(data))]
        entries = [entry for entry in entries if files.get(entry["shard"]) == entry.get("bytes")]
        entries.sort(key=lambda entry: shard_order(entry["shard"]))
        if not entries:
            return
        shards = [self.key(entry["shard"]) for entry in entries]
        ends = [entry["bytes"] for entry in entries]
        tails = self.fs.cat_ranges(shards, [max(0, end - TAIL_BYTES) for end in ends], ends,
                                   on_error="return")
        for entry, tail in zip(entries, tails, strict=True):
            if isinstance(tail, bytes) and deflate.crc32(tail) == entry.get("tail_crc32"):
                yield entry

    def claim(self) -> Callable[[], None]:
        lease = Lease(self.root, self.key(LEASE_FILE), self.shown)
        lease.take()
        self._lease = lease
        return self._release

    def _release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def _check_lease(self) -> None:
        """A run whose lease another run took over (it stalled for LEASE_TIMEOUT) stops."""
        if self._lease is not None and self._lease.lost:
            raise RunFailed(f"another shardify convert took over the lease on {self.shown} "
                            f"(this run could not renew it for {LEASE_TIMEOUT:.0f} s); this "
                            "run stopped without writing more")

    def read_plan(self) -> bytes | None:
        """None: a remote OUT never holds a consuming run's plan (--consume-sources needs a
        local OUT)."""
        return None

    def releases(self) -> list[dict]:
        return []


class Lease:
    """One run's hold on a remote OUT: an object created only if absent, renewed by a thread.

    Where the backend takes conditional PUTs (S3: If-None-Match, If-Match on the ETag), taking
    over a dead run's lease and each renewal replace exactly the lease read, so two runs never
    both hold it. Elsewhere (memory://) they are read-compare-write.
    """

    def __init__(self, root: RemotePath, path: str, shown: str) -> None:
        self.root, self.path, self.shown = root, path, shown
        self.conditional = root.protocol in CONDITIONAL_PUTS
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_released, daemon=True,
                                         name="shardify-lease")

    @property
    def fs(self) -> AbstractFileSystem:
        return self.root.fs()

    def record(self) -> bytes:
        return orjson.dumps({"host": socket.gethostname(), "boot": boot_id(), "pid": os.getpid(),
                             "token": self.token, "renewed": time.time()})

    def take(self) -> None:
        """Create the lease, or take over a dead run's; UsageError if a live run holds it."""
        try:
            self._create_or_take_over()
        except PermissionError as error:
            raise UsageError(f"cannot hold the lease on {self.shown}: {error}") from None
        self._renewer.start()

    def _create_or_take_over(self) -> None:
        try:
            self._put(mode="create")
            return
        except FileExistsError:
            pass
        held, etag = self._read()
        if held is not None and not stale(held):
            raise UsageError(f"another shardify convert is writing to {self.shown} "
                             f"({holder(held)}); wait for it, or choose another --out (a "
                             f"lease not renewed for {LEASE_TIMEOUT:.0f} s is taken over)")
        try:
            self._take_over(etag)
        except OSError as error:  # FileExistsError, or S3's "precondition failed" (EINVAL)
            if not isinstance(error, FileExistsError) and error.errno != errno.EINVAL:
                raise
            raise UsageError(f"another shardify convert took the lease on {self.shown} at "
                             "the same time; wait for it, or choose another --out") from None

    def _take_over(self, etag: str | None) -> None:
        if self.conditional and etag is not None:
            self._put(IfMatch=etag)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)
            self._put(mode="create")

    def _put(self, **conditions: Any) -> None:
        answer = self.fs.pipe_file(self.path, self.record(), **conditions)
        self.etag = answer.get("ETag") if isinstance(answer, dict) else None

    def _read(self) -> tuple[dict | None, str | None]:
        """The lease's record (None if unreadable or gone) and ETag."""
        self.fs.invalidate_cache(self.path)
        try:
            etag = self.fs.info(self.path).get("ETag")
            held = orjson.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None, None
        return (held if isinstance(held, dict) else None), etag

    def _renew_until_released(self) -> None:
        while not self._stop.wait(LEASE_RENEWAL):
            with contextlib.suppress(Exception):  # a network blip: the next renewal tries again
                self._renew()
            if self.lost:
                return

    def _renew(self) -> None:
        if self.conditional and self.etag is not None:
            try:
                self._put(IfMatch=self.etag)
                return
            except OSError as error:
                if error.errno != errno.EINVAL:  # not "the precondition failed"
                    raise
        held, etag = self._read()  # the precondition failed, or there is no ETag to match
        if held is None or held.get("token") != self.token:
            self.lost = True
        else:  # still this run's (a renewal whose answer was lost changed the ETag)
            self._put(**({"IfMatch": etag} if self.conditional and etag else {}))

    def release(self) -> None:
        """Stop renewing; remove the lease if it is still this run's."""
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        if not self.lost:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)


def stale(held: dict) -> bool:
    """Whether a lease's holder is gone: a process of this machine (same host name and boot)
    that no longer runs, or any holder that has not renewed it for LEASE_TIMEOUT seconds."""
    renewed = held.get("renewed")
    if not isinstance(renewed, int | float) or time.time() - renewed > LEASE_TIMEOUT:
        return True
    if held.get("host") != socket.gethostname() or held.get("boot") != boot_id():
        return False
    pid = held.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False


def holder(held: dict) -> str:
    renewed = held.get("renewed")
    ago = f"renewed {time.time() - renewed:.0f} s ago" if isinstance(renewed, int | float) \
        else "never renewed"
    return f"pid {held.get('pid')} on {held.get('host')}, lease {ago}"


def boot_id() -> str:
    """This boot of this machine (Linux), so that a host name alone never stands for it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
