"""`shardify export`: a selection of samples as image files, for libraries that read folders.

anomalib (PatchCore and the other anomaly detectors) and torchvision's ImageFolder need image
files on disk, not shards. Export writes the images exactly as the shards hold them (no
re-encode; after a convert with `--crop`/`--resize`, the small training-ready crops), named by
sample key, in one of two layouts:

- `folder`: anomalib's Folder layout: `normal/` (class 0), `abnormal/` (the others) and
  `masks/`, one PNG per abnormal image, named like it, drawn from the label's defect polygons.
- `imagefolder`: torchvision's ImageFolder: one folder per class, `{index}_{name}`, so that
  ImageFolder's class indices (its sorted folder names) are the manifest's `label` when every
  class is present; `export.json`'s `class_to_idx` says how ImageFolder numbers what was
  written, and the summary warns when that differs.

Planning (which file goes where, which polygons a mask draws) is pure; the I/O is at the edge:
samples are read at their manifest offsets and checked against the manifest's sizes and
CRC-32s, written into a staging folder beside DIR and published by one rename, so DIR never
holds a half-written export.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import orjson

from . import __version__
from .errors import DISK_FULL, ExportFailed, NotEnoughSpace, UsageError
from .output.store import MANIFEST, nearest_existing
from .pathnames import path_text
from .profiles import Geometry
from .progress import Progress, human_bytes
from .transform.geometry import flat_points, locations
from .write.tar import LABEL_EXT, read_sample

if TYPE_CHECKING:  # pyarrow (and the manifest reader) load when an export runs, not for `--help`
    import pyarrow as pa

LAYOUTS = ("folder", "imagefolder")
NORMAL, ABNORMAL, MASKS = "normal", "abnormal", "masks"
MARKER = "export.json"  # written last: an export's record, and how --overwrite knows one
STAGING_MARKER = ".shardify-export-partial"
ROW_COLUMNS = ["key", "shard", "offset", "sample_bytes", "label", "image_ext", "image_bytes",
               "crc32", "label_bytes", "label_crc32"]
BATCH_ROWS = 4096
FILE_OVERHEAD = 4096  # a filesystem block per file; also what a mask takes, about


@dataclass(frozen=True)
class ExportOptions:
    out: Path
    dest: Path
    split: str = "train"
    select: tuple[str, ...] = ()
    layout: str = "folder"
    overwrite: bool = False
    quiet: bool = False
    profile_file: str | None = None  # where the profile file is now (see profile_of)


class Placed(NamedTuple):
    """Where one sample's files go, relative to DIR."""

    image: str
    mask: str | None  # folder layout, abnormal images only


@dataclass
class Tally:
    """What an export wrote: files and bytes per folder, and how its masks came out."""

    folders: dict[str, dict[str, int]] = field(default_factory=dict)
    masks_empty: int = 0  # abnormal images without a usable polygon: an all-black mask
    unusable_polygons: int = 0  # defect point lists that are no polygon (odd, < 3 points)

    def add(self, path: str, size: int) -> None:
        folder = self.folders.setdefault(path.split("/")[0], {"files": 0, "bytes": 0})
        folder["files"] += 1
        folder["bytes"] += size


@dataclass(frozen=True)
class ExportReport:
    dest: Path
    samples: int
    record: dict[str, Any]  # what DIR/export.json holds
    seconds: float


def parse_select(texts: Sequence[str], schema: pa.Schema) -> dict[str, tuple[Any, ...]]:
    """`column=value[,value...]` items as `select_expression`'s dict (ANDed; a list means any
    of its values), each value cast to the column's type.

    Unknown columns are passed through as text: `select_expression` names them, with the
    columns there are. A column given twice keeps the values both allow.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    select: dict[str, tuple[Any, ...]] = {}
    for text in texts:
        column, sep, values = text.partition("=")
        column = column.strip()
        if not sep or not column or not values:
            raise UsageError(f"--select {text!r}: expected COLUMN=VALUE[,VALUE...], e.g. "
                             "data_type=ct or form=pouch,cylindrical")
        items = [value.strip() for value in values.split(",")]
        typed: tuple[Any, ...] = tuple(items)
        if column in schema.names:
            kind = schema.field(column).type
            try:
                typed = tuple(pc.cast(pa.array(items, pa.string()), kind).to_pylist())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise UsageError(f"--select {text!r}: {column} holds {kind} values, "
                                 f"not {values!r}") from None
        select[column] = tuple(v for v in select[column] if v in typed) \
            if column in select else typed
    return select


def place(row: Mapping[str, Any], layout: str, class_names: Sequence[str],
          masks: bool = True) -> Placed:
    """The files of one sample (a manifest row) in `layout`; `masks` False for a profile
    that declares no defect polygons (an all-black mask would say "no defect here")."""
    name = f"{row['key']}.{row['image_ext']}"
    label = int(row["label"])
    if layout == "imagefolder":
        width = len(str(len(class_names) - 1))
        return Placed(f"{label:0{width}d}_{class_names[label]}/{name}", None)
    if label == 0:
        return Placed(f"{NORMAL}/{name}", None)
    return Placed(f"{ABNORMAL}/{name}", f"{MASKS}/{row['key']}.png" if masks else None)


def defect_polygons(document: Any, geometry: Geometry) -> tuple[list[list[float]], int]:
    """The label's defect polygons (flat point lists of 3+ points) and how many defect point
    lists are none (odd length, not numbers, fewer than 3 points)."""
    polygons, unusable = [], 0
    for path in geometry.defects:
        for parent, key in locations(document, path):
            points = flat_points(parent[key])
            if points is not None and len(points) >= 6:
                polygons.append(points)
            else:
                unusable += 1
    return polygons, unusable


def render_mask(size: tuple[int, int], polygons: list[list[float]]) -> bytes:
    """An 8-bit grey PNG of `size`: white (255) where a pixel's centre lies inside a polygon
    (even-odd rule; label points are continuous, a pixel's left edge is x), black elsewhere.
    anomalib reads masks as grey / 255. Pillow's polygon fill also paints the edge pixels: a
    ring a pixel wide that would grow a small defect by a third."""
    from PIL import Image

    width, height = size
    mask = np.zeros((height, width), bool)
    for points in polygons:
        xs, ys = np.asarray(points[0::2], float), np.asarray(points[1::2], float)
        x0, x1 = max(0, math.floor(xs.min())), min(width, math.ceil(xs.max()))
        y0, y1 = max(0, math.floor(ys.min())), min(height, math.ceil(ys.max()))
        if x0 >= x1 or y0 >= y1:
            continue  # outside the image
        cx = np.arange(x0, x1) + 0.5
        cy = np.arange(y0, y1)[:, None] + 0.5
        inside = np.zeros((y1 - y0, x1 - x0), bool)
        for ax, ay, bx, by in zip(xs, ys, np.roll(xs, -1), np.roll(ys, -1), strict=True):
            if ay == by:
                continue  # a horizontal edge crosses no row of centres
            crosses = (ay > cy) != (by > cy)
            inside ^= crosses & (cx < ax + (cy - ay) * (bx - ax) / (by - ay))
        mask[y0:y1, x0:x1] |= inside
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def export(options: ExportOptions) -> ExportReport:
    """Write the selected samples of one split under DIR; see the module docstring."""
    import pyarrow.compute as pc

    from .output.manifest import profile_of, read_schema
    from .rows import manifest_rows

    started = time.monotonic()
    manifest = options.out / MANIFEST
    if not manifest.is_file():
        raise UsageError(f"{path_text(options.out)} is not a shardify output (no {MANIFEST})")
    try:
        schema = read_schema(manifest)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"cannot read {path_text(manifest)}: {error}") from None
    try:
        profile = profile_of(schema, options.profile_file)
    except UsageError as error:
        raise UsageError(f"{path_text(manifest)}: {error}") from None
    if options.layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}")
    missing = [name for name in ROW_COLUMNS if name not in schema.names]
    if missing:
        raise UsageError(f"{path_text(manifest)} lacks {', '.join(missing)}: written by an older "
                         "shardify; re-run its convert command to rewrite it")
    select = parse_select(options.select, schema)
    _check_dest(options)
    try:
        rows = manifest_rows(options.out, options.split, select or None).select(ROW_COLUMNS)
    except ValueError as error:  # a bad split or an unknown column
        raise UsageError(str(error)) from None
    if rows.num_rows == 0:
        raise UsageError(f"no {options.split} samples in {path_text(options.out)} match "
                         f"{' '.join(options.select) or 'the split'}")
    image_bytes = int(pc.sum(rows.column("image_bytes")).as_py())
    needed = image_bytes + 2 * FILE_OVERHEAD * rows.num_rows
    free = shutil.disk_usage(nearest_existing(options.dest.parent)).free
    if needed > free:
        raise NotEnoughSpace(f"not enough space for {path_text(options.dest)}: the export "
                             f"needs about {human_bytes(needed)}, {human_bytes(free)} is free")
    staging = _staging(options.dest)
    try:
        tally = _write(options, rows, profile.class_names, profile.geometry, staging,
                       image_bytes)
        record = {
            "shardify_export": __version__, "out": path_text(options.out.resolve()),
            "split": options.split, "select": list(options.select), "layout": options.layout,
            "samples": rows.num_rows, "folders": dict(sorted(tally.folders.items())),
            "masks_empty": tally.masks_empty, "unusable_polygons": tally.unusable_polygons,
        }
        if options.layout == "imagefolder":  # what ImageFolder will number each folder
            record["class_to_idx"] = {name: i for i, name in enumerate(sorted(tally.folders))}
        (staging / MARKER).write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
        (staging / STAGING_MARKER).unlink()
        _publish(staging, options.dest)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            raise NotEnoughSpace(f"disk full while writing {path_text(options.dest)} (about "
                                 f"{human_bytes(needed)} needed); the partial export is "
                                 "removed") from None
        raise
    return ExportReport(options.dest, rows.num_rows, record, time.monotonic() - started)


def _check_dest(options: ExportOptions) -> None:
    """DIR: new, empty, or (with --overwrite) an earlier export; never OUT, inside it or
    holding it."""
    dest, out = options.dest.resolve(), options.out.resolve()
    if dest == out or out in dest.parents or dest in out.parents:
        raise UsageError(f"DIR {path_text(options.dest)} must be outside OUT "
                         f"{path_text(options.out)} and not hold it")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise UsageError(f"DIR {path_text(options.dest)} exists and is not a folder")
    if not any(dest.iterdir()):
        return
    if not options.overwrite:
        raise UsageError(f"DIR {path_text(options.dest)} is not empty; give a new or empty "
                         "folder, or --overwrite to replace an earlier export")
    if not _is_export(dest / MARKER):
        raise UsageError(f"DIR {path_text(options.dest)} is not an earlier shardify export "
                         f"(no {MARKER}); --overwrite replaces only those")


def _is_export(marker: Path) -> bool:
    try:
        return "shardify_export" in orjson.loads(marker.read_bytes())
    except (OSError, orjson.JSONDecodeError, TypeError):
        return False


def _staging(dest: Path) -> Path:
    """A fresh staging folder beside DIR (same filesystem, so publishing is a rename); a stale
    one that a killed export left is removed (it holds the staging marker)."""
    staging = dest.parent / f".{dest.name}.shardify-export.partial"
    if staging.exists():
        if not (staging / STAGING_MARKER).exists():
            raise UsageError(f"{path_text(staging)} exists and was not made by shardify "
                             "export; remove it or choose another DIR")
        shutil.rmtree(staging)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    (staging / STAGING_MARKER).touch()
    return staging


def _write(options: ExportOptions, rows: pa.Table, class_names: Sequence[str],
           geometry: Geometry, staging: Path, image_bytes: int) -> Tally:
    tally = Tally()
    progress = Progress(image_bytes, "B", "export", enabled=not options.quiet)
    made: set[str] = set()
    try:
        for row, image, label in _samples(options.out, rows):
            placed = place(row, options.layout, class_names, bool(geometry.defects))
            files = [(placed.image, image)]
            if placed.mask is not None:
                files.append((placed.mask, _mask(image, label, geometry, tally)))
            for path, data in files:
                folder = path.split("/")[0]
                if folder not in made:
                    (staging / folder).mkdir()
                    made.add(folder)
                with open(staging / path, "xb") as handle:
                    handle.write(data)
                tally.add(path, len(data))
            progress.advance(len(image))
    finally:
        progress.close()
    return tally


def _samples(out: Path, rows: pa.Table) -> Iterator[tuple[dict[str, Any], bytes, bytes]]:
    """(row, image, label) in manifest order (each shard read front to back), each checked
    against the row's sizes and CRC-32s."""
    shard, fd = None, -1
    try:
        for batch in rows.to_batches(max_chunksize=BATCH_ROWS):
            for row in batch.to_pylist():
                if row["shard"] != shard:
                    if fd >= 0:
                        os.close(fd)
                        fd = -1
                    shard = row["shard"]
                    fd = os.open(out / shard, os.O_RDONLY)
                where = f"{row['shard']}:{row['key']}"
                try:
                    members = read_sample(fd, row)
                except ValueError as error:  # it names the shard, offset and key
                    raise ExportFailed(str(error)) from None
                image, label = members[row["image_ext"]], members[LABEL_EXT]
                for what, data, crc in (("image", image, row["crc32"]),
                                        ("label", label, row["label_crc32"])):
                    if zlib.crc32(data) != crc:
                        raise ExportFailed(f"{where}: {what} CRC-32 {zlib.crc32(data):08x} "
                                           f"differs from the manifest's {crc:08x} (run "
                                           "shardify verify)")
                yield row, image, label
    finally:
        if fd >= 0:
            os.close(fd)


def _mask(image: bytes, label: bytes, geometry: Geometry, tally: Tally) -> bytes:
    """The mask of an abnormal image, the size of the image as written."""
    from PIL import Image

    polygons, unusable = defect_polygons(orjson.loads(label), geometry)
    tally.unusable_polygons += unusable
    tally.masks_empty += not polygons
    with Image.open(io.BytesIO(image)) as opened:  # reads the header only
        size = opened.size
    return render_mask(size, polygons)


def _publish(staging: Path, dest: Path) -> None:
    """Make the staged export DIR: flushed to disk first, then renamed into place (an earlier
    export there is moved aside and removed after)."""
    os.sync()  # one flush for all files: an fsync per file would cost more than the export
    old = dest.parent / f".{dest.name}.shardify-export.old"
    if dest.exists() and any(dest.iterdir()):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
    os.replace(staging, dest)  # replaces an empty DIR
    directory = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    shutil.rmtree(old, ignore_errors=True)
