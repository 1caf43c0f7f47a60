"""Helpers shared by the test modules: reading shards back with an independent reader."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path


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
