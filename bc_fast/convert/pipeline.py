"""Streaming conversion of embedding tables to an older embedding version.

Two levels:

- :func:`apply_to_table` is the core: it streams a table (``.npy``, a directory of
  ``.npy`` shards, or Parquet with a fixed-size-list column) through a
  :class:`~bc_fast.engine.FusedTransform` in chunks and records a caller-supplied
  provenance dict in a sidecar next to the output.
- :func:`convert_table` is the registry-level wrapper: it builds the operator for
  ``src -> dst`` from a :class:`~bc_fast.store.Registry` and stamps the output
  with the registry's checksum and chain.

How a run works: a reader thread ``pread``-s chunk i+1 while the core (GIL
released) computes chunk i and a writer thread ``pwrite``-s chunk i-1, so the run
is bound by the slower of disk and compute, and memory by two input and two output
chunks. Output goes to ``OUTPUT.partial``; a JSON journal next to it
(``OUTPUT.partial.journal.json``, replaced atomically) records the last chunk made
durable (fdatasync first) and the crc32 of every chunk written, and carries a sha256 of
its own content. A killed run resumes with ``resume=True``: the journal must be intact,
the chunks it claims are read back and checked against their crc32 (a chunk that does
not match is converted again), and the run ends byte-identical to an uninterrupted one
(the chunking is recorded and reused). Only a complete, verified table (a random sample
of rows against the float64 step-by-step chain, on by default) is renamed to
``OUTPUT``; its sidecar ``OUTPUT.bcfast.json`` names the embedding version, the
registry checksum and chain, the operator's sha256 and the chunks' crc32. A run killed
while publishing is finished by ``resume=True``.

``overwrite=True`` only ever replaces a table bc_fast wrote: one with a bc_fast sidecar
and, for a directory of shards, no file other than the shards its sidecar lists.
Anything else (user files, a symlink, a table without a sidecar) is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..engine import FusedTransform
from .._util.progress import Progress
from .._util.fileio import FileLock, atomic_write_json, fsync_dir, is_json_int, read_json_object
from .._util.text import short_repr
from ..store.tables import (DTYPES, Chunk, TableReader, TableWriter, make_writer, open_table,
                     remove_path)

__all__ = ["apply_to_table", "convert_table", "ConvertResult", "VerificationError",
           "read_sidecar", "sidecar_path", "default_verify_tol", "SIDECAR_SUFFIX", "DEFAULT_VERIFY_ROWS"]

SIDECAR_SUFFIX = ".bcfast.json"
DEFAULT_VERIFY_ROWS = 256
_PARTIAL = ".partial"
_ASIDE = ".partial.old"  # an overwritten directory table waits here until the new one is in place
_JOURNAL_FORMAT = "bc_fast.convert.journal/2"
_MAX_THREADS = 1024
_SIDECAR_FORMAT = "bc_fast.table/1"
_CHUNK_BYTES = 16 << 20  # default chunk: ~16 MiB of input or output rows, whichever is larger
_DISK_MARGIN = 64 << 20
# directory tables bc_fast writes (npy_dir here, parquet_dir by bc_fast.convert.distributed): their file suffixes
_DIR_TABLE_SUFFIXES = {"npy_dir": (".npy",), "parquet_dir": (".parquet", ".pq", ".parq")}


class VerificationError(ValueError):
    """Converted rows disagree with the step-by-step reference chain."""


@dataclass
class ConvertResult:
    """What a conversion did.

    ``rows_per_s`` counts the rows converted in this run (not the resumed ones).
    ``verify_max_error`` is the largest row-relative error ``||y - ref|| / ||ref||``
    over the verified rows (None if ``verify=0``), ``verify_tol`` the bound it was held to.
    ``already_complete`` is True when a resumed run found the table already published
    (killed while finishing) and only completed the bookkeeping.
    """

    output: str
    sidecar: str
    format: str
    rows: int
    dim_in: int
    dim_out: int
    dtype: str
    chunks: int
    chunk_rows: int
    resumed_rows: int
    seconds: float
    rows_per_s: float
    bytes_read: int
    bytes_written: int
    verified_rows: int = 0
    verify_max_error: float | None = None
    verify_tol: float | None = None
    already_complete: bool = False
    provenance: dict = field(default_factory=dict)

    def summary(self) -> str:
        """A human-readable one-paragraph summary."""
        mib = 1 << 20
        lines = [f"converted {self.rows:,} rows ({self.format}, {self.dim_in} -> {self.dim_out}, {self.dtype}) "
                 f"in {self.seconds:.2f} s: {self.rows_per_s:,.0f} rows/s, "
                 f"read {self.bytes_read / mib:,.1f} MiB, wrote {self.bytes_written / mib:,.1f} MiB"]
        if self.already_complete:
            lines = [f"{self.output} was already complete ({self.rows:,} rows, {self.format}, {self.dim_in} -> "
                     f"{self.dim_out}, {self.dtype}); finished the interrupted run's bookkeeping"]
        elif self.resumed_rows:
            lines.append(f"resumed after {self.resumed_rows:,} rows already converted")
        if self.verified_rows:
            lines.append(f"verified {self.verified_rows} random rows against the step-by-step chain: "
                         f"max relative error {self.verify_max_error:.2e} (tolerance {self.verify_tol:.1e})")
        prov = self.provenance
        if "to" in prov:
            lines.append(f"version {prov.get('from')} -> {prov['to']}"
                         + (f" (registry checksum {str(prov['registry_checksum'])[:12]})"
                            if prov.get("registry_checksum") else ""))
        lines.append(f"output: {self.output}\nsidecar: {self.sidecar}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- small pieces

def sidecar_path(output: str | os.PathLike) -> str:
    """Path of the provenance sidecar of a converted table."""
    return os.fspath(output) + SIDECAR_SUFFIX


def read_sidecar(table: str | os.PathLike) -> dict | None:
    """The sidecar of ``table`` (the provenance of a converted table), or None if it has none."""
    path = sidecar_path(table)
    if not os.path.exists(path):
        return None
    return read_json_object(path, what="bc_fast sidecar",
                            fix=f"delete or rename it if {table} is not a converted table")


def operator_fingerprint(op: FusedTransform) -> str:
    """sha256 of an operator's layer program (weights, biases, activations, normalize)."""
    h = hashlib.sha256()
    for l in op.layers:
        h.update(f"{l.weight.shape}|{l.activation}|{l.activation_width}|{l.bias is not None};".encode())
        h.update(np.ascontiguousarray(l.weight, np.float32).tobytes())
        if l.bias is not None:
            h.update(np.ascontiguousarray(l.bias, np.float32).tobytes())
    h.update(b"normalize" if op.normalize else b"plain")
    return h.hexdigest()


def _describe_op(op: FusedTransform) -> dict:
    return {"sha256": operator_fingerprint(op), "d_in": op.d_in, "d_out": op.d_out, "normalize": op.normalize,
            "layers": [{"d_in": l.d_in, "d_out": l.d_out, "bias": l.bias is not None, "activation": l.activation,
                        "activation_width": l.activation_width} for l in op.layers]}


def _default_chunk_rows(d_in: int, in_item: int, d_out: int, out_item: int) -> int:
    row = max(d_in * in_item, d_out * out_item)
    return max(1024, (_CHUNK_BYTES // row) // 1024 * 1024)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def _disk_free(path: str) -> int:
    return shutil.disk_usage(path).free


def _crc(y: np.ndarray) -> int:
    """crc32 of an array's bytes: cheap (GB/s, GIL released) and enough to catch lost or edited chunks."""
    return zlib.crc32(np.ascontiguousarray(y).reshape(-1).view(np.uint8))


def _same_or_nested(a: str, b: str) -> bool:
    """True if paths a and b are the same file, or one lies inside the other."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    if ra == rb or ra.startswith(rb + os.sep) or rb.startswith(ra + os.sep):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


# --------------------------------------------------------------------------- verify

_U32 = 2.0 ** -24  # unit roundoff of float32: the core computes and accumulates in float32
_U16 = 2.0 ** -11  # unit roundoff of float16


def default_verify_tol(n_layers: int, max_dim: int, out_dtype: Any) -> float:
    """Largest row-relative error ``||y - ref|| / ||ref||`` a correct conversion shows against the
    float64 step-by-step chain.

    A float32 dot product of length d has relative error about sqrt(d)·u32 (u32 = 2^-24; d·u32
    is the worst case); each of the ``n_layers`` steps adds one such error, and fusing them into
    one operator one more, so we allow 8·(n_layers + 1)·sqrt(max_dim)·u32 (about 2e-5 for two
    256-d steps, 1e-4 for five 1024-d ones). A float16 output is then rounded once, at most
    u16 = 2^-11 per element (row-relative at most u16); we count it twice (about 1e-3).
    A float16 input is exact in both the core and the reference, so it adds nothing.
    """
    tol = 8.0 * (max(int(n_layers), 1) + 1) * math.sqrt(max(int(max_dim), 1)) * _U32
    if np.dtype(out_dtype) == np.float16:
        tol += 2.0 * _U16
    return float(tol)


def _layers_verify_tol(layers: Sequence[Any], out_dtype: np.dtype) -> float:
    dims = [d for l in layers for d in (l.d_in, l.d_out)] or [1]
    return default_verify_tol(len(layers), max(dims), out_dtype)


def _verify(reader: TableReader, writer: TableWriter, n: int, seed: int,
            reference: Callable[[np.ndarray], np.ndarray], tol: float) -> tuple[int, float]:
    total = reader.n_rows
    if n <= 0 or total == 0:
        return 0, 0.0
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(total, size=min(n, total), replace=False))
    x = reader.read_rows(rows)
    y = writer.read_rows(rows).astype(np.float64)
    ref = np.asarray(reference(x), dtype=np.float64)
    if ref.shape != y.shape:
        raise VerificationError(f"reference chain returned shape {ref.shape} for {len(rows)} rows, "
                                f"but the output has shape {y.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        err = np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    err = np.where(np.isfinite(err), err, np.inf)
    worst = int(np.argmax(err))
    if not np.all(np.isfinite(y)) or err[worst] > tol:
        bad = int(np.sum(~(err <= tol)))
        raise VerificationError(
            f"verification failed: {bad} of {len(rows)} random rows differ from the step-by-step chain by more "
            f"than {tol:.1e} (relative); worst row {int(rows[worst])} has error {err[worst]:.3e}. "
            "The output was not written; check the registry and the --from version "
            "(or, if the chain is ill-conditioned, raise the tolerance with --verify-tol)")
    return len(rows), float(err[worst])


# --------------------------------------------------------------------------- the journal

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
                isinstance(f, str) and os.path.basename(f) == f and f not in ("", ".", "..")
                for f in j["replacing"]["files"])))):
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


# --------------------------------------------------------------------------- what may be overwritten

def _owned_output(output: str) -> dict:
    """Check that ``output`` is a table bc_fast wrote, so ``overwrite`` may replace it.

    Returns ``{"dir": bool, "files": [names] | None}``, the exact files to remove for a
    directory; raises FileExistsError saying why anything else is refused.
    """
    why = None
    side_path = sidecar_path(output)
    side: Any = None
    if os.path.islink(output):
        why = "it is a symbolic link (bc_fast does not write through links)"
    elif not os.path.isdir(output) and not os.path.isfile(output):
        why = "it is not a regular file or directory"
    elif os.path.islink(side_path) or not os.path.isfile(side_path):
        why = f"it has no bc_fast sidecar {side_path}, so bc_fast did not write it"
    else:
        try:
            side = read_sidecar(output)
        except ValueError as e:
            why = f"its sidecar is not bc_fast's ({e})"
        else:
            if side.get("format") != _SIDECAR_FORMAT:
                why = f"its sidecar {side_path} is not a bc_fast table sidecar (format {short_repr(side.get('format'))})"
    if why is None and os.path.isdir(output):
        files = side.get("files")
        table = side.get("table") if isinstance(side.get("table"), dict) else {}
        suffixes = _DIR_TABLE_SUFFIXES.get(table.get("format"))
        if suffixes is None or not isinstance(files, list) or not all(
                isinstance(f, str) and f.endswith(suffixes) and os.path.basename(f) == f and f not in (".", "..")
                for f in files):
            why = f"it is a directory, but its sidecar {side_path} does not list the shards bc_fast wrote there"
        else:
            present = sorted(os.listdir(output))
            extra = [n for n in present if n not in files or os.path.islink(os.path.join(output, n))
                     or not os.path.isfile(os.path.join(output, n))]
            if extra:
                shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                why = f"it holds files bc_fast did not write there ({shown})"
            else:
                return {"dir": True, "files": present}
    if why is None:
        table = side.get("table") if isinstance(side.get("table"), dict) else {}
        if table.get("format") not in ("npy", "parquet"):
            why = f"its sidecar {side_path} does not describe a single-file table"
    if why is None:
        return {"dir": False, "files": None}
    raise FileExistsError(f"refusing to overwrite {output}: {why}. --overwrite only replaces a table bc_fast "
                          "wrote itself, and never removes other files; move them out of the way or choose "
                          "another OUTPUT")


def _remove_owned(path: str, replacing: Mapping[str, Any]) -> None:
    """Remove an overwritten table moved aside: exactly the files bc_fast wrote, then the folder."""
    if not os.path.isdir(path) or os.path.islink(path):
        remove_path(path)
        return
    for name in replacing.get("files") or []:
        p = os.path.join(path, name)
        if os.path.lexists(p) and not os.path.isdir(p):
            os.unlink(p)
    try:
        os.rmdir(path)
    except OSError:
        warnings.warn(f"{path}: the table it replaced was removed, but files that appeared in it since are "
                      "kept there; move them and delete the folder", RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- the core

def apply_to_table(
    op: FusedTransform,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    provenance: Mapping[str, Any] | None = None,
    dtype: Any = None,
    normalize: bool = False,
    threads: int | None = None,
    chunk_rows: int | None = None,
    resume: bool = False,
    verify: int = DEFAULT_VERIFY_ROWS,
    reference: Callable[[np.ndarray], np.ndarray] | None = None,
    verify_tol: float | None = None,
    seed: int = 0,
    column: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    journal_interval: float = 1.0,
    device: Any = "cpu",
) -> ConvertResult:
    """Stream a table through a fused operator into a new table of the same form.

    Parameters
    ----------
    op : FusedTransform
        Maps rows of dim ``op.d_in`` to rows of dim ``op.d_out``.
    input, output : path
        A ``.npy`` file (float32/float16, 2-D), a directory of ``.npy`` shards, or a
        Parquet file with a fixed-size-list embedding column (other columns are
        carried through). ``output`` takes the same form and must not exist (unless
        ``overwrite``).
    provenance : mapping, optional
        Recorded in the sidecar. Keys ``from`` / ``to`` (versions), ``registry``,
        ``registry_checksum``, ``chain`` are understood: an input whose own sidecar
        names a version other than ``provenance["from"]`` is refused.
    dtype : float32 or float16, optional
        Output dtype (default: the input's).
    normalize : bool
        L2-normalise output rows (in the core's epilogue).
    threads : int, optional
        Core threads, 1 to 1024 (default: all).
    chunk_rows : int, optional
        Rows per chunk (default: ~16 MiB per chunk). Memory is about four chunks.
        A resumed run reuses the chunking of the run it resumes.
    resume : bool
        Continue a killed run from its journal (or finish one killed while
        publishing). Without it an existing partial output is an error.
    verify : int, default 256
        Check this many random rows against ``reference`` before publishing; 0 turns it off.
    reference : callable, optional
        ``reference(x) -> float64 (n, d_out)``; default: ``op``'s own layers in float64.
    verify_tol : float, optional
        Largest allowed row-relative error (default: :func:`default_verify_tol` for the
        operator's layer count and dims and the output dtype: ~2e-5 float32, ~1e-3 float16).
    seed : int
        Seed for the verified rows.
    column : str, optional
        Parquet embedding column (default: the only fixed-size-list column).
    overwrite : bool
        Replace an existing output when the new one is complete, but only a table
        bc_fast wrote (its sidecar present; for a directory, only the shards it lists).
    progress : bool, optional
        Progress bar (tqdm); None: on a terminal or in a notebook.
    journal_interval : float
        Seconds between durable journal updates (data is fdatasync-ed first); 0 means
        after every chunk. A killed run redoes at most this much work.
    device : "cpu", "cuda" or "cuda:N"
        Where the operator runs. On a GPU (:mod:`bc_fast.convert.gpu`) chunks flow through
        pinned buffers and separate copy and compute streams; the journal, resume and
        verification are the same, the tolerance is :func:`bc_fast.convert.gpu.gpu_verify_tol`
        and the sidecar records the device. A run resumes only on the kind of device it started on.

    Returns
    -------
    ConvertResult

    Raises
    ------
    FileNotFoundError, FileExistsError, ValueError, TypeError, OSError (ENOSPC), VerificationError
        Before any work where possible; no partial output is left behind on an
        error (a KeyboardInterrupt keeps it for ``resume=True``).
    """
    if not isinstance(op, FusedTransform):
        raise TypeError(f"op must be a bc_fast.FusedTransform, got {type(op).__name__}")
    input, output = os.fspath(input), os.fspath(output)
    prov = _jsonable(dict(provenance or {}))
    if not os.path.exists(input):
        raise FileNotFoundError(f"input table {input} does not exist")
    if _same_or_nested(input, output) or _same_or_nested(input, output + _PARTIAL):
        raise ValueError(f"output {output} is (or overlaps) the input {input}; write the converted table "
                         "to a new path")
    for name, val in (("chunk_rows", chunk_rows), ("threads", threads)):
        if val is not None and (not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1):
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if threads is not None and threads > _MAX_THREADS:
        raise ValueError(f"threads={threads} is more than bc_fast can use (at most {_MAX_THREADS}); pass the "
                         f"number of cores to use (this machine has {os.cpu_count()}) or leave it unset for all")
    if not isinstance(verify, (int, np.integer)) or isinstance(verify, bool) or verify < 0:
        raise ValueError(f"verify must be a non-negative number of rows (0 turns verification off), "
                         f"got {verify!r}")
    if verify_tol is not None and not (isinstance(verify_tol, (int, float, np.floating))
                                       and math.isfinite(verify_tol) and verify_tol > 0):
        raise ValueError(f"verify_tol must be a positive finite number, got {verify_tol!r}")
    dev = None
    if device is not None and device != "cpu":
        from ..engine.device import open_device
        dev = open_device(device)

    reader = open_table(input, column)
    try:
        return _run(op, reader, input, output, prov, dtype, normalize, threads, chunk_rows, resume, int(verify),
                    reference, verify_tol, seed, overwrite, progress, journal_interval, dev)
    finally:
        reader.close()


def _check_input(op: FusedTransform, reader: TableReader, input: str, prov: dict) -> None:
    src = prov.get("from")
    side = read_sidecar(input)
    if side is not None and src is not None and side.get("version") is not None and side["version"] != src:
        raise ValueError(f"{input} is a version-{side['version']} table (per its sidecar "
                         f"{sidecar_path(input)}), but the conversion starts from version {src}; "
                         f"use --from {side['version']}")
    if reader.dim != op.d_in:
        which = f"version {src}" if src is not None else "the operator's input"
        raise ValueError(f"{input} has {reader.dim} features per row ({reader.format}, {reader.n_rows} rows, "
                         f"{reader.dtype}), but {which} has dim {op.d_in}; is --from right for this table?")


@dataclass
class _Job:
    """Everything one conversion needs, decided before any output is touched."""

    op: FusedTransform
    reader: TableReader
    writer: TableWriter
    input: str
    output: str
    temp: str
    journal_path: str
    chunks: list[Chunk]
    chunk_rows: int
    out_dtype: np.dtype
    key: str
    job: dict
    side: dict
    prov: dict
    column: str | None

    @property
    def aside(self) -> str:
        return self.output + _ASIDE

    @property
    def src(self) -> str:
        """What gets renamed to the output: the partial file or folder (a merged file for Parquet)."""
        return getattr(self.writer, "merged", self.temp)

    def result(self, resumed_rows: int, seconds: float, n_ver: int = 0, max_err: float | None = None,
               tol: float | None = None, already_complete: bool = False) -> ConvertResult:
        r = self.reader
        rows_done = r.n_rows - resumed_rows
        return ConvertResult(output=self.output, sidecar=sidecar_path(self.output), format=r.format,
                             rows=r.n_rows, dim_in=r.dim, dim_out=self.op.d_out, dtype=str(self.out_dtype),
                             chunks=len(self.chunks), chunk_rows=self.chunk_rows, resumed_rows=resumed_rows,
                             seconds=seconds, rows_per_s=rows_done / max(seconds, 1e-9),
                             bytes_read=rows_done * r.dim * r.dtype.itemsize,
                             bytes_written=rows_done * self.op.d_out * self.out_dtype.itemsize,
                             verified_rows=n_ver, verify_max_error=max_err, verify_tol=tol,
                             already_complete=already_complete, provenance=self.prov)


def _plan(op: FusedTransform, reader: TableReader, input: str, output: str, prov: dict, dtype: Any,
          normalize: bool, chunk_rows: int | None, resume: bool, column: str | None,
          device: str = "cpu") -> tuple[_Job, dict | None]:
    _check_input(op, reader, input, prov)
    out_dtype = reader.dtype if dtype is None else np.dtype(dtype)
    if out_dtype not in DTYPES:
        raise TypeError(f"output dtype must be float32 or float16, got {out_dtype}")
    if normalize and not op.normalize:
        op = FusedTransform(op.layers, normalize=True, precision=op.precision)
    out_parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_parent):
        raise FileNotFoundError(f"output directory {out_parent} does not exist; create it first")
    if reader.format == "npy" and not output.endswith(".npy"):
        raise ValueError(f"output {output} must end in .npy, like the input {input}")

    temp = output + _PARTIAL
    journal_path = temp + ".journal.json"
    journal = _load_journal(journal_path, temp)
    if resume and journal is not None and chunk_rows is None:
        chunk_rows = int(journal["job"]["chunk_rows"])
    if chunk_rows is None:
        chunk_rows = _default_chunk_rows(op.d_in, reader.dtype.itemsize, op.d_out, out_dtype.itemsize)
    chunk_rows = int(chunk_rows)

    op_desc = _describe_op(op)
    job = {"input": reader.fingerprint(), "operator": op_desc["sha256"], "dtype": str(out_dtype),
           "chunk_rows": chunk_rows, "provenance": prov}
    if device != "cpu":  # GPU bytes differ from the CPU's within the tolerance: never mix them in one table
        job["device"] = device
    key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    chunks = reader.chunks(chunk_rows)
    side = {"format": _SIDECAR_FORMAT, "version": prov.get("to"), "source_version": prov.get("from"),
            "registry": prov.get("registry"), "registry_checksum": prov.get("registry_checksum"),
            "chain_checksum": prov.get("chain_checksum"), "chain": prov.get("chain"), "provenance": prov,
            "operator": op_desc,
            "table": {"format": reader.format, "rows": reader.n_rows, "dim": op.d_out, "dtype": str(out_dtype),
                      "chunk_rows": chunk_rows},
            "input": reader.describe(), "job_key": key}
    from .. import __version__
    side["bc_fast_version"] = __version__
    embedded = {k: side[k] for k in ("format", "version", "source_version", "registry_checksum", "chain_checksum")}
    embedded["operator_sha256"] = op_desc["sha256"]
    writer = make_writer(reader, temp, op.d_out, out_dtype, chunks, embedded)
    return _Job(op, reader, writer, input, output, temp, journal_path, chunks, chunk_rows, out_dtype, key, job,
                side, prov, column), journal


def _run(op: FusedTransform, reader: TableReader, input: str, output: str, prov: dict, dtype: Any,
         normalize: bool, threads: int | None, chunk_rows: int | None, resume: bool, verify: int,
         reference: Callable[[np.ndarray], np.ndarray] | None, verify_tol: float | None, seed: int,
         overwrite: bool, progress: bool | None, journal_interval: float, dev: Any = None) -> ConvertResult:
    j, journal = _plan(op, reader, input, output, prov, dtype, normalize, chunk_rows, resume, None
                       if reader.format != "parquet" else reader.column,  # type: ignore[attr-defined]
                       "cpu" if dev is None else "cuda")
    op, writer, temp, journal_path = j.op, j.writer, j.temp, j.journal_path
    out_parent = os.path.dirname(os.path.abspath(output))
    lock = FileLock(temp + ".lock", blocking=False, busy_message=(
        f"another conversion is writing {output} (lock {{path}} is held); "
        "wait for it to finish or choose another OUTPUT"))
    owned = False  # True once the partial output is ours to clean up on error
    try:
        partial = [p for p in (temp, j.aside) if os.path.lexists(p)]
        if journal is None and not partial:
            if resume and os.path.lexists(output):
                done = _already_published(j)
                if done is not None:
                    lock.release(remove=True)
                    return done
            replacing = _check_output_free(output, overwrite)
        else:
            if not resume and journal is not None and journal.get("publishing"):
                raise FileExistsError(f"a conversion to {output} was interrupted while publishing its finished "
                                      f"table (journal {journal_path}); pass resume=True (--resume) to finish it")
            if not resume:
                done = "" if journal is None else f" ({journal['done_chunks']}/{journal['n_chunks']} chunks done)"
                raise FileExistsError(f"a partial conversion to {output} exists at {(partial or [temp])[0]}{done}; "
                                      f"pass resume=True (--resume) to continue it, or delete it and {journal_path}")
            if journal is None:
                raise ValueError(f"cannot resume: {(partial or [temp])[0]} exists but its journal {journal_path} is "
                                 f"missing; delete {(partial or [temp])[0]} and start again")
            if journal["key"] != j.key:
                old = journal.get("job") or {}
                diff = sorted(k for k in set(old) | set(j.job) if old.get(k) != j.job.get(k))
                raise ValueError(f"cannot resume: the partial output {temp} was made by a different conversion "
                                 f"(differs in: {', '.join(diff) or 'format'}); rerun with the same settings, "
                                 f"or delete {temp} and {journal_path} to start again")
            if journal["n_chunks"] != len(j.chunks):
                raise ValueError(f"{journal_path}: inconsistent conversion journal: it records "
                                 f"{journal['n_chunks']} chunks but the table has {len(j.chunks)}; delete {temp} "
                                 f"and {journal_path} to start the conversion again")
            if journal.get("publishing"):
                result = _finish_publishing(j, journal, overwrite)
                lock.release(remove=True)
                return result
            replacing = _check_output_free(output, overwrite)

        crcs: list[int] = []
        if journal is not None:
            crcs = list(journal["crcs"])
            writer.reopen(len(crcs))
            owned = True
            bad = _first_bad_chunk(writer.read_chunk, j.chunks, crcs)
            if bad is not None:
                warnings.warn(f"{temp}: chunk {bad} of the partial output does not match the checksum its journal "
                              f"{journal_path} records (the file was changed on disk); converting again from chunk "
                              f"{bad}", RuntimeWarning, stacklevel=3)
                crcs = crcs[:bad]
        else:
            need = writer.expected_bytes() + _DISK_MARGIN
            free = _disk_free(out_parent)
            if need > free:
                raise OSError(errno.ENOSPC, f"not enough disk space for {output}: the converted table needs about "
                                            f"{need / 2**20:,.0f} MiB but {out_parent} has {free / 2**20:,.0f} MiB "
                                            "free; free some space or write elsewhere")
            owned = True
            writer.create()
        start_chunk = len(crcs)
        state = {"format": _JOURNAL_FORMAT, "key": j.key, "job": j.job, "n_chunks": len(j.chunks),
                 "done_chunks": start_chunk, "crcs": crcs,
                 "done_rows": j.chunks[start_chunk - 1].stop if start_chunk else 0,
                 "complete": start_chunk == len(j.chunks), "publishing": False, "replacing": None}
        _write_journal(journal_path, state)

        resumed_rows = state["done_rows"]
        t0 = time.perf_counter()
        _pipeline(op, reader, writer, j.chunks, start_chunk, out_dtype=j.out_dtype, threads=threads, state=state,
                  journal_path=journal_path, journal_interval=journal_interval, progress=progress, output=output,
                  dev=dev)
        seconds = time.perf_counter() - t0

        n_ver, max_err, tol = 0, None, None
        if verify:
            if reference is None:
                from ..engine.fusion import apply_layers_reference

                def reference(x: np.ndarray, _op: FusedTransform = op) -> np.ndarray:
                    y = apply_layers_reference(_op.layers, x)
                    if _op.normalize:
                        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
                    return y
            # a reference that carries its step-by-step layers sets the depth of the default tolerance
            tol = (float(verify_tol) if verify_tol is not None
                   else _layers_verify_tol(getattr(reference, "layers", None) or op.layers, j.out_dtype))
            if dev is not None and verify_tol is None:
                from .gpu import gpu_verify_tol
                tol = gpu_verify_tol(tol, len(op.layers), reader.dtype)
            n_ver, max_err = _verify(reader, writer, verify, seed, reference, tol)
        if dev is not None:
            j.side["device"] = {**dev.describe(reader.dtype), "verify_tol": tol}

        writer.seal()
        writer.close()
        j.side["chunk_crc32"] = state["crcs"]
        if writer.files():
            j.side["files"] = writer.files()
        j.side["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(sidecar_path(output) + ".tmp", j.side)  # renamed into place by _publish
        replacing = _check_output_free(output, overwrite)  # again: OUTPUT may have appeared meanwhile
        # From here on a failure keeps everything: resume=True finishes the publishing.
        state.update(publishing=True, replacing=replacing)
        _write_journal(journal_path, state)
        owned = False
        _publish(j, replacing)
        lock.release(remove=True)
        return j.result(resumed_rows, seconds, n_ver, max_err, tol)
    except KeyboardInterrupt:
        writer.close()
        lock.release(remove=True)
        if owned:
            sys.stderr.write(f"\ninterrupted: the partial output {temp} is kept; rerun with --resume to continue\n")
        elif os.path.lexists(journal_path):
            sys.stderr.write(f"\ninterrupted while publishing {output}; rerun with --resume to finish\n")
        raise
    except BaseException:
        writer.close()
        if owned:
            for p in (temp, journal_path, sidecar_path(output) + ".tmp"):
                remove_path(p)
        lock.release(remove=True)  # only a flock target: removing it never loses state
        raise


def _check_output_free(output: str, overwrite: bool) -> dict | None:
    """None if ``output`` does not exist; what overwriting it replaces if it is bc_fast's and allowed."""
    if not os.path.lexists(output):
        return None
    if not overwrite:
        raise FileExistsError(f"output {output} already exists; remove it, choose another path, or pass "
                              "overwrite=True (--overwrite) to replace a table bc_fast wrote")
    return _owned_output(output)


def _publish(j: _Job, replacing: Mapping[str, Any] | None) -> None:
    """Put the finished table and its sidecar in place. Every step can be redone, so a run killed
    anywhere in here is finished by resume (the journal says ``publishing``). The old sidecar goes
    first, so an interrupted overwrite leaves a table without a sidecar, never with a wrong one."""
    output, sidecar, src = j.output, sidecar_path(j.output), j.src
    if os.path.lexists(src):
        if replacing is not None and os.path.lexists(output):
            remove_path(sidecar)
            if replacing["dir"] or os.path.isdir(src):
                os.replace(output, j.aside)
        os.replace(src, output)
    if os.path.lexists(sidecar + ".tmp"):
        os.replace(sidecar + ".tmp", sidecar)
    elif not os.path.isfile(sidecar):
        atomic_write_json(sidecar, j.side)
    if os.path.lexists(j.temp):
        remove_path(j.temp)  # the Parquet parts
    if os.path.lexists(j.aside):
        _remove_owned(j.aside, replacing or {})
    remove_path(j.journal_path)
    fsync_dir(os.path.dirname(os.path.abspath(output)))


def _finish_publishing(j: _Job, journal: Mapping[str, Any], overwrite: bool) -> ConvertResult:
    """Resume a run killed while publishing: check what is in place against the journal's
    checksums, then redo the remaining steps."""
    crcs = journal["crcs"]
    if not journal.get("complete") or len(crcs) != len(j.chunks):
        raise ValueError(f"{j.journal_path}: inconsistent conversion journal: publishing an incomplete table; "
                         f"delete {j.temp} and {j.journal_path} to start the conversion again")
    where = j.src if os.path.lexists(j.src) else j.output
    if not os.path.lexists(where):
        raise ValueError(f"cannot resume: the journal {j.journal_path} says {j.output} was being published, but "
                         f"neither it nor {j.src} exists; delete {j.journal_path} and start again")
    why = _table_matches(where, j.column, j.chunks, j.chunk_rows, crcs)
    if why is not None:
        raise ValueError(f"cannot resume: {where} does not hold the table the journal {j.journal_path} records: "
                         f"{why}; delete {j.journal_path} (and {where} if it is not wanted) and start again")
    j.side["chunk_crc32"] = list(crcs)
    if j.writer.files():
        j.side["files"] = j.writer.files()
    j.side.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    replacing = journal.get("replacing")
    if replacing is None and os.path.lexists(j.src) and os.path.lexists(j.output):
        replacing = _check_output_free(j.output, overwrite)  # OUTPUT appeared after the run checked it
    _publish(j, replacing)
    return j.result(j.reader.n_rows, 0.0, already_complete=True)


def _already_published(j: _Job) -> ConvertResult | None:
    """A ``resume`` that finds no journal and no partial output, but this exact conversion's table
    and sidecar in place (a run killed after publishing, before removing its lock): nothing to do."""
    try:
        side = read_sidecar(j.output)
    except ValueError:
        return None
    if not side or side.get("job_key") != j.key or not isinstance(side.get("chunk_crc32"), list):
        return None
    if _table_matches(j.output, j.column, j.chunks, j.chunk_rows, side["chunk_crc32"]) is not None:
        return None
    return j.result(j.reader.n_rows, 0.0, already_complete=True)


def _journaled_writer(writer: TableWriter, chunks: list[Chunk], state: dict, journal_path: str,
                      journal_interval: float, bar: Progress) -> Callable[[Chunk, np.ndarray, Any], None]:
    """``write(chunk, y, extra)``: write a chunk, record its crc32 and, every ``journal_interval``
    seconds (and after the last chunk), make the data durable and then the journal. Chunks come in order."""
    last_sync = [time.monotonic()]
    crcs: list[int] = state["crcs"]

    def write(chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        writer.write(chunk, y, extra)
        crcs.append(_crc(y))  # the writer thread writes chunks in order
        now = time.monotonic()
        if chunk.index == len(chunks) - 1 or now - last_sync[0] >= journal_interval:
            writer.sync()
            state.update(done_chunks=chunk.index + 1, done_rows=chunk.stop, crcs=crcs[: chunk.index + 1],
                         complete=chunk.index == len(chunks) - 1)
            _write_journal(journal_path, state)
            last_sync[0] = now
        bar.update(chunk.rows)

    return write


def _pipeline(op: FusedTransform, reader: TableReader, writer: TableWriter, chunks: list[Chunk],
              start: int, *, out_dtype: np.dtype, threads: int | None, state: dict,
              journal_path: str, journal_interval: float, progress: bool | None, output: str,
              dev: Any = None) -> None:
    """Read chunk i+1, compute chunk i and write chunk i-1 at the same time (on a GPU: see
    :func:`bc_fast.convert.gpu.gpu_pipeline`)."""
    todo = chunks[start:]
    if not todo:
        return
    bar = Progress(sum(c.rows for c in todo), f"convert {os.path.basename(output)}"
                   + (f" (resumed at chunk {start})" if start else ""), enabled=progress)
    crcs: list[int] = state["crcs"]
    write = _journaled_writer(writer, chunks, state, journal_path, journal_interval, bar)
    if dev is not None:
        from .gpu import gpu_pipeline
        try:
            gpu_pipeline(op, reader, chunks, start, out_dtype=out_dtype, dev=dev, sink=write)
        finally:
            bar.close()
        state["crcs"] = crcs
        return
    depth = 2
    buf_rows = max(c.rows for c in todo)
    in_bufs = [np.empty((buf_rows, reader.dim), reader.dtype) for _ in range(depth)]
    out_bufs = [np.empty((buf_rows, op.d_out), out_dtype) for _ in range(depth)]

    with ThreadPoolExecutor(1, "bcfast-read") as rpool, ThreadPoolExecutor(1, "bcfast-write") as wpool:
        writes: list[Future] = []
        try:
            pending = rpool.submit(reader.read, todo[0], in_bufs[0])
            for i, chunk in enumerate(todo):
                x, extra = pending.result()
                if i + 1 < len(todo):
                    pending = rpool.submit(reader.read, todo[i + 1], in_bufs[(i + 1) % depth])
                if i >= depth:
                    writes[i - depth].result()  # its output buffer is about to be reused
                y = out_bufs[i % depth][: chunk.rows]
                op.apply(x, out=y, threads=threads)
                writes.append(wpool.submit(write, chunk, y, extra))
            for w in writes[-depth:]:
                w.result()
        except BaseException:
            for w in writes:
                w.cancel()
            raise
        finally:
            bar.close()
        state["crcs"] = crcs


# --------------------------------------------------------------------------- registry wrapper

def convert_table(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    registry: Any,
    dst: int,
    src: int | None = None,
    normalize: bool = False,
    **options: Any,
) -> ConvertResult:
    """Convert a table of version ``src`` embeddings into version ``dst`` embeddings.

    Parameters
    ----------
    input, output : path
        See :func:`apply_to_table` (``.npy``, a directory of ``.npy`` shards, Parquet).
    registry : Registry or path
        The version registry (``bc_fast.store.Registry`` or its directory).
    dst : int
        Target version (older than ``src``).
    src : int, optional
        Version of the input table (default: the registry's latest).
    normalize : bool
        L2-normalise the output rows.
    **options
        ``dtype, threads, chunk_rows, resume, verify, verify_tol, seed, column,
        overwrite, progress, journal_interval, device`` (``"cpu"``, ``"cuda"``,
        ``"cuda:N"``) as in :func:`apply_to_table`.

    Returns
    -------
    ConvertResult
        The output's sidecar records ``version=dst``, the registry's checksum and the chain.
    """
    if options.get("device") not in (None, "cpu"):
        from ..engine.device import parse_device
        parse_device(options["device"])  # a bad device string fails before the registry is opened
    op, prov, reference = registry_job(registry, src, dst, normalize)
    options.setdefault("reference", reference)
    return apply_to_table(op, input, output, provenance=prov, normalize=normalize, **options)


def registry_job(registry: Any, src: int | None, dst: int,
                 normalize: bool = False) -> tuple[FusedTransform, dict, Callable[[np.ndarray], np.ndarray]]:
    """The operator, the provenance and the float64 reference of the conversion ``src -> dst``
    (what :func:`convert_table` hands to :func:`apply_to_table`; shared with :mod:`bc_fast.convert.distributed`)."""
    from ..engine.fusion import apply_layers_reference, flatten_chain
    from ..store.registry import Registry

    if not hasattr(registry, "operator"):
        registry = Registry.open(os.fspath(registry))
    reg_path = os.path.abspath(os.fspath(registry.path))
    src = registry.latest if src is None else int(src)
    dst = int(dst)
    if dst == src:
        raise ValueError(f"--from and --to are both version {src}; there is nothing to convert")
    op = registry.operator(src, dst, normalize=normalize)
    steps = registry.chain_layers(src, dst)
    step = -1 if dst < src else 1
    chain = [{"from": v, "to": v + step, "sha256": registry.transform_info(v, v + step).sha256}
             for v in range(src, dst, step)]
    prov = {"registry": reg_path, "registry_checksum": registry.checksum,
            "chain_checksum": registry.chain_checksum(src, dst), "from": src, "to": dst,
            "dims": {"from": registry.dim(src), "to": registry.dim(dst)}, "chain": chain,
            "normalize": bool(normalize)}
    layers = flatten_chain(steps)

    def reference(x: np.ndarray) -> np.ndarray:
        y = apply_layers_reference(layers, x)
        if normalize:
            y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y

    reference.layers = layers  # type: ignore[attr-defined]  # sets the default verify tolerance's depth
    return op, prov, reference
