"""Table conversion on a Ray cluster (optional extra: ``pip install bc_fast[ray]``).

What lives here: the Ray part of a dataset conversion, the per-worker converter and the driver that
schedules it and collects its results; the dataset's inputs scan, journal, sidecar and publishing
need no Ray and are :mod:`.dataset`'s. It may import every other module of :mod:`bc_fast.convert`,
:mod:`bc_fast.store` and ``bc_fast._util``; ``ray`` only lazily.

:func:`convert_dataset_ray` converts a *dataset* -- a directory of Parquet files (fixed-size-list
embedding column, other columns carried through) or of ``.npy`` shards -- from version ``src`` to
version ``dst``, one output file per input file, with the same bytes as the single-process
converter (:func:`bc_fast.convert.convert_table`) on each file.

How the work is cut. Ray Data schedules one *task per input file*: the dataset handed to
``map_batches`` holds the file names (numpy batch format, ``batch_size=1``), and a callable class
-- one actor per worker, ``concurrency=num_workers``, ``num_cpus=threads_per_worker`` -- loads the
registry and builds the fused operator ONCE in its constructor, then converts each file it is
given with :func:`bc_fast.convert.apply_to_table`: pyarrow reads the file in chunks inside the
actor, each chunk goes zero-copy into the core (threads = the CPUs Ray assigned to the actor),
and the file is written to a temporary path, fsync-ed, verified against the float64 chain and
renamed. The embeddings never travel through Ray's object store (only file names and small JSON
results do), the output is byte-identical to the single-process path (same chunking, same writer),
and a retried file resumes from its chunk journal. Ray Data's own Parquet writer would re-block
rows, name files itself and could publish a file no journal vouches for.

Atomicity and restarts. Files are converted into ``OUTPUT.partial/`` (same names). The driver
records each finished file (its sha256, rows and per-file sidecar) in a journal
``OUTPUT.partial.journal.json`` (atomic, self-checksummed). When every file is in, one dataset
sidecar ``OUTPUT.bcfast.json`` (the same provenance fields as ``bc-fast convert``, plus a ``parts``
entry per file) is written and ``OUTPUT.partial`` is renamed to ``OUTPUT``: a reader never sees
a partial dataset, nor a partial file. A rerun after a crash or a killed worker skips every file
whose staged output still has the sha256 the journal recorded (checked by the workers), resumes a
half-converted file from its chunk journal and converts the rest. Ray itself restarts a dead
actor and retries its file up to ``max_retries`` times within a run.

Mixed-version inputs (a file's sidecar, its Parquet ``bc_fast`` metadata or the dataset's sidecar
naming another version, or rows whose dim is not the source version's) are refused before any
work starts.

``ray`` is imported lazily: ``import bc_fast.convert.distributed`` works without it, and every entry point
says ``pip install bc_fast[ray]`` when it is missing.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._util.fileio import FileLock
from .._util.progress import Progress
from .._util.ray_runtime import RAY_INSTALL_HINT, import_ray, quiet_ray_deprecations, start_ray  # noqa: F401 (old path)
from ..store.tables import remove_path, sha256_file, table_dtype
from .dataset import (_JOURNAL_FORMAT, _PARTIAL, DatasetResult, _already_done, _dataset_sidecar, _finish, _job_key,
                      _list_inputs, _load_journal, _record, _result_from_sidecar, _scan_inputs)
from .job import VerificationError, operator_fingerprint, read_sidecar, registry_job, sidecar_path
from .journal import _write_journal
from .pipeline import apply_to_table
from .publish import _check_output_free

__all__ = ["convert_dataset_ray", "DatasetResult"]


_ERRORS = {c.__name__: c for c in (ValueError, TypeError, OSError, FileNotFoundError, FileExistsError,
                                     RuntimeError, ImportError, VerificationError)}


# --------------------------------------------------------------------------- the worker

def _assigned_cpus() -> int:
    """CPUs Ray assigned to this actor (bc_fast's thread count), at least 1."""
    try:
        import ray
        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # outside Ray (a unit test calling the class directly)
        return 1


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _FileConverter:
    """The per-worker callable class for ``map_batches``: builds the operator once, converts whole files."""

    def __init__(self, registry: str, src: int, dst: int, normalize: bool, options: dict, expect: dict,
                 fault: dict | None = None) -> None:
        self.options, self.fault, self.error = dict(options), fault, None
        self.threads = _assigned_cpus()
        try:
            self.op, self.prov, self.reference = registry_job(registry, src, dst, normalize)
            got = {"registry_checksum": self.prov["registry_checksum"], "operator": operator_fingerprint(self.op)}
            if got != expect:
                raise ValueError(f"the registry {registry} as this worker sees it (checksum "
                                 f"{got['registry_checksum'][:12]}) is not the one the driver planned with "
                                 f"({expect['registry_checksum'][:12]}); every node must see the same registry "
                                 "(a shared filesystem), and it must not change during the run")
        except (ValueError, TypeError, OSError) as e:
            self.error = {"type": type(e).__name__, "message": str(e)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [json.dumps(self._one(str(n), str(p), str(s), str(w)))
               for n, p, s, w in zip(batch["name"], batch["path"], batch["staged"], batch["sha256"])]
        return {"name": batch["name"], "result": np.array(out, dtype=object)}

    def _one(self, name: str, path: str, staged: str, want: str) -> dict:
        if self.error is not None:
            return {"name": name, "error": self.error}
        if want and os.path.isfile(staged):
            if sha256_file(staged) == want:
                return {"name": name, "skipped": True}
            remove_path(staged)  # the journal vouched for other bytes: convert it again
            remove_path(sidecar_path(staged))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                res = self._convert(name, path, staged)
                side = read_sidecar(staged)
            except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
                return {"name": name, "error": {"type": type(e).__name__, "message": str(e)}}
        return {"name": name, "rows": res.rows, "resumed_rows": res.resumed_rows,
                "already_complete": res.already_complete, "seconds": res.seconds,
                "verify_max_error": res.verify_max_error, "sha256": sha256_file(staged),
                "size": os.path.getsize(staged), "side": side, "warnings": [str(w.message) for w in caught],
                "worker": f"{os.uname().nodename}:{os.getpid()}", "peak_rss": _peak_rss()}

    def _convert(self, name: str, path: str, staged: str) -> Any:
        op = self.op
        if self.fault and self.fault.get("file") == name:
            op = _crashing(op, int(self.fault.get("after_chunks", 1)))
        return apply_to_table(op, path, staged, provenance=self.prov, reference=self.reference,
                              threads=self.threads, resume=True, progress=False, **self.options)


def _crashing(op: Any, after: int) -> Any:
    """Fault injection for tests: a copy of ``op`` whose process dies (``os._exit``) on chunk ``after``."""
    import copy

    calls = [0]
    bad = copy.copy(op)
    apply = op.apply

    def crash_apply(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            time.sleep(0.2)  # let the writer thread make the earlier chunks durable: a real partial file
            os._exit(1)
        return apply(*args, **kwargs)

    bad.apply = crash_apply
    return bad


# --------------------------------------------------------------------------- the driver

def _plan_workers(ray: Any, n_todo: int, num_workers: int | None, threads: int | None) -> tuple[int, int]:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    for name, v in (("num_workers", num_workers), ("threads_per_worker", threads)):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if threads is None:
        threads = max(1, cpus // max(1, min(num_workers or n_todo, cpus)))
    if num_workers is None:
        num_workers = max(1, min(n_todo, cpus // threads))
    if num_workers * threads > cpus:
        raise ValueError(f"{num_workers} workers x {threads} threads need {num_workers * threads} CPUs, but the "
                         f"Ray cluster has {cpus}; pass fewer --workers (or threads_per_worker)")
    return int(num_workers), int(threads)


def _raise_worker_error(errors: list[dict]) -> None:
    first = errors[0]
    cls = _ERRORS.get(first["error"]["type"], RuntimeError)
    more = f" (and {len(errors) - 1} more files failed)" if len(errors) > 1 else ""
    raise cls(f"{first['name']}: {first['error']['message']}{more}")


def convert_dataset_ray(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    registry: Any,
    dst: int,
    src: int | None = None,
    dtype: Any = None,
    normalize: bool = False,
    column: str | None = None,
    batch_rows: int | None = None,
    num_workers: int | None = None,
    threads_per_worker: int | None = None,
    address: str | None = None,
    overwrite: bool = False,
    verify: int = 256,
    seed: int = 0,
    max_retries: int = 3,
    progress: bool | None = False,
    _fault: dict | None = None,
) -> DatasetResult:
    """Convert a dataset directory from version ``src`` to ``dst`` on Ray, one task per input file.

    Parameters
    ----------
    input : path
        A directory of Parquet files (fixed-size-list embedding column; other columns are carried
        through) or of ``.npy`` shards, all of version ``src``. Every worker must see it at this path.
        Every file directly in it named ``*.npy`` or ``*.parquet``/``.pq``/``.parq`` is converted
        (``_`` and ``.`` prefixes included, as ``bc-fast convert`` reads shards); subfolders holding
        such files are refused.
    output : path
        The output directory (must not exist unless ``overwrite``): the same file names, each
        byte-identical to ``bc-fast convert`` on that file; its sidecar is ``output + '.bcfast.json'``.
    registry : Registry or path
        The version registry; workers open it by path (shared filesystem on a cluster).
    dst, src, dtype, normalize, column, verify, seed
        As in :func:`bc_fast.convert.convert_table` (``verify`` rows are checked per file).
    batch_rows : int, optional
        Rows per chunk (default: the single-process default, ~16 MiB); a worker holds about four chunks.
    num_workers : int, optional
        Ray actors (default: as many as fit, at most one per file).
    threads_per_worker : int, optional
        CPUs per actor, which become the core's threads (default: the cluster's CPUs / workers).
    address : str, optional
        An existing Ray cluster (``ray://...`` or ``host:port``); default: a local Ray started and
        stopped by this call. A Ray already initialised in this process is used as it is.
    overwrite : bool
        Replace an existing output, but only a dataset bc_fast wrote (its sidecar lists its files).
    max_retries : int
        Times Ray restarts a dead worker and retries its file within this run (resuming it).
    progress : bool, optional
        A progress bar of rows converted, file by file (None: on a terminal).

    Returns
    -------
    DatasetResult

    Raises
    ------
    ImportError
        ray is not installed (the message says ``pip install bc_fast[ray]``).
    ValueError, TypeError, FileNotFoundError, FileExistsError, OSError, VerificationError
        Bad arguments, mixed-version inputs, a failed file (named); finished files are kept for a rerun.
    RuntimeError
        A worker died more than ``max_retries`` times; rerun the same call to resume.
    """
    ray = import_ray(local=not address)
    input, output = os.path.abspath(os.fspath(input)), os.path.abspath(os.fspath(output))
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
    if batch_rows is not None and (not isinstance(batch_rows, (int, np.integer)) or isinstance(batch_rows, bool)
                                   or batch_rows < 1):
        raise ValueError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    if not os.path.exists(input):
        raise FileNotFoundError(f"input dataset {input} does not exist")
    if os.path.realpath(input) == os.path.realpath(output) or output.startswith(os.path.realpath(input) + os.sep):
        raise ValueError(f"output {output} is (or is inside) the input {input}; write to a new path")
    if not os.path.isdir(os.path.dirname(output)):
        raise FileNotFoundError(f"output directory {os.path.dirname(output)} does not exist; create it first")
    kind, names = _list_inputs(input)
    op, prov, _ = registry_job(registry, src, dst, normalize)
    src = prov["from"]
    prints, rows, in_dtype = _scan_inputs(input, names, column, src, prov["dims"]["from"], dtype)
    out_dtype = str(table_dtype(dtype)) if dtype is not None else in_dtype
    options = {"dtype": dtype, "normalize": normalize, "chunk_rows": batch_rows, "verify": int(verify),
               "seed": seed, "column": column}
    job = {"inputs": prints, "operator": operator_fingerprint(op), "provenance": prov, "dtype": out_dtype,
           "options": {k: v for k, v in options.items() if k != "dtype"}, "format": kind}
    key = _job_key(job)
    staging, journal_path = output + _PARTIAL, output + _PARTIAL + ".journal.json"
    lock = FileLock(output + _PARTIAL + ".lock", blocking=False, busy_message=(
        f"another conversion is writing {output} (lock {{path}} is held); wait for it or choose another OUTPUT"))
    started = False
    try:
        journal = _load_journal(journal_path, staging, key, job)
        done = _already_done(output, key, journal, names)
        if done is not None:
            return done
        if journal is not None and journal.get("publishing"):
            _finish(output, staging, journal_path, journal, None)
            return _result_from_sidecar(output, names, already=True)
        replacing = _check_output_free(output, overwrite)
        if journal is None and os.path.lexists(staging):
            raise FileExistsError(f"{staging} exists but its journal {journal_path} does not; it is not this "
                                  f"run's partial output: delete it (or move it) and start again")
        started = start_ray(ray, address)
        workers, threads = _plan_workers(ray, len(names), num_workers, threads_per_worker)
        if journal is None:  # only now, so a run that cannot start leaves nothing behind
            journal = {"format": _JOURNAL_FORMAT, "key": key, "job": job, "files": {}, "publishing": False}
            os.mkdir(staging)
            _write_journal(journal_path, journal)
        worker_kwargs = {"registry": prov["registry"], "src": src, "dst": dst, "normalize": normalize,
                         "options": options, "fault": _fault,
                         "expect": {"registry_checksum": prov["registry_checksum"], "operator": job["operator"]}}
        plan = _Plan(input, staging, names, journal, journal_path, rows, workers, threads, max_retries, progress)
        result = _run_ray(ray, plan, worker_kwargs)
        engine = {"name": "ray", "ray_version": _ray_version(), "workers": result.workers,
                  "threads_per_worker": result.threads_per_worker}
        side = _dataset_sidecar(journal, names, kind, input, rows, prov, key, engine)
        _finish(output, staging, journal_path, journal, replacing, side)
        result.output, result.sidecar = output, sidecar_path(output)
        return result
    finally:
        if started:
            ray.shutdown()
        lock.release(remove=True)


@dataclass
class _Plan:
    """One run's files, journal and Ray shape."""

    input: str
    staging: str
    names: list[str]
    journal: dict
    journal_path: str
    rows: int
    workers: int
    threads: int
    max_retries: int
    progress: bool | None


def _run_ray(ray: Any, plan: _Plan, worker_kwargs: dict) -> DatasetResult:
    """Schedule one Ray Data task per file, record each finished file in the journal as it comes back."""
    files = plan.journal["files"]
    items = [{"name": n, "path": os.path.join(plan.input, n), "staged": os.path.join(plan.staging, n),
              "sha256": (files.get(n) or {}).get("sha256", "")} for n in plan.names]
    with quiet_ray_deprecations():
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts rows; Ray Data's count blocks (= files)
        ctx.print_on_execution_start = False
        # Ray Data documents max_restarts/max_task_retries as map_batches keywords (its default is to
        # retry forever, which would hang on a file that always kills its worker), but 2.60 flags every
        # extra keyword as deprecated
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _FileConverter, fn_constructor_kwargs=worker_kwargs, batch_size=1, batch_format="numpy",
            num_cpus=plan.threads,
            compute=ray.data.ActorPoolStrategy(size=plan.workers, max_tasks_in_flight_per_actor=1),
            max_restarts=plan.max_retries, max_task_retries=plan.max_retries)
        t0 = time.perf_counter()
        bar = Progress(plan.rows, f"convert {os.path.basename(plan.input)} on Ray", enabled=plan.progress)
        results, errors = _collect(ray, ds, plan, bar)
        seconds = time.perf_counter() - t0
    if errors:
        _raise_worker_error(errors)
    missing = [n for n in plan.names if n not in files]
    if missing:
        raise RuntimeError(f"Ray returned no result for {len(missing)} files ({', '.join(missing[:3])}); rerun "
                           "the same command to convert them")
    done = [r for r in results if not r.get("skipped") and not r.get("already_complete")]
    n_conv = sum(r["rows"] - r["resumed_rows"] for r in done)
    rss: dict[str, int] = {}
    for r in results:
        if "worker" in r:
            rss[r["worker"]] = max(rss.get(r["worker"], 0), r["peak_rss"])
    return DatasetResult(
        output="", sidecar="", files=list(plan.names), converted=sorted(r["name"] for r in done),
        skipped=sorted(r["name"] for r in results if r.get("skipped") or r.get("already_complete")),
        resumed=sorted(r["name"] for r in done if r["resumed_rows"]), rows=sum(f["rows"] for f in files.values()),
        rows_converted=n_conv, seconds=seconds, rows_per_s=n_conv / max(seconds, 1e-9), workers=plan.workers,
        threads_per_worker=plan.threads, peak_rss=rss)


def _collect(ray: Any, ds: Any, plan: _Plan, bar: Any) -> tuple[list[dict], list[dict]]:
    """Stream the per-file results into the journal (made durable at most once a second and at the end: a
    file finished but not yet journaled is found complete by its own sidecar on a rerun)."""
    journal, journal_path = plan.journal, plan.journal_path
    results: list[dict] = []
    errors: list[dict] = []
    last = time.monotonic()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for raw in batch["result"]:
                r = json.loads(raw)
                for msg in r.get("warnings", []):
                    warnings.warn(f"{r['name']}: {msg}", RuntimeWarning, stacklevel=4)
                if "error" not in r and not r.get("skipped"):
                    _record(journal, r)
                (errors if "error" in r else results).append(r)
                bar.update(r.get("rows", journal["files"].get(r["name"], {}).get("rows", 0)))
                if time.monotonic() - last >= 1.0:
                    _write_journal(journal_path, journal)
                    last = time.monotonic()
    except ray.exceptions.RayError as e:
        raise _worker_died(e, plan, errors) from None
    finally:
        _write_journal(journal_path, journal)
        bar.close()
    return results, errors


def _worker_died(e: Exception, plan: _Plan, errors: list[dict]) -> RuntimeError:
    """The error of a run that Ray ended: the files kept for a rerun, and those not finished.

    A file is kept when the journal records it or its staged output is in place under its final name
    (a worker finished it, but Ray never delivered the result: a rerun finds it complete by its sidecar).
    """
    failed = {r["name"] for r in errors}
    kept = [n for n in plan.names if n not in failed and (n in plan.journal["files"]
                                                          or os.path.lexists(os.path.join(plan.staging, n)))]
    todo = [f"{n} (half-converted)" if os.path.lexists(os.path.join(plan.staging, n + _PARTIAL)) else n
            for n in plan.names if n not in kept and n not in failed]
    first = (str(e).splitlines() or [""])[0][:300]
    msg = (f"a Ray worker died or failed ({type(e).__name__}: {first}); {len(kept)} of {len(plan.names)} files "
           f"are converted and kept{f' ({_listed(kept)})' if kept else ''}; not finished (in flight or not "
           f"started): {_listed(todo)}")
    if errors:
        more = f" (and {len(errors) - 1} more files failed)" if len(errors) > 1 else ""
        msg += f"; failed before that: {errors[0]['name']}: {errors[0]['error']['message'][:300]}{more}"
    return RuntimeError(msg + "; rerun the same command to resume (finished files are skipped, a half-converted "
                        "one continues from its journal)")


def _listed(names: list[str]) -> str:
    """At most five names for a message: ``a, b, c, d, e and 3 more`` (``none`` for none)."""
    if not names:
        return "none"
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _ray_version() -> str:
    import ray
    return str(ray.__version__)

