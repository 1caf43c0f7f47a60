"""Shard jobs as Ray tasks (`convert --executor ray`): the same jobs, run on a Ray cluster.

Planning, publishing and the journal stay in this process (the driver); each shard job is one
Ray task running the very function a forked worker runs (`executor._write_job`: read the members
from the sources, write the staged shard through the sink, return the entry), so the bytes are
the same. A task whose worker dies is run again by Ray (`MAX_RETRIES`): it rewrites its staging
file from the start (`O_TRUNC`), a shard's bytes depend only on its job, and only the driver
renames a staged shard into place, once, when a task's entry arrives. Ray is imported here only,
when it is asked for.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import BrokenExecutor, Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UsageError
from .executor import Probed, _probe_job, _write_job
from .shard import ShardJob, ShardSink

MAX_RETRIES = 3  # retries of a task whose worker died (killed, out of memory, its node lost)
CONNECT_TIMEOUT_S = 5.0  # for the TCP check of --ray-address before Ray's own (minutes of) retries
CANCEL_WAIT_S = 10.0  # for cancelled tasks to end before the driver removes the staged shards


class RayExecutor:
    """Runs each job as a Ray task needing 1 CPU; `workers` is the CPUs the tasks can use."""

    def __init__(self, ray: Any, workers: int) -> None:
        self.ray, self.workers = ray, workers
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)
        self._write, self._probe = task(_write_job), task(_probe_job)
        self._running: set[Any] = set()  # ObjectRefs not yet settled: cancelled at the end

    def submit(self, job: ShardJob, sink: ShardSink) -> Future[dict]:
        return self._settled(self._write.remote(job, sink))

    def probe(self, job: ShardJob) -> Future[Probed]:
        return self._settled(self._probe.remote(job))

    def _settled(self, ref: Any) -> Future:
        """A future of the task's result, failing as a local worker's would: with the task's
        own exception (an OSError keeps its errno: a full disk is still said as such), or
        BrokenExecutor when Ray gave up on the task (its worker died MAX_RETRIES + 1 times,
        it was cancelled, its node was lost)."""
        settled: Future = Future()
        self._running.add(ref)

        def settle(raw: Future) -> None:
            self._running.discard(ref)
            error = raw.exception()
            if error is None:
                settled.set_result(raw.result())
            elif isinstance(error, self.ray.exceptions.RayTaskError) \
                    and isinstance(error.cause, Exception):
                error.cause.__cause__ = error  # the task's traceback, should it be shown
                settled.set_exception(error.cause)
            else:
                settled.set_exception(BrokenExecutor(f"a Ray task failed: {error}"))

        ref.future().add_done_callback(settle)
        return settled

    def cancel(self) -> None:
        """Stop the tasks still running (their workers are killed) and wait for them to end,
        so that none writes a staged shard after the run has removed them."""
        refs = list(self._running)
        for ref in refs:
            self.ray.cancel(ref, force=True)
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)


@contextmanager
def ray_executor(workers: int, address: str | None) -> Iterator[RayExecutor]:
    """A RayExecutor on a local Ray started with `workers` CPUs (stopped at the end), or on the
    cluster at `address` (with its CPUs; disconnected at the end). However the block ends,
    the tasks still running are cancelled first."""
    if address is not None:
        _check_reachable(address)
        _token_auth_if_at_hand()
    ray = _import_ray()
    _connect(ray, workers, address)
    try:
        if address is not None:
            _check_cluster(ray, address)
            workers = int(ray.cluster_resources().get("CPU", 0))
        executor = RayExecutor(ray, workers)
        try:
            yield executor
        finally:
            executor.cancel()
    finally:
        ray.shutdown()


def _token_auth_if_at_hand() -> None:
    """Connect with Ray's token when one is at hand and RAY_AUTH_MODE is unset, as `ray start`
    does for itself: a cluster started so (on this machine, or with the token copied here)
    needs it, and one without authentication accepts it. Set before Ray is imported, which is
    when Ray reads it."""
    if "RAY_AUTH_MODE" not in os.environ and (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def _import_ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError as error:
        raise UsageError(f"--executor ray needs Ray ({error}); pip install 'shardify[ray]'"
                         ) from None
    return ray


def _connect(ray: Any, workers: int, address: str | None) -> None:
    """Start a quiet local Ray, or connect to `address`: one line (UsageError) if it cannot be
    reached. Ray's SIGTERM handler (a bare exit) is undone: shardify's stops the run cleanly."""
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    handler = signal.getsignal(signal.SIGTERM)
    try:
        if address is None:
            # "local": a new instance even if RAY_ADDRESS names a cluster
            ray.init(address="local", num_cpus=workers, **quiet)
        else:
            with _stderr_discarded():
                ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as error:
        said = "cannot start a local Ray" if address is None else \
            f"--ray-address {address}: cannot connect to the Ray cluster there"
        raise UsageError(f"{said}: {_reason(error)}") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


@contextmanager
def _stderr_discarded() -> Iterator[None]:
    """File descriptor 2 into /dev/null: Ray's C++ client logs a line a second while a cluster
    refuses it (a missing token: 20 s of them) before Ray raises; shardify says it in one."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _check_reachable(address: str) -> None:
    """A HOST:PORT that nothing listens on fails in seconds here, not after Ray's retries."""
    host, _, port = address.rpartition("://")[2].rpartition(":")
    if not (host and port.isdigit()):
        return  # `auto` and the like: Ray says what it makes of them
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise UsageError(f"--ray-address {address}: no Ray cluster reachable there "
                         f"({error.strerror or error})") from None


def _check_cluster(ray: Any, address: str) -> None:
    """The cluster has CPUs to run the tasks on, and its workers run this shardify (the same
    code writes the same bytes)."""
    if not ray.cluster_resources().get("CPU"):
        raise UsageError(f"--ray-address {address}: the cluster has no CPUs to run tasks on")
    try:
        theirs = ray.get(ray.remote(num_cpus=0, max_retries=0)(_version).remote())
    except ray.exceptions.RayError as error:
        raise UsageError(f"--ray-address {address}: the cluster's workers cannot run shardify "
                         f"({_reason(error)}); install shardify {__version__} on every "
                         "node") from None
    if theirs != __version__:
        raise UsageError(f"--ray-address {address}: the cluster's workers run shardify {theirs}, "
                         f"this is {__version__}; install the same version on every node")


def _version() -> str:
    return __version__


def _reason(error: BaseException) -> str:
    """What went wrong, in one line: the last line of the innermost cause (Ray's messages end
    with the exception of a traceback they quote); for a refused token, what to set."""
    messages = []
    while True:
        messages.append(str(error))
        if error.__cause__ is None:
            break
        error = error.__cause__
    if any("InvalidAuthToken" in message for message in messages):
        return ("it asks for its Ray authentication token: give it in RAY_AUTH_TOKEN, or in "
                "a file named by RAY_AUTH_TOKEN_PATH or at ~/.ray/auth_token")
    lines = messages[-1].strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__
