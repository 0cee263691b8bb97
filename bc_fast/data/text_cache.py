"""An embedding cache outside the repository: compute a model's embeddings of a corpus once, reuse them.

One entry per (model, package version, encoder config, corpus fingerprint): ``<model>-<key>.npy``
(float32, written with ``allow_pickle=False``) and a JSON sidecar ``<model>-<key>.json`` holding the
key fields, the shape and the sha256 of the ``.npy`` file. Both are written atomically, the array
first: an array without its sidecar is an interrupted write and is recomputed; an entry whose files
disagree (truncated, edited, another model's) is refused with an error naming the file to delete.

The folder is ``cache_dir`` if given, else ``$BC_FAST_CACHE/embeddings``, else
``~/.cache/bc_fast/embeddings``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._util.fileio import FileLock, atomic_write_bytes, atomic_write_json, read_json_object
from .text import corpus_fingerprint
from .text_models import TextEncoder

__all__ = ["EmbeddingCacheError", "embedding_cache_dir", "cache_paths", "embed_texts"]

_FORMAT = "bc_fast-embeddings"
_FORMAT_VERSION = 1


class EmbeddingCacheError(ValueError):
    """A cache entry that exists but cannot be trusted."""


def embedding_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$BC_FAST_CACHE/embeddings``, else ``~/.cache/bc_fast/embeddings``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("BC_FAST_CACHE")
    if env:
        return Path(env) / "embeddings"
    return Path.home() / ".cache" / "bc_fast" / "embeddings"


def _key_fields(encoder: TextEncoder, fingerprint: str, n: int) -> dict[str, Any]:
    return {"format": _FORMAT, "format_version": _FORMAT_VERSION, "model": encoder.name, "dim": encoder.dim,
            "package": encoder.package, "package_version": encoder.package_version,
            "config": encoder.config, "corpus_sha256": fingerprint, "n": n}


def cache_paths(encoder: TextEncoder, texts: Sequence[str], cache_dir: str | os.PathLike | None = None,
                *, fingerprint: str | None = None) -> tuple[Path, Path]:
    """``(array_path, sidecar_path)`` of the cache entry for ``encoder`` on ``texts``."""
    fp = corpus_fingerprint(texts) if fingerprint is None else fingerprint
    key = hashlib.sha256(json.dumps(_key_fields(encoder, fp, len(texts)), sort_keys=True).encode()).hexdigest()[:24]
    base = embedding_cache_dir(cache_dir) / f"{encoder.name}-{key}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_entry(npy: Path, side: Path, expect: dict[str, Any]) -> np.ndarray:
    fix = f"delete {npy} and {side} to recompute the embeddings"
    meta = read_json_object(side, what="embedding cache sidecar", fix=fix)
    for k, v in expect.items():
        if meta.get(k) != v:
            raise EmbeddingCacheError(f"{side}: cache sidecar field {k!r} is {str(meta.get(k))[:80]!r}, "
                                      f"expected {str(v)[:80]!r}; {fix}")
    if meta.get("sha256") != _sha256_file(npy):
        raise EmbeddingCacheError(f"{npy}: contents do not match the sha256 in its sidecar {side.name} "
                                  f"(truncated or overwritten?); {fix}")
    try:
        arr = np.load(npy, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise EmbeddingCacheError(f"{npy}: not a readable .npy array ({e}); {fix}") from None
    if arr.dtype != np.float32 or arr.shape != (expect["n"], expect["dim"]):
        raise EmbeddingCacheError(f"{npy}: holds {arr.dtype} {arr.shape}, expected float32 "
                                  f"({expect['n']}, {expect['dim']}); {fix}")
    return arr


def _compute(encoder: TextEncoder, texts: Sequence[str], batch_size: int, log: Callable[[str], None] | None) -> np.ndarray:
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    # similar lengths in one batch: transformers pad each batch to its longest text
    order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    t0 = last = time.perf_counter()
    for s in range(0, len(texts), batch_size):
        e = min(len(texts), s + batch_size)
        idx = order[s:e]
        out[idx] = encoder.encode([texts[i] for i in idx])
        now = time.perf_counter()
        if log is not None and (now - last > 10 or e == len(texts)):
            rate = e / max(now - t0, 1e-9)
            log(f"  {encoder.name}: {e}/{len(texts)} texts ({100 * e / len(texts):.0f}%), {rate:.0f} texts/s, "
                f"ETA {(len(texts) - e) / max(rate, 1e-9):.0f} s")
            last = now
    if not np.isfinite(out).all():
        raise RuntimeError(f"model {encoder.name} produced non-finite embeddings")
    return out


def embed_texts(encoder: TextEncoder, texts: Sequence[str], *, cache_dir: str | os.PathLike | None = None,
                use_cache: bool = True, batch_size: int = 256,
                log: Callable[[str], None] | None = print) -> np.ndarray:
    """Embeddings of ``texts`` by ``encoder`` (float32, (n, dim)), from the cache or computed and cached.

    Parameters
    ----------
    cache_dir : path, optional
        See :func:`embedding_cache_dir`.
    use_cache : bool, default True
        False computes without reading or writing the cache.
    batch_size : int
        Texts per encoder call; a progress line is logged at most every 10 s.
    log : callable or None
        Progress sink (None: silent).

    Raises
    ------
    EmbeddingCacheError
        If the entry exists but its array and sidecar disagree; the message names the files to delete.
    """
    texts = list(texts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not use_cache:
        return _compute(encoder, texts, int(batch_size), log)
    fp = corpus_fingerprint(texts)
    npy, side = cache_paths(encoder, texts, cache_dir, fingerprint=fp)
    expect = _key_fields(encoder, fp, len(texts))
    npy.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(npy.parent / f".{npy.stem}.lock"):  # one writer per entry; readers wait for it
        if npy.exists() and side.exists():
            return _read_entry(npy, side, expect)
        t0 = time.perf_counter()
        arr = _compute(encoder, texts, int(batch_size), log)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(npy, buf.getvalue())
        meta = dict(expect, shape=list(arr.shape), dtype="float32", sha256=_sha256_file(npy),
                    compute_seconds=round(time.perf_counter() - t0, 3),
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        atomic_write_json(side, meta)
    if log is not None:
        log(f"  {encoder.name}: cached {arr.shape} in {npy}")
    return arr
