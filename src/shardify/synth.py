"""Writing sample zips the way the real downloads were written: for profiles' sample data and tests.

A fixed timestamp keeps the zips byte-identical from run to run; names can be written as Korean
Windows tools write them (CP949, no UTF-8 flag) and members with data descriptors, as `zip`
writes to a pipe.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from zipfile import ZIP_DEFLATED, ZIP_STORED

__all__ = ["ZIP_DEFLATED", "ZIP_STORED", "ZipEntry", "flip_byte", "write_zip"]


_DATE_TIME = (2023, 10, 18, 12, 0, 0)
_UTF8_FLAG = 0x800


@dataclass(frozen=True)
class ZipEntry:
    """One member to write; `name_encoding="cp949"` mimics Windows tools (no UTF-8 flag)."""

    name: str
    data: bytes = b""
    method: int = ZIP_DEFLATED
    name_encoding: str = "utf-8"


class _CP949ZipInfo(zipfile.ZipInfo):
    """Writes the name as CP949 bytes with flag bit 11 clear, as Korean Windows zippers do."""

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:
        return self.filename.encode("cp949"), self.flag_bits & ~_UTF8_FLAG


class _Unseekable:
    """Hides seek/tell so zipfile must use data descriptors, as when `zip` writes to a pipe."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw

    def write(self, data: bytes) -> int:
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._raw.close()


def _zipinfo(entry: ZipEntry) -> zipfile.ZipInfo:
    if entry.name_encoding == "cp949":
        info: zipfile.ZipInfo = _CP949ZipInfo(entry.name, date_time=_DATE_TIME)
    elif entry.name_encoding == "utf-8":
        info = zipfile.ZipInfo(entry.name, date_time=_DATE_TIME)
    else:
        raise ValueError(f"unsupported name_encoding {entry.name_encoding!r}")
    info.compress_type = entry.method
    if entry.name.endswith("/"):
        info.external_attr = (0o40755 << 16) | 0x10  # drwxr-xr-x + MS-DOS directory bit
    else:
        info.external_attr = 0o644 << 16
    return info


def write_zip(path: Path, entries: Iterable[ZipEntry], *, stream: bool = False) -> None:
    """Write `entries` in order; `stream=True` yields data descriptors (flag bit 3)."""
    with open(path, "wb") as raw:
        sink: Any = _Unseekable(raw) if stream else raw
        with zipfile.ZipFile(sink, mode="w") as zf:
            for entry in entries:
                zf.writestr(_zipinfo(entry), entry.data)


def flip_byte(path: Path, member: str) -> None:
    """Corrupt one byte in the middle of `member`'s data so its CRC-32 no longer matches."""
    with zipfile.ZipFile(path, metadata_encoding="cp949") as zf:
        info = zf.getinfo(member)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)  # local header: name length, extra length
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        fh.seek(pos)
        byte = fh.read(1)[0]
        fh.seek(pos)
        fh.write(bytes([byte ^ 0xFF]))
