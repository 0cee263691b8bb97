"""Legacy search in a LanceDB table: a version-j table queried with newer-version vectors.

A table converted by ``bc-fast convert`` into ``<db>/<name>.lance`` records what it holds (the version,
the version it was converted from, the registry's chain checksum) in its schema metadata and in its
sidecar ``<db>/<name>.lance.bcfast.json``. :class:`LanceLegacyTable` opens it with the registry,
refuses a registry whose chain changed since, maps queries of any newer version into the table's
version through the fused operator (``registry.operator(query_version, version)``) and searches with
LanceDB's own API (``table.search(vec).distance_type(...).limit(k)``), so LanceDB's vector indexes,
filters and storage serve legacy consumers as they serve current ones.

``lancedb`` is imported inside functions (``pip install "bc-fast[lance]"``). This module may import
:mod:`bc_fast.convert` (the sidecar), :mod:`bc_fast.store`, :mod:`bc_fast.engine` and ``bc_fast._util``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._util.arrays import as_numpy
from .._util.optional import import_optional
from ..engine import FusedTransform
from ..store.registry import Registry, RegistryError

__all__ = ["LanceLegacyTable", "import_lancedb"]

_METRICS = {"l2": "l2", "cosine": "cosine", "dot": "dot", "ip": "dot"}


def import_lancedb() -> Any:
    """Import ``lancedb`` lazily, with a clear error if missing."""
    return import_optional("lancedb", needed_for="LanceDB tables", extra="lance", packages="lancedb and pylance")


def _table_record(path: str) -> dict:
    """What the converted table records about itself: its sidecar, else its schema metadata."""
    from ..convert.job import read_sidecar
    from ..store.lance import _bc_fast_meta, import_lance

    side = read_sidecar(path)
    if side is not None:
        return {"version": side.get("version"), "source_version": side.get("source_version"),
                "chain_checksum": side.get("chain_checksum"), "registry_checksum": side.get("registry_checksum"),
                "normalize": bool((side.get("operator") or {}).get("normalize", False)),
                "column": (side.get("input") or {}).get("column")}
    meta = _bc_fast_meta(import_lance().dataset(path).schema)
    return {**meta, "normalize": None}


class LanceLegacyTable:
    """A LanceDB table of version-``version`` vectors, searched with queries of newer versions.

    Open one with :meth:`open`. Attributes: ``table`` (the ``lancedb`` table), ``version``,
    ``source_version``, ``column`` (the vector column), ``registry``, ``normalize``.
    """

    def __init__(self, table: Any, *, version: int, source_version: int, column: str, registry: Registry,
                 chain_checksum: str, normalize: bool, dim: int) -> None:
        self.table = table
        self.version = int(version)
        self.source_version = int(source_version)
        self.column = column
        self.registry = registry
        self.chain_checksum = chain_checksum
        self.normalize = bool(normalize)
        self.d = int(dim)
        self._ops: dict[int, FusedTransform | None] = {}

    def __repr__(self) -> str:
        return (f"LanceLegacyTable({self.table.name!r}, version={self.version}, "
                f"source_version={self.source_version}, d={self.d}, column={self.column!r})")

    @classmethod
    def open(cls, db: str | os.PathLike, name: str, registry: Registry | str | os.PathLike, *,
             normalize: bool | None = None) -> LanceLegacyTable:
        """Open table ``name`` of the embedded LanceDB at ``db``, converted by ``bc-fast convert``.

        Parameters
        ----------
        db : path of the LanceDB database (the folder holding ``<name>.lance``)
        name : the table's name
        registry : Registry or registry path
            Refused if its chain ``source_version -> version`` differs from the one the table was
            converted with.
        normalize : bool, optional
            L2-normalise transformed queries (default: as the conversion did, per the sidecar).
        """
        lancedb = import_lancedb()
        reg = registry if isinstance(registry, Registry) else Registry.open(os.fspath(registry))
        path = os.path.join(os.fspath(db), f"{name}.lance")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"LanceDB table {name!r} not found: {path} does not exist")
        rec = _table_record(path)
        if rec.get("version") is None or rec.get("source_version") is None or not rec.get("chain_checksum"):
            raise ValueError(f"{path} does not say which embedding version it holds (no bc_fast sidecar "
                             f"{path}.bcfast.json and no bc_fast schema metadata); legacy search needs a table "
                             "written by `bc-fast convert`")
        version, source = int(rec["version"]), int(rec["source_version"])
        if reg.chain_checksum(source, version) != rec["chain_checksum"]:
            raise RegistryError(
                f"registry {reg.path} now maps version {source} -> {version} with other transforms than the ones "
                f"{path} was converted with; queries would land in another space. Convert the table again "
                "from the registry as it is now")
        table = lancedb.connect(os.fspath(db)).open_table(name)
        column = rec.get("column")
        schema = table.schema
        if column is None or column not in schema.names:
            from ..store.lance import LanceReader
            reader = LanceReader(path)
            column = reader.column
            reader.close()
        dim = int(schema.field(column).type.list_size)
        if dim != reg.dim(version):
            raise ValueError(f"{path}: column {column!r} has dim {dim}, but version {version} has dim "
                             f"{reg.dim(version)} in registry {reg.path}")
        norm = bool(rec.get("normalize")) if normalize is None else bool(normalize)
        return cls(table, version=version, source_version=source, column=column, registry=reg,
                   chain_checksum=rec["chain_checksum"], normalize=norm, dim=dim)

    def query_operator(self, query_version: int) -> FusedTransform | None:
        """The fused operator mapping ``query_version`` queries into the table's version (None if equal)."""
        if isinstance(query_version, bool) or not isinstance(query_version, (int, np.integer)):
            raise TypeError(f"query_version must be an int version number, got {query_version!r}")
        qv = int(query_version)
        if qv not in self._ops:
            if qv < self.version:
                raise RegistryError(f"query_version={qv} is older than the table's version {self.version}; "
                                    "there are no forward transforms unless fitted")
            self._ops[qv] = (None if qv == self.version
                             else self.registry.operator(qv, self.version, normalize=self.normalize))
        return self._ops[qv]

    def transform_queries(self, queries: Any, query_version: int) -> tuple[np.ndarray, bool]:
        """Queries of ``query_version`` as float32 vectors of the table's version (2-D), and whether
        the input was one 1-D query."""
        op = self.query_operator(query_version)
        try:
            q, _ = as_numpy(queries, "queries", copy_from_device=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"queries must be a float array of shape (n, d) or (d,), got {type(queries).__name__} "
                            f"({str(e)[:120]})") from None
        single = q.ndim == 1
        q = q.reshape(1, -1) if single else q
        if q.ndim != 2 or q.dtype.kind != "f":
            raise ValueError(f"queries must be a 1-D or 2-D float array, got shape {q.shape} dtype {q.dtype}")
        d_q = self.d if op is None else op.d_in
        if q.shape[1] != d_q:
            raise ValueError(f"queries have {q.shape[1]} features but version {int(query_version)} has dim {d_q}; "
                             "set query_version to the version the queries come from")
        if not np.isfinite(q).all():
            raise ValueError("queries hold NaN or Inf; LanceDB would return meaningless neighbours")
        if op is not None:
            q = op.apply(np.ascontiguousarray(q, np.float32))
        else:
            q = np.asarray(q, np.float32)
            if self.normalize:
                q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return q, single

    def search(self, queries: Any, k: int, *, query_version: int, metric: str = "l2", id_column: str = "id",
               where: str | None = None, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Search the table with queries of ``query_version``, transformed on the fly when newer.

        Parameters
        ----------
        queries : ndarray of shape (n, dim(query_version)) or (dim(query_version),)
        k : int
            Neighbours per query, ``1 <= k <= rows``.
        query_version : int
            The version the queries belong to.
        metric : {"l2", "cosine", "dot"} ("ip" is "dot")
            LanceDB's distance: squared L2, ``1 - cos``, or ``1 - dot``; smaller is nearer.
        id_column : str, default "id"
            The column whose values come back as the neighbours' ids.
        where : str, optional
            A LanceDB SQL filter, applied before the search.
        exact : bool
            Bypass a vector index (brute force) even if the table has one.

        Returns
        -------
        D : ndarray of shape (n, k), float32 (LanceDB's ``_distance``)
        I : ndarray of shape (n, k), the ``id_column`` values (1-D results for a 1-D query)
        """
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
        if id_column not in self.table.schema.names:
            raise ValueError(f"no column {id_column!r} in table {self.table.name!r}; columns are "
                             f"{self.table.schema.names}; pass id_column=")
        n_rows = self.table.count_rows()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_rows:
            raise ValueError(f"k must be an integer between 1 and the {n_rows} rows of the table, got {k!r}")
        q, single = self.transform_queries(queries, query_version)
        D = np.empty((len(q), int(k)), np.float32)
        ids: list[Any] = []
        for i, vec in enumerate(q):
            s = self.table.search(vec, vector_column_name=self.column).distance_type(_METRICS[metric])
            if where is not None:
                s = s.where(where, prefilter=True)
            if exact:
                s = s.bypass_vector_index()
            res = s.select([id_column, "_distance"]).limit(int(k)).to_arrow()
            if res.num_rows != k:
                raise ValueError(f"LanceDB returned {res.num_rows} neighbours for query {i}, fewer than k={k} "
                                 "(a filter or an approximate index); lower k")
            D[i] = res.column("_distance").to_numpy()
            ids.append(res.column(id_column).to_numpy(zero_copy_only=False))
        I = np.stack(ids)
        if single:
            return D[0], I[0]
        return D, I

    def describe(self) -> dict:
        """Version, source version, column and dim, as JSON."""
        return {"table": self.table.name, "version": self.version, "source_version": self.source_version,
                "column": self.column, "d": self.d, "normalize": self.normalize}
