"""Is an image whole? Cheap structural checks of JPEG and PNG bytes, decoding nothing.

Decoding pixels would cost more than the whole conversion; walking the markers (JPEG) or the
chunks (PNG) catches cut-off downloads, HTML error pages saved as images and fakes.
"""

from __future__ import annotations

import struct

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
JPEG_SOS = 0xDA
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IHDR, PNG_IDAT, PNG_IEND = b"IHDR", b"IDAT", b"IEND"
PNG_IHDR_LENGTH = 13
PNG_CHUNK_HEAD = struct.Struct(">I4s")  # length, type; then the data and a 4-byte CRC
PNG_CHUNK_OVERHEAD = PNG_CHUNK_HEAD.size + 4


def image_problem(data: bytes | bytearray, ext: str) -> str | None:
    """Why the bytes are not a complete image of the named kind, or None if they look whole.

    Cheap structural check: JPEG has SOI, a marker chain up to SOS and an EOI after it; PNG is
    walked chunk by chunk (see `_png_problem`). Decoding pixels would cost more than the whole
    conversion.
    """
    if ext == "png":
        return _png_problem(data)
    if not data.startswith(JPEG_SOI):
        return "not a JPEG (no SOI marker)"
    scan_start = _jpeg_scan_start(data)
    if scan_start is None:
        return "JPEG is cut off before its image data (no SOS marker)"
    if data.rfind(JPEG_EOI, scan_start) < 0:
        return "JPEG is cut off (no EOI marker after the image data)"
    return None


def _png_problem(data: bytes | bytearray) -> str | None:
    """Signature, IHDR (13 bytes) first, every chunk (length, type, data, CRC) within the bytes,
    an IDAT, and IEND as the last chunk: a chunk after it is refused, while other bytes after it
    (padding some exporters add; decoders ignore them) are accepted, as they always were. CRCs
    are not checked: a bad image CRC in the zip is caught by the member's CRC-32 already.
    """
    if not data.startswith(PNG_SIGNATURE):
        return "not a PNG (no PNG signature)"
    pos, seen_idat = len(PNG_SIGNATURE), False
    while pos + PNG_CHUNK_OVERHEAD <= len(data):
        length, chunk_type = PNG_CHUNK_HEAD.unpack_from(data, pos)
        end = pos + PNG_CHUNK_OVERHEAD + length
        if end > len(data):
            return (f"PNG is cut off (its {chunk_type.decode('latin-1')!r} chunk at offset {pos} "
                    f"runs {end - len(data)} bytes past the end)")
        if pos == len(PNG_SIGNATURE) and (chunk_type != PNG_IHDR or length != PNG_IHDR_LENGTH):
            return "PNG does not start with an IHDR chunk of 13 bytes"
        if chunk_type == PNG_IEND:
            if not seen_idat:
                return "PNG has no IDAT chunk before IEND"
            if _is_chunk(data, end):
                return "PNG has chunks after its IEND chunk"
            return None
        seen_idat = seen_idat or chunk_type == PNG_IDAT
        pos = end
    return "PNG is cut off (no IEND chunk)"


def _is_chunk(data: bytes | bytearray, pos: int) -> bool:
    """Whether a whole chunk (length, a 4-letter type, data, CRC) starts at `pos`."""
    if pos + PNG_CHUNK_OVERHEAD > len(data):
        return False
    length, chunk_type = PNG_CHUNK_HEAD.unpack_from(data, pos)
    return chunk_type.isalpha() and pos + PNG_CHUNK_OVERHEAD + length <= len(data)


def _jpeg_scan_start(data: bytes | bytearray) -> int | None:
    """Offset just past the first SOS segment header, walking the marker segments from SOI."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == JPEG_SOS:
            return pos + 2 + length
        pos += 2 + length
    return None
