"""Generate a small, deterministic dataset shaped like AI Hub's "battery defect image" download.

The real set is ~507 GB, so `make demo` and the tests run on this stand-in instead. Every quirk
and failure the converter must survive (see docs on the AI Hub layout) is planted on purpose,
and `SynthResult` records, counted while writing, what a correct conversion has to report.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zipfile import ZIP_DEFLATED, ZIP_STORED

import numpy as np
import orjson
from PIL import Image

from ...rejects import Reason
from ...synth import ZipEntry, flip_byte, write_zip

__all__ = [
    "CT_BACKGROUND",
    "CT_DEFECT",
    "CT_OBJECT",
    "CT_SIZE",
    "DEFECT_COLOURS",
    "RGB_BACKGROUND",
    "RGB_OBJECT",
    "RGB_SIZE",
    "SynthResult",
    "synthesize",
]

ROOT_NAME = "103.배터리 불량 이미지 데이터"
DATA_DIR = Path("3.개방데이터", "1.데이터")


# Image sizes (width, height) and the flat colours painted before noise and JPEG: a bright
# cell section on a dark CT slice, a blue cell on a grey table. Every defect is painted over
# its whole polygon (and 1.5 px beyond, then fading into the object) in its DEFECT_COLOURS
# entry, keyed by the defect's name in lower case, one value per band of the image's mode
# ("L": 1, "RGB": 3).
CT_SIZE = (384, 384)
RGB_SIZE = (320, 180)
CT_BACKGROUND = 25
CT_OBJECT = 170
CT_DEFECT = 255
RGB_BACKGROUND = (205, 205, 210)
RGB_OBJECT = (60, 90, 150)
DEFECT_COLOURS: dict[str, tuple[int, ...]] = {
    "porosity": (CT_DEFECT,),
    "resin overflow": (CT_DEFECT,),
    "damaged": (30, 30, 30),
    "pollution": (120, 90, 40),
}
# Noise: per pixel on CT slices, in 8-px tiles on photos (per-pixel noise would make the PNGs
# ten times larger); small, so that samples stay a few KB, near what they were at 96 px.
_CT_NOISE = 1.0
_RGB_NOISE = 2.0
_RGB_TILE = 8
_MARGIN = 2.0  # outline polygons run this far outside the object's edge
_PAINT_BEYOND = 1.5  # defects are painted this far beyond the circle their polygon lies on
_RIM = 2.0  # and fade into the object over this many pixels
_DEFECT_NAMES = {"ct": ("porosity", "resin overflow"), "rgb": ("Damaged", "Pollution")}

# Junk that archivers and desktops leave behind; the converter must skip it silently.
_APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(58)
_THUMBS_DB = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(56)
_DESKTOP_INI = b"[.ShellClassInfo]\r\nIconResource=C:\\Windows\\System32\\imageres.dll,-3\r\n"
_DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(56)
# What an expired AI Hub download link saves instead of the real file.
_HTML_ERROR = b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>\n"


@dataclass(frozen=True)
class SynthResult:
    """What a correct conversion of the synthesized tree must report."""

    root: Path
    samples: int
    batteries: dict[str, int]
    rejects: dict[str, int]
    identical_duplicates: int
    ignored: int
    no_outline: int  # accepted samples whose label has no usable outline (none, < 3 points, odd)
    odd_point_lists: int  # odd-length point lists (outlines and defects) in accepted labels
    not_normal_without_defects: int  # is_normal false, yet no defects and no swelling


@dataclass(frozen=True)
class _ZipSpec:
    relpath: str  # below DATA_DIR
    prefix: str  # folder inside the zip; deliberately different in every zip
    name_encoding: str
    method: int
    stream: bool = False


_ZIPS: dict[str, _ZipSpec] = {
    "TS_CT_1": _ZipSpec(
        "Training/01.원천데이터/TS_CT_Datasets_images_1.zip",
        "원천데이터/CT/",
        "cp949",
        ZIP_DEFLATED,
    ),
    "TS_CT_2": _ZipSpec(
        "Training/01.원천데이터/TS_CT_Datasets_images_2.zip",
        "TS_CT_Datasets_images_2/",
        "utf-8",
        ZIP_DEFLATED,
    ),
    "TS_RGB": _ZipSpec(
        "Training/01.원천데이터/TS_Exterior_Img_Datasets_images_1.zip",
        "01.원천데이터/외관/",
        "utf-8",
        ZIP_STORED,
    ),
    "TL_CT": _ZipSpec(
        "Training/02.라벨링데이터/TL_CT_Datasets_label.zip",
        "TL_CT_Datasets_label/",
        "utf-8",
        ZIP_DEFLATED,
    ),
    "TL_RGB": _ZipSpec(
        "Training/02.라벨링데이터/TL_Exterior_Img_Datasets_label.zip",
        "라벨링데이터/외관/",
        "cp949",
        ZIP_DEFLATED,
    ),
    "VS_CT": _ZipSpec(
        "Validation/01.원천데이터/VS_CT_Datasets_images.zip", "", "utf-8", ZIP_DEFLATED
    ),
    "VS_RGB": _ZipSpec(
        "Validation/01.원천데이터/VS_Exterior_Img_Datasets_images.zip",
        "VS_Exterior_Img_Datasets_images/",
        "utf-8",
        ZIP_DEFLATED,
    ),
    "VL_CT": _ZipSpec(
        "Validation/02.라벨링데이터/VL_CT_Datasets_label.zip",
        "02.라벨링데이터/CT/",
        "utf-8",
        ZIP_DEFLATED,
        stream=True,
    ),
    "VL_RGB": _ZipSpec(
        "Validation/02.라벨링데이터/VL_Exterior_Img_Datasets_label.zip",
        "VL/",
        "utf-8",
        ZIP_DEFLATED,
    ),
}


@dataclass(frozen=True)
class _Shape:
    """A silhouette: the rectangle cx ± hw, cy ± hh grown by elliptical corners of radii rx, ry
    (hw = hh = 0 is an ellipse, rx = ry a rounded rectangle)."""

    cx: int
    cy: int
    hw: int
    hh: int
    rx: int
    ry: int

    def moved(self, dx: int, dy: int) -> _Shape:
        return dataclasses.replace(self, cx=self.cx + dx, cy=self.cy + dy)

    def mask(self, w: int, h: int) -> np.ndarray:
        """Which pixels (sampled at their integer coordinates) belong to the silhouette."""
        yy, xx = np.ogrid[0:h, 0:w]
        dx = np.maximum(np.abs(xx - self.cx) - self.hw, 0) / self.rx
        dy = np.maximum(np.abs(yy - self.cy) - self.hh, 0) / self.ry
        return np.asarray(dx * dx + dy * dy <= 1.0)

    def outline(self, per_corner: int) -> list[int]:
        """A convex polygon of 4 * per_corner points just outside the edge.

        Every side is tangent to the silhouette grown by _MARGIN (the corners' circumscribed
        polygons, joined by the straight sides), so the polygon encloses every pixel of it.
        """
        step = np.pi / 2 / per_corner
        grow = 1.0 / np.cos(step / 2)
        angles = (np.arange(4 * per_corner) + 0.5) * step
        cos, sin = np.cos(angles), np.sin(angles)
        xs = self.cx + np.sign(cos) * self.hw + (self.rx + _MARGIN) * grow * cos
        ys = self.cy + np.sign(sin) * self.hh + (self.ry + _MARGIN) * grow * sin
        return [int(v) for v in np.rint(np.stack([xs, ys], axis=1)).ravel()]


def _ct_shape(rng: np.random.Generator) -> _Shape:
    """An elliptic cell section covering 3.3-4.5 % of the slice, well inside it."""
    w, h = CT_SIZE
    area = float(rng.uniform(0.033, 0.045)) * w * h
    aspect = float(rng.uniform(0.75, 1.33))
    ry = round(float(np.sqrt(area / (np.pi * aspect))))
    rx = round(ry * aspect)
    cx = int(rng.integers(rx + 40, w - rx - 40))
    cy = int(rng.integers(ry + 40, h - ry - 40))
    return _Shape(cx, cy, 0, 0, rx, ry)


def _rgb_shape(rng: np.random.Generator) -> _Shape:
    """A rounded-rectangle cell covering 5.5-13.5 % of the photo, well inside it."""
    w, h = RGB_SIZE
    half_h = int(rng.integers(24, 32))
    half_w = int(rng.integers(int(1.4 * half_h), 2 * half_h + 1))
    cx = int(rng.integers(half_w + 16, w - half_w - 16))
    cy = int(rng.integers(half_h + 12, h - half_h - 12))
    r = 8
    return _Shape(cx, cy, half_w - r, half_h - r, r, r)


@dataclass(frozen=True)
class _Battery:
    data_type: str  # "ct" or "rgb"
    ident: int
    type: str
    form: str
    defective: bool
    shape: _Shape  # where the battery lies in its images (each image moves it a little)
    layout: str  # where its labels keep the outline: "swelling", "top" (-level) or "none"

    def stem(self, number: int) -> str:
        if self.data_type == "ct":
            axis = "xyz"[number % 3]
            return f"CT_{self.type}_{self.form}_{self.ident:03d}_{axis}_{number:03d}"
        return f"RGB_{self.type}_{self.form}_{self.ident:04d}_{number:03d}"


@dataclass
class _Pair:
    battery: _Battery
    stem: str
    ext: str
    image: bytes
    label: dict[str, Any]

    @property
    def image_name(self) -> str:
        return self.stem + self.ext

    @property
    def label_name(self) -> str:
        return self.stem + ".json"

    def label_bytes(self) -> bytes:
        return orjson.dumps(self.label)


def _circle(cx: int, cy: int, r: int, n: int) -> list[int]:
    """Flat [x1, y1, x2, y2, ...] polygon, the point format the real labels use."""
    angles = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    points = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)
    return [int(v) for v in np.rint(points).ravel()]


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if fmt == "JPEG":
        image.save(buf, fmt, quality=85)
    else:
        image.save(buf, fmt, compress_level=3)  # smaller than the default on noise, and faster
    return buf.getvalue()


def _paint_defect(
    rng: np.random.Generator, pixels: np.ndarray, shape: _Shape, colour: tuple[int, ...], n: int
) -> list[int]:
    """Paint a round defect fully inside `shape`; return its n-point polygon.

    The colour fills a disc _PAINT_BEYOND px wider in radius than the circle the polygon's
    points lie on, so it covers the polygon's whole interior, edge pixels included; it then
    fades into the object over _RIM px (JPEG rings far less at a ramp than at a step).
    """
    r = int(rng.integers(6, 11 if shape.hw == 0 else 10))
    painted = r + _PAINT_BEYOND
    inset = painted + _RIM + 2  # the faded edge too stays 2 px inside the silhouette
    if shape.hw == 0:
        span_x, span_y = shape.rx - inset, shape.ry - inset
    else:
        shrink = max(0.0, inset - shape.rx)
        span_x, span_y = shape.hw - shrink, shape.hh - shrink
    while True:  # a point of the box that is in the ellipse (always the first for rectangles)
        dx, dy = (float(v) for v in rng.uniform(-1.0, 1.0, size=2))
        if shape.hw or dx * dx + dy * dy <= 1.0:
            break
    cx, cy = shape.cx + int(dx * span_x), shape.cy + int(dy * span_y)
    h, w = pixels.shape[:2]
    yy, xx = np.ogrid[0:h, 0:w]
    distance = np.sqrt(((xx - cx) ** 2 + (yy - cy) ** 2).astype(np.float32))
    weight = np.clip((painted + _RIM - distance) / _RIM, 0.0, 1.0)  # 1 on the disc, then fading
    ring = weight > 0
    value = np.asarray(colour, np.float32) if pixels.ndim == 3 else np.float32(colour[0])
    share = weight[ring][:, None] if pixels.ndim == 3 else weight[ring]
    pixels[ring] = pixels[ring] * (1 - share) + value * share
    return _circle(cx, cy, r, n)


def _ct_image(
    rng: np.random.Generator, shape: _Shape, defect: str | None
) -> tuple[bytes, list[int] | None]:
    """Bright cell section on a dark, slightly noisy slice; a defect is a brighter blob in it."""
    w, h = CT_SIZE
    pixels = np.where(shape.mask(w, h), np.float32(CT_OBJECT), np.float32(CT_BACKGROUND))
    pixels += rng.standard_normal((h, w), dtype=np.float32) * np.float32(_CT_NOISE)
    points = None
    if defect:
        points = _paint_defect(rng, pixels, shape, DEFECT_COLOURS[defect.lower()], 8)
    return _encode(pixels, "JPEG"), points


def _rgb_image(
    rng: np.random.Generator, shape: _Shape, defect: str | None
) -> tuple[bytes, list[int] | None]:
    """Blue battery on a grey table; damage is a dark patch, pollution a brown one."""
    w, h = RGB_SIZE
    pixels = np.empty((h, w, 3), dtype=np.float32)
    pixels[:] = RGB_BACKGROUND
    pixels[shape.mask(w, h)] = RGB_OBJECT
    points = None
    if defect:
        points = _paint_defect(rng, pixels, shape, DEFECT_COLOURS[defect.lower()], 6)
    tiles = rng.standard_normal((-(-h // _RGB_TILE), -(-w // _RGB_TILE), 1), dtype=np.float32)
    noise = np.repeat(np.repeat(tiles, _RGB_TILE, axis=0), _RGB_TILE, axis=1)[:h, :w]
    pixels += noise * np.float32(_RGB_NOISE)
    return _encode(pixels, "PNG"), points


def _label(
    bat: _Battery,
    file_name: str,
    image_id: int,
    outline: list[int],
    defects: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """A label in the documented AI Hub shape (key order kept as in the real files).

    The outline sits in `swelling.battery_outline` or, as in part of the real set, in a
    top-level `battery_outline.points` right after `swelling`; some batteries have none.
    """
    ct = bat.data_type == "ct"
    w, h = CT_SIZE if ct else RGB_SIZE
    swelling: dict[str, Any] = {"swelling": False}
    if bat.layout == "swelling":
        swelling["battery_outline"] = outline
    top = {"battery_outline": {"points": outline}} if bat.layout == "top" else {}
    return {
        "data_info": {
            "data_type": bat.data_type,
            "battery_ids": bat.ident,
            "application": "EV" if ct else "가전",
            "type": bat.type,
            "form": bat.form,
            "date": "2023.10.18" if ct else "2023.09.05",
            "place": "AEONUS",
            "distance": None if ct else 17,
            "degree": None if ct else [50, 15],
            "roi": [12, 84] if ct else None,
        },
        "swelling": swelling,
        **top,
        "defects": defects,
        "image_info": {
            "width": w,
            "height": h,
            "file_name": file_name,
            "id": image_id,
            "is_normal": defects is None,
        },
    }


@dataclass
class _Builder:
    """Collects zip members and counts, member by member, what each is meant to become."""

    rng: np.random.Generator
    entries: dict[str, list[ZipEntry]] = field(default_factory=lambda: {k: [] for k in _ZIPS})
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    samples: int = 0
    batteries: dict[str, set[int]] = field(default_factory=lambda: {"ct": set(), "rgb": set()})
    rejects: Counter[str] = field(default_factory=Counter)
    identical_duplicates: int = 0
    ignored: int = 0
    no_outline: int = 0
    odd_point_lists: int = 0
    not_normal_without_defects: int = 0
    next_id: int = 128001

    def make(
        self,
        bat: _Battery,
        number: int,
        defect: str | None = None,
        *,
        stem: str | None = None,
        ext: str | None = None,
    ) -> _Pair:
        """Render an image and its label; nothing is placed in a zip yet."""
        dx, dy = (int(v) for v in self.rng.integers(-3, 4, size=2))
        shape = bat.shape.moved(dx, dy)
        if bat.data_type == "ct":
            image, points = _ct_image(self.rng, shape, defect)
            outline = shape.outline(4)
            ext = ext or ".jpg"
        else:
            image, points = _rgb_image(self.rng, shape, defect)
            outline = shape.outline(3)
            ext = ext or ".png"
        stem = stem or bat.stem(number)
        defects = None if points is None else [{"id": 1, "name": defect, "points": points}]
        label = _label(bat, stem + ext, self.next_id, outline, defects)
        self.next_id += 1
        return _Pair(bat, stem, ext, image, label)

    def member(self, zip_key: str, base: str) -> str:
        return _ZIPS[zip_key].prefix + base

    def _put(self, zip_key: str, base: str, data: bytes) -> str:
        spec = _ZIPS[zip_key]
        name = spec.prefix + base
        self.entries[zip_key].append(ZipEntry(name, data, spec.method, spec.name_encoding))
        return name

    def add_sample(
        self, pair: _Pair, image_zip: str, label_zip: str, label_data: bytes | None = None
    ) -> None:
        self._put(image_zip, pair.image_name, pair.image)
        self._put(label_zip, pair.label_name, label_data or pair.label_bytes())
        self.samples += 1
        self.batteries[pair.battery.data_type].add(pair.battery.ident)
        outlines = _outlines(pair.label)
        if not any(len(p) >= 6 and len(p) % 2 == 0 for p in outlines):
            self.no_outline += 1
        defects = pair.label["defects"] or []
        point_lists = outlines + [d["points"] for d in defects]
        self.odd_point_lists += sum(len(p) % 2 for p in point_lists)

    def add_identical_copy(self, zip_key: str, base: str, data: bytes) -> None:
        self._put(zip_key, base, data)
        self.identical_duplicates += 1

    def add_reject(self, reason: Reason, *members: tuple[str, str, bytes]) -> None:
        """Place members that must each yield one reject row with `reason`."""
        for zip_key, base, data in members:
            self._put(zip_key, base, data)
        self.rejects[str(reason)] += len(members)

    def add_junk(self, zip_key: str, name: str, data: bytes = b"") -> None:
        """Place a member under its full `name` (no prefix added) that must be ignored."""
        spec = _ZIPS[zip_key]
        method = ZIP_STORED if name.endswith("/") else spec.method  # archivers store dirs
        self.entries[zip_key].append(ZipEntry(name, data, method, spec.name_encoding))
        self.ignored += 1

    def result(self, root: Path) -> SynthResult:
        return SynthResult(
            root=root,
            samples=self.samples,
            batteries={k: len(v) for k, v in self.batteries.items()},
            rejects=dict(sorted(self.rejects.items())),
            identical_duplicates=self.identical_duplicates,
            ignored=self.ignored,
            no_outline=self.no_outline,
            odd_point_lists=self.odd_point_lists,
            not_normal_without_defects=self.not_normal_without_defects,
        )


def _outlines(label: dict[str, Any]) -> list[list[int]]:
    """The outline point lists a label carries, in either layout (none, one, or both)."""
    found = [
        label["swelling"].get("battery_outline"),
        label.get("battery_outline", {}).get("points"),
    ]
    return [p for p in found if p is not None]


def _set_outline(label: dict[str, Any], points: list[int]) -> None:
    """Replace the outline in whichever layout the label uses."""
    if "battery_outline" in label:
        label["battery_outline"]["points"] = points
    else:
        label["swelling"]["battery_outline"] = points


def _batteries(data_type: str, count: int, rng: np.random.Generator) -> list[_Battery]:
    """Every third battery has defects, so a stratified split finds both strata.

    Every fourth keeps its outline in the top-level layout; one in eight (index 5, 13, ...)
    has no outline at all.
    """
    first = 101 if data_type == "ct" else 1
    shape = _ct_shape if data_type == "ct" else _rgb_shape
    return [
        _Battery(
            data_type,
            first + i,
            ("cell", "module")[i % 2],
            ("pouch", "cylindrical")[i // 2 % 2],
            i % 3 == 1,
            shape(rng),
            "none" if i % 8 == 5 else "top" if i % 4 == 3 else "swelling",
        )
        for i in range(count)
    ]


def _spoil_points(pair: _Pair, i: int, j: int) -> None:
    """Point lists no crop can use (the sample itself is valid and kept all the same).

    Battery index 1 (mod 8): its second image's outline has two points, its first image's
    defect polygon an odd count of numbers; battery index 4: its second image's outline too.
    """
    if i % 8 == 1 and j == 1:
        _set_outline(pair.label, [10, 10, 20, 20])
    elif i % 8 == 1 and j == 0 and pair.label["defects"]:
        pair.label["defects"][0]["points"] = pair.label["defects"][0]["points"][:7]
    elif i % 8 == 4 and j == 1:
        (outline,) = _outlines(pair.label)
        _set_outline(pair.label, outline[:-1])


def _add_regular(b: _Builder, batteries: list[_Battery], per_battery: int) -> None:
    """Clean pairs, placed like AI Hub did: Validation shares batteries with Training."""
    n = len(batteries)
    kind = "CT" if batteries[0].data_type == "ct" else "RGB"
    for i, bat in enumerate(batteries):
        # Resin overflows only where there is resin: in modules, not in cells.
        names = ("porosity",) if (bat.data_type, bat.type) == ("ct", "cell") else \
            _DEFECT_NAMES[bat.data_type]
        for j in range(per_battery):
            defect = names[j // 2 % len(names)] if bat.defective and j % 2 == 0 else None
            pair = b.make(bat, j + 1, defect)
            _spoil_points(pair, i, j)
            if i == n - 1 or (i % 2 == 0 and j == per_battery - 1):
                b.add_sample(pair, f"VS_{kind}", f"VL_{kind}")
            elif kind == "RGB":
                b.add_sample(pair, "TS_RGB", "TL_RGB")
            else:
                # The middle battery straddles both Training CT zips.
                first_zip = i < n // 2 or (i == n // 2 and j % 2 == 0)
                b.add_sample(pair, "TS_CT_1" if first_zip else "TS_CT_2", "TL_CT")


def _add_quirks(b: _Builder, ct: list[_Battery], rgb: list[_Battery]) -> None:
    """Odd but valid pairs: each must still become exactly one sample."""
    b.add_sample(b.make(ct[2], 901, ext=".jpeg"), "TS_CT_2", "TL_CT")
    b.add_sample(b.make(rgb[2], 901, ext=".PNG"), "VS_RGB", "VL_RGB")

    mismatch = b.make(ct[3], 902)
    mismatch.label["image_info"]["file_name"] = mismatch.stem + ".JPG "
    b.add_sample(mismatch, "TS_CT_1", "TL_CT")

    # Korean stem: UTF-8-flagged image name, CP949 label name.
    korean = b.make(rgb[2], 1, stem=f"RGB_배터리_{rgb[2].ident:04d}_001")
    b.add_sample(korean, "TS_RGB", "TL_RGB")

    bom = b.make(ct[0], 903)
    b.add_sample(bom, "VS_CT", "VL_CT", label_data=b"\xef\xbb\xbf" + bom.label_bytes())

    swelling = b.make(rgb[1], 902)
    swelling.label["swelling"]["swelling"] = True
    swelling.label["image_info"]["is_normal"] = False
    b.add_sample(swelling, "TS_RGB", "TL_RGB")

    b.add_sample(b.make(rgb[4], 903, "damaged"), "VS_RGB", "VL_RGB")

    # Not normal, yet no defect and no swelling: what -P normal_without_defects counts as normal.
    unexplained = b.make(ct[4], 905)
    unexplained.label["image_info"]["is_normal"] = False
    b.add_sample(unexplained, "TS_CT_1", "TL_CT")
    b.not_normal_without_defects += 1

    # Same bytes in Training and Validation, image and label alike: kept once.
    twin = b.make(ct[6], 904)
    b.add_sample(twin, "TS_CT_2", "TL_CT")
    b.add_identical_copy("VS_CT", twin.image_name, twin.image)
    b.add_identical_copy("VL_CT", twin.label_name, twin.label_bytes())


def _add_rejects(b: _Builder, ct: list[_Battery], rgb: list[_Battery]) -> None:
    """Broken pairs; every member involved is one reject row."""
    orphan = b.make(ct[1], 910)
    b.add_reject(Reason.ORPHAN_IMAGE, ("TS_CT_1", orphan.image_name, orphan.image))

    orphan = b.make(rgb[1], 910)
    b.add_reject(Reason.ORPHAN_LABEL, ("TL_RGB", orphan.label_name, orphan.label_bytes()))

    not_json = b.make(ct[2], 911)
    b.add_reject(
        Reason.BAD_LABEL,
        ("TS_CT_1", not_json.image_name, not_json.image),
        ("TL_CT", not_json.label_name, not_json.label_bytes()[:60]),
    )

    incomplete = b.make(rgb[3], 911)
    del incomplete.label["image_info"]["is_normal"]
    b.add_reject(
        Reason.BAD_LABEL,
        ("TS_RGB", incomplete.image_name, incomplete.image),
        ("TL_RGB", incomplete.label_name, incomplete.label_bytes()),
    )

    truncated = b.make(ct[3], 912)
    b.add_reject(
        Reason.BAD_IMAGE,
        ("TS_CT_2", truncated.image_name, truncated.image[: len(truncated.image) // 2]),
        ("TL_CT", truncated.label_name, truncated.label_bytes()),
    )

    html = b.make(rgb[4], 912)
    b.add_reject(
        Reason.BAD_IMAGE,
        ("VS_RGB", html.image_name, _HTML_ERROR),
        ("VL_RGB", html.label_name, html.label_bytes()),
    )

    damaged = b.make(rgb[5], 913)
    b.add_reject(
        Reason.BAD_CRC,
        ("TS_RGB", damaged.image_name, damaged.image),
        ("TL_RGB", damaged.label_name, damaged.label_bytes()),
    )
    b.corrupt.append(("TS_RGB", b.member("TS_RGB", damaged.image_name)))

    # Same stem, different bytes: no way to tell which copy the label describes.
    first, second = b.make(ct[5], 914), b.make(ct[5], 914)
    b.add_reject(
        Reason.DUPLICATE,
        ("TS_CT_1", first.image_name, first.image),
        ("TS_CT_2", second.image_name, second.image),
        ("TL_CT", first.label_name, first.label_bytes()),
    )


def _add_junk(b: _Builder) -> None:
    """Directory entries and OS droppings; one AppleDouble shadows a real image's name."""
    b.add_junk("TS_CT_1", "원천데이터/")
    b.add_junk("TS_CT_1", "원천데이터/CT/")
    b.add_junk("TL_CT", "TL_CT_Datasets_label/")
    b.add_junk("TL_CT", b.member("TL_CT", ".DS_Store"), _DS_STORE)
    shadowed = b.entries["TS_CT_2"][0].name
    folder, base = posixpath.split(shadowed)
    b.add_junk("TS_CT_2", posixpath.join("__MACOSX", folder, "._" + base), _APPLEDOUBLE)
    b.add_junk("TS_CT_2", posixpath.join(folder, "._" + base), _APPLEDOUBLE)
    b.add_junk("TS_RGB", b.member("TS_RGB", "Thumbs.db"), _THUMBS_DB)
    b.add_junk("VL_RGB", b.member("VL_RGB", "desktop.ini"), _DESKTOP_INI)


def synthesize(dest: Path, *, seed: int = 0, scale: int = 1) -> SynthResult:
    """Write the sample tree under `dest`; the same seed and scale give byte-identical zips.

    `scale` multiplies both the number of batteries (8 per modality) and the images per
    battery (6 CT slices, 5 RGB photos), so growth is quadratic.
    """
    if not 1 <= scale <= 100:  # keeps ids and slice numbers inside their 3-digit fields
        raise ValueError(f"scale must be in 1..100, got {scale}")
    b = _Builder(np.random.default_rng(seed))
    ct, rgb = _batteries("ct", 8 * scale, b.rng), _batteries("rgb", 8 * scale, b.rng)
    _add_regular(b, ct, 6 * scale)
    _add_regular(b, rgb, 5 * scale)
    _add_quirks(b, ct, rgb)
    _add_rejects(b, ct, rgb)
    _add_junk(b)

    root = Path(dest) / ROOT_NAME
    data_dir = root / DATA_DIR
    for key, spec in _ZIPS.items():
        path = data_dir / spec.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        write_zip(path, b.entries[key], stream=spec.stream)
    for key, member in b.corrupt:
        flip_byte(data_dir / _ZIPS[key].relpath, member)
    return b.result(root)
