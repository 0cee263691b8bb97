"""Readers and writers of embedding tables for streaming conversion.

Three forms, each read and written in chunks of rows so memory is bounded by the
chunk size, never by the table:

- ``.npy``: one 2-D C-ordered float32/float16 array. Read with ``pread`` into a
  reused buffer (no memory map: mapped pages count in the process's RSS), written
  with ``pwrite`` into a preallocated file whose header is exactly ``np.save``'s.
- a directory of ``.npy`` shards (same dim and dtype): converted shard by shard
  into a directory with the same file names.
- Parquet with a fixed-size-list embedding column: the other columns (ids, ...)
  are carried through. Needs pyarrow (``pip install bc_fast[parquet]``). Each
  chunk is written as its own part file (Arrow IPC), so a killed run can resume; the
  parts are merged into one Parquet file (one row group per chunk) as the run goes.
- a Lance dataset (a LanceDB table, ``<db>/<name>.lance``) with a fixed-size-list vector
  column: the other columns are carried through into a new dataset, one fragment and one
  commit per chunk. Needs the lance extra (``pip install "bc-fast[lance]"``).
- a collection of a Chroma store (the folder of a ``chromadb.PersistentClient``) or of a Milvus Lite
  store (the ``.db`` folder of a ``MilvusClient``), chosen with ``column`` if the store holds several:
  converted, with its ids and other fields, into the same-named collection of a new store at OUTPUT
  (:mod:`.chroma`, :mod:`.milvus`; the chroma / milvus extras).

Writers only ever write under a temporary path; :mod:`bc_fast.convert` renames it
into place when the table is complete.

The format-specific code lives in :mod:`.npy`, :mod:`.parquet` and :mod:`.lance`, on the base classes of
:mod:`.table_base`; this module picks the format (:func:`open_table`, :func:`make_writer`) and
re-exports every name, so ``from bc_fast.store.tables import NpyWriter`` keeps working.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np

from .chroma import ChromaReader, ChromaWriter, is_chroma_store
from .lance import LanceReader, LanceWriter, import_lance, is_lance_dataset
from .milvus import MilvusReader, MilvusWriter, is_milvus_store
from .npy import NpyHeader, NpyReader, NpyWriter, npy_header_bytes, read_npy_header
from .parquet import _PARQUET_SUFFIXES, ParquetReader, ParquetWriter, import_pyarrow
from .table_base import (
    DTYPES,
    Chunk,
    TableReader,
    TableWriter,
    npy_dtype_ok,
    table_dtype,
)

__all__ = ["DTYPES", "FORMATS", "ChromaReader", "ChromaWriter", "Chunk", "LanceReader", "LanceWriter", "MilvusReader",
           "MilvusWriter", "NpyHeader", "NpyReader", "NpyWriter", "ParquetReader", "ParquetWriter", "TableReader",
           "TableWriter", "detect_format", "import_lance", "import_pyarrow", "make_writer", "npy_dtype_ok",
           "npy_header_bytes", "open_table", "read_npy_header", "remove_path", "sha256_file", "table_dtype", "writer_class"]

FORMATS = ("npy", "npy_dir", "parquet", "lance", "chroma", "milvus")


def detect_format(path: str) -> str:
    """``npy``, ``npy_dir``, ``parquet``, ``lance``, ``chroma`` or ``milvus`` for an existing input path."""
    if is_lance_dataset(path):
        return "lance"
    if is_chroma_store(path):
        return "chroma"
    if is_milvus_store(path):
        return "milvus"
    if os.path.isdir(path):
        return "npy_dir"
    if not os.path.exists(path):
        raise FileNotFoundError(f"input table {path} does not exist")
    if path.endswith(".npy"):
        return "npy"
    if path.lower().endswith(_PARQUET_SUFFIXES):
        return "parquet"
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        return "npy"
    if magic[:4] == b"PAR1":
        return "parquet"
    raise ValueError(f"{path}: unknown table format; expected a .npy file, a directory of .npy shards, "
                     "a Parquet file, a Lance dataset (<db>/<name>.lance), a Chroma persist folder or a Milvus Lite .db folder")


def open_table(path: str, column: str | None = None) -> TableReader:
    """Open an input table, validating its header(s) before any work starts."""
    fmt = detect_format(path)
    if fmt == "parquet":
        return ParquetReader(path, column)
    if fmt == "lance":
        return LanceReader(path, column)
    if fmt == "chroma":
        return ChromaReader(path, column)
    if fmt == "milvus":
        return MilvusReader(path, column)
    if column is not None:
        raise ValueError(f"column={column!r} only applies to Parquet, Lance, Chroma and Milvus tables, and {path} is {fmt}")
    return NpyReader(path)


def writer_class(reader: TableReader) -> type[TableWriter]:
    """The writer class for ``reader``'s format (its ``dtypes`` say what it can hold)."""
    return {"parquet": ParquetWriter, "lance": LanceWriter, "chroma": ChromaWriter,
            "milvus": MilvusWriter}.get(reader.format, NpyWriter)


def make_writer(reader: TableReader, temp: str, dim: int, dtype: np.dtype, chunks: list[Chunk],
                metadata: dict) -> TableWriter:
    """The writer for ``reader``'s format."""
    return writer_class(reader)(reader, temp, dim, dtype, chunks, metadata)


def remove_path(path: str) -> None:
    """Remove a file or directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def sha256_file(path: str, bufsize: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
