"""faiss indexes for legacy embedding versions, served from the latest embeddings.

A consumer pinned to version ``j`` needs an index of version-``j`` item embeddings.
Nobody keeps the old table: :func:`build_legacy_index` converts the latest table
in chunks through the registry's fused operator (latest -> j) and adds the rows to
any faiss index (``index_factory`` string, metric IP or L2). The resulting
:class:`LegacyIndex` is stamped with the registry chain it serves and searches
with version-``j`` queries, or with queries of any newer version, transformed on
the fly by the compiled core. Affine chains can also be exported as a plain faiss
``IndexPreTransform`` (:func:`export_faiss_pretransform`).

faiss is imported inside functions, so ``import bc_fast`` stays light.

About ``distance_compute_blas_threshold``: in faiss 1.15 a flat search takes the
per-query SIMD loop when ``n_queries * d < distance_compute_blas_threshold``
(default 128000, i.e. fewer than 1000 queries at d=128, 500 at d=256) and one
BLAS GEMM otherwise. (With several OpenMP threads, fewer queries than threads
and >= 10000 vectors, faiss instead runs a database-parallel BLAS path whatever
the threshold.) Measured on the project's 2-vCPU box (bench/bench_index.py,
100k x 128 flat IP, one thread): the SIMD loop wins for 1 query (~2 ms vs 7 ms),
ties at 2, and BLAS wins from 3-4 queries up (2x at 4, 6-7x at 64-256). So
:class:`LegacyIndex` searches with the threshold set to
``DEFAULT_BLAS_MIN_QUERIES * d`` (per call, restored afterwards). On an
oversubscribed machine (more runnable threads than cores) faiss's multithreaded
BLAS path spin-waits and can be slower than the SIMD loop: cap threads there.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .ops import FusedTransform, Layer
from .progress import Progress
from .registry import Registry, RegistryError, atomic_write_bytes

__all__ = [
    "LegacyIndex", "build_legacy_index", "export_faiss_pretransform", "overlap_at_k", "recall_at_k",
    "blas_threshold", "set_blas_threshold", "blas_threshold_for", "DEFAULT_BLAS_MIN_QUERIES",
    "legacy_retrieval_report",
    "format_retrieval_report",
]

#: Query-batch size from which faiss uses BLAS for flat distances (faiss's default: 128000).
#: Query batches of at least this many rows use faiss's BLAS path; smaller ones its SIMD loop
#: (faster for 1-2 queries). BLAS is 2x faster at 4 queries and 6-7x at 64-256 (bench/bench_index.py).
DEFAULT_BLAS_MIN_QUERIES = 3

_INDEX_FORMAT = "bc_fast.legacy_index"
_INDEX_FORMAT_VERSION = 1
_METRICS = ("ip", "l2")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a dependency
        raise ImportError("bc_fast.index needs faiss; install faiss-cpu") from e
    return faiss


def _metric_const(metric: str) -> int:
    faiss = _faiss()
    m = str(metric).lower()
    if m not in _METRICS:
        raise ValueError(f"metric must be 'ip' (inner product) or 'l2', got {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if m == "ip" else faiss.METRIC_L2


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


def _check_table(table: Any, dim: int, name: str, version: int) -> np.ndarray:
    if not isinstance(table, np.ndarray):
        if type(table).__module__.startswith("torch"):
            table = table.detach().cpu().numpy()
        else:
            raise TypeError(f"{name} must be a numpy array or memmap of shape (n, {dim}), got {type(table).__name__}")
    if table.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, {dim}), got shape {table.shape}")
    if not np.issubdtype(table.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got dtype {table.dtype}; convert with .astype(np.float32)")
    if table.shape[1] != dim:
        raise ValueError(f"{name} has {table.shape[1]} features per row but version {version} has dim {dim}; "
                         f"pass embeddings of version {version} or set the version argument")
    return table


def _rows(table: np.ndarray, start: int, stop: int) -> np.ndarray:
    x = table[start:stop]
    if x.dtype not in (np.float32, np.float16):
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


class LegacyIndex:
    """A faiss index of version-``version`` embeddings, stamped with the registry chain that made it.

    Build it with :func:`build_legacy_index`, or load one with :meth:`load`.

    Attributes
    ----------
    index : faiss.Index
        Holds version-``version`` vectors; ids are row numbers of the source table.
    version : int
        The version the index serves.
    source_version : int
        The version of the table it was built from.
    registry : Registry or None
        Needed to transform queries of newer versions.
    """

    def __init__(self, index: Any, *, version: int, source_version: int, registry: Registry | None,
                 metric: str, factory: str, normalize: bool, registry_checksum: str, chain_checksum: str) -> None:
        self.index = index
        self.version = int(version)
        self.source_version = int(source_version)
        self.registry = registry
        self.metric = metric
        self.factory = factory
        self.normalize = bool(normalize)
        self.registry_checksum = registry_checksum
        self.chain_checksum = chain_checksum
        self._ops: dict[int, FusedTransform | None] = {}

    @property
    def d(self) -> int:
        """Dimension of the indexed (version-``version``) vectors."""
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        return (f"LegacyIndex(version={self.version}, source_version={self.source_version}, d={self.d}, "
                f"ntotal={self.ntotal}, factory={self.factory!r}, metric={self.metric!r})")

    def query_operator(self, query_version: int) -> FusedTransform | None:
        """The fused operator mapping ``query_version`` queries into this index's version (None if equal)."""
        if isinstance(query_version, bool) or not isinstance(query_version, (int, np.integer)):
            raise TypeError(f"query_version must be an int version number, got {query_version!r}")
        qv = int(query_version)
        if qv in self._ops:
            return self._ops[qv]
        if qv == self.version:
            return None
        if self.registry is None:
            raise ValueError(f"queries of version {qv} need the registry to reach version {self.version}; "
                             f"load the index with LegacyIndex.load(path, registry=...)")
        if qv < self.version:
            raise RegistryError(f"query_version={qv} is older than the index's version {self.version}; "
                                f"there are no forward transforms unless fitted")
        op = self.registry.operator(qv, self.version, normalize=self.normalize)
        self._ops[qv] = op
        return op

    def search(self, queries: Any, k: int, *, query_version: int, blas_min_queries: int | None = None,
               threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Search with queries of ``query_version``, transformed on the fly when newer than the index.

        Parameters
        ----------
        queries : ndarray of shape (n, dim(query_version)) or (dim(query_version),)
            float32 or float16 (other floats are converted). A 1-D query returns 1-D results.
        k : int
            Neighbours per query.
        query_version : int
            The version the queries belong to (required: versions of equal dimension
            cannot be told apart from the data).
        blas_min_queries : int, optional
            Batches of at least this many queries use faiss's BLAS path (default
            :data:`DEFAULT_BLAS_MIN_QUERIES`); sets ``distance_compute_blas_threshold``
            for this call only.
        threads : int, optional
            Threads for the query transform (the core picks one thread for small batches).

        Returns
        -------
        D : ndarray of shape (n, k), float32
        I : ndarray of shape (n, k), int64 (row numbers of the source table; -1 if fewer hits)
        """
        op = self.query_operator(query_version)
        q = queries.detach().cpu().numpy() if type(queries).__module__.startswith("torch") else np.asarray(queries)
        single = q.ndim == 1
        if single:
            q = q.reshape(1, -1)
        if q.ndim != 2:
            raise ValueError(f"queries must be 1-D (one query) or 2-D (n, d), got shape {q.shape}")
        if not np.issubdtype(q.dtype, np.floating):
            raise TypeError(f"queries must be floating point, got dtype {q.dtype}")
        d_q = self.d if op is None else op.d_in
        if q.shape[1] != d_q:
            raise ValueError(f"queries have {q.shape[1]} features but version {int(query_version)} has dim {d_q}; "
                             f"set query_version to the version the queries come from")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if q.dtype not in (np.float32, np.float16) or not q.flags.c_contiguous:
            q = np.ascontiguousarray(q, dtype=np.float32)
        if op is not None:
            q = op.apply(q, threads=threads)
        else:
            q = np.ascontiguousarray(q, dtype=np.float32)
            if self.normalize:
                q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        cvar = _faiss().cvar
        prev = cvar.distance_compute_blas_threshold
        cvar.distance_compute_blas_threshold = blas_threshold_for(self.d, blas_min_queries)
        try:
            D, I = self.index.search(q, int(k))
        finally:
            cvar.distance_compute_blas_threshold = prev
        if single:
            return D[0], I[0]
        return D, I

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` and its JSON sidecar to ``path + '.json'``, each atomically.

        The sidecar records the registry checksum, the chain checksum, versions,
        metric, factory string and the index file's sha256.
        """
        faiss = _faiss()
        p = Path(path)
        data = faiss.serialize_index(self.index).tobytes()
        side = {
            "format": _INDEX_FORMAT, "format_version": _INDEX_FORMAT_VERSION,
            "version": self.version, "source_version": self.source_version, "d": self.d, "ntotal": self.ntotal,
            "metric": self.metric, "factory": self.factory, "normalize": self.normalize,
            "registry_checksum": self.registry_checksum, "chain_checksum": self.chain_checksum,
            "registry_path": None if self.registry is None else str(self.registry.path.resolve()),
            "index_file": p.name, "index_sha256": hashlib.sha256(data).hexdigest(),
            "faiss_version": faiss.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        }
        atomic_write_bytes(p, data)
        atomic_write_bytes(_sidecar(p), (json.dumps(side, indent=2, sort_keys=True) + "\n").encode())
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, registry: Registry | str | os.PathLike | None = None) -> "LegacyIndex":
        """Load an index saved with :meth:`save`, checking its sidecar against the file and the registry.

        Parameters
        ----------
        path : the index file (its sidecar is ``path + '.json'``)
        registry : Registry or registry path, optional
            Needed to search with newer-version queries. Refused if its chain
            ``source_version -> version`` differs from the one the index was built with.
        """
        faiss = _faiss()
        p = Path(path)
        sp = _sidecar(p)
        if not p.is_file():
            raise FileNotFoundError(f"index file {p} not found")
        if not sp.is_file():
            raise ValueError(f"sidecar {sp} not found; a legacy index must be saved with LegacyIndex.save")
        try:
            side = json.loads(sp.read_bytes())
        except ValueError as e:
            raise ValueError(f"{sp} is not valid JSON (truncated or hand-edited?): {e}") from e
        if not isinstance(side, dict) or side.get("format") != _INDEX_FORMAT:
            raise ValueError(f"{sp}: field 'format' must be {_INDEX_FORMAT!r}; not a bc_fast legacy index sidecar")
        need = {"version": int, "source_version": int, "d": int, "ntotal": int, "metric": str, "factory": str,
                "normalize": bool, "registry_checksum": str, "chain_checksum": str, "index_sha256": str}
        for key, typ in need.items():
            if not isinstance(side.get(key), typ) or (typ is int and isinstance(side.get(key), bool)):
                raise ValueError(f"{sp}: field {key!r} must be {typ.__name__}, got {side.get(key)!r}")
        if side.get("format_version", 0) > _INDEX_FORMAT_VERSION:
            raise ValueError(f"{sp}: format_version {side['format_version']} is newer than this bc_fast supports")
        data = p.read_bytes()
        if hashlib.sha256(data).hexdigest() != side["index_sha256"]:
            raise ValueError(f"{p}: checksum mismatch with {sp.name}: the index file was modified, or a save was "
                             f"interrupted between the two files; rebuild or re-save the index")
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != side["d"] or index.ntotal != side["ntotal"]:
            raise ValueError(f"{p}: index has d={index.d}, ntotal={index.ntotal} but {sp.name} says "
                             f"d={side['d']}, ntotal={side['ntotal']}")
        reg = None
        if registry is not None:
            reg = registry if isinstance(registry, Registry) else Registry.open(registry)
            v, s = side["version"], side["source_version"]
            if v not in reg or s not in reg:
                raise RegistryError(f"{sp}: the index serves version {v} built from version {s}, but registry "
                                    f"{reg.path} has versions 0..{len(reg) - 1}")
            if reg.dim(v) != side["d"]:
                raise RegistryError(f"{sp}: dimension mismatch: the index holds d={side['d']} vectors but "
                                    f"version {v} of {reg.path} has dim {reg.dim(v)}")
            if reg.chain_checksum(s, v) != side["chain_checksum"]:
                raise RegistryError(
                    f"{sp}: registry {reg.path} maps version {s} -> {v} with different transforms than the ones "
                    f"this index was built with (chain checksum mismatch); rebuild the index from this registry")
        return cls(index, version=side["version"], source_version=side["source_version"], registry=reg,
                   metric=side["metric"], factory=side["factory"], normalize=side["normalize"],
                   registry_checksum=side["registry_checksum"], chain_checksum=side["chain_checksum"])


def _sidecar(p: Path) -> Path:
    return p.with_name(p.name + ".json")


def build_legacy_index(registry: Registry, table: Any, version: int = 0, *, factory: str = "Flat",
                       metric: str = "ip", table_version: int | None = None, normalize: bool = False,
                       chunk_rows: int = 65536, train_rows: int = 100_000, seed: int = 0,
                       progress: bool | None = None, threads: int | None = None) -> LegacyIndex:
    """Build a faiss index for ``version`` from a table of newer (default: latest) embeddings.

    The table is converted ``chunk_rows`` rows at a time through
    ``registry.operator(table_version, version)`` into one reused buffer, so memory
    stays at one chunk plus the index.

    Parameters
    ----------
    registry : Registry
    table : ndarray or np.memmap of shape (n, dim(table_version)), float32 or float16
    version : int, default 0
        The version the index serves.
    factory : str, default "Flat"
        Any ``faiss.index_factory`` string ("Flat", "IVF1024,Flat", "HNSW32", "IVF256,PQ16", ...).
    metric : {"ip", "l2"}
    table_version : int, optional
        The table's version (default ``registry.latest``).
    normalize : bool, default False
        L2-normalise the converted rows (cosine search with metric "ip"); queries are
        normalised the same way by :meth:`LegacyIndex.search`.
    chunk_rows : int
    train_rows : int
        Rows (sampled evenly at random from the table) used to train indexes that need it.
    progress : bool, optional
        Show a progress bar (default: only on a TTY).
    threads : int, optional
        Threads for the conversion.

    Returns
    -------
    LegacyIndex
    """
    faiss = _faiss()
    if not isinstance(registry, Registry):
        raise TypeError(f"registry must be a bc_fast.registry.Registry, got {type(registry).__name__}")
    src = registry.latest if table_version is None else int(table_version)
    op = registry.operator(src, version, normalize=normalize)
    table = _check_table(table, registry.dim(src), "table", src)
    if chunk_rows < 1 or train_rows < 1:
        raise ValueError(f"chunk_rows and train_rows must be positive, got {chunk_rows}, {train_rows}")
    n = table.shape[0]
    d = op.d_out
    try:
        index = faiss.index_factory(d, factory, _metric_const(metric))
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build index_factory({d}, {factory!r}): {e}") from e
    if not index.is_trained:
        if n == 0:
            raise ValueError(f"index_factory string {factory!r} needs training, but the table is empty")
        m = min(n, int(train_rows))
        rows = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False)) if m < n else np.arange(n)
        sample = np.empty((m, d), np.float32)
        for s in range(0, m, chunk_rows):
            r = rows[s:s + chunk_rows]
            op.apply(_rows_idx(table, r), out=sample[s:s + len(r)], threads=threads)
        with blas_threshold(blas_threshold_for(d)):
            index.train(sample)
        del sample
    buf = np.empty((min(chunk_rows, max(n, 1)), d), np.float32)
    with Progress(n, f"legacy index v{version}", enabled=progress) as bar, blas_threshold(blas_threshold_for(d)):
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            out = buf[: stop - start]
            op.apply(_rows(table, start, stop), out=out, threads=threads)
            index.add(out)
            bar.update(stop - start)
    return LegacyIndex(index, version=version, source_version=src, registry=registry, metric=str(metric).lower(),
                       factory=factory, normalize=normalize, registry_checksum=registry.checksum,
                       chain_checksum=registry.chain_checksum(src, version))


def _rows_idx(table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    x = table[rows]
    if x.dtype not in (np.float32, np.float16):
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


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


def export_faiss_pretransform(registry: Registry | LegacyIndex, index: Any = None, *, src: int | None = None,
                              dst: int | None = None) -> Any:
    """Wrap an index in a faiss ``IndexPreTransform`` that maps ``src`` vectors to ``dst`` first.

    The fused operator must be affine (one matrix and bias); it becomes a faiss
    ``LinearTransform`` (plus a ``NormalizationTransform`` for normalised legacy
    indexes). The result is a plain faiss index: ``faiss.write_index`` /
    ``faiss.read_index`` keep it, and anyone can search it with ``src``-version
    vectors without bc_fast.

    Parameters
    ----------
    registry : Registry, or a LegacyIndex (then ``index``/``dst`` come from it)
    index : faiss.Index of dim(dst) vectors (shared, not copied)
    src : int, default latest
    dst : int, default the LegacyIndex's version (required with a Registry)

    Returns
    -------
    faiss.IndexPreTransform
    """
    faiss = _faiss()
    normalize = False
    if isinstance(registry, LegacyIndex):
        legacy = registry
        if legacy.registry is None:
            raise ValueError("the LegacyIndex has no registry; load it with LegacyIndex.load(path, registry=...)")
        if index is not None:
            raise ValueError("pass either a LegacyIndex or (registry, index), not both")
        index, dst, reg, normalize = legacy.index, legacy.version if dst is None else dst, legacy.registry, legacy.normalize
        if dst != legacy.version:
            raise ValueError(f"dst={dst} differs from the LegacyIndex's version {legacy.version}")
    elif isinstance(registry, Registry):
        reg = registry
        if index is None or dst is None:
            raise ValueError("with a Registry pass index= (a faiss index of version dst) and dst=")
    else:
        raise TypeError(f"expected a Registry or LegacyIndex, got {type(registry).__name__}")
    a = reg.latest if src is None else int(src)
    layers = reg.fused_layers(a, int(dst))
    if len(layers) != 1 or not layers[0].is_affine:
        kinds = sorted({l.activation for l in layers if not l.is_affine})
        raise ValueError(f"the chain {a} -> {dst} is not affine (it has {'/'.join(kinds)} layers); faiss has no "
                         f"MLP transform. Search with LegacyIndex.search(queries, k, query_version={a}) instead")
    layer = layers[0]
    if int(index.d) != layer.d_out:
        raise ValueError(f"index has d={index.d} but version {dst} has dim {layer.d_out}")
    lt = faiss_linear_transform(layer.weight, layer.bias)
    if normalize:
        pre = faiss.IndexPreTransform(faiss.NormalizationTransform(layer.d_out, 2.0), index)
        pre.prepend_transform(lt)
    else:
        pre = faiss.IndexPreTransform(lt, index)
    return pre


# ----------------------------------------------------------------------------- retrieval metrics


def overlap_at_k(I_a: np.ndarray, I_b: np.ndarray, k: int | None = None) -> float:
    """Mean fraction of shared ids in two top-k result lists (retrieval compatibility).

    Parameters
    ----------
    I_a, I_b : int arrays of shape (n, >=k)
        Result ids of the same queries from two indexes; -1 (no hit) never matches.
    k : int, optional
        Use the first ``k`` columns (default: all).

    Returns
    -------
    float in [0, 1]: mean over queries of ``|top_k(a) & top_k(b)| / k``.
    """
    a = np.asarray(I_a)
    b = np.asarray(I_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"I_a and I_b must be 2-D with the same number of rows, got {a.shape} and {b.shape}")
    k = min(a.shape[1], b.shape[1]) if k is None else int(k)
    if not 1 <= k <= min(a.shape[1], b.shape[1]):
        raise ValueError(f"k={k} must be in [1, {min(a.shape[1], b.shape[1])}]")
    if a.shape[0] == 0:
        raise ValueError("no queries")
    a, b = a[:, :k], b[:, :k]
    hits = 0
    for s in range(0, a.shape[0], 512):
        aa, bb = a[s:s + 512], b[s:s + 512]
        eq = (aa[:, :, None] == bb[:, None, :]) & (aa[:, :, None] >= 0)
        hits += int(eq.any(axis=2).sum())
    return hits / (a.shape[0] * k)


def recall_at_k(users: np.ndarray, items: np.ndarray, train_pairs: np.ndarray, test_pairs: np.ndarray,
                k: int = 50, *, metric: str = "ip", chunk: int = 1024) -> float:
    """Recall@k of item recommendation: rank all items per user, training items excluded.

    Parameters
    ----------
    users : ndarray of shape (n_users, d)
    items : ndarray of shape (n_items, d)
    train_pairs, test_pairs : int arrays of shape (m, 2)
        ``(user, item)`` rows. Training items are never recommended.
    k : int, default 50
    metric : {"ip", "l2"}

    Returns
    -------
    float: mean over users with test items of ``|top_k & test| / |test|``.
    """
    _metric_const(metric)
    users = np.asarray(users, dtype=np.float32)
    items = np.asarray(items, dtype=np.float32)
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(f"users (n_users, d) and items (n_items, d) must share d, got {users.shape}, {items.shape}")
    tr = _pairs(train_pairs, "train_pairs", users.shape[0], items.shape[0])
    te = _pairs(test_pairs, "test_pairs", users.shape[0], items.shape[0])
    if te.shape[0] == 0:
        raise ValueError("test_pairs is empty")
    n_items = items.shape[0]
    k = min(int(k), n_items)
    test_users = np.unique(te[:, 0])
    order = np.argsort(tr[:, 0], kind="stable")
    tr = tr[order]
    tr_start = np.searchsorted(tr[:, 0], np.arange(users.shape[0] + 1))
    te = te[np.argsort(te[:, 0], kind="stable")]
    te_start = np.searchsorted(te[:, 0], np.arange(users.shape[0] + 1))
    sq = (items * items).sum(1) if metric == "l2" else None
    recalls = []
    for s in range(0, len(test_users), chunk):
        us = test_users[s:s + chunk]
        scores = users[us] @ items.T
        if sq is not None:
            scores = 2 * scores - sq[None, :]
        for r, u in enumerate(us):
            scores[r, tr[tr_start[u]:tr_start[u + 1], 1]] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for r, u in enumerate(us):
            truth = te[te_start[u]:te_start[u + 1], 1]
            recalls.append(np.isin(truth, top[r]).sum() / len(truth))
    return float(np.mean(recalls))


def _pairs(p: Any, name: str, n_users: int, n_items: int) -> np.ndarray:
    a = np.asarray(p)
    if a.ndim != 2 or a.shape[1] != 2 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an int array of shape (m, 2) of (user, item) rows, got {a.dtype} {a.shape}")
    if a.size and (a.min() < 0 or a[:, 0].max() >= n_users or a[:, 1].max() >= n_items):
        raise ValueError(f"{name} has ids outside [0, {n_users}) x [0, {n_items})")
    return a.astype(np.int64)


# ----------------------------------------------------------------------------- demo report


def _backward_list(backward: Any, n_versions: int, name: str) -> list[Any]:
    """Normalise per-strategy backward transforms to a list indexed by version (entry 0 unused)."""
    K = n_versions - 1
    if backward is None:
        return [None] * n_versions
    if isinstance(backward, Mapping):
        bad = [v for v in backward if not (isinstance(v, int) and 1 <= v <= K)]
        if bad:
            raise ValueError(f"strategies[{name!r}]['backward'] keys must be versions 1..{K}, got {bad}")
        return [None] + [backward.get(v) for v in range(1, n_versions)]
    seq = list(backward)
    if len(seq) == K:
        return [None] + seq
    if len(seq) == n_versions and seq[0] is None:
        return seq
    raise ValueError(f"strategies[{name!r}]['backward'] must list B_1..B_{K} ({K} entries) or "
                     f"[None, B_1, ..., B_{K}]; got {len(seq)} entries")


def _identity_layers(d_from: int, d_to: int) -> list[Layer]:
    return [Layer(np.eye(d_to, d_from, dtype=np.float32))]


def legacy_retrieval_report(strategies: Mapping[str, Mapping[str, Any]], *, version: int = 0, k: int = 50,
                            train_pairs: np.ndarray | None = None, test_pairs: np.ndarray | None = None,
                            recall_k: int = 50, factory: str = "Flat", metric: str = "ip",
                            max_queries: int = 2000, seed: int = 0,
                            workdir: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Retrieval retention of a legacy index built from the latest embeddings, per strategy.

    For each strategy: put its versions and backward transforms in a registry (in a
    temporary directory), fuse the chain latest -> ``version``, build a faiss index
    for ``version`` from the latest item embeddings through the fused core, and
    compare it with the index of the TRUE version-``version`` item embeddings.

    Parameters
    ----------
    strategies : mapping name -> dict with keys
        ``items``: list of K+1 arrays, item embeddings of versions 0..K, shapes (n_items, d_k);
        ``users``: optional list of K+1 arrays (n_users, d_k), user embeddings;
        ``backward``: B_1..B_K as a list of K transforms (or ``[None, B_1, ...]`` or
        ``{k: B_k}``), each anything :func:`bc_fast.registry.as_layers` accepts (a Layer
        list from ``export_layers()``, ``(W, b)``). ``None`` (the whole entry, or one
        step) means no transform: the identity, truncating to the first d_(k-1)
        features if the dimension grew (what nobc does).
    version : int, default 0
        The legacy version j whose consumers are served.
    k : int, default 50
        Depth of overlap@k.
    train_pairs, test_pairs : int arrays of shape (m, 2), optional
        ``(user, item)`` interactions for Recall@``recall_k`` (needs ``users``).
    recall_k : int, default 50
    factory, metric : faiss index_factory string and "ip"/"l2" for the legacy index.
    max_queries : int
        Version-j queries used for overlap@k: the true version-j user embeddings (or
        item embeddings when no users are given), at most this many, sampled.
    workdir : path, optional
        Where to put the registries (default: a temporary directory, removed after).

    Returns
    -------
    dict name -> dict with
        ``overlap@k``: mean |top-k(legacy index) & top-k(true v_j index)| / k for version-j queries;
        ``recall_true``: Recall@recall_k of true v_j users vs true v_j items;
        ``recall_legacy``: true v_j users vs the legacy (transformed latest) items;
        ``recall_transformed``: transformed latest users vs transformed latest items;
        ``recall_retention``: recall_legacy / recall_true; ``recall_k``;
        ``chain``: the fused operator, ``n_queries``, ``build_s`` (index build seconds),
        ``rows_per_s``. Recall keys are absent without interactions and users.
    """
    import time

    faiss = _faiss()
    if not strategies:
        raise ValueError("strategies is empty")
    own_tmp = workdir is None
    base = Path(tempfile.mkdtemp(prefix="bc_fast_legacy_")) if own_tmp else Path(workdir)
    report: dict[str, dict[str, Any]] = {}
    try:
        for si, (name, data) in enumerate(strategies.items()):
            if not isinstance(data, Mapping) or "items" not in data:
                raise ValueError(f"strategies[{name!r}] must be a dict with 'items' (and optional 'users', 'backward')")
            items = [np.asarray(x) for x in data["items"]]
            users = None if data.get("users") is None else [np.asarray(x) for x in data["users"]]
            nv = len(items)
            if not 0 <= version < nv - 1:
                raise ValueError(f"strategies[{name!r}] has versions 0..{nv - 1}; version={version} must be older "
                                 f"than the latest")
            if users is not None and len(users) != nv:
                raise ValueError(f"strategies[{name!r}]: 'users' has {len(users)} versions, 'items' has {nv}")
            backward = _backward_list(data.get("backward"), nv, name)
            reg = Registry.create(base / f"{si:02d}_registry", name=str(name))
            notes = []
            for v in range(nv):
                dim = items[v].shape[1]
                b = backward[v]
                if v > 0 and b is None:
                    b = _identity_layers(dim, items[v - 1].shape[1])
                    notes.append(f"B_{v}=" + ("identity" if dim == items[v - 1].shape[1] else
                                               f"truncate {dim}->{items[v - 1].shape[1]}"))
                reg.add_version(dim=dim, backward=b if v > 0 else None, metadata={"strategy": str(name)})
            latest = nv - 1
            t0 = time.perf_counter()
            legacy = build_legacy_index(reg, np.ascontiguousarray(items[latest], np.float32), version,
                                        factory=factory, metric=metric, progress=False)
            build_s = time.perf_counter() - t0
            true_j = np.ascontiguousarray(items[version], np.float32)
            truth = faiss.index_factory(true_j.shape[1], "Flat", _metric_const(metric))
            truth.add(true_j)
            pool = users[version] if users is not None else true_j
            rng = np.random.default_rng(seed)
            qi = np.sort(rng.choice(len(pool), size=min(max_queries, len(pool)), replace=False))
            q = np.ascontiguousarray(pool[qi], np.float32)
            kk = min(k, legacy.ntotal)
            _, I_legacy = legacy.search(q, kk, query_version=version)
            with blas_threshold(blas_threshold_for(true_j.shape[1])):
                _, I_true = truth.search(q, kk)
            row: dict[str, Any] = {
                f"overlap@{k}": overlap_at_k(I_legacy, I_true),
                "chain": repr(reg.operator(latest, version)),
                "n_queries": int(len(q)),
                "build_s": build_s,
                "rows_per_s": legacy.ntotal / build_s if build_s > 0 else math.inf,
            }
            if notes:
                row["notes"] = ", ".join(notes)
            if users is not None and train_pairs is not None and test_pairs is not None:
                op = reg.operator(latest, version)
                items_t = op.apply(np.ascontiguousarray(items[latest], np.float32))
                users_t = op.apply(np.ascontiguousarray(users[latest], np.float32))
                r_true = recall_at_k(users[version], true_j, train_pairs, test_pairs, recall_k, metric=metric)
                r_legacy = recall_at_k(users[version], items_t, train_pairs, test_pairs, recall_k, metric=metric)
                r_tr = recall_at_k(users_t, items_t, train_pairs, test_pairs, recall_k, metric=metric)
                row.update({"recall_k": int(recall_k), "recall_true": r_true, "recall_legacy": r_legacy, "recall_transformed": r_tr,
                            "recall_retention": r_legacy / r_true if r_true > 0 else math.nan})
            report[str(name)] = row
    finally:
        if own_tmp:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    return report


def format_retrieval_report(report: Mapping[str, Mapping[str, Any]], *, version: int = 0) -> str:
    """Render :func:`legacy_retrieval_report` output as an aligned text table."""
    if not report:
        return "(no strategies)"
    okey = next((key for key in next(iter(report.values())) if key.startswith("overlap@")), "overlap@50")
    has_recall = any("recall_true" in r for r in report.values())
    rk = next((r["recall_k"] for r in report.values() if "recall_k" in r), 50)
    head = f"{'strategy':<20} {okey:>11}"
    if has_recall:
        head += (f" {f'R@{rk} true v{version}':>14} {f'R@{rk} legacy':>12} {'retention':>10} "
                 f"{f'R@{rk} transf.':>13}")
    lines = [f"legacy retrieval for version {version} (index built from latest embeddings via the fused chain)", head]
    for name, r in report.items():
        line = f"{name:<20} {r[okey]:>11.3f}"
        if has_recall and "recall_true" in r:
            line += (f" {r['recall_true']:>14.4f} {r['recall_legacy']:>12.4f} {r['recall_retention']:>9.1%} "
                     f"{r['recall_transformed']:>13.4f}")
        lines.append(line)
    return "\n".join(lines)
