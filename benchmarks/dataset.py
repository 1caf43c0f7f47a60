"""Benchmark inputs, generated once and cached: AI-Hub-shaped zips with real JPEG/PNG payloads.

- `big`: two halves of about 1 GB each (CT JPEGs in deflated zips, RGB PNGs in stored zips, labels
  in their own deflated zips), so memory can be compared at 1 GB and 2 GB of input.
- `shaped`: full-size images whose labels outline the battery, as the real ones do (a CT battery
  covers a few percent of its 4000x4000 slice; an RGB cell a quarter of its 1920x1080 photo):
  the input of the transform benchmark (`--crop outline --resize 512`).
- `tiny`: ~400k image/label pairs (800k members) with tiny payloads, the real dataset's member
  count, where per-sample overhead and the in-memory index dominate. Each zip holds 200k members.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
from PIL import Image

CT_SIZE = 1536
RGB_SIZE = (1280, 720)
POOL = 24
CT_PER_BATTERY = 60
RGB_PER_BATTERY = 30
TINY_PAIRS = 400_000
TINY_PER_ZIP = 200_000
TINY_PER_BATTERY = 500


def label(data_type: str, battery: int, stem: str, defect: bool, rng: np.random.Generator) -> bytes:
    """A label shaped like the real ones, with a battery outline polygon of realistic length."""
    outline = rng.integers(0, 4000, 200).tolist()
    return orjson.dumps({
        "data_info": {"data_type": data_type, "battery_ids": battery, "application": "EV",
                      "type": "cell", "form": "pouch", "date": "2023.10.18", "place": "AEONUS",
                      "distance": None, "degree": None, "roi": [1152, 4000]},
        "swelling": {"swelling": False, "battery_outline": outline},
        "defects": [{"id": 1, "name": "porosity", "points": outline[:40]}] if defect else None,
        "image_info": {"width": 4000, "height": 4000, "file_name": f"{stem}.jpg", "id": 1,
                       "is_normal": not defect},
    })


def _ct_pool(rng: np.random.Generator) -> list[bytes]:
    images = []
    yy, xx = np.mgrid[:CT_SIZE, :CT_SIZE]
    disc = ((yy - CT_SIZE / 2) ** 2 + (xx - CT_SIZE / 2) ** 2 < (CT_SIZE * 0.4) ** 2) * 120.0
    for _ in range(POOL):
        noise = rng.normal(60, 25, (CT_SIZE, CT_SIZE))
        pixels = np.clip(disc + noise, 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
        images.append(out.getvalue())
    return images


def _rgb_pool(rng: np.random.Generator) -> list[bytes]:
    images = []
    width, height = RGB_SIZE
    for _ in range(POOL):
        base = np.linspace(40, 200, width, dtype=np.float32)[None, :, None]
        pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG", compress_level=1)
        images.append(out.getvalue())
    return images


def make_big(root: Path, halves: int = 2, ct_batteries: int = 7, rgb_batteries: int = 12) -> None:
    """Write `halves` folders of about 1 GB each (skipped when already there)."""
    rng = np.random.default_rng(0)
    ct_pool, rgb_pool = _ct_pool(rng), _rgb_pool(rng)
    for half in range(halves):
        folder = root / f"half{half + 1}"
        if (folder / "done").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        ct_ids = range(100 * (half + 1), 100 * (half + 1) + ct_batteries)
        rgb_ids = range(1000 * (half + 1), 1000 * (half + 1) + rgb_batteries)
        _write_kind(folder, "CT", zipfile.ZIP_DEFLATED, ct_ids, CT_PER_BATTERY, ct_pool,
                    lambda b, n: f"CT_cell_pouch_{b:03d}_x_{n:03d}.jpg", 3, rng)
        _write_kind(folder, "RGB", zipfile.ZIP_STORED, rgb_ids, RGB_PER_BATTERY, rgb_pool,
                    lambda b, n: f"RGB_cell_pouch_{b:04d}_{n:03d}.png", 4, rng)
        (folder / "done").touch()


def _write_kind(folder: Path, kind: str, method: int, batteries: range, per_battery: int,
                pool: list[bytes], file_name: Callable[[int, int], str], defect_every: int,
                rng: np.random.Generator) -> None:
    """One image zip (`method`) and its label zip; every `defect_every`-th battery has defects."""
    with zipfile.ZipFile(folder / f"TS_{kind}_images.zip", "w", method) as images, \
            zipfile.ZipFile(folder / f"TL_{kind}_label.zip", "w", zipfile.ZIP_DEFLATED) as labels:
        for battery in batteries:
            for n in range(per_battery):
                name = file_name(battery, n)
                stem = name.rsplit(".", 1)[0]
                images.writestr(f"{kind}/{name}", pool[(battery + n) % POOL])
                defect = battery % defect_every == 0 and n % (defect_every + 1) == 0
                labels.writestr(f"{kind}/{stem}.json",
                                label(kind.lower(), battery, stem, defect, rng))


def make_tiny(root: Path) -> None:
    """~400k pairs with tiny real JPEGs, in zips of 200k members (skipped when already there)."""
    if (root / "done").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(out, "JPEG")
    jpeg = out.getvalue()
    for part in range(TINY_PAIRS // TINY_PER_ZIP):
        with zipfile.ZipFile(root / f"TS_CT_images_{part + 1}.zip", "w") as images, \
                zipfile.ZipFile(root / f"TL_CT_label_{part + 1}.zip", "w",
                                zipfile.ZIP_DEFLATED) as labels:
            for index in range(part * TINY_PER_ZIP, (part + 1) * TINY_PER_ZIP):
                battery, n = divmod(index, TINY_PER_BATTERY)
                stem = f"CT_cell_pouch_{battery:03d}_x_{n:03d}"
                images.writestr(f"CT/{stem}.jpg", jpeg)
                labels.writestr(f"CT/{stem}.json", orjson.dumps({
                    "data_info": {"data_type": "ct", "battery_ids": battery, "type": "cell",
                                  "form": "pouch"},
                    "swelling": {"swelling": False}, "defects": None,
                    "image_info": {"width": 8, "height": 8, "file_name": f"{stem}.jpg",
                                   "is_normal": n % 7 != 0},
                }))
    (root / "done").touch()


SHAPED_CT, SHAPED_RGB = 4000, (1920, 1080)
SHAPED_POOL = 8
SHAPED_BATTERIES = 6  # per data type
SHAPED_PER_BATTERY = 16


def _ellipse(cx: float, cy: float, rx: float, ry: float, points: int = 100) -> list[int]:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return [int(v) for xy in zip(cx + rx * np.cos(angles), cy + ry * np.sin(angles), strict=True)
            for v in xy]


def _shaped_ct(rng: np.random.Generator) -> tuple[bytes, list[int]]:
    """A 4000x4000 grey slice: a textured battery (~4 % of the area) on a noisy background."""
    cx, cy = rng.integers(1200, 2800, 2)
    rx, ry = rng.integers(300, 380), rng.integers(420, 520)
    pixels = rng.normal(30, 6, (SHAPED_CT, SHAPED_CT)).astype(np.float32)
    yy, xx = np.ogrid[:SHAPED_CT, :SHAPED_CT]
    inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    layers = 150 + 40 * np.sin(yy / 9.0)  # the cell's layers
    pixels = np.where(inside, layers + rng.normal(0, 6, pixels.shape), pixels)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue(), _ellipse(cx, cy, rx + 2, ry + 2)


def _shaped_rgb(rng: np.random.Generator) -> tuple[bytes, list[int]]:
    """A 1920x1080 photo: a blue cell (~20 % of the area) on a grey table, with sensor noise."""
    width, height = SHAPED_RGB
    x0, y0 = int(rng.integers(300, 700)), int(rng.integers(150, 300))
    pixels = np.empty((height, width, 3), np.float32)
    pixels[:] = np.linspace(150, 210, width, dtype=np.float32)[None, :, None]
    pixels[y0:y0 + 520, x0:x0 + 800] = (60, 90, 150)
    pixels += rng.normal(0, 4, pixels.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "PNG", compress_level=6)
    return out.getvalue(), [x0 - 2, y0 - 2, x0 + 802, y0 - 2, x0 + 802, y0 + 522, x0 - 2, y0 + 522]


def make_shaped(root: Path) -> None:
    """CT and RGB zips (and their label zips) of full-size outlined images (once)."""
    if (root / "done").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for kind, make, ext, size in (("CT", _shaped_ct, "jpg", (SHAPED_CT, SHAPED_CT)),
                                  ("RGB", _shaped_rgb, "png", SHAPED_RGB)):
        pool = [make(rng) for _ in range(SHAPED_POOL)]
        method = zipfile.ZIP_DEFLATED if kind == "CT" else zipfile.ZIP_STORED
        with zipfile.ZipFile(root / f"TS_{kind}_images.zip", "w", method) as images, \
                zipfile.ZipFile(root / f"TL_{kind}_label.zip", "w", zipfile.ZIP_DEFLATED) as labels:
            for battery in range(1, SHAPED_BATTERIES + 1):
                for n in range(SHAPED_PER_BATTERY):
                    stem = f"{kind}_cell_pouch_{battery:04d}_{n:03d}"
                    data, outline = pool[(battery * 3 + n) % SHAPED_POOL]
                    images.writestr(f"{kind}/{stem}.{ext}", data)
                    labels.writestr(f"{kind}/{stem}.json", orjson.dumps({
                        "data_info": {"data_type": kind.lower(), "battery_ids": battery,
                                      "type": "cell", "form": "pouch",
                                      "roi": [1152, 4000] if kind == "CT" else None},
                        "swelling": {"swelling": False, "battery_outline": outline},
                        "defects": None,
                        "image_info": {"width": size[0], "height": size[1],
                                       "file_name": f"{stem}.{ext}", "is_normal": True},
                    }))
    (root / "done").touch()
