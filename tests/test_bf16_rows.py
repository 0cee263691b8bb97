"""bfloat16 rows in and out of the CPU core (numpy ml_dtypes.bfloat16 arrays, torch bf16 tensors): the
arithmetic stays float32, the conversions are exact (in) and round to nearest even (out)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bc_fast import FusedTransform, Layer
from bc_fast.engine.routed import RoutedTransform

BF16 = np.dtype(ml_dtypes.bfloat16)


def _op(normalize=False) -> FusedTransform:
    rng = np.random.default_rng(0)
    layers = [Layer(rng.standard_normal((96, 50)).astype(np.float32) / 7, rng.standard_normal(96).astype(np.float32),
                    "gelu", activation_width=60),
              Layer(rng.standard_normal((70, 96)).astype(np.float32) / 10, rng.standard_normal(70).astype(np.float32))]
    return FusedTransform(layers, normalize=normalize)


@pytest.mark.parametrize("n", [1, 5, 333])
@pytest.mark.parametrize("normalize", [False, True])
def test_bf16_in_is_exact_and_bf16_out_is_the_float32_result_rounded(simd_level, n, normalize):
    op = _op(normalize)
    x = np.random.default_rng(n).standard_normal((n, 50)).astype(np.float32).astype(BF16)
    y32 = op.apply(x.astype(np.float32), threads=1)  # bf16 -> float32 is exact, so the same bits
    assert np.array_equal(op.apply(x, threads=1), y32)
    ybf = op.apply(x, out_dtype="bfloat16", threads=1)
    assert ybf.dtype == BF16
    assert np.array_equal(ybf.view(np.uint16), y32.astype(BF16).view(np.uint16))  # ml_dtypes rounds to nearest even
    for t in (2, 3):
        assert np.array_equal(op.apply(x, out_dtype=BF16, threads=t).view(np.uint16), ybf.view(np.uint16))


def test_rounding_ties_overflow_and_nan(simd_level):
    ident = FusedTransform.affine(np.eye(20, dtype=np.float32))
    row = np.array([1.0, 1.00390625, 1.01171875, -1.01171875, 65504.0, 1e-40, -2.5e-39, 3.3895314e38, 1.0000001,
                    3.4e38, -3.4e38] + [0.5] * 9, np.float32)
    out = ident.apply(row[None], out_dtype=BF16)
    assert np.array_equal(out.view(np.uint16), row[None].astype(BF16).view(np.uint16))
    assert np.isinf(out[0, 9].astype(np.float32)) and np.isinf(out[0, 10].astype(np.float32))
    nan_row = np.full((1, 20), np.nan, np.float32)
    assert np.isnan(ident.apply(nan_row, out_dtype=BF16).astype(np.float32)).all()


def test_torch_bf16_tensors_in_and_out():
    torch = pytest.importorskip("torch", reason="torch is not installed (the train extra)")
    op = _op()
    x = torch.randn(40, 50, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = op.apply(x, out_dtype=torch.bfloat16)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.shape == (40, 70)
    ref = op.apply(x.float().numpy()).astype(BF16)
    assert np.array_equal(y.view(torch.int16).numpy(), ref.view(np.int16))
    out = torch.empty(40, 70, dtype=torch.bfloat16)
    assert op.apply(x, out=out) is out and torch.equal(out, y)
    assert op.apply(x).dtype == torch.float32  # the default output stays float32


def test_routed_operator_takes_and_returns_bf16():
    rng = np.random.default_rng(3)
    op = RoutedTransform.from_centroids(rng.standard_normal((4, 24)), rng.standard_normal((4, 16, 24)) / 5,
                                        rng.standard_normal((4, 16)), 2, 1.0)
    x = rng.standard_normal((100, 24)).astype(BF16)
    y = op.apply(x, out_dtype=BF16)
    assert np.array_equal(y.view(np.uint16), op.apply(x.astype(np.float32)).astype(BF16).view(np.uint16))


def test_other_two_byte_types_are_refused():
    op = _op()
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        op.apply(np.zeros((2, 50), np.int16))
    with pytest.raises(TypeError, match="out_dtype must be float32, float16 or bfloat16"):
        op.apply(np.zeros((2, 50), np.float32), out_dtype=np.int16)
