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
from ..pathnames import path_text
from ..rejects import Reject
from .pairing import JUNK, OTHER, Pairing, Sample, safe_key, split_name
from .shards import PlannedShard

MAX_LOCAL_EXTRA = 0xFFFF  # the longest local extra field: bounds a nested zip's bytes
BLOCK = 4096  # a file takes whole blocks of the filesystem (the peak counts them)


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
        return None if self.whole else self.files[0].local


@dataclass
class ReleasePlan:
    """Per unit: the shards that must be durable before it goes, or why it is kept."""

    units: list[ReleaseUnit]
    needs: list[frozenset[str]]
    kept: dict[int, str]
    archives_of_unit: list[tuple[str, ...]]  # the archives whose bytes lie in each unit
    copies: dict[str, frozenset[int]]  # by key: units holding identical copies of its members
    placements: dict[str, _Placement]
    header_offsets: dict[str, np.ndarray]  # per archive, sorted: where each member's bytes end
    unread: dict[str, str] = field(default_factory=dict)  # archives in no unit, and why

    def releasable(self) -> list[int]:
        return [u for u in range(len(self.units)) if u not in self.kept]

    def units_of_sample(self, sample: Sample) -> frozenset[int]:
        """The units holding a sample's members and their identical copies (a sample rejected
        while writing keeps them all)."""
        return self._units_of(sample.image_table, sample.image_row) \
            | self._units_of(sample.label_table, sample.label_row) \
            | self.copies.get(sample.key, frozenset())

    def _units_of(self, table: MemberTable, row: int) -> frozenset[int]:
        name = table.archive.name
        placement = self.placements.get(name)
        if placement is None:
            return frozenset()
        start = np.array([table.columns["header_offset"][row]], np.int64)
        ids, sets = placement.set_ids(start, member_ends(self.header_offsets[name], start,
                                                         table.archive))
        return sets[int(ids[0])]


class _Placement:
    """Where an archive's bytes are: the release units of any byte range of it."""

    def __init__(self, starts: np.ndarray, units: list[frozenset[int]]) -> None:
        self.starts, self.units = starts, units  # per extent: its start in the archive

    def of_range(self, start: int, end: int) -> frozenset[int]:
        first = max(0, int(np.searchsorted(self.starts, start, "right")) - 1)
        last = max(first, int(np.searchsorted(self.starts, max(start, end - 1), "right")) - 1)
        return frozenset().union(*self.units[first : last + 1])

    def set_ids(self, starts: np.ndarray, ends: np.ndarray
                ) -> tuple[np.ndarray, list[frozenset[int]]]:
        """The units of many byte ranges, as an index per range into a list of unit sets:
        ranges within one extent (nearly all) in bulk, the others one by one."""
        first = np.maximum(np.searchsorted(self.starts, starts, "right") - 1, 0)
        last = np.maximum(np.searchsorted(self.starts, np.maximum(starts, ends - 1), "right")
                          - 1, first)
        sets = list(self.units)
        for i in np.flatnonzero(last > first).tolist():
            sets.append(frozenset().union(*self.units[first[i] : last[i] + 1]))
            first[i] = len(sets) - 1
        return first, sets

    def everything(self) -> frozenset[int]:
        return frozenset().union(*self.units)


def release_units(archives: list[Archive]) -> tuple[list[ReleaseUnit], dict[str, _Placement]]:
    """The units of the archives found on disk or in a tar, and each archive's placement
    (nested zips placed inside their parent's units). A file on disk is one unit however many
    extents of it an archive has (a zip merged in the wrong order is read in slices); every
    unit has its own name."""
    units: list[ReleaseUnit] = []
    placements: dict[str, _Placement] = {}
    by_file: dict[Path, list[tuple[int, int, int]]] = defaultdict(list)  # (offset, end, unit)
    names: Counter[str] = Counter()

    def add(name: str, files: tuple[Extent, ...], whole: bool) -> frozenset[int]:
        names[name] += 1
        units.append(ReleaseUnit(name if names[name] == 1 else f"{name} #{names[name]}",
                                 files, whole))
        return frozenset({len(units) - 1})

    for archive in archives:
        if archive.parent is not None or archive.kind.startswith("nested"):
            continue
        in_tar = ": " in archive.kind  # "download.tar: pieces", as discovery names them
        prefix = f"{archive.kind.rsplit(': ', 1)[0]}: " if in_tar else ""
        starts = np.cumsum([0, *(e.length for e in archive.extents)])[:-1]
        volumes = archive.kind.endswith("volumes")
        pieces = archive.kind.endswith("pieces") or archive.kind.endswith("(broken)")
        per_extent: list[frozenset[int]] = []
        if volumes and not in_tar:
            per_extent = [add(f"{archive.name} (volume set)", archive.extents, True)] \
                * len(archive.extents)
        elif not in_tar and not pieces:  # a zip file, possibly read in slices
            paths = sorted({e.local for e in archive.extents if e.local is not None})
            of_path: dict[Path, frozenset[int]] = {}
            for path in paths:
                name = archive.name if len(paths) == 1 else \
                    f"{archive.name}: {path_text(path.name)}"
                of_path[path] = add(name, tuple(e for e in archive.extents if e.local == path),
                                    True)
            per_extent = [of_path[e.local] if e.local is not None else frozenset()
                          for e in archive.extents]
        else:
            stem = archive.name.removesuffix(".zip") if volumes else archive.name
            for number, (extent, start) in enumerate(zip(archive.extents, starts.tolist(),
                                                         strict=True)):
                if extent.path is None:  # a missing piece: nothing to free
                    per_extent.append(frozenset())
                elif volumes:
                    last = number == len(archive.extents) - 1
                    per_extent.append(add(f"{prefix}{archive.name if last else stem}"
                                          f"{'' if last else f'.z{number + 1:02d}'}",
                                          (extent,), False))
                else:
                    per_extent.append(add(f"{prefix}{archive.name}"
                                          f"{f'.part{start}' if pieces else ''}",
                                          (extent,), not in_tar))
        for extent, unit in zip(archive.extents, per_extent, strict=True):
            if extent.local is not None and unit:
                by_file[extent.local].append((extent.offset, extent.offset + extent.length,
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
            unit for offset, end, unit in (by_file.get(e.local, []) if e.local else [])
            if offset < e.offset + e.length and e.offset < end) for e in archive.extents])
    return units, placements


@dataclass
class _Tally:
    """What is known about each unit while the plan is built."""

    needs: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    held: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    archives: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    copies: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))

    def hold(self, units: Iterable[int], what: str, count: int = 1) -> None:
        for unit in units:
            self.held[unit][what] += count


def release_plan(index: Index, pairing: Pairing, shards: list[PlannedShard]) -> ReleasePlan:
    """Every unit of the sources, with the shards it waits for or the reason it is kept.

    Vectorised per archive: each member's byte range gives a set of units (nearly always one),
    and the shards of the samples in it are gathered per set, not per member.
    """
    units, placements = release_units(index.archives)
    sample_rows: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for number, shard in enumerate(shards):
        for sample in shard.samples:
            for table, row in ((sample.image_table, sample.image_row),
                               (sample.label_table, sample.label_row)):
                rows, numbers = sample_rows[id(table)]
                rows.append(row)
                numbers.append(number)
    rejected, unlocated = _rejected_rows(index, pairing)
    tally = _Tally()
    unread: dict[str, str] = {}  # archives no unit holds (never listed): kept, said so
    for archive_name, reason in unlocated:
        placed = _placed_ancestor(archive_name, placements)
        if placed is not None:
            tally.hold(placements[placed].everything(), f"reject ({reason})")
        else:
            unread[archive_name] = f"not read ({reason}): kept"
    offsets: dict[str, np.ndarray] = {}
    unmatched: list[tuple[str, frozenset[int]]] = []  # (stem, units) of members in no sample
    for table in index.tables:
        name = table.archive.name
        placement = placements.get(name)
        if placement is None:
            continue
        starts = table.columns["header_offset"].astype(np.int64)
        offsets[name] = np.sort(starts)
        ids, sets = placement.set_ids(starts, member_ends(offsets[name], starts, table.archive))
        for set_id in np.unique(ids).tolist():
            for unit in sets[set_id]:
                tally.archives[unit].add(name)
        kinds = pairing.member_kinds[name]
        accounted = kinds == JUNK
        in_samples, shard_numbers = (np.array(column, np.int64)
                                     for column in sample_rows[id(table)])
        accounted[in_samples] = True
        pairs = np.unique(ids[in_samples] * len(shards) + shard_numbers)  # (set, shard)
        for set_id, number in zip(*np.divmod(pairs, max(len(shards), 1)), strict=True):
            for unit in sets[set_id]:
                tally.needs[unit].add(shards[number].name)
        for row, reason in rejected.get(id(table), {}).items():
            accounted[row] = True
            tally.hold(sets[ids[row]], f"reject ({reason})")
        other = ~accounted & (kinds == OTHER)
        for set_id, count in zip(*np.unique(ids[other], return_counts=True), strict=True):
            tally.hold(sets[set_id], "file shardify does not write", int(count))
        copies = np.flatnonzero(~accounted & ~other).tolist()
        unmatched += [(split_name(member.rsplit("/", 1)[-1])[0], sets[ids[row]])
                      for row, member in zip(copies, table.names_of(copies), strict=True)]
    _place_copies(unmatched, shards, tally)
    return ReleasePlan(units, [frozenset(tally.needs.get(u, ())) for u in range(len(units))],
                       {u: _kept_reason(held) for u, held in tally.held.items()},
                       [tuple(sorted(tally.archives.get(u, ()))) for u in range(len(units))],
                       {key: frozenset(found) for key, found in tally.copies.items()},
                       placements, offsets, unread)


def _placed_ancestor(name: str, placements: dict[str, _Placement]) -> str | None:
    """`name`, or the nearest archive it lies in (`outer.zip/inner.zip` lies in `outer.zip`),
    that has a placement: a reject of an inner zip that could not be read keeps the outer."""
    while name not in placements and "/" in name:
        name = name.rsplit("/", 1)[0]
    return name if name in placements else None


def _place_copies(unmatched: list[tuple[str, frozenset[int]]], shards: list[PlannedShard],
                  tally: _Tally) -> None:
    """Images and labels in no sample and no reject are identical copies of a written member
    (pairing kept one copy): their units wait for that sample's shard; any other is kept."""
    wanted = {safe_key(stem) for stem, _ in unmatched}
    shard_of = {sample.key: shard.name for shard in shards for sample in shard.samples
                if sample.key in wanted} if wanted else {}
    for stem, found in unmatched:
        key = safe_key(stem)
        if key not in shard_of:
            tally.hold(found, "member not written")
            continue
        for unit in found:
            tally.needs[unit].add(shard_of[key])
        tally.copies[key] |= found


def member_ends(sorted_offsets: np.ndarray, starts: np.ndarray, archive: Archive) -> np.ndarray:
    """Where each member's bytes end at the latest: the next member's header, or the end of the
    archive (its central directory) for the last one."""
    following = np.searchsorted(sorted_offsets, starts, "right")
    last = archive.size if archive.parent is None else int(starts.max(initial=0)) + 1
    ends = np.where(following < len(sorted_offsets),
                    sorted_offsets[np.minimum(following, len(sorted_offsets) - 1)], last)
    return np.maximum(ends, starts + 1)


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
        if id(table) not in names:  # every name, once, not kept on the table afterwards
            names[id(table)] = {name: row for row, name in
                                enumerate(table.names_of(list(range(len(table)))))}
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
                in_flight: int, block: int = BLOCK) -> int:
    """The most the used space on a drive grows over the run (bytes; negative: it only
    shrinks), writing shards in `order` while the units `waiting` (those on that drive, each
    with the shards it still waits for) are released. When shard k is being written, up to
    `in_flight` shards from k on may be on disk while only those before k are published (the
    writer keeps to that window: `write_shards(in_order=True)`); a shard takes whole blocks of
    `block` bytes."""
    pending = {u: set(names) for u, names in waiting.items()}
    freed = sum(plan.units[u].size for u, names in pending.items() if not names)
    needed_by: dict[str, list[int]] = defaultdict(list)
    for unit, names in pending.items():
        for name in names:
            needed_by[name].append(unit)
    written = np.cumsum([0, *(-(-shard.expected_bytes // block) * block for shard in order)])
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

    def __init__(self, plan: ReleasePlan, shards: list[PlannedShard], done: set[str],
                 kept: dict[int, str], released: set[int]) -> None:
        self.plan, self.released = plan, set(released)
        self.samples = {shard.name: shard.samples for shard in shards}
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
        """Shard `name` is durable, with these rejects (found while writing it, which keep the
        units of their samples): the units now ready."""
        why = {reject.key: f"{reject.reason}: {reject.detail}" for reject in rejects}
        for sample in self.samples.get(name, ()):
            if sample.key in why:
                for unit in self.plan.units_of_sample(sample) - self.released:
                    self.kept.setdefault(unit, f"holds a member of {sample.key}, rejected "
                                         f"while writing ({why[sample.key]})")
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
