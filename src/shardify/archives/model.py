"""The member model: what an archive is and what is in it, as immutable plain data."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..rejects import Reason
from ..storage import RemotePath

METHOD_STORED = 0
METHOD_DEFLATED = 8
METHOD_DEFLATE64 = 9
SUPPORTED_METHODS = {METHOD_STORED: "stored", METHOD_DEFLATED: "deflate",
                     METHOD_DEFLATE64: "deflate64"}


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range of a file: `length` bytes from `offset` of `path`, on disk or in remote
    storage (read with ranged requests).

    A path of None is a hole (a missing download piece): it reads as zero bytes.
    """

    path: Path | RemotePath | None
    offset: int
    length: int

    @property
    def local(self) -> Path | None:
        """Its file on this machine; None for a hole or a remote file (which --consume-sources
        never deletes)."""
        return self.path if isinstance(self.path, Path) else None


@dataclass(frozen=True, slots=True)
class Archive:
    """One zip to read, however it was delivered.

    `name` is how the manifest names it: the zip's path relative to the SOURCE (or the tar) it was
    found in (as `path_text` shows it: valid text even where the folder's name is not UTF-8), the
    same whether it came whole, as pieces or inside a tar. `extents` hold its bytes
    in order; a deflated zip inside a zip has none and is inflated from `parent` when read.
    `volume_starts` gives each volume's offset for multi-volume sets (zip offsets are per disk).
    """

    name: str
    kind: str
    extents: tuple[Extent, ...] = ()
    parent: Member | None = None
    volume_starts: tuple[int, ...] = (0,)
    notes: tuple[str, ...] = ()
    broken: str | None = None

    @property
    def size(self) -> int:
        if self.parent is not None:
            return self.parent.file_size
        return sum(extent.length for extent in self.extents)

    @property
    def remote(self) -> bool:
        """Whether its bytes are in remote storage: each read is a request, so neighbours are
        read together (a set comes from one SOURCE: never part local, part remote)."""
        return isinstance(next((e.path for e in self.extents if e.path is not None), None),
                          RemotePath)


Problem = tuple[Reason, str]  # (reject reason, detail) of a member known to be unusable

# A member's location, one numpy record per member: the columns of a MemberTable, in the order
# of Member's fields after (archive, name).
MEMBER_COLUMNS = np.dtype([("header_offset", "<i8"), ("compressed_size", "<i8"),
                           ("file_size", "<i8"), ("crc32", "<u4"), ("method", "<u2"),
                           ("flags", "<u2"), ("raw_name_len", "<u2")])


class Member(NamedTuple):
    """One file inside an archive, located well enough to read it with a single `pread`.

    `problem` is set for a member already known to be unusable (zip bomb, overlap, unsupported
    method, inside a broken archive); reading it raises that.
    """

    archive: Archive
    name: str
    header_offset: int
    compressed_size: int
    file_size: int
    crc32: int
    method: int
    flags: int
    raw_name_len: int
    problem: Problem | None = None

    @classmethod
    def at(cls, archive: Archive, name: str, location: Sequence[int],
           problem: Problem | None = None) -> Member:
        """A member from its MEMBER_COLUMNS values (a record's `tolist()`), in column order."""
        return cls._make((archive, name, *location, problem))

    def location(self) -> tuple[int, ...]:
        """Its MEMBER_COLUMNS values, in column order."""
        return tuple(getattr(self, column) for column in MEMBER_COLUMNS.names or ())

    @property
    def base_name(self) -> str:
        return self.name.rsplit("/", 1)[-1]


# One order for the record and the tuple: Member's fields after (archive, name).
assert Member._fields[2 : 2 + len(MEMBER_COLUMNS.descr)] == MEMBER_COLUMNS.names


@dataclass(frozen=True, eq=False)
class MemberTable:
    """The members of one archive as columns: names, one numpy record per member, problems.

    Names are stored as Arrow stores strings: UTF-8 bytes back to back (`name_data`) and n + 1
    offsets (`name_offsets`). A 200k-member archive costs ~34 bytes a member plus its name,
    instead of several Python objects per member, and is classified and paired with vectorised
    operations; `names` and `member(row)` build Python objects only where they are needed.
    Complete and immutable once built: a table with more problems is a new table.
    """

    archive: Archive
    name_data: bytes
    name_offsets: np.ndarray  # int64, len(columns) + 1
    columns: np.ndarray  # MEMBER_COLUMNS, one row per member
    problems: Mapping[int, Problem] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for array in (self.name_offsets, self.columns):
            array.flags.writeable = False

    @classmethod
    def from_names(cls, archive: Archive, names: list[str], columns: np.ndarray,
                   problems: Mapping[int, Problem] | None = None) -> MemberTable:
        data = "".join(names).encode()
        lengths = map(len, names) if len(data) == sum(map(len, names)) else (
            len(name.encode()) for name in names)
        offsets = np.zeros(len(names) + 1, np.int64)
        offsets[1:] = np.cumsum(np.fromiter(lengths, np.int64, len(names)))
        table = cls(archive, data, offsets, columns, dict(problems or {}))
        table.__dict__["names"] = names
        return table

    @classmethod
    def from_members(cls, archive: Archive, members: list[Member]) -> MemberTable:
        columns = np.array([m.location() for m in members], dtype=MEMBER_COLUMNS)
        return cls.from_names(archive, [m.name for m in members], columns,
                              {row: m.problem for row, m in enumerate(members)
                               if m.problem is not None})

    def with_problems(self, problems: Mapping[int, Problem]) -> MemberTable:
        """The same members with these problems added (a row's earlier problem is kept)."""
        table = replace(self, problems={**problems, **self.problems})
        if "names" in self.__dict__:
            table.__dict__["names"] = self.names
        return table

    def __len__(self) -> int:
        return len(self.columns)

    @cached_property
    def names(self) -> list[str]:
        """Every name as a str, built on first use and kept (for callers that need them all)."""
        return self._names_of(slice(None))

    def _names_of(self, rows: np.ndarray | slice) -> list[str]:
        """Names of `rows` in bulk: slices of one decoded text when the names are ASCII."""
        starts, ends = self.name_offsets[:-1], self.name_offsets[1:]
        bounds = zip(starts[rows].tolist(), ends[rows].tolist(), strict=True)
        if self.name_data.isascii():
            text = self.name_data.decode("ascii")
            return [text[a:b] for a, b in bounds]
        return [self.name_data[a:b].decode() for a, b in bounds]

    def name(self, row: int) -> str:
        """One name, without building them all."""
        if "names" in self.__dict__:
            return self.names[row]
        return self.name_data[self.name_offsets[row] : self.name_offsets[row + 1]].decode()

    def member(self, row: int) -> Member:
        return Member.at(self.archive, self.name(row), self.columns[row].tolist(),
                         self.problems.get(row))

    def names_of(self, rows: list[int]) -> list[str]:
        """The names of `rows`, without keeping every name (400k names take ~40 MB)."""
        if "names" in self.__dict__:
            return list(map(self.names.__getitem__, rows))
        if len(rows) * 4 < len(self):
            return list(map(self.name, rows))
        return self._names_of(np.asarray(rows, np.int64))

    def members(self, rows: list[int] | None = None) -> list[Member]:
        """Member records for `rows` (all by default), built in bulk."""
        rows = list(range(len(self))) if rows is None else rows
        archive, problems = self.archive, self.problems
        return [Member.at(archive, name, values, problems.get(row)) for row, name, values
                in zip(rows, self.names_of(rows), self.columns[rows].tolist(), strict=True)]

    def take(self, rows: np.ndarray) -> MemberTable:
        """The table of the given rows only (ascending), their problems kept."""
        renumber = {int(old): new for new, old in enumerate(rows.tolist())}
        return MemberTable.from_names(
            self.archive, [self.names[row] for row in rows.tolist()], self.columns[rows],
            {renumber[row]: problem for row, problem in self.problems.items()
             if row in renumber})


@dataclass
class MemberRefs:
    """Many (table, row) references, grouped by table so their columns are read in bulk."""

    tables: list[MemberTable]  # the distinct tables referenced
    which: np.ndarray  # int32 per reference: its table's position in `tables`
    rows: np.ndarray  # int64 per reference

    @classmethod
    def of(cls, tables: list[MemberTable], rows: list[int]) -> MemberRefs:
        distinct = list(dict.fromkeys(tables))
        number = {id(table): i for i, table in enumerate(distinct)}
        return cls(distinct, np.fromiter(map(number.__getitem__, map(id, tables)), np.int32,
                                         len(tables)), np.array(rows, np.int64))

    def _groups(self) -> Iterator[tuple[MemberTable, np.ndarray]]:
        """Each table with the positions of the references into it."""
        if len(self.tables) == 1:
            yield self.tables[0], np.arange(len(self.rows))
            return
        for t, table in enumerate(self.tables):
            yield table, np.flatnonzero(self.which == t)

    def records(self) -> np.ndarray:
        """The MEMBER_COLUMNS record of each reference."""
        found = np.zeros(len(self.rows), MEMBER_COLUMNS)
        for table, at in self._groups():
            found[at] = table.columns[self.rows[at]]
        return found

    def names(self) -> list[str]:
        found = [""] * len(self.rows)
        for table, at in self._groups():
            for i, name in zip(at.tolist(), table.names_of(self.rows[at].tolist()), strict=True):
                found[i] = name
        return found

    def problems(self) -> dict[int, Problem]:
        """The known problem of each flawed reference, by position."""
        return {i: problem for table, at in self._groups() if table.problems
                for i, row in zip(at.tolist(), self.rows[at].tolist(), strict=True)
                if (problem := table.problems.get(row)) is not None}
