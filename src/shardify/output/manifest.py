"""The indexes a training job reads: one Parquet row per sample, the rejects, wids indexes.

Built from the shards' entries (what was written) and the profile's columns; the output store
writes them. Nothing time- or host-dependent goes in, so the same inputs give identical files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..errors import UsageError
from ..plan.pairing import IMAGE, LABEL, member_refs
from ..plan.split import SPLITS
from ..profiles import DatasetProfile
from ..profiles.load import get_profile
from ..rejects import Reject
from ..transform.options import TransformOptions
from ..write.shard import CROP_BOX, HEIGHT, SOURCE_HEIGHT, SOURCE_WIDTH, WIDTH, ShardResult
from .store import MANIFEST_MARKER, wids_index_name

LOCATION_COLUMNS = [
    ("key", pa.string()),
    ("split", pa.string()),
    ("shard", pa.string()),
    ("offset", pa.int64()),
    ("sample_bytes", pa.int64()),
]
MEMBER_COLUMNS = [
    ("image_ext", pa.string()),
    ("image_bytes", pa.int64()),
    ("crc32", pa.uint32()),
    ("label_bytes", pa.int64()),
    ("label_crc32", pa.uint32()),
    ("source_archive", pa.string()),
    ("source_member", pa.string()),
    ("label_archive", pa.string()),
    ("label_member", pa.string()),
]
# What the written image came from (the same as written when no transform was asked for).
SOURCE_COLUMNS = [
    ("source_width", pa.int32()),
    ("source_height", pa.int32()),
    ("crop_box", pa.list_(pa.int32())),  # x0, y0, x1, y1 in upright source pixels, or null
    ("scale", pa.float64()),
    ("source_bytes", pa.int64()),
    ("source_crc32", pa.uint32()),
    ("label_source_crc32", pa.uint32()),
]
COLUMN_DESCRIPTIONS = {
    "key": "the sample's key: its members in the shard are {key}.{image_ext}, .json, .cls",
    "split": "train, val or test",
    "shard": "the shard holding the sample, relative to OUT (train/shard-000003.tar)",
    "offset": "byte offset of the sample's first tar header in the shard",
    "sample_bytes": "bytes of the sample's three members in the shard (headers, padding)",
    "image_ext": "the written image's type: jpg, png or webp",
    "image_bytes": "size of the written image",
    "crc32": "CRC-32 of the written image",
    "label_bytes": "size of the written label JSON (without a BOM)",
    "label_crc32": "CRC-32 of the written label JSON",
    "source_archive": "the image's zip, relative to the SOURCE it was found under",
    "source_member": "the image's name in that zip, decoded",
    "label_archive": "the label's zip, relative to the SOURCE it was found under",
    "label_member": "the label's name in that zip, decoded",
    "source_width": "the source image's upright width (without a transform: the label's)",
    "source_height": "the source image's upright height (without a transform: the label's)",
    "crop_box": "x0, y0, x1, y1 of the crop in upright source pixels (right, bottom "
                "exclusive); null when the whole image was kept",
    "scale": "written size / kept size, along the longer side (1.0 without --resize)",
    "source_bytes": "size of the source image member",
    "source_crc32": "CRC-32 of the source image member",
    "label_source_crc32": "CRC-32 of the source label member (with its BOM, if any)",
}
REJECT_DESCRIPTIONS = {
    "key": "the sample's key (the member's name without folder and extension)",
    "reason": "why the member is not in a shard (one of shardify's reject reasons)",
    "source_archive": "the archive holding the member",
    "source_member": "the member's name in it",
    "detail": "what was found, in words",
}


def check_columns(profile: DatasetProfile) -> None:
    """UsageError when a profile's dataset columns take a name the manifest has of its own
    (`split`, `scale`, ...): said before any work, not as a broken manifest after it."""
    taken = sorted(set(profile.columns.names) & COLUMN_DESCRIPTIONS.keys())
    if taken:
        raise UsageError(f"profile {profile.name}: its columns {', '.join(taken)} take names "
                         "of the manifest's own columns: rename them")


def manifest_schema(profile: DatasetProfile, options: Mapping[str, Any] | None = None
                    ) -> pa.Schema:
    """Where each sample is, the profile's dataset columns, then its image, label and sources.

    The metadata names shardify (how --manifest knows a file it may replace) and the profile
    (how readers know which one made the file); with the run's `options`, also those, the class
    names and what each column holds (see `index_metadata`).
    """
    schema = pa.schema([*LOCATION_COLUMNS, *profile.columns, *MEMBER_COLUMNS, *SOURCE_COLUMNS],
                       metadata={MANIFEST_MARKER: __version__.encode(),
                                 b"profile": profile.name.encode()})
    if options is None:
        return schema
    descriptions = {**COLUMN_DESCRIPTIONS, **profile.column_descriptions}
    return schema.with_metadata(index_metadata(
        profile, options, {name: descriptions[name] for name in schema.names}))


def index_metadata(profile: DatasetProfile, options: Mapping[str, Any],
                   columns: Mapping[str, str]) -> dict[bytes, bytes]:
    """Parquet key/value metadata that lets the file speak for itself away from OUT: which
    shardify and profile wrote it, with which options (JSON), the class names (JSON list; `.cls`
    i is names[i]) and each column's description (JSON object)."""
    return {MANIFEST_MARKER: __version__.encode(), b"profile": profile.name.encode(),
            b"options": orjson.dumps(options), b"class_names": orjson.dumps(profile.class_names),
            b"columns": orjson.dumps(columns)}


def profile_of(schema: pa.Schema, profile_file: str | None = None) -> DatasetProfile:
    """The profile, with its `-P` options, that wrote a manifest (its metadata names them);
    UsageError saying why when shardify cannot have that profile now.

    `profile_file` is where a user's profile file is now, when it is no longer where convert
    read it (an OUT copied to another machine); it must be the same profile, name and version.
    A manifest that names none was written before profiles existed: by the battery rules.
    """
    metadata = schema.metadata or {}
    name = metadata.get(b"profile", b"battery").decode(errors="replace")
    try:
        options = orjson.loads(metadata.get(b"options", b"{}"))
    except orjson.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        options = {}
    spec, values = options.get("profile_spec", name), options.get("profile_options", {})
    if not isinstance(spec, str) or not isinstance(values, dict):
        raise UsageError(f"its metadata names profile {name} unreadably")
    if profile_file is not None:
        spec = profile_file
    profile = get_profile(spec, {str(k): str(v) for k, v in values.items()})
    if profile.name != name:
        raise UsageError(f"it was written by profile {name}, not {profile.name} ({spec})")
    written = options.get("profile", f"{profile.name} {profile.version}")
    if written != f"{profile.name} {profile.version}":
        raise UsageError(f"it was written by profile {written}, but {spec} is now "
                         f"{profile.name} {profile.version}: re-run the convert command")
    return profile


MANIFEST_BATCH = 65536
REJECT_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("key", "reason", "source_archive", "source_member", "detail")]
)


def manifest_table(results: list[ShardResult], profile: DatasetProfile,
                   transform: TransformOptions, options: Mapping[str, Any]) -> pa.Table:
    """One row per written sample, in shard order, built column by column a batch at a time.

    `transform` (what convert was asked to do to the images) names the written image types;
    `options` (the run's shaping options) go in the metadata.

    Columns, not one dict per row, and Python lists for one batch only: at 400k samples, whole
    columns of Python objects would take ~150 MB on top of the table.
    """
    schema = manifest_schema(profile, options)
    return pa.Table.from_batches(
        [_manifest_batch(result, start, start + MANIFEST_BATCH, profile, schema,
                         transform.output_ext)
         for result in results for start in range(0, len(result.samples), MANIFEST_BATCH)],
        schema=schema)


def _manifest_batch(result: ShardResult, start: int, stop: int, profile: DatasetProfile,
                    schema: pa.Schema, ext_of: Callable[[str], str]) -> pa.RecordBatch:
    samples = result.samples[start:stop]
    sources = [member_refs(samples, [role]) for role in (IMAGE, LABEL)]
    archives = [[table.archive.name for table in refs.tables] for refs in sources]
    image_records, label_records = (refs.records() for refs in sources)
    dataset = profile.column_values([sample.fields for sample in samples])
    placed = _placement_columns(result, start, stop, dataset)
    columns = {
        "key": [s.key for s in samples],
        "split": [result.split] * len(samples),
        "shard": [result.name] * len(samples),
        "offset": result.offsets[start:stop],
        "sample_bytes": result.sizes[start:stop],
        **dataset,
        "width": placed["width"],
        "height": placed["height"],
        "image_ext": [ext_of(s.image_ext) for s in samples],
        "image_bytes": result.image_sizes[start:stop],
        "crc32": result.image_crc32s[start:stop],
        "label_bytes": result.label_sizes[start:stop],
        "label_crc32": result.label_crc32s[start:stop],
        "source_archive": pa.DictionaryArray.from_arrays(sources[IMAGE].which, archives[IMAGE]),
        "source_member": sources[IMAGE].names(),
        "label_archive": pa.DictionaryArray.from_arrays(sources[LABEL].which, archives[LABEL]),
        "label_member": sources[LABEL].names(),
        "source_width": placed["source_width"],
        "source_height": placed["source_height"],
        "crop_box": placed["crop_box"],
        "scale": placed["scale"],
        "source_bytes": image_records["file_size"],
        "source_crc32": image_records["crc32"],
        "label_source_crc32": label_records["crc32"],
    }
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def _placement_columns(result: ShardResult, start: int, stop: int,
                       dataset: dict[str, list[Any]]) -> dict[str, Any]:
    """Written and source sizes, crop box and scale: from the transform, or (without one) the
    label's size for both, no box, scale 1."""
    if result.placements is None or result.scales is None:
        count = len(dataset["width"])
        return {"width": dataset["width"], "height": dataset["height"],
                "source_width": dataset["width"], "source_height": dataset["height"],
                "crop_box": [None] * count, "scale": [1.0] * count}
    placed = result.placements[start:stop]
    boxes = placed[:, CROP_BOX].tolist()
    return {"width": placed[:, WIDTH], "height": placed[:, HEIGHT],
            "source_width": placed[:, SOURCE_WIDTH], "source_height": placed[:, SOURCE_HEIGHT],
            "crop_box": [box if box[0] >= 0 else None for box in boxes],
            "scale": result.scales[start:stop]}


def rejects_table(rejects: Iterable[Reject], profile: DatasetProfile,
                  options: Mapping[str, Any]) -> pa.Table:
    """Rejects sorted by reason, key and member, so the file does not depend on discovery order;
    its metadata as the manifest's (`index_metadata`)."""
    ordered = sorted(rejects, key=lambda r: (r.reason, r.key, r.source_archive, r.source_member))
    schema = REJECT_SCHEMA.with_metadata(index_metadata(profile, options, REJECT_DESCRIPTIONS))
    return pa.Table.from_pylist(
        [
            {
                "key": r.key,
                "reason": r.reason,
                "source_archive": r.source_archive,
                "source_member": r.source_member,
                "detail": r.detail,
            }
            for r in ordered
        ],
        schema=schema,
    )


def wids_index(split: str, shards: list[tuple[str, int, int]]) -> dict:
    """The split's shards as a `wids` shard index, so `wids.ShardListDataset` can address any
    sample by number without scanning the shards first.

    `shards` are (path relative to OUT, samples, bytes) in shard order; URLs stay relative, so
    wids resolves them against the index's own folder and OUT can be moved like the manifest.
    """
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "shardlist": [{"url": url, "nsamples": count, "filesize": size}
                      for url, count, size in shards],
        "name": split,
    }


def wids_indexes(results: list[ShardResult]) -> dict[str, dict | None]:
    """Each split's wids index file name and content, from what the shards hold; None for a
    split without samples (its file is removed: a stale index never points at shards a later
    run deleted)."""
    indexes: dict[str, dict | None] = {}
    for split in SPLITS:
        shards = [(r.name, len(r.samples), r.bytes_out) for r in results
                  if r.split == split and r.samples]
        indexes[wids_index_name(split)] = wids_index(split, shards) if shards else None
    return indexes


def read_parquet(source: Path | BinaryIO, **options: Any) -> pa.Table:
    """A Parquet file read through a Python file, whatever bytes its path holds (or a file
    opened already: a store's, see `output.store.Store.open`)."""
    with _opened(source) as handle:
        # No read-ahead or decoding threads: left running on a Python file, they abort the
        # process at exit (`terminate called without an active exception`, ~1 run in 5).
        return pq.read_table(handle, pre_buffer=False, use_threads=False, **options)


def read_schema(source: Path | BinaryIO) -> pa.Schema:
    """A Parquet file's schema (with its metadata), read through a Python file."""
    with _opened(source) as handle:
        return pq.read_schema(handle)


def _opened(source: Path | BinaryIO) -> contextlib.AbstractContextManager[BinaryIO]:
    """A path opened (and closed after), or an open file left to its owner."""
    return open(source, "rb") if isinstance(source, Path) else contextlib.nullcontext(source)
