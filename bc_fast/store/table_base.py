"""What every table reader and writer shares: the chunk, the two base classes, the supported dtypes.

What lives here: :class:`Chunk` (rows ``[start, stop)`` of one part), the cutting of a table into
chunks, :class:`TableReader` and :class:`TableWriter` (the interfaces :mod:`bc_fast.convert` drives),
``DTYPES`` (and the ``.npy`` format's wider set, :func:`npy_dtype_ok`, :func:`table_dtype`) and the input
fingerprint helper. The format modules (:mod:`.npy`, :mod:`.parquet`) build on it and :mod:`.tables` re-exports
it; it imports numpy and the standard library only (ml_dtypes only when a bfloat16 dtype is asked for by name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .._util.arrays import bfloat16, is_row_dtype

# What every table format reads and writes.
DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def npy_dtype_ok(dt: np.dtype) -> bool:
    """True for the dtypes a ``.npy`` table holds: the core's row dtypes, ``DTYPES`` and bfloat16
    (``ml_dtypes.bfloat16``, written as ``np.save`` writes such an array, descr ``'<V2'``; matched without
    importing ml_dtypes, :func:`bc_fast._util.arrays.is_row_dtype`)."""
    return is_row_dtype(dt)


def table_dtype(value: Any) -> np.dtype:
    """A table dtype from a name (``"float32"``, ``"float16"``, ``"bfloat16"``) or a numpy / ml_dtypes dtype.

    TypeError naming the value when it is none of the three (the caller checks what its format holds).
    """
    if isinstance(value, str) and value.lower() in ("bfloat16", "bf16"):
        return bfloat16()
    try:
        dt = np.dtype(value)
    except TypeError as e:
        raise TypeError(f"output dtype must be float32, float16 or bfloat16, got {value!r}") from e
    if not npy_dtype_ok(dt):
        raise TypeError(f"output dtype must be float32 or float16 (or bfloat16 for .npy tables), got {dt}")
    return dt


def _file_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --------------------------------------------------------------------------- chunks

@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of the table; ``part`` is the shard / row group holding them
    and ``local`` the offset of ``start`` inside that part."""

    index: int
    start: int
    stop: int
    part: int
    local: int

    @property
    def rows(self) -> int:
        """Number of rows in the chunk."""
        return self.stop - self.start


def _split(part_rows: Sequence[int], chunk_rows: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    start = 0
    for part, n in enumerate(part_rows):
        for local in range(0, n, chunk_rows):
            m = min(chunk_rows, n - local)
            chunks.append(Chunk(len(chunks), start + local, start + local + m, part, local))
        start += n
    return chunks


# --------------------------------------------------------------------------- readers

class TableReader:
    """Base class of the readers: a table of ``n_rows`` rows of ``dim`` features."""

    format: str = ""
    path: str
    n_rows: int
    dim: int
    dtype: np.dtype
    part_rows: list[int]

    def chunks(self, chunk_rows: int) -> list[Chunk]:
        """The table cut into chunks of at most ``chunk_rows`` rows (never across parts)."""
        self.chunk_rows = chunk_rows
        return _split(self.part_rows, chunk_rows)

    def read(self, chunk: Chunk, buf: np.ndarray) -> tuple[np.ndarray, Any]:
        """Rows of ``chunk`` as a C-contiguous (rows, dim) array (a view of ``buf`` where
        possible), and the carried-through columns (Parquet) or None."""
        raise NotImplementedError

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows at the sorted global indices ``rows``, as an (n, dim) array."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """Identity of the input (paths, sizes, mtimes, shape) for resume checks."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Shape, dtype and format for the sidecar."""
        return {"format": self.format, "path": os.path.abspath(self.path), "rows": self.n_rows,
                "dim": self.dim, "dtype": str(self.dtype)}

    def close(self) -> None:
        """Release file handles."""


# --------------------------------------------------------------------------- writers

class TableWriter:
    """Writes converted chunks under ``temp`` (a file or a directory)."""

    @classmethod
    def holds(cls, dtype: np.dtype) -> bool:
        """True if the format can hold output rows of ``dtype`` (float32 and float16 everywhere)."""
        return dtype in DTYPES

    def __init__(self, reader: TableReader, temp: str, dim: int, dtype: np.dtype,
                 chunks: list[Chunk], metadata: dict) -> None:
        self.reader = reader
        self.temp = temp
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.chunks = chunks
        self.metadata = metadata

    def new_buffer(self, rows: int) -> np.ndarray:
        """An uninitialised ``(rows, dim)`` buffer of the output dtype for chunks to be written (reused)."""
        return np.empty((rows, self.dim), self.dtype)

    def expected_bytes(self) -> int:
        """An estimate of the finished output's size (for the disk-space check)."""
        return self.reader.n_rows * self.dim * self.dtype.itemsize

    def create(self) -> None:
        """Create a fresh temporary output (space reserved where the format allows)."""
        raise NotImplementedError

    def reopen(self, done_chunks: int) -> None:
        """Reopen a temporary output left by a killed run; chunks after ``done_chunks`` are redone."""
        raise NotImplementedError

    def drop_after(self, done_chunks: int) -> None:
        """Forget the chunks from ``done_chunks`` on, so a resumed run can write them again. Writers that
        overwrite a chunk in place (a file at a fixed offset, a part file per chunk) have nothing to do."""

    def write(self, chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        """Write the converted rows of ``chunk``."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make everything written so far durable (fdatasync)."""

    def flush(self) -> None:
        """Between journal points: start making what was written durable, where that is cheap (a
        plain file: :meth:`sync`), so the last sync has little left to do. Optional; a no-op here."""

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows at the sorted global indices ``rows`` of the (complete) temporary output."""
        raise NotImplementedError

    def read_chunk(self, chunk: Chunk) -> np.ndarray:
        """The converted rows of ``chunk`` as written so far (for checking them against the journal)."""
        raise NotImplementedError

    def seal(self) -> None:
        """Finish the temporary output (merge parts, close files) so it can be renamed."""

    def files(self) -> list[str]:
        """Names of the data files in the final output (relative to it, for directories)."""
        return []

    def close(self) -> None:
        """Release file handles."""
