"""The GPU path of FusedTransform (bc_fast.engine.cuda).

Part 1 runs everywhere: a fake ``bc_fast._cuda`` module records the calls, fake
``__cuda_array_interface__`` objects stand for CuPy arrays, and every check and error path
of the Python side is exercised without a GPU. Part 2 runs on a real GPU with the CUDA
module built, and is skipped, with the reason in the pytest summary, otherwise.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import bc_fast
import bc_fast.engine.cuda as bccuda
from bc_fast import FusedTransform, Layer
from bc_fast.cli import main
from bc_fast.engine.fusion import apply_layers_reference

DEV1 = 1 << 44  # fake pointers at or above this address live on device 1


# ----------------------------------------------------------------------------------------------
# Fakes
# ----------------------------------------------------------------------------------------------

class FakeOp:
    """Stands for _cuda.CudaFusedOp: records its construction and every apply call."""

    def __init__(self, module: "FakeCuda", weights, biases, activations, widths, normalize) -> None:
        self.weights, self.biases, self.activations, self.widths, self.normalize = (
            weights, biases, activations, widths, normalize)
        self.calls: list[tuple] = []
        module.ops.append(self)

    def apply(self, *args: Any) -> None:
        self.calls.append(args)


class FakeCuda:
    """Stands for the bc_fast._cuda module."""

    def __init__(self, info: dict | None = None) -> None:
        self.ops: list[FakeOp] = []
        self.info = info or {"available": True, "error": "", "device_count": 1, "driver_version": 13000,
                             "runtime_version": 13000, "cublas_version": 130000,
                             "devices": [{"index": 0, "name": "Fake H200", "compute_capability": "9.0",
                                          "total_memory": 141 * 2**30}]}

    def CudaFusedOp(self, *args: Any) -> FakeOp:  # noqa: N802 (the class name of the real module)
        return FakeOp(self, *args)

    def device_info(self) -> dict:
        return self.info

    def pointer_device(self, ptr: int) -> int:
        return 1 if ptr >= DEV1 else 0


class FakeCAI:
    """A minimal __cuda_array_interface__ producer (as a CuPy or Numba array presents itself)."""

    def __init__(self, shape=(3, 4), typestr="<f4", ptr=0x10000, *, strides=None, readonly=False,
                 stream: Any = "absent", version=3, mask=None) -> None:
        self.d = {"data": (ptr, readonly), "shape": tuple(shape), "typestr": typestr, "strides": strides,
                  "version": version, "descr": [("", typestr)]}
        if stream != "absent":
            self.d["stream"] = stream
        if mask is not None:
            self.d["mask"] = mask

    @property
    def __cuda_array_interface__(self) -> dict:
        return self.d


class FakeDLPack:
    """A DLPack producer that says it lives on CUDA device 0."""

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)

    def __dlpack__(self, stream=None):  # pragma: no cover - never consumed without a GPU
        raise BufferError("fake")


class FakeTorchCuda:
    """Looks like a torch CUDA tensor to bc_fast (module name and is_cuda), without CUDA torch."""

    is_cuda = True

    def detach(self) -> "FakeTorchCuda":
        return self


FakeTorchCuda.__module__ = "torch.fake"


@pytest.fixture
def fake(monkeypatch) -> FakeCuda:
    mod = FakeCuda()
    monkeypatch.setattr(bccuda, "cuda_module", lambda: mod)
    return mod


@pytest.fixture
def no_module(monkeypatch) -> None:
    """bc_fast._cuda cannot be found, as in a CPU-only build."""
    monkeypatch.setattr(bccuda, "_module", None)
    monkeypatch.setitem(sys.modules, "bc_fast._cuda", None)


def _op(d_in=4, d_out=5, **kw) -> FusedTransform:
    rng = np.random.default_rng(0)
    return FusedTransform([Layer(rng.standard_normal((d_out, d_in)).astype(np.float32),
                                 rng.standard_normal(d_out).astype(np.float32))], **kw)


# ----------------------------------------------------------------------------------------------
# Part 1: no GPU needed
# ----------------------------------------------------------------------------------------------

def test_is_cuda_array_kinds():
    assert bccuda.is_cuda_array(FakeCAI())
    assert bccuda.is_cuda_array(FakeDLPack())
    assert bccuda.is_cuda_array(FakeTorchCuda())
    assert not bccuda.is_cuda_array(np.ones((2, 2), np.float32))
    assert not bccuda.is_cuda_array(None)
    assert not bccuda.is_cuda_array([1.0, 2.0])


def test_cpu_torch_tensor_is_not_cuda():
    torch = pytest.importorskip("torch", reason="torch is needed for this check")
    assert not bccuda.is_cuda_array(torch.ones(2, 2))


class FakeTorchTensor:
    """Quacks like a torch CUDA tensor for the plain torch path (is_torch reads the class's module)."""

    def __init__(self, shape, dtype="float16", ptr=0x7000, device=0, *, contiguous=True, grad=False, neg=False):
        torch = pytest.importorskip("torch", reason="the torch path is keyed by torch's dtypes")
        self.shape, self.dtype, self.ptr, self.device = tuple(shape), getattr(torch, dtype), ptr, device
        self.is_cuda, self.requires_grad, self.contiguous, self.neg = True, grad, contiguous, neg
        self.nbytes = math.prod(shape) * self.dtype.itemsize

    def is_neg(self) -> bool:
        return self.neg

    def is_conj(self) -> bool:
        return False

    def is_contiguous(self) -> bool:
        return self.contiguous

    def get_device(self) -> int:
        return self.device

    def data_ptr(self) -> int:
        return self.ptr


FakeTorchTensor.__module__ = "torch.fake"


def test_plain_torch_call_goes_straight_to_the_core(fake, monkeypatch):
    monkeypatch.setattr(bccuda, "_torch_stream", lambda device: 0xC0 + device)
    op = _op()
    x, out = FakeTorchTensor((3, 4), ptr=0x7000), FakeTorchTensor((3, 5), ptr=0x9000)
    assert bccuda.apply_fused(op, x, out=out) is out
    (cop,) = fake.ops
    assert cop.calls == [(0x7000, "float16", 3, 0x9000, "float16", 0, 0xC0, True)]


@pytest.mark.parametrize("x_kw, out_kw", [
    ({"dtype": "float64"}, {}), ({}, {"dtype": "int8"}), ({"grad": True}, {}), ({}, {"grad": True}),
    ({"shape": (3, 6)}, {}), ({}, {"shape": (2, 5)}), ({"shape": (0, 4)}, {"shape": (0, 5)}),
    ({"contiguous": False}, {}), ({}, {"contiguous": False}), ({"neg": True}, {}), ({}, {"device": 1}),
    ({}, {"ptr": 0x7000 + 8}),  # out overlaps x
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "-")
def test_anything_unusual_leaves_the_plain_torch_path_to_the_full_checks(fake, monkeypatch, x_kw, out_kw):
    monkeypatch.setattr(bccuda, "_torch_stream", lambda device: 0)
    op = _op()
    x = FakeTorchTensor(**{"shape": (3, 4), **x_kw})
    out = FakeTorchTensor(**{"shape": (3, 5), "ptr": 0x9000, **out_kw})
    assert bccuda._apply_torch_plain(op, x, out) is False
    assert not fake.ops or not fake.ops[0].calls


def test_cai_pointer_dtype_shape_stream_reach_the_op(fake):
    op = _op()
    x = FakeCAI((3, 4), "<f2", ptr=0x7000, stream=0xABC)
    out = FakeCAI((3, 5), "<f2", ptr=0x9000, stream=0xABC)
    assert op.apply(x, out=out) is out
    (cop,) = fake.ops
    # trusted: the devices came from torch / the pointer query, so the core skips its own pointer checks
    assert cop.calls == [(0x7000, "float16", 3, 0x9000, "float16", 0, 0xABC, True)]


def test_device_comes_from_the_pointer(fake):
    op = _op()
    op.apply(FakeCAI(ptr=DEV1), out=FakeCAI((3, 5), ptr=DEV1 + 4096))
    assert fake.ops[0].calls[0][5] == 1


@pytest.mark.parametrize("stream, expected", [("absent", 0), (None, 0), (1, 0), (2, 2), (0x5555, 0x5555)])
def test_cai_stream_codes(fake, stream, expected):
    op = _op()
    op.apply(FakeCAI(stream=stream), out=FakeCAI((3, 5), ptr=0x20000, stream=stream))
    assert fake.ops[0].calls[0][6] == expected


def test_cai_stream_zero_is_refused(fake):
    with pytest.raises(ValueError, match=r"'stream'\] is 0, which the interface forbids"):
        _op().apply(FakeCAI(stream=0), out=FakeCAI((3, 5), ptr=0x20000))


def test_stream_of_out_used_when_x_names_none(fake):
    _op().apply(FakeCAI(stream=None), out=FakeCAI((3, 5), ptr=0x20000, stream=0x77))
    assert fake.ops[0].calls[0][6] == 0x77


def test_mismatched_streams_are_refused(fake):
    with pytest.raises(ValueError, match="x and out name different CUDA streams"):
        _op().apply(FakeCAI(stream=0x10), out=FakeCAI((3, 5), ptr=0x20000, stream=0x20))
    assert not fake.ops or not fake.ops[0].calls


def test_out_dtype_default_is_x_dtype_and_explicit_must_agree(fake):
    op = _op()
    op.apply(FakeCAI(typestr="<f2"), out=FakeCAI((3, 5), "<f4", ptr=0x20000))
    assert fake.ops[0].calls[0][1] == "float16" and fake.ops[0].calls[0][4] == "float32"
    with pytest.raises(ValueError, match="out_dtype=float16 disagrees with out's dtype float32"):
        op.apply(FakeCAI(), out=FakeCAI((3, 5), "<f4", ptr=0x20000), out_dtype="float16")
    with pytest.raises(TypeError, match="out_dtype must be float32, float16 or bfloat16 on the GPU"):
        op.apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0x20000), out_dtype="int8")
    op.apply(FakeCAI(), out=FakeCAI((3, 5), "<f2", ptr=0x20000), out_dtype=np.float16)  # numpy dtype accepted


@pytest.mark.parametrize("strides", [(16, 4), None, (4000, 4)])
def test_c_contiguous_strides_accepted(fake, strides):
    shape = (1, 4) if strides == (4000, 4) else (3, 4)  # a size-1 dim may have any stride
    _op().apply(FakeCAI(shape, strides=strides), out=FakeCAI((shape[0], 5), ptr=0x20000))
    assert len(fake.ops[0].calls) == 1


@pytest.mark.parametrize("strides", [(4, 12), (32, 4), (16, 8)])
def test_non_contiguous_refused(fake, strides):
    with pytest.raises(ValueError, match=r"x must be C-contiguous \(row-major\), got strides"):
        _op().apply(FakeCAI((3, 4), strides=strides), out=FakeCAI((3, 5), ptr=0x20000))


def test_non_contiguous_out_refused(fake):
    with pytest.raises(ValueError, match=r"out must be C-contiguous"):
        _op().apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0x20000, strides=(4, 12)))


@pytest.mark.parametrize("typestr", ["<f8", "<i4", ">f4", "|u1"])
def test_wrong_typestr_refused(fake, typestr):
    with pytest.raises(TypeError, match=rf"x must be float32 \('<f4'\) or float16 \('<f2'\).*got typestr '{typestr}'"):
        _op().apply(FakeCAI(typestr=typestr), out=FakeCAI((3, 5), ptr=0x20000))


def test_bfloat16_through_cai_explained(fake):
    with pytest.raises(TypeError, match="perhaps bfloat16, which has no standard typestr"):
        _op().apply(FakeCAI(typestr="<V2"), out=FakeCAI((3, 5), ptr=0x20000))


def test_bfloat16_out_dtype_reaches_the_op(fake):
    """bfloat16 is a GPU dtype: it is passed by name (for torch tensors the dtype itself says so)."""
    with pytest.raises(ValueError, match="out_dtype=bfloat16 disagrees with out's dtype float32"):
        _op().apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0x20000), out_dtype="bfloat16")
    assert bccuda._dtype_name("bfloat16", "out_dtype") == "bfloat16"


@pytest.mark.parametrize("x_shape, out_shape, match", [
    ((4,), (3, 5), r"Expected x to be a 2-D array \(n, 4\), got 1-D array of shape \(4,\)\. Reshape"),
    ((3, 4, 1), (3, 5), r"Expected x to be a 2-D array \(n, 4\), got 3-D"),
    ((3, 6), (3, 5), "x has 6 features per row, expected 4"),
    ((3, 4), (3, 6), "out has 6 features per row, expected 5"),
    ((3, 4), (2, 5), "out has 2 rows but x has 3"),
    ((3, 4), (5,), r"Expected out to be a 2-D array \(n, 5\)"),
])
def test_wrong_shapes_refused(fake, x_shape, out_shape, match):
    with pytest.raises(ValueError, match=match):
        _op().apply(FakeCAI(x_shape), out=FakeCAI(out_shape, ptr=0x20000))


def test_out_on_another_device_refused(fake):
    with pytest.raises(ValueError, match="out is on CUDA device 1 but x is on device 0; allocate out on device 0"):
        _op().apply(FakeCAI(), out=FakeCAI((3, 5), ptr=DEV1))


def test_readonly_out_refused(fake):
    with pytest.raises(ValueError, match="out is read-only"):
        _op().apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0x20000, readonly=True))


def test_readonly_x_is_fine(fake):
    _op().apply(FakeCAI(readonly=True), out=FakeCAI((3, 5), ptr=0x20000))
    assert len(fake.ops[0].calls) == 1


@pytest.mark.parametrize("out_ptr", [0x10000, 0x10000 + 44, 0x10000 - 59])
def test_overlapping_out_refused(fake, out_ptr):
    # x spans [0x10000, 0x10000 + 48); out (60 bytes) starting at any of these addresses overlaps it
    with pytest.raises(ValueError, match="out must not overlap x"):
        _op().apply(FakeCAI(ptr=0x10000), out=FakeCAI((3, 5), ptr=out_ptr))


def test_adjacent_out_is_fine(fake):
    _op().apply(FakeCAI(ptr=0x10000), out=FakeCAI((3, 5), ptr=0x10000 + 48))
    assert len(fake.ops[0].calls) == 1


def test_masked_cai_refused(fake):
    with pytest.raises(ValueError, match="x is a masked array"):
        _op().apply(FakeCAI(mask=FakeCAI()), out=FakeCAI((3, 5), ptr=0x20000))


def test_null_pointer_with_rows_refused(fake):
    with pytest.raises(ValueError, match="x has 3 rows but a null device pointer"):
        _op().apply(FakeCAI(ptr=0), out=FakeCAI((3, 5), ptr=0x20000))
    with pytest.raises(ValueError, match="out has a null device pointer"):
        _op().apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0))


@pytest.mark.parametrize("interface", [{"shape": (3, 4), "typestr": "<f4"},
                                       {"data": 5, "shape": (3, 4), "typestr": "<f4"}, "not a dict"])
def test_malformed_cai_explained(fake, interface):
    x = FakeCAI()
    x.d = interface
    with pytest.raises(TypeError, match=r"x\.__cuda_array_interface__ must be a dict with 'data' \(ptr, readonly\)"):
        _op().apply(x, out=FakeCAI((3, 5), ptr=0x20000))


def test_plain_cai_needs_out(fake):
    with pytest.raises(ValueError, match="bc_fast cannot allocate an output: pass out=, a C-contiguous float32 array "
                                         r"of shape \(3, 5\)"):
        _op().apply(FakeCAI())


def test_host_and_device_arrays_not_mixed(fake):
    op = _op()
    with pytest.raises(ValueError, match="out is a CUDA array but x is a ndarray on the host"):
        op.apply(np.ones((3, 4), np.float32), out=FakeCAI((3, 5)))
    with pytest.raises(ValueError, match="x is a CUDA array but out is a ndarray on the host"):
        op.apply(FakeCAI(), out=np.empty((3, 5), np.float32))


def test_threads_ignored_on_gpu_but_checked(fake):
    op = _op()
    op.apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0x20000), threads=7)
    assert len(fake.ops[0].calls) == 1
    with pytest.raises(ValueError, match=r"threads must be an integer in \[1, 2147483647\], got 0"):
        op.apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0x20000), threads=0)


def test_empty_batch_does_not_call_the_op(fake):
    out = FakeCAI((0, 5), ptr=0)
    assert _op().apply(FakeCAI((0, 4), ptr=0), out=out) is out
    assert all(not o.calls for o in fake.ops)


class FakeCupyArray(FakeCAI):
    """Presents itself as a cupy.ndarray: module name, ``device.id``, ``data.ptr`` and its interface."""

    def __init__(self, shape, ptr, device: int) -> None:
        super().__init__(shape, ptr=ptr, stream=1)
        self.device = type("Device", (), {"id": device})()
        self.data = type("MemoryPointer", (), {"ptr": ptr})()


FakeCupyArray.__module__ = "cupy._core.core"


@pytest.fixture
def fake_cupy(monkeypatch) -> list[int]:
    """A cupy module that records the device of every allocation; an invalid ordinal fails as CUDA does."""
    devices: list[int] = []

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self) -> None:
            if self.index < 0:
                raise RuntimeError(f"cudaSetDevice({self.index}): invalid device ordinal (fake cupy)")
            devices.append(self.index)

        def __exit__(self, *exc: object) -> None:
            pass

    def empty(shape, dtype):
        ptr = DEV1 * devices[-1] + 0x40000 if math.prod(shape) else 0
        return FakeCupyArray(shape, ptr, devices[-1])

    cuda = type(sys)("cupy.cuda")
    cuda.Device = Device
    cuda.get_current_stream = lambda device=-1: type("Stream", (), {"ptr": 0x77})()
    cupy = type(sys)("cupy")
    cupy.cuda, cupy.empty = cuda, empty
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    return devices


@pytest.mark.parametrize("rows, ptr", [(3, DEV1 + 0x1000), (0, 0)])
def test_cupy_output_allocated_on_the_device_of_x(fake, fake_cupy, rows, ptr):
    # a size-0 CuPy array has data pointer 0: its device comes from the array, not from the pointer
    y = _op().apply(FakeCupyArray((rows, 4), ptr, device=1))
    assert fake_cupy == [1] and isinstance(y, FakeCupyArray) and y.device.id == 1
    assert y.__cuda_array_interface__["shape"] == (rows, 5)
    calls = [c for o in fake.ops for c in o.calls]
    assert calls == ([(ptr, "float32", 3, y.__cuda_array_interface__["data"][0], "float32", 1, 0x77, True)]
                     if rows else [])


def test_op_built_once_per_fused_transform(fake):
    rng = np.random.default_rng(1)
    layers = [Layer(rng.standard_normal((8, 4)), rng.standard_normal(8), "gelu", 3),
              Layer(rng.standard_normal((5, 8)), None, "relu")]
    op = FusedTransform(layers, normalize=True)
    for _ in range(3):
        op.apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0x20000))
    (cop,) = fake.ops
    assert len(cop.calls) == 3 and op._cuda_op is cop
    assert [w.dtype for w in cop.weights] == [np.float32, np.float32]
    assert all(w.flags.c_contiguous for w in cop.weights)
    np.testing.assert_array_equal(cop.weights[0], op.layers[0].weight)
    assert cop.biases[0].dtype == np.float32 and cop.biases[1] is None
    assert cop.activations == ["gelu", "relu"] and cop.widths == [3, 5] and cop.normalize is True
    other = _op()
    other.apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0x20000))
    assert len(fake.ops) == 2 and other._cuda_op is fake.ops[1]


def test_missing_module_gives_install_command(no_module):
    with pytest.raises(RuntimeError, match=r"built without its CUDA module.*pip install \. -C "
                                           r"cmake\.define\.BC_FAST_CUDA=ON.*pip install bc_fast\[cuda\]") as e:
        bccuda.cuda_module()
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no ImportError traceback shown


def test_module_that_cannot_load_explained(monkeypatch):
    import importlib

    def broken(name: str) -> Any:
        raise ImportError("libcublas.so.13: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(bccuda, "_module", None)
    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(RuntimeError, match=r"is built but cannot be loaded \(libcublas\.so\.13.*"
                                           r"pip install bc_fast\[cuda\]"):
        bccuda.cuda_module()


def test_cuda_array_without_module_clear_error(no_module):
    with pytest.raises(RuntimeError, match=r"CUDA arrays cannot be transformed.*BC_FAST_CUDA=ON"):
        _op().apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0x20000))


def test_cuda_tensor_without_module_clear_error(no_module):
    """Before the GPU path, as_numpy refused this with 'move it to the CPU first'."""
    with pytest.raises(RuntimeError, match=r"built without its CUDA module.*BC_FAST_CUDA=ON"):
        _op().apply(FakeTorchCuda())


def test_dlpack_cuda_producer_without_torch(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(RuntimeError, match="DLPack producer on a CUDA device.*install torch"):
        _op().apply(FakeDLPack())


def test_not_a_cuda_array_described():
    with pytest.raises(TypeError, match="x is not a CUDA array"):
        bccuda.describe_cuda_array(object(), "x")


def test_torch_error_paths_before_any_cuda_call():
    """The torch checks run before torch.cuda is touched, so CPU tensors exercise them."""
    torch = pytest.importorskip("torch", reason="torch is needed for the torch checks")
    with pytest.raises(ValueError, match=r"x requires grad; .* pass x\.detach\(\)"):
        bccuda._describe_torch(torch.ones(2, 4, requires_grad=True), "x")
    with pytest.raises(ValueError, match="negative/conjugate view"):
        bccuda._describe_torch(torch.ones(2, 4)._neg_view(), "x")
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16, got torch\.float64"):
        bccuda._describe_torch(torch.ones(2, 4, dtype=torch.float64), "x")
    with pytest.raises(ValueError, match=r"x must be C-contiguous \(row-major\), got strides \(1, 2\)"):
        bccuda._describe_torch(torch.ones(4, 2).t(), "x")
    with pytest.raises(ValueError, match="x is a torch tensor on cpu, not on a CUDA device"):
        bccuda.describe_cuda_array(torch.ones(2, 4), "x")


def test_cuda_info_with_module(fake):
    info = bccuda.cuda_info()
    assert info["module"] is True and info["available"] is True and info["error"] == ""
    assert info["driver_version"] == "13.0" and info["runtime_version"] == "13.0" and info["cublas_version"] == "13.0.0"
    assert info["devices"][0]["compute_capability"] == "9.0"
    lines = bccuda.cuda_summary(info)
    assert lines[0] == "CUDA: module built (runtime 13.0, driver 13.0), 1 GPU(s)"
    assert lines[1] == "CUDA:   GPU 0: Fake H200, compute capability 9.0, 141 GiB"
    assert lines[2] == "CUDA:   fused one-kernel layers (compute capability 9.0): not built (no CUTLASS headers at build time)"
    assert bccuda.cuda_summary({**info, "fused_sm90_kernels": True})[2].endswith(": built")


def test_cuda_info_no_gpu(monkeypatch):
    mod = FakeCuda({"available": False, "error": "cudaGetDeviceCount: no CUDA-capable device is detected",
                    "device_count": 0, "driver_version": 0, "runtime_version": 13000, "devices": []})
    monkeypatch.setattr(bccuda, "cuda_module", lambda: mod)
    info = bccuda.cuda_info()
    assert info["module"] is True and info["available"] is False and "no CUDA-capable device" in info["error"]
    assert bccuda.cuda_summary(info) == ["CUDA: module built (runtime 13.0, driver ?); no usable GPU: "
                                         "cudaGetDeviceCount: no CUDA-capable device is detected"]


def test_cuda_info_never_raises(monkeypatch):
    class Broken(FakeCuda):
        def device_info(self) -> dict:
            raise RuntimeError("driver exploded")

    mod = Broken()
    monkeypatch.setattr(bccuda, "cuda_module", lambda: mod)
    info = bccuda.cuda_info()
    assert info["module"] is True and info["available"] is False
    assert info["error"] == "bc_fast._cuda.device_info() failed: RuntimeError: driver exploded"


def test_cuda_info_without_module(no_module):
    info = bc_fast.build_info()["cuda"]
    assert info["module"] is False and info["available"] is False and "BC_FAST_CUDA=ON" in info["error"]
    json.dumps(info)


def test_cli_info_cuda_section(fake, capsys):
    assert main(["info"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)  # stdout stays one JSON document
    assert info["cuda"]["devices"][0]["name"] == "Fake H200"
    assert "CUDA:   GPU 0: Fake H200, compute capability 9.0" in captured.err


def test_cli_info_without_module(no_module, capsys):
    assert main(["info"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["cuda"]["module"] is False
    assert "CUDA: module bc_fast._cuda not built (CPU only)" in captured.err


def test_numpy_inputs_never_import_the_gpu_path():
    code = (
        "import sys, numpy as np, bc_fast\n"
        "op = bc_fast.FusedTransform.affine(np.eye(4, dtype=np.float32))\n"
        "op.apply(np.ones((2, 4), np.float32)); op.apply(np.ones((2, 4), np.float16), out_dtype='float16')\n"
        "op.apply(np.ones((3, 4), np.float32), out=np.empty((3, 4), np.float32), threads=1)\n"
        "op.apply(np.ones((4, 8), np.float32)[:, :4].copy())\n"
        "try:\n    op.apply(np.ones((2, 4)))\nexcept TypeError:\n    pass\n"
        "try:\n    op.apply(np.ones((2, 4), np.float32)[:, ::2])\nexcept ValueError:\n    pass\n"
        "print(sorted(m for m in ('bc_fast.engine.cuda', 'bc_fast._cuda', 'torch', 'cupy') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_cpu_torch_tensors_never_import_the_gpu_path():
    pytest.importorskip("torch", reason="torch is needed for this check")
    code = ("import sys, numpy as np, torch, bc_fast\n"
            "op = bc_fast.FusedTransform.affine(np.eye(4, dtype=np.float32))\n"
            "op.apply(torch.ones(2, 4)); op.apply(torch.ones(2, 4), out=torch.empty(2, 4))\n"
            "try:\n    op.apply(torch.ones(2, 4, device='meta'))\nexcept ValueError:\n    pass\n"
            "print('bc_fast.engine.cuda' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_host_x_with_cuda_out_tensor_refused(fake):
    torch = pytest.importorskip("torch", reason="torch is needed for this check")
    with pytest.raises(ValueError, match="out is a CUDA array but x is a Tensor on the host"):
        _op().apply(torch.ones(3, 4), out=FakeCAI((3, 5)))


def _real_module() -> Any:
    try:
        return bccuda.cuda_module()
    except RuntimeError:
        pytest.skip("bc_fast._cuda not built (no -DBC_FAST_CUDA=ON): tests of the real module's binding not run")


def test_real_module_binding_contract():
    """Runs wherever the CUDA module is built, GPU or not (the CI build with nvcc)."""
    mod = _real_module()
    info = mod.device_info()
    assert {"available", "error", "device_count", "driver_version", "runtime_version", "cublas_version",
            "fused_sm90_kernels", "devices"} <= set(info)
    assert info["available"] == (info["error"] == "")
    rng = np.random.default_rng(2)
    op = FusedTransform([Layer(rng.standard_normal((8, 4)), rng.standard_normal(8), "gelu", 3),
                         Layer(rng.standard_normal((5, 8)))], normalize=True)
    cop = bccuda._cuda_op(op)
    assert (cop.d_in, cop.d_out, cop.num_layers) == (4, 5, 2) and bccuda._cuda_op(op) is cop
    with pytest.raises(ValueError, match="same length"):
        mod.CudaFusedOp([np.ones((2, 2), np.float32)], [], ["none"], [2], False)
    with pytest.raises(ValueError):
        cop.apply(0, "float64", 1, 0, "float32", 0, 0)


def test_real_module_without_gpu_clear_error(monkeypatch):
    mod = _real_module()
    if mod.device_info()["available"]:
        pytest.skip("a GPU is visible: the no-GPU error path is not exercised")
    monkeypatch.setattr(mod, "pointer_device", lambda ptr: 0, raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        _op().apply(FakeCAI(), out=FakeCAI((3, 5), ptr=0x20000))


# ----------------------------------------------------------------------------------------------
# Part 2: a real GPU (skipped, with the reason in the summary, where there is none)
# ----------------------------------------------------------------------------------------------

def _gpu_skip_reason() -> str:
    try:
        mod = bccuda.cuda_module()
    except RuntimeError:
        # same words as a missing GPU: bench/gpu_check.sh counts these skips as a failed GPU check
        return "no CUDA GPU visible: GPU tests not run (bc_fast._cuda is not built: no -DBC_FAST_CUDA=ON)"
    info = mod.device_info()
    if not info["available"]:
        return f"no CUDA GPU visible: GPU tests not run ({info['error']})"
    return ""


_REASON = _gpu_skip_reason()
gpu = pytest.mark.skipif(bool(_REASON), reason=_REASON or "GPU present")


def _torch_cuda():
    torch = pytest.importorskip("torch", reason="torch is needed for the torch GPU tests")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch (torch.cuda.is_available() is False): torch GPU tests not run")
    return torch


def _program(kind: str, d_in: int, d_out: int, rng: np.random.Generator) -> FusedTransform:
    def w(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)

    def b(o: int) -> np.ndarray:
        return rng.standard_normal(o).astype(np.float32) * 0.1

    if kind == "affine":
        return FusedTransform([Layer(w(d_out, d_in), b(d_out))])
    if kind == "linear_l2":
        return FusedTransform([Layer(w(d_out, d_in))], normalize=True)
    if kind == "mlp_gelu_partial":  # residual block form: activation on the leading outputs only
        h = 2 * d_in + 3
        return FusedTransform([Layer(w(h, d_in), b(h), "gelu", h // 2 + 1), Layer(w(d_out, h), b(d_out))])
    if kind == "relu_l2":
        return FusedTransform([Layer(w(d_in + 5, d_in), b(d_in + 5), "relu"), Layer(w(d_out, d_in + 5), None, "relu")],
                              normalize=True)
    raise AssertionError(kind)


def _reference(op: FusedTransform, x64: np.ndarray) -> np.ndarray:
    y = apply_layers_reference(op.layers, x64)
    if op.normalize:
        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return y


def _torch_naive(torch, op: FusedTransform, x):
    """The same program in torch eager, in x's dtype (the error bar a same-dtype implementation gets)."""
    y = x
    for layer in op.layers:
        wt = torch.tensor(np.array(layer.weight), device=x.device).to(x.dtype)
        bt = None if layer.bias is None else torch.tensor(np.array(layer.bias), device=x.device).to(x.dtype)
        y = torch.nn.functional.linear(y, wt, bt)
        if not layer.is_affine:
            width = layer.d_out if layer.activation_width is None else layer.activation_width
            act = torch.nn.functional.gelu if layer.activation == "gelu" else torch.relu
            y = torch.cat([act(y[:, :width]), y[:, width:]], dim=1)
    if op.normalize:  # in float32: 1e-12 is 0 in float16, and 0 / 0 would be NaN for an all-zero row
        y32 = y.float()
        y = (y32 / y32.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(x.dtype)
    return y


def _row_err(y: np.ndarray, ref: np.ndarray) -> float:
    """Largest row error relative to the row's norm (floored at a tenth of the typical norm)."""
    norms = np.linalg.norm(ref, axis=1)
    scale = np.maximum(norms, 0.1 * float(np.sqrt(np.mean(norms ** 2))) + 1e-12) if len(ref) else norms
    return float(np.max(np.linalg.norm(y.astype(np.float64) - ref, axis=1) / scale)) if len(ref) else 0.0


_FLOOR = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}


def _check_close(torch, op, x, y, out_dtype: str) -> None:
    x64 = x.float().cpu().double().numpy()
    ref = _reference(op, x64)
    naive = _torch_naive(torch, op, x).to(getattr(torch, out_dtype))
    err = _row_err(y.float().cpu().numpy(), ref)
    err_naive = _row_err(naive.float().cpu().numpy(), ref)
    assert err <= 2 * err_naive + _FLOOR[out_dtype], (err, err_naive)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["affine", "linear_l2", "mlp_gelu_partial", "relu_l2"])
@pytest.mark.parametrize("n, d_in, d_out", [(1, 256, 256), (7, 59, 111), (1000, 256, 256), (33, 1024, 768),
                                            (257, 3, 17), (300, 1, 16)])
def test_gpu_torch_matches_float64(dtype, kind, n, d_in, d_out):
    torch = _torch_cuda()
    torch.manual_seed(n + d_in)
    rng = np.random.default_rng(n + d_in)
    op = _program(kind, d_in, d_out, rng)
    x = torch.randn(n, d_in, device="cuda").to(getattr(torch, dtype))
    y = op.apply(x)
    assert isinstance(y, torch.Tensor) and y.device == x.device and y.dtype == x.dtype
    assert tuple(y.shape) == (n, d_out) and y.is_contiguous()
    torch.cuda.synchronize()
    _check_close(torch, op, x, y, dtype)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["affine", "mlp_gelu_partial"])
def test_gpu_single_output(dtype, kind):
    """d_out = 1 (no normalisation: a single normalised output would only be a sign)."""
    torch = _torch_cuda()
    torch.manual_seed(11)
    op = _program(kind, 5, 1, np.random.default_rng(11))
    x = torch.randn(513, 5, device="cuda").to(getattr(torch, dtype))
    y = op.apply(x)
    torch.cuda.synchronize()
    _check_close(torch, op, x, y, dtype)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gpu_unaligned_views(dtype):
    """Views one element into a buffer: pointers aligned to the item size only; right, or a clear refusal."""
    torch = _torch_cuda()
    torch.manual_seed(12)
    op = _program("affine", 64, 40, np.random.default_rng(12))
    tdt = getattr(torch, dtype)
    x = torch.randn(31 * 64 + 1, device="cuda").to(tdt)[1:].view(31, 64)
    out = torch.empty(31 * 40 + 1, device="cuda", dtype=tdt)[1:].view(31, 40)
    try:
        op.apply(x, out=out)
    except ValueError as e:
        assert "align" in str(e)
    else:
        torch.cuda.synchronize()
        _check_close(torch, op, x, out, dtype)


@gpu
@pytest.mark.parametrize("x_dtype, out_dtype", [("float32", "float16"), ("float16", "float32"),
                                                ("bfloat16", "float32"), ("float32", "bfloat16")])
def test_gpu_out_dtype(x_dtype, out_dtype):
    torch = _torch_cuda()
    op = _program("linear_l2", 96, 80, np.random.default_rng(3))
    x = torch.randn(65, 96, device="cuda").to(getattr(torch, x_dtype))
    y = op.apply(x, out_dtype=out_dtype)
    assert y.dtype == getattr(torch, out_dtype)
    torch.cuda.synchronize()
    _check_close(torch, op, x, y, out_dtype if out_dtype != "float32" else x_dtype)


@gpu
def test_gpu_out_given_and_op_cached():
    torch = _torch_cuda()
    op = _program("affine", 64, 32, np.random.default_rng(4))
    x = torch.randn(100, 64, device="cuda")
    out = torch.full((100, 32), float("nan"), device="cuda")
    assert op.apply(x, out=out) is out
    first = op._cuda_op
    assert op.apply(x, out=out) is out and op._cuda_op is first
    torch.cuda.synchronize()
    _check_close(torch, op, x, out, "float32")


@gpu
@pytest.mark.parametrize("n", [1, 3000])
def test_gpu_plain_torch_call_replays_in_a_cuda_graph(n):
    # FusedTransform.apply(x, out=) on torch tensors (the plain path): after one call, nothing in it
    # allocates or synchronises, so a captured graph replays it bit-identically on new inputs.
    torch = _torch_cuda()
    op = _program("linear_l2", 256, 256, np.random.default_rng(12))
    x = torch.randn(n, 256, device="cuda", dtype=torch.float16)
    out = torch.empty(n, 256, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        op.apply(x, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        op.apply(x, out=out)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    direct = op.apply(x)
    torch.cuda.synchronize()
    assert torch.equal(out, direct)
    _check_close(torch, op, x, out, "float16")


@gpu
def test_gpu_non_default_stream():
    torch = _torch_cuda()
    op = _program("mlp_gelu_partial", 128, 64, np.random.default_rng(5))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.randn(4096, 128, device="cuda", dtype=torch.float16)
        y = op.apply(x)  # queued on s, after x's producer, without a device-wide sync
    s.synchronize()
    _check_close(torch, op, x, y, "float16")


@gpu
def test_gpu_device_1():
    torch = _torch_cuda()
    if torch.cuda.device_count() < 2:
        pytest.skip("only one GPU visible: the device-1 test not run")
    op = _program("affine", 64, 48, np.random.default_rng(6))
    x0 = torch.randn(10, 64, device="cuda:0")
    x1 = x0.to("cuda:1")
    y1 = op.apply(x1)  # weights uploaded to device 1 too, current device untouched
    assert y1.device == x1.device and torch.cuda.current_device() == 0
    y0 = op.apply(x0)
    torch.cuda.synchronize(1)
    torch.testing.assert_close(y1.cpu(), y0.cpu())
    with pytest.raises(ValueError, match="out is on CUDA device 1 but x is on device 0"):
        op.apply(x0, out=torch.empty(10, 48, device="cuda:1"))


@gpu
def test_gpu_huge_batch_beyond_int32_elements():
    torch = _torch_cuda()
    n, d = (1 << 31) // 256 + 7, 256  # more than 2**31 elements in x and in y
    op = _program("linear_l2", d, d, np.random.default_rng(7))
    x = torch.randn(n, d, device="cuda", dtype=torch.float16)
    y = op.apply(x)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    torch.cuda.synchronize()
    _check_close(torch, op, x[rows].contiguous(), y[rows], "float16")
    del x, y
    torch.cuda.empty_cache()


@gpu
def test_gpu_bad_inputs():
    torch = _torch_cuda()
    op = _program("affine", 16, 8, np.random.default_rng(8))
    x = torch.randn(5, 16, device="cuda")
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        op.apply(torch.randn(16, 5, device="cuda").t())
    with pytest.raises(TypeError, match=r"got torch\.float64"):
        op.apply(x.double())
    with pytest.raises(ValueError, match="requires grad"):
        op.apply(x.clone().requires_grad_())
    with pytest.raises(ValueError, match="x has 15 features per row, expected 16"):
        op.apply(x[:, :15].contiguous())
    buf = torch.empty(5 * 16 + 64, device="cuda")
    xs = buf[:80].view(5, 16)
    with pytest.raises(ValueError, match="out must not overlap x"):
        op.apply(xs, out=buf[40:80].view(5, 8))
    with pytest.raises(ValueError, match="x is a CUDA array but out is a Tensor on the host"):
        op.apply(x, out=torch.empty(5, 8))
    with pytest.raises(ValueError, match="out_dtype=float16 disagrees"):
        op.apply(x, out=torch.empty(5, 8, device="cuda"), out_dtype="float16")
    # The plain torch path hands anything unusual to the full checks, which name it:
    with pytest.raises(ValueError, match="out has 4 rows but x has 5"):
        op.apply(x, out=torch.empty(4, 8, device="cuda"))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        op.apply(x, out=torch.empty(8, 5, device="cuda").t())
    with pytest.raises(ValueError, match="out requires grad"):
        op.apply(x, out=torch.empty(5, 8, device="cuda", requires_grad=True))
    assert op.apply(x[:0]).shape == (0, 8)


@gpu
def test_gpu_dlpack_producer_returns_torch():
    torch = _torch_cuda()

    class Producer:
        def __init__(self, t) -> None:
            self.t = t

        def __dlpack__(self, stream=None, **kw):
            return self.t.__dlpack__(stream=stream, **kw)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    op = _program("affine", 32, 16, np.random.default_rng(9))
    x = torch.randn(9, 32, device="cuda")
    y = op.apply(Producer(x))
    assert isinstance(y, torch.Tensor) and y.device == x.device
    torch.cuda.synchronize()
    _check_close(torch, op, x, y, "float32")


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_cupy(dtype):
    cupy = pytest.importorskip("cupy", reason="CuPy is needed for the CuPy GPU tests")
    torch = _torch_cuda()
    op = _program("relu_l2", 48, 40, np.random.default_rng(10))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x = cupy.random.standard_normal((77, 48)).astype(dtype)
        y = op.apply(x)
        out = cupy.empty((77, 40), dtype=dtype)
        assert op.apply(x, out=out) is out
    stream.synchronize()
    assert isinstance(y, cupy.ndarray) and y.dtype == np.dtype(dtype) and y.shape == (77, 40)
    xt = torch.as_tensor(x, device="cuda")
    _check_close(torch, op, xt, torch.as_tensor(y, device="cuda"), dtype)
    _check_close(torch, op, xt, torch.as_tensor(out, device="cuda"), dtype)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        op.apply(cupy.ones((48, 77), dtype=dtype).T)
