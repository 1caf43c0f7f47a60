"""Where a file is: a local path, or an fsspec URL (`s3://bucket/key`, `gs://...`, `memory://`).

The one owner of URLs: parsing SOURCE and OUT arguments and `--storage-option key=value`, and
opening filesystems. Credentials and endpoints come from fsspec's usual configuration (the
environment, `~/.aws`, ...) plus the options given. A `RemotePath` is plain, picklable data (a
worker process or a Ray task opens its own filesystem from it); `file://` URLs are local paths.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from .errors import UsageError

if TYPE_CHECKING:  # fsspec is imported only by runs that use a URL
    from fsspec import AbstractFileSystem

URL = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.-]*)://(?P<path>.*)$")
EXTRA_OF_PROTOCOL = {"s3": "s3", "s3a": "s3"}  # the shardify extra that installs a backend


@dataclass(frozen=True, slots=True)
class RemotePath:
    """A file or folder in a remote filesystem: `protocol://path`, opened with `options`."""

    protocol: str
    path: str  # without the protocol and without a trailing slash
    options: str = "{}"  # the storage options as JSON text (hashable, picklable)

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.path}"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.protocol, self.path.rsplit("/", 1)[0], self.options)

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.protocol, f"{self.path}/{name.strip('/')}", self.options)

    def __str__(self) -> str:
        return self.url

    def fs(self) -> AbstractFileSystem:
        """The filesystem this path lives in (one instance per protocol and options, per
        process)."""
        return _filesystem(self.protocol, self.options)


Location = Path | RemotePath


def is_url(text: str) -> bool:
    """Whether a SOURCE or OUT argument names a remote location (not `file://`)."""
    found = URL.match(text)
    return found is not None and found["protocol"].lower() != "file"


def location(text: str | Path, options: dict[str, object] | None = None) -> Location:
    """A SOURCE or OUT argument as a local Path or a RemotePath; UsageError for a protocol
    fsspec does not know or whose backend is not installed."""
    if isinstance(text, Path):
        return text
    found = URL.match(text)
    if found is None:
        return Path(text)
    protocol = found["protocol"].lower()
    if protocol == "file":
        return Path(found["path"])
    path = found["path"].rstrip("/")
    remote = RemotePath(protocol, path, orjson.dumps(options or {},
                                                     option=orjson.OPT_SORT_KEYS).decode())
    remote.fs()  # a missing backend or a bad option is said now, in one line
    return remote


def parse_storage_options(items: Iterable[str]) -> dict[str, object]:
    """`key=value` pairs (`--storage-option`); a value that parses as JSON (`true`, `3`,
    `{"region_name": "x"}`) is taken as that, anything else as text."""
    options: dict[str, object] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise UsageError(f"--storage-option {item!r}: expected KEY=VALUE, e.g. "
                             "endpoint_url=http://127.0.0.1:9000")
        try:
            options[key] = orjson.loads(value)
        except orjson.JSONDecodeError:
            options[key] = value
    return options


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str, options: str) -> AbstractFileSystem:
    """One instance per protocol and options in this process (a forked one opens its own:
    see `register_at_fork` below)."""
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{protocol}:// needs fsspec: pip install 'shardify[s3]'") from None
    try:
        return fsspec.filesystem(protocol, **orjson.loads(options))
    except ValueError as error:  # an unknown protocol
        raise UsageError(f"{protocol}:// is not a storage protocol fsspec knows ({error})"
                         ) from None
    except ImportError:
        extra = EXTRA_OF_PROTOCOL.get(protocol)
        hint = f"pip install 'shardify[{extra}]'" if extra else "install its fsspec backend"
        raise UsageError(f"{protocol}:// needs a storage backend that is not installed: "
                         f"{hint}") from None
    except TypeError as error:  # an option the backend does not take
        raise UsageError(f"--storage-option for {protocol}://: {error}") from None


# A forked process (a shard writer, a DataLoader worker) opens its own filesystems: an s3fs
# instance (its event loop thread, its connections) must not be used across fork, and fsspec
# refuses to ("This class is not fork-safe"). fsspec resets its own caches after fork.
os.register_at_fork(after_in_child=_filesystem.cache_clear)


def storage_errors() -> tuple[type[Exception], ...]:
    """What a remote filesystem raises when storage says no (not found, denied, unreachable):
    OSError from fsspec and s3fs, and botocore's own errors (no endpoint, no credentials),
    which s3fs lets through."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError)
