"""Progress of the long silent steps (scanning, converting, the frozen pass) on stderr.

On a terminal: one bar redrawn in place, with rate and time left. Elsewhere (CI, a log file):
a plain line every few seconds, so a log shows the run is alive without thousands of lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

LINE_EVERY = 5.0  # seconds between lines when stderr is not a terminal
REDRAW_EVERY = 0.1  # seconds between redraws of the bar on a terminal
BAR = 28


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``update(done)`` as work finishes; ``close()`` prints the final count and time."""

    def __init__(self, label: str, total: int, stream=None, every: float = LINE_EVERY):
        self.label, self.total = label, max(int(total), 0)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every
        self.start = time.perf_counter()
        self._last = self.start
        self.done = 0
        self._closed = False

    def _rate(self, now: float) -> float:
        return self.done / max(now - self.start, 1e-9)

    def _text(self, now: float) -> str:
        rate = self._rate(now)
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = _clock(left) if left == left else "?"
        pct = 100 * self.done / self.total if self.total else 100.0
        return f"{self.done}/{self.total} ({pct:.0f}%), {rate:.1f}/s, {eta} left"

    def update(self, done: int) -> None:
        self.done = min(int(done), self.total)
        now = time.perf_counter()
        if self.tty:
            if now - self._last < REDRAW_EVERY and self.done < self.total:
                return
            self._last = now
            filled = BAR * self.done // self.total if self.total else BAR
            self.stream.write(f"\r{self.label} [{'=' * filled}{'.' * (BAR - filled)}] "
                              f"{self._text(now)}\033[K")
            self.stream.flush()
        elif now - self._last >= self.every and self.done < self.total:
            self._last = now
            print(f"{self.label}: {self._text(now)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        seconds = time.perf_counter() - self.start
        end = f"{self.label}: {self.done}/{self.total} in {seconds:.1f} s"
        if self.tty:
            self.stream.write(f"\r{end}\033[K\n")
            self.stream.flush()
        elif seconds >= self.every:  # a quick step needs no line of its own in a log
            print(end, file=self.stream, flush=True)


# ``make(label, total)``: a bar for a step of ``total`` items, or None (no progress wanted).
ProgressFactory = Callable[[str, int], "Progress | None"]


def progress_factory(enabled: bool) -> ProgressFactory:
    """``make(label, total)`` -> a ``Progress``, or None when progress is not wanted."""
    def make(label: str, total: int) -> Progress | None:
        return Progress(label, total) if enabled and total > 0 else None

    return make
