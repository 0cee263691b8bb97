"""Metrics in plain numpy: ROC-AUC (with ties) and Recall@K."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["roc_auc", "roc_auc_macro", "recall_at_k"]

#: recall_at_k works on blocks of rows holding about this many scores (bounds its temporaries).
_BLOCK_SCORES = 1 << 22


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties receiving the mean of their ranks (as scipy.stats.rankdata)."""
    n = x.shape[0]
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.empty(n, dtype=bool)
    first[:1] = True
    first[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(first) - 1
    starts = np.nonzero(first)[0]
    ends = np.append(starts[1:], n)
    avg = 0.5 * (starts + ends - 1) + 1.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve of binary labels (Mann-Whitney U; ties count one half).

    Parameters
    ----------
    y_true : array of shape (n,)
        Binary labels (0/1 or bool).
    y_score : array of shape (n,)
        Scores, higher meaning more likely positive.

    Raises
    ------
    ValueError
        If shapes differ, labels are not binary, scores are not finite, or only one class is present.
    """
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true and y_score must have the same length, got {y.shape[0]} and {s.shape[0]}")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("y_true must contain only 0/1 labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("y_score contains NaN or Inf")
    y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_macro(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Mean ROC-AUC over the columns of a multi-label problem that have both classes.

    Parameters
    ----------
    y_true, y_score : arrays of shape (n, n_labels)

    Raises
    ------
    ValueError
        If shapes differ or no column has both classes.
    """
    y = np.asarray(y_true)
    s = np.asarray(y_score)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"expected two 2-D arrays of equal shape, got {y.shape} and {s.shape}")
    aucs = [roc_auc(y[:, j], s[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < y.shape[0]]
    if not aucs:
        raise ValueError("no label column has both classes")
    return float(np.mean(aucs))


def recall_at_k(scores: np.ndarray, positives: Sequence[np.ndarray], k: int,
                exclude: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Per-row Recall@k: the share of each row's positives found among its top-k scores.

    The one Recall@k of the package, vectorised over rows (in blocks of
    ``_BLOCK_SCORES`` scores): item recommendation (``bc_fast.train.recommender``) and legacy-index
    retention (:func:`bc_fast.eval.retrieval.recall_from_embeddings`) both call it.

    Parameters
    ----------
    scores : array of shape (n_rows, n_items)
        Higher is better; ``-inf`` is allowed, NaN is not.
    positives : sequence of n_rows integer arrays
        Relevant item ids of each row (non-empty; duplicates count once).
    k : int
        Cut-off, ``1 <= k``; values above ``n_items`` act as ``n_items``.
    exclude : sequence of n_rows integer arrays, optional
        Items never recommended to the row (e.g. already-seen items); the reference sets
        their score to a very low value before taking the top k.

    Returns
    -------
    ndarray of float64, shape (n_rows,)
        Ties are broken by item id (lower id first).

    Raises
    ------
    ValueError
        On shape mismatch, ``k < 1``, NaN scores, item ids outside ``[0, n_items)`` or a
        row without positives.
    """
    s_all = np.asarray(scores)
    if s_all.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (n_rows, n_items), got shape {s_all.shape}")
    n, m = s_all.shape
    if len(positives) != n:
        raise ValueError(f"got {len(positives)} positive lists for {n} score rows")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if exclude is not None and len(exclude) != n:
        raise ValueError(f"got {len(exclude)} exclude lists for {n} score rows")
    kk = min(int(k), m)
    # float32/float64 kept (exact for ties); anything else compared in float64
    dt = s_all.dtype if s_all.dtype in (np.float32, np.float64) else np.float64
    out = np.empty(n, dtype=np.float64)
    step = max(1, _BLOCK_SCORES // max(m, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        s = np.array(s_all[r0:r1], dtype=dt)  # a copy: exclusions never touch the caller's scores
        if np.isnan(s).any():
            raise ValueError(f"scores row {r0 + int(np.isnan(s).any(axis=1).argmax())} contains NaN")
        if exclude is not None:
            rows, cols = _ragged(exclude[r0:r1], m, "exclude", r0)
            s[rows, cols] = -np.inf
        rows, cols = _ragged(positives[r0:r1], m, "positives", r0)
        codes = np.unique(rows * m + cols)  # (row, item) pairs, duplicates counted once
        n_pos = np.bincount(codes // m, minlength=r1 - r0)
        if (n_pos == 0).any():
            raise ValueError(f"row {r0 + int(np.argmin(n_pos))} has no positives")
        hits = np.bincount(codes // m, weights=_top_k_mask(s, kk).ravel()[codes], minlength=r1 - r0)
        out[r0:r1] = hits / n_pos
    return out


def _top_k_mask(s: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of each row's k highest scores, ties at the cut broken by lower column index."""
    m = s.shape[1]
    if k >= m:
        return np.ones(s.shape, dtype=bool)
    cut = np.partition(s, m - k, axis=1)[:, m - k, None]  # the k-th largest score of each row
    mask = s > cut
    at = s == cut
    room = k - np.count_nonzero(mask, axis=1)
    tied = np.flatnonzero(np.count_nonzero(at, axis=1) > room)  # rows where the cut splits a tie
    mask |= at
    if tied.size:
        mask[tied] &= ~at[tied] | (np.cumsum(at[tied], axis=1) <= room[tied, None])
    return mask


def _ragged(lists: Sequence[np.ndarray], m: int, name: str, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) index arrays of a list of per-row integer id arrays, ids checked to lie in [0, m)."""
    arrs = [np.asarray(a).reshape(-1) for a in lists]
    for r, a in enumerate(arrs):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name}[{offset + r}] must hold integer item ids, got dtype {a.dtype}")
    lens = np.array([a.size for a in arrs], dtype=np.int64)
    cols = np.concatenate(arrs).astype(np.int64) if arrs and lens.sum() else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(arrs)), lens)
    bad = (cols < 0) | (cols >= m)
    if bad.any():
        r = int(rows[int(np.argmax(bad))])
        raise ValueError(f"{name}[{offset + r}] has item id {int(cols[int(np.argmax(bad))])} outside [0, {m})")
    return rows, cols
