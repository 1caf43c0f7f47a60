"""Read a shardify output back and check it against its own manifest and summary.

It uses `tarfile` (an independent reader, not the writer's code) and streams every shard once:
structure, sample adjacency, padding and end blocks, manifest offsets, sizes and CRCs (image and
label), class labels, battery leakage and the counts in summary.json. OUT may be a URL: its
files are then read through fsspec (each shard streamed once, in large ranged reads).
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import deflate
import orjson
import pyarrow as pa

from .archives.discovery import find_archives
from .archives.model import Member
from .archives.reader import ArchiveReader
from .archives.zipdir import index_archives
from .consume import released_archives
from .errors import BadLabel, OutputMissing, UnusableIndex, UsageError
from .output.manifest import manifest_schema, profile_of, read_parquet
from .output.store import MANIFEST, SUMMARY, Store, output_store
from .plan.pairing import SAFE_KEY
from .plan.split import SPLITS
from .profiles import BOM, DatasetProfile
from .profiles.fields import parse_fields
from .storage import Location, is_url
from .transform.options import EXT_OF_FORMAT
from .write.tar import BLOCK, TAR_END_SIZE, class_bytes, padded

BOM_CRC = deflate.crc32(BOM)
VALUES_NEEDED = frozenset({"key", "split", "shard", "offset", "sample_bytes", "group", "label",
                           "image_ext", "image_bytes", "crc32", "label_bytes", "label_crc32",
                           "source_bytes", "source_crc32", "label_source_crc32"})
TAIL_CHUNK = 2**20
WRITTEN_EXTS = frozenset(EXT_OF_FORMAT.values())  # what --format may write


@dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def verify_output(out: Location | str, sources: list[str] | None = None,
                  storage_options: dict[str, object] | None = None,
                  profile_file: str | None = None) -> tuple[int, list[Problem], int]:
    """(samples checked, problems found, samples not compared with their sources because
    `convert --consume-sources` released them) for the output folder `out`.

    A manifest or summary that is missing (but not both), unreadable or incomplete is a problem
    like any other; with neither, `out` is not an output (OutputMissing).

    With `sources` (the SOURCE arguments given to convert; URLs are opened with
    `storage_options`), every sample is also compared with its source members: image and label
    size and CRC-32 from the zips' central directories. `profile_file`: see `profile_of`.
    """
    store = output_store(out, storage_options)
    try:
        rows, summary, profile = _read_index_files(store, profile_file)
    except UnusableIndex as error:
        return 0, [Problem(error.where, error.what)], 0
    expected: dict[str, dict[str, dict]] = {row["shard"]: {} for row in rows}
    for row in rows:
        expected[row["shard"]][row["key"]] = row
    problems = [Problem(f"manifest: {key}", f"key appears {count} times (keys are unique)")
                for key, count in sorted(Counter(row["key"] for row in rows).items())
                if count > 1]
    present = set(store.shard_files())
    problems += _check_shard_files(present, summary, expected)
    label_crcs: dict[tuple[str, str], tuple[int, int]] = {}
    for shard in sorted(expected):
        if shard in present or store.exists(shard):
            problems += _check_shard(store, shard, expected[shard], label_crcs, profile)
    problems += _check_leakage(rows, profile)
    problems += _check_counts(rows, summary)
    released = 0
    if sources is not None:
        transform = summary["options"].get("transform")
        gone = released_archives(store)
        kept = [row for row in rows
                if row["source_archive"] not in gone and row["label_archive"] not in gone]
        released = len(rows) - len(kept)
        if gone:  # a SOURCE argument that was a released file itself is gone
            sources = [source for source in sources
                       if is_url(source) or os.path.lexists(source)]
        if kept:
            problems += _check_sources(kept, sources, label_crcs, store,
                                       None if transform is None else (transform, profile),
                                       storage_options)
    return len(rows), problems, released


def _read_index_files(store: Store, profile_file: str | None
                      ) -> tuple[list[dict], dict, DatasetProfile]:
    """The manifest's rows, the summary and the profile that made them; Unusable if either file
    is missing, unreadable, lacks a column or holds nulls where verify needs values."""
    present = {name: store.exists(name) for name in (MANIFEST, SUMMARY)}
    if not any(present.values()):
        raise OutputMissing(f"{store.shown} has no {MANIFEST} or {SUMMARY}: is it a shardify "
                            "output?")
    for name, found in present.items():
        if not found:
            raise UnusableIndex(name, "missing; re-run the convert command to rewrite it")
    try:
        with store.open(MANIFEST) as handle:
            table = read_parquet(handle)
    except (pa.ArrowException, OSError) as error:
        raise UnusableIndex(MANIFEST, f"unreadable: {error}") from None
    try:
        profile = profile_of(table.schema, profile_file)
    except UsageError as error:
        raise UnusableIndex(MANIFEST, str(error)) from None
    schema = manifest_schema(profile)
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise UnusableIndex(MANIFEST, f"lacks the columns {missing}")
    for name in schema.names:
        wanted, found = schema.field(name).type, table.schema.field(name).type
        if found != wanted:
            raise UnusableIndex(MANIFEST, f"column {name} is {found}, expected {wanted}")
        if name in VALUES_NEEDED and table.column(name).null_count:
            raise UnusableIndex(MANIFEST, f"column {name} has empty values")
    try:
        summary = orjson.loads(store.read_bytes(SUMMARY))
        if not all(isinstance(summary["splits"][split]["shards"], list)
                   and isinstance(summary["splits"][split]["samples"], int) for split in SPLITS):
            raise KeyError("splits")
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as error:
        raise UnusableIndex(SUMMARY, f"damaged ({error!r}); re-run the convert command to "
                            "rewrite it") from None
    return table.to_pylist(), summary, profile


def _check_sources(rows: list[dict], sources: list[str],
                   label_crcs: dict[tuple[str, str], tuple[int, int]], out: Store,
                   transform: tuple[dict, DatasetProfile] | None,
                   storage_options: dict[str, object] | None) -> list[Problem]:
    """Each sample's image and label against the source members' size and CRC-32; for a
    transformed output, a sample of images transformed again from their sources."""
    with ArchiveReader() as reader:
        index = index_archives(find_archives(sources, storage_options).archives, reader)
        members = {(m.archive.name, m.name): m for table in index.tables
                   for m in table.members()}
        problems = _compare_sources(rows, members, label_crcs, transformed=bool(transform))
        if transform is not None:
            from .pixel_check import check_pixels

            problems += [Problem(where, what) for where, what in check_pixels(
                rows, members, reader, out, *transform)]
    return problems


def _compare_sources(rows: list[dict], members: dict[tuple[str, str], Member],
                     label_crcs: dict[tuple[str, str], tuple[int, int]], transformed: bool
                     ) -> list[Problem]:
    problems = []
    for row in rows:
        where = f"{row['shard']}:{row['key']}"
        image = members.get((row["source_archive"], row["source_member"]))
        label = members.get((row["label_archive"], row["label_member"]))
        if image is None or label is None:
            missing = "image" if image is None else "label"
            problems.append(Problem(where, f"source {missing} not found in --sources (give the "
                                    "SOURCE arguments given to convert)"))
            continue
        if (image.file_size, image.crc32) != (row["source_bytes"], row["source_crc32"]) or (
                not transformed and (row["image_bytes"], row["crc32"]) != (
                    row["source_bytes"], row["source_crc32"])):
            problems.append(Problem(where, f"image differs from its source member "
                                    f"{row['source_archive']}:{row['source_member']}"))
        found = label_crcs.get((row["shard"], row["key"]))
        if label.crc32 != row["label_source_crc32"] or (
                not transformed and found is not None and label.crc32 not in found):
            problems.append(Problem(where, f"label differs from its source member "
                                    f"{row['label_archive']}:{row['label_member']}"))
    return problems


def _check_shard_files(present: set[str], summary: dict, expected: dict) -> list[Problem]:
    names = [name for split in SPLITS for name in summary["splits"][split]["shards"]]
    listed = set(names)
    problems = [Problem(name, "listed more than once in summary.json")
                for name, count in sorted(Counter(names).items()) if count > 1]
    problems += [Problem(name, "shard file is missing") for name in sorted(listed - present)]
    problems += [Problem(name, "extra shard file not in summary.json")
                 for name in sorted(present - listed)]
    problems += [Problem(name, "manifest names a shard that summary.json does not list")
                 for name in sorted(set(expected) - listed)]
    return problems


def _check_shard(store: Store, shard: str, rows: dict[str, dict],
                 label_crcs: dict[tuple[str, str], tuple[int, int]],
                 profile: DatasetProfile) -> list[Problem]:
    """Stream one shard: structure, adjacency, padding, the end, and each sample against its
    manifest row.

    tarfile parses the headers; each member's data and padding are read with one read at the
    offset tarfile found (in order: a remote shard is streamed, not fetched member by member).
    Records each label's CRC-32, without and with a BOM, for the
    comparison with the sources.
    """
    problems: list[Problem] = []
    seen: set[str] = set()
    current_key: str | None = None
    members: dict[str, bytes] = {}
    first_offset = end = end_of_sample = 0
    try:
        with store.open(shard) as handle:
            for info in _members(handle):
                key, _, ext = info.name.partition(".")
                end = info.offset_data + padded(info.size)
                if not info.isfile() or info.pax_headers or "/" in info.name:
                    problems.append(Problem(f"{shard}:{key}", f"unexpected member {info.name!r}"))
                    continue
                data = _pread(handle, padded(info.size), info.offset_data)
                if key != current_key:
                    if current_key is not None:
                        problems += _check_sample(shard, current_key, first_offset,
                                                  end_of_sample, members, rows.get(current_key),
                                                  profile)
                    if key in seen:
                        problems.append(Problem(f"{shard}:{key}", "members are not adjacent"))
                    seen.add(key)
                    current_key, members, first_offset = key, {}, info.offset
                end_of_sample = end
                members[ext] = data[: info.size]
                if len(data) < padded(info.size):
                    problems.append(Problem(f"{shard}:{key}", f"{info.name} is cut off: the "
                                            "shard ends inside it"))
                elif data.count(0, info.size) != len(data) - info.size:
                    problems.append(Problem(f"{shard}:{key}",
                                            f"padding after {info.name} is not zeros"))
                if ext == "json":
                    label_crcs[(shard, key)] = (deflate.crc32(members[ext]),
                                                deflate.crc32(members[ext], BOM_CRC))
            if current_key is not None:
                problems += _check_sample(shard, current_key, first_offset, end_of_sample,
                                          members, rows.get(current_key), profile)
            problems += _check_end(handle, shard, end, rows, seen)
    except (tarfile.TarError, OSError, EOFError) as error:
        problems.append(Problem(shard, f"not a readable tar: {error}"))
    problems += [Problem(f"{shard}:{key}", "in the manifest but not in the shard")
                 for key in sorted(rows.keys() - seen)]
    return problems


def _members(handle: BinaryIO) -> Iterator[tarfile.TarInfo]:
    """The shard's members as tarfile reads them, up to a header it cannot read (even the first):
    `_check_end` then names what is there."""
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            yield from tar
    except tarfile.ReadError:
        return


def _pread(handle: BinaryIO, size: int, offset: int) -> bytes:
    handle.seek(offset)
    return handle.read(size)


def _check_end(handle: BinaryIO, shard: str, end: int, rows: dict[str, dict],
               seen: set[str]) -> list[Problem]:
    """What follows the last member tarfile read (at `end`): two zero blocks and nothing but
    zeros after them.

    tarfile stops quietly at a header whose checksum is wrong: that is named once, and the
    manifest's samples from there on are added to `seen`, so they are not listed one by one.
    """
    size = handle.seek(0, os.SEEK_END)
    if end >= size:
        return [] if end > size else [Problem(shard, "the two zero blocks that end a tar are "
                                              "missing")]
    block = _pread(handle, BLOCK, end)
    if block.count(0) != len(block):
        if len(block) < BLOCK:
            return [Problem(shard, f"cut off inside a tar header at offset {end}")]
        lost = {key for key, row in rows.items() if key not in seen and row["offset"] >= end}
        seen.update(lost)
        return [Problem(shard, f"damaged tar header at offset {end}; the {len(lost)} samples "
                        "from there on could not be read")]
    if size - end < TAR_END_SIZE:
        return [Problem(shard, f"the tar's end is cut: {size - end} of the {TAR_END_SIZE} zero "
                        "bytes that end a tar")]
    for start in range(end + TAR_END_SIZE, size, TAIL_CHUNK):
        chunk = _pread(handle, TAIL_CHUNK, start)
        if chunk.count(0) != len(chunk):
            return [Problem(shard, f"{size - end - TAR_END_SIZE} bytes after the end of the tar "
                            f"(offset {end + TAR_END_SIZE}) are not all zeros")]
    return []


def _check_sample(shard: str, key: str, offset: int, end: int, members: dict[str, bytes],
                  row: dict | None, profile: DatasetProfile) -> list[Problem]:
    """One sample (its members' payloads, spanning `offset` to `end` in the shard) against its
    manifest row."""
    where = f"{shard}:{key}"
    if row is None:
        return [Problem(where, "sample in the shard is not in the manifest")]
    problems = []
    if not SAFE_KEY.fullmatch(key):
        problems.append(Problem(where, "key breaks the key rules ([A-Za-z0-9_-]{1,80})"))
    images = (set(profile.image_extensions.values()) | WRITTEN_EXTS) & members.keys()
    if set(members) != {row["image_ext"], "json", "cls"} or len(images) != 1:
        problems.append(Problem(where, f"members are {sorted(members)}, expected "
                                f"{row['image_ext']}, json, cls"))
        return problems
    if offset != row["offset"]:
        problems.append(Problem(where, f"found at offset {offset}, manifest says {row['offset']}"))
    if end - offset != row["sample_bytes"]:
        problems.append(Problem(where, f"sample takes {end - offset} bytes in the shard, "
                                f"manifest says {row['sample_bytes']}"))
    image, label = members[row["image_ext"]], members["json"]
    for what, payload, size, crc in (("image", image, row["image_bytes"], row["crc32"]),
                                     ("label", label, row["label_bytes"], row["label_crc32"])):
        if len(payload) != size:
            problems.append(Problem(where, f"{what} is {len(payload)} bytes, manifest says {size}"))
        if deflate.crc32(payload) != crc:
            problems.append(Problem(where, f"{what} crc32 differs from the manifest"))
    if members["cls"] != class_bytes(row["label"]):
        problems.append(Problem(where, f".cls is {members['cls']!r}, manifest label is "
                                f"{row['label']}"))
    try:
        fields = parse_fields(profile, label)
        if fields.label != row["label"] or fields.group != row["group"]:
            problems.append(Problem(where, "label JSON disagrees with the manifest "
                                    "(class or group)"))
    except BadLabel as error:
        problems.append(Problem(where, f"label JSON unreadable: {error}"))
    return problems


def _check_leakage(rows: list[dict], profile: DatasetProfile) -> list[Problem]:
    splits_of_group: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        splits_of_group[row["group"]].add(row["split"])
    return [Problem(f"{profile.group_noun} {group}", f"appears in several splits: {sorted(splits)}")
            for group, splits in sorted(splits_of_group.items()) if len(splits) > 1]


def _check_counts(rows: list[dict], summary: dict) -> list[Problem]:
    problems = []
    for split in SPLITS:
        count = sum(row["split"] == split for row in rows)
        expected = summary["splits"][split]["samples"]
        if count != expected:
            problems.append(Problem(f"split {split}", f"manifest has {count} samples, "
                                    f"summary.json says {expected}"))
    return problems
