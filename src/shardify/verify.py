"""Read a shardify output back and check it against its own manifest and summary.

It uses `tarfile` (an independent reader, not the writer's code) and streams every shard once:
structure, sample adjacency, manifest offsets, sizes and CRCs, class labels, battery leakage and
the counts in summary.json.
"""

from __future__ import annotations

import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import deflate
import orjson
import pyarrow as pa

from .labels import BOM, BadLabel, parse_label
from .manifest import read_parquet
from .pairing import SAFE_KEY
from .pathnames import path_text
from .sources import ArchiveReader, find_archives
from .split import SPLITS
from .zipindex import index_archives

IMAGE_EXTS = frozenset({"jpg", "png"})
BOM_CRC = deflate.crc32(BOM)


@dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


class OutputMissing(Exception):
    """OUT lacks the manifest or summary, so there is nothing to verify against."""


def verify_output(out: Path, sources: list[str] | None = None) -> tuple[int, list[Problem]]:
    """(samples checked, problems found) for the output folder `out`.

    With `sources` (the SOURCE arguments given to convert), every sample is also compared with
    its source members: image and label size and CRC-32 from the zips' central directories.
    """
    manifest_path, summary_path = out / "manifest.parquet", out / "summary.json"
    for path in (manifest_path, summary_path):
        if not path.is_file():
            raise OutputMissing(f"{path_text(path)} not found: is {path_text(out)} a shardify "
                                "output?")
    try:
        rows = read_parquet(manifest_path).to_pylist()
        summary = orjson.loads(summary_path.read_bytes())
        if not all(isinstance(summary["splits"][split]["shards"], list)
                   and isinstance(summary["splits"][split]["samples"], int) for split in SPLITS):
            raise KeyError("splits")
    except (pa.ArrowException, orjson.JSONDecodeError, KeyError, TypeError) as error:
        raise OutputMissing(f"{path_text(out)}: manifest.parquet or summary.json is damaged "
                            f"({error!r}); re-run the convert command to rewrite them"
                            ) from None
    expected = {row["shard"]: {} for row in rows}
    for row in rows:
        expected[row["shard"]][row["key"]] = row
    problems = _check_shard_files(out, summary, expected)
    label_crcs: dict[tuple[str, str], tuple[int, int]] = {}
    for shard in sorted(expected):
        if (out / shard).is_file():
            problems += _check_shard(out / shard, shard, expected[shard], label_crcs)
    problems += _check_leakage(rows)
    problems += _check_counts(rows, summary)
    if sources is not None:
        problems += _check_sources(rows, sources, label_crcs)
    return len(rows), problems


def _check_sources(rows: list[dict], sources: list[str],
                   label_crcs: dict[tuple[str, str], tuple[int, int]]) -> list[Problem]:
    """Each sample's image and label against the source members' size and CRC-32."""
    with ArchiveReader() as reader:
        index = index_archives(find_archives(sources).archives, reader)
    members = {(m.archive.name, m.name): m for table in index.tables for m in table.members()}
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
        if (image.file_size, image.crc32) != (row["image_bytes"], row["crc32"]):
            problems.append(Problem(where, f"image differs from its source member "
                                    f"{row['source_archive']}:{row['source_member']}"))
        found = label_crcs.get((row["shard"], row["key"]))
        if found is not None and label.crc32 not in found:
            problems.append(Problem(where, f"label differs from its source member "
                                    f"{row['label_archive']}:{row['label_member']}"))
    return problems


def _check_shard_files(out: Path, summary: dict, expected: dict) -> list[Problem]:
    listed = {name for split in SPLITS for name in summary["splits"][split]["shards"]}
    present = {p.relative_to(out).as_posix() for split in SPLITS
               for p in (out / split).glob("shard-*.tar")}
    problems = [Problem(name, "shard file is missing") for name in sorted(listed - present)]
    problems += [Problem(name, "extra shard file not in summary.json")
                 for name in sorted(present - listed)]
    problems += [Problem(name, "manifest names a shard that summary.json does not list")
                 for name in sorted(set(expected) - listed)]
    return problems


def _check_shard(path: Path, shard: str, rows: dict[str, dict],
                 label_crcs: dict[tuple[str, str], tuple[int, int]]) -> list[Problem]:
    """Stream one shard: structure, adjacency, and each sample against its manifest row.

    Records each label's CRC-32, without and with a BOM, for the comparison with the sources.
    """
    problems: list[Problem] = []
    seen: set[str] = set()
    current_key: str | None = None
    members: dict[str, bytes] = {}
    first_offset = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if not info.isfile() or info.pax_headers or "/" in info.name:
                    problems.append(Problem(f"{shard}:{key}", f"unexpected member {info.name!r}"))
                    continue
                if key != current_key:
                    if current_key is not None:
                        problems += _check_sample(shard, current_key, first_offset, members,
                                                  rows.get(current_key))
                    if key in seen:
                        problems.append(Problem(f"{shard}:{key}", "members are not adjacent"))
                    seen.add(key)
                    current_key, members, first_offset = key, {}, info.offset
                extracted = tar.extractfile(info)
                members[ext] = extracted.read() if extracted else b""
                if ext == "json":
                    label_crcs[(shard, key)] = (deflate.crc32(members[ext]),
                                                deflate.crc32(members[ext], BOM_CRC))
            if current_key is not None:
                problems += _check_sample(shard, current_key, first_offset, members,
                                          rows.get(current_key))
    except (tarfile.TarError, OSError, EOFError) as error:
        problems.append(Problem(shard, f"not a readable tar: {error}"))
    problems += [Problem(f"{shard}:{key}", "in the manifest but not in the shard")
                 for key in sorted(rows.keys() - seen)]
    return problems


def _check_sample(shard: str, key: str, offset: int, members: dict[str, bytes],
                  row: dict | None) -> list[Problem]:
    where = f"{shard}:{key}"
    if row is None:
        return [Problem(where, "sample in the shard is not in the manifest")]
    problems = []
    if not SAFE_KEY.fullmatch(key):
        problems.append(Problem(where, "key breaks the key rules ([A-Za-z0-9_-]{1,80})"))
    images = IMAGE_EXTS & members.keys()
    if set(members) != {row["image_ext"], "json", "cls"} or len(images) != 1:
        problems.append(Problem(where, f"members are {sorted(members)}, expected "
                                f"{row['image_ext']}, json, cls"))
        return problems
    if offset != row["offset"]:
        problems.append(Problem(where, f"found at offset {offset}, manifest says {row['offset']}"))
    image = members[row["image_ext"]]
    if len(image) != row["image_bytes"]:
        problems.append(Problem(where, f"image is {len(image)} bytes, "
                                f"manifest says {row['image_bytes']}"))
    if deflate.crc32(image) != row["crc32"]:
        problems.append(Problem(where, "image crc32 differs from the manifest"))
    if members["cls"] != str(row["label"]).encode():
        problems.append(Problem(where, f".cls is {members['cls']!r}, manifest label is "
                                f"{row['label']}"))
    try:
        fields = parse_label(members["json"])
        if fields.label != row["label"] or fields.group != row["group"]:
            problems.append(Problem(where, "label JSON disagrees with the manifest "
                                    "(is_normal or battery)"))
    except BadLabel as error:
        problems.append(Problem(where, f"label JSON unreadable: {error}"))
    return problems


def _check_leakage(rows: list[dict]) -> list[Problem]:
    splits_of_group: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        splits_of_group[row["group"]].add(row["split"])
    return [Problem(f"battery {group}", f"appears in several splits: {sorted(splits)}")
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
