"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest

import bc_fast


@pytest.fixture(scope="session")
def make_chain_registry() -> Callable[..., object]:
    """Factory: a registry with versions of ``dims`` and random backward transforms between them.

    ``make(path, dims, scales)``: B_1 is affine (weight and bias), later steps linear; step k's weight
    is standard normal divided by ``scales[k-1]``. Returns the registry reopened from disk.
    """
    from bc_fast.registry import Registry

    def make(path: Path, dims: Sequence[int], scales: Sequence[float], seed: int = 0) -> Registry:
        rng = np.random.default_rng(seed)
        reg = Registry.create(path)
        reg.add_version(dim=dims[0])
        for k in range(1, len(dims)):
            w = rng.standard_normal((dims[k - 1], dims[k])).astype(np.float32) / scales[k - 1]
            backward = (w, rng.standard_normal(dims[k - 1]).astype(np.float32)) if k == 1 else w
            reg.add_version(dim=dims[k], backward=backward)
        return Registry.open(path)

    return make


@pytest.fixture
def faiss_one_thread():
    """Run faiss on one thread for the test (deterministic and quiet on 2-core CI machines)."""
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is needed for index tests")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(params=bc_fast._core.usable_simd_levels())
def simd_level(request):
    """Run the test once per kernel set this CPU can run (generic, avx2, avx512), then restore the default."""
    before = bc_fast.build_info()["kernel"]
    bc_fast._core.set_simd_level(request.param)
    yield request.param
    bc_fast._core.set_simd_level(before)
