"""A tiny progress bar for long row-wise jobs (index builds, table conversion).

On a TTY it redraws one line (rows done, percent, rows/s, ETA) at most ten times a
second; elsewhere (pipes, CI logs, tests) it is silent unless asked.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["Progress"]


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _fmt_time(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """Rows done, rows/s and ETA on one redrawn line.

    Parameters
    ----------
    total : int or None
        Rows expected; None when unknown (no percent or ETA).
    desc : str
        Label printed before the counts.
    enabled : bool or None, default None
        None shows the bar only when ``stream`` is a TTY.
    stream : file, default sys.stderr
    min_interval : float, default 0.1
        Seconds between redraws.

    Examples
    --------
    >>> with Progress(1000, "convert", enabled=False) as bar:
    ...     for _ in range(10):
    ...         bar.update(100)
    >>> bar.n
    1000
    """

    def __init__(self, total: int | None, desc: str = "", *, enabled: bool | None = None,
                 stream: IO[str] | None = None, min_interval: float = 0.1) -> None:
        self.total = None if total is None else int(total)
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = bool(enabled)
        self.min_interval = float(min_interval)
        self.n = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._closed = False
        self._width = 0

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Rows per second so far."""
        e = self.elapsed
        return self.n / e if e > 0 else 0.0

    def format(self) -> str:
        """The current status line (without carriage return)."""
        rate = self.rate
        parts = [f"{self.desc}: " if self.desc else ""]
        if self.total:
            pct = 100.0 * self.n / self.total
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            parts.append(f"{_fmt_count(self.n)}/{_fmt_count(self.total)} rows ({pct:5.1f}%) "
                         f"{_fmt_count(rate)} rows/s, elapsed {_fmt_time(self.elapsed)}, ETA {_fmt_time(eta)}")
        else:
            parts.append(f"{_fmt_count(self.n)} rows {_fmt_count(rate)} rows/s, elapsed {_fmt_time(self.elapsed)}")
        return "".join(parts)

    def _draw(self, final: bool = False) -> None:
        line = self.format()
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + pad + ("\n" if final else ""))
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        """Record ``n`` more rows done; redraw if enough time has passed."""
        self.n += int(n)
        if not self.enabled or self._closed:
            return
        now = time.perf_counter()
        if now - self._last_draw >= self.min_interval or (self.total is not None and self.n >= self.total):
            self._last_draw = now
            self._draw()

    def close(self) -> None:
        """Draw the final line and end it with a newline (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
