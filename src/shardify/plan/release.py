"""Which parts of the download may be deleted, and when (`convert --consume-sources`).

Pure planning over the member tables and the shard plan; deleting is `archives.consume`'s. A
release unit is what is freed at once: a zip file, one `.partN` piece, a whole volume set, or a
zip or piece inside a tar (its byte range, freed by punching holes). A unit is released once
every shard holding a member whose bytes lie in it is durable and journaled. A unit holding a
member that will not be in a shard (a reject, a file shardify does not write) is kept, for the
user to decide about.

A member's bytes are bounded by the next member's header (a local header's extra field has no
fixed length), the last one's by the archive's end (its directory): a member near a piece
boundary ties both pieces, so a piece is released late, never early.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..archives.model import Archive, Extent, MemberTable
from ..archives.zipdir import Index
from ..rejects import Reject
from .pairing import IMAGE, JUNK, LABEL, OTHER, FileTypes, Pairing, classify, safe_key
from .shards import PlannedShard

MAX_LOCAL_EXTRA = 0xFFFF  # the longest local extra field: bounds a nested zip's bytes


@dataclass(frozen=True)
class ReleaseUnit:
    """Part of the download freed at once: `files` deleted whole, or (`whole` False) their byte
    ranges punched out of the tar holding them."""

    name: str  # how the summary names it: the archive, its piece (`X.zip.part<offset>`), ...
    files: tuple[Extent, ...]
    whole: bool

    @property
    def size(self) -> int:
        return sum(extent.length for extent in self.files)

    @property
    def container(self) -> Path | None:
        """The tar a punched unit lies in."""
        return None if self.whole else self.files[0].path


@dataclass
class ReleasePlan:
    """Per unit: the shards that must be durable before it goes, or why it is kept."""

    units: list[ReleaseUnit]
    needs: list[frozenset[str]]
    kept: dict[int, str]
    units_of_key: dict[str, frozenset[int]]  # a sample's units: kept if it is rejected later
    archives_of_unit: list[tuple[str, ...]]  # the archives whose bytes lie in each unit

    def releasable(self) -> list[int]:
        return [u for u in range(len(self.units)) if u not in self.kept]


class _Placement:
    """Where an archive's bytes are: the release units of any byte range of it."""

    def __init__(self, starts: np.ndarray, units: list[frozenset[int]]) -> None:
        self.starts, self.units = starts, units  # per extent: its start in the archive

    def of_range(self, start: int, end: int) -> frozenset[int]:
        first = max(0, int(np.searchsorted(self.starts, start, "right")) - 1)
        last = max(first, int(np.searchsorted(self.starts, max(start, end - 1), "right")) - 1)
        return frozenset().union(*self.units[first : last + 1])

    def of_rows(self, starts: np.ndarray, ends: np.ndarray) -> list[frozenset[int]]:
        """The units of many ranges; ranges within one extent (nearly all) in bulk."""
        first = np.maximum(np.searchsorted(self.starts, starts, "right") - 1, 0)
        last = np.maximum(np.searchsorted(self.starts, np.maximum(starts, ends - 1), "right")
                          - 1, first)
        found = [self.units[f] for f in first.tolist()]
        for i in np.flatnonzero(last > first).tolist():
            found[i] = frozenset().union(*self.units[first[i] : last[i] + 1])
        return found

    def everything(self) -> frozenset[int]:
        return frozenset().union(*self.units)


def release_units(archives: list[Archive]) -> tuple[list[ReleaseUnit], dict[str, _Placement]]:
    """The units of the archives found on disk or in a tar, and each archive's placement
    (nested zips placed inside their parent's units)."""
    units: list[ReleaseUnit] = []
    placements: dict[str, _Placement] = {}
    by_file: dict[Path, list[tuple[int, int, int]]] = defaultdict(list)  # (offset, end, unit)
    for archive in archives:
        if archive.parent is not None or archive.kind.startswith("nested"):
            continue
        in_tar = ": " in archive.kind  # "download.tar: pieces", as discovery names them
        starts = np.cumsum([0, *(e.length for e in archive.extents)])[:-1]
        per_extent: list[frozenset[int]] = []
        if archive.kind.endswith("volumes") and not in_tar:
            units.append(ReleaseUnit(f"{archive.name} (volume set)", archive.extents, True))
            per_extent = [frozenset({len(units) - 1})] * len(archive.extents)
        else:
            pieces = archive.kind.endswith("pieces") or archive.kind.endswith("(broken)")
            for extent, start in zip(archive.extents, starts.tolist(), strict=True):
                if extent.path is None:  # a missing piece: nothing to free
                    per_extent.append(frozenset())
                    continue
                name = f"{archive.name}.part{start}" if pieces else archive.name
                if in_tar:
                    name = f"{archive.kind.split(': ', 1)[0]}: {name}"
                units.append(ReleaseUnit(name, (extent,), not in_tar))
                per_extent.append(frozenset({len(units) - 1}))
        for extent, unit in zip(archive.extents, per_extent, strict=True):
            if extent.path is not None and unit:
                by_file[extent.path].append((extent.offset, extent.offset + extent.length,
                                             next(iter(unit))))
        placements[archive.name] = _Placement(starts, per_extent)
    for archive in archives:  # nested zips: inside their parent archive's bytes
        if archive.name in placements:
            continue
        if archive.parent is not None:
            parent = archive.parent
            outer = placements.get(parent.archive.name)
            end = parent.header_offset + 30 + parent.raw_name_len + MAX_LOCAL_EXTRA \
                + parent.compressed_size
            found = outer.of_range(parent.header_offset, end) if outer else frozenset()
            placements[archive.name] = _Placement(np.zeros(1, np.int64), [found])
            continue
        starts = np.cumsum([0, *(e.length for e in archive.extents)])[:-1]
        placements[archive.name] = _Placement(starts, [frozenset(
            unit for offset, end, unit in (by_file.get(e.path, []) if e.path else [])
            if offset < e.offset + e.length and e.offset < end) for e in archive.extents])
    return units, placements


@dataclass
class _Tally:
    """What is known about each unit while the plan is built."""

    needs: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    held: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    units_of_key: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    archives: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))

    def hold(self, units: Iterable[int], what: str) -> None:
        for unit in units:
            self.held[unit][what] += 1


def release_plan(index: Index, pairing: Pairing, shards: list[PlannedShard],
                 file_types: FileTypes) -> ReleasePlan:
    """Every unit of the sources, with the shards it waits for or the reason it is kept."""
    units, placements = release_units(index.archives)
    shard_of_key = {sample.key: shard.name for shard in shards for sample in shard.samples}
    sample_rows: dict[int, dict[int, str]] = defaultdict(dict)  # id(table) -> row -> key
    for sample in pairing.samples:
        sample_rows[id(sample.image_table)][sample.image_row] = sample.key
        sample_rows[id(sample.label_table)][sample.label_row] = sample.key
    rejected, unlocated = _rejected_rows(index, pairing)
    tally = _Tally()
    for archive_name, reason in unlocated:
        if archive_name in placements:
            tally.hold(placements[archive_name].everything(), f"reject ({reason})")
    for table in index.tables:
        placement = placements.get(table.archive.name)
        if placement is None:
            continue
        row_units = placement.of_rows(*_member_ranges(table))
        for units_of_row in set(row_units):
            for unit in units_of_row:
                tally.archives[unit].add(table.archive.name)
        found = classify(table, file_types)
        keys = sample_rows.get(id(table), {})
        bad = rejected.get(id(table), {})
        stems = {row: stem for kind in (IMAGE, LABEL)
                 for row, stem in zip(found.rows[kind].tolist(), found.stems[kind], strict=True)}
        for row, kind in enumerate(found.kinds.tolist()):
            if kind == JUNK:
                continue
            if row in bad:
                tally.hold(row_units[row], f"reject ({bad[row]})")
                continue
            key = keys.get(row)
            if key is None and kind != OTHER:
                copy_key = safe_key(stems[row])  # an identical copy of a written member
                key = copy_key if copy_key in shard_of_key else None
            if key is None:
                tally.hold(row_units[row], "file shardify does not write" if kind == OTHER
                           else "member not written")
                continue
            for unit in row_units[row]:
                tally.needs[unit].add(shard_of_key[key])
            tally.units_of_key[key] |= row_units[row]
    return ReleasePlan(units, [frozenset(tally.needs.get(u, ())) for u in range(len(units))],
                       {u: _kept_reason(held) for u, held in tally.held.items()},
                       {key: frozenset(found) for key, found in tally.units_of_key.items()},
                       [tuple(sorted(tally.archives.get(u, ()))) for u in range(len(units))])


def _member_ranges(table: MemberTable) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of each member's bytes in its archive: from its header to the next
    member's header, the last one to the archive's end."""
    starts = table.columns["header_offset"].astype(np.int64)
    order = np.argsort(starts, kind="stable")
    ends = np.empty_like(starts)
    ends[order[:-1]] = starts[order[1:]]
    if len(order):
        last = table.archive.size if table.archive.parent is None else starts[order[-1]] + 1
        ends[order[-1]] = max(last, starts[order[-1]] + 1)
    return starts, np.maximum(ends, starts + 1)


def _rejected_rows(index: Index, pairing: Pairing
                   ) -> tuple[dict[int, dict[int, str]], list[tuple[str, str]]]:
    """Per table (by id), its rejected rows and their reasons; and the (archive, reason) of
    rejects that name no listed member (a whole archive, a zip inside a zip)."""
    rows: dict[int, dict[int, str]] = defaultdict(dict)
    for orphans in pairing.orphans:
        for row in orphans.rows.tolist():
            rows[id(orphans.table)][row] = str(orphans.reason)
    tables = {table.archive.name: table for table in index.tables}
    names: dict[int, dict[str, int]] = {}
    unlocated: list[tuple[str, str]] = []
    for reject in [*index.rejects, *pairing.rejects]:
        table = tables.get(reject.source_archive)
        if table is None or not reject.source_member:
            unlocated.append((reject.source_archive, str(reject.reason)))
            continue
        if id(table) not in names:
            names[id(table)] = {name: row for row, name in enumerate(table.names)}
        row = names[id(table)].get(reject.source_member)
        if row is None:
            unlocated.append((reject.source_archive, str(reject.reason)))
        else:
            rows[id(table)][row] = str(reject.reason)
    return rows, unlocated


def _kept_reason(held: Counter[str]) -> str:
    """`holds 2 members not written: reject (bad_crc), ...` for the summary."""
    total = held.total()
    what = ", ".join(f"{count} {thing}" if count > 1 else thing
                     for thing, count in sorted(held.items()))
    return f"holds {total} member{'s' if total > 1 else ''} not in any shard: {what}"


def kept_by_rejects(plan: ReleasePlan, rejects: Iterable[Reject]) -> dict[int, str]:
    """The units a shard's rejects (found while writing) keep, with why."""
    kept: dict[int, str] = {}
    for reject in rejects:
        for unit in plan.units_of_key.get(reject.key, ()):
            kept.setdefault(unit, f"holds a member of {reject.key}, rejected while writing "
                            f"({reject.reason}: {reject.detail})")
    return kept


def release_order(plan: ReleasePlan, todo: list[PlannedShard], done: set[str]
                  ) -> list[PlannedShard]:
    """The shards to write in an order that frees sources early: repeatedly the shards of the
    unit that frees the most bytes per byte still to write for it; shards no releasable unit
    waits for come last, in plan order."""
    by_name = {shard.name: shard for shard in todo}
    position = {shard.name: i for i, shard in enumerate(todo)}
    waiting = {u: {name for name in plan.needs[u] if name not in done}
               for u in plan.releasable()}
    waiting = {u: names for u, names in waiting.items() if names}
    ordered: list[str] = []
    placed: set[str] = set()
    def worth(unit: int, names: set[str]) -> tuple[float, str]:
        cost = sum(by_name[name].expected_bytes for name in names if name in by_name)
        return (-plan.units[unit].size / max(cost, 1), plan.units[unit].name)

    while waiting:
        best = min(waiting, key=lambda unit: worth(unit, waiting[unit]))
        chosen = sorted(waiting.pop(best), key=lambda name: position.get(name, -1))
        ordered += [name for name in chosen if name not in placed and name in by_name]
        placed.update(chosen)
        waiting = {u: names - placed for u, names in waiting.items() if names - placed}
    ordered += [shard.name for shard in todo if shard.name not in placed]
    return [by_name[name] for name in ordered]


def peak_growth(plan: ReleasePlan, waiting: dict[int, set[str]], order: list[PlannedShard],
                in_flight: int) -> int:
    """The most the used space on a drive grows over the run (bytes; negative: it only
    shrinks), writing shards in `order` while the units `waiting` (those on that drive, each
    with the shards it still waits for) are released. When shard k is being written, up to
    `in_flight` shards from k on may be on disk while only those before k are published."""
    pending = {u: set(names) for u, names in waiting.items()}
    freed = sum(plan.units[u].size for u, names in pending.items() if not names)
    needed_by: dict[str, list[int]] = defaultdict(list)
    for unit, names in pending.items():
        for name in names:
            needed_by[name].append(unit)
    written = np.cumsum([0, *(shard.expected_bytes for shard in order)])
    peak = -freed
    for k, shard in enumerate(order):
        peak = max(peak, int(written[min(k + in_flight, len(order))]) - freed)
        for unit in needed_by.get(shard.name, ()):
            pending[unit].discard(shard.name)
            if not pending[unit]:
                freed += plan.units[unit].size
    return max(peak, int(written[-1]) - freed)


class ReleaseTracker:
    """Which units may go as shards become durable: the publishing thread's view of the plan.

    `kept` adds to the plan's kept units (rejects found by earlier runs, tars on filesystems
    that cannot punch holes); `released` are units already gone.
    """

    def __init__(self, plan: ReleasePlan, done: set[str], kept: dict[int, str],
                 released: set[int]) -> None:
        self.plan, self.released = plan, set(released)
        self.kept = {**kept, **plan.kept}
        self.waiting = {u: set(plan.needs[u]) - done for u in range(len(plan.units))
                        if u not in self.kept and u not in self.released}
        self.units_of_shard: dict[str, list[int]] = defaultdict(list)
        for unit, names in self.waiting.items():
            for name in names:
                self.units_of_shard[name].append(unit)

    def ready(self) -> list[int]:
        """Units every shard of which is durable, not yet released."""
        return sorted(u for u, names in self.waiting.items() if not names)

    def shard_done(self, name: str, rejects: Iterable[Reject]) -> list[int]:
        """Shard `name` is durable, with these rejects: the units now ready."""
        for unit, why in kept_by_rejects(self.plan, rejects).items():
            if unit not in self.released:
                self.kept.setdefault(unit, why)
                self.waiting.pop(unit, None)
        for unit in self.units_of_shard.pop(name, []):
            if unit in self.waiting:
                self.waiting[unit].discard(name)
        return self.ready()

    def mark_released(self, unit: int) -> Path | None:
        """Record `unit` as gone; the tar it lay in, if every unit of that tar is now gone."""
        self.released.add(unit)
        self.waiting.pop(unit, None)
        container = self.plan.units[unit].container
        if container is None:
            return None
        siblings = [u for u, other in enumerate(self.plan.units) if other.container == container]
        return container if all(u in self.released for u in siblings) else None
