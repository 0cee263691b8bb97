"""GPU table conversion: the compute step of :mod:`bc_fast.convert` on a CUDA device.

Everything else (readers, writers, the journal, resume, verification, the sidecar,
publishing) is :mod:`bc_fast.convert`'s, unchanged; this module only replaces the
pipeline that turns input chunks into output chunks.

How a run works, with ``depth`` slots (default 4), each a pinned host input buffer, a
pinned host output buffer and one device buffer of each:

- a reader thread ``pread``-s chunk i straight into pinned slot ``i % depth`` (after the
  host->device copy of chunk ``i - depth`` has left that slot: an event);
- the main thread enqueues, without waiting, the host->device copy on the copy-in
  stream, the fused operator on the compute stream (after an event of that copy), and
  the device->host copy on the copy-out stream (after an event of the compute);
- a writer thread waits for the device->host event of its chunk, then writes and
  journals it exactly as the CPU path does.

So reading, both copies, compute and writing of different chunks overlap; host memory
is bounded by ``depth`` input and output chunks. All device work is ordered by
events, never by a device-wide synchronisation.

Precision (the documented tolerance): a float32 table is computed with float32 GEMMs
(cuBLAS, float32 accumulation, no TF32), so the CPU path's tolerance holds. A float16
table is computed with float16 tensor-core GEMMs with float32 accumulation: weights and
each layer's input are rounded to float16 on the device, where the CPU path computes
in float32 throughout. :func:`gpu_verify_tol` adds ``4 * L * 2^-11`` (L fused layers)
to the CPU tolerance for that (``2^-8`` for a bfloat16 table, on bf16 GEMMs). Outputs differ from the CPU
path's bytes within it.

The CUDA calls go through the ``bc_fast._cuda`` module's small API (pinned and device
buffers, streams, events, async copies, ``CudaFusedOp``); the tests pass a fake
module with the same API that executes queued work lazily on the CPU.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from .._util.arrays import is_bfloat16
from ..engine import FusedTransform
from ..engine.device import CudaDevice, cuda_fused_op
# The device half moved to bc_fast.engine.device; importable from here as under the old bc_fast.convert_gpu path.
from ..engine.device import DeviceTransform, open_device, parse_device  # noqa: F401
from ..store.tables import Chunk, TableReader

__all__ = ["gpu_verify_tol", "gpu_pipeline", "DEFAULT_DEPTH"]

#: Pipeline slots: chunks in flight between the reader and the writer.
DEFAULT_DEPTH = 4
_U16 = 2.0 ** -11



def gpu_verify_tol(cpu_tol: float, n_layers: int, in_dtype: Any) -> float:
    """The verification tolerance of a GPU run: the CPU path's, plus ``4 * L * 2^-11`` for a float16
    table (each of the L layers rounds its weights and its input to float16: two roundings of at
    most 2^-11 each per element, counted twice), and ``4 * L * 2^-8`` for a bfloat16 table (bf16 GEMMs,
    the same with bf16's rounding)."""
    dt = np.dtype(in_dtype)
    if dt == np.float16:
        return float(cpu_tol + 4.0 * max(int(n_layers), 1) * _U16)
    if is_bfloat16(dt):
        return float(cpu_tol + 4.0 * max(int(n_layers), 1) * 2.0**-8)
    return float(cpu_tol)


def _host_view(buf: Any, nbytes: int) -> np.ndarray:
    """A writeable uint8 numpy view of a pinned buffer (its buffer protocol, else its pointer)."""
    try:
        v = np.frombuffer(buf, np.uint8)
        if v.flags.writeable and v.size >= nbytes:
            return v[:nbytes]
    except (TypeError, ValueError, BufferError):
        pass
    return np.frombuffer((ctypes.c_char * nbytes).from_address(int(buf.ptr)), np.uint8)


class _Slots:
    """``depth`` sets of pinned host buffers, device buffers and events, and the three streams."""

    def __init__(self, dev: CudaDevice, depth: int, rows: int, dim_in: int, in_dtype: np.dtype,
                 dim_out: int, out_dtype: np.dtype) -> None:
        m, d = dev.module, dev.index
        in_bytes, out_bytes = rows * dim_in * in_dtype.itemsize, rows * dim_out * out_dtype.itemsize
        self.pin_in = [m.PinnedBuffer(in_bytes) for _ in range(depth)]
        self.pin_out = [m.PinnedBuffer(out_bytes) for _ in range(depth)]
        self.x = [_host_view(b, in_bytes).view(in_dtype).reshape(rows, dim_in) for b in self.pin_in]
        self.y = [_host_view(b, out_bytes).view(out_dtype).reshape(rows, dim_out) for b in self.pin_out]
        self.dev_in = [m.DeviceBuffer(in_bytes, d) for _ in range(depth)]
        self.dev_out = [m.DeviceBuffer(out_bytes, d) for _ in range(depth)]
        self.copy_in, self.compute, self.copy_out = m.Stream(d), m.Stream(d), m.Stream(d)
        self.copied_in = [m.Event(d) for _ in range(depth)]
        self.computed = [m.Event(d) for _ in range(depth)]
        self.copied_out = [m.Event(d) for _ in range(depth)]

    def synchronize(self) -> None:
        """Wait for all queued work (on the error path: errors here are dropped, the first one counts)."""
        for s in (self.copy_in, self.compute, self.copy_out):
            try:
                s.synchronize()
            except Exception:  # noqa: BLE001 - an earlier error is already being raised
                pass


def gpu_pipeline(op: FusedTransform, reader: TableReader, chunks: list[Chunk], start: int, *,
                 out_dtype: np.dtype, dev: CudaDevice, sink: Callable[..., None],
                 depth: int = DEFAULT_DEPTH,
                 pick: Callable[[Chunk, np.ndarray], np.ndarray | None] | None = None) -> None:
    """Convert ``chunks[start:]`` on ``dev``; ``sink(chunk, y, extra[, x_sample])`` writes and journals each
    chunk in order on a writer thread (``y`` is a view of a pinned buffer, valid during the call).
    ``pick(chunk, x)``, if given, copies the input rows the writer needs beside ``y`` (the verified sample)."""
    todo = chunks[start:]
    if not todo:
        return
    m = dev.module
    depth = max(2, min(int(depth), len(todo)))
    in_dtype, out_dtype = np.dtype(reader.dtype), np.dtype(out_dtype)
    cop = cuda_fused_op(m, op)
    sl = _Slots(dev, depth, max(c.rows for c in todo), reader.dim, in_dtype, op.d_out, out_dtype)

    def read(i: int) -> tuple[Any, np.ndarray | None]:
        s = i % depth
        if i >= depth:
            sl.copied_in[s].synchronize()  # chunk i - depth has left this pinned buffer
        buf = sl.x[s][: todo[i].rows]
        x, extra = reader.read(todo[i], buf)
        if not np.shares_memory(x, buf):  # Parquet decodes into its own array
            np.copyto(buf, x)
        return extra, (pick(todo[i], buf) if pick is not None else None)

    def write(i: int, extra: Any, sample: np.ndarray | None) -> None:
        s = i % depth
        sl.copied_out[s].synchronize()
        if sample is None:
            sink(todo[i], sl.y[s][: todo[i].rows], extra)
        else:
            sink(todo[i], sl.y[s][: todo[i].rows], extra, sample)

    with ThreadPoolExecutor(1, "bcfast-read") as rpool, ThreadPoolExecutor(1, "bcfast-write") as wpool:
        reads: dict[int, Future] = {i: rpool.submit(read, i) for i in range(min(depth, len(todo)))}
        writes: list[Future] = []
        try:
            for i, chunk in enumerate(todo):
                s, n = i % depth, chunk.rows
                extra, sample = reads.pop(i).result()
                if i >= depth:  # the device input buffer is free once chunk i - depth was computed
                    m.stream_wait_event(sl.copy_in.ptr, sl.computed[s])
                m.memcpy_async(sl.dev_in[s].ptr, sl.pin_in[s].ptr, n * reader.dim * in_dtype.itemsize, "h2d",
                               sl.copy_in.ptr)
                sl.copied_in[s].record(sl.copy_in.ptr)
                if i + depth < len(todo):
                    reads[i + depth] = rpool.submit(read, i + depth)
                m.stream_wait_event(sl.compute.ptr, sl.copied_in[s])
                if i >= depth:  # the device output buffer is free once chunk i - depth was copied out
                    m.stream_wait_event(sl.compute.ptr, sl.copied_out[s])
                cop.apply(sl.dev_in[s].ptr, in_dtype.name, n, sl.dev_out[s].ptr, out_dtype.name, dev.index,
                          sl.compute.ptr, True)  # our own device buffers
                sl.computed[s].record(sl.compute.ptr)
                if i >= depth:
                    writes[i - depth].result()  # the pinned output buffer is free once its chunk is written
                m.stream_wait_event(sl.copy_out.ptr, sl.computed[s])
                m.memcpy_async(sl.pin_out[s].ptr, sl.dev_out[s].ptr, n * op.d_out * out_dtype.itemsize, "d2h",
                               sl.copy_out.ptr)
                sl.copied_out[s].record(sl.copy_out.ptr)
                writes.append(wpool.submit(write, i, extra, sample))
            for w in writes[-depth:]:
                w.result()
        except BaseException:
            for f in [*writes, *reads.values()]:
                f.cancel()
            sl.synchronize()  # no copy may still target a buffer that is about to be freed
            raise
