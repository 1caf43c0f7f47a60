"""Which image library is fastest for `shardify convert --crop outline --resize N`?

Standalone: `python benchmarks/image_libraries.py [--runs 25]` prints one table. It generates a
synthetic CT slice (4000x4000 grayscale JPEG q90) and an RGB photo (1920x1080 PNG) in memory
(fixed seed), then for each library times decode-from-bytes -> crop -> LANCZOS resize (longer
side 512) -> encode-to-bytes. Every (library, case) runs in a fresh spawned process: peak RSS
growth over one conversion (VmHWM reset via /proc/self/clear_refs), then the median wall time of
`--runs` conversions, single-threaded unless the name says otherwise. A library that fails to
import is reported and skipped. `det` = the same input encoded twice gives identical bytes; `mad`
= mean abs pixel difference of the decoded output against Pillow's for the same case.
`rgb png N` = PNG compression level N; `+f` = pyvips with filter=ALL (its default is NONE);
`rle` = Pillow with compress_type=zlib.Z_RLE.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

CT_BOX = (1680, 1530, 2320, 2470)  # 640x940 around the battery
RGB_BOX = (500, 200, 1400, 900)  # 900x700
SIDE = 512


def make_images() -> tuple[bytes, bytes]:
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:4000, 0:4000].astype(np.float32)
    ct = 25 + 6 * np.sin(xx / 300) * np.cos(yy / 410)  # dark, slightly uneven background
    dx = np.maximum(np.abs(xx - 2000) - 300 + 60, 0)  # rounded rectangle 600x900, radius 60
    dy = np.maximum(np.abs(yy - 2000) - 450 + 60, 0)
    inside = np.hypot(dx, dy) <= 60
    texture = 150 + 25 * np.sin(yy / 7) + 15 * np.cos(np.hypot(xx - 2000, yy - 2000) / 11)
    ct[inside] = texture[inside] + rng.normal(0, 12, int(inside.sum()))
    ct += rng.normal(0, 3, ct.shape).astype(np.float32)  # sensor noise
    buf = io.BytesIO()
    Image.fromarray(np.clip(ct, 0, 255).astype(np.uint8), "L").save(buf, "JPEG", quality=90)
    ct_bytes = buf.getvalue()
    yy, xx = np.mgrid[0:1080, 0:1920].astype(np.float32)
    rgb = np.stack([90 + 60 * np.sin(xx / 170 + c) * np.cos(yy / 130 - c) for c in range(3)], -1)
    for _ in range(40):  # some blobs, like objects in a photo
        cx, cy, r = rng.uniform(0, 1920), rng.uniform(0, 1080), rng.uniform(20, 160)
        rgb[np.hypot(xx - cx, yy - cy) < r] = rng.uniform(0, 255, 3)
    rgb += rng.normal(0, 4, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(buf, "PNG")
    return ct_bytes, buf.getvalue()


def fit(w: int, h: int) -> tuple[int, int]:
    s = SIDE / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def box_size(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return box[2] - box[0], box[3] - box[1]


def pillow_cases() -> dict:
    def save(im: Image.Image, fmt: str, **kw) -> bytes:
        out = io.BytesIO()
        im.save(out, fmt, **kw)
        return out.getvalue()

    def ct_crop(data: bytes) -> bytes:
        im = Image.open(io.BytesIO(data))
        im = im.crop(CT_BOX).resize(fit(*box_size(CT_BOX)), Image.Resampling.LANCZOS)
        return save(im, "JPEG", quality=95)

    def ct_resize(data: bytes) -> bytes:
        im = Image.open(io.BytesIO(data))
        im.draft("L", fit(*im.size))  # DCT-domain downscale: 4000 -> 1000
        return save(im.resize(fit(*im.size), Image.Resampling.LANCZOS), "JPEG", quality=95)

    def rgb(level: int, strategy: int = -1):  # 6 is Pillow's default; 3 = zlib.Z_RLE
        def run(data: bytes) -> bytes:
            im = Image.open(io.BytesIO(data))
            im = im.crop(RGB_BOX).resize(fit(*box_size(RGB_BOX)), Image.Resampling.LANCZOS)
            return save(im, "PNG", compress_level=level, compress_type=strategy)

        return run

    rgbs = {f"rgb png {k}": rgb(k) for k in (6, 1, 3)} | {"rgb png 6 rle": rgb(6, 3)}
    return {"ct crop": ct_crop, "ct resize": ct_resize} | rgbs


def pyvips_cases() -> dict:
    import pyvips

    pyvips.cache_set_max(0)  # no operation cache: every run really decodes

    def shrink(im, box):
        x0, y0, x1, y1 = box
        w, h = fit(x1 - x0, y1 - y0)
        im = im.crop(x0, y0, x1 - x0, y1 - y0)
        return im.resize(w / im.width, vscale=h / im.height, kernel="lanczos3")

    def ct_crop(data: bytes) -> bytes:
        im = pyvips.Image.new_from_buffer(data, "", access="sequential")
        return shrink(im, CT_BOX).jpegsave_buffer(Q=95)

    def ct_resize(data: bytes) -> bytes:  # shrink-on-load (picks 1/2 here), then lanczos3
        return pyvips.Image.thumbnail_buffer(data, SIDE, height=SIDE).jpegsave_buffer(Q=95)

    def ct_resize_s4(data: bytes) -> bytes:  # the same 1/4 DCT shrink Pillow's draft picks
        im = pyvips.Image.jpegload_buffer(data, shrink=4, access="sequential")
        return im.resize(SIDE / im.width, kernel="lanczos3").jpegsave_buffer(Q=95)

    def rgb(level: int, filt: int):  # vips default: compression 6, filter NONE (0x08)
        def run(data: bytes) -> bytes:
            im = pyvips.Image.new_from_buffer(data, "", access="sequential")
            return shrink(im, RGB_BOX).pngsave_buffer(compression=level, filter=filt)

        return run

    cases = {"ct crop": ct_crop, "ct resize": ct_resize, "ct resize s4": ct_resize_s4}
    for k in (6, 1, 3):  # "+f": filter=ALL (adaptive per-row filter, like Pillow's default)
        cases |= {f"rgb png {k}": rgb(k, 0x08), f"rgb png {k}+f": rgb(k, 0xF8)}
    return cases


def simplejpeg_cases() -> dict:
    import simplejpeg

    def resize(a: np.ndarray) -> np.ndarray:  # simplejpeg has no resize: Pillow's LANCZOS
        im = Image.fromarray(a[:, :, 0], "L")
        return np.asarray(im.resize(fit(*im.size), Image.Resampling.LANCZOS))[:, :, None]

    def ct_crop(data: bytes) -> bytes:
        x0, y0, x1, y1 = CT_BOX
        a = simplejpeg.decode_jpeg(data, colorspace="GRAY")[y0:y1, x0:x1]
        return simplejpeg.encode_jpeg(resize(a), quality=95, colorspace="GRAY")

    def ct_resize(data: bytes) -> bytes:  # libjpeg-turbo scaled decode: 4000 -> 1000
        a = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=SIDE, min_width=SIDE)
        return simplejpeg.encode_jpeg(resize(a), quality=95, colorspace="GRAY")

    return {"ct crop": ct_crop, "ct resize": ct_resize}


LIBS = {"Pillow": pillow_cases, "pyvips": pyvips_cases, "pyvips-2t": pyvips_cases}
LIBS["simplejpeg"] = simplejpeg_cases
VERSIONS = {  # module, how to get its version
    "PIL": lambda m: m.__version__,
    "pyvips": lambda m: f"{m.__version__}, libvips {m.version(0)}.{m.version(1)}.{m.version(2)}",
    "simplejpeg": lambda m: m.__version__,
}


def worker(lib: str, case: str, data: bytes, runs: int) -> dict:
    os.environ["VIPS_CONCURRENCY"] = "2" if lib.endswith("-2t") else "1"  # read at pyvips import
    fn = LIBS[lib]()[case]
    proc = Path("/proc/self")
    (proc / "clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
    rss = int((proc / "status").read_text().split("VmRSS:")[1].split()[0])
    out = fn(data)
    hwm = int((proc / "status").read_text().split("VmHWM:")[1].split()[0])
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - t)
    ms = 1000 * statistics.median(times)
    return {"ms": ms, "out": out, "det": fn(data) == out, "mem": (hwm - rss) / 1024}


def mad(a: bytes, b: bytes) -> str:
    x, y = (np.asarray(Image.open(io.BytesIO(v)), dtype=np.int16) for v in (a, b))
    return f"{np.abs(x - y).mean():.2f}" if x.shape == y.shape else f"{y.shape[:2]}!"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=25)
    runs = ap.parse_args().runs
    ct, rgb = make_images()
    print(f"inputs: CT 4000x4000 L JPEG {len(ct) / 1e6:.2f} MB, "
          f"RGB 1920x1080 PNG {len(rgb) / 1e6:.2f} MB; median of {runs} runs")
    rows, ref = [], {}
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:  # fresh process per row
        for lib, cases in LIBS.items():
            try:
                names = list(cases())
            except Exception as exc:  # import failure: report and go on
                print(f"{lib}: unavailable ({exc!r})")
                continue
            for case in names:
                r = pool.apply(worker, (lib, case, ct if case.startswith("ct") else rgb, runs))
                key = " ".join(case.split()[:2])  # "ct crop", "ct resize", "rgb png"
                ref.setdefault(key, r["out"])  # Pillow's output: the pixels to compare to
                w, h = Image.open(io.BytesIO(r["out"])).size
                rows.append((case, lib, r["ms"], len(r["out"]), f"{w}x{h}", r["mem"],
                             "yes" if r["det"] else "NO", mad(ref[key], r["out"])))
    print(f"{'case':<14} {'library':<11} {'ms/img':>7} {'out bytes':>10} {'size':>8} "
          f"{'peak MB':>7} {'det':>4} {'mad':>5}")
    for case, lib, ms, n, size, mem, det, diff in sorted(rows, key=lambda r: r[0]):
        print(f"{case:<14} {lib:<11} {ms:7.1f} {n:10d} {size:>8} {mem:7.1f} {det:>4} {diff:>5}")
    for name, version in VERSIONS.items():
        try:
            print(f"{name} {version(__import__(name))}")
        except ImportError as exc:
            print(f"{name}: not importable ({exc})")


if __name__ == "__main__":
    main()
