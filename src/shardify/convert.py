"""The main job, stage after stage: sources -> pairing -> split -> plan -> write -> manifest.

Planning holds member locations and parsed label fields only, never payloads; writing streams one
shard at a time through an executor; the output store owns every file in OUT. This module puts
the stages in order, checks the command's paths before any work, and sums the run up.
"""

from __future__ import annotations

import functools
import importlib
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .archives.reader import ArchiveReader
from .archives.zipdir import Index
from .consume import (
    Consumption,
    SavedPlan,
    consumption_plan_text,
    dump_plan,
    load_plan,
    on_drive,
    releases_begun,
    resolved_sources,
    start_consuming,
)
from .errors import DISK_FULL, NotEnoughSpace, RunFailed, SourceUnreadable, UsageError
from .output.remote import RemoteOutputStore
from .output.store import (
    CARD,
    CONSUMED,
    MANIFEST,
    REJECTS,
    SUMMARY,
    OutputStore,
    RunRecord,
    Store,
    continuation_name,
    is_shardify_manifest,
    is_shardify_summary,
    json_bytes,
    nearest_existing,
    output_store,
    shard_name,
    summary_beside,
    write_atomically,
    write_parquet_atomically,
)
from .pathnames import path_text
from .plan.fingerprint import plan_fingerprint
from .plan.pairing import Pairing, Sample
from .plan.release import peak_growth, release_order
from .plan.shards import SHARD_KINDS, PlannedShard, ShardSizes, continued, plan_shards
from .plan.split import SPLITS, assign_splits, group_strata
from .profiles import DatasetProfile
from .profiles.load import get_profile
from .progress import Progress, human_bytes
from .rejects import Reject
from .scan import archive_table, survey
from .storage import Location, is_url, location
from .transform.estimate import PROBES_PER_JOB, Ratios, probe_samples, size_ratios
from .transform.options import TransformOptions
from .write.executor import UNPUBLISHED_PER_WORKER, Executor, Inline, local_executor, write_shards
from .write.label_types import NULL, merge
from .write.shard import (
    CROP_BOX,
    UNMAPPED,
    Made,
    ShardJob,
    ShardResult,
    expand,
    probe_sizes,
    shard_job,
)
from .write.tar import TAR_END_SIZE, estimated_sample_bytes, planned_sample_bytes

MANIFEST_ROW_BYTES = 256  # a generous estimate of a manifest row, for the disk check
STATE_ROW_BYTES = 384  # a sample's share of a consuming run's saved plan and journal (~290)
OUTPUT_TABLES = "shardify.output.manifest"


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `shardify convert` was asked to do (`split` is the ratios as typed)."""

    sources: list[str]
    out: Location  # a folder, or an fsspec URL (output.remote)
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
    profile_spec: str = "battery"  # how --profile named it: a built-in name or a file's path
    transform: TransformOptions = field(default_factory=TransformOptions)
    consume_sources: bool = False
    confirm: Callable[[str], bool] | None = None  # asked before consuming; None: agreed
    storage_options: dict[str, object] = field(default_factory=dict)  # --storage-option
    executor: str = "local"  # "local": forked worker processes; "ray": one Ray task per shard
    ray_address: str | None = None  # the Ray cluster to run on; None: a local Ray is started

    def shaping(self) -> dict:
        """The options that decide the shards' bytes; a resumed run must use the same."""
        return {"shard_size": self.shard_size, "split": list(self.ratios), "seed": self.seed,
                "profile": f"{self.profile.name} {self.profile.version}",
                "profile_options": dict(self.profile.option_values),
                "shard_kinds": SHARD_KINDS, **self.transform.shaping()}


@dataclass
class ConvertReport:
    """What a run did: enough for the console summary and the exit code."""

    out: Location
    summary: dict
    group_unit: str  # the summary's key for the groups' count ("batteries")
    rejects: list[Reject] = field(default_factory=list)
    seconds: float = 0.0
    resumed_shards: int = 0
    consumed: dict | None = None  # what --consume-sources released and kept (consumed.json)


def convert(options: ConvertOptions) -> ConvertReport:
    """Plan, then write the shards not already finished by an earlier run of the same plan."""
    started = time.monotonic()
    out, profile = options.out, options.profile
    store = output_store(out, options.storage_options)
    if options.consume_sources and not isinstance(store, OutputStore):
        raise UsageError(f"--consume-sources needs a local --out (it deletes each source once "
                         f"its shards are durable on the same drive), not {store.shown}")
    for source in options.sources:  # a bad URL is said now, and its storage backend imported
        location(source, options.storage_options)  # once, before the workers fork: not in each
    _check_output_folder(store, options.sources)
    _check_manifest_path(options.manifest, options.sources, out)
    if options.transform.crop and not profile.geometry.outline:
        raise UsageError(f"--crop {options.transform.crop}: profile {profile.name} declares no "
                         "outline to crop to (its geometry.outline is empty), so every image "
                         "would be kept whole")
    if options.consume_sources and options.transform.active:
        raise UsageError("--consume-sources keeps every source byte in the shards: it cannot be "
                         "combined with --crop, --resize, --format or --quality (the originals "
                         "would be lost)")
    remote = next(filter(is_url, options.sources), None)
    if options.consume_sources and remote is not None:
        raise UsageError(f"--consume-sources deletes local source files only; {remote} is in "
                         "remote storage, whose objects shardify never deletes")
    release: Callable[[], None] | None = None
    consumption: Consumption | None = None
    try:
        with _executor(options) as pool, ArchiveReader() as reader:
            from .output.manifest import check_columns  # pyarrow: imported after the fork

            check_columns(profile)
            saved = _saved_plan(store, options)
            if saved is None:
                index, pairing, shards, probed = _plan(
                    options, reader, pool or Inline(reader), absolute=options.consume_sources)
            else:
                index, pairing, shards, probed = saved.index, saved.pairing, saved.shards, {}
            rejects = index.rejects + pairing.all_rejects()
            run = RunRecord(plan_fingerprint(shards, options.shaping()), options.shaping())
            finished, continuations = _reusable_shards(store, run, shards, options.overwrite)
            shards = _with_continuations(shards, continuations)
            todo = [shard for shard in shards if shard.name not in finished]
            if isinstance(store, OutputStore) and (options.consume_sources or saved is not None):
                consumption = start_consuming(store, index, pairing, shards, finished,
                                              options.consume_sources,
                                              saved.identities if saved else None)
            if options.consume_sources and consumption is not None:
                todo = release_order(consumption.plan, todo, set(finished))
                _agree_to_consume(options, consumption, todo,
                                  len(pairing.samples),
                                  sum(result.bytes_out for result in finished.values()),
                                  pool.workers if pool else 1)
                reader.close_files()  # the survey's descriptors: a deleted source frees now
            elif options.space_check and isinstance(store, OutputStore):  # object storage: none
                _check_space(store, todo, len(pairing.samples))
            release = store.claim()
            store.start_run(run, keep_journal=bool(finished) or saved is not None)
            if options.consume_sources and saved is None and consumption is not None:
                consumption.store.save_plan(functools.partial(dump_plan, SavedPlan(
                    __version__, resolved_sources(options.sources), options.shaping(), index,
                    pairing, shards, consumption.identities)))
            store.prepare(keep=set(finished))
            if consumption is not None:
                consumption.release_ready()
            results = _write_shards(shards, finished, options, store, pool or Inline(reader),
                                    probed, todo if options.consume_sources else None,
                                    consumption.published if consumption else None)
    finally:
        if release is not None:
            store.remove_staged_shards()  # after the workers are gone: none can be writing
            release()

    rejects += [reject for result in results for reject in result.rejects]
    summary = _summary(options, index, pairing, results, rejects)
    del index, pairing, shards  # the results hold what the manifest needs
    consumed = consumption.outcome() if consumption is not None else None
    try:
        _write_index_files(options, store, results, rejects, summary, consumed)
    except OSError as error:
        if error.errno in DISK_FULL:
            raise NotEnoughSpace(f"disk full on {store.disk} while writing the manifest: "
                                 "all shards are complete; free some space and re-run the same "
                                 "command") from None
        raise
    return ConvertReport(out, summary, profile.group_unit, rejects, time.monotonic() - started,
                         len(finished), consumed)


def _executor(options: ConvertOptions) -> AbstractContextManager[Executor | None]:
    """Who writes the shards: the local pool (None: inline), or Ray tasks (Ray imported only
    then)."""
    if options.executor == "ray":
        from .write.ray_executor import ray_executor

        return ray_executor(options.workers, options.ray_address)
    if options.ray_address is not None:
        raise UsageError("--ray-address needs --executor ray")
    return local_executor(options.workers)


def _plan(options: ConvertOptions, reader: ArchiveReader, executor: Executor, *,
          absolute: bool = False) -> tuple[Index, Pairing, list[PlannedShard], dict[str, Made]]:
    """Survey the sources, split by group and cut the shards (measuring a transform's output
    sizes on a few samples first: those samples are kept, made, for the writer). `absolute`:
    the plan's files named by absolute paths (a consuming run may resume from elsewhere)."""
    profile = options.profile
    sources = resolved_sources(options.sources) if absolute else options.sources
    index, pairing = survey(sources, reader, profile, quiet=options.quiet,
                            storage_options=options.storage_options)
    split_of_group = assign_splits(group_strata(pairing.samples, profile), options.ratios,
                                   options.seed)
    sample_bytes: Callable[[Sample], int] = planned_sample_bytes
    probed: dict[str, Made] = {}
    if options.transform.active:
        ratios, probed = _measure_transform(pairing.samples, options, executor)
        sample_bytes = estimated_sample_bytes(ratios)
    shards = plan_shards(pairing.samples, split_of_group, options.shard_size, profile,
                         ShardSizes(sample_bytes, TAR_END_SIZE,
                                    lambda s: options.transform.output_ext(s.image_ext)),
                         shard_name)
    return index, pairing, shards, probed


def _saved_plan(store: Store, options: ConvertOptions) -> SavedPlan | None:
    """The plan a consuming run saved in OUT, when this run must continue it: that run began
    to release sources, so re-planning would need files it deleted. Any other command into
    such an OUT is refused: the output holds the only copy of what was released."""
    begun = releases_begun(store) if store.is_output() else 0
    if not begun:
        return None  # nothing released: plan afresh (new inputs are seen), resume by journal
    shown = store.shown
    if options.overwrite:
        raise UsageError(f"{shown} holds the only copy of {begun} source files released by "
                         "--consume-sources; --overwrite would discard them: choose another "
                         "--out")
    data = store.read_plan()
    try:
        plan = load_plan(data) if data is not None else None
    except UsageError as error:
        raise UsageError(f"{shown} is a conversion that consumed {begun} of its source files, "
                         f"and {error}") from None
    if plan is None:
        raise UsageError(f"{shown} is a conversion that consumed {begun} of its source files, "
                         "and its saved plan (.shardify/plan.pickle) is missing or damaged: it "
                         "cannot be finished. Its complete shards hold the samples of the "
                         "released sources; convert the sources that are left into another "
                         "--out")
    if plan.shardify == __version__ and plan.sources == resolved_sources(options.sources) \
            and plan.shaping == options.shaping():
        return plan
    why = (f"it was written by shardify {plan.shardify}" if plan.shardify != __version__
           else "it was run with other SOURCE arguments or options")
    raise UsageError(f"{shown} is a conversion that consumed {begun} of its source files, and "
                     f"{why}: re-run the same command (same SOURCE arguments, options and "
                     "shardify version) to finish it")


def _agree_to_consume(options: ConvertOptions, consumption: Consumption,
                      todo: list[PlannedShard], samples: int, written: int,
                      writers: int) -> None:
    """Say what will be deleted and the disk use expected; check the space for the worst point
    of the plan (`writers` writing at once: a Ray cluster's CPUs, not --workers); ask
    (`options.confirm`) before anything is deleted. `written`: the bytes of the shards earlier
    runs finished."""
    store, tracker, units = consumption.store, consumption.tracker, consumption.plan.units
    drive = on_drive(units, nearest_existing(store.root))
    waiting = {u: names for u, names in tracker.waiting.items() if u in drive}
    now = written + sum(units[u].size for u in drive
                        if u not in tracker.released and all(
                            e.local is not None and e.local.exists() for e in units[u].files))
    peak = peak_growth(consumption.plan, waiting, todo, UNPUBLISHED_PER_WORKER * writers)
    needed = peak + samples * (MANIFEST_ROW_BYTES + STATE_ROW_BYTES)
    free = store.free_bytes()
    if options.space_check and needed > free:
        raise NotEnoughSpace(f"not enough space on {path_text(store.root)}, even deleting the "
                             f"sources as they are converted: at the worst point the run needs "
                             f"about {human_bytes(needed)} more, {human_bytes(free)} is free "
                             "(--no-space-check to try anyway)")
    text = consumption_plan_text(consumption, todo, now, needed, free)
    if options.confirm is not None and not options.confirm(text):
        raise UsageError("not confirmed: nothing was deleted or written")


def _write_index_files(options: ConvertOptions, store: Store, results: list[ShardResult],
                       rejects: list[Reject], summary: dict, consumed: dict | None) -> None:
    """Manifest, rejects, wids indexes and the dataset card, each atomically; summary.json
    last, as the sign of done."""
    from .output.card import dataset_card
    from .output.manifest import manifest_table, rejects_table, wids_indexes

    profile, shaping = options.profile, options.shaping()
    described = {**shaping, "profile_spec": options.profile_spec}  # how readers get the profile
    manifest = manifest_table(results, profile, options.transform, described)
    store.write_parquet(REJECTS, rejects_table(rejects, profile, described))
    store.write_parquet(MANIFEST, manifest)
    image_exts = manifest.column("image_ext").unique().to_pylist()
    labels = functools.reduce(merge, (result.label_type for result in results), NULL)
    store.write_text(CARD, dataset_card(profile, summary, shaping, image_exts, labels))
    for name, index in wids_indexes(results).items():
        if index is None:
            store.remove(name)
        else:
            store.write_json(name, index)
    if consumed is not None:
        store.write_json(CONSUMED, consumed)
    if options.manifest is not None:
        write_parquet_atomically(options.manifest, manifest)
        write_atomically(summary_beside(options.manifest), json_bytes(summary))
    store.write_json(SUMMARY, summary)


def _measure_transform(samples: list[Sample], options: ConvertOptions, executor: Executor
                       ) -> tuple[Ratios, dict[str, Made]]:
    """Written/source size ratios per image type, from a few samples the workers transform;
    and those samples as made, by key, for the writer to use (not transformed twice)."""
    probed = probe_samples(samples)
    transform = (options.transform, options.profile.geometry)
    futures = [executor.probe(shard_job("probe", tuple(probed[i:i + PROBES_PER_JOB]), transform))
               for i in range(0, len(probed), PROBES_PER_JOB)]
    try:
        made = [sample for future in futures for sample in future.result()]
        return (size_ratios(probed, list(map(probe_sizes, made))),
                {sample.key: done for sample, done in zip(probed, made, strict=True)})
    except BrokenExecutor:
        raise RunFailed("a worker process died while measuring the transform's output sizes "
                        "(killed, or out of memory?); nothing was written") from None


def _write_shards(shards: list[PlannedShard], finished: dict[str, ShardResult],
                  options: ConvertOptions, store: Store, executor: Executor,
                  probed: dict[str, Made], write_order: list[PlannedShard] | None = None,
                  published: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
    """Write the unfinished shards, journaling each; results in plan order. `probed`: samples
    the size probe already made; `write_order`: the order to write them in (largest first if not
    given); `published(result)` is called once each is durable and journaled."""
    expected = {shard.name: shard.expected_bytes for shard in shards}
    samples = {shard.name: shard.samples for shard in shards}
    progress = Progress(sum(expected.values()), "B", "writing shards", enabled=not options.quiet)
    progress.advance(sum(expected[name] for name in finished))
    results = dict(finished)
    order = [shard.name for shard in shards]
    planned = {shard.name: shard for shard in shards}
    # A transform's output sizes are estimates: the writer starts a continuation shard when a
    # shard has no room left. Untransformed sizes are exact: no limit needed.
    transform, limit = None, None
    if options.transform.active:
        transform, limit = (options.transform, options.profile.geometry), options.shard_size
    # Largest first: the last shards to finish are small, so workers end together.
    jobs = [shard_job(shard.name, shard.samples, transform, limit, probed) for shard in (
        write_order if write_order is not None else sorted(shards, key=lambda s: -s.expected_bytes))
        if shard.name not in finished]

    def follow_up(entry: dict) -> ShardJob | None:
        """The continuation of a shard that had no room for all its samples (this thread)."""
        if "rest" not in entry:
            return None
        shard = continued(planned[entry["shard"]], entry["rest"],
                          continuation_name(entry["shard"]))
        planned[shard.name], samples[shard.name], expected[shard.name] = shard, shard.samples, 0
        order.insert(order.index(entry["shard"]) + 1, shard.name)
        return shard_job(shard.name, shard.samples, transform, limit, probed)

    def publish(entry: dict) -> None:
        """A shard is written (called by the one publishing thread): in place, then journaled.

        A shard all of whose samples were rejected while writing is not kept: an empty tar makes
        webdataset fail ("No samples found"). Its journal line lets nothing be skipped on resume
        (it has no file, so it is redone, and rejected again).
        """
        if entry["samples"]:
            store.publish_shard(entry["shard"])
        else:
            store.discard_staged_shard(entry["shard"])
        store.append_journal(entry)
        results[entry["shard"]] = expand(samples[entry["shard"]], entry)
        if published is not None:
            published(results[entry["shard"]])
        progress.advance(expected[entry["shard"]])

    # The manifest's modules (pyarrow) are imported while the workers write, not before the
    # fork (each worker would map them) nor after the last shard (the run would wait for it).
    preload = threading.Thread(target=importlib.import_module, args=(OUTPUT_TABLES,),
                               daemon=True)
    preload.start()
    try:
        write_shards(jobs, executor, store, publish, follow_up,
                     in_order=write_order is not None)
    except FileNotFoundError as error:
        raise RunFailed(f"source {path_text(str(error.filename))} disappeared while the shards "
                        f"were written; {len(results)} of {len(order)} shards are complete and "
                        "kept: put it back and re-run the same command") from None
    except SourceUnreadable as error:
        raise RunFailed(f"{error}; {len(results)} of {len(order)} shards are complete and "
                        "kept: fix the access (credentials, network) and re-run the same "
                        "command") from None
    except BrokenExecutor:
        raise RunFailed(f"a worker process died (killed, or out of memory?); {len(results)} of "
                        f"{len(order)} shards are complete and kept: re-run the same command "
                        "to resume") from None
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        needed = sum(size for name, size in expected.items() if name not in results)
        raise NotEnoughSpace(
            f"disk full on {store.disk}: {len(results)} of {len(order)} shards are "
            f"complete and kept; about {human_bytes(needed)} more is needed "
            f"({human_bytes(store.free_bytes())} free). Free some space and re-run the "
            "same command to resume") from None
    finally:
        progress.close()
    return [results[name] for name in order]


def _with_continuations(shards: list[PlannedShard],
                        continuations: list[tuple[str, PlannedShard]]) -> list[PlannedShard]:
    """The plan with the continuation shards an earlier run made, each right after the shard
    it continues (which comes first in `continuations` when it is a continuation itself)."""
    ordered = list(shards)
    for parent, shard in continuations:
        ordered.insert([s.name for s in ordered].index(parent) + 1, shard)
    return ordered


def _reusable_shards(store: Store, run: RunRecord, shards: list[PlannedShard],
                     overwrite: bool
                     ) -> tuple[dict[str, ShardResult], list[tuple[str, PlannedShard]]]:
    """Finished shards of an earlier run of the same plan (journaled, their files intact), and
    the continuation shards it started; refuse a different earlier run."""
    previous = store.read_run()
    if previous is None or overwrite:
        return {}, []
    if previous.fingerprint != run.fingerprint:
        raise UsageError(f"{store.shown} holds shards of another conversion "
                         f"({_what_changed(previous, run)}); re-run with --overwrite to "
                         "discard them, or choose another --out")
    planned = {shard.name: shard for shard in shards}
    finished: dict[str, ShardResult] = {}
    continuations: list[tuple[str, PlannedShard]] = []
    for entry in store.journal():
        shard = planned.get(entry["shard"])
        if shard is None:
            continue
        try:
            finished[shard.name] = expand(shard.samples, entry)
        except (ValueError, KeyError, TypeError):
            continue  # an entry of an older build, or a damaged line: that shard is redone
        rest = entry.get("rest")
        # A shard redone (its file was cut, then rewritten the same) has two entries: its
        # continuation is added once.
        if isinstance(rest, int) and 0 < rest < len(shard.samples) \
                and continuation_name(shard.name) not in planned:
            more = continued(shard, rest, continuation_name(shard.name))
            planned[more.name] = more
            continuations.append((shard.name, more))
    return finished, continuations


def _what_changed(previous: RunRecord, run: RunRecord) -> str:
    """`seed 0 -> 1`-style differences in the options, or that the inputs differ."""
    unknown = sorted(run.options.keys() - previous.options.keys())
    if "shard_kinds" in unknown:
        return "written by an older shardify, whose shards mix data types and image formats"
    if unknown:
        return f"written by an older shardify, without {', '.join(unknown)}"
    changed = [f"{key} {previous.options.get(key)} -> {value}"
               for key, value in run.options.items() if previous.options.get(key) != value]
    return ", ".join(changed) if changed else "the inputs differ: other archives or members"


def _check_space(store: OutputStore, todo: list[PlannedShard], samples: int) -> None:
    """Stop before writing anything if OUT's filesystem cannot hold what is left to write."""
    needed = sum(shard.expected_bytes for shard in todo) + samples * MANIFEST_ROW_BYTES
    free = store.free_bytes()
    if needed > free:
        raise NotEnoughSpace(f"not enough space on {path_text(store.root)}: the output needs "
                             "about "
                             f"{human_bytes(needed)}, {human_bytes(free)} is free "
                             "(--no-space-check to try anyway)")


def _check_output_folder(store: OutputStore | RemoteOutputStore, sources: list[str]) -> None:
    """Refuse an OUT inside a source folder, or a non-empty one that shardify did not write."""
    if isinstance(store, RemoteOutputStore):
        _check_remote_output(store, sources)
        return
    out = store.root
    resolved = out.resolve()
    for source, source_path in _local_sources(sources):
        if source_path.is_dir() and resolved.is_relative_to(source_path):
            raise UsageError(f"--out {path_text(out)} is inside the source folder "
                             f"{path_text(source)}; sources are only ever read")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path_text(out)} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not store.is_output():
        raise UsageError(f"--out {path_text(out)} is not empty and is not a shardify output; "
                         "choose a new or empty folder")
    _check_writable(out, "--out")


def _check_remote_output(store: RemoteOutputStore, sources: list[str]) -> None:
    """As `_check_output_folder` for a URL; a missing bucket or bad credentials said now."""
    out = store.root.url
    for source in sources:
        if is_url(source) and f"{out}/".startswith(f"{source.rstrip('/')}/"):
            raise UsageError(f"--out {out} is inside the source {source}; sources are only "
                             "ever read")
    if store.check_access() and not store.is_output():
        raise UsageError(f"--out {out} is not empty and is not a shardify output; choose a "
                         "new or empty prefix")


def _check_manifest_path(manifest: Path | None, sources: list[str], out: Location) -> None:
    """Refuse, before any work, a --manifest PATH (or its summary beside it) that would replace
    a source, land in a SOURCE folder or in OUT (whose files the run writes), or replace anything
    but a file shardify wrote there."""
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
        if isinstance(out, Path) and \
                Path(os.path.realpath(path.parent)).is_relative_to(os.path.realpath(out)):
            raise UsageError(f"{option}: {shown} is inside --out {path_text(out)}, whose files "
                             "the run writes; OUT/manifest.parquet is written anyway")
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
    for source, source_path in _local_sources(sources):
        if source_path in places:
            raise UsageError(f"{said} is the source {path_text(source)}; "
                             "sources are only ever read")
        if source_path.is_dir() and any(place.is_relative_to(source_path) for place in places):
            raise UsageError(f"{said} is inside the source folder {path_text(source)}; "
                             "sources are only ever read")


def _local_sources(sources: list[str]) -> list[tuple[str, Path]]:
    """Each SOURCE on this machine (`file://` URLs too) with its real path (realpath: a link
    loop is said by find_archives, not here); remote ones hold no local file to protect."""
    return [(source, Path(os.path.realpath(where))) for source in sources
            if not is_url(source) and isinstance(where := location(source), Path)]


def _check_writable(path: Path, option: str) -> None:
    """Fail now, not after hours of work, if `path` (or its nearest existing parent) is read-only.
    """
    existing = nearest_existing(path)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path_text(path)}: {path_text(existing)} is not writable")


def _summary(options: ConvertOptions, index: Index, pairing: Pairing,
             results: list[ShardResult], rejects: list[Reject]) -> dict:
    """Per split counts and shard names, reject counts, and the options: no times, no hosts."""
    profile = options.profile
    splits: dict[str, dict] = {}
    for split in SPLITS:
        mine = [r for r in results if r.split == split]
        labels = Counter(s.fields.label for r in mine for s in r.samples)
        splits[split] = {
            "shards": [r.name for r in mine if r.samples],
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
            "profile": f"{profile.name} {profile.version}",
            "profile_options": dict(profile.option_values),
            **options.transform.shaping(),
        },
        "splits": splits,
        "dataset": profile.scan_counts(s.fields for r in results for s in r.samples),
        "samples": sum(s["samples"] for s in splits.values()),
        "rejects": dict(sorted(Counter(str(r.reason) for r in rejects).items())),
        "ignored_members": pairing.ignored,
        "other_files": dict(sorted(pairing.other_files.items())),
        "identical_duplicates": pairing.identical_duplicates,
        "archives": archive_table(index),
        "bytes_in": sum(a.size for a in index.archives if a.parent is None
                        and not a.kind.startswith("nested")),
        "bytes_out": sum(s["bytes"] for s in splits.values()),
        **_transform_counts(options, results),
    }


def _transform_counts(options: ConvertOptions, results: list[ShardResult]) -> dict:
    """How the transform went: images cropped, images kept whole for want of a usable outline,
    label point lists left unmapped (odd length, or not numbers), and how many shards continue
    one that had no room left (the size estimate was low for it)."""
    transform = options.transform
    if not transform.active:
        return {}
    placements = [r.placements for r in results if r.placements is not None]
    continuations = sum(1 for r in results if "_" in r.name)  # shard-000003_1.tar
    cropped = sum(int((p[:, CROP_BOX.start] >= 0).sum()) for p in placements)
    images = sum(len(p) for p in placements)
    return {"transformed": {
        "images": images,
        "cropped": cropped,
        "no_outline": images - cropped if transform.crop else 0,
        "unmapped_point_lists": sum(int(p[:, UNMAPPED].sum()) for p in placements),
        "continuation_shards": continuations,
    }}
