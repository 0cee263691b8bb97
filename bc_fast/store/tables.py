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
  chunk is written as its own part file, so a killed run can resume; the parts
  are merged into one file (one row group per chunk) when the run completes.

Writers only ever write under a temporary path; :mod:`bc_fast.convert` renames it
into place when the table is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tokenize
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .._util.fileio import fsync_dir

DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
FORMATS = ("npy", "npy_dir", "parquet")
_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


# --------------------------------------------------------------------------- helpers

def import_pyarrow() -> tuple[Any, Any]:
    """Import pyarrow and pyarrow.parquet lazily, with a clear error if missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Parquet tables need pyarrow, which is not installed; "
            "install it with `pip install bc_fast[parquet]` (or `pip install pyarrow`)"
        ) from e
    return pa, pq


def _pread_into(fd: int, buf: np.ndarray, offset: int, path: str) -> None:
    view = memoryview(buf.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise ValueError(
                f"{path}: file ended at byte {offset + done} while reading; it is truncated "
                "or was modified during the conversion")
        done += n


def _pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _file_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --------------------------------------------------------------------------- .npy header

@dataclass(frozen=True)
class NpyHeader:
    """A validated .npy header: 2-D, C-ordered, little-endian float32/float16."""

    path: str
    shape: tuple[int, int]
    dtype: np.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        """Bytes of array data after the header."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize


def read_npy_header(path: str) -> NpyHeader:
    """Read and validate the header of a .npy file without loading (or unpickling) it.

    Raises FileNotFoundError / PermissionError for unreadable files, ValueError for
    a file that is not .npy, not 2-D, Fortran-ordered, truncated or overlong, and
    TypeError for a dtype other than float32/float16.
    """
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except (ValueError, OSError, SyntaxError, EOFError, TypeError, RecursionError, MemoryError,
                tokenize.TokenError) as e:  # numpy parses the header with tokenize + literal_eval
            raise ValueError(f"{path}: not a readable .npy file ({type(e).__name__}: {e}); write it with "
                             "np.save") from e
        offset = f.tell()
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.byteorder == ">" and dtype.newbyteorder("<") in DTYPES:
        raise TypeError(f"{path}: dtype {dtype.str} is big-endian; rewrite it little-endian with "
                        f"np.save(path, a.astype('{dtype.newbyteorder('<').str}'))")
    if dtype not in DTYPES:
        raise TypeError(f"{path}: dtype {dtype} is not supported; tables must be float32 or float16 "
                        "(convert with np.save(path, a.astype(np.float32)))")
    if len(shape) != 2:
        hint = " (reshape a single vector with a.reshape(1, -1))" if len(shape) == 1 else ""
        raise ValueError(f"{path}: expected a 2-D table (rows, dim), got shape {tuple(shape)}{hint}")
    if any(int(n) < 0 for n in shape):
        raise ValueError(f"{path}: corrupt .npy header: it declares the negative shape {tuple(shape)}; "
                         "the file is damaged or was not written by np.save; write it again with np.save")
    if fortran:
        raise ValueError(f"{path}: array is Fortran-ordered (column-major); rewrite it row-major with "
                         "np.save(path, np.ascontiguousarray(a))")
    header = NpyHeader(path, (int(shape[0]), int(shape[1])), dtype, int(offset))
    if header.shape[1] == 0:
        raise ValueError(f"{path}: table has shape {header.shape}; rows need at least one feature")
    size = os.path.getsize(path)
    want = header.offset + header.nbytes
    if size < want:
        raise ValueError(f"{path}: file is truncated: its header says shape {header.shape} {dtype} "
                         f"({want} bytes with the header) but the file has {size} bytes")
    if size > want:
        raise ValueError(f"{path}: file has {size - want} unexpected bytes after the {header.shape} "
                         f"{dtype} array ({want} bytes expected); it is not a plain np.save file")
    return header


def npy_header_bytes(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    """The exact header ``np.save`` writes for a C-ordered array of this shape and dtype."""
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)})
    return buf.getvalue()


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


class NpyReader(TableReader):
    """A single .npy file, or a directory of .npy shards."""

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.isdir(path):
            self.format = "npy_dir"
            names = sorted(n for n in os.listdir(path) if n.endswith(".npy"))
            if not names:
                raise ValueError(f"{path}: directory holds no .npy shards")
            self.names = names
            headers = [read_npy_header(os.path.join(path, n)) for n in names]
        else:
            self.format = "npy"
            self.names = [os.path.basename(path)]
            headers = [read_npy_header(path)]
        first = headers[0]
        for h in headers[1:]:
            if h.shape[1] != first.shape[1]:
                raise ValueError(f"{path}: mixed shard dims: {os.path.basename(first.path)} has dim "
                                 f"{first.shape[1]} but {os.path.basename(h.path)} has dim {h.shape[1]}; "
                                 "all shards of one table must share a dim")
            if h.dtype != first.dtype:
                raise ValueError(f"{path}: mixed shard dtypes: {os.path.basename(first.path)} is "
                                 f"{first.dtype} but {os.path.basename(h.path)} is {h.dtype}")
        self.headers = headers
        self.dim = first.shape[1]
        self.dtype = first.dtype
        self.part_rows = [h.shape[0] for h in headers]
        self.n_rows = sum(self.part_rows)
        self._fds: dict[int, int] = {}

    def _fd(self, part: int) -> int:
        fd = self._fds.get(part)
        if fd is None:
            fd = os.open(self.headers[part].path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[part] = fd
        return fd

    def read(self, chunk: Chunk, buf: np.ndarray) -> tuple[np.ndarray, Any]:
        h = self.headers[chunk.part]
        x = buf[: chunk.rows]
        _pread_into(self._fd(chunk.part), x, h.offset + chunk.local * self.dim * self.dtype.itemsize, h.path)
        return x, None

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), self.dtype)
        bounds = np.cumsum([0] + self.part_rows)
        row_bytes = self.dim * self.dtype.itemsize
        for i, r in enumerate(rows):
            part = int(np.searchsorted(bounds, r, side="right") - 1)
            h = self.headers[part]
            _pread_into(self._fd(part), out[i], h.offset + int(r - bounds[part]) * row_bytes, h.path)
        return out

    def fingerprint(self) -> dict:
        return {"format": self.format, "files": [_file_stamp(h.path) for h in self.headers],
                "shape": [self.n_rows, self.dim], "dtype": str(self.dtype)}

    def describe(self) -> dict:
        d = super().describe()
        if self.format == "npy_dir":
            d["shards"] = [{"name": n, "rows": r} for n, r in zip(self.names, self.part_rows)]
        return d

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _find_embedding_column(schema: Any, path: str, column: str | None) -> str:
    pa, _ = import_pyarrow()
    if column is not None:
        if column not in schema.names:
            raise ValueError(f"{path}: no column {column!r}; columns are {schema.names}")
        return column
    cands = [f.name for f in schema if pa.types.is_fixed_size_list(f.type)]
    if len(cands) == 1:
        return cands[0]
    if not cands:
        lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
        hint = (f"; {lists} are variable-size lists: store embeddings as fixed_size_list "
                "(pa.FixedSizeListArray.from_arrays(values, dim))") if lists else ""
        raise ValueError(f"{path}: no fixed-size-list embedding column among {schema.names}{hint}")
    raise ValueError(f"{path}: several fixed-size-list columns {cands}; choose one with --column / column=")


class ParquetReader(TableReader):
    """A Parquet file whose embedding column is ``fixed_size_list<float32|float16>``."""

    format = "parquet"

    def __init__(self, path: str, column: str | None = None) -> None:
        pa, pq = import_pyarrow()
        self.path = path
        try:
            self._pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            if isinstance(e, (FileNotFoundError, PermissionError)):
                raise
            raise ValueError(f"{path}: not a readable Parquet file ({e}); it may be truncated") from e
        self.schema = self._pf.schema_arrow
        self.column = _find_embedding_column(self.schema, path, column)
        field = self.schema.field(self.column)
        if not pa.types.is_fixed_size_list(field.type):
            raise ValueError(f"{path}: column {self.column!r} has type {field.type}, expected a "
                             "fixed_size_list<float32|float16> embedding column")
        vt = field.type.value_type
        dt = {str(pa.float32()): np.dtype(np.float32), str(pa.float16()): np.dtype(np.float16)}.get(str(vt))
        if dt is None:
            raise TypeError(f"{path}: column {self.column!r} holds {vt}; embeddings must be float32 or "
                            "float16 (cast the column, e.g. to fixed_size_list<float>)")
        self.dtype = dt
        self.dim = int(field.type.list_size)
        if self.dim == 0:
            raise ValueError(f"{path}: column {self.column!r} has list size 0")
        md = self._pf.metadata
        self.part_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        self.n_rows = md.num_rows
        self._it: Any = None
        self._next_index = -1

    def _batches(self, part: int, chunk_rows: int) -> Any:
        """Exactly ``chunk_rows``-row tables from one row group (the last may be shorter)."""
        pa, _ = import_pyarrow()
        pending: list[Any] = []
        have = 0
        for b in self._pf.iter_batches(batch_size=chunk_rows, row_groups=[part], use_threads=False):
            pending.append(b)
            have += b.num_rows
            while have >= chunk_rows:
                t = pa.Table.from_batches(pending)
                yield t.slice(0, chunk_rows)
                rest = t.slice(chunk_rows)
                pending, have = rest.to_batches(), rest.num_rows
        if have:
            yield pa.Table.from_batches(pending)

    def _embeddings(self, table: Any, where: str) -> np.ndarray:
        col = table.column(self.column).combine_chunks()
        if col.null_count:
            raise ValueError(f"{self.path}: column {self.column!r} has {col.null_count} null rows in {where}; "
                             "fill or drop them before converting")
        values = col.flatten()
        if values.null_count:
            raise ValueError(f"{self.path}: column {self.column!r} has null values in {where}")
        return np.ascontiguousarray(values.to_numpy(zero_copy_only=False).reshape(len(col), self.dim))

    def read(self, chunk: Chunk, buf: np.ndarray) -> tuple[np.ndarray, Any]:
        chunk_rows = self.chunk_rows
        if self._it is None or self._next_index != chunk.index or self._it_part != chunk.part:
            # (Re)position: iterate the row group from its start and skip earlier chunks.
            self._it = self._batches(chunk.part, chunk_rows)
            self._it_part = chunk.part
            for _ in range(chunk.local // chunk_rows):
                next(self._it)
        table = next(self._it)
        self._next_index = chunk.index + 1
        if table.num_rows != chunk.rows:
            raise ValueError(f"{self.path}: row group {chunk.part} yielded {table.num_rows} rows, "
                             f"expected {chunk.rows}; the file changed during the conversion?")
        x = self._embeddings(table, f"rows {chunk.start}..{chunk.stop}")
        return x, table.drop_columns([self.column])

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), self.dtype)
        bounds = np.cumsum([0] + self.part_rows)
        parts = np.searchsorted(bounds, rows, side="right") - 1
        for part in np.unique(parts):
            sel = np.nonzero(parts == part)[0]
            t = self._pf.read_row_group(int(part), columns=[self.column])
            emb = self._embeddings(t, f"row group {part}")
            out[sel] = emb[rows[sel] - bounds[part]]
        return out

    def fingerprint(self) -> dict:
        return {"format": self.format, "files": [_file_stamp(self.path)], "column": self.column,
                "shape": [self.n_rows, self.dim], "dtype": str(self.dtype),
                "row_groups": self.part_rows}

    def describe(self) -> dict:
        d = super().describe()
        d["column"] = self.column
        return d

    def close(self) -> None:
        self._it = None
        self._pf = None


def detect_format(path: str) -> str:
    """``npy``, ``npy_dir`` or ``parquet`` for an existing input path."""
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
    raise ValueError(f"{path}: unknown table format; expected a .npy file, a directory of .npy shards "
                     "or a Parquet file")


def open_table(path: str, column: str | None = None) -> TableReader:
    """Open an input table, validating its header(s) before any work starts."""
    fmt = detect_format(path)
    if fmt == "parquet":
        return ParquetReader(path, column)
    if column is not None:
        raise ValueError(f"column={column!r} only applies to Parquet tables, and {path} is {fmt}")
    return NpyReader(path)


# --------------------------------------------------------------------------- writers

class TableWriter:
    """Writes converted chunks under ``temp`` (a file or a directory)."""

    def __init__(self, reader: TableReader, temp: str, dim: int, dtype: np.dtype,
                 chunks: list[Chunk], metadata: dict) -> None:
        self.reader = reader
        self.temp = temp
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.chunks = chunks
        self.metadata = metadata

    def expected_bytes(self) -> int:
        """An estimate of the finished output's size (for the disk-space check)."""
        return self.reader.n_rows * self.dim * self.dtype.itemsize

    def create(self) -> None:
        """Create a fresh temporary output (space reserved where the format allows)."""
        raise NotImplementedError

    def reopen(self, done_chunks: int) -> None:
        """Reopen a temporary output left by a killed run; chunks after ``done_chunks`` are redone."""
        raise NotImplementedError

    def write(self, chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        """Write the converted rows of ``chunk``."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make everything written so far durable (fdatasync)."""

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


class NpyWriter(TableWriter):
    """Writes a .npy file (or one per shard into a directory) with ``pwrite``."""

    def _paths(self) -> list[str]:
        if self.reader.format == "npy_dir":
            return [os.path.join(self.temp, n) for n in self.reader.names]  # type: ignore[attr-defined]
        return [self.temp]

    def _layout(self) -> None:
        self.paths = self._paths()
        self.headers = [npy_header_bytes((n, self.dim), self.dtype) for n in self.reader.part_rows]
        self.fds: list[int] = []
        self._dirty: set[int] = set()

    def create(self) -> None:
        self._layout()
        if self.reader.format == "npy_dir":
            os.mkdir(self.temp)
        for path, hdr, n in zip(self.paths, self.headers, self.reader.part_rows):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self.fds.append(fd)
            size = len(hdr) + n * self.dim * self.dtype.itemsize
            if size:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    raise OSError(e.errno, f"cannot reserve {size} bytes for {path}: {e.strerror}") from e
            os.pwrite(fd, hdr, 0)
            os.ftruncate(fd, size)
            self._dirty.add(len(self.fds) - 1)

    def reopen(self, done_chunks: int) -> None:
        self._layout()
        for path, hdr, n in zip(self.paths, self.headers, self.reader.part_rows):
            size = len(hdr) + n * self.dim * self.dtype.itemsize
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                raise ValueError(f"cannot resume: partial output {path} is missing or has the wrong size; "
                                 "delete the partial output and its journal and start again")
            fd = os.open(path, os.O_RDWR)
            self.fds.append(fd)
            if os.pread(fd, len(hdr), 0) != hdr:
                raise ValueError(f"cannot resume: partial output {path} has an unexpected header")

    def write(self, chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        off = len(self.headers[chunk.part]) + chunk.local * self.dim * self.dtype.itemsize
        _pwrite_all(self.fds[chunk.part], y, off)
        self._dirty.add(chunk.part)

    def sync(self) -> None:
        for part in sorted(self._dirty):
            os.fdatasync(self.fds[part])
        self._dirty.clear()

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), self.dtype)
        bounds = np.cumsum([0] + self.reader.part_rows)
        row_bytes = self.dim * self.dtype.itemsize
        for i, r in enumerate(rows):
            part = int(np.searchsorted(bounds, r, side="right") - 1)
            _pread_into(self.fds[part], out[i], len(self.headers[part]) + int(r - bounds[part]) * row_bytes,
                        self.paths[part])
        return out

    def read_chunk(self, chunk: Chunk) -> np.ndarray:
        out = np.empty((chunk.rows, self.dim), self.dtype)
        off = len(self.headers[chunk.part]) + chunk.local * self.dim * self.dtype.itemsize
        _pread_into(self.fds[chunk.part], out, off, self.paths[chunk.part])
        return out

    def seal(self) -> None:
        self.sync()
        if self.reader.format == "npy_dir":
            fsync_dir(self.temp)

    def files(self) -> list[str]:
        return list(self.reader.names) if self.reader.format == "npy_dir" else []  # type: ignore[attr-defined]

    def close(self) -> None:
        for fd in getattr(self, "fds", []):
            os.close(fd)
        self.fds = []


class ParquetWriter(TableWriter):
    """Writes one Parquet part per chunk under a temporary directory, merged at the end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pa, _ = import_pyarrow()
        reader: ParquetReader = self.reader  # type: ignore[assignment]
        vt = pa.float16() if self.dtype == np.float16 else pa.float32()
        field = pa.field(reader.column, pa.list_(vt, self.dim), nullable=False)
        schema = reader.schema
        schema = schema.set(schema.get_field_index(reader.column), field)
        meta = dict(schema.metadata or {})
        meta[b"bc_fast"] = json.dumps(self.metadata, sort_keys=True).encode()
        self.schema = schema.with_metadata(meta)
        self._vt = vt

    def _part(self, index: int) -> str:
        return os.path.join(self.temp, f"part-{index:08d}.parquet")

    @property
    def merged(self) -> str:
        """Path of the merged file inside the temporary directory."""
        return os.path.join(self.temp, "merged.parquet")

    def create(self) -> None:
        os.mkdir(self.temp)

    def reopen(self, done_chunks: int) -> None:
        if not os.path.isdir(self.temp):
            raise ValueError(f"cannot resume: partial output directory {self.temp} is missing; "
                             "delete the journal and start again")
        for i in range(done_chunks):
            if not os.path.isfile(self._part(i)):
                raise ValueError(f"cannot resume: part {self._part(i)} is missing; "
                                 "delete the partial output and its journal and start again")

    def write(self, chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        pa, pq = import_pyarrow()
        emb = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1), type=self._vt), self.dim)
        cols = {name: extra.column(name) for name in extra.column_names}
        cols[self.reader.column] = emb  # type: ignore[attr-defined]
        table = pa.Table.from_arrays([cols[n] for n in self.schema.names], schema=self.schema)
        tmp = self._part(chunk.index) + ".tmp"
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="none")
            f.flush()
            os.fsync(f.fileno())  # parts are small; a durable part is renamed into place
        os.replace(tmp, self._part(chunk.index))

    def sync(self) -> None:
        fsync_dir(self.temp)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        _, pq = import_pyarrow()
        col = self.reader.column  # type: ignore[attr-defined]
        out = np.empty((len(rows), self.dim), self.dtype)
        starts = np.array([c.start for c in self.chunks])
        which = np.searchsorted(starts, rows, side="right") - 1
        for ci in np.unique(which):
            sel = np.nonzero(which == ci)[0]
            t = pq.read_table(self._part(int(ci)), columns=[col])
            emb = t.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            out[sel] = emb.reshape(-1, self.dim)[rows[sel] - starts[ci]]
        return out

    def read_chunk(self, chunk: Chunk) -> np.ndarray:
        _, pq = import_pyarrow()
        col = self.reader.column  # type: ignore[attr-defined]
        t = pq.read_table(self._part(chunk.index), columns=[col])
        emb = t.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return np.ascontiguousarray(emb, self.dtype).reshape(-1, self.dim)

    def seal(self) -> None:
        """Merge the parts into one file (one row group per chunk, snappy). The parts stay until the
        merged file is published, so a run killed while merging resumes cleanly."""
        _, pq = import_pyarrow()
        with open(self.merged, "wb") as f:
            with pq.ParquetWriter(f, self.schema, compression="snappy") as w:
                for c in self.chunks:
                    t = pq.read_table(self._part(c.index), schema=self.schema)
                    w.write_table(t, row_group_size=max(1, t.num_rows))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.temp)

    def expected_bytes(self) -> int:
        # the parts and the merged file coexist until the merged file is published; ids etc. add a little
        return int(super().expected_bytes() * 2.2) + (1 << 20)


def make_writer(reader: TableReader, temp: str, dim: int, dtype: np.dtype, chunks: list[Chunk],
                metadata: dict) -> TableWriter:
    """The writer for ``reader``'s format."""
    cls = ParquetWriter if reader.format == "parquet" else NpyWriter
    return cls(reader, temp, dim, dtype, chunks, metadata)


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
