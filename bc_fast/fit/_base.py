"""The estimator base: scikit-learn conventions without scikit-learn, and the compiled-core transform."""

from __future__ import annotations

import inspect
import time
from typing import Any, Sequence

import numpy as np

from ..engine.fusion import apply_layers_reference
from ..engine import FusedTransform, Layer
from ._checks import check_features, check_pair_chunk
from ._gram import r2_from_sums


class NotFittedError(ValueError, AttributeError):
    """The adapter is used before ``fit`` (as scikit-learn's NotFittedError)."""


def r2_uniform(y: np.ndarray, y_hat: np.ndarray) -> float:
    """R^2 averaged uniformly over outputs (scikit-learn's ``r2_score`` with multioutput='uniform_average')."""
    y, y_hat = np.asarray(y, np.float64), np.asarray(y_hat, np.float64)
    return r2_from_sums(((y - y_hat) ** 2).sum(axis=0), ((y - y.mean(axis=0)) ** 2).sum(axis=0))


class BaseAdapter:
    """Common face of every adapter: params, ``transform`` through the compiled core, ``score``, export.

    Subclasses set ``kind`` (the registry's transform kind) and ``adapter`` (the fit's name),
    store their constructor arguments unchanged, and implement ``_fit_arrays``.
    """

    kind: str = "affine"
    adapter: str = "base"

    # --------------------------------------------------------------- params
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters (scikit-learn's ``get_params``)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> "BaseAdapter":
        """Set constructor parameters; unknown names are refused. Returns self."""
        valid = self._param_names()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}; valid parameters: {valid}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # --------------------------------------------------------------- fitting
    def fit(self, X_src: Any, X_dst: Any) -> "BaseAdapter":
        """Fit the map from ``X_src`` (n, d_src) to ``X_dst`` (n, d_dst): row i of both is the same item."""
        t0 = time.perf_counter()
        x, y = check_pair_chunk(X_src, X_dst, finite=False)  # _fit_arrays checks NaN/Inf (chunk by chunk)
        if x.shape[0] == 0:
            raise ValueError("no pairs: X_src and X_dst have 0 rows")
        self._fit_arrays(x, y)
        self.fit_time_s_ = time.perf_counter() - t0
        return self

    def _fit_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        """Fit on checked 2-D arrays with equal row counts; must refuse NaN/Inf rows itself."""
        raise NotImplementedError

    def _set_program(self, layers: Sequence[Layer]) -> None:
        """Record the fitted layer program (float64 weights, exact) and compile it for the core."""
        self.layers_ = list(layers)
        self.operator_ = FusedTransform(self.layers_)
        self.n_features_in_ = self.layers_[0].d_in
        self.n_features_out_ = self.layers_[-1].d_out

    def _check_fitted(self) -> None:
        if not hasattr(self, "layers_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X_src, X_dst) first")

    # --------------------------------------------------------------- using
    def transform(self, X: Any) -> np.ndarray:
        """Map rows of the source space into the target space.

        float32 (and float16) input runs through the compiled core (``operator_``) and keeps its
        dtype; float64 or integer input is computed in float64 from the exact fitted weights.
        """
        self._check_fitted()
        x = check_features(X, self.n_features_in_)
        if x.dtype in (np.float32, np.float16):
            return self.operator_.apply(np.ascontiguousarray(x), out_dtype=x.dtype)
        return apply_layers_reference(self.layers_, x)

    predict = transform

    def fit_transform(self, X_src: Any, X_dst: Any) -> np.ndarray:
        """``fit(X_src, X_dst)``, then ``transform(X_src)``."""
        return self.fit(X_src, X_dst).transform(X_src)

    def score(self, X_src: Any, X_dst: Any) -> float:
        """R^2 of ``transform(X_src)`` against ``X_dst`` (uniform average over outputs)."""
        self._check_fitted()
        x, y = check_pair_chunk(X_src, X_dst)
        return r2_uniform(y, self.transform(x))

    def export_layers(self) -> list[Layer]:
        """The fitted transform as a layer program (for ``Registry.add_transform`` and fusion)."""
        self._check_fitted()
        return list(self.layers_)
