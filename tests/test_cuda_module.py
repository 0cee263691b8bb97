"""bc_fast._cuda, the compiled CUDA module, tested directly (built only with -DBC_FAST_CUDA=ON; .ci/cuda).

Without a GPU: device_info, argument checking before any CUDA call, clear errors instead of crashes.
With a GPU (and torch with CUDA): CudaFusedOp.apply against the float64 reference for every dtype,
layer kind and odd shape, streams, threads, and the memory/stream primitives.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

from bc_fast.engine.fusion import apply_layers_reference
from bc_fast.engine.operator import Layer

cu = pytest.importorskip("bc_fast._cuda", reason="bc_fast._cuda is built only with BC_FAST_CUDA=ON (.ci/cuda)")

INFO = cu.device_info()
HAVE_GPU = bool(INFO["available"])
no_gpu_only = pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU error path; a GPU is visible")


def _torch_cuda():
    """torch with a usable CUDA device, or skip saying why."""
    if not HAVE_GPU:
        pytest.skip(f"no CUDA GPU visible: GPU tests not run ({INFO['error']})")
    torch = pytest.importorskip("torch", reason="the GPU tests allocate device memory with torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA support here: GPU tests not run")
    return torch


def _op_args(layers: list[Layer], normalize: bool = False) -> tuple:
    return ([np.asarray(l.weight, np.float32) for l in layers],
            [None if l.bias is None else np.asarray(l.bias, np.float32) for l in layers],
            [l.activation for l in layers],
            [l.d_out if l.activation_width is None else int(l.activation_width) for l in layers],
            normalize)


def _op(layers: list[Layer], normalize: bool = False):
    return cu.CudaFusedOp(*_op_args(layers, normalize))


def _affine(d_in: int = 4, d_out: int = 3) -> list[Layer]:
    return [Layer(np.ones((d_out, d_in), np.float32))]


# ---------------------------------------------------------------- without a GPU


def test_device_info_shape():
    info = cu.device_info()
    assert set(info) == {"available", "error", "device_count", "driver_version", "runtime_version",
                         "cublas_version", "fused_sm90_kernels", "devices"}
    assert isinstance(info["available"], bool) and isinstance(info["error"], str)
    assert info["runtime_version"] >= 13000 and info["cublas_version"] > 0
    if info["available"]:
        assert info["error"] == "" and info["device_count"] == len(info["devices"]) >= 1
        for i, d in enumerate(info["devices"]):
            assert d["index"] == i and d["name"] and d["total_memory"] > 0
            major, minor = d["compute_capability"].split(".")
            assert int(major) >= 1 and int(minor) >= 0
    else:
        assert info["error"] and info["devices"] == [] and info["device_count"] == 0


def test_import_bc_fast_does_not_load_the_cuda_module():
    code = "import sys, bc_fast; assert 'bc_fast._cuda' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_properties():
    op = _op([Layer(np.ones((5, 4), np.float32), None, "relu"), Layer(np.ones((3, 5), np.float32))])
    assert (op.d_in, op.d_out, op.num_layers) == (4, 3, 2)


@pytest.mark.parametrize("args, match", [
    (([], [], [], [], False), "at least one layer"),
    (([np.ones(4, np.float32)], [None], ["none"], [0], False), r"layer 0: weight must be 2-D \(d_out, d_in\), got 1-D"),
    (([np.ones((0, 4), np.float32)], [None], ["none"], [0], False), "layer 0: dimensions must be positive"),
    (([np.ones((3, 4), np.float32)], [None, None], ["none"], [3], False), "must have the same length, got 1, 2, 1 and 1"),
    (([np.ones((3, 4), np.float32)], [None], ["tanh"], [3], False), "layer 0: unknown activation 'tanh'"),
    (([np.ones((3, 4), np.float32)], [np.ones(4, np.float32)], ["none"], [3], False), r"layer 0: bias must have shape \(3,\)"),
    (([np.ones((3, 4), np.float32)], [None], ["relu"], [4], False), r"activation width 4 is not in \[0, 3\]"),
    (([np.ones((3, 4), np.float32)], [None], ["relu"], [-1], False), r"activation width -1 is not in \[0, 3\]"),
    (([np.ones((3, 4), np.float32), np.ones((2, 4), np.float32)], [None, None], ["none", "none"], [3, 2], False),
     "layer 1 has d_in 4 but the previous layer outputs 3"),
    (([np.full((3, 4), np.nan, np.float32)], [None], ["none"], [3], False), "layer 0: weight contains NaN or Inf"),
    (([np.ones((3, 4), np.float32)], [np.array([0, np.inf, 0], np.float32)], ["none"], [3], False),
     "layer 0: bias contains NaN or Inf"),
])
def test_constructor_validation(args, match):
    with pytest.raises(ValueError, match=match):
        cu.CudaFusedOp(*args)


def test_constructor_refuses_non_numeric_weights():
    with pytest.raises(TypeError):
        cu.CudaFusedOp(["not an array"], [None], ["none"], [0], False)


@pytest.mark.parametrize("kw, match", [
    ({"x_dtype": "float64"}, "x_dtype must be 'float32', 'float16' or 'bfloat16', got 'float64'"),
    ({"out_dtype": "half"}, "out_dtype must be 'float32', 'float16' or 'bfloat16', got 'half'"),
    ({"n": -1}, "n must be >= 0, got -1"),
    ({"device": -1}, "device must be >= 0, got -1"),
    ({"x_ptr": 0}, "x_ptr and out_ptr must not be null"),
    ({"out_ptr": 0}, "x_ptr and out_ptr must not be null"),
    ({"out_ptr": 0x100000 + 8}, "the output overlaps the input"),
    ({"n": 2 ** 62}, "overflow the byte size"),
])
def test_apply_argument_errors_come_before_any_cuda_call(kw, match):
    # Without a GPU these would otherwise fail with "CUDA is not available": a ValueError proves the order.
    args = {"x_ptr": 0x100000, "x_dtype": "float32", "n": 4, "out_ptr": 0x200000, "out_dtype": "float32",
            "device": 0, "stream": 0, **kw}
    with pytest.raises(ValueError, match=match):
        _op(_affine()).apply(**args)


def test_apply_empty_batch_is_a_no_op():
    assert _op(_affine()).apply(0, "float32", 0, 0, "float16", 0, 0) is None


@no_gpu_only
def test_apply_without_gpu_is_a_clear_runtime_error():
    with pytest.raises(RuntimeError, match="CUDA is not available: cudaGetDeviceCount failed"):
        _op(_affine()).apply(0x100000, "float32", 1, 0x200000, "float32", 0, 0)


@no_gpu_only
@pytest.mark.parametrize("make", [lambda: cu.DeviceBuffer(16, 0), lambda: cu.Stream(0), lambda: cu.Event(0)],
                         ids=["DeviceBuffer", "Stream", "Event"])
def test_primitives_without_gpu_raise_runtime_error(make):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        make()


@no_gpu_only
def test_pinned_buffer_without_gpu_raises_runtime_error():
    with pytest.raises(RuntimeError, match="cudaHostAlloc"):
        cu.PinnedBuffer(1024)


@pytest.mark.parametrize("kw, match", [
    ({"kind": "h2h"}, "kind must be 'h2d', 'd2h' or 'd2d', got 'h2h'"),
    ({"nbytes": -1}, "nbytes must be >= 0, got -1"),
    ({"dst_ptr": 0}, "null pointer"),
])
def test_memcpy_async_argument_errors(kw, match):
    args = {"dst_ptr": 0x1000, "src_ptr": 0x2000, "nbytes": 8, "kind": "h2d", "stream_ptr": 0, **kw}
    with pytest.raises(ValueError, match=match):
        cu.memcpy_async(**args)


def test_memcpy_async_zero_bytes_is_a_no_op():
    assert cu.memcpy_async(0, 0, 0, "d2d", 0) is None


@pytest.mark.parametrize("make", [lambda: cu.PinnedBuffer(-1), lambda: cu.DeviceBuffer(-5, 0)],
                         ids=["PinnedBuffer", "DeviceBuffer"])
def test_negative_sizes_refused(make):
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        make()


def test_pointer_device_null_refused():
    with pytest.raises(ValueError, match="null pointer"):
        cu.pointer_device(0)


# ---------------------------------------------------------------- with a GPU

TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
# Max error relative to max |reference|: fp32 GEMMs (no TF32) vs fp16/bf16 weights, inputs and intermediates.
TOL = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}


def _program(kind: str, d_in: int, d_out: int, rng: np.random.Generator) -> list[Layer]:
    def w(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    def b(o: int) -> np.ndarray:
        return rng.standard_normal(o).astype(np.float32)

    hidden = 2 * d_out + 1
    return {
        "affine": [Layer(w(d_out, d_in))],
        "affine_bias": [Layer(w(d_out, d_in), b(d_out))],
        "relu_bias": [Layer(w(d_out, d_in), b(d_out), "relu")],
        "relu_partial": [Layer(w(d_out, d_in), b(d_out), "relu", d_out // 2)],
        "gelu": [Layer(w(d_out, d_in), None, "gelu")],
        "gelu_partial": [Layer(w(d_out, d_in), b(d_out), "gelu", (d_out + 1) // 2)],
        "mlp": [Layer(w(hidden, d_in), b(hidden), "gelu"), Layer(w(d_out, hidden), b(d_out))],
        "mlp3": [Layer(w(hidden, d_in), b(hidden), "relu"), Layer(w(hidden, hidden), None, "gelu", 3),
                 Layer(w(d_out, hidden), b(d_out), "relu")],
    }[kind]


def _reference(layers: list[Layer], x64: np.ndarray, normalize: bool) -> np.ndarray:
    y = apply_layers_reference(layers, x64)
    if normalize:
        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return y


def _run(torch, op, x, out_dtype: str, stream: int = 0):
    out = torch.empty((x.shape[0], op.d_out), dtype=getattr(torch, out_dtype), device=x.device)
    op.apply(x.data_ptr(), str(x.dtype).removeprefix("torch."), x.shape[0], out.data_ptr(), out_dtype,
             x.device.index, stream)
    return out


def _check(torch, layers, normalize, x, out, x_dtype: str, out_dtype: str) -> None:
    torch.cuda.synchronize()
    ref = _reference(layers, x.float().cpu().numpy().astype(np.float64), normalize)
    got = out.float().cpu().numpy().astype(np.float64)
    assert got.shape == ref.shape
    if ref.size == 0:
        return
    tol = max(TOL[x_dtype], TOL[out_dtype])
    err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("kind", ["affine", "affine_bias", "relu_bias", "relu_partial", "gelu", "gelu_partial",
                                  "mlp", "mlp3"])
@pytest.mark.parametrize("out_dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("x_dtype", list(TORCH_DTYPES))
def test_apply_matches_float64_reference(x_dtype, out_dtype, kind):
    torch = _torch_cuda()
    rng = np.random.default_rng(zlib.crc32(f"{x_dtype}/{out_dtype}/{kind}".encode()))
    layers = _program(kind, 59, 111, rng)
    for normalize in (False, True):
        op = _op(layers, normalize)
        for n in (0, 1, 7, 1000):
            x = torch.from_numpy(rng.standard_normal((n, 59)).astype(np.float32)).to(
                device="cuda", dtype=getattr(torch, x_dtype))
            _check(torch, layers, normalize, x, _run(torch, op, x, out_dtype), x_dtype, out_dtype)


@pytest.mark.parametrize("d_in, d_out", [(1, 1), (1, 3), (3, 1), (3, 59), (59, 3), (111, 111), (111, 1)])
@pytest.mark.parametrize("x_dtype", list(TORCH_DTYPES))
def test_odd_shapes(x_dtype, d_in, d_out):
    torch = _torch_cuda()
    rng = np.random.default_rng(d_in * 1000 + d_out)
    for kind in ("affine_bias", "gelu_partial", "mlp"):
        layers = _program(kind, d_in, d_out, rng)
        # A 1-wide output normalises to +-1: rows near 0 flip sign under rounding, so no reference there.
        for normalize in (False, True) if d_out > 1 else (False,):
            op = _op(layers, normalize)
            for n in (1, 7, 1000):
                x = torch.from_numpy(rng.standard_normal((n, d_in)).astype(np.float32)).to(
                    device="cuda", dtype=getattr(torch, x_dtype))
                _check(torch, layers, normalize, x, _run(torch, op, x, x_dtype), x_dtype, x_dtype)


@pytest.mark.parametrize("x_dtype", list(TORCH_DTYPES))
def test_unaligned_pointers(x_dtype):
    # Rows of an odd width start at addresses that are not 16-byte aligned: cuBLASLt must be told.
    torch = _torch_cuda()
    rng = np.random.default_rng(7)
    layers = _program("relu_bias", 59, 3, rng)
    op = _op(layers)
    base = torch.from_numpy(rng.standard_normal((101, 59)).astype(np.float32)).to("cuda", getattr(torch, x_dtype))
    out_base = torch.empty((101, 3), dtype=getattr(torch, x_dtype), device="cuda")
    x, out = base[1:], out_base[1:]
    op.apply(x.data_ptr(), x_dtype, 100, out.data_ptr(), x_dtype, 0, 0)
    _check(torch, layers, False, x, out, x_dtype, x_dtype)


def test_batch_larger_than_one_chunk():
    # At most 2^22 rows per chunk, and 1 GiB of scratch per stream: 2^22 + 1000 rows take two chunks,
    # and a 600k-row MLP with a 513-wide hidden layer (two 16-bit hidden buffers, 2 kB per row) two.
    torch = _torch_cuda()
    rng = np.random.default_rng(3)
    layers = _program("affine_bias", 8, 8, rng)
    x = torch.randn(((1 << 22) + 1000, 8), device="cuda", dtype=torch.float16)
    _check(torch, layers, True, x, _run(torch, _op(layers, normalize=True), x, "float16"), "float16", "float16")
    mlp = [Layer((rng.standard_normal((513, 256)) / 16).astype(np.float32), rng.standard_normal(513).astype(np.float32),
                 "relu"),
           Layer((rng.standard_normal((256, 513)) / 23).astype(np.float32), None, "relu", 100)]
    x = torch.randn((600_000, 256), device="cuda", dtype=torch.float16)
    _check(torch, mlp, False, x, _run(torch, _op(mlp), x, "float32"), "float16", "float32")


def test_non_default_stream():
    torch = _torch_cuda()
    rng = np.random.default_rng(5)
    layers = _program("mlp", 64, 32, rng)
    op = _op(layers, normalize=True)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.randn((5000, 64), device="cuda")
        out = _run(torch, op, x, "float32", stream=s.cuda_stream)
    s.synchronize()
    _check(torch, layers, True, x, out, "float32", "float32")


def test_two_threads_concurrently():
    torch = _torch_cuda()
    rng = np.random.default_rng(11)
    layers = _program("mlp3", 128, 64, rng)
    op = _op(layers, normalize=True)
    errors: list[BaseException] = []

    def work(seed: int, use_per_thread_default: bool) -> None:
        try:
            s = torch.cuda.Stream()
            g = torch.Generator(device="cuda").manual_seed(seed)
            with torch.cuda.stream(s):
                for i in range(10):
                    x = torch.randn((2000 + 37 * i, 128), device="cuda", dtype=torch.float16, generator=g)
                    stream = 2 if use_per_thread_default else s.cuda_stream
                    if use_per_thread_default:
                        s.synchronize()  # x was produced on s; the per-thread default stream must see it
                    out = _run(torch, op, x, "float32", stream=stream)
                    _check(torch, layers, True, x, out, "float16", "float32")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed, seed % 2 == 1)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_host_pointer_refused():
    _torch_cuda()
    x = np.ones((4, 4), np.float32)
    out = np.empty((4, 3), np.float32)
    with pytest.raises(ValueError, match="x_ptr is not CUDA device memory"):
        _op(_affine()).apply(x.ctypes.data, "float32", 4, out.ctypes.data, "float32", 0, 0)


def test_pointer_on_another_device_refused():
    torch = _torch_cuda()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.ones((4, 4), device="cuda:1")
    out = torch.empty((4, 3), device="cuda:1")
    with pytest.raises(ValueError, match="x_ptr points to memory on device 1, not device 0"):
        _op(_affine()).apply(x.data_ptr(), "float32", 4, out.data_ptr(), "float32", 0, 0)
    assert cu.pointer_device(x.data_ptr()) == 1


def test_bad_device_index_refused():
    _torch_cuda()
    with pytest.raises(ValueError, match=r"device must be in \[0, "):
        _op(_affine()).apply(0x100000, "float32", 1, 0x200000, "float32", 1000, 0)


def test_out_of_memory_is_memory_error():
    _torch_cuda()
    with pytest.raises(MemoryError, match="out of CUDA memory: cudaMalloc"):
        cu.DeviceBuffer(1 << 50, 0)


def test_primitives_round_trip():
    _torch_cuda()
    n = 1 << 20
    src, dst = cu.PinnedBuffer(n), cu.PinnedBuffer(n)
    a = np.frombuffer(src, dtype=np.uint8)
    a[:] = np.arange(n, dtype=np.uint64).astype(np.uint8)
    d1, d2 = cu.DeviceBuffer(n, 0), cu.DeviceBuffer(n, 0)
    assert (d1.nbytes, d1.device, src.nbytes) == (n, 0, n) and cu.pointer_device(d1.ptr) == 0
    s1, s2 = cu.Stream(0), cu.Stream(0)
    ev = cu.Event(0)
    cu.memcpy_async(d1.ptr, src.ptr, n, "h2d", s1.ptr)
    ev.record(s1.ptr)
    cu.stream_wait_event(s2.ptr, ev)  # s2 copies only after s1's upload
    cu.memcpy_async(d2.ptr, d1.ptr, n, "d2d", s2.ptr)
    cu.memcpy_async(dst.ptr, d2.ptr, n, "d2h", s2.ptr)
    s2.synchronize()
    ev.synchronize()
    assert ev.query() is True
    np.testing.assert_array_equal(np.frombuffer(dst, dtype=np.uint8), a)


def test_weights_beyond_float16_range_refused_for_float16_input():
    torch = _torch_cuda()
    layers = [Layer(np.full((3, 4), 1e5, np.float32))]
    x = torch.ones((2, 4), device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"layer 0 weight: value 100000\.0+ exceeds the float16 range"):
        _run(torch, _op(layers), x, "float16")
    x32 = x.float()  # float32 (and bfloat16) inputs keep such weights
    _check(torch, layers, False, x32, _run(torch, _op(layers), x32, "float32"), "float32", "float32")


# ---------------------------------------------------------------- the fused sm_90a layer kernel


def _dense(rng: np.random.Generator, d_out: int, d_in: int, bias: bool = True, act: str = "none",
           width: int | None = None) -> Layer:
    w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    return Layer(w, rng.standard_normal(d_out).astype(np.float32) if bias else None, act, width)


# Every width a multiple of 8, as the fused kernel needs. name: (layers, normalize, paths on sm90)
WIDE_PROGRAMS = {
    "l2_256": (lambda r: [_dense(r, 256, 256)], True, ["sm90_fused"]),
    "l2_64_from_1024": (lambda r: [_dense(r, 64, 1024, bias=False)], True, ["sm90_fused"]),
    "l2_8": (lambda r: [_dense(r, 8, 16)], True, ["sm90_fused"]),
    "relu_partial_l2": (lambda r: [_dense(r, 200, 128, act="relu", width=77)], True, ["sm90_fused"]),
    "mlp_gelu_l2": (lambda r: [_dense(r, 384, 256, act="gelu"), _dense(r, 128, 384, bias=False)], True,
                    ["cublaslt+epilogue", "sm90_fused"]),
    # 16-bit GEMM + one in-place activation pass (the fused kernel's GELU epilogue is slower):
    "gelu_1024": (lambda r: [_dense(r, 1024, 256, act="gelu")], False, ["cublaslt+epilogue"]),
    "gelu_partial_l2": (lambda r: [_dense(r, 200, 128, act="gelu", width=77)], True, ["cublaslt+epilogue"]),
    "relu_partial": (lambda r: [_dense(r, 512, 64, act="relu", width=300)], False, ["cublaslt+epilogue"]),
    "mlp_gelu": (lambda r: [_dense(r, 1024, 256, act="gelu"), _dense(r, 256, 1024)], False,
                 ["cublaslt+epilogue", "cublaslt"]),
}


def test_layer_paths_choose_the_fused_kernel_where_it_applies():
    rng = np.random.default_rng(0)
    built = bool(INFO["fused_sm90_kernels"])
    fused = "sm90_fused" if built else None

    def paths(layers, normalize, x="float16", out=None, sm90=True):
        return _op(layers, normalize).layer_paths(x, out or x, sm90)

    for name, (make, normalize, expected) in WIDE_PROGRAMS.items():
        got = paths(make(rng), normalize)
        assert got == [p if built or p != "sm90_fused" else "cublaslt+normalize" for p in expected], name
    l2 = [_dense(rng, 256, 256)]
    assert paths(l2, True) == [fused or "cublaslt+normalize"]
    assert paths(l2, True, "bfloat16") == [fused or "cublaslt+normalize"]
    assert paths(l2, True, sm90=False) == ["cublaslt+normalize"]
    assert paths(l2, True, "float32") == ["cublaslt+epilogue"]  # fp32: true fp32 GEMMs, never tensor cores
    assert paths(l2, True, "float16", "float32") == ["cublaslt+epilogue"]
    assert paths(l2, False) == ["cublaslt"]  # cuBLASLt's own bias epilogue: one kernel already
    assert paths([_dense(rng, 512, 256)], True) == ["cublaslt+normalize"]  # the row spans two tiles
    assert paths([_dense(rng, 111, 59)], True) == ["cublaslt+normalize"]  # widths not multiples of 8
    mlp = [_dense(rng, 1024, 256, act="gelu"), _dense(rng, 256, 1024)]
    assert paths(mlp, False, sm90=False) == ["cublaslt+epilogue", "cublaslt"]
    assert paths([_dense(rng, 64, 64, act="relu", width=10)], True) == [fused or "cublaslt+epilogue"]
    assert paths([_dense(rng, 64, 64, act="relu", width=10)], True, sm90=False) == ["cublaslt+epilogue"]
    assert paths([_dense(rng, 64, 64, act="gelu")], True) == ["cublaslt+epilogue"]
    with pytest.raises(ValueError, match="x_dtype"):
        paths(l2, True, "float64", "float16")


def _fused_gpu():
    torch = _torch_cuda()
    if not INFO["fused_sm90_kernels"]:
        pytest.skip("this build has no fused sm_90a kernels (built without CUTLASS)")
    if INFO["devices"][0]["compute_capability"] != "9.0":
        pytest.skip(f"the fused kernels run on compute capability 9.0 only, not {INFO['devices'][0]['compute_capability']}")
    return torch


@pytest.mark.parametrize("name", list(WIDE_PROGRAMS))
@pytest.mark.parametrize("x_dtype", ["float16", "bfloat16"])
def test_wide_16bit_programs_match_float64(x_dtype, name):
    # The fused sm90 kernel where the dispatch picks it, the 16-bit cuBLASLt route elsewhere.
    torch = _fused_gpu()
    rng = np.random.default_rng(zlib.crc32(f"fused/{x_dtype}/{name}".encode()))
    make, normalize, expected = WIDE_PROGRAMS[name]
    layers = make(rng)
    op = _op(layers, normalize)
    assert op.layer_paths(x_dtype, x_dtype, True) == expected
    dt = getattr(torch, x_dtype)
    for n in (1, 127, 128, 129, 256, 5000, 33_333):  # tile edges (128 rows, clusters of 2 tiles), many tiles
        x = torch.from_numpy(rng.standard_normal((n, layers[0].d_in)).astype(np.float32)).to("cuda", dt)
        out = torch.full((n, op.d_out), float("nan"), dtype=dt, device="cuda")  # every element must be written
        op.apply(x.data_ptr(), x_dtype, n, out.data_ptr(), x_dtype, 0, 0)
        assert not torch.isnan(out).any().item(), f"{n} rows: output elements left unwritten"
        _check(torch, layers, normalize, x, out, x_dtype, x_dtype)


def test_fused_sm90_zero_rows_normalise_to_zero_and_views_fall_back():
    torch = _fused_gpu()
    rng = np.random.default_rng(11)
    layers = [_dense(rng, 256, 256, bias=False)]
    op = _op(layers, True)
    x = torch.randn((1001, 256), device="cuda", dtype=torch.float16)
    x[::7] = 0  # zero rows: 0 / max(0, 1e-12) = 0, never NaN
    out = _run(torch, op, x, "float16")
    torch.cuda.synchronize()
    assert torch.all(out[::7] == 0).item()
    _check(torch, layers, True, x, out, "float16", "float16")
    # A view starting 2 bytes into the buffer is not 16-byte aligned: the cuBLASLt path takes it.
    base = torch.randn((1002 * 256 + 1,), device="cuda", dtype=torch.float16)
    xv = base[1:].view(1002, 256)
    _check(torch, layers, True, xv, _run(torch, op, xv, "float16"), "float16", "float16")


@pytest.fixture
def sm90_variant_restored():
    """The fused kernel's process-wide variant, put back after the test."""
    if not INFO["fused_sm90_kernels"]:
        pytest.skip("this build has no fused sm_90a kernels (built without CUTLASS)")
    before = cu.sm90_kernel_variant()
    yield
    cu.set_sm90_kernel_variant(*before)


def test_sm90_kernel_variant_is_picked_by_name(sm90_variant_restored):
    assert cu.sm90_kernel_variant() == ("cooperative", "direct")
    cu.set_sm90_kernel_variant("pingpong", "staged")
    assert cu.sm90_kernel_variant() == ("pingpong", "staged")
    with pytest.raises(ValueError, match="schedule must be one of 'cooperative', 'pingpong', got 'fast'"):
        cu.set_sm90_kernel_variant("fast", "direct")
    with pytest.raises(ValueError, match="store must be one of 'direct', 'staged', got 'tma'"):
        cu.set_sm90_kernel_variant("cooperative", "tma")
    assert cu.sm90_kernel_variant() == ("pingpong", "staged")  # a refused call changes nothing


def test_sm90_kernel_variant_needs_the_fused_kernels():
    if INFO["fused_sm90_kernels"]:
        pytest.skip("this build has the fused sm_90a kernels: the variant can be set")
    with pytest.raises(RuntimeError, match="without CUTLASS"):
        cu.set_sm90_kernel_variant("pingpong", "staged")


# Paths with the staged store where they differ from WIDE_PROGRAMS' (the direct store's): GELU layers
# without normalisation take the fused kernel, the GELU applied on the values read back.
STAGED_PATHS = {"gelu_1024": ["sm90_fused"], "mlp_gelu_l2": ["sm90_fused", "sm90_fused"],
                "mlp_gelu": ["sm90_fused", "cublaslt"]}


def test_layer_paths_with_the_staged_store(sm90_variant_restored):
    rng = np.random.default_rng(5)
    for schedule in ("cooperative", "pingpong"):
        cu.set_sm90_kernel_variant(schedule, "staged")
        for name, (make, normalize, expected) in WIDE_PROGRAMS.items():
            op = _op(make(rng), normalize)
            assert op.layer_paths("float16", "float16", True) == STAGED_PATHS.get(name, expected), name
            assert "sm90_fused" not in op.layer_paths("float16", "float16", False), name
            assert "sm90_fused" not in op.layer_paths("float32", "float32", True), name
        # A partial GELU also runs fused (only the leading columns get it); with L2 it stays on cuBLASLt.
        assert _op([_dense(rng, 64, 64, act="gelu", width=10)]).layer_paths("bfloat16", "bfloat16", True) == [
            "sm90_fused"]
        assert _op([_dense(rng, 64, 64, act="gelu")], True).layer_paths("float16", "float16", True) == [
            "cublaslt+epilogue"]


@pytest.mark.parametrize("schedule", ["cooperative", "pingpong"])
@pytest.mark.parametrize("name", [n for n, (_, _, paths) in WIDE_PROGRAMS.items()
                                  if "sm90_fused" in paths + STAGED_PATHS.get(n, [])] + ["gelu_partial"])
@pytest.mark.parametrize("x_dtype", ["float16", "bfloat16"])
def test_every_sm90_variant_matches_float64_and_the_stores_agree_bitwise(sm90_variant_restored, x_dtype, name,
                                                                          schedule):
    # Where both stores take the same paths, the staged one only moves the direct one's values through
    # shared memory: same bits. Where GELU layers move to the fused kernel, float64 decides.
    torch = _fused_gpu()
    rng = np.random.default_rng(zlib.crc32(f"variant/{x_dtype}/{name}".encode()))
    make, normalize = ((lambda r: [_dense(r, 200, 96, act="gelu", width=77)]), False) if name == "gelu_partial" \
        else WIDE_PROGRAMS[name][:2]
    layers = make(rng)
    op = _op(layers, normalize)
    dt = getattr(torch, x_dtype)
    for n in (1, 63, 64, 65, 129, 5000, 33_333):  # pingpong tiles are 64 rows, cooperative ones 128
        x = torch.from_numpy(rng.standard_normal((n, layers[0].d_in)).astype(np.float32)).to("cuda", dt)
        outs, paths = {}, {}
        for store in ("direct", "staged"):
            cu.set_sm90_kernel_variant(schedule, store)
            paths[store] = op.layer_paths(x_dtype, x_dtype, True)
            outs[store] = torch.full((n, op.d_out), float("nan"), dtype=dt, device="cuda")
            op.apply(x.data_ptr(), x_dtype, n, outs[store].data_ptr(), x_dtype, 0, 0)
            assert not torch.isnan(outs[store]).any().item(), f"{store}, {n} rows: output elements left unwritten"
        assert "sm90_fused" in paths["staged"]
        _check(torch, layers, normalize, x, outs["staged"], x_dtype, x_dtype)
        if paths["direct"] == paths["staged"]:
            assert torch.equal(outs["direct"], outs["staged"]), f"{n} rows"
        else:
            _check(torch, layers, normalize, x, outs["direct"], x_dtype, x_dtype)


@pytest.mark.parametrize("d_out", [768, 2048, 3000])
@pytest.mark.parametrize("x_dtype", ["float16", "bfloat16"])
def test_wide_rows_normalise_after_cublaslt(x_dtype, d_out):
    # Rows wider than one fused tile: cuBLASLt writes the 16-bit output, then one in-place pass
    # normalises it (16-byte vectors held in registers up to 2048 wide, the generic kernel beyond).
    torch = _torch_cuda()
    rng = np.random.default_rng(d_out)
    layers = [_dense(rng, d_out, 256)]
    op = _op(layers, True)
    assert op.layer_paths(x_dtype, x_dtype, True) == ["cublaslt+normalize"]
    dt = getattr(torch, x_dtype)
    for n in (1, 9, 2000):
        x = torch.from_numpy(rng.standard_normal((n, 256)).astype(np.float32)).to("cuda", dt)
        out = torch.full((n, d_out), float("nan"), dtype=dt, device="cuda")
        op.apply(x.data_ptr(), x_dtype, n, out.data_ptr(), x_dtype, 0, 0)
        _check(torch, layers, True, x, out, x_dtype, x_dtype)


@pytest.mark.parametrize("name", ["l2_256", "mlp_gelu", "wide_l2", "fp32_mlp"])
def test_apply_replays_in_a_cuda_graph(name):
    # After one call on a stream (weights uploaded, scratch sized), apply enqueues no allocation and no
    # host sync, so a CUDA graph captured on that stream replays it, bit-identically, on new inputs.
    torch = _torch_cuda()
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    layers, normalize, dtype = {
        "l2_256": ([_dense(rng, 256, 256)], True, "float16"),
        "mlp_gelu": ([_dense(rng, 1024, 256, act="gelu"), _dense(rng, 256, 1024)], False, "bfloat16"),
        "wide_l2": ([_dense(rng, 768, 256)], True, "float16"),
        "fp32_mlp": ([_dense(rng, 64, 32, act="gelu", width=10), _dense(rng, 16, 64)], True, "float32"),
    }[name]
    op = _op(layers, normalize)
    dt = getattr(torch, dtype)
    n = 3000
    x = torch.randn((n, layers[0].d_in), device="cuda", dtype=dt)
    out = torch.empty((n, op.d_out), device="cuda", dtype=dt)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        op.apply(x.data_ptr(), dtype, n, out.data_ptr(), dtype, 0, stream.cuda_stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        op.apply(x.data_ptr(), dtype, n, out.data_ptr(), dtype, 0, stream.cuda_stream)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        direct = torch.empty_like(out)
        op.apply(x.data_ptr(), dtype, n, direct.data_ptr(), dtype, 0, 0)
        torch.cuda.synchronize()
        assert torch.equal(out, direct)
        _check(torch, layers, normalize, x, out, dtype, dtype)
