"""CUDA devices for the pipelines: parse ``device=``, check the GPU, and apply an operator to host rows there.

:class:`DeviceTransform` copies numpy rows to a GPU, runs the fused operator and copies the result
back (legacy-index builds and query batches); :func:`open_device` checks a device before any work.
The CUDA calls go through the ``bc_fast._cuda`` module (see :mod:`bc_fast.engine.cuda`).
"""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np

from .._util.arrays import is_bfloat16
from .operator import FusedTransform

__all__ = ["parse_device", "CudaDevice", "open_device", "cuda_fused_op", "DeviceTransform"]

_DEVICE_RE = re.compile(r"cuda(?::(\d{1,6}))?")
_INSTALL = ("build bc_fast with its CUDA module: pip install . -C cmake.define.BC_FAST_CUDA=ON "
            "(and pip install bc_fast[cuda] for the CUDA runtime libraries)")


def parse_device(device: Any) -> int | None:
    """None for ``"cpu"``, the GPU index for ``"cuda"`` (0) or ``"cuda:N"``.

    Also accepts a ``torch.device``. Raises ValueError for anything else.
    """
    if device is None:
        return None
    text = str(device) if type(device).__module__.startswith("torch") else device
    if isinstance(text, str):
        if text == "cpu":
            return None
        m = _DEVICE_RE.fullmatch(text)
        if m:
            return int(m.group(1) or 0)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (N = GPU index), got {device!r}")


def _cuda_module() -> Any:
    """The ``bc_fast._cuda`` extension, or RuntimeError saying how to build it."""
    try:
        from .cuda import cuda_module
    except ImportError:  # the dispatch module is missing: load the extension directly
        try:
            from .. import _cuda  # type: ignore[attr-defined]
        except ImportError as e:
            raise RuntimeError(f"device='cuda' needs bc_fast's CUDA module (bc_fast._cuda), which is not "
                               f"installed; {_INSTALL}") from e
        return _cuda
    return cuda_module()


class CudaDevice:
    """One CUDA device, checked to exist, and the module that drives it."""

    def __init__(self, module: Any, index: int) -> None:
        self.module = module
        self.index = int(index)
        info = dict(module.device_info())
        if not info.get("available"):
            why = info.get("error") or "no device found"
            raise RuntimeError(f"device='cuda:{index}': no CUDA GPU visible ({why}); "
                               "run on a machine with an NVIDIA GPU and driver, or use device='cpu'")
        count = int(info.get("device_count", 0))
        if not 0 <= self.index < count:
            raise ValueError(f"device='cuda:{index}' is out of range: this machine has {count} CUDA GPU(s) "
                             f"(cuda:0 to cuda:{count - 1}); pick one of them")
        devices = info.get("devices") or []
        self.properties = dict(devices[self.index]) if self.index < len(devices) else {}

    @property
    def name(self) -> str:
        """``cuda:N``."""
        return f"cuda:{self.index}"

    def describe(self, in_dtype: np.dtype) -> dict:
        """The device and the arithmetic it uses, for the sidecar."""
        return {"type": "cuda", "index": self.index, "name": self.properties.get("name"),
                "compute_capability": self.properties.get("compute_capability"), "compute": _compute(in_dtype)}


def _compute(in_dtype: np.dtype) -> str:
    """The GEMM arithmetic the CUDA module uses for a table of ``in_dtype`` (csrc/cuda/fused_op_cuda.cu)."""
    dt = np.dtype(in_dtype)
    half = "float16" if dt == np.float16 else "bfloat16" if is_bfloat16(dt) else None
    if half is None:
        return "float32 GEMMs, float32 accumulation, no TF32"
    return f"{half} tensor-core GEMMs, float32 accumulation (weights rounded to {half})"


def open_device(device: Any) -> CudaDevice | None:
    """None for the CPU, else the checked :class:`CudaDevice` (clear errors before any work)."""
    index = parse_device(device)
    if index is None:
        return None
    return CudaDevice(_cuda_module(), index)


def cuda_fused_op(module: Any, op: FusedTransform) -> Any:
    """The CUDA module's compiled operator for ``op``'s layer program."""
    return module.CudaFusedOp([l.weight for l in op.layers], [l.bias for l in op.layers],
                              [l.activation for l in op.layers],
                              [l.d_out if l.activation_width is None else l.activation_width for l in op.layers],
                              op.normalize)


class DeviceTransform:
    """Apply a :class:`~bc_fast.FusedTransform` to host (numpy) rows on a GPU: copy in, compute, copy
    out on one stream of its own, then wait. Device buffers are kept and grown as needed; calls are
    serialised by a lock. Used for legacy-index builds and query batches (:mod:`bc_fast.index`)."""

    def __init__(self, op: FusedTransform, dev: CudaDevice) -> None:
        self.op, self.dev = op, dev
        self._cop = cuda_fused_op(dev.module, op)
        self._stream = dev.module.Stream(dev.index)
        self._bufs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _buffer(self, which: str, nbytes: int) -> Any:
        b = self._bufs.get(which)
        if b is None or b.nbytes < nbytes:
            self._bufs.pop(which, None)  # free the old one first
            b = self._bufs[which] = self.dev.module.DeviceBuffer(nbytes, self.dev.index)
        return b

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``op(x)`` computed on the GPU into ``out`` (float32 (n, d_out) by default), returned."""
        x = np.ascontiguousarray(x)
        if x.dtype not in (np.float32, np.float16) or x.ndim != 2 or x.shape[1] != self.op.d_in:
            raise ValueError(f"expected float32/float16 rows of shape (n, {self.op.d_in}), got {x.dtype} "
                             f"{x.shape}")
        n = x.shape[0]
        if out is None:
            out = np.empty((n, self.op.d_out), np.float32)
        if out.shape != (n, self.op.d_out) or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writeable C-contiguous ({n}, {self.op.d_out}) array")
        if n == 0:
            return out
        m, s = self.dev.module, self._stream
        with self._lock:
            d_x, d_y = self._buffer("in", x.nbytes), self._buffer("out", out.nbytes)
            m.memcpy_async(d_x.ptr, x.ctypes.data, x.nbytes, "h2d", s.ptr)
            self._cop.apply(d_x.ptr, x.dtype.name, n, d_y.ptr, out.dtype.name, self.dev.index, s.ptr, True)  # ours
            m.memcpy_async(out.ctypes.data, d_y.ptr, out.nbytes, "d2h", s.ptr)
            s.synchronize()
        return out
