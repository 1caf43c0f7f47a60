"""What makes a conversion restartable: the run's fingerprint and a journal of finished shards.

`OUT/.shardify/run.json` holds the options and a fingerprint of the plan (every shard's samples and
their source members). `OUT/.shardify/journal.jsonl` gets one line per shard once the shard has been
renamed into place: its size, CRC-32 and the rows the manifest needs. A re-run with the same plan
keeps every journaled shard whose size and CRC still match and redoes the rest; a different plan
is refused, so two runs' shards never mix.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import deflate
import orjson

from . import __version__
from .archives.model import MemberRefs
from .plan.pairing import IMAGE, LABEL, member_refs
from .plan.shards import PlannedShard
from .write import TAIL_BYTES, ShardResult, expand

STATE_DIR = ".shardify"
RUN_FILE = "run.json"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "lock"


@dataclass(frozen=True)
class RunRecord:
    """The options and plan fingerprint of the run that owns an output folder."""

    fingerprint: str
    options: dict

    def to_json(self) -> bytes:
        return orjson.dumps({"fingerprint": self.fingerprint, "options": self.options},
                            option=orjson.OPT_INDENT_2)


def plan_fingerprint(shards: list[PlannedShard], options: dict) -> str:
    """A hash of shardify's version, the options and every planned sample's source members.

    The version is part of it: shards written by another version are never mixed in.
    """
    digest = hashlib.sha256(__version__.encode())
    digest.update(orjson.dumps(options, option=orjson.OPT_SORT_KEYS))
    for shard in shards:
        digest.update(shard.name.encode())
        samples = shard.samples
        images, labels = (_identities(member_refs(samples, [role])) for role in (IMAGE, LABEL))
        for sample, image, label in zip(samples, images, labels, strict=True):
            digest.update(orjson.dumps([sample.key, image, label]))
    return digest.hexdigest()


def _identities(refs: MemberRefs) -> Iterator[list]:
    """[archive, member name, size, CRC-32] of each referenced member."""
    archives = [table.archive.name for table in refs.tables]
    records = refs.records()
    return map(list, zip(map(archives.__getitem__, refs.which.tolist()), refs.names(),
                         records["file_size"].tolist(), records["crc32"].tolist(), strict=True))


def read_run(out: Path) -> RunRecord | None:
    """The run that owns OUT, or None (no run yet, or an unreadable record: start afresh)."""
    path = out / STATE_DIR / RUN_FILE
    if not path.is_file():
        return None
    try:
        document = orjson.loads(path.read_bytes())
        return RunRecord(document["fingerprint"], document["options"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def start_run(out: Path, record: RunRecord) -> None:
    """Record the run that owns OUT (atomically); an earlier journal stays valid for it."""
    folder = out / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{RUN_FILE}.partial"
    partial.write_bytes(record.to_json())
    os.replace(partial, folder / RUN_FILE)


def claim_output(out: Path) -> int:
    """Lock OUT for this run (released when the returned descriptor is closed, or the process
    ends); raise BlockingIOError if another shardify process is writing there."""
    folder = out / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def is_shardify_output(out: Path) -> bool:
    return (out / STATE_DIR).is_dir()


def journaled_shards(out: Path, shards: list[PlannedShard]) -> dict[str, ShardResult]:
    """Finished shards from the journal whose file still has the recorded size and tail CRC.

    Only each shard's last MiB is read back (a re-run over 500 GB of shards must not read them
    all); shards are only ever renamed into place whole, so this catches a replaced or cut
    file. `shardify verify` checks every byte. A torn last journal line (crash while
    appending) is ignored: that shard is simply redone.
    """
    path = out / STATE_DIR / JOURNAL_FILE
    if not path.is_file():
        return {}
    planned = {shard.name: shard for shard in shards}
    finished: dict[str, ShardResult] = {}
    for line in path.read_bytes().splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        shard = planned.get(entry.get("shard"))
        if shard is None:
            continue
        shard_file = out / shard.name
        if shard_file.is_file() and shard_file.stat().st_size == entry["bytes"] \
                and tail_crc32(shard_file) == entry.get("tail_crc32"):
            try:
                finished[shard.name] = expand(shard.samples, entry)
            except ValueError:
                continue  # an entry of an older build (no label CRC-32): that shard is redone
    return finished


def append_journal(out: Path, entry: dict) -> None:
    """Record a finished shard's entry, flushed to disk before the shard counts as done."""
    fd = os.open(out / STATE_DIR / JOURNAL_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, orjson.dumps(entry) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def reset_journal(out: Path) -> None:
    (out / STATE_DIR / JOURNAL_FILE).unlink(missing_ok=True)


def tail_crc32(path: Path) -> int:
    """CRC-32 of a file's last TAIL_BYTES (what the journal records for each shard)."""
    with open(path, "rb") as handle:
        handle.seek(max(0, handle.seek(0, os.SEEK_END) - TAIL_BYTES))
        return deflate.crc32(handle.read())
