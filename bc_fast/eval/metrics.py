"""Metrics in plain numpy: ROC-AUC (with ties) and Recall@K."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["roc_auc", "roc_auc_macro", "recall_at_k"]


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

    Parameters
    ----------
    scores : array of shape (n_rows, n_items)
    positives : sequence of n_rows integer arrays
        Relevant item ids of each row (non-empty).
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
        On shape mismatch, ``k < 1`` or a row without positives.
    """
    s = np.array(scores, dtype=np.float64, copy=True)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (n_rows, n_items), got shape {s.shape}")
    if len(positives) != s.shape[0]:
        raise ValueError(f"got {len(positives)} positive lists for {s.shape[0]} score rows")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if exclude is not None:
        if len(exclude) != s.shape[0]:
            raise ValueError(f"got {len(exclude)} exclude lists for {s.shape[0]} score rows")
        for r, ex in enumerate(exclude):
            if len(ex):
                s[r, np.asarray(ex, dtype=np.int64)] = -np.inf
    kk = min(int(k), s.shape[1])
    out = np.empty(s.shape[0], dtype=np.float64)
    for r in range(s.shape[0]):
        pos = np.unique(np.asarray(positives[r], dtype=np.int64))
        if pos.size == 0:
            raise ValueError(f"row {r} has no positives")
        # stable descending order: sort by (-score, item id)
        top = np.lexsort((np.arange(s.shape[1]), -s[r]))[:kk]
        out[r] = np.isin(top, pos).sum() / pos.size
    return out
