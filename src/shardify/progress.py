"""Progress for long work: a live tqdm bar on a terminal, a plain line every few seconds in logs."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm

LOG_INTERVAL_S = 5.0


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class Progress:
    """Counts work done (bytes when `unit` is "B", else items) toward a known total.

    On a terminal it is a tqdm bar with rate and ETA; otherwise (logs, CI, make) one plain line
    every few seconds, so logs stay readable; disabled, it prints nothing.
    """

    def __init__(self, total: int, unit: str, description: str, *, enabled: bool,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.unit, self.description = total, unit, description
        self.done = 0
        self.enabled = enabled
        self.started = self._last_line = time.monotonic()
        self._bar: tqdm | None = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm  # only for a terminal: tqdm's import costs 40-60 ms

            tqdm.monitor_interval = 0  # no monitor thread: workers are forked while a bar is open
            self._bar = tqdm(total=total, unit=unit, unit_scale=True,
                             unit_divisor=1024 if unit == "B" else 1000, desc=description,
                             file=self.stream, dynamic_ncols=True)

    def advance(self, amount: int) -> None:
        if self.done == 0:  # the rate counts from the first unit of work, not from creation
            self.started = self._last_line = time.monotonic()
        self.done += amount
        if self._bar is not None:
            self._bar.update(amount)
        elif self.enabled and time.monotonic() - self._last_line >= LOG_INTERVAL_S:
            self._last_line = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        share = self.done / self.total if self.total else 1.0
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate and elapsed > 1 else "?"
        done = human_bytes(self.done) if self.unit == "B" else f"{self.done}"
        return (f"{self.description}: {done}/{self._amount(self.total)} "
                f"({share:.0%}), {self._amount(rate)}/s, ETA {eta}")

    def _amount(self, value: float) -> str:
        return human_bytes(value) if self.unit == "B" else f"{value:.0f} {self.unit}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
