"""Lance datasets (LanceDB tables) whose vector column is ``fixed_size_list<float32|float16>``.

What lives here: :func:`import_lance` (``lance`` is optional: ``pip install "bc-fast[lance]"``),
:class:`LanceReader` (one part per fragment of the dataset's current version; the other columns, ids
and such, are carried through) and :class:`LanceWriter` (a new Lance dataset at the temporary path,
one fragment and one commit per chunk, so a killed run resumes by cutting the dataset back to the
chunks its journal records). An embedded LanceDB keeps table ``name`` in ``<db>/<name>.lance``, so a
converted table written to ``<db>/<name>_v0.lance`` is LanceDB table ``<name>_v0``. It may import
:mod:`.table_base`, :mod:`.parquet` (the embedding column rules) and ``bc_fast._util``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any

import numpy as np

from .._util.fileio import fsync_dir
from .._util.optional import import_optional
from .parquet import _find_embedding_column
from .table_base import Chunk, TableReader, TableWriter

LANCE_SUFFIX = ".lance"
_META_KEY = b"bc_fast"
# LanceDB stores its embedding-function config here; it names the model of the *input* version, so a
# converted table must not inherit it (LanceDB would embed new rows and queries into the wrong space).
_DROPPED_META = (b"embedding_functions",)


def import_lance() -> Any:
    """Import ``lance`` (the ``pylance`` package) lazily, with a clear error if missing."""
    return import_optional("lance", needed_for="LanceDB / Lance tables", extra="lance",
                           packages="lancedb and pylance")


def is_lance_dataset(path: str) -> bool:
    """True if ``path`` is a directory that looks like a Lance dataset (``*.lance`` or has ``_versions``)."""
    return os.path.isdir(path) and (os.path.normpath(path).endswith(LANCE_SUFFIX)
                                    or os.path.isdir(os.path.join(path, "_versions")))


def _vector_dtype(pa: Any, value_type: Any) -> np.dtype | None:
    return {str(pa.float32()): np.dtype(np.float32), str(pa.float16()): np.dtype(np.float16)}.get(str(value_type))


def _vectors(table: Any, column: str, dim: int, dtype: np.dtype, where: str) -> np.ndarray:
    """The embedding column of an Arrow table as a C-contiguous (rows, dim) array; nulls refused."""
    col = table.column(column).combine_chunks()
    if col.null_count:
        raise ValueError(f"{where}: column {column!r} has {col.null_count} null rows; fill or drop them "
                         "before converting")
    values = col.flatten()
    if values.null_count:
        raise ValueError(f"{where}: column {column!r} has null values")
    out = values.to_numpy(zero_copy_only=False).reshape(len(col), dim)
    return np.ascontiguousarray(out, dtype)


def _bc_fast_meta(schema: Any) -> dict:
    raw = (schema.metadata or {}).get(_META_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _relative_files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out.extend(os.path.relpath(os.path.join(d, n), root) for n in names)
    return sorted(out)


def _open_dataset(path: str, what: str) -> Any:
    lance = import_lance()
    try:
        return lance.dataset(path)
    except (OSError, ValueError, RuntimeError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path}: not a readable Lance dataset ({what}): {e}") from e


# --------------------------------------------------------------------------- reader

class LanceReader(TableReader):
    """The current version of a Lance dataset (a LanceDB table directory), read fragment by fragment.

    The version is pinned when the reader opens it: rows committed later are not seen, and a resumed
    conversion refuses an input whose version changed (its fingerprint names the version).
    """

    format = "lance"

    def __init__(self, path: str, column: str | None = None) -> None:
        import_lance()
        import pyarrow as pa

        self.path = path
        self._ds = _open_dataset(path, "input table")
        self.schema = self._ds.schema
        if column is None:
            cands = [f.name for f in self.schema if pa.types.is_fixed_size_list(f.type)]
            recorded = _bc_fast_meta(self.schema).get("column")
            if len(cands) > 1 and recorded in cands:
                column = recorded  # a table bc_fast converted names its vector column
        self.column = _find_embedding_column(self.schema, path, column)
        field = self.schema.field(self.column)
        if not pa.types.is_fixed_size_list(field.type):
            raise ValueError(f"{path}: column {self.column!r} has type {field.type}, expected a "
                             "fixed_size_list<float32|float16> vector column")
        dt = _vector_dtype(pa, field.type.value_type)
        if dt is None:
            raise TypeError(f"{path}: column {self.column!r} holds {field.type.value_type}; vectors must be "
                            "float32 or float16 (cast the column, e.g. to fixed_size_list<float>)")
        self.dtype = dt
        self.dim = int(field.type.list_size)
        if self.dim == 0:
            raise ValueError(f"{path}: column {self.column!r} has list size 0")
        self.version = int(self._ds.version)
        self._frags = self._ds.get_fragments()
        self.part_rows = [int(f.count_rows()) for f in self._frags]
        self.n_rows = int(sum(self.part_rows))

    def read(self, chunk: Chunk, buf: np.ndarray) -> tuple[np.ndarray, Any]:
        table = self._frags[chunk.part].to_table(offset=chunk.local, limit=chunk.rows)
        if table.num_rows != chunk.rows:
            raise ValueError(f"{self.path}: fragment {chunk.part} yielded {table.num_rows} rows, expected "
                             f"{chunk.rows}; the dataset changed during the conversion?")
        x = _vectors(table, self.column, self.dim, self.dtype, f"{self.path} rows {chunk.start}..{chunk.stop}")
        return x, table.drop_columns([self.column])

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        t = self._ds.take(np.asarray(rows, np.int64).tolist(), columns=[self.column])
        return _vectors(t, self.column, self.dim, self.dtype, f"{self.path} sampled rows")

    def data_bytes(self) -> int:
        """Bytes of the data files of the pinned version (all columns)."""
        return sum(int(d.file_size_bytes or 0) for f in self._frags for d in f.data_files())

    def fingerprint(self) -> dict:
        files = sorted((d.path, int(d.file_size_bytes or 0)) for f in self._frags for d in f.data_files())
        deletions = sorted(str(f.metadata.deletion_file) for f in self._frags if f.metadata.deletion_file)
        digest = hashlib.sha256(json.dumps([files, deletions]).encode()).hexdigest()
        return {"format": self.format, "path": os.path.abspath(self.path), "version": self.version,
                "column": self.column, "shape": [self.n_rows, self.dim], "dtype": str(self.dtype),
                "fragments": self.part_rows, "files_sha256": digest}

    def describe(self) -> dict:
        d = super().describe()
        d.update(column=self.column, lance_version=self.version)
        return d

    def close(self) -> None:
        self._frags = []
        self._ds = None


# --------------------------------------------------------------------------- writer

class LanceWriter(TableWriter):
    """A new Lance dataset under the temporary path: one fragment and one commit per chunk.

    After each durable point (:meth:`sync`) the superseded versions are cleaned up, so the history
    stays one manifest long and the published table is a single version holding every chunk.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import_lance()
        import pyarrow as pa

        output = self.temp.removesuffix(".partial")
        if not os.path.normpath(output).endswith(LANCE_SUFFIX):
            raise ValueError(f"output {output} must end in {LANCE_SUFFIX}, like the input {self.reader.path}: "
                             f"LanceDB opens <db>/<name>{LANCE_SUFFIX} as table <name>")
        self.output = output
        reader: LanceReader = self.reader  # type: ignore[assignment]
        self.column = reader.column
        vt = pa.float16() if self.dtype == np.float16 else pa.float32()
        old = reader.schema.field(self.column)
        field = pa.field(self.column, pa.list_(vt, self.dim), nullable=old.nullable, metadata=old.metadata)
        schema = reader.schema.set(reader.schema.get_field_index(self.column), field)
        meta = {k: v for k, v in (schema.metadata or {}).items() if k not in _DROPPED_META}
        meta[_META_KEY] = json.dumps({**self.metadata, "column": self.column}, sort_keys=True).encode()
        self.schema = schema.with_metadata(meta)
        self._vt = vt
        self._storage_version = str(reader._ds.data_storage_version)
        self._max_rows = max([c.rows for c in self.chunks] + [1])
        self._ds: Any = None
        self._synced: set[str] = set()

    # the dataset as committed so far
    def _dataset(self) -> Any:
        if self._ds is None:
            self._ds = _open_dataset(self.temp, "partial output")
        return self._ds

    def create(self) -> None:
        lance = import_lance()
        # an empty first version: the partial output is a valid dataset from the start
        self._ds = lance.write_dataset(self.schema.empty_table(), self.temp, mode="create",
                                       data_storage_version=self._storage_version)

    def reopen(self, done_chunks: int) -> None:
        if not os.path.isdir(self.temp):
            raise ValueError(f"cannot resume: partial output {self.temp} is missing; "
                             "delete the journal and start again")
        ds = self._dataset()
        frags = ds.get_fragments()
        if len(frags) < done_chunks:
            raise ValueError(f"cannot resume: the partial output {self.temp} holds {len(frags)} chunks but its "
                             f"journal records {done_chunks}; delete {self.temp} and its journal and start again")
        self.drop_after(done_chunks)  # chunks committed after the journal's last durable point are redone
        self._cleanup()

    def drop_after(self, done_chunks: int) -> None:
        lance = import_lance()
        ds = self._dataset()
        frags = ds.get_fragments()
        if len(frags) > done_chunks:
            op = lance.LanceOperation.Overwrite(self.schema, [f.metadata for f in frags[:done_chunks]])
            self._ds = lance.LanceDataset.commit(self.temp, op, read_version=ds.version)

    def write(self, chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        lance = import_lance()
        import pyarrow as pa

        ds = self._dataset()
        have = len(ds.get_fragments())
        if have != chunk.index:
            raise RuntimeError(f"{self.temp}: chunk {chunk.index} written after {have} chunks; chunks must come "
                               "in order")
        emb = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1), type=self._vt), self.dim)
        cols = {name: extra.column(name) for name in extra.column_names}
        cols[self.column] = emb
        table = pa.Table.from_arrays([cols[n] for n in self.schema.names], schema=self.schema)
        self._ds = lance.write_dataset(table, ds, mode="append", max_rows_per_file=self._max_rows)

    def _cleanup(self) -> None:
        """Drop superseded versions and files no version references (left by a killed write)."""
        self._dataset().cleanup_old_versions(older_than=datetime.timedelta(0), delete_unverified=True)
        self._synced.intersection_update(_relative_files(self.temp))

    def sync(self) -> None:
        """fsync every file of the dataset not synced yet, then its folders; then drop old versions."""
        for rel in _relative_files(self.temp):
            if rel in self._synced:
                continue
            fd = os.open(os.path.join(self.temp, rel), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if not rel.endswith(".json"):  # the version hint is rewritten in place
                self._synced.add(rel)
        for d in ("data", "_versions", "_transactions", ""):
            if os.path.isdir(os.path.join(self.temp, d)):
                fsync_dir(os.path.join(self.temp, d))
        self._cleanup()

    def read_chunk(self, chunk: Chunk) -> np.ndarray:
        frags = self._dataset().get_fragments()
        if chunk.index >= len(frags):
            raise ValueError(f"{self.temp}: chunk {chunk.index} is missing")
        t = frags[chunk.index].to_table(columns=[self.column])
        if t.num_rows != chunk.rows:
            raise ValueError(f"{self.temp}: chunk {chunk.index} holds {t.num_rows} rows, expected {chunk.rows}")
        return _vectors(t, self.column, self.dim, self.dtype, self.temp)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        t = self._dataset().take(np.asarray(rows, np.int64).tolist(), columns=[self.column])
        return _vectors(t, self.column, self.dim, self.dtype, self.temp)

    def seal(self) -> None:
        self.sync()

    def files(self) -> list[str]:
        where = self.temp if os.path.isdir(self.temp) else self.output
        return _relative_files(where) if os.path.isdir(where) else []

    def expected_bytes(self) -> int:
        reader: LanceReader = self.reader  # type: ignore[assignment]
        vec_in = reader.n_rows * reader.dim * reader.dtype.itemsize
        others = max(0, reader.data_bytes() - vec_in)  # ids and other columns, copied as they are
        return super().expected_bytes() + others + (1 << 20)

    def close(self) -> None:
        self._ds = None
