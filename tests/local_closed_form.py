"""The closed form a local adapter's cluster maps must equal, shared by the in-memory and the streaming fit's tests."""

from __future__ import annotations

import numpy as np


def assert_cluster_maps_are_closed_form(est, x: np.ndarray, y: np.ndarray, train: np.ndarray, atol: float) -> np.ndarray:
    """With ``refit=False``, ``prior_rows=0``, ``alpha=0`` and ``m=1``, cluster j's map is the least-squares fit
    (with an intercept) of the training rows nearest centroid j; returns each training row's cluster."""
    c = est.centroids_
    assign = np.argmax(2 * x[train] @ c.T - (c ** 2).sum(1), axis=1)
    d = x.shape[1]
    for j in range(c.shape[0]):
        xs, ys = x[train][assign == j], y[train][assign == j]
        sol = np.linalg.lstsq(np.hstack([xs, np.ones((xs.shape[0], 1))]), ys, rcond=None)[0]
        np.testing.assert_allclose(est.coef_[j], sol[:d].T, atol=atol)
        np.testing.assert_allclose(est.intercept_[j], sol[d], atol=atol)
    return assign
