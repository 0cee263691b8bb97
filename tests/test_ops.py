"""FusedTransform against a numpy float64 reference, at every SIMD level the CPU has."""

from __future__ import annotations

import math

import numpy as np
import pytest

import bc_fast
from bc_fast import FusedTransform, Layer, _core

U32 = 2.0**-24  # unit roundoff of float32
U16 = 2.0**-11  # unit roundoff of float16

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _levels() -> list[str]:
    levels = ["generic"]
    if "avx2" in bc_fast.build_info()["cpu"]:
        levels.append("avx2")
    return levels


@pytest.fixture(params=_levels(), autouse=True)
def simd_level(request):
    """Run every test once per usable kernel set, then restore the default."""
    before = bc_fast.build_info()["kernel"]
    _core.set_simd_level(request.param)
    yield request.param
    _core.set_simd_level(before)


def reference(layers: list[Layer], x: np.ndarray, normalize: bool = False) -> np.ndarray:
    """Step-by-step float64 application of a layer program."""
    y = x.astype(np.float64)
    for l in layers:
        y = y @ np.asarray(l.weight, np.float64).T
        if l.bias is not None:
            y = y + np.asarray(l.bias, np.float64)
        w = l.d_out if l.activation_width is None else l.activation_width
        if l.activation == "relu":
            y[:, :w] = np.maximum(y[:, :w], 0.0)
        elif l.activation == "gelu":
            y[:, :w] = 0.5 * y[:, :w] * (1.0 + _erf(y[:, :w] / math.sqrt(2.0)))
    if normalize:
        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return y


def affine_bound(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Worst-case float32 error of x @ w.T + b for any summation order (plus rounding of the result)."""
    k = w.shape[1]
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if b is not None:
        mag = mag + np.abs(b.astype(np.float64))
    return (k + 2) * U32 * mag + 1e-30


def rand(rng, *shape, scale=1.0, dtype=np.float32):
    return (rng.standard_normal(shape) * scale).astype(dtype)


SHAPES = [(1, 1), (1, 7), (3, 1), (5, 70), (17, 129), (64, 64), (100, 3), (256, 256), (768, 384), (1024, 1000)]
BATCHES = [1, 2, 5, 6, 7, 13, 63, 64, 65, 300, 1031]


@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("n", BATCHES)
def test_affine_fp32_within_rounding_bound(d_in, d_out, n):
    rng = np.random.default_rng(d_in * 7919 + d_out * 31 + n)
    w, b, x = rand(rng, d_out, d_in), rand(rng, d_out), rand(rng, n, d_in)
    y = FusedTransform.affine(w, b).apply(x)
    assert y.shape == (n, d_out) and y.dtype == np.float32
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    assert np.all(np.abs(y - ref) <= affine_bound(x, w, b))


@pytest.mark.parametrize("in_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n", [1, 9, 64, 65, 2000])
def test_dtype_paths(in_dtype, out_dtype, n):
    rng = np.random.default_rng(n)
    d_in, d_out = 96, 200
    w, b = rand(rng, d_out, d_in, scale=0.1), rand(rng, d_out)
    x = rand(rng, n, d_in, dtype=in_dtype)
    y = FusedTransform.affine(w, b).apply(x, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    bound = affine_bound(x, w, b)
    if out_dtype == np.float16:
        bound = bound + np.abs(ref) * U16 + 2.0**-25  # one fp16 rounding of the result
    assert np.all(np.abs(y.astype(np.float64) - ref) <= bound)


def test_fp16_conversion_is_exact_round_to_nearest_even():
    # Identity weights: the output is the input converted fp16 -> fp32 -> fp16, which must be exact,
    # and fp32 -> fp16 must round like numpy (nearest even), subnormals, overflow and signs included.
    specials = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 2.98e-8,
                         6.1e-5, 6.0e-5, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 1234.5678], np.float32)
    rng = np.random.default_rng(0)
    x = np.concatenate([specials, rand(rng, 4096, scale=100.0), rand(rng, 4096, scale=1e-6)]).reshape(-1, 1)
    op = FusedTransform.affine(np.ones((1, 1), np.float32))
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    np.testing.assert_array_equal(op.apply(x, out_dtype=np.float16), expected)
    x16 = expected
    np.testing.assert_array_equal(op.apply(x16), x16.astype(np.float32))
    np.testing.assert_array_equal(op.apply(x16, out_dtype=np.float16), x16)


@pytest.mark.parametrize("n", [1, 4, 64, 333])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp_program_with_partial_activation_and_normalize(n, activation):
    rng = np.random.default_rng(n)
    d_in, hidden, d_out = 48, 130, 40
    layers = [
        Layer(rand(rng, hidden + d_out, d_in, scale=d_in**-0.5), rand(rng, hidden + d_out), activation,
              activation_width=hidden),
        Layer(rand(rng, 77, hidden + d_out, scale=(hidden + d_out) ** -0.5), None, activation),
        Layer(rand(rng, d_out, 77, scale=77**-0.5), rand(rng, d_out)),
    ]
    x = rand(rng, n, d_in)
    for normalize in (False, True):
        y = FusedTransform(layers, normalize=normalize).apply(x)
        ref = reference(layers, x, normalize)
        np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 if normalize else 2e-4)
        if normalize:
            np.testing.assert_allclose(np.linalg.norm(y.astype(np.float64), axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_activation_accuracy_over_a_wide_range(activation):
    # Identity weights isolate the activation: exact erf GELU to within float32 rounding.
    x = np.concatenate([np.linspace(-12, 12, 4001), [-100.0, -30.0, -1e-30, 0.0, 1e-30, 30.0, 100.0]])
    x = x.astype(np.float32).reshape(-1, 1)
    layer = Layer(np.ones((1, 1), np.float32), activation=activation)
    got = FusedTransform([layer]).apply(x).astype(np.float64)
    ref = reference([layer], x)
    if activation == "relu":
        np.testing.assert_array_equal(got, ref)
    assert np.all(np.abs(got - ref) <= 4e-7 * np.maximum(np.abs(ref), 1.0))


def test_residual_block_as_layer_program():
    # P x + W2 relu(W1 x + b1) + b2 written as [W1; P] (relu on the first rows), then [W2, I].
    rng = np.random.default_rng(1)
    d_in, hidden, d_out = 32, 64, 24
    w1, b1, p = rand(rng, hidden, d_in), rand(rng, hidden), rand(rng, d_out, d_in)
    w2, b2 = rand(rng, d_out, hidden), rand(rng, d_out)
    op = FusedTransform([
        Layer(np.vstack([w1, p]), np.concatenate([b1, np.zeros(d_out, np.float32)]), "relu", activation_width=hidden),
        Layer(np.hstack([w2, np.eye(d_out, dtype=np.float32)]), b2),
    ])
    x = rand(rng, 50, d_in)
    x64 = x.astype(np.float64)
    ref = x64 @ p.T + np.maximum(x64 @ w1.T + b1, 0) @ w2.T + b2
    np.testing.assert_allclose(op.apply(x), ref, rtol=1e-5, atol=1e-4)


def test_zero_rows_normalize_to_zero():
    op = FusedTransform.affine(np.zeros((3, 4), np.float32), normalize=True)
    np.testing.assert_array_equal(op.apply(np.ones((2, 4), np.float32)), np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("n", [65, 1000, 5003])
def test_threads_give_identical_results(n):
    rng = np.random.default_rng(n)
    w, b, x = rand(rng, 300, 200), rand(rng, 300), rand(rng, n, 200)
    op = FusedTransform.affine(w, b, normalize=True)
    one = op.apply(x, threads=1)
    for t in (2, 3, 8):
        np.testing.assert_array_equal(op.apply(x, threads=t), one)


def test_out_buffer_is_written_in_place_and_returned():
    rng = np.random.default_rng(2)
    w, x = rand(rng, 16, 8), rand(rng, 100, 8)
    op = FusedTransform.affine(w)
    out = np.full((100, 16), np.nan, np.float16)
    res = op.apply(x, out=out)
    assert res is out
    np.testing.assert_array_equal(out, op.apply(x, out_dtype=np.float16))


def test_empty_batch_returns_empty():
    op = FusedTransform.affine(np.ones((5, 3), np.float32))
    y = op.apply(np.empty((0, 3), np.float32))
    assert y.shape == (0, 5) and y.dtype == np.float32


def test_large_batch_matches_reference():
    rng = np.random.default_rng(3)
    w, b, x = rand(rng, 128, 256, scale=0.05), rand(rng, 128), rand(rng, 100_003, 256)
    y = FusedTransform.affine(w, b).apply(x)
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    assert np.all(np.abs(y - ref) <= affine_bound(x, w, b))


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    w, b = rand(rng, 12, 10), rand(rng, 12)
    op = FusedTransform.affine(w, b)
    for dtype in (torch.float32, torch.float16):
        xt = torch.from_numpy(rand(rng, 70, 10)).to(dtype)
        y = op.apply(xt)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
        ref = xt.double().numpy() @ w.astype(np.float64).T + b
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-4)
        out = torch.empty(70, 12, dtype=torch.float16)
        assert op.apply(xt, out=out) is out
        np.testing.assert_allclose(out.double().numpy(), ref, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="requires grad"):
        op.apply(torch.ones(2, 10, requires_grad=True))
    with pytest.raises(ValueError, match="C-contiguous"):
        op.apply(torch.ones(10, 2).t())
    with pytest.raises(TypeError, match="float32 or float16"):
        op.apply(torch.ones(2, 10, dtype=torch.float64))


class TestBadInput:
    op = FusedTransform.affine(np.ones((4, 3), np.float32))

    def test_wrong_ndim(self):
        with pytest.raises(ValueError, match=r"2-D array.*reshape\(1, -1\)"):
            self.op.apply(np.ones(3, np.float32))

    def test_wrong_feature_dim(self):
        with pytest.raises(ValueError, match="5 features per row, expected 3"):
            self.op.apply(np.ones((2, 5), np.float32))

    @pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint8, np.complex64])
    def test_unsupported_dtype(self, dtype):
        with pytest.raises(TypeError, match="float32 or float16"):
            self.op.apply(np.ones((2, 3), dtype))

    @pytest.mark.parametrize("dtype", [">f4", ">f2"])
    def test_byte_swapped(self, dtype):
        with pytest.raises(TypeError, match="float32 or float16"):
            self.op.apply(np.ones((2, 3), dtype))

    def test_non_singleton_float32_dtype_is_accepted(self):
        x = np.ones((2, 3), np.dtype("float32", metadata={"unit": "m"}))
        np.testing.assert_array_equal(self.op.apply(x), np.full((2, 4), 3.0, np.float32))

    def test_non_contiguous(self):
        with pytest.raises(ValueError, match="ascontiguousarray"):
            self.op.apply(np.ones((3, 2), np.float32).T)

    def test_out_wrong_shape_dtype_rows(self):
        x = np.ones((2, 3), np.float32)
        with pytest.raises(ValueError, match="expected 4"):
            self.op.apply(x, out=np.empty((2, 5), np.float32))
        with pytest.raises(ValueError, match="3 rows but x has 2"):
            self.op.apply(x, out=np.empty((3, 4), np.float32))
        with pytest.raises(TypeError, match="float32 or float16"):
            self.op.apply(x, out=np.empty((2, 4), np.float64))
        ro = np.empty((2, 4), np.float32)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            self.op.apply(x, out=ro)

    def test_out_aliasing_x(self):
        op = FusedTransform.affine(np.eye(4, dtype=np.float32))
        x = np.ones((3, 4), np.float32)
        with pytest.raises(ValueError, match="overlap"):
            op.apply(x, out=x)
        buf = np.ones((4, 4), np.float32)
        with pytest.raises(ValueError, match="overlap"):
            op.apply(buf[:3], out=buf[1:])

    def test_bad_threads(self):
        with pytest.raises(ValueError, match="threads"):
            self.op.apply(np.ones((2, 3), np.float32), threads=0)

    def test_not_an_array(self):
        with pytest.raises(TypeError, match="numpy array"):
            self.op.apply([[1.0, 2.0, 3.0]])

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_nonfinite_weights(self, bad):
        w = np.ones((2, 2), np.float32)
        w[1, 0] = bad
        with pytest.raises(ValueError, match=r"layers\[0\]\.weight contains NaN or Inf"):
            FusedTransform.affine(w)
        with pytest.raises(ValueError, match=r"layers\[0\]\.bias contains NaN or Inf"):
            FusedTransform.affine(np.ones((2, 2)), np.array([0.0, bad]))

    def test_bad_layers(self):
        with pytest.raises(ValueError, match="at least one layer"):
            FusedTransform([])
        with pytest.raises(ValueError, match=r"layers\[1\]\.weight has d_in=3 but the previous layer outputs 4"):
            FusedTransform([Layer(np.ones((4, 2))), Layer(np.ones((5, 3)))])
        with pytest.raises(ValueError, match="activation must be one of"):
            FusedTransform([Layer(np.ones((4, 2)), activation="tanh")])
        with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
            FusedTransform([Layer(np.ones((4, 2)), np.ones(3))])
        with pytest.raises(ValueError, match="activation_width"):
            FusedTransform([Layer(np.ones((4, 2)), activation="relu", activation_width=5)])
        with pytest.raises(ValueError, match="non-empty 2-D"):
            FusedTransform([Layer(np.ones(4))])


def test_build_info_reports_choices():
    info = bc_fast.build_info()
    assert info["kernel"] in ("generic", "avx2")
    assert info["max_threads"] >= 1 and info["small_batch_rows"] >= 1
    assert set(info) >= {"kernel", "cpu", "blas", "openmp", "max_threads", "compiler"}
    with pytest.raises(ValueError, match="unknown SIMD level"):
        _core.set_simd_level("sse9")


def test_repr():
    op = FusedTransform([Layer(np.ones((4, 2)), activation="relu"), Layer(np.ones((3, 4)))], normalize=True)
    assert repr(op) == "FusedTransform(2 -> 4(relu) -> 3, normalize)"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Python >= 3.12 warns about fork + threads
def test_forked_child_does_not_hang_after_parent_used_threads():
    import multiprocessing as mp
    import sys as _sys

    if not _sys.platform.startswith("linux"):
        pytest.skip("fork start method is Linux-only here")
    rng = np.random.default_rng(7)
    op = FusedTransform.affine(rand(rng, 64, 64))
    x = rand(rng, 20_000, 64)
    expected = op.apply(x, threads=2)  # the parent starts the OpenMP pool
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_apply, args=(op, x, q))
    p.start()
    try:
        got = q.get(timeout=60)  # read before join: a child cannot exit with unread queue data
    except Exception:  # queue.Empty: the child never answered
        got = None
    p.join(10)
    if p.is_alive():
        p.kill()
    assert got is not None, "the forked child hung in the core"
    assert p.exitcode == 0
    np.testing.assert_array_equal(got, expected)


def _child_apply(op, x, q):
    q.put(op.apply(x, threads=2))
