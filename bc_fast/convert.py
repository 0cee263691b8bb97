"""Streaming conversion of embedding tables to an older embedding version.

Two levels:

- :func:`apply_to_table` is the core: it streams a table (``.npy``, a directory of
  ``.npy`` shards, or Parquet with a fixed-size-list column) through a
  :class:`~bc_fast.ops.FusedTransform` in chunks and records a caller-supplied
  provenance dict in a sidecar next to the output.
- :func:`convert_table` is the registry-level wrapper: it builds the operator for
  ``src -> dst`` from a :class:`~bc_fast.registry.Registry` and stamps the output
  with the registry's checksum and chain.

How a run works: a reader thread ``pread``-s chunk i+1 while the core (GIL
released) computes chunk i and a writer thread ``pwrite``-s chunk i-1, so the run
is bound by the slower of disk and compute, and memory by two input and two output
chunks. Output goes to ``OUTPUT.partial``; a JSON journal next to it
(``OUTPUT.partial.journal.json``, replaced atomically) records the last chunk made
durable (fdatasync first), so a killed run resumes with ``resume=True`` and ends
byte-identical to an uninterrupted one (the chunking is recorded and reused). Only a
complete (and, if asked, verified) table is renamed to ``OUTPUT``; its sidecar
``OUTPUT.bcfast.json`` names the embedding version, the registry checksum and chain,
and the operator's sha256.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .ops import FusedTransform
from .progress import Progress
from ._fileio import FileLock, atomic_write_json, fsync_dir
from .tables import (DTYPES, Chunk, TableReader, TableWriter, make_writer, open_table,
                     remove_path)

__all__ = ["apply_to_table", "convert_table", "ConvertResult", "VerificationError",
           "read_sidecar", "sidecar_path", "SIDECAR_SUFFIX"]

SIDECAR_SUFFIX = ".bcfast.json"
_PARTIAL = ".partial"
_JOURNAL_FORMAT = "bc_fast.convert.journal/1"
_SIDECAR_FORMAT = "bc_fast.table/1"
_CHUNK_BYTES = 16 << 20  # default chunk: ~16 MiB of input or output rows, whichever is larger
_DISK_MARGIN = 64 << 20


class VerificationError(ValueError):
    """Converted rows disagree with the step-by-step reference chain."""


@dataclass
class ConvertResult:
    """What a conversion did.

    ``rows_per_s`` counts the rows converted in this run (not the resumed ones).
    ``verify_max_error`` is the largest row-relative error ``||y - ref|| / ||ref||``
    over the verified rows (None if ``verify=0``).
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
    provenance: dict = field(default_factory=dict)

    def summary(self) -> str:
        """A human-readable one-paragraph summary."""
        mib = 1 << 20
        lines = [f"converted {self.rows:,} rows ({self.format}, {self.dim_in} -> {self.dim_out}, {self.dtype}) "
                 f"in {self.seconds:.2f} s: {self.rows_per_s:,.0f} rows/s, "
                 f"read {self.bytes_read / mib:,.1f} MiB, wrote {self.bytes_written / mib:,.1f} MiB"]
        if self.resumed_rows:
            lines.append(f"resumed after {self.resumed_rows:,} rows already converted")
        if self.verified_rows:
            lines.append(f"verified {self.verified_rows} random rows against the step-by-step chain: "
                         f"max relative error {self.verify_max_error:.2e}")
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
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable sidecar ({e}); delete it if the table is not a converted one") from e


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
    err = np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    worst = int(np.argmax(err))
    if not np.all(np.isfinite(y)) or err[worst] > tol:
        bad = int(np.sum(~(err <= tol)))
        raise VerificationError(
            f"verification failed: {bad} of {len(rows)} random rows differ from the step-by-step chain by more "
            f"than {tol:.1e} (relative); worst row {int(rows[worst])} has error {err[worst]:.3e}. "
            "The output was not written; check the registry and the --from version")
    return len(rows), float(err[worst])


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
    verify: int = 0,
    reference: Callable[[np.ndarray], np.ndarray] | None = None,
    verify_tol: float | None = None,
    seed: int = 0,
    column: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    journal_interval: float = 1.0,
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
        Core threads (default: all).
    chunk_rows : int, optional
        Rows per chunk (default: ~16 MiB per chunk). Memory is about four chunks.
        A resumed run reuses the chunking of the run it resumes.
    resume : bool
        Continue a killed run from its journal. Without it an existing partial
        output is an error.
    verify : int
        Check this many random rows against ``reference`` before publishing.
    reference : callable, optional
        ``reference(x) -> float64 (n, d_out)``; default: ``op``'s own layers in float64.
    verify_tol : float, optional
        Largest allowed row-relative error (default 1e-3 for float32 output, 5e-3 for float16).
    seed : int
        Seed for the verified rows.
    column : str, optional
        Parquet embedding column (default: the only fixed-size-list column).
    overwrite : bool
        Replace an existing output (and its sidecar) when the new one is complete.
    progress : bool, optional
        Progress bar on stderr; None: only when stderr is a terminal.
    journal_interval : float
        Seconds between durable journal updates (data is fdatasync-ed first); 0 means
        after every chunk. A killed run redoes at most this much work.

    Returns
    -------
    ConvertResult

    Raises
    ------
    FileNotFoundError, ValueError, TypeError, OSError (ENOSPC), VerificationError
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
    if os.path.lexists(output) and not overwrite:
        raise FileExistsError(f"output {output} already exists; remove it, choose another path, or pass "
                              "overwrite=True (--overwrite)")
    for name, val in (("chunk_rows", chunk_rows), ("threads", threads)):
        if val is not None and (not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1):
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if not isinstance(verify, (int, np.integer)) or verify < 0:
        raise ValueError(f"verify must be a non-negative number of rows, got {verify!r}")

    reader = open_table(input, column)
    try:
        return _run(op, reader, input, output, prov, dtype, normalize, threads, chunk_rows, resume, int(verify),
                    reference, verify_tol, seed, overwrite, progress, journal_interval)
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


def _run(op: FusedTransform, reader: TableReader, input: str, output: str, prov: dict, dtype: Any,
         normalize: bool, threads: int | None, chunk_rows: int | None, resume: bool, verify: int,
         reference: Callable[[np.ndarray], np.ndarray] | None, verify_tol: float | None, seed: int,
         overwrite: bool, progress: bool | None, journal_interval: float) -> ConvertResult:
    _check_input(op, reader, input, prov)
    out_dtype = reader.dtype if dtype is None else np.dtype(dtype)
    if out_dtype not in DTYPES:
        raise TypeError(f"output dtype must be float32 or float16, got {out_dtype}")
    if normalize and not op.normalize:
        op = FusedTransform(op.layers, normalize=True)
    out_parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_parent):
        raise FileNotFoundError(f"output directory {out_parent} does not exist; create it first")
    if reader.format == "npy" and not output.endswith(".npy"):
        raise ValueError(f"output {output} must end in .npy, like the input {input}")

    temp, journal_path = output + _PARTIAL, output + _PARTIAL + ".journal.json"
    journal: dict | None = None
    if os.path.exists(journal_path):
        try:
            with open(journal_path) as f:
                journal = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{journal_path}: unreadable journal ({e}); delete it and {temp} to start again") from e
    if resume and journal is not None and chunk_rows is None:
        chunk_rows = int(journal["job"]["chunk_rows"])
    if chunk_rows is None:
        chunk_rows = _default_chunk_rows(op.d_in, reader.dtype.itemsize, op.d_out, out_dtype.itemsize)
    chunk_rows = int(chunk_rows)

    op_desc = _describe_op(op)
    job = {"input": reader.fingerprint(), "operator": op_desc["sha256"], "dtype": str(out_dtype),
           "chunk_rows": chunk_rows, "provenance": prov}
    key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    chunks = reader.chunks(chunk_rows)
    side = {"format": _SIDECAR_FORMAT, "version": prov.get("to"), "source_version": prov.get("from"),
            "registry": prov.get("registry"), "registry_checksum": prov.get("registry_checksum"),
            "chain_checksum": prov.get("chain_checksum"), "chain": prov.get("chain"), "provenance": prov, "operator": op_desc,
            "table": {"format": reader.format, "rows": reader.n_rows, "dim": op.d_out, "dtype": str(out_dtype),
                      "chunk_rows": chunk_rows},
            "input": reader.describe()}
    from . import __version__
    side["bc_fast_version"] = __version__
    embedded = {k: side[k] for k in ("format", "version", "source_version", "registry_checksum", "chain_checksum")}
    embedded["operator_sha256"] = op_desc["sha256"]
    writer = make_writer(reader, temp, op.d_out, out_dtype, chunks, embedded)

    lock = FileLock(temp + ".lock", blocking=False, busy_message=(
        f"another conversion is writing {output} (lock {{path}} is held); "
        "wait for it to finish or choose another OUTPUT"))
    owned = False  # True once the partial output is ours to clean up on error
    try:
        start_chunk = 0
        if journal is not None or os.path.lexists(temp):
            if not resume:
                done = "" if journal is None else f" ({journal.get('done_chunks', 0)}/{len(chunks)} chunks done)"
                raise FileExistsError(f"a partial conversion to {output} exists at {temp}{done}; pass resume=True "
                                      f"(--resume) to continue it, or delete {temp} and {journal_path}")
            if journal is None:
                raise ValueError(f"cannot resume: {temp} exists but its journal {journal_path} is missing; "
                                 f"delete {temp} and start again")
            if journal.get("format") != _JOURNAL_FORMAT or journal.get("key") != key:
                old = journal.get("job", {})
                diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
                raise ValueError(f"cannot resume: the partial output {temp} was made by a different conversion "
                                 f"(differs in: {', '.join(diff) or 'format'}); rerun with the same settings, "
                                 f"or delete {temp} and {journal_path} to start again")
            start_chunk = int(journal["done_chunks"])
            writer.reopen(start_chunk)
            owned = True
        else:
            need = writer.expected_bytes() + _DISK_MARGIN
            free = _disk_free(out_parent)
            if need > free:
                raise OSError(errno.ENOSPC, f"not enough disk space for {output}: the converted table needs about "
                                            f"{need / 2**20:,.0f} MiB but {out_parent} has {free / 2**20:,.0f} MiB "
                                            "free; free some space or write elsewhere")
            owned = True
            writer.create()
        state = {"format": _JOURNAL_FORMAT, "key": key, "job": job, "n_chunks": len(chunks),
                 "done_chunks": start_chunk, "done_rows": chunks[start_chunk - 1].stop if start_chunk else 0,
                 "complete": start_chunk == len(chunks)}
        atomic_write_json(journal_path, state)

        resumed_rows = state["done_rows"]
        t0 = time.perf_counter()
        _pipeline(op, reader, writer, chunks, start_chunk, chunk_rows, out_dtype, threads, state,
                  journal_path, journal_interval, progress, output)
        seconds = time.perf_counter() - t0

        n_ver, max_err = 0, None
        if verify:
            if reference is None:
                from .fusion import apply_layers_reference

                def reference(x: np.ndarray, _op: FusedTransform = op) -> np.ndarray:
                    y = apply_layers_reference(_op.layers, x)
                    if _op.normalize:
                        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
                    return y
            tol = verify_tol if verify_tol is not None else (5e-3 if out_dtype == np.float16 else 1e-3)
            n_ver, max_err = _verify(reader, writer, verify, seed, reference, tol)

        writer.seal()
        writer.close()
        sidecar = sidecar_path(output)
        if writer.files():
            side["files"] = writer.files()
        side["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(sidecar + ".tmp", side)  # lands at sidecar + ".tmp", renamed below
        _publish(writer, temp, output, sidecar)
        remove_path(journal_path)
        fsync_dir(out_parent)
        lock.release(remove=True)
        rows_done = reader.n_rows - resumed_rows
        in_bytes = rows_done * reader.dim * reader.dtype.itemsize
        out_bytes = rows_done * op.d_out * out_dtype.itemsize
        return ConvertResult(output=output, sidecar=sidecar, format=reader.format, rows=reader.n_rows,
                             dim_in=reader.dim, dim_out=op.d_out, dtype=str(out_dtype), chunks=len(chunks),
                             chunk_rows=chunk_rows, resumed_rows=resumed_rows, seconds=seconds,
                             rows_per_s=rows_done / max(seconds, 1e-9), bytes_read=in_bytes,
                             bytes_written=out_bytes, verified_rows=n_ver, verify_max_error=max_err,
                             provenance=prov)
    except KeyboardInterrupt:
        writer.close()
        lock.release(remove=False)
        if owned:
            sys.stderr.write(f"\ninterrupted: the partial output {temp} is kept; rerun with --resume to continue\n")
        raise
    except BaseException:
        writer.close()
        if owned:
            for p in (temp, journal_path, journal_path + ".tmp", sidecar_path(output) + ".tmp"):
                remove_path(p)
        lock.release(remove=not (os.path.lexists(temp) or os.path.lexists(journal_path)))
        raise


def _publish(writer: TableWriter, temp: str, output: str, sidecar: str) -> None:
    """Rename the finished table into place, then its sidecar; an old sidecar goes first so an
    interrupted overwrite can leave a table without a sidecar, never with a wrong one."""
    src = getattr(writer, "merged", temp)
    remove_path(sidecar)
    old = None
    if os.path.isdir(output) and not os.path.islink(output):
        old = output + ".old-bcfast"
        remove_path(old)
        os.replace(output, old)
    os.replace(src, output)
    os.replace(sidecar + ".tmp", sidecar)
    if src != temp:
        remove_path(temp)
    if old is not None:
        remove_path(old)


def _pipeline(op: FusedTransform, reader: TableReader, writer: TableWriter, chunks: list[Chunk],
              start: int, chunk_rows: int, out_dtype: np.dtype, threads: int | None, state: dict,
              journal_path: str, journal_interval: float, progress: bool | None, output: str) -> None:
    """Read chunk i+1, compute chunk i and write chunk i-1 at the same time."""
    todo = chunks[start:]
    if not todo:
        return
    bar = Progress(sum(c.rows for c in todo), f"convert {os.path.basename(output)}"
                   + (f" (resumed at chunk {start})" if start else ""), enabled=progress)
    depth = 2
    buf_rows = max(c.rows for c in todo)
    in_bufs = [np.empty((buf_rows, reader.dim), reader.dtype) for _ in range(depth)]
    out_bufs = [np.empty((buf_rows, op.d_out), out_dtype) for _ in range(depth)]
    last_sync = [time.monotonic()]

    def write(chunk: Chunk, y: np.ndarray, extra: Any) -> None:
        writer.write(chunk, y, extra)
        now = time.monotonic()
        if chunk.index == len(chunks) - 1 or now - last_sync[0] >= journal_interval:
            writer.sync()
            state.update(done_chunks=chunk.index + 1, done_rows=chunk.stop,
                         complete=chunk.index == len(chunks) - 1)
            atomic_write_json(journal_path, state)
            last_sync[0] = now
        bar.update(chunk.rows)

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
        The version registry (``bc_fast.registry.Registry`` or its directory).
    dst : int
        Target version (older than ``src``).
    src : int, optional
        Version of the input table (default: the registry's latest).
    normalize : bool
        L2-normalise the output rows.
    **options
        ``dtype, threads, chunk_rows, resume, verify, verify_tol, seed, column,
        overwrite, progress, journal_interval`` as in :func:`apply_to_table`.

    Returns
    -------
    ConvertResult
        The output's sidecar records ``version=dst``, the registry's checksum and the chain.
    """
    from .fusion import apply_layers_reference, flatten_chain
    from .registry import Registry

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
    if "reference" not in options:
        layers = flatten_chain(steps)

        def reference(x: np.ndarray) -> np.ndarray:
            y = apply_layers_reference(layers, x)
            if normalize:
                y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
            return y

        options["reference"] = reference
    return apply_to_table(op, input, output, provenance=prov, normalize=normalize, **options)
