"""Helpers shared by the test modules: reading shards back with an independent reader."""

from __future__ import annotations

import json
import random
import socket
import tarfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import pytest

if TYPE_CHECKING:
    from shardify.plan.pairing import Sample


def converted_copy(source: Path, factory: pytest.TempPathFactory, name: str,
                   *options: str) -> Path:
    """`source` converted with `options` (and --quiet) into a fresh OUT: a module's fixture."""
    from shardify.cli import main

    out = factory.mktemp(name) / "out"
    assert main(["convert", str(source), "--out", str(out), "--quiet", *options]) == 0
    return out


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard under `out`, read with tarfile: key -> {extension: bytes}.

    Fails on a member written twice.
    """
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*/shard-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                member = tar.extractfile(info)
                assert member is not None, info.name
                assert ext not in samples.setdefault(key, {}), f"{info.name} written twice"
                samples[key][ext] = member.read()
    return samples


def zip_member(archive: Path, member: str) -> bytes:
    """The member's bytes as `zipfile` reads them (names without the UTF-8 flag are CP949)."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            raw = info.orig_filename
            name = raw if info.flag_bits & 0x800 else raw.encode("cp437").decode("cp949")
            if name.replace("\\", "/") == member:
                return zf.read(info)
    raise KeyError(member)


def write_pieces(data: bytes, folder: Path, zip_name: str, piece: int, seed: int = 0) -> int:
    """Write `data` as the download tool's `X.zip.part<offset>` pieces, in shuffled order."""
    offsets = list(range(0, len(data), piece))
    random.Random(seed).shuffle(offsets)
    for offset in offsets:
        (folder / f"{zip_name}.part{offset}").write_bytes(data[offset : offset + piece])
    return len(offsets)


def split_in_place(zip_path: Path, piece: int, seed: int = 0) -> int:
    """Replace a zip by its pieces; returns how many."""
    data = zip_path.read_bytes()
    zip_path.unlink()
    return write_pieces(data, zip_path.parent, zip_path.name, piece, seed)


def table_rows(path: Path) -> list[dict]:
    """A Parquet file's rows, read through a Python file (the path's bytes need not be UTF-8)."""
    with open(path, "rb") as handle:
        return pq.read_table(handle).to_pylist()


def manifest_rows(out: Path) -> list[dict]:
    return table_rows(out / "manifest.parquet")


def reject_rows(out: Path) -> list[dict]:
    return table_rows(out / "rejects.parquet")


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_bytes())


def output_files(out: Path, *index_files: str) -> dict[str, bytes]:
    """Every file a finished output holds except shardify's private state; with `index_files`,
    only the shards and those files."""
    if index_files:
        files = {p.relative_to(out).as_posix(): p.read_bytes()
                 for p in sorted(out.glob("*/shard-*.tar"))}
        return files | {name: (out / name).read_bytes() for name in index_files}
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".shardify" not in p.parts}


def source_ext(sample: Sample) -> str:
    """The planner's image format of a sample converted without transforms: its source's."""
    return sample.image_ext


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
