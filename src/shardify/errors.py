"""Every exception shardify raises on purpose, in one place, with what the CLI makes of it.

Messages are written for the user: the CLI prints them on one line, never a traceback.
"""

from __future__ import annotations

import errno

from .rejects import Reason

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errnos of a full disk or quota (exit 3)


class UsageError(Exception):
    """A problem with the command line or the folders given: one line, exit 2."""


class ArchiveError(Exception):
    """An archive that cannot be read at all; the message says why (a `bad-archive` row)."""


class MissingVolume(ArchiveError):
    """A multi-volume set with fewer volumes than its last volume says: no recovery possible."""


class MemberError(Exception):
    """One member that cannot be read; `reason` is the reject reason, the message its detail."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class SourceUnreadable(OSError):
    """Storage refused or could not serve a source at all (credentials, network, permission):
    not a flaw of a member, so no reject; the run stops, complete shards kept (exit 1)."""


class BadLabel(ValueError):
    """A label that cannot be used; the message is the `bad-label` reject's detail."""


class RunFailed(Exception):
    """The run stopped on an error outside the inputs (a worker died); complete shards are kept:
    exit 1."""


class NotEnoughSpace(Exception):
    """OUT's disk cannot hold the output (checked before writing, or hit while writing): exit 3."""


class ExportFailed(Exception):
    """export: a sample in a shard does not match its manifest row (member, size or CRC-32);
    the message names it. Nothing is left under DIR: exit 1."""


class OutputMissing(Exception):
    """OUT lacks the manifest or summary: it is not a shardify output (exit 2)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that it is handled exactly like Ctrl-C
    (exit 143 instead of 130)."""


class UnusableIndex(Exception):
    """verify: an index file (manifest, summary) that cannot be checked against; `where` and
    `what` are the one problem to report."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where, self.what = where, what
