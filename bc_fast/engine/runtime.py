"""The compiled core's process-wide state: fork detection, the default thread count, build info."""

from __future__ import annotations

import sys

from .. import _core
from ._checks import MAX_THREADS, check_threads


def _forked_before_import() -> bool:
    """True in a multiprocessing child started by fork, i.e. not a fresh interpreter.

    The core's pthread_atfork handler marks forks that happen after it is loaded. A worker forked
    earlier (a DataLoader worker that imports bc_fast lazily) inherits its parent's OpenMP state,
    possibly torch's pool, whose threads did not survive the fork: it must stay single-threaded too.
    Spawned children are fresh interpreters (``--multiprocessing-fork`` on their command line), as
    is the forkserver their siblings are forked from.
    """
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return False
    try:
        parent = mp.parent_process()
    except Exception:  # an unusual multiprocessing: keep the default
        return False
    argv = getattr(sys, "orig_argv", sys.argv)  # spawn's prepare() replaces sys.argv with the parent's
    fresh = "--multiprocessing-fork" in argv or any("multiprocessing.forkserver" in a for a in argv)
    return parent is not None and not fresh


if _forked_before_import():
    _core._mark_forked_child()


def get_num_threads() -> int:
    """bc_fast's default thread count for :meth:`FusedTransform.apply`.

    The value given to :func:`set_num_threads` if it was called; else the environment
    variable ``BC_FAST_NUM_THREADS``; else the number of CPUs this process may run on
    (``os.sched_getaffinity``). It does not follow ``torch.set_num_threads`` or
    ``OMP_NUM_THREADS``. It is also the budget that concurrent ``apply`` calls from
    several Python threads share (see :meth:`FusedTransform.apply`). Raises ValueError if ``BC_FAST_NUM_THREADS`` is not an integer
    in [1, 1024].
    """
    return int(_core.get_num_threads())


def set_num_threads(n: int) -> None:
    """Set bc_fast's default thread count (an integer in [1, 1024]) for this process.

    Overrides ``BC_FAST_NUM_THREADS``; an explicit ``apply(threads=...)`` still wins.
    Results are bit-identical for every thread count.
    """
    _core.set_num_threads(check_threads(n, "n", MAX_THREADS))


def bf16_speed(cpu: str, vendor: str, available: bool, backend: str = "native") -> tuple[str, str]:
    """How ``precision="bf16"`` compares with ``"fp32"`` on a CPU: ``(verdict, why)``.

    The verdict is ``"faster"``, ``"slower"``, ``"unmeasured"`` or ``"unavailable"``; it comes from the
    fair suite's bf16 rows (``bc-fast bench --quick``) on the CPU families measured so far, never from a
    timing at run time. ``cpu`` is ``build_info()["cpu"]``, ``vendor`` its ``cpu_vendor``, ``available``
    whether the core's own bf16 kernels run here, ``backend`` the bf16 backend in use.
    """
    feats = set(cpu.split())
    if backend == "onednn" and "amx_bf16" in feats:
        return "unmeasured", ("oneDNN runs precision='bf16' on the AMX tiles here (bf16_backend='onednn'); bc_fast has "
                              "not measured that path on an AMX CPU yet: compare the bf16_* rows of bc-fast bench --quick")
    if not available:
        return "unavailable", ""
    if vendor == "GenuineIntel" and "amx_bf16" in feats:
        return "slower", ("on Intel CPUs with AMX (Sapphire Rapids and later) precision='bf16' measured slower "
                          "than 'fp32' (199-220 vs 283-318 GFLOP/s, 2 vCPUs): bc_fast's bf16 GEMM uses "
                          "AVX512-BF16, not the AMX tiles; install oneDNN (pip install \"bc-fast[onednn]\"), whose "
                          "AMX kernels bf16_backend='auto' then picks, or use precision='fp32'")
    if vendor == "AuthenticAMD":
        return "faster", "measured 1.7-1.8x the fp32 rows/s on AMD Zen 4 (bc-fast bench --quick, bf16_* rows)"
    return "unmeasured", ("no measurement on this CPU family yet; compare the bf16_* rows of bc-fast bench --quick "
                          "before relying on it")


def build_info() -> dict:
    """How the compiled core was built and what it chose at run time.

    Keys: ``kernel`` (SIMD level picked after the CPU check), ``cpu`` (features
    found), ``blas`` (library and its core), ``openmp``, ``max_threads`` (the default
    thread count, :func:`get_num_threads`), ``cpus`` (CPUs this process may run on),
    ``blas_threads`` (the BLAS library's own thread setting, which the core keeps at 1:
    it parallelises over row tiles itself), ``forked_child`` (True in a process forked
    from one that had loaded the core: it runs single-threaded), ``small_batch_rows``
    (largest batch served by the single-thread path), ``compiler``, ``bf16`` (True where
    ``precision="bf16"`` can run now) and ``bf16_unavailable`` (why not, else ""), ``bf16_vs_fp32`` and
    ``bf16_vs_fp32_why`` (whether bf16 is faster than fp32 here: :func:`bf16_speed`), ``bf16_backend``
    (what ``bf16_backend="auto"`` picks here; on a CPU with AMX this loads oneDNN), ``onednn`` (the loaded oneDNN,
    or where it would come from), ``cpu_vendor``, ``cuda`` (the GPU path:
    :func:`bc_fast.engine.cuda.cuda_info`; whether ``bc_fast._cuda`` is built, the GPUs, driver and
    runtime versions; it never imports torch). Where ``bc_fast._cuda`` is built, asking for the
    GPUs initialises the CUDA runtime in this process, like any CUDA call: a process that will
    fork CUDA workers afterwards should not call it first.
    """
    from .cuda import cuda_info
    from .onednn import onednn_status, resolve_bf16_backend

    info = dict(_core.build_info())
    try:
        info["bf16_backend"] = resolve_bf16_backend()
    except (ValueError, RuntimeError) as e:
        info["bf16_backend"] = f"error: {e}"
    info["onednn"] = onednn_status()
    info["bf16_vs_fp32"], info["bf16_vs_fp32_why"] = bf16_speed(info["cpu"], info["cpu_vendor"], info["bf16"],
                                                                info["bf16_backend"])
    info["cuda"] = cuda_info()
    return info
