"""Progress for long work: a live tqdm bar on a terminal, a plain line every few seconds in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 5.0


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Counts bytes and samples written; shows them the way the output stream can display."""

    def __init__(self, total_bytes: int, total_samples: int, *, enabled: bool,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total_bytes = total_bytes
        self.total_samples = total_samples
        self.done_bytes = 0
        self.done_samples = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._bar: tqdm | None = None
        self.enabled = enabled
        if enabled and self.stream.isatty():
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                             desc="writing shards", file=self.stream, dynamic_ncols=True)

    def advance(self, done_bytes: int, done_samples: int) -> None:
        self.done_bytes += done_bytes
        self.done_samples += done_samples
        if self._bar is not None:
            self._bar.update(done_bytes)
            self._bar.set_postfix_str(f"{self.done_samples}/{self.total_samples} samples",
                                      refresh=False)
        elif self.enabled and time.monotonic() - self._last_line >= LOG_INTERVAL_S:
            self._last_line = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done_bytes / elapsed
        share = self.done_bytes / self.total_bytes if self.total_bytes else 1.0
        eta = (self.total_bytes - self.done_bytes) / rate if rate else float("inf")
        return (
            f"writing shards: {human_bytes(self.done_bytes)}/{human_bytes(self.total_bytes)} "
            f"({share:.0%}), {self.done_samples}/{self.total_samples} samples, "
            f"{human_bytes(rate)}/s, ETA {eta:.0f} s"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
