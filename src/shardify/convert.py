"""The main job, stage after stage: sources → labels/pairing → split → plan → write → manifest.

Planning holds member locations and parsed label fields only, never payloads; writing streams one
shard at a time. This module owns the output folder: what may be written there and removed.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .manifest import manifest_table, rejects_table, write_json, write_parquet
from .pairing import Pairing, pair_members
from .plan import PlannedShard, plan_shards
from .progress import Progress
from .sources import SUPPORTED_METHODS, ArchiveReader, Reject, find_archives
from .split import SPLITS, assign_splits
from .write import ShardResult, write_shard
from .zipindex import Index, index_archives

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
    _check_output_folder(options.out, options.sources)
    with ArchiveReader() as reader:
        index, pairing = survey(options.sources, reader)
        rejects = index.rejects + pairing.rejects
        split_of_group = assign_splits(_groups(pairing), options.ratios, options.seed)
        shards = plan_shards(pairing.samples, split_of_group, options.shard_size)
        _prepare_output_folder(options.out)
        results = _write_shards(shards, options, reader)

    written = [item for result in results for item in result.written]
    rejects += [reject for result in results for reject in result.rejects]
    manifest = manifest_table(written)
    summary = _summary(options, index, pairing, results, rejects)
    write_parquet(rejects_table(rejects), options.out / "rejects.parquet")
    write_parquet(manifest, options.out / "manifest.parquet")
    if options.manifest is not None:
        write_parquet(manifest, options.manifest)
        write_json(summary, options.manifest.with_suffix(".summary.json"))
    write_json(summary, options.out / "summary.json")
    return ConvertReport(options.out, summary, rejects, time.monotonic() - started)


def survey(sources: list[str], reader: ArchiveReader) -> tuple[Index, Pairing]:
    """Find and list every archive, read the labels and pair: everything but the image bytes.

    Raises UsageError when there is nothing to convert, saying what was found instead.
    """
    try:
        discovery = find_archives(sources)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    if not discovery.archives and not discovery.rejects:
        raise UsageError(f"no zip archives (.zip, .zip.partN, .z01, .tar) found in: "
                         f"{' '.join(sources)}")
    index = index_archives(discovery.archives, reader)
    index.rejects[:0] = discovery.rejects
    pairing = pair_members(index.members, reader.read)
    if not pairing.images and not pairing.labels:
        unreadable = (f" ({len(index.rejects)} unreadable: {index.rejects[0].detail})"
                      if index.rejects else "")
        raise UsageError(f"no images (.jpg/.jpeg/.png) or labels (.json) in the "
                         f"{len(index.archives)} zip archives found{unreadable}")
    return index, pairing


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


def _summary(options: ConvertOptions, index: Index, pairing: Pairing,
             results: list[ShardResult], rejects: list[Reject]) -> dict:
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
        "archives": archive_table(index),
        "bytes_in": sum(a.size for a in index.archives if a.parent is None
                        and not a.kind.startswith("nested")),
        "bytes_out": sum(s["bytes"] for s in splits.values()),
    }


def archive_table(index: Index) -> list[dict]:
    """Per archive: kind, bytes, members, methods and notes (truncation, wrong order, ...)."""
    members = Counter(m.archive.name for m in index.members)
    methods: dict[str, Counter[str]] = defaultdict(Counter)
    for member in index.members:
        methods[member.archive.name][SUPPORTED_METHODS.get(member.method, str(member.method))] += 1
    return [
        {"name": a.name, "kind": a.kind, "bytes": a.size, "members": members[a.name],
         "methods": dict(sorted(methods[a.name].items())), "notes": list(a.notes)}
        for a in index.archives
    ]
