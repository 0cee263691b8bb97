"""The conversion pipeline: the entry points, and the run that takes a table through every stage.

What lives here: :func:`apply_to_table` and :func:`convert_table`, the run between them (plan, chunk
loop, verification, publishing, in that order) and the CPU pipeline that reads, computes and writes
chunks. It may import every other module of :mod:`bc_fast.convert` (:mod:`.job`, :mod:`.journal`,
:mod:`.publish`; :mod:`.gpu` lazily, for a run on a GPU), :mod:`bc_fast.engine`, :mod:`bc_fast.store`
and ``bc_fast._util``; only :mod:`.distributed` and the package import it.

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
while publishing is finished by ``resume=True``. ``overwrite=True`` only ever replaces a
table bc_fast wrote (the rules are :mod:`.publish`'s).

Where each step lives: the plan, the sidecar's content and the verification in :mod:`.job`; the
journal, the chunks' crc32 and the resume checks in :mod:`.journal`; the renames into place and the
overwrite rules in :mod:`.publish`; the GPU pipeline in :mod:`.gpu`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .._util.blas import single_threaded_blas
from .._util.fileio import FileLock, atomic_write_json
from .._util.progress import Progress
from ..engine import FusedTransform, get_num_threads
from ..engine.routed import RoutedTransform
from ..store.tables import Chunk, TableReader, TableWriter, open_table, remove_path
from .job import (
    _PARTIAL,
    DEFAULT_VERIFY_ROWS,
    ConvertResult,
    SampleCheck,
    _plan,
    _reference_verify_tol,
    default_reference,
    registry_job,
    sidecar_path,
)
from .journal import (
    _JOURNAL_FORMAT,
    NonFiniteRow,
    _first_bad_chunk,
    _journaled_writer,
    _write_journal,
)
from .publish import (
    _already_published,
    _check_output_free,
    _finish_publishing,
    _publish,
)

__all__ = ["apply_to_table", "convert_table"]

_MAX_THREADS = 1024
_DISK_MARGIN = 64 << 20
#: Chunks in flight on the CPU path: read ahead, computed, written behind (one buffer of each per chunk).
_DEPTH = 2


# --------------------------------------------------------------------------- small pieces

def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def _disk_free(path: str) -> int:
    return shutil.disk_usage(path).free


def _same_or_nested(a: str, b: str) -> bool:
    """True if paths a and b are the same file, or one lies inside the other."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    if ra == rb or ra.startswith(rb + os.sep) or rb.startswith(ra + os.sep):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


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
        A ``.npy`` file (float32/float16/bfloat16, 2-D), a directory of ``.npy`` shards, or a
        Parquet file with a fixed-size-list embedding column (other columns are
        carried through). ``output`` takes the same form and must not exist (unless
        ``overwrite``).
    provenance : mapping, optional
        Recorded in the sidecar. Keys ``from`` / ``to`` (versions), ``registry``,
        ``registry_checksum``, ``chain`` are understood: an input whose own sidecar
        names a version other than ``provenance["from"]`` is refused.
    dtype : float32, float16 or bfloat16, optional
        Output dtype (default: the input's). bfloat16 (``"bfloat16"`` or ``ml_dtypes.bfloat16``) for ``.npy``
        tables only, written as ``np.save`` writes such an array (descr ``'<V2'``).
    normalize : bool
        L2-normalise output rows (in the core's epilogue).
    threads : int, optional
        Core threads, 1 to 1024 (default: all). While the conversion runs, numpy's BLAS in this
        process is held to one thread (threadpoolctl): its idle workers busy-wait for ~0.1 s after
        each call, on the cores the core's GEMM needs. On the CPU, while the run waits on reading or
        writing (a Parquet input's decoding, a slow disk), chunks are computed on the fewest threads
        that keep up with it (one on two cores), leaving the other cores to the reader and writer;
        all ``threads`` again once the compute is what it waits for.
    chunk_rows : int, optional
        Rows per chunk (default: ~16 MiB per chunk, and at most 16,384 rows for ``.npy`` tables on the
        CPU). Memory is about four chunks.
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
    if not isinstance(op, (FusedTransform, RoutedTransform)):
        raise TypeError(f"op must be a bc_fast.FusedTransform or a RoutedTransform, got {type(op).__name__}")
    if isinstance(op, RoutedTransform) and device is not None and device != "cpu":
        raise ValueError(f"device={device!r}: a routed (local) transform runs on the CPU only (the compiled core "
                         "has no CUDA routed operator yet); convert with device='cpu'")
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
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed (of the verified sample) must be a non-negative integer, got {seed!r}")
    if isinstance(journal_interval, bool) or not (isinstance(journal_interval, (int, float, np.integer, np.floating))
                                                  and math.isfinite(journal_interval) and journal_interval >= 0):
        raise ValueError(f"journal_interval must be a finite number of seconds >= 0 (0 journals every chunk), "
                         f"got {journal_interval!r}")
    dev = None
    if device is not None and device != "cpu":
        from ..engine.device import open_device
        dev = open_device(device)

    reader = open_table(input, column)
    try:
        # The verification's float64 reference runs here: with BLAS threads its workers would busy-wait
        # afterwards, beside whatever the core runs next (another conversion in this process, a Ray worker's
        # next file). The fusion of the chain limits itself (fuse_chain, fuse_routed_chain).
        with single_threaded_blas():
            return _run(op, reader, input, output, prov, dtype, normalize, threads, chunk_rows, resume, int(verify),
                        reference, verify_tol, seed, overwrite, progress, journal_interval, dev)
    finally:
        reader.close()


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
                writer.drop_after(bad)
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

        check, tol = None, None
        if verify:
            if reference is None:
                reference = default_reference(op)
            # a reference that carries its step-by-step layers (or a routed chain's shape) sets the default's depth
            tol = float(verify_tol) if verify_tol is not None else _reference_verify_tol(reference, op, j.out_dtype)
            if dev is not None and verify_tol is None:
                from .gpu import gpu_verify_tol
                tol = gpu_verify_tol(tol, len(op.layers), reader.dtype)
            check = SampleCheck(reader, op.d_out, j.out_dtype, verify, seed, reference, tol)

        resumed_rows = state["done_rows"]
        t0 = time.perf_counter()
        try:
            _pipeline(op, reader, writer, j.chunks, start_chunk, out_dtype=j.out_dtype, threads=threads,
                      state=state, journal_path=journal_path, journal_interval=journal_interval, progress=progress,
                      output=output, dev=dev, check=check)
        except NonFiniteRow as e:
            raise ValueError(_non_finite_message(reader, input, e.row, j.out_dtype)) from None
        seconds = time.perf_counter() - t0
        n_ver, max_err = check.finish(reader, writer) if check is not None else (0, None)
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


#: The largest finite value of each output dtype, for the overflow message.
_LARGEST = {"float16": 65504.0, "bfloat16": 3.39e38, "float32": 3.40e38}


def _non_finite_message(reader: TableReader, input: str, row: int, out_dtype: np.dtype) -> str:
    """Why output row ``row`` holds NaN or Inf: a NaN or Inf in its input row, or values beyond the output dtype."""
    x = np.asarray(reader.read_rows(np.array([row])), dtype=np.float32)
    if not np.isfinite(x).all():
        return (f"input row {row} of {input} holds NaN or Inf, so its converted row would too; nothing was "
                "written. Fix or drop that row of the input table and convert again")
    name = out_dtype.name
    largest = _LARGEST.get(name, float("inf"))
    hint = ("Convert to float32 instead (dtype='float32', --dtype float32)" if name == "float16" else
            "The transform's weights are far too large for these inputs; check the registry's versions")
    return (f"converted row {row} of {input} is not finite in {name}: its values exceed {name}'s largest "
            f"finite value ({largest:.6g}) although the input row is finite; nothing was written. {hint}")


class _ComputeThreads:
    """The core's thread count for the next chunk of a CPU pipeline, from how the last one went.

    Decoding Parquet, encoding it, checksums and page-cache copies run on the reader's and writer's
    threads; a multi-threaded GEMM that would only wait for them anyway takes their cores (a 500k x 256
    float16 Parquet conversion on 2 cores: 4.89 s with both threads computing, 4.50 s with this). So while
    the run waits on reading or writing, the next chunk gets the fewest threads that still keep up with
    that stage, assuming the compute scales with threads, with a quarter to spare (on 2 cores: one thread
    once the run waits 1.5x as long as it computes). All threads again as soon as the run waits on the
    compute (less than a tenth of its time). Thread counts never change the bits.
    """

    def __init__(self, threads: int | None) -> None:
        self.full = get_num_threads() if threads is None else threads
        self.threads = self.full

    def update(self, waited: float, computed: float) -> None:
        """Record a chunk: seconds the run waited for its input and a free output buffer, seconds computing it."""
        if self.full <= 1:
            return
        if self.threads == self.full:
            period = waited + computed  # what the slowest stage takes per chunk
            if period > 0:
                self.threads = max(1, min(self.full, math.ceil(1.25 * self.full * computed / period)))
        elif waited < 0.1 * computed:
            self.threads = self.full


def _pipeline(op: FusedTransform, reader: TableReader, writer: TableWriter, chunks: list[Chunk],
              start: int, *, out_dtype: np.dtype, threads: int | None, state: dict,
              journal_path: str, journal_interval: float, progress: bool | None, output: str,
              dev: Any = None, check: SampleCheck | None = None) -> None:
    """Read ahead, compute and write behind at the same time (on a GPU: see
    :func:`bc_fast.convert.gpu.gpu_pipeline`).

    The reader thread ``pread``-s up to ``depth`` chunks ahead, the calling thread runs the core (GIL
    released, on ``threads`` or one: :class:`_ComputeThreads`) and the writer thread writes, checksums,
    syncs and checks the verified sample of up to ``depth`` chunks behind; the ``2 * depth`` buffers are
    allocated once per run.
    """
    todo = chunks[start:]
    if not todo:
        return
    bar = Progress(sum(c.rows for c in todo), f"convert {os.path.basename(output)}"
                   + (f" (resumed at chunk {start})" if start else ""), enabled=progress)
    crcs: list[int] = state["crcs"]
    write = _journaled_writer(writer, chunks, state, journal_path, journal_interval, bar, check)

    def pick(chunk: Chunk, x: np.ndarray) -> np.ndarray | None:
        """A copy of the chunk's input rows in the verified sample (for the writer thread)."""
        return None if check is None else x[check.rows[check.rows_in(chunk)] - chunk.start]

    if dev is not None:
        from .gpu import gpu_pipeline
        try:
            gpu_pipeline(op, reader, chunks, start, out_dtype=out_dtype, dev=dev, sink=write, pick=pick)
        finally:
            bar.close()
        state["crcs"] = crcs
        return
    depth = _DEPTH
    buf_rows = max(c.rows for c in todo)
    in_bufs = [np.empty((buf_rows, reader.dim), reader.dtype) for _ in range(depth)]
    out_bufs = [writer.new_buffer(buf_rows) for _ in range(depth)]

    with ThreadPoolExecutor(1, "bcfast-read") as rpool, ThreadPoolExecutor(1, "bcfast-write") as wpool:
        # Futures are dropped once consumed: a finished read holds its chunk (a Parquet reader's rows and
        # extra columns are its own arrays), so keeping them all grew memory with the table's size.
        reads: dict[int, Future] = {}
        writes: dict[int, Future] = {}
        try:
            reads = {i: rpool.submit(reader.read, c, in_bufs[i]) for i, c in enumerate(todo[:depth - 1])}
            pace = _ComputeThreads(threads)
            for i, chunk in enumerate(todo):
                wait_start = time.perf_counter()
                x, extra = reads.pop(i).result()
                if i >= depth:
                    writes.pop(i - depth).result()  # its output buffer is about to be reused
                waited = time.perf_counter() - wait_start
                if i + depth - 1 < len(todo):  # the buffer of chunk i - 1 is free again: read ahead into it
                    reads[i + depth - 1] = rpool.submit(reader.read, todo[i + depth - 1], in_bufs[(i + depth - 1) % depth])
                y = out_bufs[i % depth][: chunk.rows]
                compute_start = time.perf_counter()
                op.apply(x, out=y, threads=pace.threads)
                # Chunk 0 waits for the first read, which nothing can overlap: not a sign of a slow reader.
                pace.update(waited if i else 0.0, time.perf_counter() - compute_start)
                writes[i] = wpool.submit(write, chunk, y, extra, pick(chunk, x))
                del x, extra
            for i in sorted(writes):
                writes.pop(i).result()
        except BaseException:
            for f in [*reads.values(), *writes.values()]:
                f.cancel()
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
