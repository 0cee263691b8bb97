"""A dataset conversion's bookkeeping, which needs no Ray: its inputs, journal, sidecar and publishing.

What lives here: :class:`DatasetResult`; the scan of a dataset's files that refuses mixed versions,
dims and dtypes before any work; the dataset journal ``OUTPUT.partial.journal.json`` (each finished
file's sha256, rows and sidecar, atomic and self-checksummed, written with :mod:`.journal`'s
functions); the one dataset sidecar the files' sidecars are folded into; and the publishing of
``OUTPUT.partial`` as ``OUTPUT`` (with :mod:`.publish`'s renames), also for a run killed while
publishing. It may import :mod:`.job`, :mod:`.journal`, :mod:`.publish`, :mod:`bc_fast.store` and
``bc_fast._util``, never ray; :mod:`.distributed`, the Ray driver and workers, imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterable

from .._util.fileio import atomic_write_json, read_json_object
from .._util.text import short_repr
from ..store.tables import _PARQUET_SUFFIXES, open_table
from .job import SIDECAR_SUFFIX, read_sidecar, sidecar_path
from .journal import _journal_checksum, _write_journal
from .publish import _publish

__all__ = ["DatasetResult"]


_JOURNAL_FORMAT = "bc_fast.distributed.journal/1"
_PARTIAL = ".partial"


@dataclass
class DatasetResult:
    """What :func:`convert_dataset_ray` did.

    ``skipped`` lists files whose verified outputs a previous run had already made, ``resumed`` files
    continued from a partial output; ``rows_per_s`` counts the rows converted in this run over its
    wall time (Ray start excluded). ``peak_rss`` maps each worker (``node:pid``) to its peak RSS in bytes.
    """

    output: str
    sidecar: str
    files: list[str]
    converted: list[str]
    skipped: list[str]
    resumed: list[str]
    rows: int
    rows_converted: int
    seconds: float
    rows_per_s: float
    workers: int
    threads_per_worker: int
    peak_rss: dict[str, int] = field(default_factory=dict)
    already_complete: bool = False

    def summary(self) -> str:
        """A human-readable one-paragraph summary."""
        if self.already_complete:
            return f"{self.output} was already complete ({len(self.files)} files, {self.rows:,} rows)"
        rss = max(self.peak_rss.values(), default=0) / 2**20
        lines = [f"converted {len(self.converted)} of {len(self.files)} files ({self.rows_converted:,} rows) on "
                 f"{self.workers} Ray workers x {self.threads_per_worker} threads in {self.seconds:.2f} s: "
                 f"{self.rows_per_s:,.0f} rows/s; peak RSS per worker {rss:,.0f} MiB"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files already converted and verified by an earlier run")
        if self.resumed:
            lines.append(f"resumed {len(self.resumed)} half-converted files: {', '.join(self.resumed[:5])}")
        lines.append(f"output: {self.output}\nsidecar: {self.sidecar}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- inputs

def _is_data_name(name: str) -> bool:
    """A ``.npy`` shard (selected as the single-process NpyReader selects them: any name ending ``.npy``,
    ``_`` or ``.`` prefixes included) or a Parquet file."""
    return name.endswith(".npy") or name.lower().endswith(_PARQUET_SUFFIXES)


def _holds_data(path: str) -> bool:
    """True when the folder ``path`` holds a ``.npy`` or Parquet file or folder at any depth."""
    return any(any(map(_is_data_name, dirs + files)) for _, dirs, files in os.walk(path))


def _check_no_nested_data(input: str, entries: list[str]) -> None:
    """Refuse subfolders holding data: the engine converts only the directory's own files."""
    nested = [n for n in entries if os.path.isdir(os.path.join(input, n))
              and (_is_data_name(n) or _holds_data(os.path.join(input, n)))]
    if nested:
        more = f" and {len(nested) - 3} more" if len(nested) > 3 else ""
        raise ValueError(f"{input} has subfolders with .npy or Parquet files ({', '.join(nested[:3])}{more}), "
                         "which the Ray engine would not convert (it converts the files directly in the dataset "
                         f"directory, one output file each); move their files up into {input}, or convert each "
                         "subfolder as a dataset of its own")


def _list_inputs(input: str) -> tuple[str, list[str]]:
    """(``"parquet"`` or ``"npy"``, sorted file names) of a dataset directory; refuses subfolders with data."""
    if not os.path.isdir(input):
        raise ValueError(f"the Ray engine converts a dataset directory (Parquet files or .npy shards), but "
                         f"{input} is not a directory; convert a single table with the default engine")
    entries = sorted(os.listdir(input))
    _check_no_nested_data(input, entries)
    names = [n for n in entries if _is_data_name(n) and not os.path.isdir(os.path.join(input, n))]
    pq = [n for n in names if n.lower().endswith(_PARQUET_SUFFIXES)]
    npy = [n for n in names if n.endswith(".npy")]
    if pq and npy:
        raise ValueError(f"{input} holds both Parquet files ({pq[0]}, ...) and .npy shards ({npy[0]}, ...); "
                         "a dataset is one or the other: move one kind to its own directory")
    if not pq and not npy:
        raise ValueError(f"{input} holds no Parquet files (.parquet, .pq, .parq) and no .npy shards; "
                         "nothing to convert")
    return ("parquet" if pq else "npy"), (pq or npy)


def _embedded_version(reader: Any) -> Any:
    """The version a bc_fast-written Parquet file names in its ``bc_fast`` metadata (None if none)."""
    meta = (getattr(reader, "schema", None) and reader.schema.metadata) or {}
    raw = meta.get(b"bc_fast")
    if raw is None:
        return None
    try:
        return json.loads(raw).get("version")
    except (ValueError, AttributeError):
        return None


def _scan_inputs(input: str, names: list[str], column: str | None, src: int, dim: int,
                 dtype: Any) -> tuple[list[dict], int, str]:
    """Open every input file's header: fingerprints, total rows and the common dtype.

    Refuses mixed versions, wrong dims and (without ``dtype``) mixed dtypes, naming the files.
    """
    side = read_sidecar(input)
    if side is not None and side.get("version") is not None and side["version"] != src:
        raise ValueError(f"{input} is a version-{side['version']} dataset (per its sidecar "
                         f"{sidecar_path(input)}), but the conversion starts from version {src}; "
                         f"use --from {side['version']}")
    versions: dict[Any, list[str]] = {}
    dims: dict[int, list[str]] = {}
    dtypes: dict[str, list[str]] = {}
    prints, rows = [], 0
    for name in names:
        path = os.path.join(input, name)
        reader = open_table(path, column)
        try:
            file_side = read_sidecar(path)
            v = file_side.get("version") if file_side else None
            v = _embedded_version(reader) if v is None else v
            versions.setdefault(v, []).append(name)
            dims.setdefault(reader.dim, []).append(name)
            dtypes.setdefault(str(reader.dtype), []).append(name)
            prints.append(reader.fingerprint())
            rows += reader.n_rows
        finally:
            reader.close()

    def shown(groups: dict) -> str:
        return "; ".join(f"{k}: {', '.join(v[:3])}{' and %d more' % (len(v) - 3) if len(v) > 3 else ''}"
                         for k, v in groups.items())

    stamped = {v: f for v, f in versions.items() if v is not None}
    if len(stamped) > 1 or (stamped and src not in stamped):
        raise ValueError(f"mixed-version input: files of {input} are stamped with versions ({shown(stamped)}), "
                         f"but the conversion starts from version {src}; convert each version's files "
                         "separately (with its own --from)")
    if set(dims) != {dim}:
        bad = {d: f for d, f in dims.items() if d != dim}
        raise ValueError(f"files of {input} have {'/'.join(map(str, bad))} features per row ({shown(bad)}), but "
                         f"version {src} has dim {dim}; they are not version-{src} embeddings (mixed versions?): "
                         "check --from, or move those files out")
    if dtype is None and len(dtypes) > 1:
        raise ValueError(f"files of {input} mix dtypes ({shown(dtypes)}); pass dtype= (--dtype) to choose the "
                         "output dtype")
    return prints, rows, next(iter(dtypes))


# --------------------------------------------------------------------------- the journal

def _load_journal(path: str, staging: str, key: str, job: dict) -> dict | None:
    """The journal of an earlier run of this same job (None if there is none)."""
    if not os.path.lexists(path):
        return None
    fix = f"delete {staging} and {path} to start the conversion again"
    j = read_json_object(path, what="distributed conversion journal", fix=fix)
    if j.get("format") != _JOURNAL_FORMAT:
        raise ValueError(f"{path}: not a bc_fast distributed conversion journal (format "
                         f"{short_repr(j.get('format'))}, expected {_JOURNAL_FORMAT!r}); {fix}")
    if j.get("checksum") != _journal_checksum(j) or not isinstance(j.get("files"), dict):
        raise ValueError(f"{path}: the journal was edited or corrupted (its sha256 does not match its content); "
                         f"{fix}")
    if j.get("key") != key:
        old = j.get("job") if isinstance(j.get("job"), dict) else {}
        diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
        raise ValueError(f"cannot resume: {staging} was made by a different conversion (differs in: "
                         f"{', '.join(diff) or 'format'}); rerun with the same inputs and settings, or {fix}")
    return j


def _job_key(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


# the provenance every file of a dataset shares (and ``bc-fast convert`` writes in its sidecar)
_COMMON = ("format", "version", "source_version", "registry", "registry_checksum", "chain_checksum", "chain",
           "provenance", "operator", "bc_fast_version")


def _record(journal: dict, r: dict) -> None:
    """Journal one converted file: its own fields, and the shared provenance once (checked for every file)."""
    side = r["side"] or {}
    common = {k: side.get(k) for k in _COMMON}
    common["table"] = {k: (side.get("table") or {}).get(k) for k in ("dim", "dtype", "chunk_rows")}
    first = journal.setdefault("common", common)
    diff = [k for k in common if common[k] != first[k]]
    if diff:
        r["error"] = {"type": "ValueError", "message": (
            f"its conversion differs from the other files' in {', '.join(diff)}, so the staged files mix "
            "conversions; delete the partial output (OUTPUT.partial and its journal) and start again")}
        return
    journal["files"][r["name"]] = {"rows": r["rows"], "sha256": r["sha256"], "size": r["size"],
                                   "verify_max_error": r["verify_max_error"], "job_key": side.get("job_key"),
                                   "chunk_crc32": side.get("chunk_crc32"), "input": side.get("input")}



# --------------------------------------------------------------------------- publishing

def _dataset_sidecar(journal: dict, names: list[str], kind: str, input: str, rows: int, prov: dict, key: str,
                     engine: dict) -> dict:
    """One sidecar for the dataset: the provenance its files share, then one entry per file (``engine``:
    what converted them)."""
    common = dict(journal["common"])
    table = {"format": f"{kind}_dir", "rows": rows, **common.pop("table"), "files": len(names)}
    return {**common, "table": table, "files": list(names), "job_key": key,
            "input": {"format": f"{kind}_dir", "path": input, "rows": rows, "dim": prov["dims"]["from"],
                      "files": len(names)},
            "parts": {n: journal["files"][n] for n in names},
            "engine": engine,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _finish(output: str, staging: str, journal_path: str, journal: dict, replacing: dict | None,
            side: dict | None = None) -> None:
    """Publish: per-file sidecars folded into the dataset sidecar, then ``OUTPUT.partial`` -> ``OUTPUT``
    (convert's ``_publish``: every step can be redone, so a run killed here is finished by a rerun)."""
    if side is not None:
        atomic_write_json(sidecar_path(output) + ".tmp", side)
        journal.update(publishing=True, replacing=replacing)
        _write_journal(journal_path, journal)
    replacing = journal.get("replacing")
    if os.path.isdir(staging):
        for name in sorted(os.listdir(staging)):
            if name in journal["files"]:
                continue
            if not name.endswith((SIDECAR_SUFFIX, _PARTIAL + ".lock")):
                raise ValueError(f"{staging} holds {name}, which no finished file accounts for; move it out and "
                                 "rerun to publish the dataset")
            os.unlink(os.path.join(staging, name))  # folded into the dataset sidecar / a dead worker's flock
    j = SimpleNamespace(output=output, src=staging, temp=staging, aside=output + _PARTIAL + ".old",
                        journal_path=journal_path, side=side or {})
    _publish(j, replacing)  # type: ignore[arg-type]


def _already_done(output: str, key: str, journal: dict | None, names: list[str]) -> DatasetResult | None:
    """This exact job's dataset already published (and no journal left): nothing to do."""
    if journal is not None or not os.path.isdir(output):
        return None
    try:
        side = read_sidecar(output)
    except ValueError:
        return None
    if not side or side.get("job_key") != key:
        return None
    return _result_from_sidecar(output, names, already=True)


def _result_from_sidecar(output: str, names: Iterable[str], *, already: bool) -> DatasetResult:
    side = read_sidecar(output) or {}
    names = list(names)
    return DatasetResult(output=output, sidecar=sidecar_path(output), files=names, converted=[], skipped=names,
                         resumed=[], rows=int((side.get("table") or {}).get("rows", 0)), rows_converted=0,
                         seconds=0.0, rows_per_s=0.0, workers=0, threads_per_worker=0, already_complete=already)
