"""`convert --executor ray`: shards written by Ray tasks, byte-identical to the local pool's.

One real Ray cluster for the module (`ray start --head --block`, 2 CPUs, its own temp dir and
auth token, stopped by ending that one process), reached with `--ray-address`; one run also
starts a local Ray of its own. Outputs are compared file for file with a local conversion and
read back with `verify` (tarfile against the manifest).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import S3Server
from helpers import free_port, output_files, read_shards, summary_of
from raycluster import Cluster, ray_head

import shardify
from shardify.cli import main
from shardify.profiles.battery.sample import SynthResult, synthesize

pytestmark = pytest.mark.slow

SHARD_SIZE = "16KiB"  # many small shards: many tasks
TRANSFORM = ("--crop", "outline", "--resize", "48", "--format", "webp")
SRC = str(Path(shardify.__file__).resolve().parents[1])  # the shardify under test (workers too)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A 2-CPU Ray head on this machine, with shardify's source on its workers' path; the
    environment points Ray's clients at its token. Every run on it is a `shardify` process of
    its own, as a user's is (Ray, imported by this one, would keep the token it read first)."""
    with ray_head(2, SRC) as head, pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_TOKEN_PATH", str(head.token))
        yield head


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """A larger sample set (several hundred pairs): ~150 shards of SHARD_SIZE."""
    return synthesize(tmp_path_factory.mktemp("many"), scale=2)


def convert_args(source: SynthResult, out: Path, *extra: str) -> list[str]:
    return ["convert", str(source.root), "--out", str(out), "--shard-size", SHARD_SIZE,
            "--workers", "2", "--quiet", *extra]


@pytest.fixture(scope="module")
def local_many(many: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The larger set converted by the local pool: what the runs on it must match."""
    out = tmp_path_factory.mktemp("local") / "out"
    assert main(convert_args(many, out)) == 0
    return out


def assert_same_output(out: Path, expected: Path) -> None:
    """Every file but shardify's state as the local run wrote it; and the shards, read back
    with tarfile, hold every sample the manifest and summary count."""
    assert output_files(out) == output_files(expected)
    assert not list(out.rglob("*.partial"))
    assert len(read_shards(out)) == summary_of(out)["samples"] > 0
    assert main(["verify", str(out)]) == 0


def run_child(args: list[str]) -> subprocess.Popen:
    """`shardify ARGS` in a process of its own (its own session: signals reach it alone),
    without RAY_AUTH_MODE: with a token at hand, shardify connects with it by itself."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_AUTH_MODE"}
    return subprocess.Popen([sys.executable, "-m", "shardify", *args],
                            env={**env, "PYTHONPATH": SRC}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def run(args: list[str]) -> tuple[int, str, str]:
    """`shardify ARGS` run to its end: exit code, stdout, stderr."""
    child = run_child(args)
    out, err = child.communicate(timeout=300)
    return child.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("extra", [(), TRANSFORM], ids=["as-is", "transformed"])
def test_cluster_writes_the_local_output(dataset: SynthResult, cluster: Cluster, tmp_path: Path,
                                         extra: tuple[str, ...]) -> None:
    """Transformed, the size probes are Ray tasks too (the plan is cut on what they measure)."""
    expected, out = tmp_path / "local", tmp_path / "ray"
    assert main(convert_args(dataset, expected, *extra)) == 0
    code, _, err = run(convert_args(dataset, out, *extra, "--executor", "ray",
                                    "--ray-address", cluster.address))
    assert code == 0, err
    assert_same_output(out, expected)


@pytest.fixture(scope="module")
def bucket(dataset: SynthResult, s3_server: S3Server) -> str:
    """The sample dataset uploaded to s3://rayexec/data; returns s3://rayexec."""
    import s3fs

    url = s3_server.make_bucket("rayexec")
    s3fs.S3FileSystem(**s3_server.options).put(f"{dataset.root}/", "rayexec/data",
                                               recursive=True)
    return url


def test_tasks_read_sources_in_object_storage(bucket: str, s3_server: S3Server,
                                              cluster: Cluster, tmp_path: Path) -> None:
    """s3:// SOURCEs to an s3:// OUT: each task reads its members from the bucket itself (the
    storage options travel with the job: the cluster's workers have no credentials of their
    own) and uploads the shards it wrote; the objects equal a local pool's local output."""
    import s3fs

    source = ["convert", f"{bucket}/data", *s3_server.cli_options, "--shard-size", SHARD_SIZE,
              "--workers", "2", "--quiet"]
    assert main([*source, "--out", str(tmp_path / "local")]) == 0
    url = f"{bucket}/{tmp_path.name}-ray"
    code, _, err = run([*source, "--out", url, "--executor", "ray",
                        "--ray-address", cluster.address])
    assert code == 0, err
    s3fs.S3FileSystem(**s3_server.options).get(f"{url}/", str(tmp_path / "ray"), recursive=True)
    assert_same_output(tmp_path / "ray", tmp_path / "local")


def test_tasks_refused_by_storage_stop_the_run_instead_of_rejecting(
        bucket: str, s3_server: S3Server, cluster: Cluster, tmp_path: Path) -> None:
    """The driver plans with the environment's credentials, but the cluster's workers have none
    and none were given as options: every task's read is refused. That is no flaw of the
    members: the run stops (exit 1, one line), it does not turn every sample into a reject."""
    code, out, err = run(["convert", f"{bucket}/data", "--storage-option",
                          f"endpoint_url={s3_server.endpoint}", "--shard-size", SHARD_SIZE,
                          "--quiet", "--out", str(tmp_path / "out"), "--executor", "ray",
                          "--ray-address", cluster.address])
    assert code == 1, (out, err)
    error = [line for line in err.splitlines() if line.startswith("shardify:")]
    assert len(error) == 1 and "cannot read s3://rayexec/data/" in error[0], err
    assert "fix the access" in error[0]
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_a_task_killed_mid_shard_is_retried(many: SynthResult, local_many: Path,
                                            cluster: Cluster, tmp_path: Path) -> None:
    """A worker caught with a staged shard open (stopped first, so that it cannot finish
    meanwhile) is SIGKILLed: Ray runs the task again and the output is still the local one."""
    out = tmp_path / "out"
    child = run_child(convert_args(many, out, "--executor", "ray",
                                   "--ray-address", cluster.address))
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and child.poll() is None and time.monotonic() < deadline:
        killed = kill_mid_shard(cluster, out)
        time.sleep(0.002)  # the machine's cores are the cluster's too
    _, err = child.communicate(timeout=120)
    assert killed is not None, "no task was caught writing a shard"
    assert child.returncode == 0, err.decode()
    staged, pid = killed
    assert f"Worker PID: {pid}" in worker_failures(cluster)  # Ray saw it die in a task
    shard = Path(staged).with_name(Path(staged).name[1:].removesuffix(".partial"))
    assert shard.is_file()  # written again, by the retry
    assert_same_output(out, local_many)


def kill_mid_shard(cluster: Cluster, out: Path) -> tuple[str, int] | None:
    """SIGKILL one of the cluster's workers running `_write_job` (Ray titles a worker
    `ray::FUNCTION` while it runs a task) that has a staged shard of `out` open; the staged
    file's path and the worker's pid, or None if no worker was caught so."""
    for pid in session_pids(cluster.session):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_write_job"):
                continue
            os.kill(pid, signal.SIGSTOP)
            title = Path(f"/proc/{pid}/cmdline").read_bytes()  # frozen while stopped
            staged = [target for fd in os.listdir(f"/proc/{pid}/fd")
                      if (target := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith(str(out))
                      and target.endswith(".tar.partial")]
            if title.startswith(b"ray::_write_job") and staged:
                os.kill(pid, signal.SIGKILL)
                return staged[0], pid
            os.kill(pid, signal.SIGCONT)
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile
    return None


def worker_failures(cluster: Cluster) -> str:
    """What Ray's raylet recorded of workers that died while running a task (its event log)."""
    events = cluster.temp / "session_latest" / "logs" / "events" / "event_RAYLET.log"
    return "\n".join(event["message"] for line in events.read_text().splitlines()
                     if (event := json.loads(line))["label"] == "RAY_WORKER_FAILURE")


def session_pids(session: int) -> list[int]:
    """The processes of a session (a cluster's: the one its `ray start` leads)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    pids.append(int(entry))
            except ProcessLookupError:
                continue
    return pids


def test_a_local_ray_stops_on_ctrl_c_and_resumes(many: SynthResult, local_many: Path,
                                                 cluster: Cluster, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --ray-address a Ray of its own (--workers CPUs) is started, even with RAY_ADDRESS
    set. Ctrl-C in a terminal (SIGINT to every process, Ray's too) once shards are journaled:
    the tasks are cancelled, what was written is kept, no process of that Ray is left. A
    second run (on the cluster: the executor is no part of the plan) resumes, and the output,
    with the local Ray's shards, is the local pool's."""
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # nothing there
    out = tmp_path / "out"
    args = convert_args(many, out, "--executor", "ray")
    child = run_child(args)
    journal = out / ".shardify" / "journal.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.is_file() and journal.read_bytes()) and child.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err.decode()
    assert err.decode() == ("shardify: interrupted; complete shards are kept: re-run the same "
                            "command to resume\n")
    assert not list(out.rglob("*.partial"))
    done = len(list(out.rglob("shard-*.tar")))
    assert 0 < done < len(list(local_many.rglob("shard-*.tar")))
    deadline = time.monotonic() + 30
    while session_pids(child.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not session_pids(child.pid)
    code, kept, err = run([*args, "--ray-address", cluster.address])
    assert code == 0, err
    assert f"resumed: {done} complete shards" in kept
    assert_same_output(out, local_many)


def test_an_unreachable_address_is_one_line(dataset: SynthResult, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    port = free_port()  # nothing listens there
    out = tmp_path / "out"
    assert main(convert_args(dataset, out, "--executor", "ray",
                             "--ray-address", f"127.0.0.1:{port}")) == 2
    err = capsys.readouterr().err
    assert err == (f"shardify: error: --ray-address 127.0.0.1:{port}: no Ray cluster reachable "
                   "there (Connection refused)\n")
    assert not out.exists() or not list(out.rglob("shard-*"))
    assert main(convert_args(dataset, out, "--ray-address", f"127.0.0.1:{port}")) == 2
    assert capsys.readouterr().err == "shardify: error: --ray-address needs --executor ray\n"
