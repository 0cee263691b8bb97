"""Local (per-cluster) post-hoc adapters: k-means on the source rows, one closed-form map per
cluster, rows routed to the top-m nearest centroids with softmax weights (Local Drift-Adapters).

The routed map and its parameter layout are defined in :mod:`bc_fast.fit._routing`. Fitting:

1. The pairs are split into training and validation rows by the hashed row index
   (:func:`bc_fast.fit.val_mask`, the same split as every other kind).
2. The global map of ``base`` (Procrustes, ridge or low-rank) is fitted on the training rows
   from the sums of :mod:`bc_fast.fit._gram`; it is the fallback of small clusters and the prior.
3. ``faiss.Kmeans(d_in, k, niter=niter, seed=random_state)`` clusters the training source rows;
   each row goes to its nearest centroid (the routing score, ties to the lower index).
4. Per cluster, the float64 sums of its rows (:class:`~bc_fast.fit._gram.Gram`) plus the global
   training sums scaled to ``prior_rows`` pseudo-rows are solved by the same closed form as the
   global map (``procrustes``; ridge with the global per-row penalty; low-rank on top of it).
   ``prior_rows = 0`` fits each cluster on its own rows alone; large values approach the global
   map. A cluster with fewer than ``min_cluster_rows`` training rows, or (with ``prior_rows = 0``)
   no more rows than source dimensions, takes the global map.
5. ``k``, ``m``, ``prior_rows`` and ``base`` given as None/"auto" and the temperature (None) are
   chosen on the validation rows from small grids, by ``select_by``: neighbour overlap@10 of the
   predictions with the targets' own neighbours (default), label precision@10 (``labels``), or MSE.
   Every candidate's MSE and overlap are kept in ``candidates_``.
6. ``refit``: the per-cluster and global sums are recomputed over all rows (training and
   validation, with the chosen centroids) and solved again.

:meth:`LocalAdapter.fit` holds the pairs in memory; the per-cluster sums are accumulated chunk by chunk.

Streaming (:meth:`LocalAdapter.fit_chunks`, ``fit_streaming_npy(src, dst, kind="local")``, ``bc-fast fit
--kind local``): the pairs are read twice from re-iterable chunks (:mod:`bc_fast.fit._local_stream`). Pass 1
accumulates the global sums of every row (step 2 is exact) and keeps a hashed uniform sample of at most
``sample_rows`` training rows and ``val_rows`` validation rows (same hashed split). Steps 3 and 5 run on
the samples: k-means, every candidate's per-cluster maps (the sample's cluster sums plus the exact global
prior) and its validation scores. Pass 2 routes every row to its nearest chosen centroid and accumulates
the per-cluster sums of all training (and validation) rows; the written maps are solved from those, and
``val_metrics_`` scores that training-rows fit on the validation sample. Memory: O(k d^2 + sample), never
O(n). When the samples hold every row the result equals :meth:`LocalAdapter.fit` (same centroids, same
settings, per-cluster maps to float64 rounding of the sums). When they do not, the settings are chosen for
a sample-sized fit: a cluster there has fewer rows than in the final fit, so the search can favour smaller
``k``, a larger ``prior_rows`` or fallbacks that all rows would not need; the centroids are those of the
sample; ``fallback_`` and ``cluster_rows_`` follow the counts of all rows.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..engine.routed import RoutedTransform
from ._base import BaseAdapter, NotFittedError, r2_uniform
from ._checks import (
    check_alpha,
    check_features,
    check_finite,
    check_fraction,
    check_int,
    check_pair_chunk,
)
from ._closed_form import RidgePath, lowrank_project, procrustes
from ._estimators import (
    DEFAULT_CHUNK_ROWS,
    LowRankAdapter,
    ProcrustesAdapter,
    RidgeAdapter,
)
from ._gram import Gram, PairStats, Workspace, accumulate_pairs, array_chunks, val_mask
from ._local_stream import (
    DEFAULT_SAMPLE_ROWS,
    DEFAULT_VAL_ROWS,
    add_cluster_sums,
    as_chunk_factory,
    cluster_pass,
    first_pass,
)
from ._metrics import check_labels, check_select_by, pick_best, validation_scores
from ._routing import RoutedParams, route, routed_reference

BASES = ("procrustes", "ridge", "lowrank")
K_GRID = (4, 8, 16)
M_GRID = (1, 2, 3)
#: prior_rows candidates, in units of d_in (the source dimension)
PRIOR_GRID = (0.0, 0.25, 1.0, 4.0)
#: temperature candidates, in units of the median gap between the best and second-best routing score
TEMPERATURE_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
SELECT_K = 10  # neighbours of the retrieval metrics


def _scaled(g: Gram, f: float) -> Gram:
    """``g`` with every sum (and the count) multiplied by ``f``: its rows as ``f``-weighted pseudo-rows."""
    out = Gram(g.shift_x, g.shift_y)
    out.n = g.n * f  # type: ignore[assignment]  # a pseudo-count
    for name in ("sx", "sy", "xx", "xy", "yy"):
        setattr(out, name, getattr(g, name) * f)
    return out


def _grid(value: Any, grid: tuple) -> tuple:
    return grid if value is None or (isinstance(value, str) and value == "auto") else (value,)


class LocalAdapter(BaseAdapter):
    """Per-cluster closed-form adapters routed by soft top-m nearest centroids (see the module docstring).

    Parameters
    ----------
    base : {"procrustes", "ridge", "lowrank", "auto"}, default "procrustes"
        The closed form fitted per cluster ("auto": chosen on validation).
    k : int or None, default None
        Clusters; None: chosen from (4, 8, 16), each needing ``k * min_cluster_rows`` training rows.
    m : int or None, default None
        Clusters blended per row (1 <= m <= k); None: chosen from (1, 2, 3).
    temperature : float or None, default None
        Softmax temperature; None: chosen on validation from (0.1, 0.3, 1, 3, 10) x the median gap
        between each training row's best and second-best routing score.
    prior_rows : float or None, default None
        Pseudo-rows of the global fit added to every cluster's sums; None: chosen from
        (0, 0.25, 1, 4) x d_in.
    min_cluster_rows : int, default 10
        Clusters with fewer training rows use the global map.
    select_by : {"overlap", "labels", "mse"}, default "overlap"
        How candidates are ranked on the validation rows ("labels": pass ``fit(..., labels=)``).
    alpha, rank : the global ridge penalty (None: chosen on validation) and low-rank rank
        (None: ``min(64, d_src, d_dst)``), for base ridge / lowrank.
    niter : int, default 20
        k-means iterations.
    val_fraction, random_state, refit, chunk_rows : as :class:`RidgeAdapter` (the seed also seeds k-means).

    Attributes
    ----------
    base_, k_, m_, temperature_, prior_rows_ : the chosen settings
    centroids_ (k, d_in), coef_ (k, d_out, d_in), intercept_ (k, d_out) : float64 fitted maps
    fallback_ : bool (k,), clusters that use the global map;  cluster_rows_ (k,) : training rows per cluster
    global_estimator_ : the fitted global adapter of ``base_``
    candidates_ : list of {"base", "k", "prior_rows", "m", "temperature", "val_mse", "val_overlap"(, "val_label_p")}
    val_metrics_ : {"mse", "r2", "overlap"(, "label_p")} of the chosen training-rows fit on the validation rows
    val_prediction_ : (n_val, d_out) float64, that fit's predictions for the validation rows
    operator_ : the compiled routed operator (RoutedTransform);  n_features_in_, n_features_out_, n_train_, n_val_, fit_time_s_
    n_sample_, n_val_sample_ : (after :meth:`fit_chunks` only) training / validation rows in the samples
    """

    kind = "routed"
    adapter = "local"

    def __init__(self, base: str = "procrustes", k: int | None = None, m: int | None = None,
                 temperature: float | None = None, *, prior_rows: float | None = None, min_cluster_rows: int = 10,
                 select_by: str = "overlap", alpha: float | None = None, rank: int | None = None, niter: int = 20,
                 val_fraction: float = 0.1, random_state: int = 0, refit: bool = True,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.base = base
        self.k = k
        self.m = m
        self.temperature = temperature
        self.prior_rows = prior_rows
        self.min_cluster_rows = min_cluster_rows
        self.select_by = select_by
        self.alpha = alpha
        self.rank = rank
        self.niter = niter
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.refit = refit
        self.chunk_rows = chunk_rows

    # ------------------------------------------------------------------ fit
    def fit(self, X_src: Any, X_dst: Any, *, labels: Any = None) -> LocalAdapter:
        """Fit on pairs (row i of both is the same item); ``labels`` (one int per pair) only for select_by="labels"."""
        t0 = time.perf_counter()
        x, y = check_pair_chunk(X_src, X_dst)
        if x.shape[0] == 0:
            raise ValueError("no pairs: X_src and X_dst have 0 rows")
        self._fit_arrays(x, y, check_labels(labels, x.shape[0]))
        self.fit_time_s_ = time.perf_counter() - t0
        return self

    def fit_chunks(self, make_chunks: Any, *, sample_rows: int = DEFAULT_SAMPLE_ROWS,
                   val_rows: int = DEFAULT_VAL_ROWS) -> LocalAdapter:
        """Fit from pairs larger than memory, read in two passes (see "Streaming" in the module docstring).

        Parameters
        ----------
        make_chunks : callable returning a fresh iterable of ``(X_src_chunk, X_dst_chunk)``, or a list of chunks
            Called once per pass; both calls must give the same pairs in the same order.
        sample_rows : int, default 50,000
            Training rows kept (a hashed uniform sample) for k-means and the settings search.
        val_rows : int, default 5,000
            Validation rows kept (a hashed uniform sample of the hashed validation split) to score candidates.
        """
        t0 = time.perf_counter()
        factory = as_chunk_factory(make_chunks)
        sample_rows = check_int(sample_rows, "sample_rows", 1)
        val_rows = check_int(val_rows, "val_rows", 0)
        if self.select_by == "labels":
            raise ValueError("select_by='labels' needs one label per pair, which the streaming fit does not take; "
                             "use select_by='overlap' or 'mse', or fit(X_src, X_dst, labels=...) in memory")
        self._check_settings(False)
        if self.k not in (None, "auto") and self.k > sample_rows:
            raise ValueError(f"k={self.k} clusters but sample_rows={sample_rows}: k-means runs on the training "
                             f"sample and needs at least one row per cluster; pass sample_rows >= k")
        vf, rs = float(self.val_fraction), int(self.random_state)
        p1 = first_pass(factory, vf, rs, sample_rows, val_rows)
        stats = p1.stats
        what = (f"sampled training pairs (sample_rows={sample_rows} of {stats.train.n})" if p1.train_sampled
                else "training pairs")
        grid = self._check_params(p1.x_train.shape[0], p1.x_val.shape[0], stats.d_src, stats.d_dst, False, what,
                                  f", val_rows={val_rows} kept of {stats.val.n}")
        chosen = self._search(stats, p1.x_train, p1.y_train, p1.x_val, p1.y_val, None, grid)
        train, val = cluster_pass(factory, chosen["centroids"], stats)
        both = [t + v for t, v in zip(train, val)] if bool(self.refit) and stats.val.n > 0 else None
        self._finish(stats, chosen, p1.x_val, p1.y_val, train, both)
        self.n_train_, self.n_val_ = int(stats.train.n), int(stats.val.n)
        self.n_sample_, self.n_val_sample_ = int(p1.x_train.shape[0]), int(p1.x_val.shape[0])
        self.fit_time_s_ = time.perf_counter() - t0
        return self

    def _check_settings(self, has_labels: bool) -> str:
        """The checks that need no data; returns select_by."""
        select_by = check_select_by(self.select_by, has_labels)
        check_fraction(self.val_fraction, "val_fraction")
        check_int(self.random_state, "random_state")
        check_int(self.niter, "niter", 1)
        check_int(self.min_cluster_rows, "min_cluster_rows", 1)
        check_int(self.chunk_rows, "chunk_rows", 1)
        check_alpha(self.alpha)
        if self.base not in (None, "auto") and self.base not in BASES:
            raise ValueError(f"base must be one of {BASES} or 'auto', got {self.base!r}")
        if self.k is not None and self.k != "auto":
            check_int(self.k, "k", 1)
        ms = _grid(self.m, M_GRID)
        if len(ms) == 1:
            check_int(ms[0], "m", 1)
            if self.k not in (None, "auto") and ms[0] > self.k:
                raise ValueError(f"m={ms[0]} exceeds k={self.k}: a row blends at most k clusters")
        if self.temperature is not None and not (isinstance(self.temperature, (int, float, np.floating))
                                                 and not isinstance(self.temperature, bool)
                                                 and np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be None (chosen on validation) or a finite number > 0, "
                             f"got {self.temperature!r}")
        p = self.prior_rows
        if p is not None and not (isinstance(p, (int, float, np.floating, np.integer)) and not isinstance(p, bool)
                                  and np.isfinite(p) and p >= 0):
            raise ValueError(f"prior_rows must be None or a finite number >= 0, got {self.prior_rows!r}")
        return select_by

    def _check_params(self, n_train: int, n_val: int, d_in: int, d_out: int, has_labels: bool,
                      what: str = "training pairs", val_note: str = "") -> dict[str, tuple]:
        """The search grid for ``n_train`` training rows (``what`` names them) and ``n_val`` validation rows
        (``val_note``: how they were kept, for the error message)."""
        select_by = self._check_settings(has_labels)
        bases = BASES if self.base in (None, "auto") else (self.base,)
        if self.k is not None and self.k != "auto":
            k = int(self.k)
            if k > n_train:
                raise ValueError(f"k={k} clusters but only {n_train} {what} (after holding out {n_val} validation "
                                 f"rows): k-means needs at least one row per cluster; pass k <= {n_train} (or "
                                 "k=None to choose), or more pairs")
            ks: tuple = (k,)
        else:
            ks = tuple(k for k in K_GRID if k * int(self.min_cluster_rows) <= n_train)
            if not ks:
                raise ValueError(f"k=None tries k in {K_GRID}, each needing k * min_cluster_rows = "
                                 f"{K_GRID[0] * int(self.min_cluster_rows)}+ {what}, but there are {n_train}; "
                                 "pass k=<small int>, a smaller min_cluster_rows, or more pairs")
        ms = _grid(self.m, M_GRID)
        if len(ms) == 1 and ms[0] > max(ks):
            raise ValueError(f"m={ms[0]} exceeds k={max(ks)}: a row blends at most k clusters")
        priors = tuple(f * d_in for f in PRIOR_GRID) if self.prior_rows is None else (self.prior_rows,)
        if self.rank is not None and not (isinstance(self.rank, (int, np.integer)) and not isinstance(self.rank, bool)
                                          and 1 <= self.rank <= min(d_in, d_out)):
            raise ValueError(f"rank must be None or an integer in [1, min(d_src, d_dst)] = [1, {min(d_in, d_out)}], "
                             f"got {self.rank!r}")
        searched = (len(bases) * len(ks) * len(ms) * len(priors) > 1 or self.temperature is None
                    or select_by == "labels")
        if searched and n_val < 2:
            raise ValueError(f"the local adapter chooses its settings on validation rows, but only {n_val} of the "
                             f"{n_train + n_val} pairs is one (val_fraction={self.val_fraction}{val_note}); pass more pairs, "
                             "a larger val_fraction, or every setting (base, k, m, temperature, prior_rows)")
        return {"bases": bases, "ks": ks, "ms": ms, "priors": priors, "select_by": (select_by,)}

    def _global(self, base: str, stats: PairStats, d_in: int, d_out: int, refit: bool) -> BaseAdapter:
        common = {"val_fraction": self.val_fraction, "random_state": self.random_state, "refit": refit,
                  "chunk_rows": self.chunk_rows}
        if base == "procrustes":
            return ProcrustesAdapter(**common).fit_stats(stats)
        if base == "lowrank":
            rank = min(64, d_in, d_out) if self.rank is None else int(self.rank)
            return LowRankAdapter(rank, self.alpha, **common).fit_stats(stats)
        return RidgeAdapter(self.alpha, **common).fit_stats(stats)

    def _solve(self, base: str, g: Gram, alpha_row: float, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(wt (d_in, d_out), b)`` of one cluster's sums, by the global map's closed form."""
        if base == "procrustes":
            return procrustes(g, center=True, scale=False)
        path = RidgePath.of(g)
        wt, b = path.coef(alpha_row * float(g.n))
        if base == "lowrank":
            wt, _ = lowrank_project(wt, path.gram, rank)
            b = path.mean_y - path.mean_x @ wt
        return wt, b

    def _cluster_maps(self, base: str, grams: list[Gram], glob: Gram, glob_est: BaseAdapter, prior: float,
                      rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-cluster ``(coef (k, d_out, d_in), intercept (k, d_out), fallback (k,))`` from the clusters' sums,
        ``prior`` pseudo-rows of ``glob`` (the sums ``glob_est`` was fitted on) and ``glob_est``'s map as fallback."""
        k, d_in = len(grams), glob.shift_x.shape[0]
        gw, gb = glob_est.coef_.T, glob_est.intercept_
        alpha_row = float(getattr(glob_est, "alpha_", 0.0)) / glob.n  # the global per-row penalty
        coef = np.empty((k, gw.shape[1], gw.shape[0]))
        icpt = np.empty((k, gw.shape[1]))
        fallback = np.zeros(k, dtype=bool)
        pseudo = _scaled(glob, prior / glob.n) if prior > 0 else None
        for c, g in enumerate(grams):
            if g.n < int(self.min_cluster_rows) or (prior == 0 and g.n <= d_in):
                fallback[c] = True
                wt, b = gw, gb
            else:
                wt, b = self._solve(base, g + pseudo if pseudo is not None else g, alpha_row, rank)
            coef[c], icpt[c] = wt.T, b
        return coef, icpt, fallback

    @staticmethod
    def _cluster_sums(x: np.ndarray, y: np.ndarray, assign: np.ndarray, k: int, shift: Gram,
                      chunk: int) -> list[Gram]:
        grams = [Gram(shift.shift_x, shift.shift_y) for _ in range(k)]
        ws = Workspace()
        for s in range(0, x.shape[0], chunk):
            add_cluster_sums(grams, x[s:s + chunk], y[s:s + chunk], assign[s:s + chunk], ws)
        return grams

    def _kmeans(self, x: np.ndarray, k: int) -> np.ndarray:
        from ..index.faiss_utils import _faiss

        faiss = _faiss()
        # min_points_per_centroid=1: min_cluster_rows is checked here; faiss would only print a warning
        km = faiss.Kmeans(x.shape[1], k, niter=int(self.niter), seed=int(self.random_state), verbose=False,
                          min_points_per_centroid=1)
        km.train(np.ascontiguousarray(x, dtype=np.float32))
        return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])

    def _fit_arrays(self, x: np.ndarray, y: np.ndarray, labels: np.ndarray | None = None) -> None:
        check_finite(x, "X_src")
        check_finite(y, "X_dst")
        n, d_in, d_out = x.shape[0], x.shape[1], y.shape[1]
        chunk = check_int(self.chunk_rows, "chunk_rows", 1)
        is_val = val_mask(0, n, check_fraction(self.val_fraction, "val_fraction"), check_int(self.random_state,
                                                                                              "random_state"))
        xt, yt, xv, yv = x[~is_val], y[~is_val], x[is_val], y[is_val]
        grid = self._check_params(xt.shape[0], xv.shape[0], d_in, d_out, labels is not None)
        lab_v = labels[is_val] if labels is not None else None
        stats = accumulate_pairs(array_chunks(x, y, chunk), val_fraction=self.val_fraction,
                                 random_state=self.random_state)
        chosen = self._search(stats, xt, yt, xv, yv, lab_v, grid)
        both = None
        if bool(self.refit) and xv.shape[0] > 0:
            assign_all = route(x, chosen["centroids"], 1, 1.0)[0][:, 0]
            both = self._cluster_sums(x, y, assign_all, chosen["k"], stats.train, chunk)
        self._finish(stats, chosen, xv, yv, None, both)
        self.n_train_, self.n_val_ = int(xt.shape[0]), int(xv.shape[0])

    def _search(self, stats: PairStats, xt: np.ndarray, yt: np.ndarray, xv: np.ndarray, yv: np.ndarray,
                lab_v: np.ndarray | None, grid: dict[str, tuple]) -> dict[str, Any]:
        """Every candidate setting fitted on the training rows ``xt, yt`` (per-cluster sums, the global map of
        ``stats``) and scored on ``xv, yv``; fills ``candidates_`` and returns the best (its maps and sums)."""
        d_in, d_out = stats.d_src, stats.d_dst
        chunk = int(self.chunk_rows)
        select_by = grid["select_by"][0]
        rank = min(64, d_in, d_out) if self.rank is None else int(self.rank)
        self.candidates_: list[dict[str, Any]] = []
        best: tuple[dict, dict] | None = None  # (scores, setting)
        clusterings: dict[int, Any] = {}
        for base in grid["bases"]:
            glob_est = self._global(base, stats, d_in, d_out, refit=False)
            for k in grid["ks"]:
                if k not in clusterings:
                    clusterings[k] = self._clusters(xt, k, explicit=len(grid["ks"]) == 1)
                if clusterings[k] is None:
                    continue
                cents, assign, gap = clusterings[k]
                grams = self._cluster_sums(xt, yt, assign, k, stats.train, chunk)
                for prior in grid["priors"]:
                    coef, icpt, fb = self._cluster_maps(base, grams, stats.train, glob_est, prior, rank)
                    for m in grid["ms"]:
                        if m > k:
                            continue
                        temps = ((float(self.temperature),) if self.temperature is not None
                                 else (1.0,) if m == 1 else tuple(t * gap for t in TEMPERATURE_GRID))
                        for temp in temps:
                            params = RoutedParams(cents, coef, icpt, m, temp)
                            setting = {"base": base, "k": k, "prior_rows": float(prior), "m": m, "temperature": temp,
                                       "n_fallback": int(fb.sum())}
                            scores = (validation_scores(routed_reference(xv, params), yv, lab_v, SELECT_K)
                                      if xv.shape[0] >= 2 else {"mse": float("nan"), "overlap": float("nan")})
                            self.candidates_.append({**setting, **{f"val_{kk}": v for kk, v in scores.items()}})
                            if best is None or pick_best([best[0], scores], select_by) == 1:
                                best = (scores, dict(setting, coef=coef, icpt=icpt, fallback=fb, centroids=cents,
                                                     grams=grams, global_estimator=glob_est))
        if best is None:
            raise ValueError(f"no local adapter could be fitted: every k in {grid['ks']} left a cluster without "
                             "training rows (duplicate source rows?); pass a smaller k")
        scores, chosen = best
        return dict(chosen, scores=scores, select_by=select_by, rank=rank)

    def _finish(self, stats: PairStats, chosen: dict[str, Any], xv: np.ndarray, yv: np.ndarray,
                train: list[Gram] | None, both: list[Gram] | None) -> None:
        """Set the fitted state from the chosen setting: the training-rows maps from the per-cluster sums
        ``train`` (None: the search's own), scored on ``xv, yv``; with ``both`` (every row's per-cluster sums,
        when refitting) the maps written are refitted on them."""
        self.base_, self.k_, self.m_ = chosen["base"], chosen["k"], chosen["m"]
        self.temperature_, self.prior_rows_ = float(chosen["temperature"]), chosen["prior_rows"]
        self.select_by_ = chosen["select_by"]
        self.centroids_ = np.asarray(chosen["centroids"], dtype=np.float64)
        self.global_estimator_ = chosen["global_estimator"]
        rank, d_out = chosen["rank"], stats.d_dst
        if train is None:
            train, scores = chosen["grams"], chosen["scores"]
            coef, icpt, fb = chosen["coef"], chosen["icpt"], chosen["fallback"]
        else:
            coef, icpt, fb = self._cluster_maps(self.base_, train, stats.train, self.global_estimator_,
                                                self.prior_rows_, rank)
            scores = None
        self.cluster_rows_ = np.array([g.n for g in train], dtype=np.int64)
        if xv.shape[0] >= 2:
            pred = routed_reference(xv, RoutedParams(chosen["centroids"], coef, icpt, self.m_, self.temperature_))
            if scores is None:
                scores = validation_scores(pred, yv, None, SELECT_K)
            self.val_metrics_ = {**scores, "r2": r2_uniform(yv, pred)}
            self.val_prediction_ = pred
        else:
            self.val_metrics_, self.val_prediction_ = {}, np.zeros((0, d_out))
        if both is not None:
            glob_est = self._global(self.base_, stats, stats.d_src, d_out, refit=True)
            coef, icpt, fb = self._cluster_maps(self.base_, both, stats.both(), glob_est, self.prior_rows_, rank)
            self.global_estimator_ = glob_est
        self.coef_, self.intercept_, self.fallback_ = coef, icpt, fb
        self.n_features_in_, self.n_features_out_ = stats.d_src, d_out
        self.operator_ = RoutedTransform.from_params(self.routed_params())

    def _clusters(self, xt: np.ndarray, k: int, explicit: bool) -> tuple[np.ndarray, np.ndarray, float] | None:
        """Centroids, training-row assignment and the median top-2 score gap; None (or ValueError when k was
        given) if a cluster gets no training row."""
        cents = self._kmeans(xt, k)
        idx, _ = route(xt, cents, min(2, k), 1.0)
        assign = idx[:, 0]
        counts = np.bincount(assign, minlength=k)
        if (counts == 0).any():
            if explicit:
                empty = np.nonzero(counts == 0)[0].tolist()
                raise ValueError(f"k-means with k={k} left cluster(s) {empty} without training rows (duplicate or "
                                 f"near-duplicate source rows: {len(np.unique(xt, axis=0))} distinct of {xt.shape[0]}); "
                                 "pass a smaller k")
            return None
        if k == 1:
            return cents, assign, 1.0
        x64, c64 = xt.astype(np.float64), cents.astype(np.float64)
        scores = 2.0 * (x64 @ c64.T) - np.einsum("ij,ij->i", c64, c64)
        top2 = np.take_along_axis(scores, idx[:, :2], axis=1)
        gap = float(np.median(top2[:, 0] - top2[:, 1]))
        return cents, assign, gap if gap > 0 else 1.0

    # ------------------------------------------------------------------ use
    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X_src, X_dst) first")

    def routed_params(self) -> RoutedParams:
        """The fitted map as float32 :class:`~bc_fast.fit._routing.RoutedParams` (``.as_dict()`` for the dict)."""
        self._check_fitted()
        return RoutedParams(self.centroids_, self.coef_, self.intercept_, self.m_, self.temperature_)

    def transform(self, X: Any) -> np.ndarray:
        """The routed map of rows of the source space: float32 (and float16) input by the compiled core
        (:class:`~bc_fast.engine.routed.RoutedTransform`, dtype kept), float64 or integer input by
        :func:`routed_reference` in float64 (both from the float32 :meth:`routed_params`)."""
        self._check_fitted()
        x = check_features(X, self.n_features_in_)
        if x.dtype in (np.float32, np.float16):
            return self.operator_.apply(np.ascontiguousarray(x), out_dtype=x.dtype)
        return routed_reference(x, self.routed_params())

    predict = transform

    def export_layers(self) -> list:
        """Not available: a routed map is no layer program. The registry stores it as a routed transform
        (``Registry.add_transform(a, b, est)``, kind "routed"), which ``Registry.operator``, ``convert_table``,
        ``LegacyIndex`` and ``bc-fast convert`` run like any other."""
        raise ValueError("a local (routed) adapter is not a layer program, so it cannot be exported as layers "
                         "(ONNX, torch, sentence-transformers); store it in a registry with "
                         "Registry.add_transform(from_version, to_version, est) (kind 'routed'), or use "
                         "routed_params() for its parameters")


__all__ = ["BASES", "LocalAdapter"]
