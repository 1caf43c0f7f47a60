"""The floor: every member read once, inflated and CRC-checked with libdeflate, written to tars.

Nothing else (no pairing, labels, planning or manifest): what reading the input costs on this
machine with the same worker count. With --durable each tar is also flushed to disk (fdatasync)
before it counts as written, as shardify's shards are; without it a few GB of output can stay
in the page cache and never reach the disk while the floor is timed.
usage: python floor.py SOURCE_DIR OUT_DIR WORKERS [--durable]
"""

from __future__ import annotations

import os
import struct
import sys
import tarfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import deflate


def members(source: Path) -> list[tuple[str, int, int, int, int, int]]:
    found = []
    for path in sorted(source.rglob("*.zip")):
        with zipfile.ZipFile(path) as archive:
            found += [(str(path), i.header_offset, i.compress_size, i.file_size, i.CRC,
                       i.compress_type) for i in archive.infolist() if not i.is_dir()]
    return found


def copy(task: tuple[list, str, bool]) -> int:
    todo, target, durable = task
    fds: dict[str, int] = {}
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for number, (path, offset, csize, size, crc, method) in enumerate(todo):
        fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
        head = os.pread(fd, 30, offset)
        name_len, extra_len = struct.unpack("<2H", head[26:30])
        raw = os.pread(fd, csize, offset + 30 + name_len + extra_len)
        data = deflate.deflate_decompress(raw, size) if method == 8 else raw
        assert deflate.crc32(data) == crc
        info = tarfile.TarInfo(f"{number:09d}.bin")
        info.size = size
        os.writev(out, [info.tobuf(tarfile.USTAR_FORMAT), data, bytes(-size % 512)])
    os.write(out, bytes(1024))
    if durable:
        os.fdatasync(out)
    os.close(out)
    return len(todo)


def main(source: Path, out: Path, workers: int, durable: bool) -> None:
    todo = members(source)
    out.mkdir(parents=True, exist_ok=True)
    chunks = [(todo[i::workers], str(out / f"floor-{i}.tar"), durable) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        assert sum(pool.map(copy, chunks)) == len(todo)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), "--durable" in sys.argv[4:])
