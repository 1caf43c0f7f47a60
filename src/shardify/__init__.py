"""shardify: zips of images and labels → battery-grouped WebDataset shards + Parquet manifest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loader import open_dataset, open_indexed

__version__ = "0.1.0"
__all__ = ["open_dataset", "open_indexed"]


def __getattr__(name: str) -> Any:
    """The loaders on first use: `import shardify` (the CLI's too) stays free of webdataset."""
    if name in __all__:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
