"""Pair images with labels by file stem; whatever does not pair becomes a reject with a reason.

Pure planning over member tables: the only I/O is the `read_labels` callable passed in. Names
are classified with vectorised byte operations and paired with set operations on the stems, so
400k pairs take about a second, not minutes.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise, repeat
from operator import itemgetter
from typing import NamedTuple, cast

import numpy as np

from ..archives.model import Member, MemberRefs, MemberTable
from ..archives.zipdir import is_junk
from ..errors import BadLabel, MemberError
from ..profiles import DatasetProfile, Fields, strip_bom
from ..profiles.fields import LabelFields
from ..rejects import Reason, Reject

SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,80}")
UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")


class Sample(NamedTuple):
    """A paired image and label: where both are, and the label's parsed fields.

    Members are (table, row), not Member records, and equal label fields are one shared object:
    at 400k pairs a sample costs ~300 bytes instead of ~1 KB. Payloads are never held.
    """

    key: str
    image_table: MemberTable
    image_row: int
    label_table: MemberTable
    label_row: int
    image_size: int
    label_size: int
    image_ext: str
    fields: Fields

    @property
    def image(self) -> Member:
        return self.image_table.member(self.image_row)

    @property
    def label(self) -> Member:
        return self.label_table.member(self.label_row)


@dataclass
class Orphans:
    """Images (or labels) of one archive without a partner: reject rows, built when needed.

    A 200k-image zip whose labels are elsewhere has 200k of them; `scan` only counts them.
    """

    reason: Reason
    detail: str
    table: MemberTable
    rows: np.ndarray
    keys: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def rejects(self) -> list[Reject]:
        return list(map(tuple.__new__, repeat(Reject), zip(
            self.keys, repeat(self.reason), repeat(self.table.archive.name),
            self.table.names_of(self.rows.tolist()), repeat(self.detail), strict=False)))


@dataclass
class Pairing:
    """The outcome of pairing: samples, rejects, counts of what was skipped on purpose, and per
    archive how many members were images, labels, other files and junk (`kinds`) and which
    each member is (`member_kinds`: IMAGE, LABEL, OTHER or JUNK per row)."""

    samples: list[Sample] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    orphans: list[Orphans] = field(default_factory=list)
    images: int = 0
    labels: int = 0
    ignored: int = 0
    kinds: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    member_kinds: dict[str, np.ndarray] = field(default_factory=dict)  # per archive, per row
    other_files: Counter[str] = field(default_factory=Counter)
    identical_duplicates: int = 0

    def all_rejects(self) -> list[Reject]:
        """Every reject, the orphans' rows built."""
        return self.rejects + [row for orphans in self.orphans for row in orphans.rejects()]

    def reject_counts(self) -> Counter[str]:
        counts = Counter(map(itemgetter(1), self.rejects))
        for orphans in self.orphans:
            counts[orphans.reason] += len(orphans)
        return counts


def split_name(base_name: str) -> tuple[str, str]:
    """(stem, lower-case extension with dot): pairing ignores extension case and folders."""
    stem, dot, ext = base_name.rpartition(".")
    return (stem, f".{ext.lower()}") if dot and stem else (base_name, "")


def safe_key(stem: str) -> str:
    """The stem if webdataset/wids can use it as a key, else a deterministic ASCII substitute.

    Substitute: disallowed runs become `_`, cut to 60 characters, then `-` and the first 12 hex
    digits of the SHA-1 of the UTF-8 stem, so distinct stems keep distinct keys.
    """
    if SAFE_KEY.fullmatch(stem):
        return stem
    readable = UNSAFE_RUN.sub("_", stem)[:60]
    return f"{readable}-{hashlib.sha1(stem.encode()).hexdigest()[:12]}"


# Reads labels: given chunks of label members and their total count, yields each member with
# its bytes or its MemberError, in order.
LabelReader = Callable[[Iterable[list[Member]], int],
                       Iterable[tuple[Member, "bytes | bytearray | MemberError"]]]

IMAGE, LABEL, OTHER, JUNK = range(4)
KINDS = ("images", "labels", "other", "junk")


def member_refs(samples: Sequence[Sample], roles: Sequence[int] = (IMAGE, LABEL)) -> MemberRefs:
    """The samples' images then labels (or only the given roles), to read columns in bulk."""
    tables: list[MemberTable] = []
    rows: list[int] = []
    for role in roles:
        tables += [s.label_table if role else s.image_table for s in samples]
        rows += [s.label_row if role else s.image_row for s in samples]
    return MemberRefs.of(tables, rows)


KEY_BYTES = np.zeros(256, bool)
KEY_BYTES[list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")] = True
MAX_KEY = 80  # as SAFE_KEY


def _extension_code(extension: str) -> int:
    """A lower-case extension of up to 4 ASCII letters (without the dot) as one integer."""
    raw = extension.encode("ascii")
    if not 1 <= len(raw) <= 4:
        raise ValueError(f"extensions of 1 to 4 letters are supported, not {extension!r}")
    return int.from_bytes(raw.ljust(4, b"\0"), "little")


class FileTypes(NamedTuple):
    """A profile's image and label extensions as the codes `classify` compares names with."""

    image_codes: dict[int, np.ndarray]  # per extension length: the codes of image extensions
    label_length: int
    label_code: int
    image_types: tuple[str, ...]  # the image types written (a sample's image_ext)
    image_type_of: dict[tuple[int, int], int]  # (length, code) -> position in image_types

    @classmethod
    def of(cls, profile: DatasetProfile) -> FileTypes:
        types = tuple(dict.fromkeys(profile.image_extensions.values()))
        type_of = {(len(ext) - 1, _extension_code(ext[1:])): types.index(kind)
                   for ext, kind in profile.image_extensions.items()}
        by_length: dict[int, list[int]] = defaultdict(list)
        for length, code in type_of:
            by_length[length].append(code)
        label = profile.label_extension[1:]
        return cls({n: np.array(c, np.uint32) for n, c in by_length.items()}, len(label),
                   _extension_code(label), types, type_of)


class Classified(NamedTuple):
    """What each member of one archive is, and the stems of its images and labels."""

    kinds: np.ndarray  # IMAGE, LABEL, OTHER or JUNK per row
    rows: tuple[np.ndarray, np.ndarray]  # the image rows, the label rows
    stems: tuple[list[str], list[str]]  # their stems, in the same order
    unsafe: set[str]  # stems that cannot be keys as they are (see safe_key)
    image_types: np.ndarray  # per image row: its type, as a position in FileTypes.image_types


LENGTH_MASK = {1: 0xFF, 2: 0xFFFF, 3: 0xFFFFFF, 4: 0xFFFFFFFF}


def classify(table: MemberTable, file_types: FileTypes) -> Classified:
    """Each member's kind and, for images and labels, its stem; vectorised over the name bytes.

    '/' and '.' are single bytes in UTF-8, so base names and extensions are found by byte
    position in the table's name data; only members of other kinds take a Python step each
    (the junk check), and only images and labels get a Python string (their stem).
    """
    data = np.frombuffer(table.name_data + bytes(8), np.uint8)  # room for the extension gather
    starts, ends = table.name_offsets[:-1], table.name_offsets[1:]
    base = np.maximum(_last_before(data, ord("/"), ends) + 1, starts)
    dot = _last_before(data, ord("."), ends)
    extension_len = np.where(dot > base, ends - dot - 1, 0)
    letters = data[dot[:, None] + np.arange(1, 5)] | 0x20  # lower case for ASCII letters
    code = np.ascontiguousarray(letters).view("<u4").ravel()
    kinds = np.full(len(table), OTHER, np.int8)
    masked = {n: code & LENGTH_MASK[n] for n in {*file_types.image_codes,
                                                   file_types.label_length}}
    for length, image_codes in file_types.image_codes.items():
        kinds[(extension_len == length) & np.isin(masked[length], image_codes)] = IMAGE
    kinds[(extension_len == file_types.label_length)
          & (masked[file_types.label_length] == file_types.label_code)] = LABEL
    kinds[(kinds != OTHER) & (data[base] == ord(".")) & (data[base + 1] == ord("_"))] = JUNK
    suspects = range(len(table)) if b"__MACOSX/" in table.name_data \
        else np.flatnonzero(kinds == OTHER).tolist()
    for row in suspects:
        if is_junk(table.name(row)):
            kinds[row] = JUNK
    text = table.name_data.decode("ascii") if table.name_data.isascii() else None
    rows = (np.flatnonzero(kinds == IMAGE), np.flatnonzero(kinds == LABEL))
    stems: list[list[str]] = []
    for kind_rows in rows:
        spans = zip(base[kind_rows].tolist(), dot[kind_rows].tolist(), strict=True)
        stems.append([text[a:b] for a, b in spans] if text is not None
                     else [table.name_data[a:b].decode() for a, b in spans])
    not_key = np.flatnonzero(~KEY_BYTES[data[: len(table.name_data)]])
    unsafe_rows = (np.searchsorted(not_key, dot) > np.searchsorted(not_key, base)) \
        | (dot - base > MAX_KEY)
    unsafe = {stem for kind in (IMAGE, LABEL)
              for stem, bad in zip(stems[kind], unsafe_rows[rows[kind]].tolist(), strict=True)
              if bad} if unsafe_rows.any() else set()
    image_types = np.zeros(len(rows[IMAGE]), np.int8)
    image_lengths = extension_len[rows[IMAGE]]
    for (length, extension_code), image_type in file_types.image_type_of.items():
        image_types[(image_lengths == length)
                    & (masked[length][rows[IMAGE]] == extension_code)] = image_type
    return Classified(kinds, rows, (stems[IMAGE], stems[LABEL]), unsafe, image_types)


def _last_before(data: np.ndarray, byte: int, ends: np.ndarray) -> np.ndarray:
    """Per end position, the position of the last `byte` before it (-1 if none)."""
    positions = np.concatenate(([-1], np.flatnonzero(data == byte)))
    return positions[np.searchsorted(positions, ends) - 1]


def pair_members(tables: list[MemberTable], read_labels: LabelReader,
                 profile: DatasetProfile) -> Pairing:
    """Classify members, drop junk, resolve duplicate stems, parse labels and pair by stem.

    Members are numbered across tables (table t's row r is `first[t] + r`). The common cases,
    one image and one label or an orphan, are found with one dict and one set of stems; only
    stems with copies or flawed members take the general path. `read_labels` yields each given
    label member with its bytes or its MemberError, in order (ArchiveReader.read_many); the
    profile says which extensions are images and labels, and parses the labels.
    """
    result = Pairing()
    file_types = FileTypes.of(profile)
    first = np.cumsum([0, *map(len, tables)])
    stems: tuple[list[str], list[str]] = ([], [])
    numbers: tuple[list[np.ndarray], ...] = ([np.zeros(0, np.int64)], [np.zeros(0, np.int64)])
    types: list[np.ndarray] = [np.zeros(0, np.int8)]
    unsafe: set[str] = set()
    for table, start in zip(tables, first.tolist(), strict=False):
        found = classify(table, file_types)
        counts = np.bincount(found.kinds, minlength=len(KINDS)).tolist()
        result.kinds[table.archive.name].update({KINDS[k]: n for k, n in enumerate(counts) if n})
        result.member_kinds[table.archive.name] = found.kinds
        result.ignored += counts[JUNK]
        for row in np.flatnonzero(found.kinds == OTHER).tolist():
            name = table.name(row)
            result.other_files[split_name(name[name.rfind("/") + 1 :])[1]
                               or "(no extension)"] += 1
        for kind in (IMAGE, LABEL):
            stems[kind].extend(found.stems[kind])
            numbers[kind].append(found.rows[kind] + start)
        types.append(found.image_types)
        unsafe |= found.unsafe
    image_numbers, label_numbers = (np.concatenate(n) for n in numbers)
    result.images, result.labels = len(image_numbers), len(label_numbers)
    image_stems = set(stems[IMAGE])
    label_of = dict(zip(stems[LABEL], label_numbers.tolist(), strict=True))
    members = _MemberLookup(tables, first)
    special = _special_stems(stems, (image_numbers, label_numbers),
                             len(image_stems), len(label_of), members.flawed())
    partner = np.fromiter(map(label_of.get, stems[IMAGE], repeat(-1)), np.int64,
                          len(image_numbers))
    has_image = np.fromiter(map(image_stems.__contains__, stems[LABEL]), bool,
                            len(label_numbers))
    regular = [_not_in(special, stems[kind]) for kind in (IMAGE, LABEL)]
    for kind, lone in ((IMAGE, regular[IMAGE] & (partner < 0)),
                       (LABEL, regular[LABEL] & ~has_image)):
        positions = np.flatnonzero(lone)
        orphans = (image_numbers, label_numbers)[kind][positions]
        keys = _keys(map(stems[kind].__getitem__, positions.tolist()), unsafe)
        reason, other = (Reason.ORPHAN_IMAGE, "label") if kind == IMAGE \
            else (Reason.ORPHAN_LABEL, "image")
        bounds = np.searchsorted(orphans, first).tolist()
        for t, (lo, hi) in enumerate(pairwise(bounds)):
            if hi > lo:
                result.orphans.append(Orphans(reason, f"no {other} with this stem", tables[t],
                                              orphans[lo:hi] - first[t], keys[lo:hi]))
    paired = np.flatnonzero(regular[IMAGE] & (partner >= 0))
    keys = _keys(map(stems[IMAGE].__getitem__, paired.tolist()), unsafe)
    images, labels = image_numbers[paired], partner[paired]
    if special:
        extra = _pair_special(special, stems, (image_numbers, label_numbers), members, result)
        keys += [key for key, _, _ in extra]
        images = np.concatenate([images, np.array([n for _, n, _ in extra], np.int64)])
        labels = np.concatenate([labels, np.array([n for _, _, n in extra], np.int64)])
    # Labels are read in archive order: sequential reads, whatever the stems' order.
    order = members.location_order(labels)
    image_type = np.zeros(first[-1], np.int8)
    image_type[image_numbers] = np.concatenate(types)
    _add_samples(result, [keys[i] for i in order.tolist()], images[order], labels[order],
                 image_type, members, read_labels, profile, file_types.image_types)
    _reject_key_collisions(result)
    return result


def _add_samples(result: Pairing, keys: list[str], images: np.ndarray, labels: np.ndarray,
                 image_type: np.ndarray, members: _MemberLookup, read_labels: LabelReader,
                 profile: DatasetProfile, image_types: tuple[str, ...]) -> None:
    """Read and parse each pair's label: a sample for each that parses, rejects for the rest."""
    image_tables, image_rows = members.locate(images)
    label_tables, label_rows = members.locate(labels)
    image_sizes = members.file_sizes(images)
    image_exts = list(map(image_types.__getitem__, image_type[images].tolist()))
    parse = LabelFields(profile)
    read = read_labels(members.chunks(labels), len(labels))
    for i, (key, (label, raw)) in enumerate(zip(keys, read, strict=True)):
        if isinstance(raw, MemberError):
            _reject(result, key, raw.reason, [label, members.member(images[i])], f"label: {raw}")
            continue
        try:
            fields = parse(raw)
        except BadLabel as error:
            _reject(result, key, Reason.BAD_LABEL, [label, members.member(images[i])], str(error))
            continue
        result.samples.append(Sample(
            key, image_tables[i], image_rows[i], label_tables[i], label_rows[i], image_sizes[i],
            len(strip_bom(raw)), image_exts[i], fields))


def _keys(stems: Iterable[str], unsafe: set[str]) -> list[str]:
    """The key of each stem: itself, or safe_key(stem) for the stems in `unsafe`."""
    if not unsafe:
        return list(stems)
    return [safe_key(stem) if stem in unsafe else stem for stem in stems]


def _not_in(special: set[str], stems: list[str]) -> np.ndarray:
    """Per stem, whether it is not one of the special stems."""
    if not special:
        return np.ones(len(stems), bool)
    return ~np.fromiter(map(special.__contains__, stems), bool, len(stems))


def _special_stems(stems: tuple[list[str], list[str]], numbers: tuple[np.ndarray, np.ndarray],
                   image_stems: int, label_stems: int, flawed: np.ndarray) -> set[str]:
    """Stems that take the general path: with copies of an image or label, or a flawed member."""
    special: set[str] = set()
    for kind, distinct in ((IMAGE, image_stems), (LABEL, label_stems)):
        if distinct < len(stems[kind]):
            special |= {stem for stem, count in Counter(stems[kind]).items() if count > 1}
        special |= {stems[kind][i] for i in np.flatnonzero(np.isin(numbers[kind], flawed)).tolist()}
    return special


def _pair_special(special: set[str], stems: tuple[list[str], list[str]],
                  numbers: tuple[np.ndarray, np.ndarray], members: _MemberLookup,
                  result: Pairing) -> list[tuple[str, int, int]]:
    """The general path for the special stems, in stem order: (key, image, label) numbers.

    Equal Member records are interchangeable (same archive, name and location), so a chosen
    record's number is found by value.
    """
    copies: dict[str, tuple[list[Member], list[Member]]] = {s: ([], []) for s in special}
    number_of: dict[Member, int] = {}
    for kind in (IMAGE, LABEL):
        picked = [i for i, stem in enumerate(stems[kind]) if stem in special]
        picked_numbers = numbers[kind][picked]
        for i, number, member in zip(picked, picked_numbers.tolist(),
                                     members.members(picked_numbers), strict=True):
            copies[stems[kind][i]][kind].append(member)
            number_of[member] = number
    candidates = []
    for stem in sorted(special):
        candidate = _pair_stem(stem, *copies[stem], result)
        if candidate:
            key, image, label = candidate
            candidates.append((key, number_of[image], number_of[label]))
    return candidates


class _MemberLookup:
    """Members numbered across tables (table t's row r is `first[t] + r`), looked up in bulk."""

    def __init__(self, tables: list[MemberTable], first: np.ndarray) -> None:
        self.tables, self.first = tables, first
        self.offsets, self.sizes = (np.concatenate([np.zeros(0, np.int64)]
                                                   + [t.columns[column] for t in tables])
                                    for column in ("header_offset", "file_size"))
        self.archive_rank = np.argsort(np.argsort([t.archive.name for t in tables]))

    def flawed(self) -> np.ndarray:
        """The numbers of members with a known problem."""
        return np.array([start + row for table, start in zip(self.tables, self.first.tolist(),
                                                               strict=False)
                         for row in table.problems], np.int64)

    def location_order(self, numbers: np.ndarray) -> np.ndarray:
        """The order of `numbers` by (archive name, offset): the order to read them in."""
        return np.lexsort((self.offsets[numbers], self.archive_rank[self._table_of(numbers)]))

    def members(self, numbers: np.ndarray) -> list[Member]:
        """Member records for `numbers`, in their order."""
        found: list[Member | None] = [None] * len(numbers)
        which = self._table_of(numbers)
        for t in np.unique(which).tolist():
            at = np.flatnonzero(which == t)
            rows = (numbers[at] - self.first[t]).tolist()
            for i, member in zip(at.tolist(), self.tables[t].members(rows), strict=True):
                found[i] = member
        return cast(list[Member], found)

    def member(self, number: int) -> Member:
        t = int(self._table_of(np.array([number]))[0])
        return self.tables[t].member(int(number - self.first[t]))

    def chunks(self, numbers: np.ndarray, size: int = 4096) -> Iterator[list[Member]]:
        """Member records for `numbers`, a chunk at a time: 400k records at once take 150 MB."""
        for start in range(0, len(numbers), size):
            yield self.members(numbers[start : start + size])

    def locate(self, numbers: np.ndarray) -> tuple[list[MemberTable], list[int]]:
        """(table, row) of each number, as two lists."""
        which = self._table_of(numbers)
        return list(map(self.tables.__getitem__, which.tolist())), \
            (numbers - self.first[which]).tolist()

    def file_sizes(self, numbers: np.ndarray) -> list[int]:
        return self.sizes[numbers].tolist()

    def _table_of(self, numbers: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first, numbers, "right") - 1


def _pair_stem(
    stem: str, image_copies: list[Member], label_copies: list[Member], result: Pairing
) -> tuple[str, Member, Member] | None:
    """Resolve one stem to (key, image, label), or record why it cannot be a sample."""
    key = safe_key(stem)
    if len(image_copies) + len(label_copies) < 3:  # the common cases, without the general path
        copies = image_copies or label_copies
        if len(image_copies) == 1 == len(label_copies) and image_copies[0].problem is None \
                and label_copies[0].problem is None:
            return key, image_copies[0], label_copies[0]
        if len(copies) == 1 and not (image_copies and label_copies) \
                and copies[0].problem is None:
            orphan = Reason.ORPHAN_IMAGE if image_copies else Reason.ORPHAN_LABEL
            other = "label" if image_copies else "image"
            result.rejects.append(Reject(key, orphan, copies[0].archive.name, copies[0].name,
                                         f"no {other} with this stem"))
            return None
    image = _one_copy(key, image_copies, "image", result)
    label = _one_copy(key, label_copies, "label", result)
    present = [m for m in (image, label) if isinstance(m, Member)]
    flawed = next((m for m in present if m.problem is not None), None)
    if image is False or label is False:
        _reject(result, key, Reason.DUPLICATE, present,
                "its partner has copies with different bytes")
    elif flawed is not None and flawed.problem is not None:
        reason, detail = flawed.problem
        _reject(result, key, reason, present, f"{flawed.base_name}: {detail}")
    elif label is None and isinstance(image, Member):
        _reject(result, key, Reason.ORPHAN_IMAGE, [image], "no label with this stem")
    elif image is None and isinstance(label, Member):
        _reject(result, key, Reason.ORPHAN_LABEL, [label], "no image with this stem")
    elif isinstance(image, Member) and isinstance(label, Member):
        return key, image, label
    return None


def _one_copy(
    key: str, copies: list[Member], kind: str, result: Pairing
) -> Member | bool | None:
    """The copy to use; None if there is none; False if copies differ (all rejected here).

    Copies are the same when size and CRC-32 from the central directory agree; the first copy
    by (archive, member name) is kept so the choice is deterministic.
    """
    if len(copies) < 2:
        return copies[0] if copies else None
    copies = sorted(copies, key=lambda m: (m.archive.name, m.name))
    if len({(m.file_size, m.crc32) for m in copies}) > 1:
        where = ", ".join(f"{m.archive.name.rsplit('/', 1)[-1]}:{m.name}" for m in copies)
        _reject(result, key, Reason.DUPLICATE, copies,
                f"{len(copies)} {kind}s with this stem have different bytes: {where}")
        return False
    result.identical_duplicates += len(copies) - 1
    return copies[0]


def _reject(
    result: Pairing, key: str, reason: Reason, members: list[Member], detail: str
) -> None:
    for member in members:
        result.rejects.append(Reject(key, reason, member.archive.name, member.name, detail))


def _reject_key_collisions(result: Pairing) -> None:
    """Two stems that map to one key would make a sample ambiguous: reject both."""
    counts = Counter(sample.key for sample in result.samples)
    if max(counts.values(), default=0) < 2:
        return
    kept = []
    for sample in result.samples:
        if counts[sample.key] > 1:
            _reject(result, sample.key, Reason.DUPLICATE, [sample.image, sample.label],
                    "another stem maps to the same key")
        else:
            kept.append(sample)
    result.samples = kept
