"""Sample data for the one-JSON-per-image profiles: an AI-Hub-shaped download of their pairs.

A profile's generator makes the pairs (image bytes, label JSON, the group and class it must
get); `write_download` lays them out as AI Hub ships such sets (Training and Validation,
images and labels in separate zips, Korean folder names, CP949 member names in some zips,
groups spread over both) and plants the inputs a conversion must reject or skip, counting
each so tests can check a conversion exactly.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..rejects import Reason
from ..synth import ZIP_DEFLATED, ZIP_STORED, ZipEntry, write_zip

BROKEN = 5  # the last pairs given become planted rejects, one kind each


@dataclass(frozen=True)
class SamplePair:
    """One image and its label as the generator made them, and what a conversion must make
    of them."""

    stem: str
    image: bytes
    label: dict[str, Any]
    group: str
    class_name: str
    ext: str = ".jpg"


@dataclass(frozen=True)
class SampleDownload:
    """What a correct conversion of the written download must report (see `SampleData`)."""

    root: Path
    samples: int
    rejects: dict[str, int]
    identical_duplicates: int
    ignored: int
    other_files: dict[str, int]  # extension -> files that are neither images nor labels
    expected: dict[str, tuple[str, str]]  # key -> (group, class name) of every sample


def render(rng: np.random.Generator, size: tuple[int, int], boxes: list[list[int]],
           background: int, fill: tuple[int, int, int]) -> bytes:
    """A JPEG of noise around `background` with each [x1, y1, x2, y2] box painted `fill`:
    a transform's mapped boxes can be checked against the pixels."""
    from PIL import Image

    width, height = size
    pixels = rng.normal(background, 6, (height, width, 3)).clip(0, 255).astype(np.uint8)
    for x1, y1, x2, y2 in boxes:
        pixels[y1:y2, x1:x2] = fill
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_download(dest: Path, root_name: str, zip_stem: str, pairs: list[SamplePair],
                   spoil: Callable[[dict[str, Any]], None],
                   beside: Callable[[SamplePair], tuple[str, bytes]] | None = None
                   ) -> SampleDownload:
    """Write `pairs` under dest/root_name; the last BROKEN become rejects (`spoil` removes a
    field the profile needs from one label: a bad-label), the first is also copied into
    Validation byte for byte (an identical duplicate, kept once). `beside` makes a file that
    lies next to each good image (name, bytes), as some releases ship."""
    if len(pairs) <= BROKEN:
        raise ValueError(f"need more than {BROKEN} pairs, got {len(pairs)}")
    good, broken = pairs[:-BROKEN], pairs[-BROKEN:]
    zips: dict[str, list[ZipEntry]] = {"TS": [], "TL": [], "VS": [], "VL": []}
    folders = {"TS": "원천데이터/", "TL": "라벨링데이터/", "VS": "", "VL": "VL/"}

    def put(kind: str, name: str, data: bytes) -> None:
        method = ZIP_STORED if kind.endswith("S") else ZIP_DEFLATED  # JPEGs are stored
        encoding = "cp949" if kind in ("TS", "VL") else "utf-8"
        zips[kind].append(ZipEntry(folders[kind] + name, data, method, encoding))

    for number, pair in enumerate(good):
        side = "V" if number % 5 == 4 else "T"  # Validation shares groups with Training
        put(side + "S", pair.stem + pair.ext, pair.image)
        put(side + "L", pair.stem + ".json", orjson.dumps(pair.label))
        if beside is not None:
            put(side + "S", *beside(pair))
    first = good[0]
    put("VS", first.stem + first.ext, first.image)
    put("VL", first.stem + ".json", orjson.dumps(first.label))

    rejects: Counter[str] = Counter()
    orphan_image, orphan_label, not_json, incomplete, truncated = broken
    put("TS", orphan_image.stem + orphan_image.ext, orphan_image.image)
    rejects[Reason.ORPHAN_IMAGE] += 1
    put("TL", orphan_label.stem + ".json", orjson.dumps(orphan_label.label))
    rejects[Reason.ORPHAN_LABEL] += 1
    put("TS", not_json.stem + not_json.ext, not_json.image)
    put("TL", not_json.stem + ".json", orjson.dumps(not_json.label)[:40])
    label = orjson.loads(orjson.dumps(incomplete.label))
    spoil(label)
    put("VS", incomplete.stem + incomplete.ext, incomplete.image)
    put("VL", incomplete.stem + ".json", orjson.dumps(label))
    rejects[Reason.BAD_LABEL] += 4  # image and label of each: one reject row per member
    put("TS", truncated.stem + truncated.ext, truncated.image[: len(truncated.image) // 2])
    put("TL", truncated.stem + ".json", orjson.dumps(truncated.label))
    rejects[Reason.BAD_IMAGE] += 2

    junk = [("TS", "원천데이터/"), ("TS", "원천데이터/Thumbs.db"), ("TL", "__MACOSX/._x.json")]
    for kind, name in junk:
        zips[kind].append(ZipEntry(name, b"" if name.endswith("/") else b"\0" * 16,
                                   ZIP_STORED, "utf-8"))

    root = Path(dest) / root_name
    for kind, side in (("TS", "1.Training/원천데이터"), ("TL", "1.Training/라벨링데이터"),
                       ("VS", "2.Validation/원천데이터"), ("VL", "2.Validation/라벨링데이터")):
        folder = root / "01.데이터" / side
        folder.mkdir(parents=True, exist_ok=True)
        suffix = "images" if kind.endswith("S") else "labels"
        write_zip(folder / f"{kind}_{zip_stem}_{suffix}.zip", zips[kind])
    others = Counter(Path(beside(p)[0]).suffix.lower() for p in good) if beside else Counter()
    return SampleDownload(root, len(good), {str(r): n for r, n in sorted(rejects.items())}, 2,
                          len(junk), dict(others), {p.stem: (p.group, p.class_name) for p in good})
