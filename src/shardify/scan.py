"""`shardify scan`: what a conversion would find, without writing anything.

It reads only central directories and labels (never image bytes), so it is quick on the full
dataset and shows the download's problems before hours are spent converting it.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from .convert import archive_table, survey
from .progress import human_bytes
from .sources import ArchiveReader
from .split import SPLITS
from .write import TAR_END_SIZE, sample_tar_size

SHOWN_PROBLEMS = 20


def scan(sources: list[str]) -> dict:
    """A report of the sources as plain data (what `--json` prints)."""
    with ArchiveReader() as reader:
        index, pairing = survey(sources, reader)
    archives = archive_table(index)
    for row in archives:
        kinds = pairing.kinds[row["name"]]
        row.update({kind: kinds[kind] for kind in ("images", "labels", "other")})
    rejects = index.rejects + pairing.rejects
    batteries: dict[str, set[int]] = defaultdict(set)
    for sample in pairing.samples:
        batteries[sample.fields.data_type].add(sample.fields.battery_id)
    reasons = Counter(r.reason for r in rejects)
    return {
        "archives": archives,
        "members": len(index.members),
        "images": pairing.images,
        "labels": pairing.labels,
        "pairs": len(pairing.samples),
        "orphan_images": reasons["orphan-image"],
        "orphan_labels": reasons["orphan-label"],
        "batteries": {dt: len(ids) for dt, ids in sorted(batteries.items())},
        "defect_images": sum(s.fields.label for s in pairing.samples),
        "identical_duplicates": pairing.identical_duplicates,
        "ignored_members": pairing.ignored,
        "problems": dict(sorted(reasons.items())),
        "problem_details": [
            {"reason": r.reason, "archive": r.source_archive, "member": r.source_member,
             "detail": r.detail}
            for r in rejects if r.reason not in ("orphan-image", "orphan-label")
        ],
        "estimated_output_bytes": sum(sample_tar_size(s) for s in pairing.samples)
        + len(SPLITS) * TAR_END_SIZE,
    }


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
    batteries = ", ".join(f"{dt} {n}" for dt, n in report["batteries"].items()) or "none"
    lines.append(f"images {report['images']}, labels {report['labels']}, pairs {report['pairs']} "
                 f"({report['defect_images']} defect), orphan images {report['orphan_images']}, "
                 f"orphan labels {report['orphan_labels']}")
    lines.append(f"batteries: {batteries}")
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
