"""Importing the compiled core, with a message that says what is wrong when it is missing."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
from collections.abc import Iterator
from contextlib import contextmanager

# The BLAS the core links (scipy-openblas32) reads its thread count from this variable (ahead of GOTO_NUM_THREADS
# and OMP_NUM_THREADS) once, as it loads.
_OPENBLAS_THREADS_ENV = "OPENBLAS_NUM_THREADS"


@contextmanager
def _core_blas_loads_single_threaded() -> Iterator[None]:
    """Load the core's OpenBLAS with no thread pool of its own, then put the environment back as it was.

    The core runs that BLAS on one thread per call and parallelises over tiles itself (it sets the count to
    1 as it loads), but OpenBLAS starts its pool before that and each pool thread then spins ~0.1 s
    looking for work: on a 2-core machine half the CPU for the first 0.1 s after ``import bc_fast``.
    numpy is imported first so that its own OpenBLAS keeps the user's settings.
    """
    import numpy  # noqa: F401

    saved = os.environ.get(_OPENBLAS_THREADS_ENV)
    os.environ[_OPENBLAS_THREADS_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_OPENBLAS_THREADS_ENV, None)
        else:
            os.environ[_OPENBLAS_THREADS_ENV] = saved


def check_core() -> None:
    """Import ``bc_fast._core``; where the package folder holds no built core, say so and how to fix it.

    Running Python inside a source checkout imports the ``bc_fast/`` source folder, which has no
    compiled core: without this check that fails as a confusing circular-import error.
    """
    try:
        with _core_blas_loads_single_threaded():
            importlib.import_module("bc_fast._core")
    except ImportError as e:
        folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        suffixes = importlib.machinery.EXTENSION_SUFFIXES
        built = any(name.startswith("_core.") and name.endswith(tuple(suffixes)) for name in os.listdir(folder))
        if built:
            raise ImportError(f"bc_fast's compiled core in {folder} failed to load: {e}") from e
        raise ImportError(
            f"bc_fast's compiled core (bc_fast._core) is not in {folder}: this looks like the source folder, "
            "not an installed bc_fast. Run Python from another directory to use the installed package, or "
            "install this checkout with: pip install -e .") from e
