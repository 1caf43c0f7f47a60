"""`convert --consume-sources`: delete each part of the download once its contents are in shards.

The only module that changes a source. What may go and when is planned in `plan.release`;
this module checks that the sources may be deleted at all, saves the plan in OUT (a resumed run
needs no source it released), deletes files or punches holes in a tar as shards become durable,
and records each release in OUT's state before the next shard counts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pickle
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .archives.zipdir import Index
from .errors import UsageError
from .output.store import OutputStore, Store, fsync_folder
from .pathnames import path_text
from .plan.pairing import Pairing
from .plan.release import ReleasePlan, ReleaseTracker, ReleaseUnit, release_plan
from .plan.shards import PlannedShard
from .progress import human_bytes
from .write.shard import ShardResult

PLAN_FORMAT = 1
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PROBE_BLOCK = 4096
SHOWN_UNITS = 8
_LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass
class SavedPlan:
    """What a run needs to resume without its sources: the archives' member tables, the paired
    samples with their parsed label fields, and the shard plan."""

    shardify: str
    sources: list[str]
    shaping: dict
    index: Index
    pairing: Pairing
    shards: list[PlannedShard]


def dump_plan(plan: SavedPlan, handle: BinaryIO) -> None:
    pickle.dump((PLAN_FORMAT, plan), handle, protocol=pickle.HIGHEST_PROTOCOL)


def load_plan(data: bytes) -> SavedPlan | None:
    """The plan saved in OUT (OUT is the user's own folder, written by shardify), or None if it
    is damaged or of another format."""
    try:
        found, plan = pickle.loads(data)
    except Exception:  # any damage (a torn or foreign file) means: no usable plan
        return None
    return plan if found == PLAN_FORMAT and isinstance(plan, SavedPlan) else None


@dataclass
class Consumption:
    """One run's view of the sources it consumes (`delete`), or only tracks (a resumed run
    without --consume-sources still records what an earlier run released)."""

    store: OutputStore
    plan: ReleasePlan
    tracker: ReleaseTracker
    delete: bool
    released_now: list[int] = field(default_factory=list)

    def published(self, result: ShardResult) -> None:
        """Shard `result` is durable and journaled: release what no longer waits for anything."""
        ready = self.tracker.shard_done(result.name, result.rejects)
        if self.delete:
            for unit in ready:
                self._release(unit)

    def release_ready(self) -> None:
        """Units an earlier run left for release (it stopped between a journal line and the
        deletion): released now, before any new shard."""
        if self.delete:
            for unit in self.tracker.ready():
                self._release(unit)

    def _release(self, unit: int) -> None:
        found = self.plan.units[unit]
        if all(extent.path is not None and not os.path.lexists(extent.path)
               for extent in found.files):
            how = "gone already"  # deleted, then stopped before its line was written
        else:
            try:
                how = release(found)
            except OSError as error:  # changed, or its permissions did: the user decides
                self.tracker.kept[unit] = f"could not be released: {error}"
                self.tracker.waiting.pop(unit, None)
                return
        self.store.append_release({"unit": found.name, "bytes": found.size, "how": how,
                                   "archives": list(self.plan.archives_of_unit[unit])})
        self.released_now.append(unit)
        emptied = self.tracker.mark_released(unit)
        if emptied is not None and tar_is_consumed(emptied, self.plan, self.tracker.released):
            size = emptied.stat().st_size
            emptied.unlink()
            fsync_folder(emptied.parent)
            self.store.append_release({"unit": path_text(emptied), "bytes": 0,
                                       "how": f"deleted (empty; {size} bytes long)",
                                       "archives": []})

    def outcome(self) -> dict:
        """What the summary says: released (now and before), kept and why, bytes freed."""
        releases = self.store.releases()
        return {"released": [entry["unit"] for entry in releases if entry["bytes"]],
                "kept": {self.plan.units[u].name: why
                         for u, why in sorted(self.tracker.kept.items())},
                "bytes_freed": sum(entry["bytes"] for entry in releases),
                "released_now": len(self.released_now)}


def start_consuming(store: OutputStore, index: Index, pairing: Pairing,
                    shards: list[PlannedShard], finished: dict[str, ShardResult],
                    delete: bool) -> Consumption:
    """The release plan with what earlier runs did: units already released (by name), rejects
    found in finished shards; tars whose filesystem cannot punch holes kept whole. Refuses
    (UsageError) sources that may not be deleted, and a source missing that a shard still
    needs."""
    plan = release_plan(index, pairing, shards)
    unit_of_name = {unit.name: u for u, unit in enumerate(plan.units)}
    released = {unit_of_name[entry["unit"]] for entry in store.releases()
                if entry["unit"] in unit_of_name}
    kept: dict[int, str] = {}
    if delete:
        kept = _unpunchable(plan, released)
        refuse_unconsumable([plan.units[u] for u in plan.releasable()
                             if u not in released and u not in kept])
    tracker = ReleaseTracker(plan, shards, set(finished), kept, released)
    for result in finished.values():
        tracker.shard_done(result.name, result.rejects)
    _refuse_missing(plan, tracker)
    return Consumption(store, plan, tracker, delete)


def _refuse_missing(plan: ReleasePlan, tracker: ReleaseTracker) -> None:
    """A source a shard still needs must be there: else the shard would be written without it."""
    for unit, names in tracker.waiting.items():
        if names and any(e.path is not None and not e.path.is_file()
                         for e in plan.units[unit].files):
            raise UsageError(f"source {plan.units[unit].name} is gone, but {len(names)} shards "
                             "still need it; put it back, then re-run the same command")


def consumption_plan_text(consumption: Consumption, order: list[PlannedShard], peak: int,
                          free: int) -> str:
    """What the run will delete and keep, and the disk use it expects: said before starting."""
    plan, tracker = consumption.plan, consumption.tracker
    going = [u for u in tracker.waiting]
    size = sum(plan.units[u].size for u in going)
    names = ", ".join(plan.units[u].name for u in going[:SHOWN_UNITS])
    more = f" and {len(going) - SHOWN_UNITS} more" if len(going) > SHOWN_UNITS else ""
    lines = [f"--consume-sources: {len(going)} source files ({human_bytes(size)}) are deleted "
             f"as their contents are written: {names or 'none'}{more}"]
    lines += [f"  kept: {plan.units[u].name}: {why}" for u, why in sorted(tracker.kept.items())
              if u not in tracker.released]
    if tracker.released:
        lines.append(f"  released by an earlier run: {len(tracker.released)}")
    lines.append(f"  disk use on OUT's drive: at most {human_bytes(max(peak, 0))} more than now "
                 f"at the worst point ({len(order)} shards to write; {human_bytes(free)} free)")
    return "\n".join(lines)


def on_drive(units: list[ReleaseUnit], folder: Path) -> set[int]:
    """The units on the same filesystem as `folder` (only those free space for OUT)."""
    device = os.stat(folder).st_dev
    found = set()
    for u, unit in enumerate(units):
        with contextlib.suppress(OSError):
            if all(e.path is not None and os.stat(e.path).st_dev == device for e in unit.files):
                found.add(u)
    return found


def refuse_unconsumable(units: list[ReleaseUnit]) -> None:
    """Before any work: every source to delete is the user's, on writable media, in a folder
    the user may change (a tar: the file itself writable)."""
    problems = []
    for path, whole in {(e.path, unit.whole) for unit in units for e in unit.files
                        if e.path is not None}:
        try:
            info = os.stat(path)
            read_only = os.statvfs(path).f_flag & os.ST_RDONLY
        except FileNotFoundError:
            continue  # deleted by an earlier run just before it stopped: see _refuse_missing
        except OSError as error:
            problems.append(f"{path_text(path)}: {error.strerror}")
            continue
        if read_only:
            problems.append(f"{path_text(path)} is on read-only media")
        elif info.st_uid != os.geteuid():
            problems.append(f"{path_text(path)} belongs to another user (uid {info.st_uid})")
        elif not os.access(path.parent if whole else path, os.W_OK | (os.X_OK if whole else 0)):
            where = f"its folder {path_text(path.parent)}" if whole else "it"
            problems.append(f"{path_text(path)} cannot be deleted: {where} is not writable")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(f"--consume-sources: {sorted(problems)[0]}{more}; nothing was deleted "
                         "or written")


def _unpunchable(plan: ReleasePlan, released: set[int]) -> dict[int, str]:
    """Units inside a tar whose filesystem cannot punch holes: kept (the tar stays whole)."""
    kept = {}
    verdicts: dict[Path, bool] = {}
    for u, unit in enumerate(plan.units):
        container = unit.container
        if container is None or u in released:
            continue
        if container not in verdicts:
            verdicts[container] = punch_supported(container.parent)
        if not verdicts[container]:
            kept[u] = (f"inside {path_text(container)}, on a filesystem that cannot punch "
                       "holes: the tar is kept whole")
    return kept


def punch_supported(folder: Path) -> bool:
    """Whether files in `folder` can have holes punched (tried on a scratch file there)."""
    try:
        with tempfile.TemporaryFile(dir=folder) as scratch:
            scratch.write(bytes(2 * PROBE_BLOCK))
            scratch.flush()
            _punch(scratch.fileno(), 0, PROBE_BLOCK)
            return True
    except OSError:
        return False


def _punch(fd: int, offset: int, length: int) -> None:
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _LIBC.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def release(unit: ReleaseUnit) -> str:
    """Delete the unit's files (each checked to be the size planned), or punch its ranges out
    of its tar; durable before it returns. Says how."""
    if not unit.whole:
        assert unit.container is not None
        fd = os.open(unit.container, os.O_WRONLY)
        try:
            for extent in unit.files:
                _punch(fd, extent.offset, extent.length)
            os.fsync(fd)
        finally:
            os.close(fd)
        return "holes punched"
    for extent in unit.files:
        assert extent.path is not None
        if os.stat(extent.path).st_size != extent.offset + extent.length:
            raise OSError(errno.EEXIST, f"{path_text(extent.path)} changed since it was planned; "
                          "not deleted")
    for extent in unit.files:
        assert extent.path is not None
        extent.path.unlink()
        fsync_folder(extent.path.parent)
    return "deleted"


def tar_is_consumed(tar: Path, plan: ReleasePlan, released: set[int]) -> bool:
    """Whether every file in `tar` lies in a released unit (its headers are still there; only
    the files' bytes were punched out)."""
    ranges = {(e.offset, e.length) for u in released for e in plan.units[u].files
              if plan.units[u].container == tar}
    covered = {offset for offset, _ in ranges}
    try:
        with tarfile.open(tar, "r:") as archive:
            return all(info.offset_data in covered for info in archive if info.isfile())
    except (tarfile.TarError, OSError):
        return False


def released_archives(store: Store) -> set[str]:
    """The archives (by manifest name) whose bytes a consuming run released, wholly or in part."""
    return {name for entry in store.releases() for name in entry.get("archives", [])}
