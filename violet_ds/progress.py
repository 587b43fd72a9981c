"""Progress for long jobs, usable from every floor: a tqdm bar when stderr is a terminal, dated plain
lines otherwise (log files, SLURM, pipes), so a log never fills with carriage-return records.

`progress(...)` is a drop-in for `tqdm(...)`; the training loop's own progress (`engine.logging.TrainProgress`)
formats its step lines with the same date format and duration.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import sys
import time
from typing import Any, Optional

from tqdm.auto import tqdm

DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# lines per job at least (one per 5%)
STEP_LINES = 20
# open `quiet()` blocks
_QUIET = [0]


def stderr_is_terminal() -> bool:
    """True when stderr is an interactive terminal (progress bars belong there and nowhere else)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def format_duration(seconds: float) -> str:
    """`1:02:03`, or `3d 4:05:06` past a day; `?` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    days, rest = divmod(int(round(seconds)), 86400)
    text = str(datetime.timedelta(seconds=rest))
    return f"{days}d {text}" if days else text


class LineProgress:
    """tqdm's interface for non-terminals: a dated plain line at least every 5% of `total` (and at the
    end) instead of carriage-return redraws; every `min_interval_s` seconds when the total is unknown."""

    def __init__(self, iterable=None, *, total: Optional[int] = None, desc: str = "", unit: str = "it",
                 initial: int = 0, min_interval_s: float = 60.0, stream=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.initial, self.min_interval_s = initial, min_interval_s
        self.stream = stream
        self.started = self._last_time = time.time()
        self._every = max(1, total // STEP_LINES) if total else 0
        self._last_line = initial
        self._postfix = ""
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self._postfix = " " + " ".join(f"{key}={value}" for key, value in values.items()) if values else ""

    def _line(self) -> None:
        elapsed = time.time() - self.started
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else math.nan
            where = f"{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
            tail = f" ETA {format_duration(eta)}"
        else:
            where, tail = f"{self.n} {self.unit}", ""
        stamp = time.strftime(DATE_FORMAT)
        print(f"{stamp} {self.desc}: {where} {rate:.1f} {self.unit}/s elapsed {format_duration(elapsed)}{tail}"
              f"{self._postfix}", file=self.stream or sys.stderr, flush=True)
        self._last_line, self._last_time = self.n, time.time()

    def update(self, count: int = 1) -> None:
        self.n += count
        if self._every:
            if self.n // self._every > self._last_line // self._every or self.n == self.total:
                self._line()
        elif time.time() - self._last_time >= self.min_interval_s:
            self._line()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n != self._last_line:
            self._line()


@contextlib.contextmanager
def quiet():
    """No progress while the block runs: `progress(...)` gives silent bars (e.g. an evaluation with
    `run.progress false`, including the loops a task runs itself)."""
    _QUIET[0] += 1
    try:
        yield
    finally:
        _QUIET[0] -= 1


def progress(iterable=None, *, total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0,
             leave: bool = True, enabled: bool = True):
    """A tqdm bar when stderr is a terminal, `LineProgress` lines otherwise (a drop-in for `tqdm(...)`);
    nothing when not `enabled` or inside `quiet()`."""
    enabled = enabled and not _QUIET[0]
    if enabled and stderr_is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    if not enabled:
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
