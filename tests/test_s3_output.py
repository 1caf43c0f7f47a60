"""OUT as a URL: convert into a real S3 server (moto, on 127.0.0.1) and memory://, read back.

Every object is compared with a local conversion of the same inputs; a run killed mid-way
resumes to the same bytes, rewriting only the shards it had not journaled; the lease refuses a
second run and gives way to a dead one; verify, report and both loaders read the URL; a missing
bucket and bad credentials end in one line with exit 2.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from conftest import S3Server
from helpers import output_files
from test_resume import CHILD

import shardify
from shardify.cli import main
from shardify.errors import RunFailed
from shardify.loader import manifest_rows
from shardify.output import remote
from shardify.output.remote import LEASE_FILE, RemoteOutputStore
from shardify.profiles.battery.sample import SynthResult
from shardify.storage import location

SHARD_SIZE = "64KiB"
SPLITS = ("train", "val", "test")


def convert_args(dataset: SynthResult, out: str, *extra: str) -> list[str]:
    return ["convert", str(dataset.root), "--out", out, "--shard-size", SHARD_SIZE, "--quiet",
            *extra]


@pytest.fixture(scope="module")
def local(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same inputs converted into a local folder."""
    out = tmp_path_factory.mktemp("local") / "out"
    assert main(convert_args(dataset, str(out))) == 0
    return out


@pytest.fixture(scope="module")
def fs(s3_server: S3Server) -> Any:
    """An s3fs filesystem of the test's own that caches no listings (other processes write)."""
    import s3fs

    return s3fs.S3FileSystem(**s3_server.options, skip_instance_cache=True,
                             use_listings_cache=False)


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.make_bucket("shardify-out")


@pytest.fixture(scope="module")
def converted(dataset: SynthResult, s3_server: S3Server, bucket: str) -> str:
    """The same inputs converted into s3://shardify-out/converted (with two workers)."""
    url = f"{bucket}/converted"
    assert main(convert_args(dataset, url, "--workers", "2", *s3_server.cli_options)) == 0
    return url


def objects(fs: Any, url: str) -> dict[str, bytes]:
    """Every object under `url` except shardify's state, downloaded: name -> bytes."""
    prefix = url.removeprefix("s3://")
    names = [path for path in fs.find(prefix) if "/.shardify/" not in path]
    found = fs.cat(names)
    return {path.removeprefix(f"{prefix}/"): data for path, data in found.items()}


def staging_of(url: str, options: dict[str, object]) -> Path:
    store = RemoteOutputStore(location(url, options))
    return store.staging


# -- the output ----------------------------------------------------------------------------------

def test_every_object_equals_a_local_conversion(converted: str, local: Path, fs: Any,
                                                s3_server: S3Server) -> None:
    assert objects(fs, converted) == output_files(local)
    state = fs.find(f"{converted.removeprefix('s3://')}/.shardify")
    names = {path.split("/.shardify/", 1)[1] for path in state}
    shards = {name for name in output_files(local) if name.endswith(".tar")}
    journals = {name for name in names if name.startswith("journal/")}
    assert names - journals == {"run.json"}  # the lease is gone after the run
    assert {f"journal/{shard}.json" for shard in shards} <= journals  # one per shard
    assert not staging_of(converted, s3_server.options).exists()


def test_verify_report_and_loaders_read_the_url(converted: str, local: Path, tmp_path: Path,
                                                s3_server: S3Server,
                                                capsys: pytest.CaptureFixture) -> None:
    options = s3_server.cli_options
    assert main(["verify", converted, *options]) == 0
    samples = sum(orjson.loads((local / "summary.json").read_bytes())["splits"][s]["samples"]
                  for s in SPLITS)
    assert f"verify: OK: {samples} samples in {converted}" in capsys.readouterr().out
    assert main(["report", str(local)]) == 0
    text = capsys.readouterr().out
    assert main(["report", converted, "--html", str(tmp_path / "r.html"), *options]) == 0
    assert capsys.readouterr().out.startswith(text)  # then the line naming the page
    page = (tmp_path / "r.html").read_text()
    assert page.count('<figure class="thumb"') > 0 and "cannot show" not in page

    storage = s3_server.options
    for split in SPLITS:
        assert manifest_rows(converted, split, storage_options=storage) == \
            manifest_rows(local, split)
        here = list(shardify.open_dataset(local, split, decode="raw", shuffle=0, mix=1))
        there = list(shardify.open_dataset(converted, split, decode="raw", shuffle=0, mix=1,
                                           storage_options=storage))
        assert there == here and len(here) == manifest_rows(local, split).num_rows
        indexed = shardify.open_indexed(converted, split, decode="raw", storage_options=storage)
        assert [indexed[i] for i in range(len(indexed))] == here


def test_dataloader_workers_read_the_url(converted: str, local: Path,
                                         s3_server: S3Server) -> None:
    """Forked DataLoader workers open their own filesystem (fsspec refuses the parent's)."""
    indexed = shardify.open_indexed(converted, decode="numpy",
                                    storage_options=s3_server.options)
    loader = torch.utils.data.DataLoader(indexed, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    got = sorted((meta["key"], label) for _, label, meta in loader)
    rows = manifest_rows(local, "train").to_pylist()
    assert got == sorted((row["key"], row["label"]) for row in rows)


def test_verify_finds_a_damaged_remote_shard(converted: str, fs: Any, s3_server: S3Server,
                                             capsys: pytest.CaptureFixture) -> None:
    copy = converted.replace("/converted", "/damaged")
    fs.copy(converted.removeprefix("s3://"), copy.removeprefix("s3://"),
            recursive=True)
    shard = f"{copy.removeprefix('s3://')}/train/shard-000000.tar"
    data = bytearray(fs.cat_file(shard))
    data[1024 + 100] ^= 0xFF  # inside the first sample's image
    fs.pipe_file(shard, bytes(data))
    assert main(["verify", copy, *s3_server.cli_options]) == 1
    out = capsys.readouterr().out
    assert "verify: FAILED" in out and "train/shard-000000.tar:" in out
    assert "image crc32 differs from the manifest" in out


# -- resume after kill -9 -------------------------------------------------------------------------

def test_killed_run_resumes_to_the_same_objects(dataset: SynthResult, local: Path, fs: Any,
                                                bucket: str, s3_server: S3Server,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """Killed after its third journal object (two workers): the lease stays behind with the
    dead pid, only whole shards are there. The resume takes the lease over, removes the stale
    objects and multipart uploads shardify left (not others'), writes only the unjournaled
    shards, and ends with every object of a local run."""
    url = f"{bucket}/killed"
    args = convert_args(dataset, url, "--workers", "2", *s3_server.cli_options)
    child = subprocess.Popen([sys.executable, "-c", CHILD,
                              "shardify.output.remote:RemoteOutputStore", "append_journal", "3",
                              "after", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=120)
    assert child.returncode == -9, err.decode()
    prefix = url.removeprefix("s3://")
    reference = output_files(local)
    left = objects(fs, url)
    assert left and "summary.json" not in left
    assert all(reference[name] == data for name, data in left.items())  # none partial
    journaled = {path.split("/.shardify/journal/", 1)[1].removesuffix(".json")
                 for path in fs.find(f"{prefix}/.shardify/journal")}
    assert len(journaled) == 3
    held = orjson.loads(fs.cat_file(f"{prefix}/{LEASE_FILE}"))
    assert held["pid"] == child.pid

    # What a killed run may leave, and what is not shardify's to remove.
    fs.pipe_file(f"{prefix}/train/shard-999999.tar", b"stale")
    fs.pipe_file(f"{prefix}/notes.txt", b"mine")
    for key in ("killed/train/shard-000001.tar", "killed/notes.bin"):
        fs.call_s3("create_multipart_upload", Bucket="shardify-out",
                   Key=key)

    published: list[str] = []
    real = RemoteOutputStore.publish_shard

    def publish(store: RemoteOutputStore, name: str) -> None:
        published.append(name)
        real(store, name)

    monkeypatch.setattr(RemoteOutputStore, "publish_shard", publish)
    assert main(args) == 0
    assert "resumed: 3 complete shards" in capsys.readouterr().out
    shards = {name for name in reference if name.endswith(".tar")}
    assert sorted(published) == sorted(shards - journaled)
    assert objects(fs, url) == {**reference, "notes.txt": b"mine"}
    uploads = [upload["Key"] for upload in fs.list_multipart_uploads(
        "shardify-out") if upload["Key"].startswith("killed/")]
    assert uploads == ["killed/notes.bin"]
    assert not fs.exists(f"{prefix}/{LEASE_FILE}")
    assert not staging_of(url, s3_server.options).exists()


# -- the lease -----------------------------------------------------------------------------------

def lease_record(host: str, age: float, pid: int = 1) -> bytes:
    return orjson.dumps({"host": host, "boot": "", "pid": pid, "token": "theirs",
                         "renewed": time.time() - age})


def test_a_held_lease_refuses_a_second_run_and_a_dead_runs_is_taken_over(
        dataset: SynthResult, converted: str, local: Path, fs: Any, bucket: str,
        s3_server: S3Server, capsys: pytest.CaptureFixture) -> None:
    """A live holder (this process; another host's recent lease) refuses, before anything
    changes; another host's lease not renewed for LEASE_TIMEOUT is taken over."""
    before = objects(fs, converted)
    args = convert_args(dataset, converted, "--seed", "5", "--overwrite", *s3_server.cli_options)
    release = RemoteOutputStore(location(converted, s3_server.options)).claim()
    try:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"another shardify convert is writing to {converted}" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        release()
    assert objects(fs, converted) == before

    url = f"{bucket}/leased"
    lease = f"{url.removeprefix('s3://')}/{LEASE_FILE}"
    fs.pipe_file(lease, lease_record("elsewhere", age=5))
    assert main(convert_args(dataset, url, *s3_server.cli_options)) == 2
    said = re.search(r"\(pid 1 on elsewhere, lease renewed (\d+) s ago\)", capsys.readouterr().err)
    assert said is not None and 5 <= int(said[1]) < remote.LEASE_TIMEOUT
    fs.pipe_file(lease, lease_record("elsewhere", age=remote.LEASE_TIMEOUT + 1))
    assert main(convert_args(dataset, url, *s3_server.cli_options)) == 0
    assert objects(fs, url) == output_files(local)


@pytest.mark.parametrize("url", ["s3", "memory"])
def test_a_run_whose_lease_was_taken_over_stops(url: str, bucket: str, s3_server: S3Server,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Renewed every LEASE_RENEWAL (shortened here); once another run holds the lease, this
    one publishes nothing more, and its release leaves the other's lease alone."""
    monkeypatch.setattr(remote, "LEASE_RENEWAL", 0.05)
    where = f"{bucket}/stolen" if url == "s3" else "memory://shardify-tests/stolen"
    store = RemoteOutputStore(location(where, s3_server.options if url == "s3" else {}))
    release = store.claim()
    assert orjson.loads(store.fs.cat_file(store.key(LEASE_FILE)))["token"] != "theirs"
    lease = store.key(LEASE_FILE)
    store.fs.pipe_file(lease, lease_record("elsewhere", age=0))
    deadline = time.monotonic() + 10
    while not store._lease.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(RunFailed, match="took over the lease"):
        store.write_json("summary.json", {})
    release()
    assert orjson.loads(store.fs.cat_file(lease))["token"] == "theirs"
    store.fs.rm(store.base, recursive=True)


# -- other URLs, refusals ------------------------------------------------------------------------

def test_memory_url_output_equals_a_local_conversion(dataset: SynthResult, local: Path) -> None:
    """memory:// takes no conditional PUTs: the lease is read-compare-write there."""
    import fsspec

    url = "memory://shardify-tests/out"
    assert main(convert_args(dataset, url)) == 0
    memory = fsspec.filesystem("memory")
    found = {path.removeprefix("/shardify-tests/out/"): memory.cat_file(path)
             for path in memory.find("/shardify-tests/out") if "/.shardify/" not in path}
    assert found == output_files(local)
    assert main(["verify", url]) == 0
    memory.rm("/shardify-tests/out", recursive=True)


def test_missing_bucket_and_bad_credentials_are_one_line_exit_2(
        dataset: SynthResult, converted: str, s3_server: S3Server,
        capsys: pytest.CaptureFixture) -> None:
    options = s3_server.cli_options
    for command in (convert_args(dataset, "s3://no-such-bucket/out", *options),
                    ["verify", "s3://no-such-bucket/out", *options],
                    ["report", "s3://no-such-bucket/out", *options]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the bucket no-such-bucket does not exist" in err
    wrong = [*options, "--storage-option", "key=wrong", "--storage-option", "secret=wrong"]
    with moto_checks_credentials(s3_server):
        for command in (convert_args(dataset, converted, *wrong), ["verify", converted, *wrong]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "access denied" in err and "credentials" in err


def test_consume_sources_and_a_foreign_prefix_are_refused(
        dataset: SynthResult, bucket: str, fs: Any, s3_server: S3Server,
        capsys: pytest.CaptureFixture) -> None:
    options = s3_server.cli_options
    assert main(convert_args(dataset, f"{bucket}/consumed", "--consume-sources", "--yes",
                             *options)) == 2
    assert "--consume-sources needs a local --out" in capsys.readouterr().err
    fs.pipe_file("shardify-out/foreign/data.bin", b"not shardify's")
    assert main(convert_args(dataset, f"{bucket}/foreign", *options)) == 2
    assert "is not empty and is not a shardify output" in capsys.readouterr().err
    assert fs.find("shardify-out/foreign") == ["shardify-out/foreign/data.bin"]


@contextlib.contextmanager
def moto_checks_credentials(server: S3Server) -> Iterator[None]:
    """moto's server checks access keys inside the block (the fixture's keys fail there too)."""

    def checked_after(count: str) -> None:
        request = urllib.request.Request(f"{server.endpoint}/moto-api/reset-auth",
                                         data=count.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).close()

    checked_after("0")
    try:
        yield
    finally:
        checked_after("inf")
