"""Legacy faiss IVF indexes built from a converted dataset too large for one process's pass.

The faiss way (``faiss/contrib``'s ``ondisk`` / the "add shards, then merge" recipe):

1. :func:`train_ivf` trains the IVF index (coarse quantizer, and PQ codebooks if any) on a uniform
   random sample of the dataset's rows (``train_rows``).
2. :func:`build_ivf_index_sharded` adds each file of the dataset (a shard) into an empty clone of
   the trained index -- in this process, or one Ray task per shard (``engine="ray"``) -- with the
   rows' global numbers as ids, and merges the shards in order with ``merge_from``. Inverted lists
   are appended list by list, so the merged index holds exactly what one process adding every row
   in order would hold: same ids, same codes, same order, same search results.

The dataset is a directory written by :func:`bc_fast.convert.distributed.convert_dataset_ray` (Parquet or
``.npy`` files) or by ``bc-fast convert`` (``.npy`` shards): its sidecar gives the version, the
registry checksum and the chain, which the :class:`~bc_fast.index.LegacyIndex` is stamped with.
The merged index must fit in the memory of the process that merges it; beyond that, faiss's
``OnDiskInvertedLists`` (``merge_from_multiple``) keeps the lists on disk (not done here).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ..convert.job import read_sidecar, sidecar_path
from .faiss_utils import _check_finite, _faiss, _faiss_msg, _index_metric, _positive_int, blas_threshold, \
    blas_threshold_for, faiss_metric
from .legacy import LegacyIndex
from ..store.tables import open_table

__all__ = ["train_ivf", "build_ivf_index_sharded"]


def _dataset(path: str) -> tuple[dict, list[str], list[int]]:
    """(sidecar, file paths in row order, rows per file) of a converted dataset directory."""
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory; pass a dataset written by convert_dataset_ray "
                         "(or bc-fast convert of a directory of .npy shards)")
    side = read_sidecar(path)
    files = (side or {}).get("files")
    if not side or not isinstance(files, list) or not files or side.get("version") is None:
        raise ValueError(f"{path} has no bc_fast dataset sidecar {sidecar_path(path)} listing its files and "
                         "version; build the index from a dataset bc_fast converted")
    paths = [os.path.join(path, f) for f in files]
    rows = []
    for p in paths:
        r = open_table(p)
        rows.append(r.n_rows)
        r.close()
    return side, paths, rows


def _read_rows(paths: Sequence[str], rows: Sequence[int], want: np.ndarray, d: int) -> np.ndarray:
    """float32 rows at the sorted global indices ``want``."""
    out = np.empty((len(want), d), np.float32)
    bounds = np.cumsum([0, *rows])
    which = np.searchsorted(bounds, want, side="right") - 1
    for f in np.unique(which):
        sel = np.nonzero(which == f)[0]
        r = open_table(paths[f])
        try:
            out[sel] = r.read_rows(want[sel] - bounds[f])
        finally:
            r.close()
    return out


def train_ivf(dataset: str | os.PathLike, *, factory: str = "IVF1024,Flat", metric: str = "ip",
              train_rows: int = 100_000, seed: int = 0) -> Any:
    """A trained, empty faiss IVF index for a converted dataset.

    Trained on ``min(train_rows, rows)`` rows drawn uniformly at random (``seed``) from all its files.
    """
    faiss = _faiss()
    side, paths, rows = _dataset(os.fspath(dataset))
    train_rows = _positive_int(train_rows, "train_rows")
    d = int(side["table"]["dim"])
    try:
        index = faiss.index_factory(d, factory, faiss_metric(metric))
        faiss.extract_index_ivf(index)
    except RuntimeError as e:
        raise ValueError(f"build_ivf_index_sharded needs an IVF index_factory string such as 'IVF1024,Flat' or "
                         f"'IVF4096,PQ32'; faiss says for {factory!r}: {_faiss_msg(e)}") from None
    n = int(sum(rows))
    m = min(n, train_rows)
    want = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    sample = _read_rows(paths, rows, want, d)
    _check_finite(sample, str(dataset), rows=want)
    try:
        with blas_threshold(blas_threshold_for(d)):
            index.train(sample)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot train {factory!r} on {m} rows: {_faiss_msg(e)}; use more rows "
                         "(train_rows) or fewer IVF lists") from None
    return index


def _add_shard(trained: bytes, path: str, offset: int, chunk_rows: int) -> bytes:
    """Serialized clone of the trained index holding the rows of ``path`` (ids ``offset + row``)."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    reader = open_table(path)
    try:
        chunks = reader.chunks(chunk_rows)
        buf = np.empty((max((c.rows for c in chunks), default=0), reader.dim), reader.dtype)
        for c in chunks:
            x, _ = reader.read(c, buf[: c.rows])
            x = np.ascontiguousarray(x, np.float32)
            _check_finite(x, path, offset=c.start)
            index.add_with_ids(x, np.arange(offset + c.start, offset + c.stop, dtype=np.int64))
    finally:
        reader.close()
    return faiss.serialize_index(index).tobytes()


def build_ivf_index_sharded(dataset: str | os.PathLike, path: str | os.PathLike | None = None, *,
                            factory: str = "IVF1024,Flat", metric: str = "ip", train_rows: int = 100_000,
                            seed: int = 0, trained: Any = None, registry: Any = None, chunk_rows: int = 65536,
                            engine: str = "local", address: str | None = None) -> LegacyIndex:
    """Build a legacy IVF index from a converted dataset, shard by shard, merged with ``merge_from``.

    Parameters
    ----------
    dataset : path
        A converted dataset directory (its sidecar names the version and the chain).
    path : path, optional
        Save the index there with :meth:`LegacyIndex.save` (and its sidecar).
    factory, metric, train_rows, seed
        The IVF ``index_factory`` string, ``"ip"`` or ``"l2"``, and the training sample (:func:`train_ivf`).
    trained : faiss.Index, optional
        An already trained empty index (skips training): the result then equals adding every row of
        the dataset, in order, to a clone of it in one process. Its dimension must be the dataset's
        and its metric ``metric`` (ValueError before any shard is read otherwise).
    registry : Registry or path, optional
        Attached to the index (needed to search with newer-version queries); refused if its checksum
        is not the one the dataset was converted with.
    chunk_rows : int
        Rows read at a time per shard.
    engine : ``"local"`` or ``"ray"``
        Add the shards here, one after the other, or in parallel Ray tasks (one per file; every
        worker must see the dataset at this path). A local Ray is started (and stopped) if none is
        running and no ``address`` is given.

    Returns
    -------
    LegacyIndex
    """
    faiss = _faiss()
    dataset = os.fspath(dataset)
    side, paths, rows = _dataset(dataset)
    chunk_rows = _positive_int(chunk_rows, "chunk_rows")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if trained is not None:
        _check_trained(trained, int(side["table"]["dim"]), metric, dataset)
    reg = _check_registry(registry, side, dataset)
    index = trained if trained is not None else train_ivf(dataset, factory=factory, metric=metric,
                                                          train_rows=train_rows, seed=seed)
    blob = faiss.serialize_index(index).tobytes()
    offsets = np.cumsum([0, *rows[:-1]]).tolist()
    merged = faiss.deserialize_index(np.frombuffer(blob, np.uint8))
    for shard in _shards(blob, paths, offsets, chunk_rows, engine, address):
        try:
            merged.merge_from(faiss.deserialize_index(np.frombuffer(shard, np.uint8)), 0)
        except RuntimeError as e:
            raise ValueError(f"faiss cannot merge shards of {factory!r}: {_faiss_msg(e)}; use a plain IVF "
                             "factory (IVFn,Flat / IVFn,PQm / IVFn,SQ8)") from None
    legacy = LegacyIndex(merged, version=int(side["version"]), source_version=int(side["source_version"]),
                         registry=reg, metric=str(metric).lower(), factory=factory,
                         normalize=bool((side.get("provenance") or {}).get("normalize", False)),
                         registry_checksum=side["registry_checksum"], chain_checksum=side["chain_checksum"])
    if path is not None:
        legacy.save(path)
    return legacy


def _check_trained(trained: Any, d: int, metric: str, dataset: str) -> None:
    """A ``trained`` index must be a trained, empty faiss index of the dataset's dimension and of ``metric``."""
    faiss_metric(metric)  # ValueError for anything but "ip" / "l2"
    if not all(hasattr(trained, a) for a in ("d", "metric_type", "is_trained", "ntotal")):
        raise TypeError(f"trained must be a faiss index (from train_ivf or faiss.index_factory), got "
                        f"{type(trained).__name__}")
    if not trained.is_trained or trained.ntotal:
        raise ValueError("trained must be a trained, empty faiss index (index.is_trained and ntotal == 0)")
    if int(trained.d) != d:
        raise ValueError(f"trained is a {int(trained.d)}-d index but {dataset} holds {d}-d rows; train it on this "
                         f"dataset (train_ivf({dataset!r}, ...)) or pass the dataset it was trained for")
    got = _index_metric(trained)
    if got != metric.lower():
        uses = repr(got) if got is not None else f"faiss metric_type {int(trained.metric_type)}"
        fix = f"pass metric={got!r}, or train it with metric={metric!r}" if got is not None else \
            f"train it with metric={metric!r}"
        raise ValueError(f"metric={metric!r} but the trained index uses {uses}, which its searches would use "
                         f"while the index says {metric!r}; {fix}")


def _check_registry(registry: Any, side: dict, dataset: str) -> Any:
    if registry is None:
        return None
    from ..store.registry import Registry

    reg = registry if isinstance(registry, Registry) else Registry.open(os.fspath(registry))
    if reg.checksum != side.get("registry_checksum"):
        raise ValueError(f"the registry {reg.path} (checksum {reg.checksum[:12]}) is not the one {dataset} was "
                         f"converted with ({str(side.get('registry_checksum'))[:12]}); pass that registry")
    return reg


def _shards(blob: bytes, paths: list[str], offsets: list[int], chunk_rows: int, engine: str,
            address: str | None) -> Any:
    """The filled shard indexes, serialized, in file order."""
    if engine == "local":
        for p, off in zip(paths, offsets):
            yield _add_shard(blob, p, off, chunk_rows)
        return
    from .._util.ray_runtime import import_ray, quiet_ray_deprecations, start_ray

    ray = import_ray(local=not address)
    started = start_ray(ray, address)
    try:
        with quiet_ray_deprecations():
            task = ray.remote(num_cpus=1, max_retries=2)(_add_shard)
            ref = ray.put(blob)
            futures = [task.remote(ref, p, off, chunk_rows) for p, off in zip(paths, offsets)]
            for f in futures:  # in order: merge shard i while later shards are still being filled
                yield ray.get(f)
    finally:
        if started:
            ray.shutdown()
