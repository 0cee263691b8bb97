"""Progress bars for long row-wise jobs (index builds, table conversion), drawn by ``tqdm``.

:class:`Progress` is a thin wrapper that keeps the small API the rest of bc_fast uses
(``Progress(total, desc, enabled=..., stream=..., min_interval=...)``, ``update``,
``close``, context manager, ``n``) and the one-line look (rows done, percent, rows/s,
ETA). By default the bar shows on a terminal and in a Jupyter notebook (a widget, via
``tqdm.auto``); in pipes, CI logs and tests it is silent unless asked.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["Progress"]

_FORMAT = ("{desc}: {n_short}/{total_short} rows ({percentage:5.1f}%) |{bar:20}| {rate_short} rows/s, "
           "elapsed {elapsed}, ETA {remaining}")
_FORMAT_UNKNOWN_TOTAL = "{desc}: {n_short} rows {rate_short} rows/s, elapsed {elapsed}"


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _in_notebook() -> bool:
    """True inside a Jupyter kernel with widgets, where ``tqdm.auto`` draws a notebook bar."""
    if "IPython" not in sys.modules:  # a kernel has imported it; do not pay for importing it here
        return False
    import tqdm.auto  # noqa: F401  (imports tqdm.autonotebook without its experimental warning)
    import tqdm.autonotebook
    import tqdm.std
    return tqdm.autonotebook.tqdm is not tqdm.std.tqdm


def _bar_class(notebook: bool) -> type:
    """A tqdm class whose format fields include short counts (1.0k, 2.5M) for the bc_fast look."""
    if notebook:
        from tqdm.auto import tqdm as base
    else:
        from tqdm.std import tqdm as base

    class _Bar(base):  # type: ignore[misc, valid-type]
        @property
        def format_dict(self) -> dict:
            d = super().format_dict
            elapsed = d.get("elapsed") or 0.0
            rate = d.get("rate") or (d["n"] / elapsed if elapsed > 0 else 0.0)
            d.update(n_short=_fmt_count(d["n"]), total_short=_fmt_count(d.get("total")),
                     rate_short=_fmt_count(rate))
            return d

    return _Bar


class Progress:
    """Rows done, percent, rows/s and ETA, drawn by tqdm.

    Parameters
    ----------
    total : int or None
        Rows expected; None when unknown (no percent or ETA).
    desc : str
        Label printed before the counts.
    enabled : bool or None, default None
        None shows the bar only when ``stream`` is a TTY or the code runs in a Jupyter
        notebook; False is quiet (counts are still kept in ``n``).
    stream : file, default sys.stderr
        Where a text bar is drawn (a notebook bar is a widget).
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
        notebook = enabled is not False and stream is None and _in_notebook()
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = notebook or bool(isatty and isatty())
        self.enabled = bool(enabled)
        self.n = 0
        self.start = time.perf_counter()
        self._bar: Any = None
        if self.enabled:
            cls = _bar_class(notebook)
            self._bar = cls(total=self.total, desc=desc, file=self.stream, mininterval=float(min_interval),
                            miniters=1, dynamic_ncols=True, leave=True,
                            bar_format=self._format())

    def _format(self) -> str:
        fmt = _FORMAT if self.total else _FORMAT_UNKNOWN_TOTAL
        return fmt if self.desc else fmt.replace("{desc}: ", "")

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Rows per second so far."""
        e = self.elapsed
        return self.n / e if e > 0 else 0.0

    def update(self, n: int = 1) -> None:
        """Record ``n`` more rows done; tqdm redraws when enough time has passed."""
        self.n += int(n)
        if self._bar is not None:
            self._bar.update(int(n))

    def close(self) -> None:
        """Draw the final line and end it with a newline (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
