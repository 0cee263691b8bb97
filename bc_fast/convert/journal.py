"""The conversion journal: what makes a killed conversion resumable.

What lives here: the journal of a run in progress (``OUTPUT.partial.journal.json``, replaced
atomically and stamped with a sha256 of its own content), its integrity check on resume, the crc32
of every chunk written and the check of a partial or published table against those checksums, and
the chunk writer that makes data durable before the journal that vouches for it. It may import
:mod:`bc_fast.store` and ``bc_fast._util``, nothing else of :mod:`bc_fast.convert`: it is the bottom
of the stack, which :mod:`.job`, :mod:`.publish`, :mod:`.pipeline` and the Ray engine import.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping

import numpy as np

from .._util.checksum import crc32_array
from .._util.finite import first_nonfinite_row
from .._util.progress import Progress
from .._util.fileio import atomic_write_json, is_json_int, is_relative_file, read_json_object
from .._util.text import short_repr
from ..store.tables import Chunk, TableWriter, open_table

_JOURNAL_FORMAT = "bc_fast.convert.journal/2"

#: Bytes written between two flushes (:meth:`TableWriter.flush`) of the output, journal or not.
FLUSH_BYTES = 32 << 20


class NonFiniteRow(ValueError):
    """A converted row holds NaN or Inf: raised by the chunk writer, explained by the pipeline, which can
    read the input row back (:func:`bc_fast.convert.pipeline.apply_to_table`)."""

    def __init__(self, row: int) -> None:
        super().__init__(f"output row {row} is not finite")
        self.row = row


def _crc(y: np.ndarray) -> int:
    """crc32 of an array's bytes: cheap (tens of GB/s with zlib-ng, GIL released) and enough to catch
    lost or edited chunks."""
    return crc32_array(y)


def _journal_checksum(state: Mapping[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_journal(path: str, state: dict) -> None:
    """Write the journal atomically, stamped with a sha256 of its own content."""
    state["checksum"] = _journal_checksum(state)
    atomic_write_json(path, state)


def _load_journal(path: str, temp: str) -> dict | None:
    """The journal of a killed run, checked for integrity; None if there is none.

    Raises ValueError naming the journal, what is wrong with it, and the fix.
    """
    if not os.path.lexists(path):
        return None
    fix = f"delete {temp} and {path} to start the conversion again"
    if os.path.islink(path) or not os.path.isfile(path):
        raise ValueError(f"{path}: the conversion journal is not a regular file; {fix}")
    j = read_json_object(path, what="conversion journal", fix=fix)
    if j.get("format") != _JOURNAL_FORMAT:
        raise ValueError(f"{path}: not a bc_fast conversion journal of this version (format "
                         f"{short_repr(j.get('format'))}, expected {_JOURNAL_FORMAT!r}); {fix}")
    if j.get("checksum") != _journal_checksum(j):
        raise ValueError(f"{path}: the journal was edited or corrupted (its sha256 does not match its "
                         f"content), so the partial output cannot be trusted; {fix}")
    job, n, done, crcs = j.get("job"), j.get("n_chunks"), j.get("done_chunks"), j.get("crcs")
    problem = None
    if not isinstance(job, dict) or not is_json_int(job.get("chunk_rows")) or job["chunk_rows"] < 1:
        problem = "its job has no valid chunk_rows"
    elif not is_json_int(n) or not is_json_int(done) or not 0 <= done <= n:
        problem = f"done_chunks={short_repr(done)} is not between 0 and n_chunks={short_repr(n)}"
    elif not isinstance(crcs, list) or len(crcs) != done or not all(is_json_int(c) for c in crcs):
        problem = f"it claims {done} chunks done but records {len(crcs) if isinstance(crcs, list) else 'no'} checksums"
    elif not isinstance(j.get("key"), str) or not isinstance(j.get("publishing", False), bool):
        problem = "its key or publishing field is malformed"
    elif j["key"] != hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest():
        problem = "its key does not match its job"
    elif j.get("replacing") is not None and not (
            isinstance(j["replacing"], dict) and isinstance(j["replacing"].get("dir"), bool)
            and (j["replacing"].get("files") is None or (isinstance(j["replacing"]["files"], list) and all(
                is_relative_file(f) for f in j["replacing"]["files"])))):
        problem = "its replacing field is malformed"
    if problem:
        raise ValueError(f"{path}: inconsistent conversion journal: {problem}; {fix}")
    return j


def _first_bad_chunk(read: Callable[[Chunk], np.ndarray], chunks: list[Chunk], crcs: list[int]) -> int | None:
    """Index of the first chunk whose bytes do not match its recorded crc32 (None if all match)."""
    for chunk, want in zip(chunks, crcs):
        try:
            if _crc(read(chunk)) != want:
                return chunk.index
        except (OSError, ValueError):
            return chunk.index
    return None


def _table_matches(path: str, column: str | None, chunks: list[Chunk], chunk_rows: int,
                   crcs: list[int]) -> str | None:
    """None if the table at ``path`` holds exactly the recorded chunks, else what differs."""
    try:
        t = open_table(path, column)
    except (OSError, ValueError, TypeError) as e:
        return f"it cannot be read ({e})"
    try:
        mine = t.chunks(chunk_rows)
        if t.n_rows != (chunks[-1].stop if chunks else 0) or [(c.start, c.stop) for c in mine] != [
                (c.start, c.stop) for c in chunks]:
            return f"it has {t.n_rows} rows in another layout than the journal records"
        buf = np.empty((max((c.rows for c in chunks), default=0), t.dim), t.dtype)
        bad = _first_bad_chunk(lambda c: t.read(c, buf)[0], mine, crcs)
        return None if bad is None else f"its chunk {bad} does not match the journal's checksum"
    finally:
        t.close()


def _journaled_writer(writer: TableWriter, chunks: list[Chunk], state: dict, journal_path: str,
                      journal_interval: float, bar: Progress, check: Any = None) -> Callable[..., None]:
    """``write(chunk, y, extra, x_sample=None)``: write a chunk, record its crc32, collect its rows of the
    verified sample (``check``, a :class:`bc_fast.convert.job.SampleCheck`, given their input rows
    ``x_sample``) and, every ``journal_interval`` seconds (and after the last chunk), make the data
    durable and then the journal. Chunks come in order; a chunk with a NaN or Inf row raises
    :class:`NonFiniteRow` before it is written."""
    last_sync = [time.monotonic()]
    unsynced = [0]
    crcs: list[int] = state["crcs"]

    def write(chunk: Chunk, y: np.ndarray, extra: Any, x_sample: np.ndarray | None = None) -> None:
        bad = first_nonfinite_row(y)
        if bad is not None:
            raise NonFiniteRow(chunk.start + bad)
        writer.write(chunk, y, extra)
        crcs.append(_crc(y))  # the writer thread writes chunks in order
        if check is not None and x_sample is not None:
            check.collect(chunk, x_sample, writer)  # read back now, while the chunk is in the page cache
        unsynced[0] += y.nbytes
        now = time.monotonic()
        if chunk.index == len(chunks) - 1 or now - last_sync[0] >= journal_interval:
            writer.sync()
            unsynced[0] = 0
            state.update(done_chunks=chunk.index + 1, done_rows=chunk.stop, crcs=crcs[: chunk.index + 1],
                         complete=chunk.index == len(chunks) - 1)
            _write_journal(journal_path, state)
            last_sync[0] = now
        elif unsynced[0] >= FLUSH_BYTES:
            # Flushing as we go keeps the kernel's writeback busy during the run, in this (I/O) thread,
            # instead of one long fdatasync of the whole output after the last chunk.
            writer.flush()
            unsynced[0] = 0
        bar.update(chunk.rows)

    return write
