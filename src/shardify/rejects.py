"""Why an input did not become a sample: the reasons, and the row each reject becomes."""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class Reason(StrEnum):
    """The `reason` column of rejects.parquet (the README's table explains each)."""

    ORPHAN_IMAGE = "orphan-image"
    ORPHAN_LABEL = "orphan-label"
    BAD_LABEL = "bad-label"
    BAD_IMAGE = "bad-image"
    BAD_CRC = "bad-crc"
    DUPLICATE = "duplicate"
    UNSUPPORTED_METHOD = "unsupported-method"
    TRUNCATED = "truncated"
    BOMB = "bomb"
    OVERLAP = "overlap"
    BAD_ARCHIVE = "bad-archive"


class Reject(NamedTuple):
    """One input that did not become (part of) a sample, and why."""

    key: str
    reason: Reason
    source_archive: str
    source_member: str
    detail: str
