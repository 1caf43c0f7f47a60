"""`shardify scan`, and the survey that starts every conversion: what the sources hold.

It reads only central directories and labels (never image bytes), so it is quick on the full
dataset and shows the download's problems before hours are spent converting it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from operator import itemgetter
from typing import Any

import numpy as np

from .archives.discovery import find_archives
from .archives.model import SUPPORTED_METHODS, Member
from .archives.reader import ArchiveReader
from .archives.zipdir import Index, index_archives
from .errors import MemberError, UsageError
from .pathnames import path_text
from .plan.pairing import Pairing, pair_members
from .plan.split import SPLITS
from .profiles import DatasetProfile
from .progress import Progress, human_bytes
from .rejects import Reason
from .write.tar import TAR_END_SIZE, planned_sample_bytes

SHOWN_PROBLEMS = 20


def survey(sources: list[str], reader: ArchiveReader, profile: DatasetProfile, *,
           quiet: bool = True, storage_options: dict[str, object] | None = None
           ) -> tuple[Index, Pairing]:
    """Find and list every archive, read the labels and pair: everything but the image bytes.

    `storage_options` open the SOURCE arguments that are URLs. Raises UsageError when there is
    nothing to convert, saying what was found instead.
    """
    try:
        discovery = find_archives(sources, storage_options)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    if not discovery.archives and not discovery.rejects:
        raise UsageError(f"no zip archives (.zip, .zip.partN, .z01, .tar) found in: "
                         f"{' '.join(map(path_text, sources))}")
    index = index_archives(discovery.archives, reader)
    index.rejects[:0] = discovery.rejects
    progress: list[Progress] = []

    def read_labels(chunks: Iterable[list[Member]], count: int
                    ) -> Iterator[tuple[Member, bytes | bytearray | MemberError]]:
        progress.append(Progress(count, "labels", "reading labels", enabled=not quiet))
        for members in chunks:
            yield from reader.read_many(members)
            progress[0].advance(len(members))

    try:
        pairing = pair_members(index.tables, read_labels, profile)
    finally:
        for bar in progress:
            bar.close()
    if not pairing.images and not pairing.labels:
        unreadable = (f" ({len(index.rejects)} unreadable: {index.rejects[0].detail})"
                      if index.rejects else "")
        kinds = "/".join(profile.image_extensions)
        raise UsageError(f"no images ({kinds}) or labels ({profile.label_extension}) in the "
                         f"{len(index.archives)} zip archives found{unreadable}")
    return index, pairing


def archive_table(index: Index) -> list[dict]:
    """Per archive: kind, bytes, members, methods and notes (truncation, wrong order, ...)."""
    rows = []
    for archive, table in zip(index.archives, index.tables, strict=True):
        methods, counts = np.unique(table.columns["method"], return_counts=True)
        rows.append({"name": archive.name, "kind": archive.kind, "bytes": archive.size,
                     "members": len(table), "notes": list(archive.notes),
                     "methods": dict(sorted((SUPPORTED_METHODS.get(m, str(m)), n) for m, n
                                            in zip(methods.tolist(), counts.tolist(),
                                                   strict=True)))})
    return rows


def scan(sources: list[str], profile: DatasetProfile,
         storage_options: dict[str, object] | None = None) -> dict:
    """A report of the sources as plain data (what `--json` prints); `dataset` holds the
    profile's own figures (for the battery set: batteries per data_type, defect images)."""
    from .output.manifest import check_columns  # scan says what convert would refuse

    check_columns(profile)
    with ArchiveReader() as reader:
        index, pairing = survey(sources, reader, profile, storage_options=storage_options)
    archives = archive_table(index)
    for row in archives:
        kinds = pairing.kinds[row["name"]]
        row.update({kind: kinds[kind] for kind in ("images", "labels", "other")})
    rejects = index.rejects + pairing.rejects
    reasons = Counter(map(itemgetter(1), index.rejects)) + pairing.reject_counts()
    return {
        "archives": archives,
        "members": index.member_count,
        "images": pairing.images,
        "labels": pairing.labels,
        "pairs": len(pairing.samples),
        "orphan_images": reasons[Reason.ORPHAN_IMAGE],
        "orphan_labels": reasons[Reason.ORPHAN_LABEL],
        "dataset": profile.scan_counts(sample.fields for sample in pairing.samples),
        "identical_duplicates": pairing.identical_duplicates,
        "ignored_members": pairing.ignored,
        "problems": dict(sorted((str(reason), n) for reason, n in reasons.items())),
        "problem_details": [
            {"reason": r.reason, "archive": r.source_archive, "member": r.source_member,
             "detail": r.detail}
            for r in rejects if r.reason not in (Reason.ORPHAN_IMAGE, Reason.ORPHAN_LABEL)
        ],
        "estimated_output_bytes": sum(map(planned_sample_bytes, pairing.samples))
        + len(SPLITS) * TAR_END_SIZE,
    }


def dataset_lines(counts: dict[str, Any]) -> list[str]:
    """A profile's `scan_counts` as lines: `name: value` or `name: key n, key n`."""
    lines = []
    for name, value in counts.items():
        shown = (", ".join(f"{k} {n}" for k, n in value.items()) or "none"
                 if isinstance(value, dict) else value)
        lines.append(f"{name.replace('_', ' ')}: {shown}")
    return lines


def format_scan(report: dict) -> str:
    """The scan report for a terminal."""
    lines = [f"shardify scan: {len(report['archives'])} archives, {report['members']} members"]
    for row in report["archives"]:
        methods = ", ".join(f"{m} {n}" for m, n in row["methods"].items()) or "-"
        lines.append(f"  {row['name']}")
        lines.append(f"      {row['kind']}, {human_bytes(row['bytes'])}, {row['members']} members: "
                     f"{row['images']} images, {row['labels']} labels, {row['other']} other; "
                     f"{methods}")
        lines += [f"      note: {note}" for note in row["notes"]]
    lines.append(f"images {report['images']}, labels {report['labels']}, pairs {report['pairs']}, "
                 f"orphan images {report['orphan_images']}, "
                 f"orphan labels {report['orphan_labels']}")
    lines += dataset_lines(report["dataset"])
    lines.append(f"identical duplicate copies: {report['identical_duplicates']}; "
                 f"junk members ignored: {report['ignored_members']}")
    if report["problems"]:
        lines.append("problems: " + ", ".join(f"{r} {n}" for r, n in report["problems"].items()))
        details = report["problem_details"]
        for problem in details[:SHOWN_PROBLEMS]:
            where = "/".join(p for p in (problem["archive"], problem["member"]) if p)
            detail = problem["detail"].removeprefix(f"{problem['archive']}: ")
            lines.append(f"  {problem['reason']}: {where}: {detail}")
        if len(details) > SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(details) - SHOWN_PROBLEMS} more (--json lists all)")
    else:
        lines.append("problems: none found (image bytes are checked when converting)")
    lines.append(f"estimated output: {human_bytes(report['estimated_output_bytes'])} of shards")
    return "\n".join(lines)
