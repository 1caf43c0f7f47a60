"""The main job, stage after stage: sources → labels/pairing → split → plan → write → manifest.

Planning holds member locations and parsed label fields only, never payloads; writing streams one
shard at a time. This module owns the output folder: what may be written there and removed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .manifest import manifest_table, rejects_table, write_json, write_parquet
from .pairing import Pairing, Reject, pair_members
from .plan import PlannedShard, plan_shards
from .progress import Progress
from .sources import Archive, ArchiveError, ArchiveReader, Member, find_archives, read_members
from .split import SPLITS, assign_splits
from .write import ShardResult, write_shard

MARKER = ".shardify-output"
OWN_FILES = ("manifest.parquet", "rejects.parquet", "summary.json")


class UsageError(Exception):
    """A problem with the command line or the folders given; reported in one line, exit 2."""


@dataclass(frozen=True)
class ConvertOptions:
    sources: list[str]
    out: Path
    shard_size: int
    split: str
    ratios: tuple[float, float, float]
    seed: int = 0
    manifest: Path | None = None
    strict: bool = False
    quiet: bool = False


@dataclass
class ConvertReport:
    """What a run did: enough for the console summary and the exit code."""

    out: Path
    summary: dict
    rejects: list[Reject] = field(default_factory=list)
    seconds: float = 0.0


def convert(options: ConvertOptions) -> ConvertReport:
    started = time.monotonic()
    try:
        archives = find_archives(options.sources)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    if not archives:
        raise UsageError(f"no zip archives found in: {' '.join(options.sources)}")
    _check_output_folder(options.out, options.sources)

    members, rejects = _list_members(archives)
    with ArchiveReader() as reader:
        pairing = pair_members(members, reader.read)
        if not pairing.images and not pairing.labels:
            unreadable = f" ({len(rejects)} unreadable: {rejects[0].detail})" if rejects else ""
            raise UsageError(f"no images (.jpg/.jpeg/.png) or labels (.json) in the "
                             f"{len(archives)} zip archives found{unreadable}")
        rejects += pairing.rejects
        split_of_group = assign_splits(_groups(pairing), options.ratios, options.seed)
        shards = plan_shards(pairing.samples, split_of_group, options.shard_size)
        _prepare_output_folder(options.out)
        results = _write_shards(shards, options, reader)

    written = [item for result in results for item in result.written]
    rejects += [reject for result in results for reject in result.rejects]
    manifest = manifest_table(written)
    summary = _summary(options, archives, members, pairing, results, rejects)
    write_parquet(rejects_table(rejects), options.out / "rejects.parquet")
    write_parquet(manifest, options.out / "manifest.parquet")
    if options.manifest is not None:
        write_parquet(manifest, options.manifest)
        write_json(summary, options.manifest.with_suffix(".summary.json"))
    write_json(summary, options.out / "summary.json")
    return ConvertReport(options.out, summary, rejects, time.monotonic() - started)


def _list_members(archives: list[Archive]) -> tuple[list[Member], list[Reject]]:
    members: list[Member] = []
    rejects: list[Reject] = []
    for archive in archives:
        try:
            members += read_members(archive)
        except ArchiveError as error:
            rejects.append(Reject("", "bad-archive", archive.name, "", str(error)))
    return members, rejects


def _groups(pairing: Pairing) -> list[tuple[str, str, bool]]:
    """(group, data_type, has_defect) per battery, for the stratified split."""
    has_defect: dict[str, bool] = {}
    data_type: dict[str, str] = {}
    for sample in pairing.samples:
        group = sample.fields.group
        data_type[group] = sample.fields.data_type
        has_defect[group] = has_defect.get(group, False) or sample.fields.label == 1
    return [(group, data_type[group], has_defect[group]) for group in sorted(data_type)]


def _write_shards(shards: list[PlannedShard], options: ConvertOptions,
                  reader: ArchiveReader) -> list[ShardResult]:
    total_bytes = sum(shard.expected_bytes for shard in shards)
    total_samples = sum(len(shard.samples) for shard in shards)
    progress = Progress(total_bytes, total_samples, enabled=not options.quiet)
    results: list[ShardResult] = []
    try:
        for shard in shards:
            results.append(write_shard(shard.name, shard.samples, options.out, reader))
            progress.advance(shard.expected_bytes, len(shard.samples))
    finally:
        progress.close()
    return results


def _check_output_folder(out: Path, sources: list[str]) -> None:
    """Refuse an OUT inside a source folder, or a non-empty one that shardify did not write."""
    resolved = out.resolve()
    for source in sources:
        source_path = Path(source).resolve()
        if source_path.is_dir() and resolved.is_relative_to(source_path):
            raise UsageError(f"--out {out} is inside the source folder {source}; "
                             "sources are only ever read")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UsageError(f"--out {out} is not empty and is not a shardify output; "
                         "choose a new or empty folder")


def _prepare_output_folder(out: Path) -> None:
    """Mark OUT as shardify's and remove what an earlier run wrote there (only that)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("This folder is written by shardify; it may replace its files.\n")
    for name in OWN_FILES:
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        folder = out / split
        if not folder.is_dir():
            continue
        for path in folder.glob("shard-*.tar"):
            path.unlink()
        for path in folder.glob(".shard-*.tar.partial"):
            path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def _summary(options: ConvertOptions, archives: list[Archive], members: list[Member],
             pairing: Pairing, results: list[ShardResult], rejects: list[Reject]) -> dict:
    """Per split counts and shard names, reject counts, and the options: no times, no hosts."""
    splits: dict[str, dict] = {}
    for split in SPLITS:
        mine = [r for r in results if r.name.startswith(f"{split}/")]
        rows = [w for r in mine for w in r.written]
        splits[split] = {
            "shards": [r.name for r in mine],
            "samples": len(rows),
            "batteries": len({w.sample.fields.group for w in rows}),
            "normal": sum(w.sample.fields.label == 0 for w in rows),
            "defect": sum(w.sample.fields.label == 1 for w in rows),
            "bytes": sum(r.bytes_out for r in mine),
        }
    members_per_archive = Counter(m.archive.name for m in members)
    archive_bytes = {a.name: a.path.stat().st_size for a in archives}
    return {
        "shardify": __version__,
        "options": {
            "sources": options.sources,
            "shard_size": options.shard_size,
            "split": options.split,
            "ratios": list(options.ratios),
            "seed": options.seed,
            "strict": options.strict,
        },
        "splits": splits,
        "samples": sum(s["samples"] for s in splits.values()),
        "rejects": dict(sorted(Counter(r.reason for r in rejects).items())),
        "ignored_members": pairing.ignored,
        "other_files": dict(sorted(pairing.other_files.items())),
        "identical_duplicates": pairing.identical_duplicates,
        "archives": [
            {"name": a.name, "bytes": archive_bytes[a.name], "members": members_per_archive[a.name]}
            for a in archives
        ],
        "bytes_in": sum(archive_bytes.values()),
        "bytes_out": sum(s["bytes"] for s in splits.values()),
    }
