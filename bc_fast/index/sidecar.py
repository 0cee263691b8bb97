"""The checksummed JSON sidecar of a saved legacy index, and the checks ``LegacyIndex.load`` runs.

On disk an index is two files: the faiss index and a JSON sidecar (``path + '.json'``).
The sidecar carries the sha256 of the index file and a sha256 of its own content
(``sidecar_sha256``, over the canonical JSON of every other field); :meth:`~bc_fast.index.LegacyIndex.load`
checks both before faiss reads a byte, then re-derives metric, dimension and size from
the faiss index and refuses any contradiction with the sidecar.

What lives here: the sidecar's path, format constants and checksum, and the readers and checks
(sidecar fields, the index file's sha256, the faiss index against the sidecar, the registry's chain
against the sidecar); :class:`~bc_fast.index.legacy.LegacyIndex` writes the sidecar and calls these.
It may import :mod:`.faiss_utils`, :mod:`bc_fast.store` and ``bc_fast._util``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .._util.fileio import is_json_int, read_json_object
from .._util.text import short_repr
from ..store.registry import Registry, RegistryError
from .faiss_utils import _METRICS, _faiss, _faiss_msg, _index_metric

_INDEX_FORMAT = "bc_fast.legacy_index"
#: 2: the sidecar carries ``sidecar_sha256``; 1 (no sidecar checksum) is refused unless allowed.
_INDEX_FORMAT_VERSION = 2
_SIDECAR_MAX_BYTES = 1 << 20
_SIDECAR_FIELDS: dict[str, type] = {
    "version": int, "source_version": int, "d": int, "ntotal": int, "metric": str, "factory": str,
    "normalize": bool, "registry_checksum": str, "chain_checksum": str, "index_sha256": str,
}


def _sidecar(p: Path) -> Path:
    return p.with_name(p.name + ".json")


def _sidecar_checksum(side: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of every sidecar field except the checksum itself."""
    body = {k: v for k, v in side.items() if k != "sidecar_sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def _read_sidecar(sp: Path, *, allow_old: bool) -> dict:
    """Parse and verify a sidecar: JSON object, format, checksum, field types and ranges."""
    if not sp.is_file():
        raise ValueError(f"sidecar {sp} not found; a legacy index is saved as two files by LegacyIndex.save "
                         f"(the index and its '.json' sidecar): copy both, or rebuild and save the index")
    if sp.stat().st_size > _SIDECAR_MAX_BYTES:
        raise ValueError(f"{sp} is {sp.stat().st_size} bytes, far larger than a legacy index sidecar "
                         f"(< {_SIDECAR_MAX_BYTES}); it is not one: re-save the index with LegacyIndex.save")
    side = read_json_object(sp, what="bc_fast legacy index sidecar", fix="re-save the index with LegacyIndex.save")
    if side.get("format") != _INDEX_FORMAT:
        raise ValueError(f"{sp}: field 'format' must be {_INDEX_FORMAT!r}, got {short_repr(side.get('format'))}; "
                         f"not a bc_fast legacy index sidecar")
    fv = side.get("format_version")
    if not is_json_int(fv) or fv < 1:
        raise ValueError(f"{sp}: field 'format_version' must be a positive int, got {short_repr(fv)}")
    if fv > _INDEX_FORMAT_VERSION:
        raise ValueError(f"{sp}: format_version {short_repr(fv)} is newer than this bc_fast supports "
                         f"({_INDEX_FORMAT_VERSION}); upgrade bc_fast")
    if fv < 2 and not allow_old:
        raise ValueError(f"{sp}: format_version {fv} sidecars carry no checksum of their own, so edits to "
                         f"'normalize' or 'metric' cannot be detected. Rebuild the index (build_legacy_index"
                         f"(...).save(path)), or, if you trust this sidecar, re-save it once with "
                         f"LegacyIndex.load(path, allow_old_sidecar=True).save(path)")
    if fv >= 2:
        want = side.get("sidecar_sha256")
        try:
            got = _sidecar_checksum(side)
        except (ValueError, TypeError, RecursionError):  # NaN/Infinity values, absurd nesting
            got = None
        if not isinstance(want, str) or want != got:
            raise ValueError(f"{sp}: sidecar checksum mismatch: its fields were edited or the file is corrupt; "
                             f"re-save the index with LegacyIndex.save, or rebuild it")
    _check_sidecar_fields(sp, side)
    return side


def _check_sidecar_fields(sp: Path, side: Mapping[str, Any]) -> None:
    for key, typ in _SIDECAR_FIELDS.items():
        v = side.get(key)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ValueError(f"{sp}: field {key!r} must be {typ.__name__}, got {short_repr(v)}")
    for key in ("version", "source_version", "d", "ntotal"):
        if not -1 < side[key] < 2**63:
            raise ValueError(f"{sp}: field {key!r} must be in [0, 2**63), got {short_repr(side[key])}")
    if side["metric"] not in _METRICS:
        raise ValueError(f"{sp}: field 'metric' must be 'ip' or 'l2', got {short_repr(side['metric'])}")
    if not 0 <= side["version"] <= side["source_version"]:
        raise ValueError(f"{sp}: need 0 <= version <= source_version, got version={side['version']}, "
                         f"source_version={side['source_version']}")
    if side["d"] < 1 or side["ntotal"] < 0:
        raise ValueError(f"{sp}: need d >= 1 and ntotal >= 0, got d={side['d']}, ntotal={side['ntotal']}")


def _read_index(p: Path, sp: Path, side: Mapping[str, Any]) -> Any:
    """Check the index file's sha256 against the sidecar, then let faiss read it."""
    data = p.read_bytes()
    if hashlib.sha256(data).hexdigest() != side["index_sha256"]:
        raise ValueError(f"{p}: checksum mismatch with {sp.name}: the index file is truncated or corrupt, was "
                         f"modified, or a save was interrupted between the two files; rebuild or re-save the index")
    try:
        return _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise ValueError(f"{p}: faiss cannot read this index file ({_faiss_msg(e)}); it may come from another "
                         f"faiss version (sidecar says {short_repr(side.get('faiss_version'))}); rebuild it") from None


def _check_index_matches(p: Path, sp: Path, index: Any, side: Mapping[str, Any]) -> None:
    """Re-derive metric, dimension and size from the faiss index; refuse contradictions with the sidecar."""
    metric = _index_metric(index)
    found = {"d": int(index.d), "ntotal": int(index.ntotal), "metric": metric}
    for key, value in found.items():
        if value != side[key]:
            raise ValueError(f"{sp}: says {key}={side[key]!r} but the faiss index {p.name} has {key}={value!r}; "
                             f"the files do not belong together: rebuild or re-save the index")
    if not index.is_trained:
        raise ValueError(f"{p}: the faiss index is not trained; rebuild it with build_legacy_index")


def _check_registry(sp: Path, reg: Registry, side: Mapping[str, Any]) -> None:
    v, s = side["version"], side["source_version"]
    if v not in reg or s not in reg:
        raise RegistryError(f"{sp}: the index serves version {v} built from version {s}, but registry "
                            f"{reg.path} has versions 0..{len(reg) - 1}; pass the registry the index was built with")
    if reg.dim(v) != side["d"]:
        raise RegistryError(f"{sp}: dimension mismatch: the index holds d={side['d']} vectors but "
                            f"version {v} of {reg.path} has dim {reg.dim(v)}")
    if reg.chain_checksum(s, v) != side["chain_checksum"]:
        raise RegistryError(
            f"{sp}: registry {reg.path} maps version {s} -> {v} with different transforms than the ones "
            f"this index was built with (chain checksum mismatch); rebuild the index from this registry")
