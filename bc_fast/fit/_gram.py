"""Sufficient statistics of paired embeddings, accumulated chunk by chunk in float64.

Every closed-form adapter (ridge, Procrustes, low-rank) needs only these sums of the
pairs ``(x, y)``: the count, ``sum x``, ``sum y``, ``X^T X``, ``X^T Y`` and the column
sums of squares of ``Y``. They are kept separately for the training and validation
rows; the validation rows are picked by a hash of the global row index
(:func:`val_mask`), so a streaming fit over chunks and an in-memory fit over one array
see the same split and give the same result.

Numerics: sums are taken of shifted rows ``x - s_x``, ``y - s_y`` with the shift the
first chunk's mean, so the centred Gram ``X^T X - n m m^T`` never subtracts two large
numbers (embeddings are far from zero-mean: the naive formula loses digits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ._checks import check_fraction, check_int, check_pair_chunk

_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised on uint64 (wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _splitmix_int(seed: int) -> int:
    """The splitmix64 finaliser of one Python int (a per-seed offset)."""
    z = (seed * _GOLDEN + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def val_mask(start: int, n: int, val_fraction: float, random_state: int = 0) -> np.ndarray:
    """Which rows ``start .. start+n-1`` are validation rows (a deterministic hash of the row index).

    Row ``i`` is a validation row when ``splitmix64(i * golden + offset(seed)) / 2**64 < val_fraction``:
    independent of how the pairs are chunked, so streaming and in-memory fits agree.
    """
    if val_fraction <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    base = np.uint64((int(start) * _GOLDEN + _splitmix_int(int(random_state))) & _M64)
    h = _splitmix64(np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN) + base)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < val_fraction


@dataclass
class Gram:
    """Sums over rows of shifted pairs ``x' = x - shift_x``, ``y' = y - shift_y`` (float64)."""

    shift_x: np.ndarray
    shift_y: np.ndarray
    n: int = 0
    sx: np.ndarray = field(init=False)
    sy: np.ndarray = field(init=False)
    xx: np.ndarray = field(init=False)
    xy: np.ndarray = field(init=False)
    yy: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        p, q = self.shift_x.shape[0], self.shift_y.shape[0]
        self.sx, self.sy = np.zeros(p), np.zeros(q)
        self.xx, self.xy, self.yy = np.zeros((p, p)), np.zeros((p, q)), np.zeros(q)

    def __add__(self, other: "Gram") -> "Gram":
        out = Gram(self.shift_x, self.shift_y)
        out.n = self.n + other.n
        for k in ("sx", "sy", "xx", "xy", "yy"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out

    @property
    def mean_x(self) -> np.ndarray:
        """Mean of x (absolute coordinates)."""
        return self.shift_x + self.sx / self.n

    @property
    def mean_y(self) -> np.ndarray:
        """Mean of y (absolute coordinates)."""
        return self.shift_y + self.sy / self.n

    def centred(self) -> tuple[np.ndarray, np.ndarray]:
        """``(Xc^T Xc, Xc^T Yc)`` of the rows centred on their own means."""
        mx, my = self.sx / self.n, self.sy / self.n
        return self.xx - np.outer(self.sx, mx), self.xy - np.outer(self.sx, my)

    def sse(self, wt: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per-output sum of squared residuals of ``y_hat = x @ wt + b`` over these rows, from the sums alone."""
        e = self.shift_y - self.shift_x @ wt - b  # residual offset in shifted coordinates
        cross = np.einsum("ij,ij->j", wt, self.xy)
        quad = np.einsum("ij,ij->j", wt, self.xx @ wt)
        lin = self.sy - self.sx @ wt
        return np.maximum(self.yy - 2 * cross + quad + 2 * e * lin + self.n * e * e, 0.0)

    def scores(self, wt: np.ndarray, b: np.ndarray) -> dict[str, float]:
        """Mean squared error (per element) and R^2 (uniform average over outputs) of a map on these rows."""
        sse = self.sse(wt, b)
        sst = np.maximum(self.yy - self.sy**2 / self.n, 0.0)
        return {"mse": float(sse.sum() / (self.n * sse.shape[0])), "r2": r2_from_sums(sse, sst)}


def r2_from_sums(sse: np.ndarray, sst: np.ndarray) -> float:
    """R^2 averaged uniformly over outputs from per-output residual and total sums of squares.

    An output whose total sum of squares is below 1e-12 of the mean over outputs counts as
    constant (real embeddings have such dead dimensions: all-MiniLM-L6-v2 has three with variance
    < 1e-16, which would make the average -1e31): it scores 1 if predicted to that precision, else 0
    (scikit-learn's convention for exactly constant outputs).
    """
    tiny = 1e-12 * float(sst.mean()) if sst.size and sst.mean() > 0 else 0.0
    ok = sst > tiny
    r2 = np.where(ok, 1.0 - sse / np.where(ok, sst, 1.0), np.where(sse <= max(tiny, 1e-300), 1.0, 0.0))
    return float(r2.mean())


class Workspace:
    """Scratch buffers reused from chunk to chunk: fresh pages are slow to touch on the project's VMs
    (0.3-0.5 GB/s), so one float64 copy per chunk must not be a new allocation each time."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, rows: int, cols: int, dtype: np.dtype) -> np.ndarray:
        """A (rows, cols) array of ``dtype``, a view of a buffer kept for the next chunk."""
        b = self._bufs.get(name)
        if b is None or b.shape[0] < rows or b.shape[1] != cols or b.dtype != dtype:
            b = self._bufs[name] = np.empty((rows, cols), dtype=dtype)
        return b[:rows]


def _accumulate_gram(g: Gram, x: np.ndarray, y: np.ndarray, ws: Workspace | None = None) -> None:
    """Add one chunk of pairs to ``g`` in place: the single place where the sums are computed.

    The chunk is shifted and converted to float64 in one pass (into reused buffers), then
    ``X^T X`` (BLAS syrk: numpy recognises ``a.T @ a``) and ``X^T Y`` (gemm) are float64 BLAS calls.
    """
    n = x.shape[0]
    if n == 0:
        return
    ws = ws or Workspace()
    xs = np.subtract(x, g.shift_x, out=ws.get("x64", n, x.shape[1], np.dtype(np.float64)))
    ys = np.subtract(y, g.shift_y, out=ws.get("y64", n, y.shape[1], np.dtype(np.float64)))
    g.n += n
    g.sx += xs.sum(axis=0)
    g.sy += ys.sum(axis=0)
    g.xx += xs.T @ xs
    g.xy += xs.T @ ys
    g.yy += np.einsum("ij,ij->j", ys, ys)


def _rows(a: np.ndarray, keep: np.ndarray, k: int, name: str, ws: Workspace) -> np.ndarray:
    """``a[keep]`` (k rows) copied into a reused buffer."""
    return np.compress(keep, a, axis=0, out=ws.get(name, k, a.shape[1], a.dtype))


@dataclass
class PairStats:
    """Training and validation sums of one pass over the pairs."""

    train: Gram
    val: Gram
    val_fraction: float
    random_state: int
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # decompositions shared by adapters

    @property
    def d_src(self) -> int:
        """Source dimension."""
        return int(self.train.shift_x.shape[0])

    @property
    def d_dst(self) -> int:
        """Target dimension."""
        return int(self.train.shift_y.shape[0])

    @property
    def n(self) -> int:
        """Number of pairs seen."""
        return self.train.n + self.val.n

    def both(self) -> Gram:
        """Training and validation rows together."""
        if "both" not in self.cache:
            self.cache["both"] = self.train + self.val
        return self.cache["both"]


def accumulate_pairs(chunks: Iterable[tuple[np.ndarray, np.ndarray]], *, val_fraction: float = 0.1,
                     random_state: int = 0) -> PairStats:
    """One pass over chunks of pairs ``(X_src_chunk, X_dst_chunk)``: the sums every closed-form fit needs.

    Never holds more than one chunk (plus its float64 copy). Rows are split into training and
    validation rows by :func:`val_mask` of their global index.
    """
    val_fraction = check_fraction(val_fraction, "val_fraction")
    random_state = check_int(random_state, "random_state")
    stats: PairStats | None = None
    start = 0
    ws = Workspace()
    for x, y in chunks:
        x, y = check_pair_chunk(x, y, start, None if stats is None else (stats.d_src, stats.d_dst))
        if x.shape[0] == 0:
            continue
        if stats is None:
            sx, sy = x.mean(axis=0, dtype=np.float64), y.mean(axis=0, dtype=np.float64)
            stats = PairStats(Gram(sx, sy), Gram(sx, sy), val_fraction, random_state)
        m = val_mask(start, x.shape[0], val_fraction, random_state)
        n_val = int(m.sum())
        if n_val:
            _accumulate_gram(stats.val, x[m], y[m], ws)
            keep, k = ~m, x.shape[0] - n_val
            _accumulate_gram(stats.train, _rows(x, keep, k, "x_in", ws), _rows(y, keep, k, "y_in", ws), ws)
        else:
            _accumulate_gram(stats.train, x, y, ws)
        start += x.shape[0]
    if stats is None:
        raise ValueError("no pairs: the input is empty; pass at least a few pairs (X_src, X_dst) with the same rows")
    return stats


def array_chunks(x: np.ndarray, y: np.ndarray, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Row blocks of two in-memory (or memory-mapped) arrays."""
    for s in range(0, max(x.shape[0], 1), chunk_rows):
        yield x[s:s + chunk_rows], y[s:s + chunk_rows]
