"""Pair images with labels by file stem; whatever does not pair becomes a reject with a reason.

Pure planning over member records: the only I/O is the `read_labels` callable passed in, so the
rules can be tested with plain lists.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from .labels import BadLabel, LabelFields, parse_label, strip_bom
from .sources import Member, MemberError, Reject
from .zipindex import is_junk

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
LABEL_EXTENSION = ".json"
KNOWN_EXTENSIONS = frozenset({*IMAGE_EXTENSIONS, LABEL_EXTENSION})
SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,80}")
UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")


class Sample(NamedTuple):
    """A paired image and label, with the label fields parsed; payloads are not held."""

    key: str
    image: Member
    label: Member
    image_ext: str
    label_size: int
    fields: LabelFields


@dataclass
class Pairing:
    """The outcome of pairing: samples, rejects, counts of what was skipped on purpose, and per
    archive how many members were images, labels, other files and junk (`kinds`)."""

    samples: list[Sample] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    images: int = 0
    labels: int = 0
    ignored: int = 0
    kinds: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    other_files: Counter[str] = field(default_factory=Counter)
    identical_duplicates: int = 0


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


LabelReader = Callable[[list[Member]], Iterable[tuple[Member, "bytes | MemberError"]]]


def pair_members(members: Iterable[Member], read_labels: LabelReader) -> Pairing:
    """Classify members, drop junk, resolve duplicate stems, parse labels and pair by stem.

    `read_labels` yields each given label member with its bytes or its MemberError, in order
    (ArchiveReader.read_many).
    """
    result = Pairing()
    images: dict[str, list[Member]] = defaultdict(list)
    labels: dict[str, list[Member]] = defaultdict(list)
    for member in members:
        name = member.name
        base = name[name.rfind("/") + 1 :]
        stem, ext = split_name(base)
        if base.startswith("._") or name.endswith("/") or (
                ("__MACOSX/" in name or ext not in KNOWN_EXTENSIONS) and is_junk(name)):
            result.ignored += 1
            kind = "junk"
        elif ext == LABEL_EXTENSION:
            labels[stem].append(member)
            kind = "labels"
        elif ext in IMAGE_EXTENSIONS:
            images[stem].append(member)
            kind = "images"
        else:
            result.other_files[ext or "(no extension)"] += 1
            kind = "other"
        result.kinds[member.archive.name][kind] += 1
    result.images = sum(map(len, images.values()))
    result.labels = sum(map(len, labels.values()))

    candidates = []
    for stem in sorted(images.keys() | labels.keys()):
        candidate = _pair_stem(stem, images.get(stem, []), labels.get(stem, []), result)
        if candidate:
            candidates.append(candidate)
    # Labels are read in archive order: sequential reads, whatever the stems' order.
    candidates.sort(key=lambda c: _location(c[2]))
    read = read_labels([label for _, _, label in candidates])
    for (key, image, label), (_, raw) in zip(candidates, read, strict=True):
        if isinstance(raw, MemberError):
            _reject(result, key, raw.reason, [label, image], f"label: {raw}")
            continue
        try:
            fields = parse_label(raw)
        except BadLabel as error:
            _reject(result, key, "bad-label", [label, image], str(error))
            continue
        ext = IMAGE_EXTENSIONS[split_name(image.base_name)[1]]
        result.samples.append(Sample(key, image, label, ext, len(strip_bom(raw)), fields))
    _reject_key_collisions(result)
    return result


def _location(member: Member) -> tuple[str, int]:
    return member.archive.name, member.header_offset


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
            orphan = "orphan-image" if image_copies else "orphan-label"
            other = "label" if image_copies else "image"
            result.rejects.append(Reject(key, orphan, copies[0].archive.name, copies[0].name,
                                         f"no {other} with this stem"))
            return None
    image = _one_copy(key, image_copies, "image", result)
    label = _one_copy(key, label_copies, "label", result)
    present = [m for m in (image, label) if isinstance(m, Member)]
    flawed = next((m for m in present if m.problem is not None), None)
    if image is False or label is False:
        _reject(result, key, "duplicate", present, "its partner has copies with different bytes")
    elif flawed is not None and flawed.problem is not None:
        reason, detail = flawed.problem
        _reject(result, key, reason, present, f"{flawed.base_name}: {detail}")
    elif label is None and isinstance(image, Member):
        _reject(result, key, "orphan-image", [image], "no label with this stem")
    elif image is None and isinstance(label, Member):
        _reject(result, key, "orphan-label", [label], "no image with this stem")
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
        _reject(result, key, "duplicate", copies,
                f"{len(copies)} {kind}s with this stem have different bytes: {where}")
        return False
    result.identical_duplicates += len(copies) - 1
    return copies[0]


def _reject(
    result: Pairing, key: str, reason: str, members: list[Member], detail: str
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
            _reject(result, sample.key, "duplicate", [sample.image, sample.label],
                    "another stem maps to the same key")
        else:
            kept.append(sample)
    result.samples = kept
