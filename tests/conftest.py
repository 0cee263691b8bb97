"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
    from bc_fast.store.registry import Registry

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


@pytest.fixture(scope="session")
def run_python() -> Callable[..., subprocess.CompletedProcess]:
    """Runner: ``run(script, *args, cwd=, timeout=, env=None)`` runs ``python -c script`` in its own process group.

    stdout and stderr come back together in ``.stdout``; on timeout the whole group (forked children
    too) is killed and the test fails with the output's tail. ``cwd`` must lie outside the source
    tree so that the installed package, not the source ``bc_fast/``, is imported.
    """

    def run(script: str, *args: str, cwd: str | Path, timeout: float,
            env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=cwd,
                                env={**os.environ, **(env or {})})
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"the process hung for {timeout}s: {out[-2000:]}")
        return subprocess.CompletedProcess(args, proc.returncode, out, None)

    return run


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


_KILL_SCRIPT = """
import sys, time
from bc_fast.store import tables
from bc_fast.cli import main
cls = getattr(tables, sys.argv[1])
orig = cls.write
def slow(self, chunk, y, extra):
    orig(self, chunk, y, extra)
    time.sleep(float(sys.argv[2]))
cls.write = slow
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="session")
def kill_convert_midway() -> Callable[..., None]:
    """``kill(cli_args, journal, *, writer, after_chunks, cwd, delay=0.03, timeout=120)``: run ``bc-fast``
    with ``cli_args`` (a ``convert``) in a child whose ``tables.<writer>.write`` sleeps ``delay`` s per chunk,
    and SIGKILL it once its ``journal`` records ``after_chunks`` chunks done (the test fails if it ends first).
    ``cwd`` must lie outside the source tree, so the child imports the installed package."""

    def kill(cli_args: Sequence[str], journal: str | Path, *, writer: str, after_chunks: int, cwd: str | Path,
             delay: float = 0.03, timeout: float = 120) -> None:
        import json
        import time

        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, writer, str(delay), *cli_args],
                                stderr=subprocess.PIPE, cwd=cwd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(Path(journal).read_text())["done_chunks"] >= after_chunks:
                    break
            except (ValueError, OSError, KeyError):
                pass
            time.sleep(0.02)
        if proc.poll() is not None:
            err = proc.stderr.read().decode()
            proc.stderr.close()
            pytest.fail(f"the conversion ended before it could be killed: {err}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

    return kill
