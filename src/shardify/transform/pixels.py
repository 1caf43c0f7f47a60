"""Decode, crop, resample and encode one image with Pillow: the transforms' only pixel code.

A baseline JPEG is decoded only down to the last row the crop and the resampling read (its
frame height is lowered: libjpeg stops there, and every row above is the same as in a whole
decode). JPEGs shrunk by 2x or more are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
(`draft`); the crop and the resampling are one LANCZOS `resize(box=...)` on the stored pixels,
and the EXIF rotation is applied last, to the small result. Colour modes are kept where the
output format can hold them.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, cast

from PIL import Image, ImageFile

from .geometry import ROTATED, Box, orient_point

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

ORIENTATION_TAG = 0x0112
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
INVERSE = {6: 8, 8: 6}  # the other orientations undo themselves
PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# zlib level 6 with the RLE strategy: 2-2.5x faster than Pillow's default on photos and no
# larger (benchmarks/image_libraries.py); the PNG encode was most of an RGB image's time.
PNG_COMPRESS_LEVEL, PNG_COMPRESS_TYPE = 6, zlib.Z_RLE
LANCZOS_SUPPORT = 3  # source pixels per output pixel the filter reaches, each side
# Rows decoded past the last one resampling reads: the last row of a shortened decode may be
# upsampled differently (chroma context below it); 16 is one whole MCU row more.
ROW_MARGIN = 16
BASELINE_SOF = (0xC0, 0xC1)
STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: no length field
ENCODABLE = {"JPEG": ("L", "RGB", "CMYK"), "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
             "WEBP": ("RGB", "RGBA")}


class ImageError(Exception):
    """The image cannot be decoded or written as asked (the message is the reject's detail)."""


class BufferFile(io.RawIOBase):
    """A read-only file over bytes or a bytearray, optionally with a few bytes replaced.

    `io.BytesIO` copies anything but `bytes` (libdeflate inflates into a bytearray), and a
    patched frame header would be a second copy: on a 4000x4000 slice those copies fault in
    ~12 MB of fresh pages per image, which cost more than the crop saves.
    """

    def __init__(self, data: bytes | bytearray, patch_at: int = 0, patch: bytes = b"") -> None:
        super().__init__()
        self._view = memoryview(data)
        self._patch_at, self._patch = patch_at, patch
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        start = self._position
        end = len(self._view) if size is None or size < 0 else min(len(self._view),
                                                                      start + size)
        if start >= end:
            return b""
        chunk = bytes(self._view[start:end])
        self._position = end
        patch_end = self._patch_at + len(self._patch)
        if start < patch_end and self._patch_at < end:  # the patch overlaps this read
            lo, hi = max(start, self._patch_at), min(end, patch_end)
            chunk = (chunk[:lo - start] + self._patch[lo - self._patch_at:hi - self._patch_at]
                     + chunk[hi - start:])
        return chunk

    def readinto(self, buffer: WriteableBuffer) -> int:
        chunk = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[:len(chunk)] = chunk
        return len(chunk)


def _open(file: BufferFile) -> ImageFile.ImageFile:
    return Image.open(cast(IO[bytes], file))  # Pillow needs only read, seek and tell


@dataclass
class SourceImage:
    """An opened, not yet decoded, source image: its stored size and EXIF orientation."""

    image: Image.Image
    width: int
    height: int
    orientation: int
    data: bytes | bytearray

    @property
    def upright_size(self) -> tuple[int, int]:
        """The size once the EXIF orientation is applied."""
        if self.orientation in ROTATED:
            return self.height, self.width
        return self.width, self.height


def open_image(data: bytes | bytearray) -> SourceImage:
    """Read an image's header (no pixels yet); ImageError if Pillow cannot make sense of it."""
    try:
        image = _open(BufferFile(data))
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception as error:  # a decoder's error on untrusted bytes is a reject, not a crash
        raise ImageError(f"cannot decode: {error}") from None
    if orientation not in TRANSPOSE:
        orientation = 1
    if image.format == "PNG" and image.mode in ("RGB", "RGBA") and any(
            str(tile[3]).endswith(";16B") for tile in image.tile):
        raise ImageError("a 16-bit colour PNG: Pillow reads it as 8-bit, which would lose "
                         "its values (convert without a transform to keep it as it is)")
    return SourceImage(image, image.width, image.height, orientation, data)


def render(source: SourceImage, box: Box, size: tuple[int, int], ext: str,
           quality: int | None) -> bytes:
    """The upright pixels of `box` resampled to `size`, encoded as `ext` (jpg, png, webp)."""
    stored_box, stored_size = _stored(source, box, size)
    image = source.image
    try:
        scale = min(stored_size[0] / stored_box.width, stored_size[1] / stored_box.height)
        if image.format == "JPEG":
            image = _top_rows(source, stored_box.y1 + math.ceil(LANCZOS_SUPPORT / scale) + 2
                              + ROW_MARGIN * 8)  # x8: room for a 1/8 draft's rows too
        reduction = 1.0  # source pixels per decoded pixel
        if image.format == "JPEG" and scale <= 0.5:
            # The DCT scale the whole image would get, asked of a possibly shortened one.
            whole = min(source.width // math.ceil(source.width * scale),
                        source.height // math.ceil(source.height * scale))
            factor = next(f for f in (8, 4, 2, 1) if f <= whole)
            drafted = image.draft(image.mode, (max(1, image.width // factor),
                                               max(1, image.height // factor)))
            if drafted is not None:  # decoded pixel i covers source pixels [i*r, (i+1)*r)
                reduction = source.width / drafted[1][2]
        image = _resample(image, stored_box, stored_size, reduction)
        if source.orientation != 1:
            image = image.transpose(TRANSPOSE[source.orientation])
    except Exception as error:  # see open_image
        raise ImageError(f"cannot decode: {error}") from None
    return encode(image, ext, quality)


def encode(image: Image.Image, ext: str, quality: int | None) -> bytes:
    """`image` in format `ext`; alpha is dropped for JPEG, which cannot hold it."""
    pil_format = PIL_FORMAT[ext]
    if image.mode not in ENCODABLE[pil_format]:
        image = image.convert(_encodable_mode(image.mode, pil_format))
    out = io.BytesIO()
    icc = image.info.get("icc_profile")  # PNG keeps it by itself; JPEG and WebP are told
    try:
        if pil_format == "JPEG":
            image.save(out, pil_format, quality=quality or 95, icc_profile=icc)
        elif pil_format == "PNG":
            image.save(out, pil_format, compress_level=PNG_COMPRESS_LEVEL,
                       compress_type=PNG_COMPRESS_TYPE)
        elif quality is None:
            image.save(out, pil_format, lossless=True, icc_profile=icc)
        else:
            image.save(out, pil_format, quality=quality, icc_profile=icc)
    except Exception as error:  # e.g. wider than WebP's 16383 pixels: a reject, not a crash
        raise ImageError(f"cannot write as {pil_format}: {error}") from None
    return out.getvalue()


def _encodable_mode(mode: str, pil_format: str) -> str:
    if mode.startswith("I") or mode == "F":
        if pil_format != "PNG":
            raise ImageError(f"a {mode} (high bit depth) image cannot be written as "
                             f"{pil_format} without losing its values; use --format png")
        return "I;16"
    alpha = "A" in mode or mode == "P"
    grey = mode in ("1", "L", "LA", "La")
    if pil_format == "JPEG":
        return "L" if grey else "RGB"
    if pil_format == "WEBP":
        return "RGBA" if alpha else "RGB"
    return ("LA" if alpha else "L") if grey else ("RGBA" if alpha else "RGB")


def _stored(source: SourceImage, box: Box, size: tuple[int, int]
            ) -> tuple[Box, tuple[int, int]]:
    """An upright box and output size in the stored image's pixels (before the EXIF turn)."""
    if source.orientation == 1:
        return box, size
    inverse = INVERSE.get(source.orientation, source.orientation)
    width, height = source.upright_size
    corners = [orient_point(x, y, inverse, width, height)
               for x, y in ((box.x0, box.y0), (box.x1, box.y1))]
    xs, ys = [int(c[0]) for c in corners], [int(c[1]) for c in corners]
    stored_box = Box(min(xs), min(ys), max(xs), max(ys))
    return stored_box, (size[::-1] if source.orientation in ROTATED else size)


def _top_rows(source: SourceImage, rows: int) -> Image.Image:
    """The source JPEG opened to decode only its first `rows` rows, when it is a baseline JPEG
    taller than that; otherwise the source image as it is."""
    data, at = source.data, 2
    while rows < source.height and at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in STANDALONE:
            at += 2
            continue
        if marker in BASELINE_SOF:
            if struct.unpack(">H", data[at + 5:at + 7])[0] <= rows:
                break  # not taller than needed (or its height comes later, in a DNL marker)
            return _open(BufferFile(data, at + 5, struct.pack(">H", rows)))
        if marker == 0xDA or (0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            break  # scan data first, or progressive / lossless / arithmetic: decode it all
        at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    return source.image


def _resample(image: Image.Image, box: Box, size: tuple[int, int],
              reduction: float) -> Image.Image:
    """Crop and resample once, on the (possibly DCT-reduced) decoded pixels."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("L", "RGB") and "transparency" in image.info:  # a PNG tRNS colour
        image = image.convert(image.mode[0] + "A" if image.mode == "L" else "RGBA")
    elif image.mode == "1":
        image = image.convert("L")
    if size == (box.width, box.height):
        if size == image.size:
            image.load()  # decode now: a broken image is a decode error, not an encode one
            return image
        return image.crop((box.x0, box.y0, box.x1, box.y1))
    return image.resize(size, Image.Resampling.LANCZOS,
                        box=(box.x0 / reduction, box.y0 / reduction, box.x1 / reduction,
                             box.y1 / reduction))
