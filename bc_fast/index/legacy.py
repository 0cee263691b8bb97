"""faiss indexes for legacy embedding versions, served from the latest embeddings.

A consumer pinned to version ``j`` needs an index of version-``j`` item embeddings.
Nobody keeps the old table: :func:`build_legacy_index` converts the latest table
in chunks through the registry's fused operator (latest -> j) and adds the rows to
any faiss index (``index_factory`` string, metric IP or L2). The resulting
:class:`LegacyIndex` is stamped with the registry chain it serves and searches
with version-``j`` queries, or with queries of any newer version, transformed on
the fly by the compiled core. Affine chains can also be exported as a plain faiss
``IndexPreTransform`` (:func:`export_faiss_pretransform`). A chain through a routed (local)
transform runs as one :class:`~bc_fast.engine.routed.RoutedTransform` (see
:meth:`bc_fast.store.Registry.operator`), on the CPU only; faiss has no routed transform, so it
cannot be exported.

This module is the faiss adapter only (build, search, save, load, export); retrieval
metrics and reports live in :mod:`bc_fast.eval.retrieval`.

faiss is imported inside functions, so ``import bc_fast`` stays light.

On disk an index is two files, the faiss index and a checksummed JSON sidecar
(``path + '.json'``): see :mod:`.sidecar`. The faiss helpers (import, metric, BLAS threshold,
``LinearTransform``, array checks) live in :mod:`.faiss_utils`; their public names stay importable
from here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._util.arrays import as_numpy
from .._util.fileio import atomic_write_bytes
from ..engine import FusedTransform
from ..engine.routed import RoutedTransform
from .._util.progress import Progress
from ..store.registry import Registry, RegistryError
from .faiss_utils import (DEFAULT_BLAS_MIN_QUERIES, _all_finite, _as_f32, _check_finite, _check_table, _faiss,
                          _faiss_gpu, _faiss_msg, _index_metric, _is_gpu_index, _open_device, _positive_int, _rows,
                          _rows_idx, blas_threshold, blas_threshold_for, faiss_linear_transform, faiss_metric,
                          set_blas_threshold)
from .sidecar import (_INDEX_FORMAT, _INDEX_FORMAT_VERSION, _check_index_matches, _check_registry, _read_index,
                      _read_sidecar, _sidecar, _sidecar_checksum)

__all__ = [
    "LegacyIndex", "build_legacy_index", "export_faiss_pretransform", "faiss_linear_transform", "faiss_metric",
    "blas_threshold", "set_blas_threshold", "blas_threshold_for", "DEFAULT_BLAS_MIN_QUERIES",
]


def _as_registry(registry: Any) -> Registry | None:
    if registry is None or isinstance(registry, Registry):
        return registry
    if isinstance(registry, (str, os.PathLike)):
        return Registry.open(registry)
    raise TypeError(f"registry must be a Registry, a registry path or None, got {type(registry).__name__}")


# ----------------------------------------------------------------------------- the index


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
        self._ops: dict[int, FusedTransform | RoutedTransform | None] = {}
        #: where query transforms run by default ("cpu", or "cuda:N" for an index built with device=)
        self.device = "cpu"
        self._gpu: dict[tuple[int, str], Any] = {}

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

    def query_operator(self, query_version: int) -> FusedTransform | RoutedTransform | None:
        """The fused operator mapping ``query_version`` queries into this index's version (None if equal);
        a :class:`RoutedTransform` for a chain through a routed (local) transform.

        Refuses a registry whose chain ``source_version -> version`` changed since the index was built.
        """
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
        if self.registry.chain_checksum(self.source_version, self.version) != self.chain_checksum:
            raise RegistryError(
                f"registry {self.registry.path} now maps version {self.source_version} -> {self.version} with "
                f"other transforms than the ones this index was built with; queries would land in another "
                f"space. Rebuild the index from the registry as it is now (build_legacy_index)")
        op = self.registry.operator(qv, self.version, normalize=self.normalize)
        self._ops[qv] = op
        return op

    def _transform_on(self, device: Any, qv: int, op: FusedTransform | RoutedTransform) -> Any:
        """The cached :class:`bc_fast.engine.device.DeviceTransform` of ``op`` on ``device``."""
        from ..engine.device import DeviceTransform, parse_device

        _refuse_routed_on_gpu(op, device, f"queries of version {qv}")
        key = (qv, f"cuda:{parse_device(device)}")
        t = self._gpu.get(key)
        if t is None:
            t = self._gpu[key] = DeviceTransform(op, _open_device(device))
        return t

    def search(self, queries: Any, k: int, *, query_version: int, blas_min_queries: int | None = None,
               threads: int | None = None, device: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Search with queries of ``query_version``, transformed on the fly when newer than the index.

        Parameters
        ----------
        queries : ndarray of shape (n, dim(query_version)) or (dim(query_version),)
            float32 or float16 (other floats are converted), finite. A 1-D query returns 1-D results.
        k : int
            Neighbours per query, ``1 <= k <= ntotal``.
        query_version : int
            The version the queries belong to (required: versions of equal dimension
            cannot be told apart from the data).
        blas_min_queries : int, optional
            Batches of at least this many queries use faiss's BLAS path (default
            :data:`DEFAULT_BLAS_MIN_QUERIES`); sets ``distance_compute_blas_threshold``
            for this call only.
        threads : int, optional
            Threads for the query transform (the core picks one thread for small batches).
        device : "cpu", "cuda" or "cuda:N", optional
            Where the query transform runs (default: :attr:`device`, the one the index was built
            with). On a GPU the (host) query batch is copied in, transformed by the fused CUDA
            operator and copied back for faiss; a CUDA tensor is first copied to the host.

        Returns
        -------
        D : ndarray of shape (n, k), float32
        I : ndarray of shape (n, k), int64 (row numbers of the source table; -1 if an
            approximate index finds fewer hits)
        """
        op = self.query_operator(query_version)
        q, single = self._check_queries(queries, op, int(query_version))
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > self.ntotal:
            raise ValueError(f"k={k} is larger than the {self.ntotal} vectors in the index; pass k <= {self.ntotal}")
        device = self.device if device is None else device
        if op is not None:
            if device != "cpu":
                q = self._transform_on(device, int(query_version), op)(q)
            else:
                q = op.apply(q, threads=threads)
            if not _all_finite(q):
                _check_finite(q, f"queries (version {int(query_version)})")
        else:
            q = q.astype(np.float32, copy=False)
            if self.normalize:
                q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        cvar = _faiss().cvar  # set inline, not via blas_threshold(): this is the per-query hot path
        prev = cvar.distance_compute_blas_threshold
        cvar.distance_compute_blas_threshold = blas_threshold_for(self.d, blas_min_queries)
        try:
            D, I = self.index.search(q, int(k))
        finally:
            cvar.distance_compute_blas_threshold = prev
        if single:
            return D[0], I[0]
        return D, I

    def _check_queries(self, queries: Any, op: FusedTransform | RoutedTransform | None, qv: int) -> tuple[np.ndarray, bool]:
        """Validate shape, dtype and finiteness of a query batch; return it 2-D and whether it was 1-D."""
        try:
            q, _ = as_numpy(queries, "queries", copy_from_device=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"queries must be a float array of shape (n, d) or (d,), got {type(queries).__name__} "
                            f"({str(e)[:120]})") from None
        single = q.ndim == 1
        if single:
            q = q.reshape(1, -1)
        if q.ndim != 2:
            raise ValueError(f"queries must be 1-D (one query) or 2-D (n, d), got shape {q.shape}")
        if q.dtype.kind != "f":  # not np.issubdtype: 1 us per call on the search path
            raise TypeError(f"queries must be floating point, got dtype {q.dtype}; convert with .astype(np.float32)")
        d_q = self.d if op is None else op.d_in
        if q.shape[1] != d_q:
            raise ValueError(f"queries have {q.shape[1]} features but version {qv} has dim {d_q}; "
                             f"set query_version to the version the queries come from")
        q = _as_f32(q)
        if not _all_finite(q):
            finite = np.isfinite(q).all(axis=1)
            raise ValueError(f"queries: row {int(np.argmin(finite))} holds NaN or Inf or a value beyond the float32 "
                             f"range ({int((~finite).sum())} such rows); faiss would return meaningless neighbours")
        return q, single

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` and its JSON sidecar to ``path + '.json'``, each atomically.

        The sidecar records the registry checksum, the chain checksum, versions,
        metric, factory string, the index file's sha256 and its own checksum
        (``sidecar_sha256``, over every other field).
        """
        faiss = _faiss()
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"{p} is a directory; pass a file path for the index, e.g. {p / 'index.faiss'}")
        if not p.parent.is_dir():
            raise FileNotFoundError(f"cannot save the index to {p}: directory {p.parent} does not exist; "
                                    f"create it first")
        metric = _index_metric(self.index)
        if metric != self.metric:
            raise ValueError(f"this LegacyIndex says metric={self.metric!r} but its faiss index uses {metric!r}; "
                             f"build it with build_legacy_index")
        index = faiss.index_gpu_to_cpu(self.index) if _is_gpu_index(self.index) else self.index
        try:
            data = faiss.serialize_index(index).tobytes()
        except RuntimeError as e:
            raise ValueError(f"faiss cannot serialise this index ({_faiss_msg(e)}); "
                             f"GPU indexes must be copied to the CPU first") from None
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
        side["sidecar_sha256"] = _sidecar_checksum(side)
        atomic_write_bytes(p, data)
        atomic_write_bytes(_sidecar(p), (json.dumps(side, indent=2, sort_keys=True) + "\n").encode())
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, registry: Registry | str | os.PathLike | None = None, *,
             allow_old_sidecar: bool = False) -> "LegacyIndex":
        """Load an index saved with :meth:`save`, checking its sidecar against the file and the registry.

        Checks, in order: the sidecar's own checksum and fields; the index file's sha256
        (before faiss reads it); metric, dimension and size re-derived from the faiss
        index; the registry's chain ``source_version -> version``.

        Parameters
        ----------
        path : the index file (its sidecar is ``path + '.json'``)
        registry : Registry or registry path, optional
            Needed to search with newer-version queries. Refused if its chain
            ``source_version -> version`` differs from the one the index was built with.
        allow_old_sidecar : bool, default False
            Accept a format-1 sidecar (written before sidecars carried their own checksum;
            its ``normalize`` and ``factory`` fields cannot be verified). Re-save the index
            at once to upgrade it.
        """
        p = Path(path)
        sp = _sidecar(p)
        if p.is_dir():
            raise ValueError(f"{p} is a directory; pass the index file written by LegacyIndex.save")
        if not p.is_file():
            raise FileNotFoundError(f"index file {p} not found")
        side = _read_sidecar(sp, allow_old=allow_old_sidecar)
        index = _read_index(p, sp, side)
        _check_index_matches(p, sp, index, side)
        reg = _as_registry(registry)
        if reg is not None:
            _check_registry(sp, reg, side)
        return cls(index, version=side["version"], source_version=side["source_version"], registry=reg,
                   metric=side["metric"], factory=side["factory"], normalize=side["normalize"],
                   registry_checksum=side["registry_checksum"], chain_checksum=side["chain_checksum"])


def _refuse_routed_on_gpu(op: Any, device: Any, what: str) -> None:
    if isinstance(op, RoutedTransform):  # the device is the bad value, hence ValueError
        raise ValueError(  # noqa: TRY004
            f"device={device!r}: {what} go through a routed (local) transform, which runs on the CPU only "
            "(the compiled core has no CUDA routed operator yet); use device='cpu'")


def build_legacy_index(registry: Registry, table: Any, version: int = 0, *, factory: str = "Flat",
                       metric: str = "ip", table_version: int | None = None, normalize: bool = False,
                       chunk_rows: int = 65536, train_rows: int = 100_000, seed: int = 0,
                       progress: bool | None = None, threads: int | None = None,
                       device: Any = "cpu") -> LegacyIndex:
    """Build a faiss index for ``version`` from a table of newer (default: latest) embeddings.

    The table is converted ``chunk_rows`` rows at a time through
    ``registry.operator(table_version, version)`` into one reused buffer, so memory
    stays at one chunk plus the index.

    Parameters
    ----------
    registry : Registry
    table : ndarray or np.memmap of shape (n, dim(table_version)), float32 or float16, finite
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
    device : "cpu", "cuda" or "cuda:N"
        On a GPU the chunks are transformed by the fused CUDA operator and the index is a
        faiss GPU index on that device (``faiss.index_cpu_to_gpu``), trained and filled
        there; queries are then transformed on it too. Needs a faiss GPU build
        (``pip install bc_fast[gpu]``); :meth:`LegacyIndex.save` writes a CPU copy.

    Returns
    -------
    LegacyIndex

    Raises
    ------
    ValueError
        On a bad argument, a factory string faiss rejects or cannot train, or NaN/Inf rows.
    """
    faiss = _faiss()
    if not isinstance(registry, Registry):
        raise TypeError(f"registry must be a bc_fast.store.Registry, got {type(registry).__name__}")
    if not isinstance(factory, str):
        raise TypeError(f"factory must be a faiss index_factory string such as 'Flat', got {factory!r}")
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize must be True or False, got {normalize!r}")
    metric_const = faiss_metric(metric)
    from ..engine.device import parse_device

    gpu_index = parse_device(device)  # ValueError for a bad device string
    src = registry.latest if table_version is None else table_version
    op = registry.operator(src, version, normalize=bool(normalize))
    if gpu_index is not None:
        _refuse_routed_on_gpu(op, device, f"rows of version {src}")
        faiss = _faiss_gpu(str(device))
    dev = _open_device(device)
    chunk_rows, train_rows = _positive_int(chunk_rows, "chunk_rows"), _positive_int(train_rows, "train_rows")
    src = int(src)
    table = _check_table(table, registry.dim(src), "table", src)
    n, d = table.shape[0], op.d_out
    try:
        index = faiss.index_factory(d, factory, metric_const)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build index_factory({d}, {factory!r}): {_faiss_msg(e)}") from None
    if dev is None:
        def apply(x: np.ndarray, out: np.ndarray) -> Any:
            return op.apply(x, out=out, threads=threads)
    else:
        from ..engine.device import DeviceTransform

        apply = DeviceTransform(op, dev)
        try:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), dev.index, index)
        except RuntimeError as e:
            raise ValueError(f"faiss cannot put index_factory({d}, {factory!r}) on GPU {dev.index}: "
                             f"{_faiss_msg(e)}; use a factory string faiss supports on GPUs (Flat, IVF...)") from None
    if not index.is_trained:
        _train(index, apply, table, d, factory=factory, train_rows=train_rows, chunk_rows=chunk_rows, seed=seed)
    buf = np.empty((min(chunk_rows, max(n, 1)), d), np.float32)
    with Progress(n, f"legacy index v{version}", enabled=progress) as bar, blas_threshold(blas_threshold_for(d)):
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            out = buf[: stop - start]
            apply(_rows(table, start, stop), out)
            _check_finite(out, "table", offset=start)
            index.add(out)
            bar.update(stop - start)
    legacy = LegacyIndex(index, version=int(version), source_version=src, registry=registry,
                         metric=str(metric).lower(), factory=factory, normalize=bool(normalize),
                         registry_checksum=registry.checksum, chain_checksum=registry.chain_checksum(src, int(version)))
    if dev is not None:
        legacy.device = dev.name
        legacy._gpu[(src, dev.name)] = apply
    return legacy


def _train(index: Any, apply: Any, table: np.ndarray, d: int, *, factory: str, train_rows: int, chunk_rows: int,
           seed: int) -> None:
    """Train ``index`` on up to ``train_rows`` rows sampled from ``table``, converted by ``apply(x, out)``."""
    n = table.shape[0]
    if n == 0:
        raise ValueError(f"index_factory string {factory!r} needs training, but the table is empty")
    m = min(n, train_rows)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False)) if m < n else np.arange(n)
    sample = np.empty((m, d), np.float32)
    for s in range(0, m, chunk_rows):
        r = rows[s:s + chunk_rows]
        apply(_rows_idx(table, r), sample[s:s + len(r)])
        _check_finite(sample[s:s + len(r)], "table", rows=r)
    try:
        with blas_threshold(blas_threshold_for(d)):
            index.train(sample)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot train index_factory({d}, {factory!r}) on {m} rows: "
                         f"{_faiss_msg(e)}; use more rows (train_rows, table) or a smaller "
                         f"factory (fewer IVF lists)") from None


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
    if any(not isinstance(s, list) for s in reg.chain_steps(a, int(dst))):
        raise ValueError(f"the chain {a} -> {dst} has a routed (local) step; faiss has no routed transform. Search "
                         f"with LegacyIndex.search(queries, k, query_version={a}) instead")
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
