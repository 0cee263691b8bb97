"""Chain fusion: fused program vs float64 step-by-step reference, chains of 1..6 mixed steps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bc_fast import FusedTransform, Layer
from bc_fast.engine.fusion import apply_layers_reference, chain_flops, flatten_chain, fuse_chain

KINDS = ("linear", "affine", "mlp_relu", "mlp_gelu")


def make_step(rng: np.random.Generator, kind: str, d_in: int, d_out: int, hidden: int = 24) -> list[Layer]:
    """One backward transform of ``kind`` mapping d_in -> d_out, as exported by bc_fast.train."""
    s = 1.0 / math.sqrt(d_in)
    if kind == "linear":
        return [Layer((rng.standard_normal((d_out, d_in)) * s).astype(np.float32))]
    if kind == "affine":
        return [Layer((rng.standard_normal((d_out, d_in)) * s).astype(np.float32),
                      rng.standard_normal(d_out).astype(np.float32) * 0.1)]
    act = "relu" if kind == "mlp_relu" else "gelu"
    w1 = rng.standard_normal((hidden, d_in)) * s
    p = rng.standard_normal((d_out, d_in)) * s
    w2 = rng.standard_normal((d_out, hidden)) / math.sqrt(hidden)
    b1 = rng.standard_normal(hidden) * 0.1
    b2 = rng.standard_normal(d_out) * 0.1
    return [
        Layer(np.vstack([w1, p]).astype(np.float32), np.concatenate([b1, np.zeros(d_out)]).astype(np.float32),
              act, activation_width=hidden),
        Layer(np.hstack([w2, np.eye(d_out)]).astype(np.float32), b2.astype(np.float32)),
    ]


def naive_f32(layers: list[Layer], x: np.ndarray) -> np.ndarray:
    """Step-by-step float32 numpy: the error yardstick for the fused core."""
    y = x.astype(np.float32)
    for l in layers:
        y = y @ l.weight.T
        if l.bias is not None:
            y = y + l.bias
        if not l.is_affine:
            w = l.d_out if l.activation_width is None else l.activation_width
            h = y[:, :w].astype(np.float64)
            if l.activation == "relu":
                y[:, :w] = np.maximum(h, 0)
            else:
                y[:, :w] = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    return y


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_matches_reference_mixed_kinds(length: int, seed: int, simd_level: str) -> None:
    rng = np.random.default_rng(100 * length + seed)
    dims = [int(d) for d in rng.choice([17, 32, 48, 59], size=length + 1)]
    kinds = [KINDS[(seed + i) % len(KINDS)] if length > 1 else KINDS[seed] for i in range(length)]
    steps = [make_step(rng, kinds[i], dims[i], dims[i + 1]) for i in range(length)]
    raw = [l for s in steps for l in s]
    fused = fuse_chain(steps)
    assert fused[0].d_in == dims[0] and fused[-1].d_out == dims[-1]
    assert sum(not l.is_affine for l in fused) == sum(not l.is_affine for l in raw)
    x = rng.standard_normal((33, dims[0])).astype(np.float32)
    ref = apply_layers_reference(raw, x)
    # float64 fusion is exact: the fused program in float64 equals the raw chain in float64
    np.testing.assert_allclose(apply_layers_reference(fused, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    got = FusedTransform(fused).apply(x)
    err = np.abs(got - ref).max()
    naive_err = np.abs(naive_f32(raw, x) - ref).max()
    scale = np.abs(ref).max()
    assert err <= 2 * naive_err + 1e-6 * scale, (kinds, err, naive_err, scale)


@pytest.mark.parametrize("length", [1, 3, 6])
def test_affine_chain_collapses_to_one_layer(length: int) -> None:
    rng = np.random.default_rng(length)
    dims = [40, 32, 64, 16, 48, 40, 24][: length + 1]
    steps = [make_step(rng, "affine" if i % 2 else "linear", dims[i], dims[i + 1]) for i in range(length)]
    fused = fuse_chain(steps)
    assert len(fused) == 1 and fused[0].is_affine and fused[0].weight.dtype == np.float32
    w64 = np.eye(dims[0])
    b64 = np.zeros(dims[0])
    for (l,) in steps:
        lw = l.weight.astype(np.float64)
        w64, b64 = lw @ w64, lw @ b64 + (0 if l.bias is None else l.bias.astype(np.float64))
    np.testing.assert_array_equal(fused[0].weight, w64.astype(np.float32))
    if length == 1:
        assert fused[0].bias is None  # a pure linear step keeps no bias
    else:
        np.testing.assert_array_equal(fused[0].bias, b64.astype(np.float32))


def test_affine_run_folds_into_next_activation_when_cheaper() -> None:
    rng = np.random.default_rng(0)
    # square affine before an MLP: folding costs nothing extra -> 2 layers instead of 3
    steps = [make_step(rng, "mlp_gelu", 32, 32), make_step(rng, "affine", 32, 32), make_step(rng, "mlp_relu", 32, 32)]
    fused = fuse_chain(steps)
    assert [l.activation for l in fused] == ["gelu", "relu", "none"]
    assert chain_flops(fused) < chain_flops(flatten_chain(steps))
    # a bottleneck (64 -> 4) before a wide activation layer would cost more fused: kept separate
    steps = [make_step(rng, "linear", 64, 4), make_step(rng, "mlp_relu", 4, 64, hidden=64)]
    fused = fuse_chain(steps)
    assert [l.activation for l in fused] == ["none", "relu", "none"]
    assert len(fuse_chain(steps, fold_into_activation=False)) == 3


def test_reference_activation_width_and_gelu() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4))
    layer = Layer(w.astype(np.float32), None, "gelu", activation_width=4)
    x = rng.standard_normal((5, 4)) * 3
    y = apply_layers_reference([layer], x)
    lin = x @ w.astype(np.float32).astype(np.float64).T
    want = lin.copy()
    want[:, :4] = torch.nn.functional.gelu(torch.from_numpy(lin[:, :4])).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    relu = apply_layers_reference([Layer(w.astype(np.float32), None, "relu", activation_width=2)], x)
    assert (relu[:, :2] >= 0).all() and (relu[:, 2:] < 0).any()


def test_chain_errors() -> None:
    rng = np.random.default_rng(0)
    a = make_step(rng, "linear", 8, 6)
    b = make_step(rng, "linear", 5, 4)
    with pytest.raises(ValueError, match="ordered newest first"):
        fuse_chain([a, b])
    with pytest.raises(ValueError, match="no steps"):
        fuse_chain([])
    with pytest.raises(ValueError, match=r"steps\[1\] has no layers"):
        fuse_chain([a, []])
    with pytest.raises(TypeError, match="single Layer"):
        fuse_chain([a[0]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="must be a bc_fast.Layer"):
        fuse_chain([[np.eye(3)]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="expects 8 features, got 3"):
        apply_layers_reference(a, np.zeros((2, 3)))


def _scaled(scale: float, activation: str = "none") -> list[Layer]:
    return [Layer(np.eye(2, dtype=np.float32) * np.float32(scale), None, activation)]


@pytest.mark.parametrize("steps,labels,named", [
    ([_scaled(1e20), _scaled(1e20)], None, r"steps\[0\], steps\[1\]"),
    ([_scaled(1e20), _scaled(1e20)], ["2 -> 1", "1 -> 0"], "2 -> 1, 1 -> 0"),
    ([_scaled(1.0, "relu"), _scaled(1e20), _scaled(1e20)], None, r"steps\[1\], steps\[2\]"),  # only the overflowing run
    ([_scaled(1e20), _scaled(1e20, "relu")], None, r"steps\[0\], steps\[1\]"),  # run folded into the activation
])
def test_fused_product_beyond_float32_names_its_steps(steps: list, labels: list | None, named: str) -> None:
    # finite float32 steps whose float64 product overflows float32 used to surface as a RuntimeWarning and
    # "layers[0].weight contains NaN or Inf"
    with pytest.raises(ValueError, match=rf"^the fused chain of {named} exceeds float32 range \(max \|value\| = "
                                         r"1e\+40\): each step's weights are finite.*rescale"):
        fuse_chain(steps, labels=labels)


def test_fused_product_within_float32_still_fuses() -> None:
    steps = [_scaled(1e30), _scaled(1e-30), _scaled(3.0)]
    x = np.array([[1.0, -2.0]], np.float32)
    fused = fuse_chain(steps, labels=["a", "b", "c"])
    assert len(fused) == 1
    np.testing.assert_allclose(apply_layers_reference(fused, x), apply_layers_reference(flatten_chain(steps), x),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="labels names 2 steps, but the chain has 3"):
        fuse_chain(steps, labels=["a", "b"])
