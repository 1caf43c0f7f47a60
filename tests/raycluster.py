"""A Ray cluster on this machine, started as a team would start one (`ray start --head
--block`): its own temp dir and auth token, stopped by ending that one process (other
sessions' clusters are left alone). For the Ray tests and the bench."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import free_port


@dataclass(frozen=True)
class Cluster:
    address: str
    session: int  # the session id of every process of the cluster (its `ray start` pid)
    temp: Path  # its --temp-dir (logs under session_latest/logs)
    token: Path  # its auth token: clients find it through RAY_AUTH_TOKEN_PATH


@contextmanager
def ray_head(cpus: int, pythonpath: str) -> Iterator[Cluster]:
    """A token-authenticated Ray head with `cpus` CPUs (its GCS listens on every interface),
    with `pythonpath` (shardify's source) on its workers' path and no AWS settings in its
    environment (S3 settings reach tasks with the jobs)."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are
    token = temp / "auth_token"  # limited to ~100 characters
    token.write_text(secrets.token_hex(32))
    port = free_port()
    log = temp / "ray-start.log"
    with open(log, "wb") as output:
        head = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
             "--num-cpus", str(cpus), "--port", str(port), "--include-dashboard=false",
             "--disable-usage-stats", "--temp-dir", str(temp),
             "--object-store-memory", str(100 * 2**20)],
            env={**{name: value for name, value in os.environ.items()
                    if not name.startswith("AWS_")},
                 "RAY_AUTH_TOKEN_PATH": str(token), "RAY_AUTH_MODE": "token",
                 "PYTHONPATH": pythonpath},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {log.read_text()}")
            time.sleep(0.2)
        yield Cluster(f"127.0.0.1:{port}", head.pid, temp, token)
    finally:
        head.terminate()  # `ray start --block` stops the processes it started, then exits
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
