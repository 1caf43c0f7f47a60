"""The users' way of making training images, as their scripts do it after unzipping.

zipfile -> PIL full decode -> convert("RGB") -> (crop to the outline's box) -> LANCZOS resize so
the longer side is N -> JPEG q95 (PNG for PNG sources), in a multiprocessing.Pool of the given
size; files written to OUT_DIR as their scripts do. Reading the zips stands in for their unzip.
usage: python transform_baseline.py SOURCE_DIR OUT_DIR WORKERS N [--crop]
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

MARGIN = 16


def pairs(source: Path) -> list[tuple[str, str, str, str]]:
    """(image zip, image member, label zip, label member) for every stem found in both."""
    images, labels = {}, {}
    for path in sorted(source.rglob("*.zip")):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                stem, _, ext = name.rpartition("/")[2].rpartition(".")
                target = labels if ext == "json" else images
                target[stem] = (str(path), name)
    return [(*images[stem], *labels[stem]) for stem in sorted(images.keys() & labels.keys())]


def work(task: tuple[list, str, int, bool]) -> int:
    todo, out, longest, crop = task
    archives: dict[str, zipfile.ZipFile] = {}
    for image_zip, image_name, label_zip, label_name in todo:
        image_archive = archives.setdefault(image_zip, zipfile.ZipFile(image_zip))
        label_archive = archives.setdefault(label_zip, zipfile.ZipFile(label_zip))
        label = json.loads(label_archive.read(label_name))
        image = Image.open(io.BytesIO(image_archive.read(image_name))).convert("RGB")
        if crop:
            points = label["swelling"]["battery_outline"]
            xs, ys = points[0::2], points[1::2]
            image = image.crop((max(0, min(xs) - MARGIN), max(0, min(ys) - MARGIN),
                                min(image.width, max(xs) + MARGIN),
                                min(image.height, max(ys) + MARGIN)))
        scale = min(1.0, longest / max(image.size))
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.LANCZOS)
        stem = image_name.rpartition("/")[2].rpartition(".")[0]
        if image_name.endswith(".png"):
            image.save(f"{out}/{stem}.png")
        else:
            image.save(f"{out}/{stem}.jpg", quality=95)
    return len(todo)


def main(source: Path, out: Path, workers: int, longest: int, crop: bool) -> None:
    todo = pairs(source)
    out.mkdir(parents=True, exist_ok=True)
    with Pool(workers) as pool:
        done = sum(pool.map(work, [(todo[i::workers], str(out), longest, crop)
                                   for i in range(workers)]))
    assert done == len(todo)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
         "--crop" in sys.argv[5:])
