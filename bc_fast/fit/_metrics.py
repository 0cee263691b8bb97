"""Validation metrics of a fitted adapter: R^2, cosine, neighbour overlap@k."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..eval.retrieval import overlap_at_k, unit_rows
from ..index.faiss_utils import _faiss, blas_threshold, blas_threshold_for
from ._base import r2_uniform
from ._checks import check_int, check_pair_chunk


def neighbour_overlap(pred: np.ndarray, target: np.ndarray, k: int = 10) -> float:
    """Mean share of each target's true top-k cosine neighbours (among all targets) that a search
    with its prediction finds (exact search, faiss IndexFlatIP over the normalised targets)."""
    faiss = _faiss()
    t, p = unit_rows(target), unit_rows(pred)
    k = min(int(k), t.shape[0])
    index = faiss.IndexFlatIP(t.shape[1])
    index.add(t)
    with blas_threshold(blas_threshold_for(t.shape[1])):
        _, i_true = index.search(t, k)
        _, i_pred = index.search(p, k)
    return overlap_at_k(i_true, i_pred, k)


def fit_metrics(est: Any, X_src_val: Any, X_dst_val: Any, k: int = 10) -> dict[str, float]:
    """Metrics of ``est.transform(X_src_val)`` against ``X_dst_val`` (held-out pairs).

    Returns
    -------
    dict with ``r2`` (uniform average over outputs), ``cosine`` (mean cosine of prediction and
    target), ``neighbour_overlap`` (at ``k``, see :func:`neighbour_overlap`), ``mse`` (per
    element), ``k`` and ``n`` (rows). The prediction runs in float32 through the compiled core.
    """
    k = check_int(k, "k", 1)
    x, y = check_pair_chunk(X_src_val, X_dst_val, names=("X_src_val", "X_dst_val"))
    if x.shape[0] < 2:
        raise ValueError(f"fit_metrics needs at least 2 validation pairs, got {x.shape[0]}")
    pred = np.asarray(est.transform(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float64)
    y64 = np.asarray(y, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(pred, axis=1) * np.linalg.norm(y64, axis=1), 1e-300)
    cos = (pred * y64).sum(axis=1) / norms
    return {"r2": r2_uniform(y64, pred), "cosine": float(cos.mean()),
            "neighbour_overlap": neighbour_overlap(pred, y64, k), "mse": float(((pred - y64) ** 2).mean()),
            "k": min(k, x.shape[0]), "n": int(x.shape[0])}
