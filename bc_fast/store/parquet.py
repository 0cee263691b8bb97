"""Parquet tables whose embedding column is ``fixed_size_list<float32|float16>``.

What lives here: :func:`import_pyarrow` (pyarrow is optional: ``pip install bc_fast[parquet]``),
:class:`ParquetReader` (the other columns, ids and such, are carried through) and
:class:`ParquetWriter` (one Arrow IPC part file per chunk, so a killed run can resume, merged into
one Parquet file with one row group per chunk as the run goes). It may import :mod:`.table_base` and
``bc_fast._util``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .._util.fileio import fsync_dir
from .table_base import Chunk, TableReader, TableWriter, _file_stamp

_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


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


# --------------------------------------------------------------------------- reader

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


# --------------------------------------------------------------------------- writer

def parquet_write_options(schema: Any, embedding_column: str) -> dict[str, Any]:
    """The ``pyarrow.parquet.ParquetWriter`` options of converted tables: snappy, and for the embedding
    column neither a dictionary nor min/max statistics (the other columns keep pyarrow's defaults).

    Embedding values almost never repeat, so pyarrow's default dictionary encoding of them is built and
    then abandoned, page after page; with it, writing a 500k x 256 float16 table took 4.2 s instead of
    1.4 s here, and reading it back 3.2 s instead of 0.5 s. Statistics of a list column's elements help
    no query."""
    others = [name for name in schema.names if name != embedding_column]
    return {"compression": "snappy", "use_dictionary": others, "write_statistics": others}


class ParquetWriter(TableWriter):
    """Writes one Parquet part per chunk under a temporary directory, merged into one file.

    A run that starts from the first chunk merges as it goes: each part, once durable, is read back
    (from the page cache) and appended to the merged file in the writer's thread, so :meth:`seal` only
    closes it. A resumed run merges every part at :meth:`seal`. Both write the same bytes.
    """

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

    def _options(self) -> dict[str, Any]:
        return parquet_write_options(self.schema, self.reader.column)  # type: ignore[attr-defined]

    def _part(self, index: int) -> str:
        return os.path.join(self.temp, f"part-{index:08d}.arrow")

    def _legacy_part(self, index: int) -> str:
        """Where bc_fast before 0.2 put a part (Parquet): a partial output it left still resumes."""
        return os.path.join(self.temp, f"part-{index:08d}.parquet")

    def _read_part(self, index: int, columns: list[str] | None = None) -> Any:
        """Part ``index`` as an Arrow table (an Arrow IPC file; a Parquet part of an older partial output)."""
        pa, pq = import_pyarrow()
        path = self._part(index)
        if not os.path.isfile(path) and os.path.isfile(self._legacy_part(index)):
            return pq.read_table(self._legacy_part(index), columns=columns, schema=self.schema)
        with pa.OSFile(path, "rb") as f:  # read, not memory-mapped: a file truncated under a map would SIGBUS
            table = pa.ipc.open_file(f).read_all()
        return table if columns is None else table.select(columns)

    @property
    def merged(self) -> str:
        """Path of the merged file inside the temporary directory."""
        return os.path.join(self.temp, "merged.parquet")

    def create(self) -> None:
        os.mkdir(self.temp)
        self._open_merge()

    def _open_merge(self) -> None:
        _, pq = import_pyarrow()
        self._merge_file = open(self.merged, "wb")  # noqa: SIM115 - closed by _append_merged / close
        self._merge = pq.ParquetWriter(self._merge_file, self.schema, **self._options())
        self._merged_chunks = 0

    def _append_merged(self, index: int) -> None:
        """Append part ``index`` to the merged file, exactly as :meth:`seal` would."""
        t = self._read_part(index)
        self._merge.write_table(t, row_group_size=max(1, t.num_rows))
        self._merged_chunks += 1

    def _close_merge(self) -> None:
        merge, f = getattr(self, "_merge", None), getattr(self, "_merge_file", None)
        self._merge = self._merge_file = None
        try:
            if merge is not None:
                merge.close()
        finally:
            if f is not None:
                f.close()

    def reopen(self, done_chunks: int) -> None:
        if not os.path.isdir(self.temp):
            raise ValueError(f"cannot resume: partial output directory {self.temp} is missing; "
                             "delete the journal and start again")
        for i in range(done_chunks):
            if not os.path.isfile(self._part(i)) and not os.path.isfile(self._legacy_part(i)):
                raise ValueError(f"cannot resume: part {self._part(i)} is missing; "
                                 "delete the partial output and its journal and start again")

    def write(self, chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        pa, _ = import_pyarrow()
        emb = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1), type=self._vt), self.dim)
        cols = {name: extra.column(name) for name in extra.column_names}
        cols[self.reader.column] = emb  # type: ignore[attr-defined]
        table = pa.Table.from_arrays([cols[n] for n in self.schema.names], schema=self.schema)
        tmp = self._part(chunk.index) + ".tmp"
        with open(tmp, "wb") as f:
            # Arrow IPC, not Parquet: a part is only read back (sample, merge, resume), and IPC costs a copy
            # where Parquet encodes every list element (~10x slower, and slower still to read back).
            with pa.ipc.new_file(f, self.schema) as ipc:
                ipc.write_table(table)
            f.flush()
            os.fsync(f.fileno())  # parts are small; a durable part is renamed into place
        os.replace(tmp, self._part(chunk.index))
        if getattr(self, "_merge", None) is not None and chunk.index == self._merged_chunks:
            self._append_merged(chunk.index)

    def sync(self) -> None:
        fsync_dir(self.temp)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        col = self.reader.column  # type: ignore[attr-defined]
        out = np.empty((len(rows), self.dim), self.dtype)
        starts = np.array([c.start for c in self.chunks])
        which = np.searchsorted(starts, rows, side="right") - 1
        for ci in np.unique(which):
            sel = np.nonzero(which == ci)[0]
            t = self._read_part(int(ci), [col])
            emb = t.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            out[sel] = emb.reshape(-1, self.dim)[rows[sel] - starts[ci]]
        return out

    def read_chunk(self, chunk: Chunk) -> np.ndarray:
        col = self.reader.column  # type: ignore[attr-defined]
        t = self._read_part(chunk.index, [col])
        emb = t.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return np.ascontiguousarray(emb, self.dtype).reshape(-1, self.dim)

    def seal(self) -> None:
        """Finish the merged file (one row group per chunk, :func:`parquet_write_options`): close the one
        merged during the run, or merge every part now (a resumed run). The parts stay until the merged
        file is published, so a run killed while merging resumes cleanly."""
        _, pq = import_pyarrow()
        if getattr(self, "_merge", None) is not None and self._merged_chunks == len(self.chunks):
            merge, f = self._merge, self._merge_file
            self._merge = self._merge_file = None
            try:
                merge.close()
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
        else:
            self._close_merge()
            with open(self.merged, "wb") as f:
                with pq.ParquetWriter(f, self.schema, **self._options()) as w:
                    for c in self.chunks:
                        t = self._read_part(c.index)
                        w.write_table(t, row_group_size=max(1, t.num_rows))
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(self.temp)

    def close(self) -> None:
        self._close_merge()

    def expected_bytes(self) -> int:
        # the parts and the merged file coexist until the merged file is published; ids etc. add a little
        return int(super().expected_bytes() * 2.2) + (1 << 20)
