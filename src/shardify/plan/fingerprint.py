"""A fingerprint of the plan: the same run, or another one? (What resume decides on.)"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import orjson

from .. import __version__
from ..archives.model import MemberRefs
from .pairing import IMAGE, LABEL, member_refs
from .shards import PlannedShard


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
