"""Input checks of the fit: paired arrays, one chunk at a time, with errors that name the fix."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._util.arrays import as_numpy


def as_matrix(x: Any, name: str) -> np.ndarray:
    """``x`` as a 2-D numpy array of a real number dtype (not copied when it already is one)."""
    try:
        a, _ = as_numpy(x, name, copy_from_device=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a 2-D array of floats, got {type(x).__name__} ({e})") from e
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers (float or int), got dtype {a.dtype}; "
                        f"convert it with np.asarray({name}, dtype=np.float32)")
    if a.ndim != 2:
        if a.ndim == 1:
            raise ValueError(f"{name}: expected a 2-D array (n_pairs, dim), got a 1-D array of shape {a.shape}; "
                             f"reshape it with {name}.reshape(1, -1) for one pair or {name}.reshape(-1, 1) for "
                             "one feature")
        raise ValueError(f"{name}: expected a 2-D array (n_pairs, dim), got {a.ndim}-D of shape {a.shape}")
    if a.shape[1] == 0:
        raise ValueError(f"{name} has 0 columns; embeddings need at least one dimension")
    return a


def first_bad_rows(x: np.ndarray) -> tuple[int, int]:
    """Number of rows holding NaN or Inf and the index of the first (-1 when none)."""
    bad = ~np.isfinite(x).all(axis=1)
    count = int(bad.sum())
    return count, (int(np.argmax(bad)) if count else -1)


def check_finite(x: np.ndarray, name: str, offset: int = 0) -> None:
    """Refuse rows with NaN or Inf, naming how many and the first (global) row index."""
    if x.dtype.kind != "f" or np.isfinite(x).all():
        return
    count, first = first_bad_rows(x)
    raise ValueError(f"{name} has {count} row(s) with NaN or Inf (first: row {offset + first}); drop those pairs "
                     "from both arrays first, e.g. keep = np.isfinite(X_src).all(1) & np.isfinite(X_dst).all(1)")


def check_pair_chunk(x: Any, y: Any, offset: int = 0, dims: tuple[int, int] | None = None,
                     names: tuple[str, str] = ("X_src", "X_dst"), *, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Check one chunk of pairs (rows ``offset ...``); return both as 2-D numpy arrays.

    ``finite=False`` leaves the NaN/Inf check to the caller (the chunked accumulation does it
    chunk by chunk, so a large array is not scanned twice).
    """
    xs, ys = as_matrix(x, names[0]), as_matrix(y, names[1])
    if xs.shape[0] != ys.shape[0]:
        where = f" in the chunk starting at row {offset}" if offset else ""
        raise ValueError(f"{names[0]} has {xs.shape[0]} rows but {names[1]} has {ys.shape[0]}{where}: pairs must be "
                         "the same items in the same order, one row each")
    if dims is not None and (xs.shape[1], ys.shape[1]) != dims:
        raise ValueError(f"the chunk starting at row {offset} has dims ({xs.shape[1]}, {ys.shape[1]}) but the "
                         f"first chunk had {dims}; every chunk must have the same two dimensions")
    if finite:
        check_finite(xs, names[0], offset)
        check_finite(ys, names[1], offset)
    return xs, ys


def check_features(x: Any, d_in: int, name: str = "X") -> np.ndarray:
    """A batch for ``transform``: 2-D with ``d_in`` columns."""
    a = as_matrix(x, name)
    if a.shape[1] != d_in:
        raise ValueError(f"{name} has {a.shape[1]} features but the adapter was fitted on {d_in}")
    return a


def check_fraction(v: Any, name: str) -> float:
    """A float in [0, 1)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0.0 <= float(v) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
    return float(v)


def check_alpha(v: Any) -> float | None:
    """None (choose on the validation split) or a finite number >= 0."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not (
            np.isfinite(v) and float(v) >= 0):
        raise ValueError(f"alpha must be None (chosen on the validation split) or a finite number >= 0, got {v!r}")
    return float(v)


def check_int(v: Any, name: str, lo: int = 0) -> int:
    """An int >= lo."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)
