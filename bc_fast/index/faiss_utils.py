"""faiss plumbing shared by the legacy indexes: the import, metrics, errors, BLAS threshold, arrays.

What lives here: the lazy faiss import (``_faiss``, and ``_faiss_gpu`` for GPU builds), the metric
mapping (:func:`faiss_metric`), the short form of faiss's C++ errors (``_faiss_msg``), the
``distance_compute_blas_threshold`` helpers (:func:`blas_threshold`, :func:`blas_threshold_for`,
:func:`set_blas_threshold`), :func:`faiss_linear_transform`, and the checks every array passes before
faiss sees it (float32, finite, the right shape). Used by :mod:`.legacy`, :mod:`.sidecar` and
:mod:`.sharded`. It may import :mod:`bc_fast.engine` and ``bc_fast._util`` only; faiss is imported
inside functions, so importing this module stays light.

About ``distance_compute_blas_threshold``: in faiss 1.15 a flat search takes the
per-query SIMD loop when ``n_queries * d < distance_compute_blas_threshold``
(default 128000, i.e. fewer than 1000 queries at d=128, 500 at d=256) and one
BLAS GEMM otherwise. (With several OpenMP threads, fewer queries than threads
and >= 10000 vectors, faiss instead runs a database-parallel BLAS path whatever
the threshold.) Measured on the project's 2-vCPU box (bench/bench_index.py,
100k x 128 flat IP, one thread): the SIMD loop wins for 1 query (~2 ms vs 7 ms),
ties at 2, and BLAS wins from 3-4 queries up (2x at 4, 6-7x at 64-256). So
:class:`~bc_fast.index.LegacyIndex` searches with the threshold set to
``DEFAULT_BLAS_MIN_QUERIES * d`` (per call, restored afterwards). On an
oversubscribed machine (more runnable threads than cores) faiss's multithreaded
BLAS path spin-waits and can be slower than the SIMD loop: cap threads there.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from .._util.arrays import as_numpy

__all__ = ["faiss_linear_transform", "faiss_metric", "blas_threshold", "set_blas_threshold", "blas_threshold_for",
           "DEFAULT_BLAS_MIN_QUERIES"]

#: Query-batch size from which faiss uses BLAS for flat distances (faiss's default: 128000).
#: Query batches of at least this many rows use faiss's BLAS path; smaller ones its SIMD loop
#: (faster for 1-2 queries). BLAS is 2x faster at 4 queries and 6-7x at 64-256 (bench/bench_index.py).
DEFAULT_BLAS_MIN_QUERIES = 3

_METRICS = ("ip", "l2")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a dependency
        raise ImportError("bc_fast.index needs faiss; install faiss-cpu") from e
    return faiss


def _faiss_gpu(device: str) -> Any:
    """faiss, checked to be a GPU build that sees a GPU; RuntimeError naming the install otherwise."""
    faiss = _faiss()
    n = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    if not hasattr(faiss, "StandardGpuResources") or n == 0:
        what = ("has no GPU support" if not hasattr(faiss, "StandardGpuResources")
                else "is a GPU build but sees no GPU (faiss.get_num_gpus() == 0)")
        raise RuntimeError(f"device={device!r} builds a faiss GPU index, but this faiss "
                           f"({getattr(faiss, '__version__', '?')}) {what}; install a faiss GPU build "
                           "(pip install bc_fast[gpu], or faiss-gpu from conda-forge/pytorch) on a machine with "
                           "an NVIDIA GPU, or use device='cpu'")
    return faiss


def _open_device(device: Any) -> Any:
    """None for the CPU, else the checked :class:`bc_fast.convert.gpu.CudaDevice`."""
    from ..engine.device import open_device, parse_device

    if parse_device(device) is None:
        return None
    return open_device(device)


def _is_gpu_index(index: Any) -> bool:
    return type(index).__name__.startswith("Gpu")


def faiss_metric(metric: str) -> int:
    """The faiss metric constant for ``"ip"`` (inner product) or ``"l2"``; ValueError otherwise."""
    faiss = _faiss()
    m = metric.lower() if isinstance(metric, str) else metric
    if m not in _METRICS:
        raise ValueError(f"metric must be 'ip' (inner product) or 'l2', got {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if m == "ip" else faiss.METRIC_L2


def _faiss_msg(e: Exception) -> str:
    """The useful tail of a faiss C++ error ("Error in <signature> at <file>: Error: '<cond>' failed: <why>")."""
    text = (str(e).strip().splitlines() or [""])[0]
    for marker in ("failed: ", "Error: "):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            break
    return text[:200]


def _index_metric(index: Any) -> str | None:
    """``"ip"``/``"l2"`` read from the faiss index itself (None for any other faiss metric)."""
    faiss = _faiss()
    return {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}.get(int(index.metric_type))


def blas_threshold_for(d: int, min_queries: int | None = None) -> int:
    """The ``distance_compute_blas_threshold`` that sends batches of ``>= min_queries`` queries of
    dimension ``d`` to BLAS (faiss 1.15 compares ``n_queries * d`` with it).

    ``min_queries`` defaults to :data:`DEFAULT_BLAS_MIN_QUERIES`.
    """
    m = DEFAULT_BLAS_MIN_QUERIES if min_queries is None else int(min_queries)
    if m < 0 or int(d) < 1:
        raise ValueError(f"need d >= 1 and min_queries >= 0, got d={d}, min_queries={min_queries}")
    return m * int(d)


def set_blas_threshold(n: int) -> int:
    """Set faiss's global ``distance_compute_blas_threshold``; return the previous value.

    Use it when you search a faiss index yourself (for example the one
    :func:`export_faiss_pretransform` returns): ``set_blas_threshold(blas_threshold_for(d))``.
    """
    faiss = _faiss()
    n = int(n)
    if n < 0:
        raise ValueError(f"blas threshold must be >= 0, got {n}")
    prev = int(faiss.cvar.distance_compute_blas_threshold)
    faiss.cvar.distance_compute_blas_threshold = n
    return prev


@contextlib.contextmanager
def blas_threshold(n: int) -> Iterator[None]:
    """Context manager: run faiss calls with ``distance_compute_blas_threshold = n``, then restore it.

    faiss's setting is process-global: a search in another thread meanwhile sees it too
    (only its speed, never its results, depends on it).
    """
    prev = set_blas_threshold(n)
    try:
        yield
    finally:
        _faiss().cvar.distance_compute_blas_threshold = prev


# ----------------------------------------------------------------------------- input checks


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_table(table: Any, dim: int, name: str, version: int) -> np.ndarray:
    if not isinstance(table, np.ndarray) and not hasattr(table, "__dlpack__"):
        raise TypeError(f"{name} must be a numpy array or memmap of shape (n, {dim}), got {type(table).__name__}")
    table, _ = as_numpy(table, name, copy_from_device=True)
    if table.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, {dim}), got shape {table.shape}")
    if not np.issubdtype(table.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got dtype {table.dtype}; convert with .astype(np.float32)")
    if table.shape[1] != dim:
        raise ValueError(f"{name} has {table.shape[1]} features per row but version {version} has dim {dim}; "
                         f"pass embeddings of version {version} or set the version argument")
    return table


def _all_finite(x: np.ndarray) -> bool:
    # count_nonzero is about twice as fast as .all() on small arrays: this runs on every search
    return int(np.count_nonzero(np.isfinite(x))) == x.size


def _check_finite(block: np.ndarray, what: str, *, offset: int = 0, rows: np.ndarray | None = None) -> None:
    """Refuse NaN/Inf rows: faiss would index or search them silently and return meaningless hits.

    Row numbers in the message are ``offset + i``, or ``rows[i]`` when given.
    """
    if _all_finite(block):
        return
    bad = ~np.isfinite(block).all(axis=1)
    i = int(np.argmax(bad))
    first = int(rows[i]) if rows is not None else offset + i
    raise ValueError(f"{what}: row {first} (and {int(bad.sum()) - 1} more in this batch) holds NaN or Inf "
                     f"after the transform; clean the input (np.isfinite) or check the transform's weights")


def _as_f32(x: np.ndarray) -> np.ndarray:
    """C-contiguous float32 (float16 kept); values beyond float32 become Inf, which _check_finite reports."""
    if x.dtype not in (np.float32, np.float16):
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)
    return np.ascontiguousarray(x)


def _rows(table: np.ndarray, start: int, stop: int) -> np.ndarray:
    return _as_f32(table[start:stop])


def _rows_idx(table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return _as_f32(table[rows])


# ----------------------------------------------------------------------------- export


def faiss_linear_transform(weight: np.ndarray, bias: np.ndarray | None = None) -> Any:
    """A trained ``faiss.LinearTransform`` computing ``x @ weight.T + bias`` (weight: (d_out, d_in))."""
    faiss = _faiss()
    d_out, d_in = weight.shape
    lt = faiss.LinearTransform(int(d_in), int(d_out), True)
    faiss.copy_array_to_vector(np.ascontiguousarray(weight, np.float32).ravel(), lt.A)
    b = np.zeros(d_out, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    faiss.copy_array_to_vector(b, lt.b)
    lt.is_trained = True
    return lt
