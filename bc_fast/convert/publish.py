"""Publishing a converted table: the atomic rename into place, its sidecar, and what may be overwritten.

What lives here: the last stage of a conversion, which puts the finished table (``OUTPUT.partial``, or
its merged Parquet file) and its sidecar in place by renames that can all be redone, so a run killed
while publishing is finished by ``resume=True``; the resume paths that find a table already (or half)
published; and the overwrite rules: ``overwrite=True`` only ever replaces a table bc_fast wrote, one
with a bc_fast sidecar and, for a directory of shards, no file other than the shards its sidecar lists
(anything else, user files, a symlink, a table without a sidecar, is refused). It may import
:mod:`.job` (the plan it publishes, the sidecar), :mod:`.journal` (the checksums a published table is
checked against), :mod:`bc_fast.store` and ``bc_fast._util``; :mod:`.pipeline`, :mod:`.dataset`
and :mod:`.distributed` import it.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Mapping

from .._util.fileio import atomic_write_json, fsync_dir, is_relative_file
from .._util.text import short_repr
from ..store.tables import remove_path
from .job import _SIDECAR_FORMAT, ConvertResult, _Job, read_sidecar, sidecar_path
from .journal import _table_matches

# directory tables bc_fast writes (npy_dir by the pipeline, parquet_dir by bc_fast.convert.distributed): their file suffixes
_DIR_TABLE_SUFFIXES = {"npy_dir": (".npy",), "parquet_dir": (".parquet", ".pq", ".parq")}
# folder tables whose sidecar lists every file bc_fast wrote (a Lance dataset, a Chroma or Milvus Lite store)
_STORE_FORMATS = ("lance", "chroma", "milvus")


# --------------------------------------------------------------------------- what may be overwritten

def _check_output_free(output: str, overwrite: bool) -> dict | None:
    """None if ``output`` does not exist; what overwriting it replaces if it is bc_fast's and allowed."""
    if not os.path.lexists(output):
        return None
    if not overwrite:
        raise FileExistsError(f"output {output} already exists; remove it, choose another path, or pass "
                              "overwrite=True (--overwrite) to replace a table bc_fast wrote")
    return _owned_output(output)


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
    if why is None and os.path.isdir(output) and _table_format(side) in _STORE_FORMATS:
        present, files = _tree_files(output), side.get("files")
        if not isinstance(files, list) or not all(is_relative_file(f) for f in files):
            why = f"it is a {_table_format(side)} table, but its sidecar {side_path} does not list the files bc_fast wrote there"
        elif present is None or [f for f in present if f not in files]:
            extra = [f for f in present or [] if f not in files]
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            why = (f"it holds files bc_fast did not write there ({shown}): it changed since (a LanceDB write "
                   "or index?)" if present is not None else "it holds links or special files")
        else:
            return {"dir": True, "files": present}
    elif why is None and os.path.isdir(output):
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


def _table_format(side: Any) -> Any:
    table = side.get("table") if isinstance(side, dict) and isinstance(side.get("table"), dict) else {}
    return table.get("format")


def _tree_files(root: str) -> list[str] | None:
    """Every file under ``root`` (relative paths, sorted); None if it holds a link or a special file."""
    out = []
    for d, dirs, names in os.walk(root):
        for n in dirs + names:
            p = os.path.join(d, n)
            if os.path.islink(p) or not (os.path.isdir(p) or os.path.isfile(p)):
                return None
        out.extend(os.path.relpath(os.path.join(d, n), root) for n in names)
    return sorted(out)


def _remove_owned(path: str, replacing: Mapping[str, Any]) -> None:
    """Remove an overwritten table moved aside: exactly the files bc_fast wrote, the folders that held
    them (emptied), then the folder."""
    if not os.path.isdir(path) or os.path.islink(path):
        remove_path(path)
        return
    folders = set()
    for name in replacing.get("files") or []:
        p = os.path.join(path, name)
        if os.path.lexists(p) and not os.path.isdir(p):
            os.unlink(p)
        folders.update(os.path.join(path, d) for d in _parents(name))
    for d in sorted(folders, key=len, reverse=True):  # deepest first
        try:
            os.rmdir(d)
        except OSError:
            pass  # not empty: a file that appeared since; the warning below names the folder
    try:
        os.rmdir(path)
    except OSError:
        warnings.warn(f"{path}: the table it replaced was removed, but files that appeared in it since are "
                      "kept there; move them and delete the folder", RuntimeWarning, stacklevel=3)


def _parents(name: str) -> list[str]:
    """The folders between a table folder and the relative file ``name`` (``a/b/c`` -> ``a/b``, ``a``)."""
    out, d = [], os.path.dirname(name)
    while d:
        out.append(d)
        d = os.path.dirname(d)
    return out


# --------------------------------------------------------------------------- putting it in place

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
