"""`convert --consume-sources`: delete each part of the download once its contents are in shards.

The only module that changes a source. What may go and when is planned in `plan.release`;
this module checks that the sources may be deleted at all, saves the plan in OUT (a resumed run
needs no source it released), deletes files or punches holes in a tar as shards become durable,
and records each release in OUT's state: an intent line before it, a done line after it, so a
run stopped anywhere in between is seen for what it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pickle
import stat
import tarfile
import tempfile
from collections import defaultdict
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
from .profiles.load import USER_MODULE
from .progress import human_bytes
from .storage import is_url
from .write.shard import ShardResult

PLAN_FORMAT = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PROBE_BLOCK = 4096
SHOWN_UNITS = 8
RELEASING = ".shardify-releasing"  # a volume set's files are renamed so, then deleted
_LIBC = ctypes.CDLL(None, use_errno=True)

Identity = tuple[int, int, int, int]  # a file's device, inode, size and mtime (ns)


@dataclass
class SavedPlan:
    """What a run needs to resume without its sources: the archives' member tables, the paired
    samples with their parsed label fields, the shard plan, and each source file as it was
    when planned (nothing is deleted that has changed since)."""

    shardify: str
    sources: list[str]  # absolute (`resolved_sources`): the plan's file paths are made of them
    shaping: dict
    index: Index
    pairing: Pairing
    shards: list[PlannedShard]
    identities: dict[str, Identity]


def resolved_sources(sources: list[str]) -> list[str]:
    """The SOURCE arguments made absolute: a consuming run's plan names files the same way from
    whichever folder it is resumed."""
    return [source if is_url(source) else os.path.abspath(source) for source in sources]


def dump_plan(plan: SavedPlan, handle: BinaryIO) -> None:
    pickle.dump((PLAN_FORMAT, plan), handle, protocol=pickle.HIGHEST_PROTOCOL)


def load_plan(data: bytes) -> SavedPlan | None:
    """The plan saved in OUT (OUT is the user's own folder, written by shardify), or None if it
    is damaged or of another format."""
    try:
        found, plan = pickle.loads(data)
    except ModuleNotFoundError as error:
        if (error.name or "").startswith(USER_MODULE):  # its fields' class is not loaded
            raise UsageError("its saved plan holds labels read by a profile file that is not "
                             "loaded now: re-run with --profile naming the same file, at the "
                             "same path, as the run that began it") from None
        return None
    except Exception:  # any damage (a torn or foreign file) means: no usable plan
        return None
    return plan if found == PLAN_FORMAT and isinstance(plan, SavedPlan) else None


def releases_begun(store: Store) -> int:
    """How many sources a consuming run into OUT began to release (recorded or not done)."""
    return len({entry["unit"] for entry in store.releases()})


@dataclass
class Consumption:
    """One run's view of the sources it consumes (`delete`), or only tracks (a resumed run
    without --consume-sources still records what an earlier run released)."""

    store: OutputStore
    plan: ReleasePlan
    tracker: ReleaseTracker
    delete: bool
    identities: dict[str, Identity]
    released_now: list[int] = field(default_factory=list)
    kept_files: dict[str, str] = field(default_factory=dict)  # tars kept, by name

    def published(self, result: ShardResult) -> None:
        """Shard `result` is durable and journaled: release what no longer waits for anything."""
        ready = self.tracker.shard_done(result.name, result.rejects)
        if self.delete:
            for unit in ready:
                self._release(unit)

    def release_ready(self) -> None:
        """What an earlier run left due (it stopped between a journal line and a deletion, or
        before deleting an emptied tar): released now, before any new shard."""
        if not self.delete:
            return
        for unit in self.tracker.ready():
            self._release(unit)
        for container in {unit.container for unit in self.plan.units} - {None}:
            assert container is not None
            if all(u in self.tracker.released for u, unit in enumerate(self.plan.units)
                   if unit.container == container) and container.exists():
                self._remove_emptied(container)

    def _release(self, unit: int) -> None:
        found = self.plan.units[unit]
        changed = self._changed(found)
        if changed:
            self._keep(unit, f"{changed} since it was planned: not deleted")
            return
        entry = {"unit": found.name, "files": unit_files(found),
                 "archives": list(self.plan.archives_of_unit[unit])}
        self.store.append_release({**entry, "state": "releasing"})
        try:
            how = release(found)
        except OSError as error:  # its permissions changed, or the filesystem refused
            self._keep(unit, f"could not be released ({error.strerror or error}); re-run to "
                       "try again")
            return
        if found.container is not None:  # punching changed the tar: it is still the one planned
            self.identities.update(file_identities([found]))
        self.store.append_release({**entry, "state": "released", "bytes": found.size,
                                   "how": how})
        self.released_now.append(unit)
        emptied = self.tracker.mark_released(unit)
        if emptied is not None:
            self._remove_emptied(emptied)

    def _keep(self, unit: int, why: str) -> None:
        self.tracker.kept[unit] = why
        self.tracker.waiting.pop(unit, None)

    def _changed(self, unit: ReleaseUnit) -> str | None:
        """Whether a file of the unit is not the one planned (replaced, rewritten, moved)."""
        for extent in unit.files:
            path = extent.local
            if path is None or not os.path.lexists(path):
                continue
            was = self.identities.get(str(path))
            info = os.lstat(path)
            if was is None or (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns) != was:
                return f"{path_text(path)} was replaced or modified"
        return None

    def _remove_emptied(self, tar: Path) -> None:
        """Every zip and piece in `tar` is released: delete it if it holds nothing else."""
        name = path_text(tar)
        if not tar_is_consumed(tar, self.plan, self.tracker.released):
            self.kept_files[name] = ("holds files that are not zips or pieces shardify read "
                                     "(or an unreadable one): kept, with holes over the zips "
                                     "released")
            return
        allocated = os.stat(tar).st_blocks * 512
        self.store.append_release({"unit": name, "files": [], "state": "releasing"})
        try:
            tar.unlink()
            fsync_folder(tar.parent)
        except OSError as error:
            self.kept_files[name] = (f"emptied (every zip in it released), but could not be "
                                     f"deleted: {error.strerror or error}")
            return
        self.store.append_release({"unit": name, "files": [], "state": "released",
                                   "bytes": allocated, "how": "deleted (emptied)",
                                   "archives": []})

    def outcome(self) -> dict:
        """What the summary says: released (now and before), kept and why, bytes freed."""
        done = {entry["unit"]: entry for entry in self.store.releases()
                if entry.get("state") == "released"}
        kept = {self.plan.units[u].name: why for u, why in sorted(self.tracker.kept.items())}
        return {"released": sorted(done), "kept": {**kept, **self.plan.unread, **self.kept_files},
                "bytes_freed": sum(entry.get("bytes", 0) for entry in done.values()),
                "released_now": len(self.released_now)}


def unit_files(unit: ReleaseUnit) -> list[list]:
    """A unit's files as its release lines record them: [path, offset, length] each."""
    return [[str(extent.local), extent.offset, extent.length] for extent in unit.files]


def file_identities(units: list[ReleaseUnit]) -> dict[str, Identity]:
    """Each source file as it is now (saved with the plan, checked before each deletion)."""
    found = {}
    for path in {e.local for unit in units for e in unit.files if e.local is not None}:
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            found[str(path)] = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    return found


def start_consuming(store: OutputStore, index: Index, pairing: Pairing,
                    shards: list[PlannedShard], finished: dict[str, ShardResult],
                    delete: bool, identities: dict[str, Identity] | None) -> Consumption:
    """The release plan with what earlier runs did: units released (matched by name and
    files), rejects found in finished shards; tars whose filesystem cannot punch holes kept
    whole, files whose deletion frees nothing kept. Refuses (UsageError) sources that may not
    be deleted, a source gone that a shard still needs, and a shard to redo whose sources an
    earlier run released. `identities`: the files as planned (None: as they are now)."""
    plan = release_plan(index, pairing, shards)
    released, begun = _recorded(store, plan)
    kept: dict[int, str] = {}
    if delete:
        kept = {**_unpunchable(plan, released), **_unfreeable(plan, released)}
        refuse_unconsumable([plan.units[u] for u in plan.releasable()
                             if u not in released and u not in kept])
    tracker = ReleaseTracker(plan, shards, set(finished), kept, released)
    for result in finished.values():
        tracker.shard_done(result.name, result.rejects)
    _refuse_redo_without_sources(plan, released | begun, set(finished))
    _refuse_missing(plan, tracker)
    return Consumption(store, plan, tracker, delete,
                       file_identities(plan.units) if identities is None else identities)


def _recorded(store: OutputStore, plan: ReleasePlan) -> tuple[set[int], set[int]]:
    """The units an earlier run released, and those it began to release (stopped before its
    done line: the files may be gone)."""
    of_entry = {(unit.name, str(unit_files(unit))): u for u, unit in enumerate(plan.units)}
    states: dict[int, set[str]] = defaultdict(set)
    for entry in store.releases():
        unit = of_entry.get((entry["unit"], str(entry.get("files"))))
        if unit is not None:
            states[unit].add(entry.get("state", ""))
    released = {u for u, seen in states.items() if "released" in seen}
    return released, set(states) - released


def _refuse_redo_without_sources(plan: ReleasePlan, gone: set[int], finished: set[str]) -> None:
    """A shard whose sources were released when it was complete, and that is not complete now
    (damaged, cut, removed), cannot be written again: say so, and leave it for salvage."""
    for unit in sorted(gone):
        missing = sorted(plan.needs[unit] - finished)
        if missing:
            raise UsageError(
                f"shard {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                f" needs source {plan.units[unit].name}, which an earlier run released when the "
                "shard was complete: the shard is damaged or missing now. Nothing was changed; "
                "restore the shard (or the source) from a copy, then re-run the same command")


def _refuse_missing(plan: ReleasePlan, tracker: ReleaseTracker) -> None:
    """A source a shard still needs must be there: else the shard would be written without it."""
    for unit, names in tracker.waiting.items():
        if names and any(e.local is not None and not e.local.is_file()
                         for e in plan.units[unit].files):
            raise UsageError(f"source {plan.units[unit].name} is gone, but {len(names)} shards "
                             "still need it; put it back, then re-run the same command")


def consumption_plan_text(consumption: Consumption, order: list[PlannedShard], now: int,
                          peak: int, free: int) -> str:
    """What the run will delete and keep, and the disk use it expects (`now`: the sources and
    output on OUT's drive; `peak`: the most that grows): said before starting."""
    plan, tracker = consumption.plan, consumption.tracker
    going = list(tracker.waiting)
    size = sum(plan.units[u].size for u in going)
    names = ", ".join(plan.units[u].name for u in going[:SHOWN_UNITS])
    more = f" and {len(going) - SHOWN_UNITS} more" if len(going) > SHOWN_UNITS else ""
    lines = [f"--consume-sources: {len(going)} source files ({human_bytes(size)}) are deleted "
             f"as their contents are written: {names or 'none'}{more}"]
    lines += [f"  kept: {plan.units[u].name}: {why}" for u, why in sorted(tracker.kept.items())
              if u not in tracker.released]
    lines += [f"  kept: {name}: {why}" for name, why in plan.unread.items()]
    if tracker.released:
        lines.append(f"  released by an earlier run: {len(tracker.released)}")
    lines.append(f"  disk use on OUT's drive (sources not yet released + output so far): "
                 f"{human_bytes(now)} now, at most {human_bytes(now + max(peak, 0))} at the worst "
                 f"point, {human_bytes(max(peak, 0))} more than now ({len(order)} shards to "
                 f"write; {human_bytes(free)} free)")
    return "\n".join(lines)


def on_drive(units: list[ReleaseUnit], folder: Path) -> set[int]:
    """The units on the same filesystem as `folder` (only those free space for OUT)."""
    device = os.stat(folder).st_dev
    found = set()
    for u, unit in enumerate(units):
        with contextlib.suppress(OSError):
            if all(e.local is not None and os.stat(e.local).st_dev == device for e in unit.files):
                found.add(u)
    return found


def refuse_unconsumable(units: list[ReleaseUnit]) -> None:
    """Before any work: every source to delete is the user's, on writable media, in a folder
    the user may change (a tar: the file itself writable)."""
    problems = []
    for path, whole in {(e.local, unit.whole) for unit in units for e in unit.files
                        if e.local is not None}:
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


def _unfreeable(plan: ReleasePlan, released: set[int]) -> dict[int, str]:
    """Units whose deletion would free nothing: a symbolic link (its file stays), a file with
    other hard links. Kept, so that neither the freed bytes nor the peak count them."""
    kept = {}
    for u, unit in enumerate(plan.units):
        for extent in unit.files if u not in released else ():
            with contextlib.suppress(OSError):
                if extent.local is not None and stat.S_ISLNK(os.lstat(extent.local).st_mode):
                    kept[u] = f"{path_text(extent.local)} is a symbolic link: not followed"
                elif extent.local is not None and os.lstat(extent.local).st_nlink > 1:
                    kept[u] = (f"{path_text(extent.local)} has other hard links: deleting it "
                               "would free nothing")
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
    """Punch the unit's ranges out of its tar, or delete its files; durable before it returns.
    Says how. Several files (a volume set) go all or none: each is first renamed aside (a
    refusal puts them back), then deleted; files an earlier, stopped run deleted or renamed
    aside are finished."""
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
    paths = sorted({e.local for e in unit.files if e.local is not None})
    for path in paths:
        _check_whole(unit, path)
    aside = [(path, path.with_name(f".{path.name}{RELEASING}")) for path in paths]
    moved = []
    try:
        for path, hidden in aside:
            if os.path.lexists(path):
                os.rename(path, hidden)
                moved.append((path, hidden))
    except OSError:
        for path, hidden in reversed(moved):
            os.rename(hidden, path)
        raise
    for folder in {path.parent for path in paths}:
        fsync_folder(folder)
    for _, hidden in aside:
        hidden.unlink(missing_ok=True)
    for folder in {path.parent for path in paths}:
        fsync_folder(folder)
    return "deleted" if moved else "gone already"


def _check_whole(unit: ReleaseUnit, path: Path) -> None:
    """A file is deleted only if the unit's extents of it cover it exactly, end to end."""
    if not os.path.lexists(path):
        return
    spans = sorted((e.offset, e.length) for e in unit.files if e.local == path)
    end = 0
    for offset, length in spans:
        if offset != end:
            break
        end += length
    if end != os.stat(path).st_size:
        raise OSError(errno.EEXIST, f"{path_text(path)} is not wholly this archive; not deleted")


def tar_is_consumed(tar: Path, plan: ReleasePlan, released: set[int]) -> bool:
    """Whether every file in `tar` lies in a released unit (its headers are still there; only
    the files' bytes were punched out)."""
    covered = {e.offset for u in released for e in plan.units[u].files
               if plan.units[u].container == tar}
    try:
        with tarfile.open(tar, "r:") as archive:
            return all(info.offset_data in covered for info in archive if info.isfile())
    except (tarfile.TarError, OSError):
        return False


def released_archives(store: Store) -> set[str]:
    """The archives (by manifest name) whose bytes a consuming run released (or began to),
    wholly or in part."""
    return {name for entry in store.releases() for name in entry.get("archives", [])}
