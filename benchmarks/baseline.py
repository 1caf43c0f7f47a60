"""What a user writes first: zipfile -> pair by stem -> webdataset.ShardWriter, one process.

usage: python baseline.py SOURCE_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import webdataset as wds


def main(source: Path, out: Path) -> None:
    images, labels = {}, {}
    archives = {path: zipfile.ZipFile(path) for path in sorted(source.rglob("*.zip"))}
    for path, archive in archives.items():
        for info in archive.infolist():
            stem, _, ext = info.filename.rpartition("/")[2].rpartition(".")
            if ext.lower() in ("jpg", "jpeg", "png"):
                images[stem] = (path, info, "png" if ext.lower() == "png" else "jpg")
            elif ext.lower() == "json":
                labels[stem] = (path, info)
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=2**30, verbose=0) as sink:
        for stem in sorted(images.keys() & labels.keys()):
            image_path, image_info, ext = images[stem]
            label_path, label_info = labels[stem]
            label_bytes = archives[label_path].read(label_info)
            is_normal = json.loads(label_bytes)["image_info"]["is_normal"]
            sink.write({"__key__": stem, ext: archives[image_path].read(image_info),
                        "json": label_bytes, "cls": b"0" if is_normal else b"1"})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
