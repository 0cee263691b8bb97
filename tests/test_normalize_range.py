"""normalize=True over the whole float32 range: rows whose sum of squares overflows float32 still come out as
unit vectors (the core sums them again in double), against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from bc_fast import FusedTransform
from bc_fast.engine.routed import RoutedTransform

ROWS = np.array([[3e19, 4e19, 0, 0],      # squares overflow float32
                 [3e18, -4e18, 0, 0],     # squares fit
                 [1e38, 0, 0, 0],          # near float32's largest value
                 [2e38, 2e38, 2e38, 2e38],
                 [1.0, 2.0, 2.0, 0.0]], np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.linalg.norm(x64, axis=1, keepdims=True)


@pytest.mark.parametrize("out_dtype, tol", [(np.float32, 1e-6), (np.float16, 1e-3)])
def test_fused_operator_normalises_huge_rows(out_dtype, tol):
    op = FusedTransform.affine(np.eye(4, dtype=np.float32), normalize=True)
    y = op.apply(ROWS, out_dtype=out_dtype)
    np.testing.assert_allclose(y.astype(np.float64), _unit_rows(ROWS), rtol=0, atol=tol)


def test_routed_operator_normalises_huge_rows():
    op = RoutedTransform(np.zeros((1, 4)), np.zeros(1), np.eye(4)[None], np.zeros((1, 4)), 1, 1.0, normalize=True)
    np.testing.assert_allclose(op.apply(ROWS).astype(np.float64), _unit_rows(ROWS), rtol=0, atol=1e-6)


def test_rows_with_inf_or_nan_stay_non_finite():
    """The double-precision retry is for finite rows; a row holding an Inf or a NaN is not made to look valid."""
    op = FusedTransform.affine(np.eye(3, dtype=np.float32), normalize=True)
    y = op.apply(np.array([[np.inf, 1.0, 0.0], [np.nan, 1.0, 0.0]], np.float32))
    assert np.isnan(y[0, 0]) and np.isnan(y[1]).all()
