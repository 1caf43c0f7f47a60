"""Who writes the shards: an executor runs shard jobs, one publisher makes them durable.

Writing is a job list given to an executor that returns each shard's entry. Two exist: `Inline`
(this process) and `ForkedPool` (worker processes forked before planning, each writing whole
shards with its own descriptors). A distributed executor plugs in the same way. One thread of
this process publishes each written shard (flush, rename, journal) while the writers go on.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
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
from typing import Any, Protocol

from ..archives.reader import ArchiveReader
from .shard import Made, ShardJob, ShardSink, probe_shard, write_shard

Probed = list[Made]  # see shard.probe_shard

PR_SET_PDEATHSIG = 1
UNPUBLISHED_PER_WORKER = 2  # shards written or being written, not yet durable
_WORKER_READER: ArchiveReader | None = None


class Executor(Protocol):
    """Runs shard jobs; each future's result is the shard's entry (see `shard.expand`)."""

    workers: int

    def submit(self, job: ShardJob, sink: ShardSink) -> Future[dict]:
        ...

    def probe(self, job: ShardJob) -> Future[Probed]:
        """Transform the job's samples without writing them (`shard.probe_shard`)."""
        ...


class Inline:
    """Writes each shard in this process, at once."""

    workers = 1

    def __init__(self, reader: ArchiveReader) -> None:
        self.reader = reader

    def submit(self, job: ShardJob, sink: ShardSink) -> Future[dict]:
        written: Future[dict] = Future()
        try:
            written.set_result(write_shard(job, sink, self.reader))
        finally:
            self.reader.close_files()  # a source released after this shard frees its space
        return written

    def probe(self, job: ShardJob) -> Future[Probed]:
        probed: Future[Probed] = Future()
        probed.set_result(probe_shard(job, self.reader))
        return probed


class ForkedPool:
    """Worker processes forked by `local_executor`, each with its own ArchiveReader."""

    def __init__(self, pool: ProcessPoolExecutor, workers: int) -> None:
        self.pool, self.workers = pool, workers

    def submit(self, job: ShardJob, sink: ShardSink) -> Future[dict]:
        return self.pool.submit(_write_job, job, sink)

    def probe(self, job: ShardJob) -> Future[Probed]:
        return self.pool.submit(_probe_job, job)


@contextmanager
def local_executor(workers: int) -> Iterator[ForkedPool | None]:
    """Worker processes for writing shards, forked now, while this process is still small.

    Forking after planning would map the whole plan into every worker (counted again in each
    one's RSS); forked first, a worker holds only the shards it is sent. None for one worker
    (shards are then written inline). However the block ends (done, error, Ctrl-C, a worker
    killed), no worker outlives it.
    """
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"),
                               initializer=_worker_setup, initargs=(os.getpid(),))
    try:
        pool.submit(int).result()  # with fork, the first task starts every worker at once
        yield ForkedPool(pool, workers)
    finally:
        # Stop the workers first (SIGKILL: they ignore SIGTERM); the pool then fails what was
        # left, and shuts down at once.
        for child in multiprocessing.active_children():
            child.kill()
        pool.shutdown(wait=True)


def write_shards(jobs: list[ShardJob], executor: Executor, sink: ShardSink,
                 publish: Callable[[dict], None],
                 follow_up: Callable[[dict], ShardJob | None] = lambda entry: None, *,
                 in_order: bool = False) -> None:
    """Write every job with `executor`; `publish(entry)` in one thread as each is written.

    `in_order`: a job starts only when every job more than the backlog's limit before it is
    published (a slow shard holds the others back instead of letting them run ahead), so
    what is on disk at any time is known from the order (`--consume-sources` plans its disk
    use on that).

    `follow_up(entry)`, called in this thread as each is written, may give one more job (the
    continuation of a shard that had no room for all its samples); it is written next.

    Writers do not wait for the disk, unless the publisher falls behind: at most
    UNPUBLISHED_PER_WORKER shards per writer are being written or waiting to be published, so a
    kill -9 or a power cut costs only those. However this ends (done, an error, Ctrl-C), every
    shard already written is published before it returns or raises; stopping the workers is
    left to `local_executor`.
    """
    limit = UNPUBLISHED_PER_WORKER * executor.workers
    todo = deque(enumerate(jobs))
    writing: dict[Future[dict], int] = {}
    publishing: dict[Future[None], int] = {}
    published: set[int] = set()
    first_unpublished = [0]
    with ThreadPoolExecutor(1, thread_name_prefix="shardify-publish") as publisher:

        def settle() -> None:
            """Hand each written shard to the publisher; a failed write or publish raises."""
            for future in [future for future in writing if future.done()]:
                position = writing.pop(future)
                entry = future.result()
                more = follow_up(entry)
                if more is not None:
                    todo.appendleft((position, more))
                publishing[publisher.submit(publish, entry)] = position
            for done in [future for future in publishing if future.done()]:
                published.add(publishing.pop(done))
                done.result()
            while first_unpublished[0] in published:
                first_unpublished[0] += 1

        def may_start() -> bool:
            return bool(todo) and len(writing) + len(publishing) < limit and (
                not in_order or todo[0][0] < first_unpublished[0] + limit)

        try:
            while True:
                settle()
                while may_start():
                    position, job = todo.popleft()
                    writing[executor.submit(job, sink)] = position
                    settle()
                if not writing and not publishing:
                    return
                pending: set[Future[Any]] = {*writing, *publishing}
                wait(pending, return_when=FIRST_COMPLETED)
        finally:
            for written in writing:  # written, but not handed over yet when this stopped
                if written.done() and not written.cancelled() and written.exception() is None:
                    publisher.submit(publish, written.result())


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


def _write_job(job: ShardJob, sink: ShardSink) -> dict:
    reader = _worker_reader()
    try:
        return write_shard(job, sink, reader)
    finally:
        reader.close_files()  # a source released after this shard frees its space


def _probe_job(job: ShardJob) -> Probed:
    return probe_shard(job, _worker_reader())


def _worker_reader() -> ArchiveReader:
    """The worker's one reader (its descriptors stay open from job to job)."""
    global _WORKER_READER
    if _WORKER_READER is None:
        _WORKER_READER = ArchiveReader()
    return _WORKER_READER
