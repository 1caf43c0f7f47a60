"""The main job, stage after stage: sources → labels/pairing → split → plan → write → manifest.

Planning holds member locations and parsed label fields only, never payloads; writing streams one
shard at a time. This module owns the output folder: what may be written there and removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .archives.reader import ArchiveReader
from .archives.zipdir import Index
from .errors import NotEnoughSpace, RunFailed, UsageError
from .output.manifest import (
    is_shardify_manifest,
    is_shardify_summary,
    manifest_table,
    rejects_table,
    summary_beside,
    write_json,
    write_parquet,
    write_wids_indexes,
)
from .output.store import shard_name
from .pathnames import path_text
from .plan.pairing import Pairing
from .plan.shards import PlannedShard, ShardSizes, plan_shards
from .plan.split import SPLITS, assign_splits, group_strata
from .profiles import DatasetProfile, get_profile
from .progress import Progress, human_bytes
from .rejects import Reject
from .resume import (
    RunRecord,
    append_journal,
    claim_output,
    is_shardify_output,
    journaled_shards,
    plan_fingerprint,
    read_run,
    reset_journal,
    start_run,
)
from .scan import archive_table, survey
from .write import TAR_END_SIZE, ShardResult, expand, sample_tar_size, worker_pool, write_shards

OWN_FILES = ("manifest.parquet", "rejects.parquet", "summary.json",
             *(f"{split}.wids.json" for split in SPLITS))
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
MANIFEST_ROW_BYTES = 256  # a generous estimate of a manifest row, for the disk check


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `shardify convert` was asked to do (`split` is the ratios as typed)."""

    sources: list[str]
    out: Path
    shard_size: int
    split: str
    ratios: tuple[float, float, float]
    seed: int = 0
    manifest: Path | None = None
    strict: bool = False
    quiet: bool = False
    overwrite: bool = False
    space_check: bool = True
    workers: int = 1
    profile: DatasetProfile = field(default_factory=get_profile)

    def shaping(self) -> dict:
        """The options that decide the shards' bytes; a resumed run must use the same."""
        return {"shard_size": self.shard_size, "split": list(self.ratios), "seed": self.seed,
                "profile": f"{self.profile.name} {self.profile.version}"}


@dataclass
class ConvertReport:
    """What a run did: enough for the console summary and the exit code."""

    out: Path
    summary: dict
    rejects: list[Reject] = field(default_factory=list)
    seconds: float = 0.0
    resumed_shards: int = 0


def convert(options: ConvertOptions) -> ConvertReport:
    """Plan, then write the shards not already finished by an earlier run of the same plan."""
    started = time.monotonic()
    out = options.out
    _check_output_folder(out, options.sources)
    _check_manifest_path(options.manifest, options.sources)
    lock = None
    try:
        with worker_pool(options.workers) as pool, ArchiveReader() as reader:
            profile = options.profile
            index, pairing = survey(options.sources, reader, profile, quiet=options.quiet)
            rejects = index.rejects + pairing.all_rejects()
            split_of_group = assign_splits(group_strata(pairing.samples, profile),
                                           options.ratios, options.seed)
            shards = plan_shards(pairing.samples, split_of_group, options.shard_size, profile,
                                 ShardSizes(sample_tar_size, TAR_END_SIZE), shard_name)
            run = RunRecord(plan_fingerprint(shards, options.shaping()), options.shaping())
            finished = _reusable_shards(out, run, shards, options.overwrite)
            todo = [shard for shard in shards if shard.name not in finished]
            if options.space_check:
                _check_space(out, todo, len(pairing.samples))
            lock = _claim(out)
            _prepare_output_folder(out, run, shards, finished)
            results = _write_shards(shards, finished, options, pool)
    finally:
        if lock is not None:
            _remove_partial_shards(out)  # after the workers are gone: none can be writing
            os.close(lock)

    rejects += [reject for result in results for reject in result.rejects]
    summary = _summary(options, index, pairing, results, rejects)
    del index, pairing, shards  # the results hold what the manifest needs
    try:
        _write_index_files(options, results, rejects, summary)
    except OSError as error:
        if error.errno in DISK_FULL:
            raise NotEnoughSpace(f"disk full on {path_text(out)} while writing the manifest: "
                                 "all shards are complete; free some space and re-run the same "
                                 "command") from None
        raise
    return ConvertReport(out, summary, rejects, time.monotonic() - started, len(finished))


def _write_index_files(options: ConvertOptions, results: list[ShardResult],
                       rejects: list[Reject], summary: dict) -> None:
    """Manifest, rejects and summary, each atomically; summary.json last, as the sign of done."""
    manifest = manifest_table(results, options.profile)
    write_parquet(rejects_table(rejects), options.out / "rejects.parquet")
    write_parquet(manifest, options.out / "manifest.parquet")
    write_wids_indexes(options.out, {result.name: len(result.samples) for result in results})
    if options.manifest is not None:
        write_parquet(manifest, options.manifest)
        write_json(summary, summary_beside(options.manifest))
    write_json(summary, options.out / "summary.json")


def _write_shards(shards: list[PlannedShard], finished: dict[str, ShardResult],
                  options: ConvertOptions, pool: ProcessPoolExecutor | None
                  ) -> list[ShardResult]:
    """Write the unfinished shards (in parallel), journaling each; results in plan order."""
    expected = {shard.name: shard.expected_bytes for shard in shards}
    samples = {shard.name: shard.samples for shard in shards}
    progress = Progress(sum(expected.values()), "B", "writing shards", enabled=not options.quiet)
    progress.advance(sum(expected[name] for name in finished))
    results = dict(finished)
    # Largest first: the last shards to finish are small, so workers end together.
    jobs = [(shard.name, shard.samples) for shard in sorted(
        shards, key=lambda s: -s.expected_bytes) if shard.name not in finished]

    def published(entry: dict) -> None:
        """A shard is in place (called by the one publishing thread): journal it first."""
        append_journal(options.out, entry)
        results[entry["shard"]] = expand(samples[entry["shard"]], entry)
        progress.advance(expected[entry["shard"]])

    try:
        write_shards(jobs, options.out, pool, published, options.workers)
    except BrokenProcessPool:
        raise RunFailed(f"a worker process died (killed, or out of memory?); {len(results)} of "
                        f"{len(shards)} shards are complete and kept: re-run the same command "
                        "to resume") from None
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        needed = sum(size for name, size in expected.items() if name not in results)
        raise NotEnoughSpace(
            f"disk full on {path_text(options.out)}: {len(results)} of {len(shards)} shards are "
            f"complete and kept; about {human_bytes(needed)} more is needed "
            f"({human_bytes(_free_bytes(options.out))} free). Free some space and re-run the "
            "same command to resume") from None
    finally:
        progress.close()
    return [results[shard.name] for shard in shards]


def _reusable_shards(out: Path, run: RunRecord, shards: list[PlannedShard],
                     overwrite: bool) -> dict[str, ShardResult]:
    """Finished shards of an earlier run of the same plan; refuse a different earlier run."""
    previous = read_run(out)
    if previous is None or overwrite:
        return {}
    if previous.fingerprint != run.fingerprint:
        raise UsageError(f"{path_text(out)} holds shards of another conversion "
                         f"({_what_changed(previous, run)}); re-run with --overwrite to "
                         "discard them, or choose another --out")
    return journaled_shards(out, shards)


def _what_changed(previous: RunRecord, run: RunRecord) -> str:
    """`seed 0 -> 1`-style differences in the options, or that the inputs differ."""
    changed = [f"{key} {previous.options.get(key)} -> {value}"
               for key, value in run.options.items() if previous.options.get(key) != value]
    return ", ".join(changed) if changed else "the inputs differ: other archives or members"


def _check_space(out: Path, todo: list[PlannedShard], samples: int) -> None:
    """Stop before writing anything if OUT's filesystem cannot hold what is left to write."""
    needed = sum(shard.expected_bytes for shard in todo) + samples * MANIFEST_ROW_BYTES
    free = _free_bytes(out)
    if needed > free:
        raise NotEnoughSpace(f"not enough space on {path_text(out)}: the output needs about "
                             f"{human_bytes(needed)}, {human_bytes(free)} is free "
                             "(--no-space-check to try anyway)")


def _free_bytes(out: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) OUT."""
    return shutil.disk_usage(_nearest_existing(out)).free


def _check_output_folder(out: Path, sources: list[str]) -> None:
    """Refuse an OUT inside a source folder, or a non-empty one that shardify did not write."""
    resolved = out.resolve()
    for source in sources:
        source_path = Path(os.path.realpath(source))  # a link loop: said by find_archives
        if source_path.is_dir() and resolved.is_relative_to(source_path):
            raise UsageError(f"--out {path_text(out)} is inside the source folder "
                             f"{path_text(source)}; sources are only ever read")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path_text(out)} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_shardify_output(out):
        raise UsageError(f"--out {path_text(out)} is not empty and is not a shardify output; "
                         "choose a new or empty folder")
    _check_writable(out, "--out")


def _check_manifest_path(manifest: Path | None, sources: list[str]) -> None:
    """Refuse, before any work, a --manifest PATH (or its summary beside it) that would replace
    a source, land in a SOURCE folder, or replace anything but a file shardify wrote there."""
    if manifest is None:
        return
    option = f"--manifest {path_text(manifest)}"
    if manifest.is_dir():
        raise UsageError(f"{option} is a folder; give a file name, "
                         "e.g. manifests/aihub-71687.parquet")
    for path, ours, what in ((manifest, is_shardify_manifest, "a manifest"),
                             (summary_beside(manifest), is_shardify_summary, "a summary")):
        shown = path_text(path)
        _check_outside_sources(path, sources, f"{option}: {shown}")
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue  # new (or a dangling link, which the rename replaces)
        except OSError as error:
            raise UsageError(f"{option}: {shown}: {error.strerror}") from None
        if not stat.S_ISREG(mode):
            raise UsageError(f"{option}: {shown} exists and is not a regular file")
        if not ours(path):
            raise UsageError(f"{option}: {shown} exists and is not {what} shardify wrote; "
                             "remove it or choose another path")
    _check_writable(manifest.parent, "--manifest")


def _check_outside_sources(path: Path, sources: list[str], said: str) -> None:
    """Neither where `path` lands (its folder resolved) nor what it points to is a SOURCE or
    inside a SOURCE folder; `said` starts the message."""
    places = {Path(os.path.realpath(path.parent)) / path.name, Path(os.path.realpath(path))}
    for source in sources:
        source_path = Path(os.path.realpath(source))  # realpath: a link loop is no traceback
        if source_path in places:
            raise UsageError(f"{said} is the source {path_text(source)}; "
                             "sources are only ever read")
        if source_path.is_dir() and any(place.is_relative_to(source_path) for place in places):
            raise UsageError(f"{said} is inside the source folder {path_text(source)}; "
                             "sources are only ever read")


def _nearest_existing(path: Path) -> Path:
    """`path`, or the closest folder above it that exists (OUT may not be created yet)."""
    existing = path.resolve()
    while not existing.exists():
        existing = existing.parent
    return existing


def _check_writable(path: Path, option: str) -> None:
    """Fail now, not after hours of work, if `path` (or its nearest existing parent) is read-only.
    """
    existing = _nearest_existing(path)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path_text(path)}: {path_text(existing)} is not writable")


def _claim(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    try:
        return claim_output(out)
    except BlockingIOError:
        raise UsageError(f"another shardify convert is writing to {path_text(out)}; wait for "
                         "it, or choose another --out") from None


def _remove_partial_shards(out: Path) -> None:
    for split in SPLITS:
        for path in (out / split).glob(".shard-*.tar.partial"):
            path.unlink(missing_ok=True)


def _prepare_output_folder(out: Path, run: RunRecord, shards: list[PlannedShard],
                           finished: dict[str, ShardResult]) -> None:
    """Own OUT for this run: remove what shardify wrote there that this run will not keep.

    Only shardify's own files are touched: shard files, their partial files, the index files.
    """
    if not finished:
        reset_journal(out)
    start_run(out, run)
    for name in OWN_FILES:
        (out / name).unlink(missing_ok=True)
        (out / f".{name}.partial").unlink(missing_ok=True)
    for split in SPLITS:
        folder = out / split
        if not folder.is_dir():
            continue
        for path in [*folder.glob("shard-*.tar"), *folder.glob(".shard-*.tar.partial")]:
            if path.relative_to(out).as_posix() not in finished:
                path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def _summary(options: ConvertOptions, index: Index, pairing: Pairing,
             results: list[ShardResult], rejects: list[Reject]) -> dict:
    """Per split counts and shard names, reject counts, and the options: no times, no hosts."""
    profile = options.profile
    splits: dict[str, dict] = {}
    for split in SPLITS:
        mine = [r for r in results if r.split == split]
        labels = Counter(s.fields.label for r in mine for s in r.samples)
        splits[split] = {
            "shards": [r.name for r in mine],
            "samples": labels.total(),
            profile.group_unit: len({s.fields.group for r in mine for s in r.samples}),
            **{name: labels[number] for number, name in enumerate(profile.class_names)},
            "bytes": sum(r.bytes_out for r in mine),
        }
    return {
        "shardify": __version__,
        "options": {
            "sources": list(map(path_text, options.sources)),
            "shard_size": options.shard_size,
            "split": options.split,
            "ratios": list(options.ratios),
            "seed": options.seed,
            "strict": options.strict,
        },
        "splits": splits,
        "samples": sum(s["samples"] for s in splits.values()),
        "rejects": dict(sorted(Counter(str(r.reason) for r in rejects).items())),
        "ignored_members": pairing.ignored,
        "other_files": dict(sorted(pairing.other_files.items())),
        "identical_duplicates": pairing.identical_duplicates,
        "archives": archive_table(index),
        "bytes_in": sum(a.size for a in index.archives if a.parent is None
                        and not a.kind.startswith("nested")),
        "bytes_out": sum(s["bytes"] for s in splits.values()),
    }
