"""Closed-form adapters: ridge least squares, orthogonal Procrustes, reduced-rank ridge."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..engine import Layer
from ._base import BaseAdapter
from ._checks import check_alpha, check_fraction, check_int
from ._closed_form import RidgePath, lowrank_project, procrustes, ridge_path
from ._gram import PairStats, accumulate_pairs, array_chunks

DEFAULT_CHUNK_ROWS = 16384


class _ClosedFormAdapter(BaseAdapter):
    """Adapters fitted from the sums of :mod:`bc_fast.fit._gram` (so they can stream)."""

    def _fit_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        chunk = check_int(getattr(self, "chunk_rows", DEFAULT_CHUNK_ROWS), "chunk_rows", 1)
        stats = accumulate_pairs(array_chunks(x, y, chunk), val_fraction=self.val_fraction,
                                 random_state=self.random_state)
        self._fit(stats)

    def fit_stats(self, stats: PairStats) -> "_ClosedFormAdapter":
        """Fit from sums already accumulated (:func:`bc_fast.fit.accumulate_pairs`); no pass over the data."""
        t0 = time.perf_counter()
        self._fit(stats)
        self.fit_time_s_ = time.perf_counter() - t0
        return self

    def _fit(self, stats: PairStats) -> None:
        check_fraction(self.val_fraction, "val_fraction")
        check_int(self.random_state, "random_state")
        if (stats.val_fraction, stats.random_state) != (float(self.val_fraction), int(self.random_state)):
            raise ValueError(f"stats were accumulated with val_fraction={stats.val_fraction}, random_state="
                             f"{stats.random_state} but the adapter has val_fraction={self.val_fraction}, "
                             f"random_state={self.random_state}; accumulate again or set_params to match")
        if stats.train.n < 2:
            raise ValueError(f"only {stats.train.n} training pair(s) after holding out the validation rows "
                             f"(val_fraction={self.val_fraction}); a fit with an intercept needs at least 2: "
                             "pass more pairs")
        self.n_train_, self.n_val_ = stats.train.n, stats.val.n
        self._solve(stats)

    def _finish(self, layers: list[Layer], wt: np.ndarray, b: np.ndarray, n_pairs: int) -> None:
        self.coef_ = np.ascontiguousarray(wt.T)
        self.intercept_ = np.asarray(b, dtype=np.float64)
        self.n_pairs_ = int(n_pairs)
        self._set_program(layers)

    def _refit(self, stats: PairStats) -> bool:
        return bool(self.refit) and stats.val.n > 0

    def _val_scores(self, stats: PairStats, wt: np.ndarray, b: np.ndarray) -> dict[str, float]:
        return stats.val.scores(wt, b) if stats.val.n > 0 else {}


class RidgeAdapter(_ClosedFormAdapter):
    """Affine least squares with an L2 penalty, closed form in float64: ``y = W x + b``.

    Parameters
    ----------
    alpha : float or None, default None
        Penalty on ``W`` (not on ``b``). None: chosen on the validation split from the grid of
        :mod:`bc_fast.fit._closed_form` (0 and ``mean eigenvalue * 10**k``, k = -8 .. 2 by 0.5).
    val_fraction : float, default 0.1
        Share of the pairs held out for validation (rows picked by a hash of the row index).
    random_state : int, default 0
        Seed of that hash.
    refit : bool, default True
        Fit the final map on all pairs (training and validation rows). A chosen alpha is scaled
        by n_all / n_train for it (the same penalty per row); a given alpha is used as given.
    chunk_rows : int, default 16384
        Rows per chunk of the float64 accumulation.

    Attributes
    ----------
    coef_ : ndarray (d_dst, d_src) float64;  intercept_ : ndarray (d_dst,) float64
    alpha_ : the penalty of the final fit;  alphas_, val_mse_path_ : the grid and its validation MSE
    val_metrics_ : dict(mse, r2) of the training-rows fit on the validation rows (empty without them)
    layers_, operator_, n_features_in_, n_features_out_, n_train_, n_val_, n_pairs_, fit_time_s_
    """

    kind = "affine"
    adapter = "ridge"

    def __init__(self, alpha: float | None = None, *, val_fraction: float = 0.1, random_state: int = 0,
                 refit: bool = True, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.alpha = alpha
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.refit = refit
        self.chunk_rows = chunk_rows

    def _candidate(self, path: RidgePath, alpha: float) -> tuple[np.ndarray, np.ndarray, Any]:
        wt, b = path.coef(alpha)
        return wt, b, None

    def _grid_order(self, stats: PairStats, path: RidgePath, grid: np.ndarray) -> list[int]:
        """The grid points to evaluate (all of them for ridge: each costs one scaling)."""
        return list(range(grid.shape[0]))

    def _layers(self, wt: np.ndarray, b: np.ndarray, extra: Any) -> list[Layer]:
        return [Layer(np.ascontiguousarray(wt.T), b)]

    def _check_enough(self, n_fit: int, d_src: int, alpha: float | None) -> None:
        if alpha == 0.0 and n_fit <= d_src:
            raise ValueError(f"{self.adapter} with alpha=0 (no regularisation) needs more pairs than source "
                             f"dimensions: got {n_fit} pairs for d_src={d_src}, need at least {d_src + 1}; pass "
                             "more pairs or let alpha be chosen (alpha=None)")

    def _solve(self, stats: PairStats) -> None:
        alpha = check_alpha(self.alpha)
        n_fit = stats.n if self._refit(stats) else stats.train.n
        self._check_enough(n_fit, stats.d_src, alpha)
        if alpha is None and stats.val.n == 0:
            raise ValueError(f"alpha=None is chosen on validation rows, but none of the {stats.n} pairs is one "
                             f"(val_fraction={self.val_fraction}); pass more pairs, a larger val_fraction, or "
                             "alpha=<value>")
        path = ridge_path(stats, "train")
        grid = path.alpha_grid() if alpha is None else np.array([alpha])
        fits: dict[int, tuple[np.ndarray, np.ndarray, Any]] = {}
        mses = np.full(grid.shape[0], np.nan)
        for i in self._grid_order(stats, path, grid):
            fits[i] = self._candidate(path, float(grid[i]))
            mses[i] = self._val_scores(stats, fits[i][0], fits[i][1]).get("mse", np.nan)
        best = int(np.nanargmin(mses)) if alpha is None else 0
        self.alphas_, self.val_mse_path_ = grid, mses
        self.val_metrics_ = self._val_scores(stats, fits[best][0], fits[best][1])
        a = float(grid[best])
        wt, b, extra = fits[best]
        if self._refit(stats):
            both = stats.both()
            if alpha is None:  # a chosen penalty keeps its size per row; a given one is used as given
                a = a * both.n / stats.train.n
            wt, b, extra = self._candidate(ridge_path(stats, "both"), a)
        self.alpha_ = a
        self._finish(self._layers(wt, b, extra), wt, b, n_fit)


class LowRankAdapter(RidgeAdapter):
    """Reduced-rank ridge: the ridge map projected on the top-``rank`` principal directions of its
    fitted values, exported as two layers ``U (V x) + b`` (rank x d_src, then d_dst x rank).

    ``rank = min(d_src, d_dst)`` gives the ridge map itself. alpha is chosen by the validation
    MSE of the projected map, tried at the ridge grid's best point and its neighbours within one
    decade (``val_mse_path_`` is NaN elsewhere). Other parameters and attributes as :class:`RidgeAdapter`, plus
    ``components_`` (d_dst, rank): the output directions kept.
    """

    kind = "lowrank"
    adapter = "lowrank"

    def __init__(self, rank: int = 64, alpha: float | None = None, *, val_fraction: float = 0.1,
                 random_state: int = 0, refit: bool = True, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        super().__init__(alpha, val_fraction=val_fraction, random_state=random_state, refit=refit,
                         chunk_rows=chunk_rows)
        self.rank = rank

    def _solve(self, stats: PairStats) -> None:
        top = min(stats.d_src, stats.d_dst)
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or not 1 <= self.rank <= top:
            raise ValueError(f"rank must be an integer in [1, min(d_src, d_dst)] = [1, {top}] for a {stats.d_src} -> "
                             f"{stats.d_dst} map, got {self.rank!r}; pass rank=<= {top}")
        super()._solve(stats)

    def _grid_order(self, stats: PairStats, path: RidgePath, grid: np.ndarray) -> list[int]:
        """Only the ridge optimum and its neighbours within one decade: each low-rank point costs
        a d_dst x d_dst eigendecomposition, and the projection rarely moves the best alpha further."""
        if grid.shape[0] == 1 or stats.val.n == 0:
            return list(range(grid.shape[0]))
        ridge = [stats.val.scores(*path.coef(float(a)))["mse"] for a in grid]
        best = int(np.argmin(ridge))
        return [i for i in range(grid.shape[0]) if abs(i - best) <= 2]

    def _candidate(self, path: RidgePath, alpha: float) -> tuple[np.ndarray, np.ndarray, Any]:
        wt, _ = path.coef(alpha)
        wt_r, vr = lowrank_project(wt, path.gram, int(self.rank))
        return wt_r, path.mean_y - path.mean_x @ wt_r, vr

    def _layers(self, wt: np.ndarray, b: np.ndarray, vr: Any) -> list[Layer]:
        self.components_ = np.ascontiguousarray(vr)
        return [Layer(np.ascontiguousarray((wt @ vr).T)), Layer(np.ascontiguousarray(vr), b)]


class ProcrustesAdapter(_ClosedFormAdapter):
    """Orthogonal Procrustes: ``y = Q (x - mean_x) + mean_y`` with Q a partial isometry (float64 SVD).

    ``Q = V U^T`` from the SVD ``Xc^T Yc = U S V^T``. With d_src > d_dst, Q has orthonormal rows
    (an orthogonal projection then a rotation); with d_src < d_dst, orthonormal columns (an
    isometric embedding into a d_src-dimensional subspace of the target). This is exactly the
    square Procrustes problem with the smaller side zero-padded, keeping the d_dst x d_src block.
    Q recovers an exact orthogonal map when d_src <= d_dst; with d_src > d_dst it is the
    zero-padded solution, the least-squares partial isometry only for isotropic inputs. Any
    number of pairs >= 2 is accepted (the orthogonality is the regularisation); directions the
    pairs do not span are completed orthonormally but arbitrarily.

    Parameters
    ----------
    center : bool, default True
        Subtract the means (the map gets the intercept ``mean_y - Q mean_x``); False: ``y = Q x``.
    scale : bool, default False
        Also fit one global scale ``s`` (``y = s Q x + b``), least squares given Q.
    val_fraction, random_state, refit, chunk_rows : as :class:`RidgeAdapter`
        (no hyper-parameter is chosen; the validation rows only measure the fit).
    """

    kind = "orthogonal"
    adapter = "procrustes"

    def __init__(self, center: bool = True, *, scale: bool = False, val_fraction: float = 0.1,
                 random_state: int = 0, refit: bool = True, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.center = center
        self.scale = scale
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.refit = refit
        self.chunk_rows = chunk_rows

    def _solve(self, stats: PairStats) -> None:
        wt, b = procrustes(stats.train, center=bool(self.center), scale=bool(self.scale))
        self.val_metrics_ = self._val_scores(stats, wt, b)
        n_fit = stats.train.n
        if self._refit(stats):
            wt, b = procrustes(stats.both(), center=bool(self.center), scale=bool(self.scale))
            n_fit = stats.n
        bias = b if self.center else None
        self._finish([Layer(np.ascontiguousarray(wt.T), bias)], wt, b, n_fit)


__all__ = ["RidgeAdapter", "LowRankAdapter", "ProcrustesAdapter"]
