"""``.npy`` tables: one file, or a directory of ``.npy`` shards of one dim and dtype.

What lives here: the ``.npy`` header (:func:`read_npy_header`, validated without loading or
unpickling; :func:`npy_header_bytes`, exactly ``np.save``'s), :class:`NpyReader` (``pread`` into a
reused buffer, no memory map) and :class:`NpyWriter` (``pwrite`` into a preallocated file, or one
per shard). It may import :mod:`.table_base` and ``bc_fast._util``.
"""

from __future__ import annotations

import os
import tokenize
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._util.arrays import bfloat16
from .._util.direct_io import aligned_empty, open_direct, pwrite_direct
from .._util.fileio import fsync_dir
from .table_base import (
    DTYPES,
    Chunk,
    TableReader,
    TableWriter,
    _file_stamp,
    npy_dtype_ok,
)


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
    TypeError for a dtype other than float32/float16/bfloat16. A plain 2-byte void dtype (``'<V2'``, what
    ``np.save`` writes for an ``ml_dtypes.bfloat16`` array) is read as bfloat16.
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
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.names is None and dtype.subdtype is None:
        dtype = bfloat16()  # np.save of ml_dtypes.bfloat16 keeps only "2 raw bytes"
    if dtype.kind == "f" and dtype.byteorder == ">" and dtype.newbyteorder("<") in DTYPES:
        raise TypeError(f"{path}: dtype {dtype.str} is big-endian; rewrite it little-endian with "
                        f"np.save(path, a.astype('{dtype.newbyteorder('<').str}'))")
    if not npy_dtype_ok(dtype):
        raise TypeError(f"{path}: dtype {dtype} is not supported; tables must be float32, float16 or bfloat16 "
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


# --------------------------------------------------------------------------- reader

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


# --------------------------------------------------------------------------- writer

class NpyWriter(TableWriter):
    """Writes a .npy file (or one per shard into a directory) with ``pwrite``; bfloat16 as ``np.save`` writes it.

    The block-aligned middle of each chunk goes to the disk with ``O_DIRECT`` where the filesystem allows it
    (:mod:`bc_fast._util.direct_io`: no copy through the page cache on the CPU the GEMM needs), from buffers
    made by :meth:`new_buffer`; the bytes written are the same either way.
    """

    @classmethod
    def holds(cls, dtype: np.dtype) -> bool:
        """True for float32, float16 and bfloat16."""
        return npy_dtype_ok(dtype)

    def _paths(self) -> list[str]:
        if self.reader.format == "npy_dir":
            return [os.path.join(self.temp, n) for n in self.reader.names]  # type: ignore[attr-defined]
        return [self.temp]

    def _layout(self) -> None:
        self.paths = self._paths()
        self.headers = [npy_header_bytes((n, self.dim), self.dtype) for n in self.reader.part_rows]
        self.fds: list[int] = []
        self.direct_fds: list[int | None] = []
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
            self.direct_fds.append(open_direct(path))
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
            self.direct_fds.append(open_direct(path))

    def new_buffer(self, rows: int) -> np.ndarray:
        """A chunk buffer aligned like the data offset of the first file, so chunks can be written with O_DIRECT."""
        header = npy_header_bytes((self.reader.part_rows[0] if self.reader.part_rows else 0, self.dim), self.dtype)
        return aligned_empty((rows, self.dim), self.dtype, len(header))

    def write(self, chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        off = len(self.headers[chunk.part]) + chunk.local * self.dim * self.dtype.itemsize
        if not pwrite_direct(self.fds[chunk.part], self.direct_fds[chunk.part], y, off):
            self._close_direct()  # refused once: the rest goes through the page cache
        self._dirty.add(chunk.part)

    def sync(self) -> None:
        """fdatasync the files written since the last sync, then drop their (now clean) pages from the
        page cache: a converted table streams through a bounded set of recycled pages instead of
        filling memory, which on VMs is also faster (fresh pages are slow to first touch)."""
        for part in sorted(self._dirty):
            os.fdatasync(self.fds[part])
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fds[part], 0, 0, os.POSIX_FADV_DONTNEED)
        self._dirty.clear()

    def flush(self) -> None:
        self.sync()

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

    def _close_direct(self) -> None:
        for fd in getattr(self, "direct_fds", []):
            if fd is not None:
                os.close(fd)
        self.direct_fds = [None] * len(getattr(self, "fds", []))

    def close(self) -> None:
        self._close_direct()
        for fd in getattr(self, "fds", []):
            os.close(fd)
        self.fds = []
