"""FusedTransform against a numpy float64 reference, at every SIMD level the CPU has."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import bc_fast
from bc_fast import FusedTransform, Layer, _core

U32 = 2.0**-24  # unit roundoff of float32
U16 = 2.0**-11  # unit roundoff of float16

_erf = np.vectorize(math.erf, otypes=[np.float64])


pytestmark = pytest.mark.usefixtures("simd_level")  # every test at every usable kernel set (conftest)


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


# (n, d_in, d_out): small batches whose work exceeds 2 * FusedOp::kMinParallelMacs (2**19) are split
# over threads on the packed-kernel path (n <= 64); larger ones take the tiled BLAS path.
THREAD_CASES = [(2, 768, 768), (5, 512, 520), (33, 200, 300), (64, 200, 300), (65, 200, 300),
                (1000, 200, 300), (5003, 200, 300)]


@pytest.mark.parametrize("n,d_in,d_out", THREAD_CASES)
def test_threads_give_identical_results(n, d_in, d_out):
    if n <= bc_fast.build_info()["small_batch_rows"]:
        assert n * d_in * d_out >= 2 * 2**19, "the case must reach the split small-batch path"
    rng = np.random.default_rng(n)
    w, b, x = rand(rng, d_out, d_in), rand(rng, d_out), rand(rng, n, d_in)
    op = FusedTransform.affine(w, b, normalize=True)
    one = op.apply(x, threads=1)
    for t in (2, 3, 8, 64, 2**31 - 1):
        np.testing.assert_array_equal(op.apply(x, threads=t), one)
    np.testing.assert_array_equal(op.apply(x), one)


@pytest.mark.parametrize("n", [3, 64, 300])
def test_threads_give_identical_results_mlp_fp16(n):
    rng = np.random.default_rng(n)
    layers = [Layer(rand(rng, 700, 256, scale=0.06), rand(rng, 700), "gelu", activation_width=600),
              Layer(rand(rng, 384, 700, scale=0.04), rand(rng, 384))]
    op = FusedTransform(layers, normalize=True)
    x = rand(rng, n, 256, dtype=np.float16)
    one = op.apply(x, threads=1, out_dtype=np.float16)
    for t in (2, 3, 7):
        np.testing.assert_array_equal(op.apply(x, threads=t, out_dtype=np.float16), one)


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
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
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
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            self.op.apply(np.ones((2, 3), dtype))

    @pytest.mark.parametrize("dtype", [">f4", ">f2"])
    def test_byte_swapped(self, dtype):
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            self.op.apply(np.ones((2, 3), dtype))

    def test_byte_swapped_message_names_the_byte_order(self):
        with pytest.raises(TypeError, match=r"x must be native-endian float32, float16 or bfloat16, got "
                                            r"byte-swapped float32 \(dtype >f4\); convert it with "
                                            r"x\.astype\(x\.dtype\.newbyteorder\('='\)\)"):
            self.op.apply(np.ones((2, 3), ">f4"))

    def test_byte_swapped_bfloat16_refused(self):
        # bfloat16 was matched by name only: a byte-swapped one was taken as bfloat16 and computed as garbage.
        # Plain calls reach the core first (it refuses, then the Python check words the error); the ndarray
        # subclass and out_dtype= calls take the checked Python path directly.
        from bc_fast._util.arrays import bfloat16, is_bfloat16, is_row_dtype

        swapped = bfloat16().newbyteorder()
        assert is_row_dtype(bfloat16()) and not is_bfloat16(swapped) and not is_row_dtype(swapped)
        x = np.ones((2, 3), np.float32)
        xs = x.astype(bfloat16()).astype(swapped)
        sub = type("Sub", (np.ndarray,), {})
        msg = r"{} must be native-endian float32, float16 or bfloat16, got byte-swapped bfloat16 \(dtype .V2\)"
        with pytest.raises(TypeError, match=msg.format("x")):
            self.op.apply(xs)
        with pytest.raises(TypeError, match=msg.format("out")):
            self.op.apply(x, out=np.empty((2, 4), swapped))
        with pytest.raises(TypeError, match=msg.format("x")):
            self.op.apply(xs.view(sub))
        with pytest.raises(TypeError, match=msg.format("x")):
            self.op.apply(xs, out_dtype="bfloat16")
        with pytest.raises(TypeError, match=msg.format("out")):
            self.op.apply(x.view(sub), out=np.empty((2, 4), swapped))
        with pytest.raises(TypeError, match=msg.format("out")):
            self.op.apply(x, out=np.empty((2, 4), swapped), out_dtype=bfloat16())
        with pytest.raises(TypeError, match=msg.format("out_dtype") + "; pass out_dtype='bfloat16'"):
            self.op.apply(x, out_dtype=swapped)

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
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
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

    @pytest.mark.parametrize("threads", [0, -1, 2**31, 2**40, -(2**63), np.int64(2**40), np.uint64(2**63)])
    def test_threads_out_of_range(self, threads):
        with pytest.raises(ValueError, match=r"threads must be an integer in \[1, 2147483647\], got -?\d+;"):
            self.op.apply(np.ones((2, 3), np.float32), threads=threads)

    @pytest.mark.parametrize("threads", [True, False, np.True_, 2.0, "2", [2], np.float32(2)])
    def test_threads_wrong_type(self, threads):
        with pytest.raises(ValueError, match="threads must be a positive integer or None, got"):
            self.op.apply(np.ones((2, 3), np.float32), threads=threads)

    @pytest.mark.parametrize("threads", [np.int32(2), np.int64(3), np.uint8(1), 2**31 - 1])
    def test_threads_numpy_integers_accepted(self, threads):
        np.testing.assert_array_equal(self.op.apply(np.ones((2, 3), np.float32), threads=threads),
                                      np.full((2, 4), 3.0, np.float32))

    @pytest.mark.parametrize("out_dtype", ["foo", object, np.float64, "int8"])
    def test_bad_out_dtype(self, out_dtype):
        with pytest.raises(TypeError, match="out_dtype must be float32, float16 or bfloat16"):
            self.op.apply(np.ones((2, 3), np.float32), out_dtype=out_dtype)

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


def test_build_info_reports_choices(simd_level):
    info = bc_fast.build_info()
    assert info["kernel"] == simd_level
    assert info["max_threads"] >= 1 and info["small_batch_rows"] >= 1
    assert info["max_threads"] == bc_fast.get_num_threads()
    assert info["cpus"] >= 1 and info["forked_child"] is False
    assert set(info) >= {"kernel", "cpu", "blas", "openmp", "max_threads", "cpus", "blas_threads", "forked_child",
                         "compiler"}
    with pytest.raises(ValueError, match="unknown SIMD level"):
        _core.set_simd_level("sse9")


def test_repr():
    op = FusedTransform([Layer(np.ones((4, 2)), activation="relu"), Layer(np.ones((3, 4)))], normalize=True)
    assert repr(op) == "FusedTransform(2 -> 4(relu) -> 3, normalize)"


def test_caller_weight_edits_do_not_reach_the_operator():
    from bc_fast.convert import operator_fingerprint

    rng = np.random.default_rng(11)
    w, b, x = rand(rng, 20, 12), rand(rng, 20), rand(rng, 100, 12)
    op = FusedTransform([Layer(w, b, "relu", activation_width=10), Layer(rand(rng, 5, 20))], normalize=True)
    y0, fp0 = op.apply(x), operator_fingerprint(op)
    w0, b0 = op.layers[0].weight.copy(), op.layers[0].bias.copy()
    w[:] = 7.0
    b[:] = -3.0
    np.testing.assert_array_equal(op.layers[0].weight, w0)
    np.testing.assert_array_equal(op.layers[0].bias, b0)
    assert operator_fingerprint(op) == fp0
    np.testing.assert_array_equal(FusedTransform(op.layers, normalize=True).apply(x), y0)
    np.testing.assert_array_equal(op.apply(x), y0)
    with pytest.raises(ValueError, match="read-only"):
        op.layers[0].weight[0, 0] = 1.0


def test_caller_torch_weight_edits_do_not_reach_the_operator():
    torch = pytest.importorskip("torch", reason="torch tensors as weights")
    from bc_fast.convert import operator_fingerprint

    rng = np.random.default_rng(12)
    wt, bt = torch.from_numpy(rand(rng, 6, 4)), torch.from_numpy(rand(rng, 6))
    x = rand(rng, 70, 4)
    op = FusedTransform.affine(wt, bt)
    y0, fp0 = op.apply(x), operator_fingerprint(op)
    with torch.no_grad():
        wt.mul_(2.0)
        bt.add_(1.0)
    assert operator_fingerprint(op) == fp0
    np.testing.assert_array_equal(op.apply(x), y0)
    np.testing.assert_array_equal(FusedTransform(op.layers).apply(x), y0)


# --------------------------------------------------------------------------- thread count

@pytest.fixture
def restore_num_threads():
    before = bc_fast.get_num_threads()
    yield before
    bc_fast.set_num_threads(before)


def test_set_num_threads_round_trip(restore_num_threads):
    bc_fast.set_num_threads(3)
    assert bc_fast.get_num_threads() == 3 and bc_fast.build_info()["max_threads"] == 3
    bc_fast.set_num_threads(np.int64(1))
    assert bc_fast.get_num_threads() == 1


@pytest.mark.parametrize("n,match", [(0, r"in \[1, 1024\], got 0"), (1025, r"in \[1, 1024\], got 1025"),
                                     (2**40, r"in \[1, 1024\]"), (True, "positive integer"),
                                     (2.0, "positive integer"), (None, "positive integer")])
def test_set_num_threads_refuses_bad_values(n, match, restore_num_threads):
    with pytest.raises(ValueError, match=match):
        bc_fast.set_num_threads(n)
    assert bc_fast.get_num_threads() == restore_num_threads


def test_torch_set_num_threads_does_not_change_bc_fast(restore_num_threads):
    torch = pytest.importorskip("torch", reason="torch shares the OpenMP runtime")
    bc_fast.set_num_threads(2)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert bc_fast.get_num_threads() == 2 and bc_fast.build_info()["max_threads"] == 2
    finally:
        torch.set_num_threads(prev)


def _in_fresh_python(code: str, **env: str | None) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter with this environment, ``env`` set on top (None: unset)."""
    full = {k: v for k, v in os.environ.items() if k != "BC_FAST_NUM_THREADS"}
    full.update(env)
    full = {k: v for k, v in full.items() if v is not None}
    # cwd=tests/: `python -c` puts cwd on sys.path, and the source bc_fast/ must not shadow the install.
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


def test_default_thread_count_is_available_cpus_not_omp():
    res = _in_fresh_python("import os, bc_fast; print(bc_fast.get_num_threads(), len(os.sched_getaffinity(0)))",
                           OMP_NUM_THREADS="1")
    assert res.returncode == 0, res.stderr
    got, cpus = res.stdout.split()
    assert got == cpus


def test_env_var_sets_thread_count():
    res = _in_fresh_python("import bc_fast; print(bc_fast.get_num_threads(), bc_fast.build_info()['max_threads'])",
                           BC_FAST_NUM_THREADS="3")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["3", "3"]


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1025", "2.5", "99999999999999999999"])
def test_bad_env_var_is_a_clear_error_not_an_import_failure(value):
    code = ("import numpy as np, bc_fast\n"
            "op = bc_fast.FusedTransform.affine(np.ones((2, 2), np.float32))\n"
            "for f in (bc_fast.get_num_threads, lambda: op.apply(np.ones((3, 2), np.float32))):\n"
            "    try:\n        f()\n    except ValueError as e:\n        print('ValueError:', e)\n"
            "bc_fast.set_num_threads(2)\n"
            "print(bc_fast.get_num_threads(), op.apply(np.ones((3, 2), np.float32))[0, 0])\n")
    res = _in_fresh_python(code, BC_FAST_NUM_THREADS=value)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3, res.stdout
    for line in lines[:2]:
        assert line.startswith(f"ValueError: environment variable BC_FAST_NUM_THREADS='{value}' is not an integer in "
                               "[1, 1024]; set it to a thread count such as 4, or unset it")
    assert lines[2] == "2 2.0"


def test_core_leaves_numpy_and_torch_blas_threads_alone():
    # The core runs its BLAS tiles single-threaded by setting the count of the library instance it
    # links (scipy-openblas32's; it has no per-thread setting). numpy's bundled OpenBLAS and torch's
    # thread pool are other instances and must keep their counts.
    pytest.importorskip("threadpoolctl", reason="threadpoolctl reads the BLAS thread counts")
    pytest.importorskip("torch", reason="checks that torch's thread count is untouched")
    code = ("import numpy as np, torch, threadpoolctl\n"
            "torch.set_num_threads(2)\n"
            "def counts():\n"
            "    return sorted((i['filepath'], i['num_threads']) for i in threadpoolctl.threadpool_info()\n"
            "                  if 'numpy' in i['filepath'])\n"
            "before = counts()\n"
            "import bc_fast\n"
            "bc_fast.FusedTransform.affine(np.ones((64, 64), np.float32)).apply(np.ones((5000, 64), np.float32))\n"
            "print(before == counts() and bool(before), torch.get_num_threads(), bc_fast.build_info()['blas_threads'])\n")
    res = _in_fresh_python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "2", "1"]


@pytest.mark.parametrize("user_setting", [None, "3"])
def test_importing_the_core_starts_no_blas_threads_and_keeps_the_environment(user_setting):
    # OpenBLAS starts its pool as it loads and each pool thread then spins ~0.1 s; the core's instance
    # only ever runs on its caller's thread, so it is loaded with OPENBLAS_NUM_THREADS=1, set for that
    # moment only: the user's value (or its absence) is what the process has afterwards.
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("counting a process's threads needs Linux's /proc/self/task")
    code = ("import os, numpy\n"
            "threads = lambda: len(os.listdir('/proc/self/task'))\n"
            "before = threads()\n"
            "import bc_fast\n"
            "print(threads() - before, os.environ.get('OPENBLAS_NUM_THREADS'), bc_fast.build_info()['blas_threads'])\n")
    res = _in_fresh_python(code, OPENBLAS_NUM_THREADS=user_setting)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", str(user_setting), "1"]


def test_torch_out_dtypes_on_the_cpu():
    # only torch.bfloat16 was accepted: torch.float16 / torch.float32 raised "must be ... float16 ..., got
    # torch.float16"
    torch = pytest.importorskip("torch")
    from bc_fast._util.arrays import bfloat16

    rng = np.random.default_rng(5)
    w, b, x = rand(rng, 6, 5), rand(rng, 6), rand(rng, 7, 5)
    op = FusedTransform.affine(w, b)
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    for tdt, ndt, tol in [(torch.float32, np.dtype(np.float32), 1e-5), (torch.float16, np.dtype(np.float16), 2e-3),
                          (torch.bfloat16, bfloat16(), 1e-2)]:
        y = op.apply(torch.from_numpy(x), out_dtype=tdt)
        assert isinstance(y, torch.Tensor) and y.dtype == tdt
        np.testing.assert_allclose(y.double().numpy(), ref, rtol=tol, atol=tol)
        y = op.apply(x, out_dtype=tdt)
        assert y.dtype == ndt
        np.testing.assert_allclose(y.astype(np.float64), ref, rtol=tol, atol=tol)
    out = np.empty((7, 6), np.float16)
    assert op.apply(x, out=out, out_dtype=torch.float16) is out
    with pytest.raises(ValueError, match="out_dtype=float32 disagrees with out.dtype=float16"):
        op.apply(x, out=out, out_dtype=torch.float32)
    with pytest.raises(TypeError, match=r"out_dtype must be float32, float16 or bfloat16, got torch\.float64"):
        op.apply(x, out_dtype=torch.float64)
