"""Crash safety: kill, Ctrl-C and full disks cost only the shards in flight; resume is exact.

A conversion runs in a child process that kills itself (SIGKILL) at a chosen point, so the kill
lands exactly there; the same command then resumes in-process and must produce the very bytes
of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from helpers import output_files

from shardify.cli import main
from shardify.profiles.battery.sample import SynthResult, synthesize
from shardify.write import executor, shard

SHARD_SIZE = "32KiB"
STORE = "shardify.output.store:OutputStore"

# Runs `shardify convert` with one function wrapped so that the process SIGKILLs itself on the
# Nth call (before or after the real call): argv = module, function, N, when, convert args...
CHILD = """
import os, signal, sys, importlib
path, name, nth, when = sys.argv[1:5]
module, _, attribute = path.partition(":")  # "package.module:Class" wraps a method
target = importlib.import_module(module)
target = getattr(target, attribute) if attribute else target
real = getattr(target, name)
calls = 0
def wrapped(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(nth) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    if calls == int(nth) and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(target, name, wrapped)
from shardify.cli import main
sys.exit(main(sys.argv[5:]))
"""


@pytest.fixture(scope="module")
def clean_run(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    assert main(convert_args(dataset, out)) == 0
    return out


def convert_args(dataset: SynthResult, out: Path, *extra: str) -> list[str]:
    return ["convert", str(dataset.root), "--out", str(out), "--shard-size", SHARD_SIZE,
            "--quiet", *extra]


def run_child_killed(dataset: SynthResult, out: Path, target: str, nth: int, when: str,
                     workers: str) -> subprocess.CompletedProcess:
    """`target` is `module.function` or `module:Class.method`."""
    module, name = target.rsplit(".", 1)
    return subprocess.run([sys.executable, "-c", CHILD, module, name, str(nth), when,
                           *convert_args(dataset, out, "--workers", workers)],
                          capture_output=True, timeout=120)


@pytest.mark.parametrize(
    ("target", "nth", "when", "workers"),
    [
        ("shardify.write.executor.write_shard", 1, "before", "1"),  # before any shard
        (f"{STORE}.append_journal", 3, "after", "1"),   # 3 shards journaled
        (f"{STORE}.append_journal", 3, "after", "2"),   # the same, 2 workers busy
        (f"{STORE}.append_journal", 4, "before", "2"),  # shard 4 renamed, not journaled
        ("shardify.write.shard.write_all", 20, "before", "1"),  # in the middle of a shard
        (f"{STORE}.publish_shard", 2, "before", "2"),   # shard 2 written, not durable
        ("shardify.output.store.write_parquet_atomically", 2, "before", "2"),  # no manifest
        ("shardify.output.store.write_parquet_atomically", 2, "after", "2"),  # no summary
    ],
)
def test_sigkill_then_resume_gives_identical_output(dataset: SynthResult, clean_run: Path,
                                                    tmp_path: Path, target: str, nth: int,
                                                    when: str, workers: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert run_child_killed(dataset, out, target, nth, when, workers).returncode == \
        -signal.SIGKILL
    assert not (out / "summary.json").exists()
    complete_before = {p.name for p in out.rglob("shard-*.tar")}
    assert main(convert_args(dataset, out)) == 0
    assert output_files(out) == output_files(clean_run)
    assert not list(out.rglob("*.partial"))
    kept = capsys.readouterr().out
    if target.endswith("append_journal") and when == "after":
        assert f"resumed: {nth} complete shards" in kept
    assert len(complete_before) <= len(list(out.rglob("shard-*.tar")))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_shards_are_durable_before_they_are_renamed_into_place(
        dataset: SynthResult, clean_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        workers: str) -> None:
    """A shard file under its final name must survive a power cut: its data is flushed
    (fdatasync of the partial file) before the rename, and the folder after it."""
    out, events = tmp_path / "out", []
    real_sync, real_fsync, real_replace = os.fdatasync, os.fsync, os.replace

    def fdatasync(fd: int) -> None:
        events.append(("data", os.readlink(f"/proc/self/fd/{fd}")))
        real_sync(fd)

    def fsync(fd: int) -> None:
        events.append(("folder", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source: Path, target: Path) -> None:
        events.append(("rename", str(source), str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert main(convert_args(dataset, out, "--workers", workers)) == 0
    renames = [(i, e) for i, e in enumerate(events)
               if e[0] == "rename" and Path(e[2]).name.startswith("shard-")]
    assert len(renames) == len(list(out.rglob("shard-*.tar"))) > 1
    for i, (_, partial, final) in renames:
        assert ("data", partial) in events[:i]
        assert ("folder", str(Path(final).parent)) in events[i + 1:]
    assert output_files(out) == output_files(clean_run)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_journals_every_shard_already_written(
        dataset: SynthResult, clean_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture, workers: str) -> None:
    """Ctrl-C after three shards are written (by this process, or by workers): they are all
    published and journaled before the run stops, so the resume keeps every one of them."""
    out = tmp_path / "out"
    real_write = executor.write_shard
    written = []

    def write_three(*args: object) -> dict:  # in each worker: its 4th shard raises, in its main
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(real_write(*args))
        return written[-1]

    monkeypatch.setattr(executor, "write_shard", write_three)
    assert main(convert_args(dataset, out, "--workers", workers)) == 130
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("shard-*.tar")}
    journal = (out / ".shardify" / "journal.jsonl").read_text().splitlines()
    assert len(on_disk) >= 3 and {json.loads(line)["shard"] for line in journal} == on_disk
    assert not list(out.rglob("*.partial"))
    monkeypatch.setattr(executor, "write_shard", real_write)
    capsys.readouterr()
    assert main(convert_args(dataset, out)) == 0
    assert f"resumed: {len(on_disk)} complete shards" in capsys.readouterr().out
    assert output_files(out) == output_files(clean_run)


@pytest.mark.parametrize("workers", [1, 2])
def test_written_shards_wait_for_few_unpublished(dataset: SynthResult, clean_run: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 workers: int) -> None:
    """With a slow disk, writers wait instead of piling up written shards that are not yet
    durable (all lost to a kill -9): at most two unpublished shards per worker, counting those
    being written (the partial files on disk), whenever a shard is flushed."""
    out, partial_counts = tmp_path / "out", []
    real_sync = os.fdatasync

    def slow_sync(fd: int) -> None:  # a slow disk: the scheduler is under test, not fsync
        partial_counts.append(len(list(out.rglob(".shard-*.tar.partial"))))
        time.sleep(0.03)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_sync)
    assert main(convert_args(dataset, out, "--workers", str(workers))) == 0
    assert len(partial_counts) > 10
    assert max(partial_counts) <= 2 * workers
    assert output_files(out) == output_files(clean_run)


def test_full_disk_stops_cleanly_and_resumes(dataset: SynthResult, clean_run: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    """ENOSPC at a write: exit 3, partial removed, complete shards kept, then an exact resume."""
    out = tmp_path / "out"
    real, calls = shard.write_all, []

    def fill_up(fd: int, chunks: list[bytes]) -> int:
        calls.append(1)
        if len(calls) == 25:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, chunks)

    monkeypatch.setattr(shard, "write_all", fill_up)
    assert main(convert_args(dataset, out, "--workers", "1")) == 3
    err = capsys.readouterr().err
    assert "disk full" in err and "more is needed" in err and "re-run the same command" in err
    assert not list(out.rglob("*.partial"))
    kept = sorted(out.rglob("shard-*.tar"))
    assert kept and all(p.read_bytes() == (clean_run / p.relative_to(out)).read_bytes()
                        for p in kept)
    monkeypatch.setattr(shard, "write_all", real)
    assert main(convert_args(dataset, out)) == 0
    assert f"resumed: {len(kept)} complete shards" in capsys.readouterr().out
    assert output_files(out) == output_files(clean_run)


def test_changed_inputs_are_refused(dataset: SynthResult, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "src"
    copy = synthesize(source)
    out = tmp_path / "out"
    assert main(convert_args(copy, out, "--seed", "3")) == 0
    assert main(convert_args(copy, out, "--seed", "4")) == 2
    assert "seed 3 -> 4" in capsys.readouterr().err
    victim = next(copy.root.rglob("VS_CT_Datasets_images.zip"))
    victim.unlink()
    assert main(convert_args(copy, out, "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert "inputs differ" in err and "--overwrite" in err


def test_only_own_files_are_removed(dataset: SynthResult, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(convert_args(dataset, out)) == 0
    mine = out / "train" / "notes.txt"
    mine.write_text("keep me")
    assert main(convert_args(dataset, out, "--seed", "9", "--overwrite")) == 0
    assert mine.read_text() == "keep me"


def test_preflight_refuses_before_writing(dataset: SynthResult, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    from shardify.output.store import OutputStore

    monkeypatch.setattr(OutputStore, "free_bytes", lambda store: 10_000)
    out = tmp_path / "out"
    assert main(convert_args(dataset, out)) == 3
    err = capsys.readouterr().err
    assert "needs about" in err and "9.8 KiB is free" in err and "--no-space-check" in err
    assert not out.exists()
    assert main(convert_args(dataset, out, "--no-space-check")) == 0


def test_real_small_disk(dataset: SynthResult, clean_run: Path, tmp_path: Path) -> None:
    """On a real 400 KiB tmpfs: preflight refuses; forced, the disk fills; grown, it resumes."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the ENOSPC injection test covers this)")
    try:
        out = mount / "out"
        assert main(convert_args(dataset, out)) == 3
        assert not out.exists()
        assert main(convert_args(dataset, out, "--no-space-check")) == 3
        assert not list(out.rglob("*.partial"))
        subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
        assert main(convert_args(dataset, out)) == 0
        assert output_files(out) == output_files(clean_run)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_killed_worker_stops_the_run_and_resume_is_exact(dataset: SynthResult,
                                                         clean_run: Path,
                                                         tmp_path: Path) -> None:
    """A worker SIGKILLed mid-shard (as by the OOM killer): a clear error, exit 1, no hang."""
    out = tmp_path / "out"
    done = run_child_killed(dataset, out, "shardify.write.shard.write_all", 30, "before", "2")
    assert done.returncode == 1
    assert b"worker process died" in done.stderr and b"Traceback" not in done.stderr
    assert not list(out.rglob("*.partial"))
    assert main(convert_args(dataset, out)) == 0
    assert output_files(out) == output_files(clean_run)


CTRL_C_CHILD = """
import sys, time
from shardify.write import executor
real = executor.write_shard
def slow(*args, **kwargs):
    time.sleep(0.2)
    return real(*args, **kwargs)
executor.write_shard = slow
from shardify.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("signum", "code", "message", "to_group"),
    [
        (signal.SIGINT, 130, b"interrupted", False),
        (signal.SIGINT, 130, b"interrupted", True),    # Ctrl-C in a terminal: every process
        (signal.SIGTERM, 143, b"terminated", False),   # kill, docker stop
        (signal.SIGTERM, 143, b"terminated", True),    # timeout, systemd: every process
    ],
)
def test_ctrl_c_or_sigterm_stops_fast_and_resumes(dataset: SynthResult, clean_run: Path,
                                                 tmp_path: Path, signum: int, code: int,
                                                 message: bytes, to_group: bool,
                                                 capsys: pytest.CaptureFixture) -> None:
    """A real signal while shards are being written: the shards written are published and
    journaled, partial files removed, the resume message, then an exact resume."""
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD, *convert_args(dataset, out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(out.rglob("shard-*.tar")) and time.monotonic() < deadline:
        time.sleep(0.01)
    if to_group:
        os.killpg(child.pid, signum)
    else:
        child.send_signal(signum)
    _, err = child.communicate(timeout=30)
    assert child.returncode == code
    assert message + b"; complete shards are kept: re-run the same command to resume" in err
    assert b"Traceback" not in err
    assert not list(out.rglob("*.partial"))
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("shard-*.tar")}
    journal = (out / ".shardify" / "journal.jsonl").read_text().splitlines()
    assert on_disk and {json.loads(line)["shard"] for line in journal} == on_disk
    # Stopped, not finished: shards still to write (each takes 0.2 s here) were not started.
    assert len(on_disk) < len(list(clean_run.rglob("shard-*.tar")))
    assert main(convert_args(dataset, out)) == 0
    assert f"resumed: {len(on_disk)} complete shards" in capsys.readouterr().out
    assert output_files(out) == output_files(clean_run)
    assert main(["verify", str(out)]) == 0


def test_progress_lines_when_not_a_terminal(dataset: SynthResult, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    from shardify import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    args = [a for a in convert_args(dataset, tmp_path / "out") if a != "--quiet"]
    assert main(args) == 0
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("writing shards: ") and "ETA" in line for line in lines)
    assert any(line.startswith("reading labels: ") for line in lines)
    assert main([*args[:3], str(tmp_path / "quiet"), *args[4:], "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def progress_on_a_pty(columns: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """What a 3 MiB bytes Progress shows on a real pty of `columns` x 24 (0: a 0x0 pty, as
    `script -qec` gives)."""
    from shardify import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0,
                                                          columns, 0, 0))
    with os.fdopen(follower, "w") as stream:
        bar = progress.Progress(3 * 2**20, "B", "writing shards", enabled=True, stream=stream)
        for _ in range(3):
            time.sleep(0.05)
            bar.advance(2**20)
        bar.close()
    shown = b""
    with contextlib.suppress(OSError):  # EIO once everything written has been read
        while chunk := os.read(leader, 65536):
            shown += chunk
    os.close(leader)
    return shown.decode()


def test_progress_on_a_terminal_of_unknown_size_is_log_lines(
        monkeypatch: pytest.MonkeyPatch) -> None:
    shown = progress_on_a_pty(0, monkeypatch)
    assert "writing shards: 3.0 MiB/3.0 MiB (100%), " in shown and "MiB/s, ETA" in shown


def test_progress_bar_counts_in_the_units_of_the_summary(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A live bar on a real terminal, in KiB/MiB/GiB as human_bytes (and the summary) say."""
    shown = progress_on_a_pty(80, monkeypatch)
    final = shown.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("writing shards: 100%") and "|" in final
    assert "3.0 MiB/3.0 MiB" in final and "MiB/s" in final and "MB/s" not in final


def test_progress_into_a_closed_pipe_stops_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """`2>&1 | head`: once the reader is gone, progress stops and the work goes on."""
    from shardify import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    reader, writer = os.pipe()
    os.close(reader)
    with os.fdopen(writer, "w") as stream:
        bar = progress.Progress(10, "labels", "reading labels", enabled=True, stream=stream)
        bar.advance(5)
        bar.advance(5)
        assert not bar.enabled and bar.done == 10
        with contextlib.suppress(BrokenPipeError):
            stream.close()


def test_a_changed_or_cut_shard_is_redone(dataset: SynthResult, clean_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """Kept shards are checked against the size and tail CRC the journal recorded."""
    out = tmp_path / "out"
    assert main(convert_args(dataset, out)) == 0
    shards = sorted(out.rglob("shard-*.tar"))
    changed, cut = shards[0], shards[1]
    data = bytearray(changed.read_bytes())
    data[-1500] ^= 0xFF
    changed.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-512])
    capsys.readouterr()
    assert main(convert_args(dataset, out)) == 0
    assert f"resumed: {len(shards) - 2} complete shards" in capsys.readouterr().out
    assert output_files(out) == output_files(clean_run)


def test_a_second_run_into_the_same_out_is_refused(dataset: SynthResult, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """While one run holds OUT, another stops before touching anything there."""
    import os

    from shardify.output.store import OutputStore

    out = tmp_path / "out"
    assert main(convert_args(dataset, out)) == 0
    before = output_files(out)
    held = OutputStore(out).lock()
    try:
        assert main(convert_args(dataset, out, "--seed", "5", "--overwrite")) == 2
        assert "another shardify convert is writing" in capsys.readouterr().err
        assert output_files(out) == before
    finally:
        os.close(held)
    assert main(convert_args(dataset, out)) == 0


@pytest.mark.parametrize("damage", ["older build", "reject index", "negative index", "key"])
def test_a_journal_entry_that_does_not_fit_the_plan_is_redone(
        dataset: SynthResult, clean_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        damage: str) -> None:
    """An entry of an older build (samples without the label CRC-32) or a damaged one (a reject
    index outside the shard, a key the plan lacks) is not reused, and no traceback: that shard
    is written again, and the output is the same as a clean run's."""
    out = tmp_path / "out"
    assert main(convert_args(dataset, out)) == 0
    journal = out / ".shardify" / "journal.jsonl"
    lines = journal.read_text().splitlines()
    entry = json.loads(lines[0])
    if damage == "older build":
        entry["samples"] = [row[:4] for row in entry["samples"]]
    elif damage == "key":
        entry["samples"][0][0] = "not_in_the_plan"
    else:
        entry["rejects"].append([10**6 if damage == "reject index" else -1, "bad-crc", "x"])
    journal.write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
    capsys.readouterr()
    assert main(convert_args(dataset, out)) == 0
    assert f"resumed: {len(lines) - 1} complete shards" in capsys.readouterr().out
    assert output_files(out) == output_files(clean_run)


@pytest.mark.parametrize(("missing", "says"), [
    ("profile", "written by an older shardify, without profile"),  # before dataset profiles
    ("shard_kinds", "whose shards mix data types and image formats"),  # before one kind each
])
def test_an_older_builds_run_is_named_as_such(dataset: SynthResult, tmp_path: Path,
                                              capsys: pytest.CaptureFixture, missing: str,
                                              says: str) -> None:
    """A run.json written by an older build: refused with a message that says so."""
    out = tmp_path / "out"
    assert main(convert_args(dataset, out)) == 0
    run = out / ".shardify" / "run.json"
    record = json.loads(run.read_text())
    del record["options"][missing]
    record["fingerprint"] = "0" * 64
    run.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(convert_args(dataset, out)) == 2
    assert says in capsys.readouterr().err
    assert main(convert_args(dataset, out, "--overwrite")) == 0


# Runs `shardify convert` and records each worker's pid as it starts (argv = pid file, "kill" to
# have the first worker SIGKILL the main process before the worker's own setup ran, or "no").
ORPHAN_CHILD = """
import os, signal, sys, time
from shardify.write import executor
pid_file, kill = sys.argv[1:3]
main_pid, real = os.getpid(), executor._worker_setup
def setup(*args):
    with open(pid_file, "a") as pids:
        first = pids.tell() == 0
        pids.write(f"{os.getpid()}\\n")
    if kill == "kill" and first:
        os.kill(main_pid, signal.SIGKILL)
        while os.getppid() == main_pid:  # until it is really gone
            time.sleep(0.001)
    real(*args)
executor._worker_setup = setup
from shardify.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("delay", [None, 0.0, 0.002, 0.005, 0.02])
def test_no_worker_outlives_a_killed_main_process(dataset: SynthResult, tmp_path: Path,
                                                  delay: float | None) -> None:
    """kill -9 of the main process at any moment after the fork (None: before a worker's setup
    ran): every worker exits, so the pipe given as stdout and stderr reaches EOF."""
    pid_file = tmp_path / "pids"
    pid_file.touch()
    child = subprocess.Popen([sys.executable, "-c", ORPHAN_CHILD, str(pid_file),
                              "kill" if delay is None else "no",
                              *convert_args(dataset, tmp_path / "out", "--workers", "3")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if delay is not None:
            while not pid_file.read_text() and child.poll() is None:
                time.sleep(0.0005)
            time.sleep(delay)
            child.kill()
        child.communicate(timeout=10)  # EOF only once every process holding the pipe is gone
        assert child.returncode == -signal.SIGKILL
    finally:
        for pid in map(int, pid_file.read_text().split()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # a worker left behind by a failure
        child.kill()
