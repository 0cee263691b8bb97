"""numpy's BLAS held to one thread around the small products bc_fast computes beside its core."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the block with every loaded BLAS (numpy's OpenBLAS, MKL...) on the calling thread only; restored on exit.

    OpenBLAS's worker threads busy-wait after every threaded call (~0.1 s on our 2-vCPU VMs) before they
    sleep. Fusing a chain's matrices with numpy just before a conversion therefore left a worker spinning
    on one of the cores the compiled core's GEMM was about to use: the first 3-4 chunks of a 500k-row
    conversion ran at 27-118 ms instead of 23. The products done here (fusing a chain, the float64
    reference of a few hundred verified rows) are too small to gain from threads. The libraries are looked
    up on each call (~0.2 ms), so one loaded later (faiss's, torch's) is limited too.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


__all__ = ["single_threaded_blas"]
