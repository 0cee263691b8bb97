"""Hostile inputs to FusedTransform, Layer and apply: each gets a clear, named error (or a right answer).

A catalogue: add a row when a new bad input is found, so the count only grows. Every case asserts the
exception type and a fragment of its message; none may hang, crash, dump an array or answer wrongly.
"""

from __future__ import annotations

import numpy as np
import pytest

import bc_fast
from bc_fast import FusedTransform, Layer
from bc_fast._util.arrays import bfloat16

OP = FusedTransform.affine(np.ones((4, 3), np.float32))
X = np.ones((2, 3), np.float32)


def _unaligned(rows: int, cols: int) -> np.ndarray:
    a = np.frombuffer(bytearray(4 * rows * cols + 1), dtype=np.float32, offset=1, count=rows * cols)
    return a.reshape(rows, cols)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _apply_in_place():
    x = np.ones((2, 3), np.float32)
    return FusedTransform.affine(np.eye(3, dtype=np.float32)).apply(x, out=x)


def _apply_overlapping():
    buf = np.ones(40, np.float32)
    x, out = buf[:6].reshape(2, 3), buf[4:12].reshape(2, 4)  # out starts inside x
    return OP.apply(x, out=out)


# (case id, thunk, exception type, message fragment)
APPLY_CASES = [
    ("x_scalar", lambda: OP.apply(np.float32(1)), TypeError, "x must be a numpy array or a CPU torch tensor, got float32"),
    ("x_none", lambda: OP.apply(None), TypeError, "x must be a numpy array or a CPU torch tensor, got NoneType"),
    ("x_list", lambda: OP.apply([[1.0, 2.0, 3.0]]), TypeError, "x must be a numpy array"),
    ("x_str", lambda: OP.apply("abc"), TypeError, "x must be a numpy array"),
    ("x_1d", lambda: OP.apply(np.ones(3, np.float32)), ValueError, r"x.reshape\(1, -1\)"),
    ("x_3d", lambda: OP.apply(np.ones((1, 2, 3), np.float32)), ValueError, "got 3-D array of shape"),
    ("x_0d_array", lambda: OP.apply(np.array(1.0, np.float32)), ValueError, "got 0-D array"),
    ("x_wrong_cols", lambda: OP.apply(np.ones((2, 5), np.float32)), ValueError, "5 features per row, expected 3"),
    ("x_zero_rows_wrong_cols", lambda: OP.apply(np.empty((0, 5), np.float32)), ValueError, "5 features per row"),
    ("x_float64", lambda: OP.apply(np.ones((2, 3))), TypeError, r"x.astype\(np.float32\)"),
    ("x_int", lambda: OP.apply(np.ones((2, 3), np.int64)), TypeError, "got dtype int64"),
    ("x_bool", lambda: OP.apply(np.ones((2, 3), bool)), TypeError, "got dtype bool"),
    ("x_object", lambda: OP.apply(np.ones((2, 3), object)), TypeError, "got dtype object"),
    ("x_structured", lambda: OP.apply(np.zeros((2, 3), [("a", "f4")])), TypeError, "float32, float16 or bfloat16"),
    ("x_byteswapped_f4", lambda: OP.apply(np.ones((2, 3), ">f4")), TypeError, "float32, float16 or bfloat16"),
    ("x_byteswapped_f2", lambda: OP.apply(np.ones((2, 3), ">f2")), TypeError, "float32, float16 or bfloat16"),
    ("x_transposed", lambda: OP.apply(np.ones((3, 2), np.float32).T), ValueError, "ascontiguousarray"),
    ("x_strided", lambda: OP.apply(np.ones((4, 3), np.float32)[::2]), ValueError, "C-contiguous"),
    ("x_broadcast", lambda: OP.apply(np.broadcast_to(np.ones(3, np.float32), (2, 3))), ValueError, "C-contiguous"),
    ("x_unaligned", lambda: OP.apply(_unaligned(2, 3)), ValueError, r"x is not aligned.*x.copy\(\)"),
    ("x_masked", lambda: OP.apply(np.ma.masked_array(X, mask=np.ones_like(X, bool))), TypeError, "masked array"),
    ("out_list", lambda: OP.apply(X, out=[[0.0] * 4] * 2), TypeError, "out must be a numpy array"),
    ("out_int", lambda: OP.apply(X, out=np.empty((2, 4), np.int32)), TypeError, "out must be float32, float16 or bfloat16"),
    ("out_float64", lambda: OP.apply(X, out=np.empty((2, 4))), TypeError, "out must be float32, float16 or bfloat16"),
    ("out_1d", lambda: OP.apply(X, out=np.empty(8, np.float32)), ValueError, "Expected out to be a 2-D array"),
    ("out_wrong_cols", lambda: OP.apply(X, out=np.empty((2, 5), np.float32)), ValueError, "5 features per row, expected 4"),
    ("out_wrong_rows", lambda: OP.apply(X, out=np.empty((3, 4), np.float32)), ValueError, "3 rows but x has 2"),
    ("out_transposed", lambda: OP.apply(X, out=np.empty((4, 2), np.float32).T), ValueError, "C-contiguous"),
    ("out_unaligned", lambda: OP.apply(X, out=_unaligned(2, 4)), ValueError, "out is not aligned"),
    ("out_readonly", lambda: OP.apply(X, out=_readonly(np.empty((2, 4), np.float32))), ValueError, "out is read-only"),
    ("out_is_x", _apply_in_place, ValueError, "out must not overlap x"),
    ("out_overlaps_x", _apply_overlapping, ValueError, "out must not overlap x"),
    ("out_dtype_disagrees", lambda: OP.apply(X, out=np.empty((2, 4), np.float32), out_dtype=np.float16),
     ValueError, "disagrees with out.dtype"),
    ("out_dtype_garbage", lambda: OP.apply(X, out_dtype="foo"), TypeError, "out_dtype must be float32, float16 or bfloat16, got 'foo'"),
    ("out_dtype_float64", lambda: OP.apply(X, out_dtype=np.float64), TypeError, "out_dtype must be float32, float16 or bfloat16"),
    ("threads_zero", lambda: OP.apply(X, threads=0), ValueError, r"threads must be an integer in \[1, 2147483647\]"),
    ("threads_negative", lambda: OP.apply(X, threads=-3), ValueError, "got -3"),
    ("threads_2_40", lambda: OP.apply(X, threads=2**40), ValueError, "got 1099511627776"),
    ("threads_np_2_40", lambda: OP.apply(X, threads=np.int64(2**40)), ValueError, "got 1099511627776"),
    ("threads_huge_with_out", lambda: OP.apply(X, out=np.empty((2, 4), np.float32), threads=2**63), ValueError,
     "threads must be an integer in"),
    ("threads_bool", lambda: OP.apply(X, threads=True), ValueError, "got bool True"),
    ("threads_float", lambda: OP.apply(X, threads=2.0), ValueError, "got float 2.0"),
    ("threads_str", lambda: OP.apply(X, threads="2"), ValueError, "got str '2'"),
    ("threads_nan", lambda: OP.apply(X, threads=float("nan")), ValueError, "positive integer or None"),
]


@pytest.mark.parametrize("case,thunk,exc,match", APPLY_CASES, ids=[c[0] for c in APPLY_CASES])
def test_apply_hostile(case, thunk, exc, match):
    with pytest.raises(exc, match=match) as info:
        thunk()
    msg = str(info.value)
    assert "incompatible function arguments" not in msg and "array([" not in msg and len(msg) < 400


LAYER_CASES = [
    ("layers_int", lambda: FusedTransform(5), TypeError, "layers must be a sequence of bc_fast.Layer, got int"),
    ("layers_none", lambda: FusedTransform(None), TypeError, "got NoneType"),
    ("layers_single_layer", lambda: FusedTransform(Layer(np.ones((2, 2)))), TypeError, r"wrap a single layer as \[layer\]"),
    ("layers_dict", lambda: FusedTransform({"a": Layer(np.ones((2, 2)))}), TypeError, "got dict"),
    ("layers_empty", lambda: FusedTransform([]), ValueError, "at least one layer"),
    ("layers_array", lambda: FusedTransform([np.ones((2, 2))]), TypeError, r"layers\[0\] must be a bc_fast.Layer"),
    ("normalize_str", lambda: FusedTransform([Layer(np.ones((2, 2)))], normalize="no"), TypeError,
     "normalize must be True or False, got 'no'"),
    ("weight_none", lambda: FusedTransform.affine(None), ValueError, r"layers\[0\]\.weight must be a non-empty 2-D"),
    ("weight_1d", lambda: FusedTransform.affine(np.ones(4)), ValueError, "got shape"),
    ("weight_3d", lambda: FusedTransform.affine(np.ones((2, 2, 2))), ValueError, r"got shape \(2, 2, 2\)"),
    ("weight_empty", lambda: FusedTransform.affine(np.ones((0, 2))), ValueError, r"got shape \(0, 2\)"),
    ("weight_int", lambda: FusedTransform.affine(np.ones((2, 2), int)), TypeError, "floating-point array, got dtype int64"),
    ("weight_complex", lambda: FusedTransform.affine(np.ones((2, 2), complex)), TypeError, "got dtype complex128"),
    ("weight_object", lambda: FusedTransform.affine(np.array([[1.0, None]], object)), TypeError, "got dtype object"),
    ("weight_nan", lambda: FusedTransform.affine(np.full((2, 2), np.nan)), ValueError, "weight contains NaN or Inf"),
    ("weight_inf", lambda: FusedTransform.affine(np.full((2, 2), -np.inf, np.float32)), ValueError, "NaN or Inf"),
    ("weight_beyond_float32", lambda: FusedTransform.affine(np.full((2, 2), 1e300)), ValueError,
     r"beyond float32 range \(max \|value\| = 1e\+300\)"),
    ("bias_beyond_float32", lambda: FusedTransform.affine(np.ones((2, 2)), np.array([0.0, -1e39])), ValueError,
     r"layers\[0\]\.bias has values beyond float32 range"),
    ("bias_2d", lambda: FusedTransform.affine(np.ones((2, 2)), np.ones((1, 2))), ValueError, r"bias must have shape \(2,\)"),
    ("bias_wrong_len", lambda: FusedTransform.affine(np.ones((2, 2)), np.ones(3)), ValueError, r"got \(3,\)"),
    ("bias_int", lambda: FusedTransform.affine(np.ones((2, 2)), np.ones(2, int)), TypeError, "bias must be a floating-point"),
    ("bias_nan", lambda: FusedTransform.affine(np.ones((2, 2)), np.array([np.nan, 0.0])), ValueError, "bias contains NaN"),
    ("chain_mismatch", lambda: FusedTransform([Layer(np.ones((4, 2))), Layer(np.ones((5, 3)))]), ValueError,
     "has d_in=3 but the previous layer outputs 4"),
    ("activation_none", lambda: FusedTransform([Layer(np.ones((2, 2)), activation=None)]), ValueError,
     "activation must be one of"),
    ("activation_case", lambda: FusedTransform([Layer(np.ones((2, 2)), activation="RELU")]), ValueError, "got 'RELU'"),
    ("activation_width_bool", lambda: FusedTransform([Layer(np.ones((2, 2)), activation="relu", activation_width=True)]),
     ValueError, r"activation_width must be an integer in \[0, 2\], got True"),
    ("activation_width_negative", lambda: FusedTransform([Layer(np.ones((2, 2)), activation="relu",
                                                               activation_width=-1)]), ValueError, "got -1"),
    ("activation_width_float", lambda: FusedTransform([Layer(np.ones((2, 2)), activation="relu",
                                                            activation_width=1.0)]), ValueError, "got 1.0"),
    ("activation_width_too_big", lambda: FusedTransform([Layer(np.ones((2, 2)), activation="relu",
                                                              activation_width=3)]), ValueError, "got 3"),
]


@pytest.mark.parametrize("case,thunk,exc,match", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_construction_hostile(case, thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


@pytest.mark.parametrize("make", [
    lambda: np.ones((2, 2), np.float16),
    lambda: np.ones((2, 2), ">f4"),
    lambda: np.ones((2, 4))[:, ::2],
    lambda: [[1.0, 1.0], [1.0, 1.0]],
    lambda: np.asfortranarray(np.ones((2, 2))),
], ids=["float16", "byteswapped", "strided", "nested_list", "fortran"])
def test_unusual_but_valid_weights_are_accepted(make):
    op = FusedTransform.affine(make())
    np.testing.assert_array_equal(op.apply(np.ones((3, 2), np.float32)), np.full((3, 2), 2.0, np.float32))


def test_zero_rows_and_nonfinite_inputs_are_computed():
    assert OP.apply(np.empty((0, 3), np.float32)).shape == (0, 4)
    y = OP.apply(np.array([[np.inf, 0, 0], [np.nan, 0, 0]], np.float32))
    assert np.isposinf(y[0]).all() and np.isnan(y[1]).all()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # numpy discourages np.matrix
def test_matrix_subclass_input_is_computed():
    np.testing.assert_array_equal(OP.apply(np.asmatrix(X)), np.full((2, 4), 3.0, np.float32))


class TestTorch:
    """torch inputs on a machine without a GPU: devices, grads, dtypes, views."""

    @pytest.fixture(autouse=True)
    def _torch(self):
        self.torch = pytest.importorskip("torch", reason="torch tensor inputs")

    def test_meta_input(self):
        with pytest.raises(ValueError, match=r"x is a torch tensor on meta; move it to the CPU first \(x.cpu\(\)\)"):
            OP.apply(self.torch.ones(2, 3, device="meta"))

    def test_meta_weight(self):
        with pytest.raises(ValueError, match=r"layers\[0\]\.weight is a torch tensor on the meta device"):
            FusedTransform.affine(self.torch.ones(2, 2, device="meta"))

    def test_cuda_device_without_gpu(self):
        if self.torch.cuda.is_available():
            pytest.skip("this case is for machines without a GPU")
        with pytest.raises((RuntimeError, AssertionError), match="CUDA|cuda|NVIDIA"):
            self.torch.ones(2, 3, device="cuda")  # torch itself refuses; bc_fast never sees it

    def test_input_requires_grad(self):
        with pytest.raises(ValueError, match=r"x requires grad; pass x.detach\(\)"):
            OP.apply(self.torch.ones(2, 3, requires_grad=True))

    def test_out_requires_grad(self):
        with pytest.raises(ValueError, match=r"out requires grad"):
            OP.apply(X, out=self.torch.empty(2, 4, requires_grad=True))

    def test_bfloat16_input_is_taken(self):  # bf16 rows are supported (test_bf16_rows.py); float64 is not
        y = OP.apply(self.torch.ones(2, 3, dtype=self.torch.bfloat16))
        assert y.dtype == self.torch.float32 and self.torch.equal(y, OP.apply(self.torch.ones(2, 3)))
        with pytest.raises(TypeError, match="got dtype float64"):
            OP.apply(self.torch.ones(2, 3, dtype=self.torch.float64))

    def test_int_input(self):
        with pytest.raises(TypeError, match="got dtype int32"):
            OP.apply(self.torch.ones(2, 3, dtype=self.torch.int32))

    def test_sparse_input(self):
        with pytest.raises(TypeError, match="layout"):
            OP.apply(self.torch.ones(2, 3).to_sparse())

    def test_transposed_input(self):
        with pytest.raises(ValueError, match="C-contiguous"):
            OP.apply(self.torch.ones(3, 2).t())

    def test_weights_that_require_grad_or_are_bfloat16(self):
        w = self.torch.ones(2, 2, requires_grad=True)
        for weight in (w, self.torch.ones(2, 2, dtype=self.torch.bfloat16)):
            y = FusedTransform.affine(weight).apply(np.ones((3, 2), np.float32))
            np.testing.assert_array_equal(y, np.full((3, 2), 2.0, np.float32))

    def test_negative_view_is_refused_or_resolved(self):
        # DLPack does not carry torch's lazy negation bit: inputs are refused, weights resolved.
        with pytest.raises(ValueError, match="negative/conjugate view.*resolve_neg"):
            OP.apply(self.torch.ones(2, 3)._neg_view())
        y = FusedTransform.affine(self.torch.ones(2, 2)._neg_view()).apply(np.ones((3, 2), np.float32))
        np.testing.assert_array_equal(y, np.full((3, 2), -2.0, np.float32))


def test_public_thread_api_refuses_hostile_values():
    before = bc_fast.get_num_threads()
    for bad in (0, -1, 2**31, 2**40, True, 1.5, "4", None):
        with pytest.raises(ValueError, match="n must be"):
            bc_fast.set_num_threads(bad)
    assert bc_fast.get_num_threads() == before


def test_binding_refuses_byte_swapped_bfloat16():
    """The compiled core checks byte order itself, for bfloat16 as for float32/float16 (the Python layer
    refuses first; this is the core's own guard, called directly)."""
    x = np.ones((2, 3), np.float32).astype(bfloat16())
    swapped = x.view(x.dtype.newbyteorder(">"))
    with pytest.raises(TypeError, match="x must be native-endian float32, float16 or bfloat16"):
        OP._op.apply(swapped, None, False, 0)
    OP._op.apply(x, None, False, 0)  # native bfloat16 is taken
