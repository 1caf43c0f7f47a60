"""The transform's floor: decode + crop + resample + encode of every image, nothing else.

shardify's own per-image transform (the chosen library, Pillow), on member bytes read with
zipfile, by the same number of processes, with an even split of the images: no pairing checks,
no planning, no shards, no manifest.
usage: python transform_floor.py SOURCE_DIR WORKERS N [--crop]
"""

from __future__ import annotations

import sys
import zipfile
from multiprocessing import Pool
from pathlib import Path

from transform_baseline import pairs

from shardify.profiles.battery import GEOMETRY
from shardify.transform.options import TransformOptions
from shardify.transform.sample import transform_sample


def work(task: tuple[list, TransformOptions]) -> int:
    todo, options = task
    archives: dict[str, zipfile.ZipFile] = {}
    written = 0
    for image_zip, image_name, label_zip, label_name in todo:
        image = archives.setdefault(image_zip, zipfile.ZipFile(image_zip)).read(image_name)
        label = archives.setdefault(label_zip, zipfile.ZipFile(label_zip)).read(label_name)
        ext = "png" if image_name.endswith(".png") else "jpg"
        written += len(transform_sample(image, label, ext, options, GEOMETRY).image)
    return written


def main(source: Path, workers: int, longest: int, crop: bool) -> None:
    todo = pairs(source)
    options = TransformOptions(crop="outline" if crop else None, resize=longest)
    with Pool(workers) as pool:
        assert sum(pool.map(work, [(todo[i::workers], options) for i in range(workers)])) > 0


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), "--crop" in sys.argv[4:])
