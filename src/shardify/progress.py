"""Progress for long work: a live tqdm bar on a terminal, a plain line every few seconds in logs."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm

LOG_INTERVAL_S = 5.0
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {figures}"


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class Progress:
    """Counts work done (bytes when `unit` is "B", else items) toward a known total.

    On a terminal it is a tqdm bar with rate and ETA; otherwise (logs, CI, make, or a terminal
    of unknown width, where a bar shows nothing) one plain line every few seconds, so logs stay
    readable; disabled, it prints nothing. Both count in the summary's units (KiB, MiB, GiB).
    """

    def __init__(self, total: int, unit: str, description: str, *, enabled: bool,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.unit, self.description = total, unit, description
        self.done = 0
        self.enabled = enabled
        self.started = self._last_line = time.monotonic()
        self._bar: tqdm | None = None
        if enabled and _terminal_width(self.stream) > 0:
            self._bar = _terminal_bar(total, description, self.stream, self._bar_figures)

    def advance(self, amount: int) -> None:
        if self.done == 0:  # the rate counts from the first unit of work, not from creation
            self.started = self._last_line = time.monotonic()
        self.done += amount
        if self._bar is not None:
            self._bar.update(amount)
        elif self.enabled and time.monotonic() - self._last_line >= LOG_INTERVAL_S:
            self._last_line = time.monotonic()
            try:
                print(self.line(), file=self.stream, flush=True)
            except BrokenPipeError:  # `2>&1 | head`: the work goes on, without progress
                self.enabled = False

    def line(self) -> str:
        done, total, share, rate, eta = self._figures()
        return f"{self.description}: {done}/{total} ({share}), {rate}/s, ETA {eta}"

    def _bar_figures(self) -> str:
        """The bar's right side: the log line's figures, its share shown by the bar itself."""
        done, total, _, rate, eta = self._figures()
        return f"{done}/{total}, {rate}/s, ETA {eta}"

    def _figures(self) -> tuple[str, str, str, str, str]:
        """Done, total, share, rate and ETA, as shown."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        share = self.done / self.total if self.total else 1.0
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate and elapsed > 1 else "?"
        done = human_bytes(self.done) if self.unit == "B" else f"{self.done}"
        return done, self._amount(self.total), f"{share:.0%}", self._amount(rate), eta

    def _amount(self, value: float) -> str:
        return human_bytes(value) if self.unit == "B" else f"{value:.0f} {self.unit}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _terminal_width(stream: TextIO) -> int:
    """Columns of the terminal `stream` is, or 0 if it is none or its size is unknown (a pty
    left at 0x0, as `script` makes)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (OSError, ValueError):  # no file descriptor (a StringIO), or not a terminal
        return 0


def _terminal_bar(total: int, description: str, stream: TextIO,
                  figures: Callable[[], str]) -> tqdm:
    """A tqdm bar whose figures are `figures()`, computed only when tqdm redraws."""
    from tqdm import tqdm  # only for a terminal: tqdm's import costs 40-60 ms

    class Bar(tqdm):
        @property
        def format_dict(self) -> dict:
            return {**super().format_dict, "figures": figures()}

    Bar.monitor_interval = 0  # no monitor thread: workers are forked while a bar is open
    return Bar(total=total, desc=description, file=stream, dynamic_ncols=True,
               bar_format=BAR_FORMAT)
