"""shardify: zips of images and labels → battery-grouped WebDataset shards + Parquet manifest."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loader import open_dataset, open_indexed
    from .ray_data import ray_dataset

__version__ = "0.1.0"
__all__ = ["open_dataset", "open_indexed", "ray_dataset"]
_HOMES = {"open_dataset": "loader", "open_indexed": "loader", "ray_dataset": "ray_data"}


def __getattr__(name: str) -> Any:
    """The loaders on first use: `import shardify` (the CLI's too) stays free of webdataset."""
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the lazily imported public API, for `dir()` and completion."""
    return sorted({*globals(), *__all__})
