"""SOURCE arguments in object storage (issue 16): zips, offset-named pieces, a multi-volume set
and a download.tar in a real S3 server (moto's, on loopback), read in place by ranged requests.

The reference is the local conversion of the very same files: every output file is identical,
summary.json included once its `options.sources` (the SOURCE arguments as typed) is set aside.
Requests are counted by an HTTP proxy in front of the server, so the workers' are counted too.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tarfile
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import S3Server
from helpers import manifest_rows, output_files, read_shards, split_in_place, summary_of
from s3server import CountingProxy, counting_proxy

from shardify.archives.discovery import find_archives
from shardify.archives.reader import ArchiveReader
from shardify.archives.zipdir import TAIL_READAHEAD, index_archives
from shardify.cli import main
from shardify.profiles.battery.sample import SynthResult

BUCKET = "s3src-sources"
ZIP_TOOL = shutil.which("zip")
PIECE = 16 * 2**10


# --- a proxy that counts what reaches the server --------------------------------------------------


@pytest.fixture(scope="module")
def proxy(s3_server: S3Server) -> Iterator[CountingProxy]:
    with counting_proxy(s3_server.endpoint) as counting:
        yield counting


def storage_args(options: dict[str, object]) -> list[str]:
    return [arg for key, value in options.items()
            for arg in ("--storage-option", f"{key}={value}")]


# --- the download, local and in the bucket ------------------------------------------------------


@pytest.fixture(scope="module")
def tree(dataset: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample dataset as a download can be: one zip as 16 KiB `.partN` pieces, one as a
    `zip -s` volume set, the Validation zips inside a download.tar, the rest whole."""
    top = tmp_path_factory.mktemp("tree") / "src"
    shutil.copytree(dataset.root, top / dataset.root.name)
    zips = {path.name: path for path in top.rglob("*.zip")}
    split_in_place(zips["TS_CT_Datasets_images_1.zip"], PIECE)
    if ZIP_TOOL is not None:
        whole = zips["TS_Exterior_Img_Datasets_images_1.zip"]
        spanned = whole.with_suffix(".spanned.zip")
        subprocess.run([ZIP_TOOL, "-q", "-s", "64k", str(whole), "--out", str(spanned)],
                       check=True)
        whole.unlink()
        for volume in spanned.parent.glob(f"{spanned.stem}.z*"):
            volume.rename(whole.with_suffix(volume.suffix))
    with tarfile.open(top / "download.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(top.rglob("V*_Datasets_*.zip")):
            tar.add(path, path.relative_to(top).as_posix())
            path.unlink()
    return top


@pytest.fixture(scope="module")
def remote(s3_server: S3Server, tree: Path) -> str:
    """`tree` uploaded to s3://BUCKET/data."""
    import s3fs

    url = s3_server.make_bucket(BUCKET)
    fs = s3fs.S3FileSystem(**s3_server.options)
    fs.put(f"{tree}/", f"{BUCKET}/data", recursive=True)
    fs.invalidate_cache()
    return f"{url}/data"


@pytest.fixture(scope="module")
def local_out(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    assert main(["convert", str(tree), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    return out


@dataclass
class RemoteRun:
    out: Path
    requests: list[tuple[str, str, str | None]]  # what reached the server during the run
    object_gets: list[tuple[str, str, str | None]]


@pytest.fixture(scope="module")
def remote_run(remote: str, proxy: CountingProxy, s3_server: S3Server,
               tmp_path_factory: pytest.TempPathFactory) -> RemoteRun:
    """The conversion of s3://.../data by two forked workers, through the counting proxy. A
    scan first leaves this process with a filesystem in use (its event loop, connections):
    the workers forked after it must open their own."""
    out = tmp_path_factory.mktemp("remote") / "out"
    options = storage_args({**s3_server.options, "endpoint_url": proxy.endpoint})
    assert main(["scan", remote, *options]) == 0
    proxy.seen.clear()
    assert main(["convert", remote, "--out", str(out), "--quiet", "--workers", "2",
                 "--manifest", str(out.parent / "copy.parquet"), *options]) == 0
    return RemoteRun(out, list(proxy.seen), proxy.object_gets())


# --- the tests ----------------------------------------------------------------------------------


def test_convert_from_s3_is_byte_identical_to_local(
        dataset: SynthResult, tree: Path, remote: str, local_out: Path,
        remote_run: RemoteRun) -> None:
    """Shards, manifest, rejects, indexes, card: the same bytes; summary.json differs only in
    the SOURCE argument it records. Pieces, volumes and the tar's zips were all read remotely."""
    local_files, remote_files = output_files(local_out), output_files(remote_run.out)
    local_summary = json.loads(local_files.pop("summary.json"))
    remote_summary = json.loads(remote_files.pop("summary.json"))
    assert remote_files == local_files
    copy = remote_run.out.parent / "copy.parquet"  # --manifest: checked against a URL SOURCE
    assert copy.read_bytes() == remote_files["manifest.parquet"]
    assert local_summary["options"].pop("sources") == [str(tree)]
    assert remote_summary["options"].pop("sources") == [remote]
    assert remote_summary == local_summary

    kinds = {archive["kind"] for archive in remote_summary["archives"]}
    assert {"pieces", "download.tar: zip", "zip"} <= kinds
    assert ZIP_TOOL is None or "volumes" in kinds
    rows = manifest_rows(remote_run.out)
    assert len(rows) == dataset.samples == remote_summary["samples"]
    samples = read_shards(remote_run.out)  # tarfile: an independent reader
    assert sorted(samples) == sorted(row["key"] for row in rows)
    assert all(sample["cls"] == str(row["label"]).encode()
               for row in rows for sample in [samples[row["key"]]])


def test_ranged_requests_per_member(remote_run: RemoteRun) -> None:
    """At most 1.1 requests per member over the whole run (directories, labels, the workers'
    shards); every object read is a ranged GET, and objects are listed, not probed one by one."""
    members = sum(archive["members"] for archive in summary_of(remote_run.out)["archives"])
    gets = remote_run.object_gets
    assert gets and all(range_ and range_.startswith("bytes=") for _, _, range_ in gets)
    assert len(gets) / members <= 1.1, (len(gets), members)
    # The sample zips are small: a shard's members of one file come in one window, so far
    # fewer requests than members (reading each member on its own would take about one each).
    assert len(gets) <= members / 3, (len(gets), members)
    heads = [r for r in remote_run.requests if r[0] == "HEAD"]
    assert len(heads) <= 2  # the SOURCE itself (a folder or a file?), at most once per process


def test_central_directory_in_one_request_per_file(
        remote: str, s3_server: S3Server, tmp_path: Path) -> None:
    """Listing members costs one request per file of an archive's last MiB: the end records
    and, for a small zip, its whole directory and the local headers the checks probe. A zip
    whose directory is larger takes 5: the tail, the directory, three local header probes."""
    import s3fs

    reader = ArchiveReader()
    archives = find_archives([remote], s3_server.options).archives
    index = index_archives(archives, reader)
    assert len(index.archives) == len(archives) and index.member_count > 0
    assert all(archive.size <= TAIL_READAHEAD for archive in archives)
    files = [len({extent.path for extent in archive.extents}) for archive in archives]
    assert max(files) > 2  # the piece set
    assert reader.requests == sum(files)

    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as archive:  # 20k members: a 1.2 MiB central directory
        for number in range(20_000):
            archive.writestr(f"m/{number:06d}.json", b"{}" * 30)
    s3fs.S3FileSystem(**s3_server.options).put(str(big), f"{BUCKET}/big/big.zip")
    reader = ArchiveReader()
    found = find_archives([f"s3://{BUCKET}/big/big.zip"], s3_server.options).archives
    index = index_archives(found, reader)
    assert index.member_count == 20_000 and not index.rejects
    assert reader.requests == 5


def test_a_piece_named_alone_brings_its_set_from_the_bucket(
        tree: Path, remote: str, s3_server: S3Server) -> None:
    """`s3://.../X.zip.part0` reads every piece of X.zip beside it, as a local path does."""
    first = next(tree.rglob("*.zip.part0")).relative_to(tree).as_posix()
    (local,) = find_archives([str(tree / first)]).archives
    (found,) = find_archives([f"{remote}/{first}"], s3_server.options).archives
    assert (found.name, found.kind) == (local.name, local.kind) == (
        first.rsplit("/", 1)[1].removesuffix(".part0"), "pieces")
    assert [e.length for e in found.extents] == [e.length for e in local.extents]
    assert len(found.extents) > 2


def _stored_zip(path: Path, sizes: list[int]) -> dict[str, bytes]:
    """A zip of stored members of random bytes, of these sizes, then one more of 1.2 MB (so
    they lie before the tail fetched with the directory); returns theirs, name -> bytes."""
    members = {f"m{number:03d}.bin": random.Random(number).randbytes(size)
               for number, size in enumerate(sizes)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("tail.bin", bytes(1_200_000))
    return members


def test_a_member_is_one_request_header_and_payload_together(
        s3_server: S3Server, tmp_path: Path) -> None:
    """A remote member read alone takes one ranged request, its local header with it (a local
    one larger than 64 KiB takes two preads: header, then payload in place)."""
    import s3fs

    members = _stored_zip(tmp_path / "large.zip", [300_000, 5, 200_000])
    s3fs.S3FileSystem(**s3_server.options).put(str(tmp_path / "large.zip"),
                                                f"{BUCKET}/large/large.zip")
    (archive,) = find_archives([f"s3://{BUCKET}/large"], s3_server.options).archives
    with ArchiveReader() as reader:
        (table,) = index_archives([archive], reader).tables
        listed = reader.requests
        assert {m.name: bytes(reader.read(m)) for m in table.members()
                if m.name in members} == members
        assert reader.requests - listed == len(members)


def test_read_ahead_fetches_each_window_once_and_again_what_was_dropped(
        s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard writer's read-ahead: neighbours in one request, members read in any order; a
    window dropped to bound memory is fetched again, only its members not read yet. Windows of
    256 KiB, at most 512 KiB held, here (the real sizes are 16 and 64 MiB)."""
    import s3fs

    from shardify.archives import reader as reader_module

    monkeypatch.setattr(reader_module, "REMOTE_WINDOW", 256 * 2**10)
    monkeypatch.setattr(reader_module, "HELD_WINDOW_BYTES", 512 * 2**10)
    members = _stored_zip(tmp_path / "many.zip", [40 * 2**10] * 24)  # 4 windows of 6
    s3fs.S3FileSystem(**s3_server.options).put(str(tmp_path / "many.zip"),
                                                f"{BUCKET}/many/many.zip")
    (archive,) = find_archives([f"s3://{BUCKET}/many"], s3_server.options).archives
    with ArchiveReader() as reader:
        (table,) = index_archives([archive], reader).tables
        listed = sorted((m for m in table.members() if m.name in members),
                        key=lambda m: m.header_offset)
        order = listed[::6] + [m for i, m in enumerate(listed) if i % 6]
        before, read = reader.requests, {}
        with reader.reading_ahead(listed):
            for member in order:
                read[member.name] = bytes(reader.read(member))
        assert read == members
        # 4 windows, held 2 at a time: the first members of each (4 requests) drop windows 0
        # and 1, then window 0 again drops 2; 0, 1 and 2 are fetched again (3 more).
        assert reader.requests - before == 7


def test_scan_of_s3_and_memory_urls_matches_local(
        tree: Path, remote: str, s3_server: S3Server,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`scan` of the bucket (and of the same files in fsspec's memory://) reports exactly what
    the scan of the local folder reports."""
    import fsspec

    def scan(*args: str) -> dict:
        capsys.readouterr()
        assert main(["scan", *args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    local = scan(str(tree))
    assert local["pairs"] > 0
    assert scan(remote, *s3_server.cli_options) == local
    memory = fsspec.filesystem("memory")
    memory.put(f"{tree}/", "/s3src-scan", recursive=True)
    try:
        assert scan("memory://s3src-scan") == local
    finally:
        memory.rm("/s3src-scan", recursive=True)


def test_verify_compares_with_sources_in_s3(
        tree: Path, remote: str, remote_run: RemoteRun, local_out: Path, s3_server: S3Server,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`verify OUT --sources s3://...` compares every sample with its remote source member; with
    only part of the sources given, the samples of the rest are problems."""
    capsys.readouterr()
    assert main(["verify", str(local_out), "--sources", remote, *s3_server.cli_options]) == 0
    assert "match their manifest and their sources" in capsys.readouterr().out
    training = next(tree.rglob("Training")).relative_to(tree).as_posix()
    assert main(["verify", str(remote_run.out), "--sources", f"{remote}/{training}",
                 *s3_server.cli_options]) == 1
    assert "not found in --sources" in capsys.readouterr().out


@contextmanager
def credentials_checked(s3_server: S3Server) -> Iterator[None]:
    """moto checks requests' credentials while inside (it accepts any by default)."""

    def set_count(value: bytes) -> None:
        request = urllib.request.Request(f"{s3_server.endpoint}/moto-api/reset-auth", data=value,
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).close()

    set_count(b"0")
    try:
        yield
    finally:
        set_count(b"inf")


@pytest.mark.parametrize("command", ["convert", "scan", "verify"])
def test_missing_bucket_and_bad_credentials_are_one_line_exit_2(
        command: str, remote: str, local_out: Path, s3_server: S3Server, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A bucket that does not exist, a prefix with nothing under it and a key the server does
    not know: one line on stderr, exit 2, nothing written."""
    out = tmp_path / "out"

    def run(source: str, *options: str) -> str:
        args = {"convert": ["convert", source, "--out", str(out), "--workers", "1"],
                "scan": ["scan", source],
                "verify": ["verify", str(local_out), "--sources", source]}[command]
        capsys.readouterr()
        assert main([*args, *s3_server.cli_options, *options]) == 2
        err = capsys.readouterr().err
        assert err.startswith("shardify: error: ") and err.count("\n") == 1, err
        return err

    assert "source not found: s3://s3src-no-such-bucket/data" in run(
        "s3://s3src-no-such-bucket/data")
    assert f"source not found: {remote}/nothing-here" in run(f"{remote}/nothing-here")
    with credentials_checked(s3_server):
        err = run(remote, "--storage-option", "key=AKIAUNKNOWN", "--storage-option",
                  "secret=wrong")
    assert "access denied" in err and "credentials" in err
    assert not out.exists()


def test_consuming_remote_sources_is_refused(remote: str, s3_server: S3Server, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--consume-sources deletes local files only: with an s3:// SOURCE it is refused at once."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["convert", remote, "--out", str(out), "--consume-sources", "--yes",
                 *s3_server.cli_options]) == 2
    err = capsys.readouterr().err
    assert "--consume-sources" in err and remote in err and err.count("\n") == 1
    assert not out.exists()
