"""Adapter choice by validation error, and the adapters by name."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ._base import BaseAdapter
from ._checks import check_alpha, check_fraction, check_int
from ._estimators import DEFAULT_CHUNK_ROWS, LowRankAdapter, ProcrustesAdapter, RidgeAdapter
from ._gram import PairStats, accumulate_pairs, array_chunks
from ._mlp import MLPAdapter

ADAPTERS: dict[str, type] = {"ridge": RidgeAdapter, "procrustes": ProcrustesAdapter, "lowrank": LowRankAdapter,
                             "mlp": MLPAdapter}
KINDS = ("auto",) + tuple(ADAPTERS)


def make_adapter(kind: str, **params: Any) -> BaseAdapter:
    """An unfitted adapter by name (``"auto"``, ``"ridge"``, ``"procrustes"``, ``"lowrank"``, ``"mlp"``)."""
    cls = AutoAdapter if kind == "auto" else ADAPTERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {KINDS}")
    valid = cls._param_names()
    bad = sorted(set(params) - set(valid))
    if bad:
        raise TypeError(f"{cls.__name__} (kind={kind!r}) takes no parameter(s) {bad}; valid parameters: {valid}")
    return cls(**params)


def fit_adapter(X_src: Any, X_dst: Any, kind: str = "auto", **params: Any) -> BaseAdapter:
    """Fit an adapter of ``kind`` on in-memory pairs and return it (see :func:`make_adapter`)."""
    return make_adapter(kind, **params).fit(X_src, X_dst)


class AutoAdapter(BaseAdapter):
    """Fit each kind in ``kinds`` on the training rows and keep the lowest validation MSE.

    Parameters
    ----------
    kinds : sequence of {"ridge", "procrustes", "lowrank", "mlp"}
    alpha : ridge penalty for ridge, lowrank and the mlp's start (None: chosen on validation)
    rank : int or None; lowrank's rank (None: ``min(64, d_src, d_dst)``)
    mlp_params : dict, optional; extra MLPAdapter parameters (hidden, epochs, ...)
    val_fraction, random_state, refit, chunk_rows : as :class:`RidgeAdapter`, shared by all kinds

    Attributes
    ----------
    chosen_ : the kind picked;  best_estimator_ : its fitted adapter
    candidates_ : {kind: {"val_mse", "val_r2", "fit_time_s"(, "alpha")}} for every kind tried (or {"skipped": why})
    layers_, operator_, n_features_in_, n_features_out_, val_metrics_, fit_time_s_ (of the whole search)

    Ties (within a relative 1e-9) go to the earlier kind in ``kinds``. The mlp kind is skipped (and says so in
    candidates_) when fitting from streamed sums, or when torch is missing.
    """

    adapter = "auto"

    def __init__(self, kinds: Sequence[str] = ("ridge", "procrustes", "lowrank", "mlp"), *,
                 alpha: float | None = None, rank: int | None = None, mlp_params: dict | None = None,
                 val_fraction: float = 0.1, random_state: int = 0, refit: bool = True,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.kinds = kinds
        self.alpha = alpha
        self.rank = rank
        self.mlp_params = mlp_params
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
        if kind == "procrustes":
            return ProcrustesAdapter(**common)
        if kind == "lowrank":
            rank = min(64, d_src, d_dst) if self.rank is None else self.rank
            return LowRankAdapter(rank, self.alpha, **common)
        return RidgeAdapter(self.alpha, **common)

    def _fit_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        kinds = self._kinds()
        stats = None
        if any(k != "mlp" for k in kinds):
            stats = accumulate_pairs(array_chunks(x, y, check_int(self.chunk_rows, "chunk_rows", 1)),
                                     val_fraction=self.val_fraction, random_state=self.random_state)
        self._search(kinds, stats, (x, y))

    def fit_stats(self, stats: PairStats) -> "AutoAdapter":
        """Choose among the closed-form kinds from accumulated sums (mlp is skipped: it needs the pairs)."""
        t0 = time.perf_counter()
        self._search(self._kinds(), stats, None)
        self.fit_time_s_ = time.perf_counter() - t0
        return self

    def _search(self, kinds: tuple[str, ...], stats: PairStats | None, arrays: Any) -> None:
        if stats is not None and stats.val.n == 0:
            raise ValueError(f"the auto adapter chooses on validation rows, but none of the {stats.n} pairs is one "
                             f"(val_fraction={self.val_fraction}); pass more pairs, a larger val_fraction, or one kind")
        d_src, d_dst = (stats.d_src, stats.d_dst) if stats is not None else (arrays[0].shape[1], arrays[1].shape[1])
        self.candidates_: dict[str, dict[str, Any]] = {}
        fitted: dict[str, BaseAdapter] = {}
        for kind in kinds:
            est = self._candidate(kind, d_src, d_dst)
            t0 = time.perf_counter()
            if kind == "mlp":
                if arrays is None:
                    self.candidates_[kind] = {"skipped": "the mlp kind needs the pairs in memory (streamed fit)"}
                    continue
                try:
                    est.fit(*arrays)
                except ImportError as e:
                    self.candidates_[kind] = {"skipped": str(e)}
                    continue
            else:
                est.fit_stats(stats)
            fitted[kind] = est
            vm = est.val_metrics_
            self.candidates_[kind] = {"val_mse": vm["mse"], "val_r2": vm["r2"],
                                      "fit_time_s": time.perf_counter() - t0}
            if getattr(est, "alpha_", None) is not None:
                self.candidates_[kind]["alpha"] = float(est.alpha_)
        if not fitted:
            raise ValueError(f"no adapter kind could be fitted: {self.candidates_}")
        best = min(self.candidates_[k]["val_mse"] for k in fitted)
        # equal up to rounding (lowrank at full rank is ridge): the earlier kind wins
        self.chosen_ = next(k for k in kinds if k in fitted and self.candidates_[k]["val_mse"] <= best * (1 + 1e-9))
        self.best_estimator_ = fitted[self.chosen_]
        self.val_metrics_ = dict(self.best_estimator_.val_metrics_)
        self._set_program(self.best_estimator_.layers_)
