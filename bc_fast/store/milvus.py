"""Milvus Lite stores: a collection's float vectors read in chunks and written into a new store.

What lives here: :func:`import_pymilvus` (``pymilvus`` and ``milvus-lite`` are optional:
``pip install "bc-fast[milvus]"``), :func:`is_milvus_store`, :class:`MilvusReader` (one collection of a
Milvus Lite store, the ``<name>.db`` folder a ``pymilvus.MilvusClient("<name>.db")`` opens, read in
primary-key order, every field and dynamic field kept) and :class:`MilvusWriter` (the converted
collection, same name, schema, primary keys and fields, in a *new* store built at
``OUTPUT.partial/<name>.db`` and renamed to ``OUTPUT`` when complete: one directory rename, as for a
Lance table). A killed run resumes by deleting the rows whose key lies past the journal's last durable
chunk. Only ``FLOAT_VECTOR`` fields (float32) are converted. It may import :mod:`.table_base` and
``bc_fast._util``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from .._util.fileio import fsync_dir
from .._util.optional import import_optional
from .table_base import Chunk, TableReader, TableWriter

MILVUS_SUFFIX = ".db"
_META_KEY = "bc_fast"
_PAGE = 10000


def import_pymilvus() -> Any:
    """Import ``pymilvus`` (with ``milvus_lite``) lazily, with a clear error if missing."""
    for module in ("milvus_lite", "pymilvus"):  # pymilvus opens a local .db only through milvus_lite
        found = import_optional(module, needed_for="Milvus Lite stores", extra="milvus",
                                packages="pymilvus and milvus-lite")
    return found


def is_milvus_store(path: str) -> bool:
    """True if ``path`` is a Milvus Lite store: a ``*.db`` folder with a ``collections`` folder."""
    return (os.path.isdir(path) and os.path.normpath(path).endswith(MILVUS_SUFFIX)
            and os.path.isdir(os.path.join(path, "collections")))


def open_client(path: str) -> Any:
    """A Milvus Lite client on the store ``path`` (a ``.db`` folder). Milvus Lite serves it from a thread of
    this process, on a gRPC port bound to 127.0.0.1, and locks the folder; :func:`close_client` ends both."""
    pymilvus = import_pymilvus()
    from milvus_lite import server_manager_instance

    path = os.path.abspath(path)
    already = path in getattr(server_manager_instance, "_servers", {})
    client = pymilvus.MilvusClient(path)
    client._bc_fast_release = None if already else path
    return client


def close_client(client: Any) -> None:
    """Close a client of :func:`open_client` and stop the store's server if this process started it for
    the client (a server the caller had already started keeps running)."""
    if client is None:
        return
    client.close()
    if client._bc_fast_release:
        from milvus_lite import server_manager_instance

        server_manager_instance.release_server(client._bc_fast_release)


def _dtype_name(t: Any) -> str:
    return getattr(t, "name", str(t))


def _count(client: Any, name: str) -> int:
    got = client.query(name, filter="", output_fields=["count(*)"])
    return int(got[0]["count(*)"])


def _literal(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else str(int(v))


class MilvusReader(TableReader):
    """One collection of a Milvus Lite store, read in primary-key order.

    ``collection`` is ``NAME`` or ``NAME.FIELD`` (Milvus names hold no dots), needed when the store holds
    several collections or the collection several float-vector fields. The keys are read and sorted when
    the reader opens; a chunk is the rows whose key lies in its range. The fingerprint (row count and a
    sha256 of the sorted keys) makes a resumed run refuse a collection that changed.
    """

    format = "milvus"

    def __init__(self, path: str, collection: str | None = None) -> None:
        self.path = path
        self._client = open_client(path)
        try:
            self._open(collection)
        except BaseException:
            self.close()
            raise

    def _open(self, collection: str | None) -> None:
        path, client = self.path, self._client
        name, _, field = (collection or "").partition(".")
        names = sorted(client.list_collections())
        if not name:
            if len(names) != 1:
                raise ValueError(f"{path}: the Milvus store holds {len(names)} collections ({', '.join(names) or 'none'}); "
                                 "name the one to convert with --column NAME (column=NAME)")
            name = names[0]
        if name not in names:
            raise ValueError(f"{path}: the Milvus store has no collection {name!r} (it has: {', '.join(names) or 'none'})")
        self.collection = name
        self.schema = client.describe_collection(name)
        fields = self.schema["fields"]
        self.pk = next(f["name"] for f in fields if f.get("is_primary"))
        vecs = [f for f in fields if _dtype_name(f["type"]).endswith("VECTOR")]
        if field:
            vecs = [f for f in vecs if f["name"] == field]
            if not vecs:
                raise ValueError(f"{path}: collection {name!r} has no vector field {field!r}")
        if len(vecs) != 1:
            raise ValueError(f"{path}: collection {name!r} has {len(vecs)} vector fields "
                             f"({', '.join(f['name'] for f in vecs)}); pick one with --column {name}.FIELD")
        vf = vecs[0]
        if _dtype_name(vf["type"]) != "FLOAT_VECTOR":
            raise TypeError(f"{path}: field {vf['name']!r} of {name!r} is a {_dtype_name(vf['type'])}; only "
                            "FLOAT_VECTOR (float32) fields are converted")
        self.column = vf["name"]
        self.dim = int(vf["params"]["dim"])
        self.dtype = np.dtype(np.float32)
        self.keys = self._sorted_keys()
        self.n_rows = len(self.keys)
        if self.n_rows == 0:
            raise ValueError(f"{path}: Milvus collection {name!r} is empty; nothing to convert")
        self.part_rows = [self.n_rows]

    def _sorted_keys(self) -> list:
        logging.getLogger("pymilvus").setLevel(logging.ERROR)  # the lite server has no MVCC timestamp: a warning
        it = self._client.query_iterator(self.collection, batch_size=_PAGE, filter="", output_fields=[self.pk])
        keys: list = []
        try:
            while batch := it.next():
                keys.extend(r[self.pk] for r in batch)
        finally:
            it.close()
        return sorted(keys)

    def rows_of(self, client: Any, name: str, start: int, stop: int, fields: list[str], where: str) -> list[dict]:
        """The rows ``[start, stop)`` (in key order) of collection ``name``, sorted by key."""
        lo, hi = self.keys[start], self.keys[stop - 1]
        flt = f"{self.pk} >= {_literal(lo)} and {self.pk} <= {_literal(hi)}"
        # plain dicts first: pymilvus fills dynamic fields lazily, by position, so sorting its list mixes them up
        rows = [dict(r) for r in client.query(name, filter=flt, output_fields=fields, limit=stop - start + 1)]
        if len(rows) != stop - start:
            raise ValueError(f"{where}: collection {name!r} holds {len(rows)} rows with keys in [{lo!r}, {hi!r}], "
                             f"expected {stop - start}; it changed during the conversion?")
        rows.sort(key=lambda r: r[self.pk])
        return rows

    def vectors(self, rows: list[dict], where: str, dim: int | None = None) -> np.ndarray:
        """The vector field of ``rows`` as a C-contiguous (n, dim) float32 array (dim: the input's)."""
        dim = self.dim if dim is None else dim
        x = np.asarray([r[self.column] for r in rows], np.float32)
        if x.shape != (len(rows), dim):
            raise ValueError(f"{where}: vectors of shape {x.shape}, expected {(len(rows), dim)}")
        return np.ascontiguousarray(x)

    def read(self, chunk: Chunk, buf: np.ndarray) -> tuple[np.ndarray, Any]:
        rows = self.rows_of(self._client, self.collection, chunk.start, chunk.stop, ["*"], self.path)
        return self.vectors(rows, self.path), rows

    def rows_at(self, client: Any, name: str, rows: np.ndarray, where: str, dim: int | None = None) -> np.ndarray:
        """The vectors of collection ``name`` at the positions ``rows`` (in key order), in one query."""
        keys = [self.keys[int(r)] for r in rows]
        got = {r[self.pk]: r[self.column] for r in (dict(q) for q in client.query(
            name, filter=f"{self.pk} in {json.dumps(keys)}", output_fields=[self.column], limit=len(keys) + 1))}
        missing = [k for k in keys if k not in got]
        if missing:
            raise ValueError(f"{where}: collection {name!r} has no rows with keys {missing[:5]}")
        return self.vectors([{self.column: got[k]} for k in keys], where, dim)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.rows_at(self._client, self.collection, rows, self.path)

    def fingerprint(self) -> dict:
        h = hashlib.sha256(json.dumps(self.keys).encode()).hexdigest()
        return {"format": self.format, "path": os.path.abspath(self.path), "collection": self.collection,
                "column": self.column, "shape": [self.n_rows, self.dim], "dtype": str(self.dtype), "keys_sha256": h}

    def describe(self) -> dict:
        d = super().describe()
        d.update(collection=self.collection, column=self.column)
        return d

    def close(self) -> None:
        close_client(getattr(self, "_client", None))
        self._client = None


class MilvusWriter(TableWriter):
    """The converted collection in a new Milvus Lite store built at ``OUTPUT.partial/<name>.db``.

    Same collection name, fields, primary keys (never auto-generated) and dynamic fields as the input;
    the collection's properties gain ``bc_fast`` (JSON: version, source version, checksums). The
    pipeline renames :attr:`merged` (the store) to ``OUTPUT``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import_pymilvus()
        if self.dtype != np.float32:
            raise TypeError(f"Milvus Lite stores are converted to float32 vectors only (FLOAT_VECTOR); drop "
                            f"--dtype {self.dtype} (dtype={str(self.dtype)!r})")
        self.output = self.temp.removesuffix(".partial")
        if not os.path.normpath(self.output).endswith(MILVUS_SUFFIX):
            raise ValueError(f"output {self.output} must end in {MILVUS_SUFFIX}, like the input {self.reader.path}: "
                             f"pymilvus opens a local store only by a <name>{MILVUS_SUFFIX} path")
        self.merged = os.path.join(self.temp, os.path.basename(os.path.normpath(self.output)))
        reader: MilvusReader = self.reader  # type: ignore[assignment]
        self.collection = reader.collection
        self._client: Any = None

    def _open(self) -> Any:
        if self._client is None:
            self._client = open_client(self.merged)
        return self._client

    def _schema(self) -> Any:
        from pymilvus import CollectionSchema, FieldSchema

        reader: MilvusReader = self.reader  # type: ignore[assignment]
        s = reader.schema
        fields = []
        for f in s["fields"]:
            params = dict(f.get("params") or {})
            if f["name"] == reader.column:
                params["dim"] = self.dim
            fields.append(FieldSchema(f["name"], f["type"], is_primary=bool(f.get("is_primary")),
                                      description=f.get("description", ""), **params))
        return CollectionSchema(fields, description=s.get("description", ""), auto_id=False,
                                enable_dynamic_field=bool(s.get("enable_dynamic_field")))

    def create(self) -> None:
        os.makedirs(self.temp, exist_ok=False)
        props = {k: v for k, v in (self.reader.schema.get("properties") or {}).items()  # type: ignore[attr-defined]
                 if k != _META_KEY}
        props[_META_KEY] = json.dumps(self.metadata, sort_keys=True)
        self._open().create_collection(self.collection, schema=self._schema(), properties=props)

    def reopen(self, done_chunks: int) -> None:
        if not is_milvus_store(self.merged):
            raise ValueError(f"cannot resume: partial output {self.merged} is missing or not a Milvus Lite store; "
                             "delete the journal and start again")
        self.drop_after(done_chunks)  # rows written after the journal's last durable point are redone
        want = self.chunks[done_chunks - 1].stop if done_chunks else 0
        have = _count(self._open(), self.collection)
        if have != want:
            raise ValueError(f"cannot resume: the partial output {self.merged} holds {have} rows up to the journal's "
                             f"last chunk, expected {want}; delete {self.temp} and its journal and start again")

    def drop_after(self, done_chunks: int) -> None:
        client, reader = self._open(), self.reader
        want = self.chunks[done_chunks - 1].stop if done_chunks else 0
        pk = reader.pk  # type: ignore[attr-defined]
        if want:
            client.delete(self.collection, filter=f"{pk} > {_literal(reader.keys[want - 1])}")  # type: ignore[attr-defined]
        elif _count(client, self.collection):
            client.delete(self.collection, filter=f"{pk} >= {_literal(reader.keys[0])}")  # type: ignore[attr-defined]

    def write(self, chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        column = self.reader.column  # type: ignore[attr-defined]
        rows = [{**r, column: v} for r, v in zip(extra, y)]
        self._open().insert(self.collection, rows)

    def sync(self) -> None:
        """fsync every file of the store, then its folders."""
        for d, _, names in os.walk(self.merged):
            for n in names:
                fd = os.open(os.path.join(d, n), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(d)

    def _chunk_vectors(self, start: int, stop: int) -> np.ndarray:
        reader: MilvusReader = self.reader  # type: ignore[assignment]
        rows = reader.rows_of(self._open(), self.collection, start, stop, [reader.column], self.merged)
        return reader.vectors(rows, self.merged, self.dim)

    def read_chunk(self, chunk: Chunk) -> np.ndarray:
        return self._chunk_vectors(chunk.start, chunk.stop)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.reader.rows_at(self._open(), self.collection, rows, self.merged, self.dim)  # type: ignore[attr-defined]

    def seal(self) -> None:
        self._open().flush(self.collection)
        self.sync()
        self.close()
        lock = os.path.join(self.merged, "LOCK")
        if os.path.isfile(lock) and os.path.getsize(lock) == 0:
            os.unlink(lock)  # an empty flock target, recreated by the next client

    def files(self) -> list[str]:
        where = self.merged if os.path.isdir(self.merged) else self.output
        if not os.path.isdir(where):
            return []
        return sorted(os.path.relpath(os.path.join(d, n), where) for d, _, ns in os.walk(where) for n in ns)

    def expected_bytes(self) -> int:
        return 2 * super().expected_bytes() + (1 << 20)  # the write-ahead log plus the flushed segment

    def close(self) -> None:
        close_client(self._client)
        self._client = None
