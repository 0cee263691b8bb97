"""Adapter choice on the validation rows (by a retrieval metric, or by MSE), and the adapters by name."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._base import BaseAdapter, NotFittedError
from ._checks import check_alpha, check_fraction, check_int
from ._estimators import (
    DEFAULT_CHUNK_ROWS,
    LowRankAdapter,
    ProcrustesAdapter,
    RidgeAdapter,
)
from ._gram import PairStats, accumulate_pairs, array_chunks, val_mask
from ._local import LocalAdapter
from ._metrics import check_labels, check_select_by, pick_best, validation_scores
from ._mlp import MLPAdapter

ADAPTERS: dict[str, type] = {"ridge": RidgeAdapter, "procrustes": ProcrustesAdapter, "lowrank": LowRankAdapter,
                             "mlp": MLPAdapter, "local": LocalAdapter}
#: kinds that need the pairs in memory (skipped by a fit from streamed sums)
IN_MEMORY_KINDS = ("mlp", "local")
KINDS = ("auto",) + tuple(ADAPTERS)


def make_adapter(kind: str, **params: Any) -> BaseAdapter:
    """An unfitted adapter by name (``"auto"``, ``"ridge"``, ``"procrustes"``, ``"lowrank"``, ``"mlp"``, ``"local"``)."""
    cls = AutoAdapter if kind == "auto" else ADAPTERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {KINDS}")
    valid = cls._param_names()
    bad = sorted(set(params) - set(valid))
    if bad:
        raise TypeError(f"{cls.__name__} (kind={kind!r}) takes no parameter(s) {bad}; valid parameters: {valid}")
    return cls(**params)


def fit_adapter(X_src: Any, X_dst: Any, kind: str = "auto", *, labels: Any = None, **params: Any) -> BaseAdapter:
    """Fit an adapter of ``kind`` on in-memory pairs and return it (see :func:`make_adapter`).

    ``labels`` (one int per pair) is passed to the kinds that select on validation rows (auto, local).
    """
    est = make_adapter(kind, **params)
    if labels is not None:
        if not isinstance(est, (AutoAdapter, LocalAdapter)):
            raise ValueError(f"labels are used to choose settings on validation rows (kinds auto, local), not by "
                             f"kind={kind!r}; drop labels")
        return est.fit(X_src, X_dst, labels=labels)
    return est.fit(X_src, X_dst)


class AutoAdapter(BaseAdapter):
    """Fit each kind in ``kinds`` on the training rows and keep the best on the validation rows.

    The ranking (``select_by``) is by retrieval quality by default: the neighbour overlap@10 of the
    training-rows fit's predictions with the validation targets' own neighbours (``"overlap"``), or
    label precision@10 with ``fit(..., labels=)`` (``"labels"``); ties go to the lower MSE.
    ``select_by="mse"`` is the earlier rule (lowest validation MSE). A fit from streamed sums
    (:meth:`fit_stats`) has no validation rows in memory and ranks by MSE whatever ``select_by``
    says (``selected_by_`` tells which rule decided).

    Parameters
    ----------
    kinds : sequence of {"ridge", "procrustes", "lowrank", "mlp", "local"}
    alpha : ridge penalty for ridge, lowrank and the mlp's start (None: chosen on validation)
    rank : int or None; lowrank's rank (None: ``min(64, d_src, d_dst)``)
    mlp_params : dict, optional; extra MLPAdapter parameters (hidden, epochs, ...)
    local_params : dict, optional; extra LocalAdapter parameters (base, k, m, ...)
    select_by : {"overlap", "labels", "mse"}, default "overlap"
    val_fraction, random_state, refit, chunk_rows : as :class:`RidgeAdapter`, shared by all kinds

    Attributes
    ----------
    chosen_ : the kind picked;  best_estimator_ : its fitted adapter
    candidates_ : {kind: {"val_mse", "val_r2", "val_overlap"(, "val_label_p"), "fit_time_s"(, "alpha")}} for every
        kind tried (or {"skipped": why}); the retrieval metrics only with the pairs in memory
    selected_by_ : the rule that decided ("overlap", "labels" or "mse")
    layers_, operator_, n_features_in_, n_features_out_, val_metrics_, fit_time_s_ (of the whole search)

    Ties (within 1e-9 on the metric, then a relative 1e-9 on the MSE) go to the earlier kind in ``kinds``. The mlp
    and local kinds are skipped (and say so in candidates_) when fitting from streamed sums, mlp when torch is missing.
    """

    adapter = "auto"

    def __init__(self, kinds: Sequence[str] = ("ridge", "procrustes", "lowrank", "mlp"), *,
                 alpha: float | None = None, rank: int | None = None, mlp_params: dict | None = None,
                 local_params: dict | None = None, select_by: str = "overlap", val_fraction: float = 0.1,
                 random_state: int = 0, refit: bool = True,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.kinds = kinds
        self.alpha = alpha
        self.rank = rank
        self.mlp_params = mlp_params
        self.local_params = local_params
        self.select_by = select_by
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.refit = refit
        self.chunk_rows = chunk_rows

    @property
    def kind(self) -> str:  # type: ignore[override]
        """The registry kind of the chosen adapter."""
        self._check_fitted()
        return self.best_estimator_.kind

    def _kinds(self) -> tuple[str, ...]:
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        bad = [k for k in kinds if k not in ADAPTERS]
        if not kinds or bad:
            raise ValueError(f"kinds must be a non-empty sequence of {tuple(ADAPTERS)}, got {self.kinds!r}")
        check_alpha(self.alpha)
        check_fraction(self.val_fraction, "val_fraction")
        check_int(self.random_state, "random_state")
        if self.val_fraction == 0:
            raise ValueError("the auto adapter chooses on validation rows: val_fraction must be > 0")
        return kinds

    def _candidate(self, kind: str, d_src: int, d_dst: int) -> BaseAdapter:
        common = {"val_fraction": self.val_fraction, "random_state": self.random_state}
        if kind == "mlp":
            return MLPAdapter(**{"alpha": self.alpha, **common, **dict(self.mlp_params or {})})
        common.update(refit=self.refit, chunk_rows=self.chunk_rows)
        if kind == "local":
            return LocalAdapter(**{"alpha": self.alpha, "rank": self.rank, "select_by": self.select_by, **common,
                                   **dict(self.local_params or {})})
        if kind == "procrustes":
            return ProcrustesAdapter(**common)
        if kind == "lowrank":
            rank = min(64, d_src, d_dst) if self.rank is None else self.rank
            return LowRankAdapter(rank, self.alpha, **common)
        return RidgeAdapter(self.alpha, **common)

    def fit(self, X_src: Any, X_dst: Any, *, labels: Any = None) -> AutoAdapter:
        """Fit every kind and keep the best; ``labels`` (one int per pair) for ``select_by="labels"``."""
        self._labels = check_labels(labels, np.shape(X_src)[0]) if labels is not None else None
        try:
            return super().fit(X_src, X_dst)  # type: ignore[return-value]
        finally:
            del self._labels

    def _fit_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        kinds = self._kinds()
        labels = getattr(self, "_labels", None)
        select_by = check_select_by(self.select_by, labels is not None)
        stats = None
        if any(k not in IN_MEMORY_KINDS for k in kinds) or select_by != "mse":
            stats = accumulate_pairs(array_chunks(x, y, check_int(self.chunk_rows, "chunk_rows", 1)),
                                     val_fraction=self.val_fraction, random_state=self.random_state)
        self._search(kinds, stats, (x, y), labels, select_by)

    def fit_stats(self, stats: PairStats) -> AutoAdapter:
        """Choose among the closed-form kinds from accumulated sums, by validation MSE (the sums hold no
        rows to search); mlp and local are skipped (they need the pairs)."""
        t0 = time.perf_counter()
        self._search(self._kinds(), stats, None, None, "mse")
        self.fit_time_s_ = time.perf_counter() - t0
        return self

    def _val_prediction(self, kind: str, est: BaseAdapter, stats: PairStats, xv: np.ndarray) -> np.ndarray:
        """Predictions of the training-rows fit for the validation rows (a refitted closed form has seen them)."""
        if kind in IN_MEMORY_KINDS or not self.refit:
            if kind == "local":  # its final maps are refitted: predict with the training-rows fit
                return est.val_prediction_
            return est.transform(xv)
        probe = self._candidate(kind, stats.d_src, stats.d_dst)
        probe.set_params(refit=False)
        return probe.fit_stats(stats).transform(xv)

    def _search(self, kinds: tuple[str, ...], stats: PairStats | None, arrays: Any, labels: np.ndarray | None,
                select_by: str) -> None:
        if stats is not None and stats.val.n == 0:
            raise ValueError(f"the auto adapter chooses on validation rows, but none of the {stats.n} pairs is one "
                             f"(val_fraction={self.val_fraction}); pass more pairs, a larger val_fraction, or one kind")
        d_src, d_dst = (stats.d_src, stats.d_dst) if stats is not None else (arrays[0].shape[1], arrays[1].shape[1])
        self.candidates_: dict[str, dict[str, Any]] = {}
        fitted: dict[str, BaseAdapter] = {}
        xv = yv = lab_v = None
        if arrays is not None and select_by != "mse":
            is_val = val_mask(0, arrays[0].shape[0], self.val_fraction, self.random_state)
            xv, yv = np.asarray(arrays[0][is_val], np.float64), np.asarray(arrays[1][is_val], np.float64)
            lab_v = labels[is_val] if labels is not None else None
            if xv.shape[0] < 2:
                select_by = "mse"  # too few rows for a neighbour search; MSE alone decides
        self.selected_by_ = select_by
        for kind in kinds:
            est = self._candidate(kind, d_src, d_dst)
            t0 = time.perf_counter()
            if kind in IN_MEMORY_KINDS:
                if arrays is None:
                    self.candidates_[kind] = {"skipped": f"the {kind} kind needs the pairs in memory (streamed fit)"}
                    continue
                try:
                    est.fit(*arrays, labels=labels) if kind == "local" else est.fit(*arrays)
                except (ImportError, ValueError) as e:  # no torch; too few pairs for the clusters
                    self.candidates_[kind] = {"skipped": str(e)}
                    continue
            else:
                est.fit_stats(stats)
            fitted[kind] = est
            vm = est.val_metrics_
            self.candidates_[kind] = {"val_mse": vm["mse"], "val_r2": vm["r2"],
                                      "fit_time_s": time.perf_counter() - t0}
            if xv is not None:
                scores = validation_scores(self._val_prediction(kind, est, stats, xv), yv, lab_v)
                self.candidates_[kind].update({f"val_{m}": v for m, v in scores.items() if m != "mse"})
            if getattr(est, "alpha_", None) is not None:
                self.candidates_[kind]["alpha"] = float(est.alpha_)
        if not fitted:
            raise ValueError(f"no adapter kind could be fitted: {self.candidates_}")
        names = [k for k in kinds if k in fitted]
        metric = {"overlap": "val_overlap", "labels": "val_label_p"}.get(select_by)
        table = [{"mse": self.candidates_[k]["val_mse"],
                  **({select_by if select_by != "labels" else "label_p": self.candidates_[k][metric]} if metric else {})}
                 for k in names]
        # equal up to rounding (lowrank at full rank is ridge): the earlier kind wins
        self.chosen_ = names[pick_best(table, select_by)]
        self.best_estimator_ = fitted[self.chosen_]
        self.val_metrics_ = dict(self.best_estimator_.val_metrics_)
        if hasattr(self.best_estimator_, "layers_"):
            self._set_program(self.best_estimator_.layers_)
        else:  # a routed (local) map has no layer program: transform and the operator are the chosen one's
            for name in ("layers_", "operator_"):
                self.__dict__.pop(name, None)
            self.operator_ = self.best_estimator_.operator_
            self.n_features_in_ = self.best_estimator_.n_features_in_
            self.n_features_out_ = self.best_estimator_.n_features_out_

    def _check_fitted(self) -> None:
        if not hasattr(self, "best_estimator_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X_src, X_dst) first")

    def transform(self, X: Any) -> np.ndarray:
        """The chosen adapter's map (see :meth:`BaseAdapter.transform`)."""
        self._check_fitted()
        return self.best_estimator_.transform(X)

    predict = transform

    def export_layers(self) -> list:
        """The chosen adapter's layer program (a local adapter has none yet: ValueError)."""
        self._check_fitted()
        return self.best_estimator_.export_layers()
