"""oneDNN as the bf16 GEMM backend: finding the library, loading it, and choosing the backend.

On Intel CPUs with AMX tile units (Sapphire Rapids and later), oneDNN's bf16 matmul runs on the tiles;
bc_fast's own bf16 kernels use AVX512-BF16 only. oneDNN is optional: ``pip install "bc-fast[onednn]"``
brings the ``onednn-cpu-gomp`` wheel (oneDNN 3.2 built against GNU OpenMP, the runtime the core uses),
which the core loads at run time; nothing is linked against it.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path

import numpy as np

from .. import _core

BF16_BACKENDS = ("auto", "native", "onednn")
BACKEND_ENV = "BC_FAST_BF16_BACKEND"
LIBRARY_ENV = "BC_FAST_ONEDNN_LIB"
DISTRIBUTION = "onednn-cpu-gomp"
INSTALL_HINT = 'pip install "bc-fast[onednn]"'


def onednn_library() -> str | None:
    """Path of the oneDNN library to load: ``$BC_FAST_ONEDNN_LIB``, else the ``onednn-cpu-gomp`` wheel's, else None."""
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        return explicit
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "libdnnl.so.3":
            return str(Path(dist.locate_file(f)).resolve())
    candidate = Path(sys.prefix) / "lib" / "libdnnl.so.3"  # the wheel's data directory
    return str(candidate) if candidate.exists() else None


@cache
def load_onednn() -> str:
    """Load oneDNN into the core once per process: ``""`` when it is loaded, else why not."""
    path = onednn_library()
    if path is None:
        return f"oneDNN is not installed ({INSTALL_HINT}, or set {LIBRARY_ENV} to a libdnnl.so.3)"
    why = _core.onednn_load(path)
    return f"{why} ({INSTALL_HINT} installs a build bc_fast can use)" if why else ""


@cache
def onednn_bf16_unavailable() -> str:
    """``""`` when oneDNN is loaded and has a bf16 matmul for this CPU, else why not (cached per process).

    oneDNN loads on any x86-64 CPU, but its bf16 matmul needs AVX-512 (``avx512_core``), AVX-NE-CONVERT or AMX:
    on an AVX2-only CPU (AMD Zen 3, for one) building the primitive fails with "unimplemented". One 16 x 16
    matmul is built to find out, so the answer is oneDNN's own, whatever its version supports.
    """
    why = load_onednn()
    if why:
        return why
    try:
        _core.FusedOp([np.eye(16, dtype=np.float32)], [None], ["none"], [16], False, "bf16", "onednn", 1)
    except RuntimeError as e:
        cpu = _core.build_info()["cpu"]
        return (f"{_core.onednn_version()} has no bf16 matmul for this CPU ({e}); oneDNN needs AVX-512 "
                f"(avx512_core), AVX-NE-CONVERT or AMX for bf16, and this CPU has: {cpu}")
    return ""


def has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 tile units (as the core's CPU check reports them)."""
    return "amx_bf16" in _core.build_info()["cpu"].split()


def requested_bf16_backend(requested: str | None = None) -> str:
    """What was asked for: ``requested``, else ``$BC_FAST_BF16_BACKEND``, else ``"auto"`` (not validated)."""
    return requested if requested is not None else os.environ.get(BACKEND_ENV) or "auto"


def resolve_bf16_backend(requested: str | None = None) -> str:
    """The bf16 GEMM backend to use: ``"native"`` or ``"onednn"``.

    ``requested`` (else ``$BC_FAST_BF16_BACKEND``, else ``"auto"``): ``"native"`` is bc_fast's own
    AVX512-BF16 kernels; ``"onednn"`` is oneDNN's matmul, RuntimeError when it cannot be loaded or has no bf16
    matmul for this CPU (:func:`onednn_bf16_unavailable`);
    ``"auto"`` is oneDNN where the CPU has AMX bf16, the core's own bf16 kernels could run (so a
    ``BC_FAST_SIMD`` below avx512 still refuses bf16) and oneDNN loads; else native (without AMX the two
    measured within a few percent of each other on AMD Zen 4, so the lighter path stays).
    """
    source = "bf16_backend" if requested is not None else BACKEND_ENV
    requested = requested_bf16_backend(requested)
    if requested not in BF16_BACKENDS:
        raise ValueError(f"{source} must be one of {BF16_BACKENDS}, got {requested!r}")
    if requested == "native":
        return "native"
    if requested == "onednn":
        why = onednn_bf16_unavailable()
        if why:
            raise RuntimeError(f"{source}='onednn' cannot run: {why}")
        return "onednn"
    # Only where the core's own bf16 kernels could run too: BC_FAST_SIMD forcing a lower level still refuses bf16.
    native_ok = not _core.bf16_unavailable_reason()
    return "onednn" if native_ok and has_amx_bf16() and not onednn_bf16_unavailable() else "native"


def onednn_status() -> str:
    """What :func:`build_info` reports: the loaded oneDNN's version and path, else where it would come from."""
    loaded = _core.onednn_version()
    if loaded:
        return loaded
    path = onednn_library()
    return f"not loaded ({path})" if path else f"not installed ({INSTALL_HINT})"
