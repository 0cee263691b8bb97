"""bc_fast._util.finite: the NaN/Inf row finder that checks every chunk a conversion writes."""

from __future__ import annotations

import numpy as np
import pytest

from bc_fast._util.arrays import bfloat16
from bc_fast._util.finite import first_nonfinite_row


def _reference(y: np.ndarray) -> int | None:
    bad = np.nonzero(~np.isfinite(y.astype(np.float64)).all(axis=1))[0]
    return int(bad[0]) if len(bad) else None


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, "bfloat16"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape, at", [((1, 1), (0, 0)), ((5000, 3), (4097, 2)), ((700, 256), (699, 255)),
                                       ((70, 2048), (5, 0))])
def test_finds_the_first_non_finite_row(dtype, value, shape, at):
    dt = bfloat16() if dtype == "bfloat16" else np.dtype(dtype)
    y = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y[0, 0] = 65504.0 if dt != np.float16 else 60000.0  # the largest values are still finite
    assert first_nonfinite_row(y.astype(dt)) is None
    y[at] = value
    later = (min(at[0] + 3, shape[0] - 1), 0)
    if later[0] > at[0]:
        y[later] = np.nan
    assert first_nonfinite_row(y.astype(dt)) == _reference(y.astype(dt)) == at[0]


def test_extreme_finite_values_and_empty_input():
    for dt in (np.float16, np.float32, np.float64):
        info = np.finfo(dt)
        y = np.array([[info.max, -info.max, info.tiny, -0.0, info.smallest_subnormal]], dt)
        assert first_nonfinite_row(y) is None
    assert first_nonfinite_row(np.empty((0, 4), np.float16)) is None


def test_refuses_what_it_cannot_check():
    with pytest.raises(TypeError, match="expected float16, bfloat16, float32 or float64 rows, got int32"):
        first_nonfinite_row(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="C-contiguous 2-D"):
        first_nonfinite_row(np.zeros((4, 4), np.float32)[:, ::2])
