"""Streaming fits: pair sets larger than memory, one chunk at a time (closed-form kinds, and the local
kind in two passes over re-iterable chunks)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import check_int
from ._gram import accumulate_pairs

STREAMING_KINDS = ("auto", "ridge", "procrustes", "lowrank", "local")
#: Parameters of the two-pass local fit (:meth:`~bc_fast.fit.LocalAdapter.fit_chunks`), not of the adapter.
LOCAL_STREAM_PARAMS = ("sample_rows", "val_rows")


def make_closed_form(kind: str, **params: Any) -> Any:
    """A closed-form adapter (or an AutoAdapter restricted to closed-form kinds) by name."""
    from ._auto import AutoAdapter, make_adapter

    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string, one of {STREAMING_KINDS}, got {type(kind).__name__}")
    if kind not in STREAMING_KINDS:
        raise ValueError(f"kind={kind!r} cannot be fitted by streaming; choose one of {STREAMING_KINDS} "
                         "(the mlp kind needs the pairs in memory: use fit_adapter(X_src, X_dst, kind='mlp'))")
    if kind == "auto":
        params.setdefault("kinds", ("ridge", "procrustes", "lowrank"))
        return AutoAdapter(**params)
    return make_adapter(kind, **params)


def _split_local_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """Take the two-pass local fit's own parameters out of ``params`` (refused for other kinds)."""
    stream = {name: params.pop(name) for name in LOCAL_STREAM_PARAMS if name in params}
    if stream and kind != "local":
        raise ValueError(f"{sorted(stream)} apply to kind='local' only (the sample of its two-pass fit), "
                         f"not kind={kind!r}")
    return stream


def fit_streaming(pairs: Any, kind: str = "ridge", **params: Any) -> Any:
    """Fit a closed-form adapter from an iterable of chunks ``(X_src_chunk, X_dst_chunk)``.

    Only the float64 sums of :mod:`bc_fast.fit._gram` are kept (O(d^2) memory, never the pairs).
    The validation split hashes the global row index, so the result equals the in-memory fit of
    the concatenated chunks (up to float64 rounding of the sums).

    ``kind="local"`` reads the pairs twice (:meth:`~bc_fast.fit.LocalAdapter.fit_chunks`): ``pairs``
    must then be a callable returning a fresh iterable of chunks, or a list of chunks (a generator is
    refused), and ``sample_rows`` / ``val_rows`` set its bounded samples (O(k d^2 + sample) memory).

    Parameters
    ----------
    pairs : iterable of (ndarray (m, d_src), ndarray (m, d_dst)); for "local" a callable returning one
    kind : {"ridge", "procrustes", "lowrank", "auto", "local"}
    **params : the adapter's parameters (alpha, rank, val_fraction, random_state, ...)
    """
    t0 = time.perf_counter()
    params = dict(params)
    stream = _split_local_params(kind, params)
    est = make_closed_form(kind, **params)
    if kind == "local":
        return est.fit_chunks(pairs, **stream)
    stats = accumulate_pairs(pairs, val_fraction=est.val_fraction, random_state=est.random_state)
    est.fit_stats(stats)
    est.fit_time_s_ = time.perf_counter() - t0
    return est


def open_npy(path: str | os.PathLike, name: str) -> np.ndarray:
    """A 2-D .npy file memory-mapped read-only (never unpickled).

    Raises FileNotFoundError for a missing file, ValueError (naming the file) for one numpy cannot
    read as a plain array (empty, truncated, pickled, unreadable) or not 2-D, TypeError for a non-numeric dtype.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name}: no such file {p}")
    try:
        a = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:  # EOFError: an empty file; OSError: unreadable
        raise ValueError(f"{name}: {p} is not a plain numeric .npy array ({type(e).__name__}: {e}); save it with "
                         "np.save(path, array.astype(np.float32))") from e
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: {p} holds an archive (.npz?), expected one 2-D .npy array")  # noqa: TRY004 (a bad file)
    if a.ndim != 2:
        raise ValueError(f"{name}: {p} holds an array of shape {a.shape}; expected 2-D (n_pairs, dim)")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name}: {p} holds dtype {a.dtype}; expected float32/float64 embeddings")
    return a


def npy_pair_chunks(src_path: str | os.PathLike, dst_path: str | os.PathLike,
                    chunk_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Row chunks of two memory-mapped .npy files of paired embeddings (rows checked to match)."""
    chunk_rows = check_int(chunk_rows, "chunk_rows", 1)
    xs, ys = open_npy(src_path, "SRC"), open_npy(dst_path, "DST")
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"{src_path} has {xs.shape[0]} rows but {dst_path} has {ys.shape[0]}: the files must hold "
                         "the same items in the same order")
    for s in range(0, xs.shape[0], chunk_rows):
        yield np.asarray(xs[s:s + chunk_rows]), np.asarray(ys[s:s + chunk_rows])


def fit_streaming_npy(src_path: str | os.PathLike, dst_path: str | os.PathLike, *, kind: str = "ridge",
                      chunk_rows: int = 65536, **params: Any) -> Any:
    """:func:`fit_streaming` over two .npy files read with mmap, ``chunk_rows`` rows at a time
    (``kind="local"``: two passes over the files, see :meth:`~bc_fast.fit.LocalAdapter.fit_chunks`)."""
    params = dict(params)
    stream = _split_local_params(kind, params)
    make_closed_form(kind, **params)  # refuse a bad kind or parameter before opening the files
    check_int(chunk_rows, "chunk_rows", 1)
    src, dst = open_npy(src_path, "SRC"), open_npy(dst_path, "DST")  # refuse bad or mismatched files up front
    if src.shape[0] != dst.shape[0]:
        raise ValueError(f"{src_path} has {src.shape[0]} rows but {dst_path} has {dst.shape[0]}: the files must "
                         "hold the same items in the same order")
    del src, dst
    if kind == "local":
        return fit_streaming(lambda: npy_pair_chunks(src_path, dst_path, chunk_rows), kind=kind, **params, **stream)
    return fit_streaming(npy_pair_chunks(src_path, dst_path, chunk_rows), kind=kind, **params)
