"""The conversion job: what is being converted, and how the result is checked.

What lives here: the result and error types (:class:`ConvertResult`, :class:`VerificationError`), the
provenance sidecar a converted table carries (:func:`sidecar_path`, :func:`read_sidecar`; the job
decides its content, :mod:`.publish` puts it in place), the operator's fingerprint, the default
chunking, the verification against the float64 step-by-step chain and its tolerance, the checks of an
input table, the plan of one conversion (``_Job``: every path, chunk and key decided before any output
is touched) and the operator, provenance and reference of a registry conversion (:func:`registry_job`).
The operator is a :class:`~bc_fast.engine.FusedTransform`, or a
:class:`~bc_fast.engine.routed.RoutedTransform` for a chain through a routed (local) step, whose
reference and per-row judgment live in :mod:`.routed_check`. It may import :mod:`.journal` (a resumed
run reuses the chunking its journal records), :mod:`.routed_check`, :mod:`bc_fast.engine`,
:mod:`bc_fast.store` and ``bc_fast._util``; not :mod:`.publish` or :mod:`.pipeline`, which import it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..engine import FusedTransform
from ..engine.routed import RoutedTransform
from .._util.arrays import is_bfloat16
from .._util.fileio import read_json_object
from ..store.tables import Chunk, TableReader, TableWriter, make_writer, table_dtype, writer_class
from .journal import _load_journal
from .routed_check import RoutedChainReference

#: What a conversion runs: a fused layer program, or one routed (local) operator (CPU only).
Operator = FusedTransform | RoutedTransform

__all__ = ["ConvertResult", "VerificationError", "read_sidecar", "sidecar_path", "default_verify_tol",
           "default_reference", "operator_fingerprint", "registry_job", "Operator", "SIDECAR_SUFFIX",
           "DEFAULT_VERIFY_ROWS"]

SIDECAR_SUFFIX = ".bcfast.json"
DEFAULT_VERIFY_ROWS = 256
_PARTIAL = ".partial"
_ASIDE = ".partial.old"  # an overwritten directory table waits here until the new one is in place
_SIDECAR_FORMAT = "bc_fast.table/1"
_CHUNK_BYTES = 16 << 20  # default chunk: ~16 MiB of input or output rows, whichever is larger
# ... and at most this many rows for .npy tables on the CPU. Smaller buffers are fresh memory the VMs we run on
# back slowly (up to 38 ms per 16 MiB), and the pipeline fills and drains faster; per-chunk costs set the
# floor. 500k x 256 on a 2-vCPU Zen 4 VM, median of 5 fresh processes: float16 428 / 409 / 418 ms at
# 32,768 / 16,384 / 8,192 rows a chunk, float32 483 / 505 ms at 16,384 / 8,192. Parquet keeps its row
# groups (the output's layout follows the chunks) and a GPU its larger transfers.
_NPY_CPU_CHUNK_ROWS = 16384


class VerificationError(ValueError):
    """Converted rows disagree with the step-by-step reference chain."""


@dataclass
class ConvertResult:
    """What a conversion did.

    ``rows_per_s`` counts the rows converted in this run (not the resumed ones).
    ``verify_max_error`` is the largest row-relative error ``||y - ref|| / ||ref||``
    over the verified rows (None if ``verify=0``), ``verify_tol`` the bound it was held to (a routed
    chain's rows are allowed ``verify_tol`` plus a per-row allowance for float32 routing scores:
    :mod:`bc_fast.convert.routed_check`).
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
                         f"max relative error {self.verify_max_error:.2e} (tolerance {self.verify_tol:.1e}"
                         + (", plus the routed step's per-row allowance)"
                            if (self.verify_max_error or 0) > (self.verify_tol or 0) else ")"))
        prov = self.provenance
        if "to" in prov:
            lines.append(f"version {prov.get('from')} -> {prov['to']}"
                         + (f" (registry checksum {str(prov['registry_checksum'])[:12]})"
                            if prov.get("registry_checksum") else ""))
        lines.append(f"output: {self.output}\nsidecar: {self.sidecar}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the sidecar

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


# --------------------------------------------------------------------------- the operator and the chunking

def operator_fingerprint(op: Operator) -> str:
    """sha256 of an operator's layer program (weights, biases, activations, normalize); of a routed operator,
    its routing scores, per-cluster maps, m, temperature and normalize."""
    h = hashlib.sha256()
    if isinstance(op, RoutedTransform):
        h.update(f"routed|{op.weight.shape}|m={op.m}|T={op.temperature!r};".encode())
        for arr in (op.score_weight, op.score_bias, op.weight, op.bias):
            h.update(np.ascontiguousarray(arr, np.float32).tobytes())
        h.update(b"normalize" if op.normalize else b"plain")
        return h.hexdigest()
    for l in op.layers:
        h.update(f"{l.weight.shape}|{l.activation}|{l.activation_width}|{l.bias is not None};".encode())
        h.update(np.ascontiguousarray(l.weight, np.float32).tobytes())
        if l.bias is not None:
            h.update(np.ascontiguousarray(l.bias, np.float32).tobytes())
    h.update(b"normalize" if op.normalize else b"plain")
    return h.hexdigest()


def _describe_op(op: Operator) -> dict:
    if isinstance(op, RoutedTransform):
        return {"sha256": operator_fingerprint(op), "d_in": op.d_in, "d_out": op.d_out, "normalize": op.normalize,
                "routed": {"k": op.k, "m": op.m, "temperature": op.temperature}}
    return {"sha256": operator_fingerprint(op), "d_in": op.d_in, "d_out": op.d_out, "normalize": op.normalize,
            "layers": [{"d_in": l.d_in, "d_out": l.d_out, "bias": l.bias is not None, "activation": l.activation,
                        "activation_width": l.activation_width} for l in op.layers]}


def _default_chunk_rows(d_in: int, in_item: int, d_out: int, out_item: int, fmt: str = "npy",
                        device: str = "cpu") -> int:
    """Rows per chunk when the caller gives none: ~16 MiB of the wider side, a multiple of 1024 rows, and at
    most ``_NPY_CPU_CHUNK_ROWS`` for a ``.npy`` table (``fmt`` "npy" or "npy_dir") converted on the CPU."""
    row = max(d_in * in_item, d_out * out_item)
    rows = max(1024, (_CHUNK_BYTES // row) // 1024 * 1024)
    return min(rows, _NPY_CPU_CHUNK_ROWS) if fmt in ("npy", "npy_dir") and device == "cpu" else rows


# --------------------------------------------------------------------------- verify

_U32 = 2.0 ** -24  # unit roundoff of float32: the core computes and accumulates in float32
_U16 = 2.0 ** -11  # unit roundoff of float16
_UBF16 = 2.0 ** -8  # unit roundoff of bfloat16


def default_verify_tol(n_layers: int, max_dim: int, out_dtype: Any) -> float:
    """Largest row-relative error ``||y - ref|| / ||ref||`` a correct conversion shows against the
    float64 step-by-step chain.

    A float32 dot product of length d has relative error about sqrt(d)·u32 (u32 = 2^-24; d·u32
    is the worst case); each of the ``n_layers`` steps adds one such error, and fusing them into
    one operator one more, so we allow 8·(n_layers + 1)·sqrt(max_dim)·u32 (about 2e-5 for two
    256-d steps, 1e-4 for five 1024-d ones). A float16 output is then rounded once, at most
    u16 = 2^-11 per element (row-relative at most u16); we count it twice (about 1e-3); a bfloat16
    output likewise with its 2^-8 (about 8e-3). A float16 or bfloat16 input is exact in both the core
    and the reference, so it adds nothing.
    """
    tol = 8.0 * (max(int(n_layers), 1) + 1) * math.sqrt(max(int(max_dim), 1)) * _U32
    dt = table_dtype(out_dtype)
    if dt == np.float16:
        tol += 2.0 * _U16
    elif is_bfloat16(dt):
        tol += 2.0 * _UBF16
    return float(tol)


def _layers_verify_tol(layers: Sequence[Any], out_dtype: np.dtype) -> float:
    dims = [d for l in layers for d in (l.d_in, l.d_out)] or [1]
    return default_verify_tol(len(layers), max(dims), out_dtype)


def _reference_verify_tol(reference: Any, op: Operator, out_dtype: np.dtype) -> float:
    """The default tolerance: by the step-by-step layers a reference carries, the depth and width a routed
    chain's reference states (:mod:`.routed_check`; a routed step counts as two GEMMs), else the operator's."""
    shape = getattr(reference, "verify_shape", None)
    if shape is not None:
        return default_verify_tol(shape[0], shape[1], out_dtype)
    if isinstance(op, RoutedTransform):
        return default_verify_tol(2, max(op.d_in, op.d_out), out_dtype)
    return _layers_verify_tol(getattr(reference, "layers", None) or op.layers, out_dtype)


def default_reference(op: Operator) -> Callable[[np.ndarray], np.ndarray]:
    """The float64 reference of an operator on its own: its layers (or its routed map) in float64, normalised
    as it is."""
    if isinstance(op, RoutedTransform):
        return RoutedChainReference.from_operator(op)
    from ..engine.fusion import apply_layers_reference

    def reference(x: np.ndarray) -> np.ndarray:
        y = apply_layers_reference(op.layers, x)
        if op.normalize:
            y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y
    return reference


class SampleCheck:
    """The verified sample: ``n`` random rows (by ``seed``) of the output against ``reference``.

    The sampled rows are collected as their chunk is written (:meth:`collect`, in the writer thread: the
    input rows from the chunk in memory, the output rows read back from the file just written, while it
    is in the page cache); :meth:`finish` reads the rows not collected (chunks of an earlier, resumed
    run; a GPU run), runs ``reference`` once on the whole sample (one float64 GEMM: never BLAS threads
    beside the core's) and raises :class:`VerificationError` if any row is off by more than ``tol``.
    A reference with a ``judge(x, y) -> (reference, slack)`` method (a routed chain's,
    :mod:`.routed_check`) judges each row against its own reference (a near-tie in the routing is judged
    against every choice rounding allows) and allows it ``tol + slack`` for the soft routing weights.
    """

    def __init__(self, reader: TableReader, out_dim: int, out_dtype: np.dtype, n: int, seed: int,
                 reference: Callable[[np.ndarray], np.ndarray], tol: float) -> None:
        total = reader.n_rows
        self.rows = (np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
                     if n > 0 and total > 0 else np.zeros(0, np.int64))
        self.x = np.empty((len(self.rows), reader.dim), reader.dtype)
        self.y = np.empty((len(self.rows), out_dim), out_dtype)
        self.collected = np.zeros(len(self.rows), bool)
        self.reference, self.tol = reference, tol

    def rows_in(self, chunk: Chunk) -> np.ndarray:
        """Positions (into :attr:`rows`) of the sampled rows that lie in ``chunk``."""
        lo, hi = np.searchsorted(self.rows, [chunk.start, chunk.stop])
        return np.arange(lo, hi)

    def collect(self, chunk: Chunk, x_rows: np.ndarray, writer: TableWriter) -> None:
        """Keep the sampled rows of a chunk just written: ``x_rows`` their input, the output read back."""
        pos = self.rows_in(chunk)
        if len(pos):
            self.x[pos] = x_rows
            self.y[pos] = writer.read_rows(self.rows[pos])
            self.collected[pos] = True

    def finish(self, reader: TableReader, writer: TableWriter) -> tuple[int, float]:
        """Judge the whole sample: the number of rows checked and the worst row-relative error."""
        if not len(self.rows):
            return 0, 0.0
        pos = np.nonzero(~self.collected)[0]
        if len(pos):
            self.x[pos] = reader.read_rows(self.rows[pos])
            self.y[pos] = writer.read_rows(self.rows[pos])
        rows = self.rows
        y = self.y.astype(np.float64)
        judge = getattr(self.reference, "judge", None)
        ref, slack = judge(self.x, y) if judge is not None else (self.reference(self.x), 0.0)
        ref = np.asarray(ref, dtype=np.float64)
        if ref.shape != y.shape:
            raise VerificationError(f"reference chain returned shape {ref.shape} for {len(rows)} rows, "
                                    f"but the output has shape {y.shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            err = np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
        err = np.where(np.isfinite(err), err, np.inf)
        bound = np.broadcast_to(self.tol + np.asarray(slack, dtype=np.float64), err.shape)
        worst = int(np.argmax(err - bound))
        if not np.all(np.isfinite(y)) or err[worst] > bound[worst]:
            bad = int(np.sum(~(err <= bound)))
            routed = "" if judge is None else " plus the routed step's per-row allowance for float32 routing scores"
            raise VerificationError(
                f"verification failed: {bad} of {len(rows)} random rows differ from the step-by-step chain by "
                f"more than {self.tol:.1e} (relative){routed}; worst row {int(rows[worst])} has error "
                f"{err[worst]:.3e}. The output was not written; check the registry and the --from version "
                "(or, if the chain is ill-conditioned, raise the tolerance with --verify-tol)")
        return len(rows), float(err.max())


# --------------------------------------------------------------------------- the plan

def _check_input(op: Operator, reader: TableReader, input: str, prov: dict) -> None:
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

    op: Operator
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


def _plan(op: Operator, reader: TableReader, input: str, output: str, prov: dict, dtype: Any,
          normalize: bool, chunk_rows: int | None, resume: bool, column: str | None,
          device: str = "cpu") -> tuple[_Job, dict | None]:
    _check_input(op, reader, input, prov)
    out_dtype = reader.dtype if dtype is None else table_dtype(dtype)
    if not writer_class(reader).holds(out_dtype):
        raise TypeError(f"{reader.format} tables hold float32 or float16 only (bfloat16 is for .npy tables), "
                        f"got output dtype {out_dtype}; pass dtype='float16' (--dtype float16)")
    if normalize and not op.normalize and isinstance(op, RoutedTransform):
        op = RoutedTransform(op.score_weight, op.score_bias, op.weight, op.bias, op.m, op.temperature, normalize=True)
    elif normalize and not op.normalize:
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
        chunk_rows = _default_chunk_rows(op.d_in, reader.dtype.itemsize, op.d_out, out_dtype.itemsize, reader.format,
                                         device)
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


# --------------------------------------------------------------------------- registry conversions

def registry_job(registry: Any, src: int | None, dst: int,
                 normalize: bool = False) -> tuple[Operator, dict, Callable[[np.ndarray], np.ndarray]]:
    """The operator, the provenance and the float64 reference of the conversion ``src -> dst``
    (what :func:`convert_table` hands to :func:`apply_to_table`; shared with :mod:`bc_fast.convert.distributed`).

    A chain through a routed (local) step gives a :class:`RoutedTransform` (the registry refuses chains
    that do not fuse into one) and a :class:`.routed_check.RoutedChainReference`: the same chain step by
    step in float64, the routed step by its float64 definition from the stored parameters."""
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
    steps = registry.chain_steps(src, dst)
    step = -1 if dst < src else 1
    chain = [{"from": v, "to": v + step, "sha256": registry.transform_info(v, v + step).sha256}
             for v in range(src, dst, step)]
    prov = {"registry": reg_path, "registry_checksum": registry.checksum,
            "chain_checksum": registry.chain_checksum(src, dst), "from": src, "to": dst,
            "dims": {"from": registry.dim(src), "to": registry.dim(dst)}, "chain": chain,
            "normalize": bool(normalize)}
    if isinstance(op, RoutedTransform):
        return op, prov, RoutedChainReference.from_steps(steps, normalize)
    layers = flatten_chain(steps)

    def reference(x: np.ndarray) -> np.ndarray:
        y = apply_layers_reference(layers, x)
        if normalize:
            y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y

    reference.layers = layers  # type: ignore[attr-defined]  # sets the default verify tolerance's depth
    return op, prov, reference
