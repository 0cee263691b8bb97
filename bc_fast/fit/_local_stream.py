"""The two passes of the streaming local fit (:meth:`bc_fast.fit.LocalAdapter.fit_chunks`).

Pass 1 (:func:`first_pass`) accumulates the global training and validation sums of every row
(:func:`~bc_fast.fit._gram.accumulate_pairs`, the hashed split of :func:`~bc_fast.fit._gram.val_mask`)
and keeps two bounded samples: at most ``sample_rows`` training rows (k-means and the settings
search) and at most ``val_rows`` validation rows (the search's scores). A row is sampled when the
hash of its global row index is among the smallest seen (bottom-k sampling: a uniform sample that
does not depend on how the pairs are chunked), and the samples are returned in row order, so a
sample that covers every row equals the in-memory fit's arrays exactly.

Pass 2 (:func:`cluster_pass`) routes every row to its nearest chosen centroid and adds it to its
cluster's float64 sums (training and validation rows apart). Memory: the samples, one chunk and
2k :class:`~bc_fast.fit._gram.Gram` (O(k d^2)), never O(n).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import check_pair_chunk
from ._gram import (
    _GOLDEN,
    Gram,
    PairStats,
    Workspace,
    _accumulate_gram,
    _splitmix64,
    _splitmix_int,
    accumulate_pairs,
    val_mask,
)
from ._routing import route

DEFAULT_SAMPLE_ROWS = 50_000
DEFAULT_VAL_ROWS = 5_000
_SAMPLE_SALT = 0xD1B54A32D192ED03  # keys independent of the validation split's hash

ChunkFactory = Callable[[], Iterable[tuple[Any, Any]]]


def as_chunk_factory(pairs: Any) -> ChunkFactory:
    """``pairs`` as a callable returning a fresh iterable of chunks: a callable is kept, a re-iterable
    collection (list, tuple) is wrapped; a one-shot iterator or generator is refused (the fit reads twice)."""
    if callable(pairs):
        return pairs
    if isinstance(pairs, Iterator) or not isinstance(pairs, Iterable):
        raise TypeError(f"the local fit reads the pairs twice, so it needs a callable returning a fresh iterator of "
                        f"(X_src_chunk, X_dst_chunk), got {type(pairs).__name__}; pass e.g. "
                        "lambda: npy_pair_chunks(src, dst) or a list of chunks (a generator is used up by one pass)")
    return lambda: iter(pairs)


def _open(make_chunks: ChunkFactory, which: str) -> Iterator[tuple[Any, Any]]:
    chunks = make_chunks()
    if not isinstance(chunks, Iterable):
        raise TypeError(f"make_chunks() must return an iterable of (X_src_chunk, X_dst_chunk) pairs; the {which} "
                        f"pass got {type(chunks).__name__}")
    return iter(chunks)


def _row_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """The sampling key of global row indices (splitmix64: distinct for distinct rows)."""
    base = np.uint64((_splitmix_int(seed) ^ _SAMPLE_SALT) & ((1 << 64) - 1))
    return _splitmix64(rows.astype(np.uint64) * np.uint64(_GOLDEN) + base)


class BottomKSample:
    """The (at most) ``cap`` rows with the smallest keys of all rows offered, kept in bounded memory."""

    def __init__(self, cap: int, seed: int) -> None:
        self.cap, self.seed = int(cap), int(seed)
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # (keys, rows, x, y)
        self._held = 0
        self._limit: np.uint64 | None = None  # largest kept key once `cap` rows are held
        self.offered = 0

    def add(self, start: int, x: np.ndarray, y: np.ndarray, which: np.ndarray) -> None:
        """Offer rows ``start + i`` for ``i`` where ``which`` is True (rows of one chunk)."""
        local = np.nonzero(which)[0]
        self.offered += local.shape[0]
        if self.cap == 0 or local.shape[0] == 0:
            return
        keys = _row_keys(start + local, self.seed)
        if self._limit is not None:
            keep = keys < self._limit
            local, keys = local[keep], keys[keep]
        if local.shape[0] == 0:
            return
        self._parts.append((keys, start + local, x[local], y[local]))  # fancy indexing: copies, no chunk view
        self._held += local.shape[0]
        if self._held > 2 * self.cap:
            self._prune()

    def _prune(self) -> None:
        keys, rows, xs, ys = (np.concatenate([p[i] for p in self._parts]) for i in range(4))
        if keys.shape[0] > self.cap:
            keep = np.argpartition(keys, self.cap - 1)[:self.cap]
            keys, rows, xs, ys = keys[keep], rows[keep], xs[keep], ys[keep]
        if keys.shape[0] >= self.cap:
            self._limit = keys.max()
        self._parts, self._held = [(keys, rows, xs, ys)], keys.shape[0]

    def arrays(self, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
        """The sampled ``(x, y)`` in row order."""
        if not self._parts:
            return np.zeros((0, d_in)), np.zeros((0, d_out))
        self._prune()
        _, rows, xs, ys = self._parts[0]
        order = np.argsort(rows)
        return xs[order], ys[order]


@dataclass
class FirstPass:
    """What pass 1 keeps: the global sums and the two samples."""

    stats: PairStats
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def train_sampled(self) -> bool:
        """Whether the training sample misses some training rows."""
        return self.x_train.shape[0] < self.stats.train.n


def first_pass(make_chunks: ChunkFactory, val_fraction: float, random_state: int, sample_rows: int,
               val_rows: int) -> FirstPass:
    """Pass 1: global sums of all rows and the bounded training / validation samples (see the module docstring)."""
    train, val = BottomKSample(sample_rows, random_state), BottomKSample(val_rows, random_state)

    def tapped() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        start, dims = 0, None
        for x, y in _open(make_chunks, "first"):
            xs, ys = check_pair_chunk(x, y, start, dims, finite=False)
            if xs.shape[0] == 0:
                continue
            dims = (xs.shape[1], ys.shape[1])
            yield xs, ys  # accumulate_pairs checks NaN/Inf and adds the chunk before asking for the next one
            is_val = val_mask(start, xs.shape[0], val_fraction, random_state)
            train.add(start, xs, ys, ~is_val)
            val.add(start, xs, ys, is_val)
            start += xs.shape[0]

    stats = accumulate_pairs(tapped(), val_fraction=val_fraction, random_state=random_state)
    xt, yt = train.arrays(stats.d_src, stats.d_dst)
    xv, yv = val.arrays(stats.d_src, stats.d_dst)
    return FirstPass(stats, xt, yt, xv, yv)


def add_cluster_sums(grams: list[Gram], x: np.ndarray, y: np.ndarray, assign: np.ndarray, ws: Workspace) -> None:
    """Add the rows of one chunk to the sums of their clusters (``assign``: one cluster index per row)."""
    for c in np.unique(assign):
        rows = assign == c
        _accumulate_gram(grams[c], x[rows], y[rows], ws)


def cluster_pass(make_chunks: ChunkFactory, centroids: np.ndarray, stats: PairStats) -> tuple[list[Gram], list[Gram]]:
    """Pass 2: per-cluster float64 sums of the training rows and of the validation rows, every row routed
    to its nearest centroid. Refuses chunks that differ from pass 1 in row count or dimensions."""
    k = centroids.shape[0]
    shift = stats.train
    train = [Gram(shift.shift_x, shift.shift_y) for _ in range(k)]
    val = [Gram(shift.shift_x, shift.shift_y) for _ in range(k)]
    ws, start, dims = Workspace(), 0, (stats.d_src, stats.d_dst)
    for x, y in _open(make_chunks, "second"):
        xs, ys = check_pair_chunk(x, y, start, dims)
        n = xs.shape[0]
        if n == 0:
            continue
        if start + n > stats.n:
            raise ValueError(f"the second pass over the chunks read more than the {stats.n} pairs of the first: "
                             "make_chunks must return the same pairs in the same order on every call")
        assign = route(xs, centroids, 1, 1.0)[0][:, 0]
        is_val = val_mask(start, n, stats.val_fraction, stats.random_state)
        if is_val.any():
            add_cluster_sums(val, xs[is_val], ys[is_val], assign[is_val], ws)
            add_cluster_sums(train, xs[~is_val], ys[~is_val], assign[~is_val], ws)
        else:
            add_cluster_sums(train, xs, ys, assign, ws)
        start += n
    if start != stats.n:
        raise ValueError(f"the second pass over the chunks read {start} pairs but the first read {stats.n}: "
                         "make_chunks must return a fresh iterator over the same pairs on every call (a used "
                         "generator yields nothing)")
    return train, val
