"""Machine facts and the engines compared against, for the benchmark harness.

What lives here: the optional engines (:func:`import_torch`, :func:`import_faiss`, numpy's own BLAS
found by threadpoolctl) and :func:`engines`, which runs them all with one thread count; the machine
facts every report starts with (:func:`cpu_model`, :func:`cpu_flags`, :func:`threadpools`,
:func:`machine_info`, :func:`machine_lines`). :mod:`bc_fast.bench.harness` re-exports every name. It
imports numpy and threadpoolctl (torch and faiss when asked for), and :mod:`bc_fast.engine` for the
core's build facts.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Engines", "cpu_flags", "cpu_model", "engines", "import_faiss", "import_torch", "machine_info",
           "machine_lines", "numpy_blas_threads", "threadpools"]


# --------------------------------------------------------------------------- optional engines


def import_torch() -> tuple[Any, Any]:
    """``(torch, torch.nn.functional)``, or ``(None, None)`` when torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, None
    return torch, F


def import_faiss() -> Any:
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _numpy_blas() -> Any:
    """threadpoolctl's controller for numpy's own BLAS (not bc_fast's or faiss's), or None."""
    from threadpoolctl import ThreadpoolController

    np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # make sure it is loaded
    ctl = ThreadpoolController().select(user_api="blas")
    paths = [c.filepath for c in ctl.lib_controllers if "numpy" in c.filepath]
    return ctl.select(filepath=paths) if paths else None


def numpy_blas_threads() -> int | None:
    """Thread count of numpy's own BLAS (None if threadpoolctl does not find it)."""
    ctl = _numpy_blas()
    return ctl.lib_controllers[0].num_threads if ctl is not None else None


@dataclass
class Engines:
    """The optional engines and the thread count they all run with."""

    threads: int
    torch: Any
    F: Any
    faiss: Any
    numpy_blas_threads: int | None
    notes: list[str]


@contextlib.contextmanager
def engines(threads: int) -> Iterator[Engines]:
    """Run torch, faiss and numpy's BLAS with ``threads`` threads (torch in inference mode); restore after.

    bc_fast's own BLAS is left alone: the core drives it itself. bc_fast's threads are
    passed to each ``apply(threads=...)`` by the configs.
    """
    torch, F = import_torch()
    faiss = import_faiss()
    notes = [f"{name} not installed: its columns are skipped" for name, mod in (("torch", torch), ("faiss", faiss))
             if mod is None]
    blas = _numpy_blas()
    if blas is None:
        notes.append("numpy's BLAS not found by threadpoolctl: its thread count was not set")
    with contextlib.ExitStack() as stack:
        if blas is not None:
            stack.enter_context(blas.limit(limits=threads))
        if torch is not None:
            prev_torch = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, prev_torch)
            stack.enter_context(torch.inference_mode())
        if faiss is not None:
            prev_faiss = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(threads)
            stack.callback(faiss.omp_set_num_threads, prev_faiss)
        yield Engines(threads, torch, F, faiss, numpy_blas_threads(), notes)


# --------------------------------------------------------------------------- machine

def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted: Iterable[str] = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni",
                                       "amx_tile", "amx_bf16")) -> list[str]:
    """Those of ``wanted`` the CPU has (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def threadpools() -> list[dict[str, Any]]:
    """Every BLAS and OpenMP runtime loaded in this process (threadpoolctl).

    One dict each: ``library`` (parent folder/file name), ``user_api``, ``internal_api``,
    ``version``, ``num_threads`` and, where threadpoolctl knows it, ``core`` (the BLAS
    kernel it picked, e.g. Haswell, SkylakeX, Zen).
    """
    from threadpoolctl import threadpool_info

    pools = []
    for p in threadpool_info():
        path = p.get("filepath") or ""
        pools.append({"library": f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}",
                      "user_api": p.get("user_api"), "internal_api": p.get("internal_api"),
                      "version": p.get("version"), "num_threads": p.get("num_threads"),
                      "core": p.get("architecture")})
    return pools


def machine_info(extra: dict | None = None) -> dict[str, Any]:
    """Machine, library versions, bc_fast's core, every thread pool's library/version/threads/kernel."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": " ".join(cpu_flags()),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    try:
        from .. import __version__
        from .. import _core
        from ..engine import build_info
        info["bc_fast"] = __version__
        info["bc_fast_build_info"] = build_info()
        info["bc_fast_core"] = (f"{os.path.basename(_core.__file__)} built "
                                f"{time.ctime(os.path.getmtime(_core.__file__))}")
    except Exception as e:  # noqa: BLE001 - report, don't fail
        info["bc_fast_build_info"] = f"unavailable: {e}"
    torch, _ = import_torch()
    info["torch"] = torch.__version__ if torch is not None else None
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    faiss = import_faiss()
    info["faiss"] = faiss.__version__ if faiss is not None else None
    if faiss is not None:
        info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    info["threadpools"] = threadpools()
    info["openblas"] = {p["library"]: f"{p['num_threads']} threads, core={p['core'] or ''}"
                        for p in info["threadpools"] if p["internal_api"] == "openblas"}
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith(("OMP_", "OPENBLAS_", "MKL_", "GOMP_", "KMP_"))}
    if extra:
        info.update(extra)
    return info


def machine_lines(info: dict) -> list[str]:
    """Comment lines naming the CPU, load, versions, threads and the bc_fast core's kernel."""
    bi = info.get("bc_fast_build_info")
    kernel = bi.get("kernel") if isinstance(bi, dict) else "?"
    if isinstance(bi, dict):
        kernel += f", bf16 backend={bi.get('bf16_backend')} ({bi.get('onednn')})"
    return [f"# machine: {info['cpu_model']}, {info['cpu_count']} cpus, flags {info['cpu_flags']}, "
            f"loadavg {info['loadavg']}; python {info['python']}, numpy {info['numpy']}, "
            f"torch {info['torch']}, faiss {info['faiss']}",
            f"# bc_fast {info.get('bc_fast')} kernel={kernel}; threads={info.get('bench_threads')} for bc_fast, "
            f"numpy BLAS ({info.get('numpy_blas_threads')}), torch, faiss; blas "
            + "; ".join(f"{k}: {v}" for k, v in info["openblas"].items())]

