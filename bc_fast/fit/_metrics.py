"""Validation metrics of a fitted adapter: R^2, cosine, neighbour overlap@k."""

from __future__ import annotations

from collections.abc import Sequence
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


#: How ``auto`` and ``local`` choose among candidates (see :func:`selection_key`).
SELECT_BY = ("overlap", "labels", "mse")


def check_labels(labels: Any, n: int) -> np.ndarray | None:
    """``labels`` as an int64 vector of ``n`` pair labels (None stays None)."""
    if labels is None:
        return None
    lab = np.asarray(labels)
    if lab.shape != (n,) or lab.dtype.kind not in "iub":
        raise ValueError(f"labels must be a 1-D integer array with one label per pair ({n}), got "
                         f"{lab.dtype} of shape {lab.shape}")
    return lab.astype(np.int64)


def label_precision(pred: np.ndarray, target: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean share of the ``k`` nearest other targets (cosine, exact) of each prediction that carry its row's label.

    Row i's own target is left out of its results (it always has the same label).
    """
    faiss = _faiss()
    t, p = unit_rows(target), unit_rows(pred)
    n = t.shape[0]
    kk = min(int(k), n - 1)
    if kk < 1:
        raise ValueError(f"label precision needs at least 2 rows, got {n}")
    index = faiss.IndexFlatIP(t.shape[1])
    index.add(t)
    with blas_threshold(blas_threshold_for(t.shape[1])):
        _, ids = index.search(p, kk + 1)
    hits = 0.0
    for i in range(n):
        others = [j for j in ids[i] if j != i and j >= 0][:kk]
        hits += float(np.sum(labels[others] == labels[i])) / kk
    return hits / n


def validation_scores(pred: np.ndarray, target: np.ndarray, labels: np.ndarray | None = None,
                      k: int = 10) -> dict[str, float]:
    """``{"mse", "overlap"(, "label_p")}`` of predictions for validation rows: what a selection compares.

    ``overlap`` is :func:`neighbour_overlap` at ``k`` among the validation targets; ``label_p`` is
    :func:`label_precision` (only with ``labels``).
    """
    pred64, t64 = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    out = {"mse": float(((pred64 - t64) ** 2).mean()), "overlap": neighbour_overlap(pred64, t64, k)}
    if labels is not None:
        out["label_p"] = label_precision(pred64, t64, labels, k)
    return out


def pick_best(scores: Sequence[dict[str, float]], select_by: str) -> int:
    """Index of the best candidate: the highest retrieval metric (``label_p`` for "labels", else
    ``overlap``), ties (within 1e-9) to the lowest MSE, ties (relative 1e-9) to the earlier candidate.

    ``select_by="mse"``: the lowest MSE alone (auto's rule before retrieval-based selection).
    """
    if not scores:
        raise ValueError("no candidate to choose from")
    idx = list(range(len(scores)))
    if select_by != "mse":
        metric = "label_p" if select_by == "labels" else "overlap"
        top = max(scores[i][metric] for i in idx)
        idx = [i for i in idx if scores[i][metric] >= top - 1e-9]
    low = min(scores[i]["mse"] for i in idx)
    return next(i for i in idx if scores[i]["mse"] <= low * (1 + 1e-9))


def check_select_by(select_by: Any, has_labels: bool) -> str:
    """One of :data:`SELECT_BY`; "labels" needs labels passed to ``fit``."""
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {SELECT_BY}, got {select_by!r}")
    if select_by == "labels" and not has_labels:
        raise ValueError("select_by='labels' ranks candidates by label precision on the validation rows: pass "
                         "fit(X_src, X_dst, labels=...) with one integer label per pair")
    return select_by
