"""Chroma persistent stores: a collection's vectors read in chunks and written into a new store.

What lives here: :func:`import_chromadb` (``chromadb`` is optional: ``pip install "bc-fast[chroma]"``),
:func:`is_chroma_store`, :class:`ChromaReader` (one collection of an embedded Chroma store, the folder a
``chromadb.PersistentClient(path=...)`` opens, read in insertion order with ids, metadatas, documents and
uris) and :class:`ChromaWriter` (the converted collection, same name, ids, metadatas, documents and uris,
in a *new* persist folder written at ``OUTPUT.partial`` and renamed to ``OUTPUT`` when complete, so the
publishing is one directory rename, as for a Lance table). A killed run resumes by deleting the records
added after the journal's last durable point. Chroma stores float32 vectors only. It may import
:mod:`.table_base` and ``bc_fast._util``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from .._util.fileio import fsync_dir
from .._util.optional import import_optional
from .table_base import Chunk, TableReader, TableWriter

CHROMA_DB_FILE = "chroma.sqlite3"
_META_KEY = "bc_fast"
_INCLUDE = ["embeddings", "metadatas", "documents", "uris"]
# Chroma's collection metadata keys that configure the index; the writer passes the configuration instead
_HNSW_PREFIX = "hnsw:"
_PAGE = 5000  # ids per page when reading ids only


def import_chromadb() -> Any:
    """Import ``chromadb`` lazily, with a clear error if missing."""
    return import_optional("chromadb", needed_for="Chroma stores", extra="chroma", packages="chromadb")


def is_chroma_store(path: str) -> bool:
    """True if ``path`` is a Chroma persist folder (it holds ``chroma.sqlite3``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CHROMA_DB_FILE))


def open_client(path: str) -> Any:
    """An embedded Chroma client on the persist folder ``path`` (no telemetry, no server)."""
    chromadb = import_chromadb()
    from chromadb.config import Settings

    try:
        return chromadb.PersistentClient(path=path, settings=Settings(anonymized_telemetry=False))
    except ValueError as e:
        if "different settings" not in str(e):
            raise
        # the caller already has a client on this folder: share its system (Chroma allows one per folder)
        return chromadb.PersistentClient(path=path)


def _close(client: Any) -> None:
    if client is not None:
        client.close()  # releases Chroma's per-folder system, so the folder can be renamed


def _pick_collection(client: Any, path: str, name: str | None) -> Any:
    names = sorted(c.name for c in client.list_collections())
    if name is None:
        if len(names) != 1:
            raise ValueError(f"{path}: the Chroma store holds {len(names)} collections ({', '.join(names) or 'none'}); "
                             "name the one to convert with --column NAME (column=NAME)")
        name = names[0]
    if name not in names:
        raise ValueError(f"{path}: the Chroma store has no collection {name!r} (it has: {', '.join(names) or 'none'})")
    return client.get_collection(name, embedding_function=None)


def _f32(emb: Any, rows: int, dim: int, where: str) -> np.ndarray:
    x = np.asarray(emb if emb is not None else [], dtype=np.float32)
    if x.shape != (rows, dim):
        raise ValueError(f"{where}: Chroma returned embeddings of shape {x.shape}, expected {(rows, dim)}; "
                         "the collection changed during the conversion?")
    return np.ascontiguousarray(x)


class ChromaReader(TableReader):
    """One collection of a Chroma persist folder, read in insertion order (offset / limit).

    Chroma has no snapshots: the fingerprint (record count and a sha256 of every id in order) makes a
    resumed run refuse a collection that changed, but rows added while a run reads are not fenced off.
    """

    format = "chroma"

    def __init__(self, path: str, collection: str | None = None) -> None:
        self.path = path
        self._client = open_client(path)
        try:
            self._col = _pick_collection(self._client, path, collection)
            self.collection = self._col.name
            self.n_rows = int(self._col.count())
            if self.n_rows == 0:
                raise ValueError(f"{path}: Chroma collection {self.collection!r} is empty; nothing to convert")
            first = self._col.get(limit=1, offset=0, include=["embeddings"])["embeddings"]
            self.dim = int(np.asarray(first).shape[1])
        except BaseException:
            self.close()
            raise
        self.dtype = np.dtype(np.float32)
        self.part_rows = [self.n_rows]
        self.metadata = dict(self._col.metadata or {})
        self.configuration = self._col.configuration_json  # raw: .configuration warns on a legacy one

    def _get(self, offset: int, limit: int, include: list[str]) -> dict:
        got = self._col.get(offset=offset, limit=limit, include=include)
        if len(got["ids"]) != limit:
            raise ValueError(f"{self.path}: collection {self.collection!r} yielded {len(got['ids'])} records at "
                             f"offset {offset}, expected {limit}; it changed during the conversion?")
        return got

    def read(self, chunk: Chunk, buf: np.ndarray) -> tuple[np.ndarray, Any]:
        got = self._get(chunk.start, chunk.rows, _INCLUDE)
        x = _f32(got["embeddings"], chunk.rows, self.dim, f"{self.path} rows {chunk.start}..{chunk.stop}")
        extra = {"ids": got["ids"], "metadatas": got["metadatas"], "documents": got["documents"],
                 "uris": got["uris"]}
        return x, extra

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), np.float32)
        for i, r in enumerate(np.asarray(rows, np.int64)):
            out[i] = _f32(self._get(int(r), 1, ["embeddings"])["embeddings"], 1, self.dim, self.path)[0]
        return out

    def _ids_sha256(self) -> str:
        h = hashlib.sha256()
        for start in range(0, self.n_rows, _PAGE):
            for i in self._get(start, min(_PAGE, self.n_rows - start), [])["ids"]:
                h.update(i.encode() + b"\0")
        return h.hexdigest()

    def fingerprint(self) -> dict:
        return {"format": self.format, "path": os.path.abspath(self.path), "collection": self.collection,
                "collection_id": str(self._col.id), "shape": [self.n_rows, self.dim], "dtype": str(self.dtype),
                "ids_sha256": self._ids_sha256()}

    def describe(self) -> dict:
        d = super().describe()
        d.update(collection=self.collection, collection_id=str(self._col.id))
        return d

    def close(self) -> None:
        _close(getattr(self, "_client", None))
        self._client = None


def _index_configuration(configuration: Any) -> dict | None:
    """The input collection's index settings (space, ef, ...) without its embedding function: that
    names the model of the *input* version, and would embed new documents and queries in the wrong space."""
    if not isinstance(configuration, dict):
        return None
    out = {k: dict(v) for k, v in configuration.items() if k in ("hnsw", "spann") and isinstance(v, dict)}
    return out or None


class ChromaWriter(TableWriter):
    """The converted collection in a new Chroma persist folder at the temporary path (float32 only).

    Each chunk is one or more ``add`` calls; :meth:`sync` fsyncs the folder. The collection keeps the
    input's name, ids, metadatas, documents, uris and index settings (space, ef, ...); its metadata
    gains ``bc_fast`` (JSON: version, source version, checksums).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import_chromadb()
        if self.dtype != np.float32:
            raise TypeError(f"Chroma stores float32 vectors only; drop --dtype {self.dtype} (dtype={str(self.dtype)!r})")
        reader: ChromaReader = self.reader  # type: ignore[assignment]
        self.output = self.temp.removesuffix(".partial")
        self.collection = reader.collection
        meta = {k: v for k, v in reader.metadata.items() if not k.startswith(_HNSW_PREFIX) and k != _META_KEY}
        meta[_META_KEY] = json.dumps(self.metadata, sort_keys=True)
        self._meta = meta
        self._config = _index_configuration(reader.configuration)
        space = ((self._config or {}).get("hnsw") or {}).get("space") or reader.metadata.get("hnsw:space")
        # Chroma keeps cosine-space vectors in a form that reads back within an ulp, not bit for bit
        self._read_back = space == "cosine"
        self._client: Any = None
        self._col: Any = None
        self._synced: set[str] = set()

    def _collection(self) -> Any:
        if self._col is None:
            self._client = open_client(self.temp)
            self._col = self._client.get_collection(self.collection, embedding_function=None)
        return self._col

    def create(self) -> None:
        self._client = open_client(self.temp)
        self._col = self._client.create_collection(self.collection, metadata=self._meta,
                                                   configuration=self._config, embedding_function=None)

    def reopen(self, done_chunks: int) -> None:
        if not is_chroma_store(self.temp):
            raise ValueError(f"cannot resume: partial output {self.temp} is missing or not a Chroma store; "
                             "delete the journal and start again")
        col = self._collection()
        want = self.chunks[done_chunks - 1].stop if done_chunks else 0
        have = int(col.count())
        if have < want:
            raise ValueError(f"cannot resume: the partial output {self.temp} holds {have} records but its journal "
                             f"records {want}; delete {self.temp} and its journal and start again")
        self.drop_after(done_chunks)  # records added after the journal's last durable point are redone

    def drop_after(self, done_chunks: int) -> None:
        col = self._collection()
        want = self.chunks[done_chunks - 1].stop if done_chunks else 0
        have = int(col.count())
        if have > want:
            ids = col.get(offset=want, limit=have - want, include=[])["ids"]
            step = self._client.get_max_batch_size()
            for i in range(0, len(ids), step):
                col.delete(ids=ids[i:i + step])

    def write(self, chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        col = self._collection()
        have = int(col.count())
        if have != chunk.start:
            raise RuntimeError(f"{self.temp}: chunk {chunk.index} written after {have} records; chunks must come "
                               "in order")
        step = self._client.get_max_batch_size()
        for a in range(0, chunk.rows, step):
            b = min(chunk.rows, a + step)
            col.add(ids=extra["ids"][a:b], embeddings=y[a:b],
                    **{k: extra[k][a:b] for k in ("metadatas", "documents", "uris") if _has_any(extra[k])})
        if self._read_back:
            # the journal's checksum and the verification see exactly what the store holds
            y[...] = self.read_chunk(chunk)

    def sync(self) -> None:
        """fsync every file of the store, then its folders."""
        for d, _, names in os.walk(self.temp):
            for n in names:
                fd = os.open(os.path.join(d, n), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(d)

    def read_chunk(self, chunk: Chunk) -> np.ndarray:
        got = self._collection().get(offset=chunk.start, limit=chunk.rows, include=["embeddings"])
        return _f32(got["embeddings"], chunk.rows, self.dim, self.temp)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        col = self._collection()
        out = np.empty((len(rows), self.dim), np.float32)
        for i, r in enumerate(np.asarray(rows, np.int64)):
            out[i] = _f32(col.get(offset=int(r), limit=1, include=["embeddings"])["embeddings"], 1, self.dim,
                          self.temp)[0]
        return out

    def seal(self) -> None:
        self.sync()
        self.close()

    def files(self) -> list[str]:
        where = self.temp if os.path.isdir(self.temp) else self.output
        if not os.path.isdir(where):
            return []
        return sorted(os.path.relpath(os.path.join(d, n), where) for d, _, ns in os.walk(where) for n in ns)

    def expected_bytes(self) -> int:
        return 3 * super().expected_bytes() + (1 << 20)  # the log in SQLite plus the HNSW index

    def close(self) -> None:
        _close(self._client)
        self._client = self._col = None


def _has_any(values: Any) -> bool:
    return values is not None and any(v is not None for v in values)
