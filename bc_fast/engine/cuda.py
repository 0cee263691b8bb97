"""The GPU path of :class:`~bc_fast.FusedTransform`: CUDA arrays in, the compiled ``bc_fast._cuda`` module.

``FusedTransform.apply`` sends CUDA arrays here: torch CUDA tensors, objects with
``__cuda_array_interface__`` (CuPy, Numba, ...) and DLPack producers on a CUDA device. The transform
runs on the array's device and stream, zero-copy, and returns the same kind of object.

Nothing here needs a GPU to import, and ``import bc_fast`` never imports this module; ``bc_fast._cuda``
(built only with ``-DBC_FAST_CUDA=ON``), torch and CuPy are imported lazily, when an array asks for them.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._util.arrays import is_torch

__all__ = ["CudaArray", "cuda_module", "is_cuda_array", "describe_cuda_array", "empty_like_kind",
           "apply_fused", "cuda_info"]

INSTALL_HINT = ("build bc_fast with its CUDA module on a machine with the CUDA toolkit (nvcc): "
                "`pip install . -C cmake.define.BC_FAST_CUDA=ON`, and install the CUDA runtime libraries "
                "with `pip install bc_fast[cuda]`")
DTYPES = ("float32", "float16", "bfloat16")
_TYPESTRS = {"<f4": "float32", "<f2": "float16"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged
_CAI_LEGACY, _CAI_PER_THREAD = 1, 2  # __cuda_array_interface__ v3 stream codes
_PER_THREAD_STREAM = 2  # cudaStreamPerThread as a cudaStream_t

_module: Any = None
_op_lock = threading.Lock()


def _load_module() -> Any:
    """Import ``bc_fast._cuda`` once; a RuntimeError that says how to get it when that fails."""
    global _module
    if _module is None:
        try:
            _cuda = importlib.import_module("bc_fast._cuda")
        except ModuleNotFoundError as e:
            if e.name != "bc_fast._cuda":
                raise RuntimeError(f"the CUDA module bc_fast._cuda could not be imported ({e}); "
                                   f"{INSTALL_HINT}") from None
            raise RuntimeError("this bc_fast was built without its CUDA module (bc_fast._cuda), so CUDA arrays "
                               f"cannot be transformed; {INSTALL_HINT}. Or move the data to the CPU "
                               "(x.cpu() / cupy.asnumpy(x))") from None
        except ImportError as e:  # built, but a CUDA library (libcudart, libcublas) or the driver is missing
            raise RuntimeError(f"the CUDA module bc_fast._cuda is built but cannot be loaded ({e}); install the "
                               "CUDA runtime libraries with `pip install bc_fast[cuda]` and check the NVIDIA "
                               "driver (nvidia-smi)") from None
        _module = _cuda
    return _module


def cuda_module() -> Any:
    """The compiled ``bc_fast._cuda`` module, imported on first use.

    Raises
    ------
    RuntimeError
        When the module was not built or cannot be loaded; the message gives the install command.
    """
    return _load_module()


@dataclass(slots=True)
class CudaArray:
    """What the GPU path needs to know about one CUDA array.

    ``ptr`` is the device address of element 0, ``stream`` the ``cudaStream_t`` (as an int, 0 for the
    legacy default stream) the work on it must be queued on, or None when the producer did not name one.
    ``kind`` is "torch", "cai" (``__cuda_array_interface__``: CuPy and others) or "dlpack"; ``obj`` is
    the object itself (for "dlpack", the torch tensor that views it).
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: str
    device: int
    stream: int | None
    contiguous: bool
    readonly: bool
    kind: str
    obj: Any

    @property
    def nbytes(self) -> int:
        """Bytes spanned by the array (C-contiguous)."""
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.startswith("cupy")


def _dlpack_device(x: Any) -> tuple[int, int] | None:
    """``x.__dlpack_device__()`` as (type, id), or None when x has none or it fails."""
    get = getattr(x, "__dlpack_device__", None)
    if get is None:
        return None
    try:
        dev_type, dev_id = get()
        return int(dev_type), int(dev_id)
    except Exception:  # a producer whose device query fails is not usable as a CUDA array
        return None


def is_cuda_array(x: Any) -> bool:
    """True for torch CUDA tensors, ``__cuda_array_interface__`` objects and DLPack producers on CUDA.

    Never imports torch or CuPy; numpy arrays and CPU tensors give False.
    """
    if isinstance(x, np.ndarray) or x is None:
        return False
    if is_torch(x) and hasattr(x, "is_cuda"):
        return bool(x.is_cuda)
    if hasattr(type(x), "__cuda_array_interface__") or hasattr(x, "__cuda_array_interface__"):
        return True
    dev = _dlpack_device(x)
    return dev is not None and dev[0] in _DLPACK_CUDA


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(f"torch is needed here but cannot be imported ({e}); pip install torch") from None
    return torch


_torch_dtype_names: dict | None = None  # torch dtype -> name, built on the first call


def _torch_dtype_name(dtype: Any) -> str | None:
    """The name of a float32/float16/bfloat16 torch dtype, else None (torch is imported: dtype is its own)."""
    global _torch_dtype_names
    if _torch_dtype_names is None:
        torch = sys.modules["torch"]
        _torch_dtype_names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    return _torch_dtype_names.get(dtype)


def _c_contiguous(shape: tuple[int, ...], strides: Any, itemsize: int) -> bool:
    """True when byte ``strides`` (None: C order) describe a C-contiguous array of ``shape``."""
    if strides is None:
        return True
    if len(strides) != len(shape):
        return False
    if any(s == 0 for s in shape):
        return True
    expected = itemsize
    for size, stride in zip(reversed(shape), reversed(tuple(strides))):
        if size != 1 and int(stride) != expected:
            return False
        expected *= size
    return True


def _describe_torch(x: Any, name: str) -> CudaArray:
    if x.is_neg() or x.is_conj():
        raise ValueError(f"{name} is a torch negative/conjugate view; pass {name}.resolve_neg().resolve_conj()")
    if x.requires_grad:
        raise ValueError(f"{name} requires grad; the GPU path is for inference: pass {name}.detach()")
    dtype = _torch_dtype_name(x.dtype)
    if dtype is None:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}; convert it with "
                        f"{name}.float()")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be C-contiguous (row-major), got strides {tuple(x.stride())}; "
                         f"pass {name}.contiguous()")
    device = x.get_device()
    return CudaArray(x.data_ptr(), tuple(x.shape), dtype, device, _torch_stream(device), True, False, "torch", x)


_raw_stream: Any = None


def _torch_stream(device: int) -> int:
    """torch's current stream on ``device`` as a cudaStream_t int (the raw getter skips a Stream object)."""
    global _raw_stream
    if _raw_stream is None:
        torch = sys.modules["torch"]
        _raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
            lambda d: torch.cuda.current_stream(d).cuda_stream)
    return int(_raw_stream(device))


def _cai_dtype(typestr: Any, name: str) -> str:
    if typestr in _TYPESTRS:
        return _TYPESTRS[typestr]
    if typestr == "<V2" or typestr == "|V2":
        raise TypeError(f"{name} has __cuda_array_interface__ typestr {typestr!r}: a 2-byte void type, "
                        "perhaps bfloat16, which has no standard typestr in that interface, so it cannot "
                        f"be told from other 2-byte types; pass bfloat16 data as a torch tensor (or through "
                        "DLPack), or convert it to float16/float32")
    raise TypeError(f"{name} must be float32 ('<f4') or float16 ('<f2') through __cuda_array_interface__, "
                    f"got typestr {typestr!r}; convert it with {name}.astype('float32')")


def _cai_stream(d: dict, name: str) -> int | None:
    """The v3 ``stream`` entry as a cudaStream_t int, or None when the producer needs no sync."""
    stream = d.get("stream")
    if stream is None:
        return None
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"{name}.__cuda_array_interface__['stream'] must be an int or None, got {stream!r}")
    if stream == 0:
        raise ValueError(f"{name}.__cuda_array_interface__['stream'] is 0, which the interface forbids "
                         "(ambiguous); the producer should give 1 (legacy default stream), 2 (per-thread) "
                         "or a stream pointer")
    if stream == _CAI_LEGACY:
        return 0
    if stream == _CAI_PER_THREAD:
        return _PER_THREAD_STREAM
    return stream


def _pointer_device(x: Any, ptr: int, name: str) -> int:
    """The CUDA device holding ``ptr``: from CuPy itself, ``_cuda.pointer_device``, or torch."""
    if _is_cupy(x) and hasattr(x, "device"):
        return int(x.device.id)
    mod = None
    try:
        mod = cuda_module()
    except RuntimeError:
        pass
    if mod is not None and hasattr(mod, "pointer_device"):
        return int(mod.pointer_device(ptr))
    if "cupy" in sys.modules or _importable("cupy"):
        import cupy  # type: ignore[import-not-found]

        return int(cupy.cuda.runtime.pointerGetAttributes(ptr).device)
    if "torch" in sys.modules or _importable("torch"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"cannot tell which GPU holds {name} (a __cuda_array_interface__ object): torch "
                               "sees no CUDA GPU here (torch.cuda.is_available() is False); install a CUDA "
                               "build of torch, or cupy")
        return int(torch.as_tensor(x).device.index)  # torch reads the pointer's device, zero-copy
    raise RuntimeError(f"cannot tell which GPU holds {name} (a __cuda_array_interface__ object): "
                       "install torch or cupy, or pass a torch tensor")


def _cupy_stream(device: int) -> int:
    """CuPy's current stream on ``device`` (its current device when -1), as a cudaStream_t int."""
    import cupy  # type: ignore[import-not-found]

    try:
        return int(cupy.cuda.get_current_stream(device).ptr)  # per-device current streams (CuPy >= 13)
    except TypeError:
        return int(cupy.cuda.get_current_stream().ptr)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _describe_cai(x: Any, name: str) -> CudaArray:
    d = x.__cuda_array_interface__
    try:
        ptr, readonly = d["data"]
        shape = tuple(map(int, d["shape"]))
        typestr = d["typestr"]
    except (KeyError, TypeError, ValueError):
        raise TypeError(f"{name}.__cuda_array_interface__ must be a dict with 'data' (ptr, readonly), 'shape' and "
                        f"'typestr', got {d!r:.200}") from None
    if d.get("mask") is not None:
        raise ValueError(f"{name} is a masked array (__cuda_array_interface__ 'mask'), whose mask would be ignored")
    dtype = _TYPESTRS.get(typestr) or _cai_dtype(typestr, name)
    if d.get("strides") is not None and not _c_contiguous(shape, d["strides"], _ITEMSIZE[dtype]):
        raise ValueError(f"{name} must be C-contiguous (row-major), got strides {tuple(d['strides'])} for shape "
                         f"{shape}; pass a contiguous copy (cupy.ascontiguousarray({name}))")
    stream = _cai_stream(d, name)
    ptr = int(ptr or 0)
    # a size-0 CuPy array has data pointer 0, but the array itself knows its device
    device = _pointer_device(x, ptr, name) if ptr or (_is_cupy(x) and hasattr(x, "device")) else -1
    if _is_cupy(x):
        stream = _cupy_stream(device)
    return CudaArray(ptr, shape, dtype, device, stream, True, bool(readonly), "cai", x)


def _describe_dlpack(x: Any, name: str) -> CudaArray:
    try:
        import torch
    except ImportError:
        raise RuntimeError(f"{name} is a DLPack producer on a CUDA device ({type(x).__name__}); bc_fast reads "
                           "those through torch.from_dlpack, so install torch, or pass a torch tensor or an "
                           "object with __cuda_array_interface__ (CuPy)") from None
    try:
        t = torch.from_dlpack(x)
    except (TypeError, BufferError, RuntimeError) as e:
        raise TypeError(f"{name}: cannot view this DLPack producer ({type(x).__name__}) as a torch tensor: {e}") from e
    desc = _describe_torch(t, name)
    return CudaArray(desc.ptr, desc.shape, desc.dtype, desc.device, desc.stream, True, False, "dlpack", t)


def describe_cuda_array(x: Any, name: str) -> CudaArray:
    """Pointer, shape, dtype, device and stream of a CUDA array, or a clear error.

    Refuses non-contiguous arrays, dtypes other than float32/float16/bfloat16, torch tensors that
    require grad and torch negative/conjugate views. Imports torch/CuPy only for their own arrays.
    """
    if is_torch(x) and hasattr(x, "is_cuda"):
        if not x.is_cuda:
            raise ValueError(f"{name} is a torch tensor on {x.device}, not on a CUDA device")
        return _describe_torch(x, name)
    if hasattr(x, "__cuda_array_interface__"):
        return _describe_cai(x, name)
    dev = _dlpack_device(x)
    if dev is not None and dev[0] in _DLPACK_CUDA:
        return _describe_dlpack(x, name)
    raise TypeError(f"{name} is not a CUDA array (a torch CUDA tensor, an object with __cuda_array_interface__ "
                    f"such as a CuPy array, or a DLPack producer on a CUDA device), got {type(x).__name__}")


def empty_like_kind(x: CudaArray, shape: tuple[int, ...], dtype: str) -> Any:
    """A new C-contiguous array of ``shape`` and ``dtype`` of the same kind and on the same device as ``x``.

    torch (and DLPack producers): ``torch.empty``; CuPy: ``cupy.empty``. Other
    ``__cuda_array_interface__`` producers cannot be allocated here: pass ``out=``.
    """
    if x.kind in ("torch", "dlpack"):
        torch = _torch()
        device = x.obj.device if is_torch(x.obj) else torch.device("cuda", x.device)
        return torch.empty(shape, dtype=getattr(torch, dtype), device=device)
    if _is_cupy(x.obj):
        if dtype == "bfloat16":
            raise TypeError("CuPy has no bfloat16 arrays; pass out_dtype='float16' or 'float32', or use torch tensors")
        import cupy  # type: ignore[import-not-found]

        with cupy.cuda.Device(x.device):
            return cupy.empty(shape, dtype=dtype)
    raise ValueError(f"x is a {type(x.obj).__name__} (__cuda_array_interface__), for which bc_fast cannot "
                     f"allocate an output: pass out=, a C-contiguous {dtype} array of shape {shape} on the same "
                     "device")


def _dtype_name(dtype: Any, name: str) -> str:
    """A float32/float16/bfloat16 dtype (string, numpy or torch dtype) as its name; TypeError otherwise."""
    text = str(dtype)
    text = text[len("torch."):] if text.startswith("torch.") else text
    if text not in DTYPES:
        try:
            text = np.dtype(dtype).name
        except TypeError:
            pass
    if text not in DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 on the GPU, got {dtype!r}")
    return text


def _cuda_op(fused: Any) -> Any:
    """The ``_cuda.CudaFusedOp`` of a FusedTransform, built on first use and cached on it."""
    op = getattr(fused, "_cuda_op", None)
    if op is None:
        with _op_lock:
            op = getattr(fused, "_cuda_op", None)
            if op is None:
                layers = fused.layers
                op = cuda_module().CudaFusedOp(
                    [np.ascontiguousarray(l.weight, dtype=np.float32) for l in layers],
                    [None if l.bias is None else np.ascontiguousarray(l.bias, dtype=np.float32) for l in layers],
                    [l.activation for l in layers],
                    [l.d_out if l.activation_width is None else int(l.activation_width) for l in layers],
                    bool(fused.normalize))
                fused._cuda_op = op
    return op


def _check_2d(a: CudaArray, name: str, dim: int) -> None:
    if len(a.shape) != 2:
        hint = f" Reshape it with {name}.reshape(1, -1) for a single vector." if len(a.shape) == 1 else ""
        raise ValueError(f"Expected {name} to be a 2-D array (n, {dim}), got {len(a.shape)}-D array of shape "
                         f"{a.shape}.{hint}")
    if a.shape[1] != dim:
        raise ValueError(f"{name} has {a.shape[1]} features per row, expected {dim}")


def _check_out(xd: CudaArray, od: CudaArray, d_out: int, out_dtype: str | None) -> None:
    _check_2d(od, "out", d_out)
    if od.shape[0] != xd.shape[0]:
        raise ValueError(f"out has {od.shape[0]} rows but x has {xd.shape[0]}")
    if out_dtype is not None and out_dtype != od.dtype:
        raise ValueError(f"out_dtype={out_dtype} disagrees with out's dtype {od.dtype}")
    if od.readonly:
        raise ValueError("out is read-only (its __cuda_array_interface__ says so); pass a writeable array")
    if od.nbytes == 0:
        return
    if od.device != xd.device:
        raise ValueError(f"out is on CUDA device {od.device} but x is on device {xd.device}; allocate out on "
                         f"device {xd.device}")
    if xd.nbytes and od.ptr < xd.ptr + xd.nbytes and xd.ptr < od.ptr + od.nbytes:
        raise ValueError("out must not overlap x; the transform is not computed in place")
    if xd.stream is not None and od.stream is not None and xd.stream != od.stream:
        raise ValueError(f"x and out name different CUDA streams ({xd.stream:#x} and {od.stream:#x}); produce "
                         "them on one stream, or synchronise and pass arrays that need no stream")


def _apply_torch_plain(fused: Any, x: Any, out: Any) -> bool:
    """The plain call on two torch CUDA tensors straight to the core, for small-batch latency: True when
    done; False when anything is unusual (the full path then checks everything and names the problem)."""
    xt, ot = _torch_dtype_name(x.dtype), _torch_dtype_name(out.dtype)
    if xt is None or ot is None or not (x.is_cuda and out.is_cuda) or x.requires_grad or out.requires_grad:
        return False
    xs, os_ = x.shape, out.shape
    if len(xs) != 2 or len(os_) != 2 or xs[1] != fused.d_in or os_[1] != fused.d_out or os_[0] != xs[0] or not xs[0]:
        return False
    if x.is_neg() or x.is_conj() or out.is_neg() or out.is_conj() or not (x.is_contiguous() and out.is_contiguous()):
        return False
    device = x.get_device()
    xp, op = x.data_ptr(), out.data_ptr()
    if out.get_device() != device or (xp < op + out.nbytes and op < xp + x.nbytes):
        return False
    _cuda_op(fused).apply(xp, xt, xs[0], op, ot, device, _torch_stream(device), True)
    return True


def apply_fused(fused: Any, x: Any, *, out: Any = None, out_dtype: Any = None, threads: Any = None) -> Any:
    """Apply a FusedTransform to a CUDA array on its device and stream (``FusedTransform.apply`` calls this).

    Parameters
    ----------
    fused : FusedTransform
    x : CUDA array of shape (n, d_in), float32, float16 or bfloat16, C-contiguous
        A torch CUDA tensor, an object with ``__cuda_array_interface__`` (CuPy) or a DLPack producer
        on a CUDA device (read through ``torch.from_dlpack``).
    out : CUDA array of shape (n, d_out), optional
        Written in place on x's device; must not overlap x.
    out_dtype : float32, float16 or bfloat16, optional
        Default: x's dtype (unlike the CPU path, whose default is float32).
    threads : ignored on the GPU (checked like the CPU path's, for the same errors on both devices).

    Returns
    -------
    ``out`` if given, else a new array of x's kind (a torch tensor for DLPack producers) on x's device.
    The work is queued on the stream of x (torch: the current stream of x's device; CuPy: the current
    stream; other producers: their ``__cuda_array_interface__`` stream, else the legacy default stream)
    and is not waited for.
    """
    if (out is not None and out_dtype is None and threads is None and is_torch(x) and is_torch(out)
            and _apply_torch_plain(fused, x, out)):
        return out
    if threads is not None:
        from ._checks import check_threads

        check_threads(threads)
    cuda_module()  # first: without the module, the install hint is the one useful message
    if not is_cuda_array(x):
        raise ValueError(f"out is a CUDA array but x is a {type(x).__name__} on the host; both must be on the same "
                         "CUDA device (move x to the GPU, or pass a host out=)")
    if out is not None and not is_cuda_array(out):
        raise ValueError(f"x is a CUDA array but out is a {type(out).__name__} on the host; pass a CUDA out= on "
                         "x's device, or no out")
    xd = describe_cuda_array(x, "x")
    _check_2d(xd, "x", fused.d_in)
    n = xd.shape[0]
    if n and not xd.ptr:
        raise ValueError(f"x has {n} rows but a null device pointer (its __cuda_array_interface__ 'data' is 0)")
    want = None if out_dtype is None else _dtype_name(out_dtype, "out_dtype")
    if out is None:
        dtype = want or xd.dtype
        result = empty_like_kind(xd, (n, fused.d_out), dtype)
        # fresh, C-contiguous, on x's device and (torch, CuPy) allocated on x's stream: nothing to check
        ptr = result.data_ptr() if hasattr(result, "data_ptr") else int(result.data.ptr)
        od = CudaArray(ptr, (n, fused.d_out), dtype, xd.device, xd.stream, True, False, xd.kind, result)
    else:
        result = out
        od = describe_cuda_array(out, "out")
        if n and not od.ptr:
            raise ValueError("out has a null device pointer (its __cuda_array_interface__ 'data' is 0)")
        _check_out(xd, od, fused.d_out, want)
    if n == 0:
        return result
    op = _cuda_op(fused)
    stream = xd.stream if xd.stream is not None else (od.stream if od.stream is not None else 0)
    # Both devices are known here (torch's and CuPy's own, else a pointer query): the core need not ask again.
    op.apply(xd.ptr, xd.dtype, n, od.ptr, od.dtype, xd.device, stream, True)
    return result


def _version_text(v: Any) -> str:
    """A CUDA version int (13000) as "13.0"; "" when unknown."""
    try:
        v = int(v)
    except (TypeError, ValueError):
        return ""
    return f"{v // 1000}.{(v % 1000) // 10}" if v > 0 else ""


def _cublas_version_text(v: Any) -> str:
    """A cuBLAS version int (131000) as "13.1.0"; "" when unknown."""
    try:
        v = int(v)
    except (TypeError, ValueError):
        return ""
    return f"{v // 10000}.{(v // 100) % 100}.{v % 100}" if v > 0 else ""


def cuda_info() -> dict:
    """What the GPU path can do here: ``bc_fast.build_info()["cuda"]``. Never imports torch, never raises.

    Keys: ``module`` (bc_fast._cuda built and loadable), ``available`` (a usable GPU), ``devices``
    (index, name, compute_capability, total_memory), ``device_count``, ``driver_version``,
    ``runtime_version``, ``cublas_version`` (as "13.0" / "13.1.0" strings, "" when unknown),
    ``fused_sm90_kernels`` (the module holds the one-kernel-per-layer CUTLASS kernels that compute
    capability 9.0 GPUs run) and ``error`` (why not available, "" if it is).
    """
    info: dict = {"module": False, "available": False, "device_count": 0, "devices": [], "driver_version": "",
                  "runtime_version": "", "cublas_version": "", "fused_sm90_kernels": False, "error": ""}
    try:
        mod = cuda_module()
    except RuntimeError as e:
        info["error"] = str(e)
        return info
    info["module"] = True
    try:
        d = dict(mod.device_info())
        info.update(
            available=bool(d.get("available", False)), device_count=int(d.get("device_count", 0)),
            devices=[dict(dev) for dev in d.get("devices", [])],
            driver_version=_version_text(d.get("driver_version")),
            runtime_version=_version_text(d.get("runtime_version")),
            cublas_version=_cublas_version_text(d.get("cublas_version")),
            fused_sm90_kernels=bool(d.get("fused_sm90_kernels", False)), error=str(d.get("error", "")))
    except Exception as e:  # build_info must not fail because a driver misbehaves
        info["error"] = f"bc_fast._cuda.device_info() failed: {type(e).__name__}: {e}"
    return info


def cuda_summary(info: dict) -> list[str]:
    """Human-readable lines about :func:`cuda_info` for ``bc-fast info``."""
    if not info.get("module"):
        return ["CUDA: module bc_fast._cuda not built (CPU only); "
                "to build it: pip install . -C cmake.define.BC_FAST_CUDA=ON; pip install bc_fast[cuda]"]
    versions = f"runtime {info.get('runtime_version') or '?'}, driver {info.get('driver_version') or '?'}"
    if not info.get("available"):
        return [f"CUDA: module built ({versions}); no usable GPU: {info.get('error') or 'none visible'}"]
    lines = [f"CUDA: module built ({versions}), {len(info.get('devices', []))} GPU(s)"]
    for dev in info.get("devices", []):
        mem = int(dev.get("total_memory", 0)) / 2**30
        lines.append(f"CUDA:   GPU {dev.get('index')}: {dev.get('name')}, compute capability "
                     f"{dev.get('compute_capability')}, {mem:.0f} GiB")
    lines.append("CUDA:   fused one-kernel layers (compute capability 9.0): " +
                 ("built" if info.get("fused_sm90_kernels") else "not built (no CUTLASS headers at build time)"))
    return lines
