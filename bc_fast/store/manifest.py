"""The on-disk format of a bc_fast registry: manifest schema, canonical checksum, transform files.

Everything here is pure (bytes in, records out, or records in, bytes out); opening files,
locking, symlink checks and crash recovery live in :mod:`bc_fast.store.registry`.

Manifest (``manifest.json``, UTF-8 JSON object)::

    format          "bc_fast.registry"
    format_version  1
    checksum        sha256 of the canonical JSON of every other field
    name, created   str
    metadata        object
    versions        [{version: i, dim, metadata, created}, ...]   numbered 0, 1, 2, ...
    transforms      [{from_version, to_version, direction, kind, file, sha256, layers: [spec], fit_metrics,
                      created}, ...]

A transform file (``transforms/<direction>_<a>_to_<b>_<sha12>.safetensors``) holds
``layers.<j>.weight`` (d_out, d_in) and ``layers.<j>.bias`` (d_out,) and string metadata
(format, from/to version, direction, kind, layer specs). Files are safetensors only:
bc_fast never unpickles.

A routed (local, per-cluster) transform, kind ``"routed"``, is recorded with ``routed: {d_in, d_out, k, m,
temperature}`` instead of ``layers``; its file holds ``routed.centroids`` (k, d_in), ``routed.weights``
(k, d_out, d_in) and ``routed.bias`` (k, d_out) and records the same spec in its metadata (see
:mod:`bc_fast.store.routed_format`). A manifest with a routed transform has ``format_version`` 2
(:data:`ROUTED_FORMAT_VERSION`), so that a bc_fast without routed transforms refuses it ("upgrade
bc_fast") instead of misreading it; registries without one stay at version 1, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .._util.text import short_repr
from ..engine import ACTIVATIONS, Layer, validate_layer

FORMAT = "bc_fast.registry"
FORMAT_VERSION = 1
#: The format_version of a manifest holding a routed transform (the newest this bc_fast reads).
ROUTED_FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TRANSFORM_DIR = "transforms"
LOCK = ".lock"
#: Transform kinds (descriptive; bc_fast.train's names). All but "mlp" and "routed" must be affine layer
#: programs; "routed" is the one kind that is no layer program (see :mod:`bc_fast.store.routed_format`).
KINDS = ("linear", "affine", "lowrank", "orthogonal", "truncate", "identity", "mlp", "routed")
ROUTED_KIND = "routed"
#: The fields of a routed transform's spec, in the manifest and in its file's metadata.
ROUTED_FIELDS = ("d_in", "d_out", "k", "m", "temperature")
DIRECTIONS = ("backward", "forward")
FILE_FORMAT = "bc_fast.transform"
#: Largest embedding / layer dimension a manifest may declare (a 2**20 x 2**20 float32 matrix is 4 TiB).
MAX_DIM = 1 << 20
#: Deepest JSON nesting accepted in a manifest (bc_fast itself writes depth <= 4 plus user metadata).
MAX_DEPTH = 64
#: Largest manifest file read (a real one is kilobytes).
MAX_MANIFEST_BYTES = 64 << 20
#: safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000

#: Names bc_fast writes and may therefore clean up: weight files and atomic-write temporaries.
WEIGHT_NAME = re.compile(r"^(backward|forward)_\d+_to_\d+_[0-9a-f]{12}\.safetensors$")
TEMP_NAME = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")
MANIFEST_TEMP_NAME = re.compile(r"^\.manifest\.json\.tmp-\d+-[0-9a-f]{8}$")


class RegistryError(ValueError):
    """A registry is missing, malformed, inconsistent, or used the wrong way."""


@dataclass(frozen=True)
class VersionInfo:
    """One embedding version: its number, dimension and free-form metadata."""

    version: int
    dim: int
    metadata: dict = field(default_factory=dict)
    created: str = ""


@dataclass(frozen=True)
class TransformInfo:
    """One transform as recorded in the manifest (weights are loaded on demand)."""

    from_version: int
    to_version: int
    direction: str
    kind: str
    file: str
    sha256: str
    layers: tuple[dict, ...]
    fit_metrics: dict = field(default_factory=dict)
    created: str = ""
    #: the spec of a routed transform ({d_in, d_out, k, m, temperature}); None for a layer program
    routed: dict | None = None

    @property
    def is_routed(self) -> bool:
        """True for a routed (local, per-cluster) transform, which has no layers."""
        return self.routed is not None

    @property
    def d_in(self) -> int:
        """Input dimension (of version ``from_version``)."""
        return int(self.routed["d_in"] if self.routed is not None else self.layers[0]["d_in"])

    @property
    def d_out(self) -> int:
        """Output dimension (of version ``to_version``)."""
        return int(self.routed["d_out"] if self.routed is not None else self.layers[-1]["d_out"])


# ----------------------------------------------------------------------------- JSON


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes the checksums are computed over (sorted keys, no spaces, ASCII)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def content_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical content, excluding its ``checksum`` field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(canonical(body)).hexdigest()


def pretty(manifest: Mapping[str, Any]) -> bytes:
    """The manifest as written to disk: indented, sorted, ASCII JSON with a final newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def json_depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (scalars 0), computed without recursion."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d + 1)
            stack.extend((x, d + 1) for x in v)
    return deepest


def json_clean(value: Any, where: str, depth: int = 0) -> Any:
    """Check that ``value`` is JSON (finite numbers, str keys); numpy scalars become Python."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where} is nested more than {MAX_DEPTH} levels deep; flatten it")
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}; JSON has no NaN/Inf, store None or a string instead")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings, got {k!r}")
            out[k] = json_clean(v, f"{where}[{k!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [json_clean(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise TypeError(f"{where} must be JSON-serialisable (dict/list/str/number/bool/None), got {type(value).__name__}")


def _strict_json(raw: bytes, subject: str, fix: str) -> Any:
    """Parse UTF-8 JSON, refusing NaN/Infinity, duplicate keys and nesting deeper than MAX_DEPTH.

    ``subject`` starts every error message (the file, and which part of it).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RegistryError(f"{subject} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                            f"{fix}") from e

    def no_constant(name: str) -> Any:
        raise RegistryError(f"{subject} holds {name}, which is not JSON; {fix}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            keys = [k for k, _ in pairs]
            dup = next(k for i, k in enumerate(keys) if k in keys[:i])
            raise RegistryError(f"{subject} has the key {dup!r} twice in one object; {fix}")
        return out

    try:
        obj = json.loads(text, parse_constant=no_constant, object_pairs_hook=no_duplicates)
    except RecursionError as e:
        raise RegistryError(f"{subject} is nested too deeply to parse (more than {MAX_DEPTH} levels are never "
                            f"valid); {fix}") from e
    except RegistryError:
        raise
    except ValueError as e:
        raise RegistryError(f"{subject} is not valid JSON (truncated or hand-edited?): {e}; {fix}") from e
    if json_depth(obj) > MAX_DEPTH:
        raise RegistryError(f"{subject} is nested more than {MAX_DEPTH} levels deep; {fix}")
    return obj


# ----------------------------------------------------------------------------- manifest


_RESTORE = "restore manifest.json from a backup"


def parse_manifest(raw: bytes, where: str, *, allow_edited: bool) -> dict:
    """Parse manifest bytes and check their content checksum (see :meth:`Registry.open`).

    With ``allow_edited`` a mismatching checksum is accepted: the content is re-stamped and
    the checksum found on disk is kept under ``"_disk_checksum"``.
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise RegistryError(f"{where} is {len(raw)} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES}); "
                            f"it is not a bc_fast manifest or is corrupted; {_RESTORE}")
    if not raw.strip():
        raise RegistryError(f"{where} is empty (truncated write?); {_RESTORE}")
    m = _strict_json(raw, where, _RESTORE)
    if not isinstance(m, dict):
        raise RegistryError(f"{where}: the manifest must be a JSON object, got {type(m).__name__}")
    stored = m.get("checksum")
    if not allow_edited and isinstance(stored, str):
        actual = content_checksum(m)
        if actual != stored:
            raise RegistryError(
                f"{where}: content checksum mismatch (field 'checksum' is {stored[:16]}..., content hashes to "
                f"{actual[:16]}...): the manifest was edited by hand or corrupted. Edit registries through the "
                f"Python API; to accept a deliberate edit, open with Registry.open(path, allow_edited=True)")
    elif allow_edited:
        m["checksum"] = content_checksum(m)
        m["_disk_checksum"] = stored
    return m


def _err(where: str, msg: str) -> RegistryError:
    return RegistryError(f"{where}: {msg}")


def _req(d: Mapping, key: str, types: type | tuple, where: str) -> Any:
    if key not in d:
        raise _err(where, f"missing field {key!r}")
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _err(where, f"field {key!r} must be {getattr(types, '__name__', types)}, got bool")
    if not isinstance(v, types):
        tname = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise _err(where, f"field {key!r} must be {tname}, got {type(v).__name__} {short_repr(v)}")
    return v


def _dim(d: Mapping, key: str, where: str) -> int:
    v = _req(d, key, int, where)
    if not 1 <= v <= MAX_DIM:
        raise RegistryError(f"{where}.{key} must be an integer in [1, {MAX_DIM}], got {short_repr(v)}; "
                            f"the manifest is corrupted or hand-edited, {_RESTORE}")
    return v


def _version_num(d: Mapping, key: str, where: str) -> int:
    v = _req(d, key, int, where)
    if abs(v) > 1 << 31:
        raise RegistryError(f"{where}.{key}={short_repr(v)} is not a plausible version number")
    return v


def validate_manifest(m: Any, src: str) -> tuple[list[VersionInfo], list[TransformInfo]]:
    """Check a parsed manifest against the schema; return its versions and transforms."""
    if not isinstance(m, dict):
        raise _err(src, f"the manifest must be a JSON object, got {type(m).__name__}")
    fmt = _req(m, "format", str, src)
    if fmt != FORMAT:
        raise _err(src, f"field 'format' is {short_repr(fmt)}, expected {FORMAT!r}; this is not a bc_fast registry")
    fv = _req(m, "format_version", int, src)
    if fv > ROUTED_FORMAT_VERSION:
        raise _err(src, f"format_version {short_repr(fv)} is newer than this bc_fast supports "
                        f"({ROUTED_FORMAT_VERSION}); upgrade bc_fast")
    if fv < 1:
        raise _err(src, f"field 'format_version' must be >= 1, got {fv}")
    _req(m, "checksum", str, src)
    _req(m, "metadata", dict, src)
    versions = [_validate_version(v, i, src) for i, v in enumerate(_req(m, "versions", list, src))]
    transforms: list[TransformInfo] = []
    seen: set[tuple[int, int]] = set()
    for i, t in enumerate(_req(m, "transforms", list, src)):
        info = _validate_transform(t, f"{src}: transforms[{i}]", versions, fv)
        key = (info.from_version, info.to_version)
        if key in seen:
            raise RegistryError(f"{src}: transforms[{i}]: a second transform {key[0]} -> {key[1]}; each pair may "
                                f"have one (duplicate entry)")
        seen.add(key)
        transforms.append(info)
    return versions, transforms


def _validate_version(v: Any, i: int, src: str) -> VersionInfo:
    w = f"{src}: versions[{i}]"
    if not isinstance(v, dict):
        raise RegistryError(f"{w} must be an object, got {type(v).__name__}")
    num = _version_num(v, "version", w)
    if num != i:
        dup = " (a duplicate version)" if num < i else ""
        raise RegistryError(f"{w}.version is {num}, expected {i}{dup}: versions must be numbered 0, 1, 2, ... in order")
    dim = _dim(v, "dim", w)
    return VersionInfo(num, dim, dict(_req(v, "metadata", dict, w)), str(v.get("created", "")))


def _validate_transform(t: Any, w: str, versions: list[VersionInfo], format_version: int = FORMAT_VERSION) -> TransformInfo:
    if not isinstance(t, dict):
        raise RegistryError(f"{w} must be an object, got {type(t).__name__}")
    a = _version_num(t, "from_version", w)
    b = _version_num(t, "to_version", w)
    direction = _req(t, "direction", str, w)
    if direction not in DIRECTIONS:
        raise RegistryError(f"{w}.direction must be one of {DIRECTIONS}, got {short_repr(direction)}")
    for key, num in (("from_version", a), ("to_version", b)):
        if not 0 <= num < len(versions):
            raise RegistryError(f"{w}.{key}={num} names an unknown version (the registry has 0..{len(versions) - 1})")
    want_to = a - 1 if direction == "backward" else a + 1
    if b != want_to:
        raise RegistryError(
            f"{w} is recorded as {direction} from version {a} to version {b}, which is the other direction "
            f"or skips a version: a {direction} transform maps {a} -> {want_to}")
    kind = _req(t, "kind", str, w)
    if kind not in KINDS:
        raise RegistryError(f"{w}.kind must be one of {KINDS}, got {short_repr(kind)}")
    fname = _req(t, "file", str, w)
    if (os.path.isabs(fname) or ".." in Path(fname).parts or not fname.endswith(".safetensors")
            or "\x00" in fname or "\\" in fname):
        raise RegistryError(f"{w}.file must be a relative .safetensors path inside the registry, got {short_repr(fname)}")
    sha = _req(t, "sha256", str, w)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise RegistryError(f"{w}.sha256 must be 64 lowercase hex digits, got {short_repr(sha)}")
    if kind == ROUTED_KIND:
        if format_version < ROUTED_FORMAT_VERSION:
            raise RegistryError(f"{w} is a routed transform, which needs format_version {ROUTED_FORMAT_VERSION}, but the "
                                f"manifest says {format_version}; it was edited by hand or corrupted, {_RESTORE}")
        spec = validate_routed_spec(_req(t, "routed", dict, w), f"{w}.routed")
        if spec["d_in"] != versions[a].dim or spec["d_out"] != versions[b].dim:
            raise RegistryError(
                f"{w} is a routed transform mapping {spec['d_in']} -> {spec['d_out']} features but version {a} has "
                f"dim {versions[a].dim} and version {b} has dim {versions[b].dim} (dimension mismatch)")
        return TransformInfo(a, b, direction, kind, fname, sha, (), dict(_req(t, "fit_metrics", dict, w)),
                             str(t.get("created", "")), spec)
    raw_specs = _req(t, "layers", list, w)
    if not raw_specs:
        raise RegistryError(f"{w}.layers is empty")
    specs: list[dict] = []
    for j, s in enumerate(raw_specs):
        specs.append(_validate_layer_spec(s, f"{w}.layers[{j}]", specs[-1]["d_out"] if specs else None))
    if specs[0]["d_in"] != versions[a].dim or specs[-1]["d_out"] != versions[b].dim:
        raise RegistryError(
            f"{w} maps {specs[0]['d_in']} -> {specs[-1]['d_out']} features but version {a} has dim "
            f"{versions[a].dim} and version {b} has dim {versions[b].dim} (dimension mismatch)")
    return TransformInfo(a, b, direction, kind, fname, sha, tuple(specs), dict(_req(t, "fit_metrics", dict, w)),
                         str(t.get("created", "")))


def validate_routed_spec(s: Any, ws: str) -> dict:
    """Check a routed transform's spec; return it normalised (exactly :data:`ROUTED_FIELDS`, temperature float)."""
    if not isinstance(s, dict):
        raise RegistryError(f"{ws} must be an object with fields {ROUTED_FIELDS}, got {type(s).__name__}")
    extra = sorted(set(s) - set(ROUTED_FIELDS))
    if extra:
        raise RegistryError(f"{ws} has unknown field(s) {extra}; a routed spec has exactly {ROUTED_FIELDS}")
    d_in, d_out, k = _dim(s, "d_in", ws), _dim(s, "d_out", ws), _dim(s, "k", ws)
    m = _req(s, "m", int, ws)
    if not 1 <= m <= k:
        raise RegistryError(f"{ws}.m={short_repr(m)} must be in [1, k] = [1, {k}] (clusters blended per row)")
    temp = _req(s, "temperature", (int, float), ws)
    if not (math.isfinite(temp) and temp > 0):
        raise RegistryError(f"{ws}.temperature must be a finite number > 0, got {short_repr(temp)}")
    return {"d_in": d_in, "d_out": d_out, "k": k, "m": m, "temperature": float(temp)}


def _validate_layer_spec(s: Any, ws: str, d_prev: int | None) -> dict:
    """Check one layer spec; return it normalised (exactly the five fields, width None when absent)."""
    if not isinstance(s, dict):
        raise RegistryError(f"{ws} must be an object")
    d_in = _dim(s, "d_in", ws)
    d_out = _dim(s, "d_out", ws)
    act = _req(s, "activation", str, ws)
    if act not in ACTIVATIONS:
        raise RegistryError(f"{ws}.activation must be one of {ACTIVATIONS}, got {short_repr(act)}")
    width = s.get("activation_width")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or not 0 <= width <= d_out):
        raise RegistryError(f"{ws}.activation_width must be null or an integer in [0, {d_out}], got {short_repr(width)}")
    bias = _req(s, "bias", bool, ws)
    if d_prev is not None and d_in != d_prev:
        raise RegistryError(f"{ws}.d_in={d_in} but the previous layer outputs {d_prev}")
    return {"d_in": d_in, "d_out": d_out, "activation": act, "activation_width": width, "bias": bias}


# ----------------------------------------------------------------------------- transform files


def layer_specs(layers: Sequence[Layer]) -> list[dict]:
    """The manifest's description of a layer program (dims, activation, bias presence)."""
    return [{"d_in": l.d_in, "d_out": l.d_out, "activation": l.activation,
             "activation_width": l.activation_width, "bias": l.bias is not None} for l in layers]


def weight_file(direction: str, a: int, b: int, sha: str) -> str:
    """The registry-relative path of a transform file: content-addressed by its sha256."""
    return f"{TRANSFORM_DIR}/{direction}_{a}_to_{b}_{sha[:12]}.safetensors"


_ST_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def encode_transform(layers: Sequence[Layer], a: int, b: int, direction: str, kind: str) -> bytes:
    """Serialise a layer program as a bc_fast transform file (safetensors bytes).

    The bytes are deterministic (sorted metadata, fixed tensor order), so the same
    transform always gets the same sha256 and the same content-addressed file name;
    ``safetensors.numpy.save`` orders metadata differently from run to run.
    """
    tensors: dict[str, np.ndarray] = {}
    for j, l in enumerate(layers):
        tensors[f"layers.{j}.weight"] = l.weight
        if l.bias is not None:
            tensors[f"layers.{j}.bias"] = l.bias
    meta = {"format": FILE_FORMAT, "from_version": str(a), "to_version": str(b), "direction": direction,
            "kind": kind, "layers": json.dumps(layer_specs(layers), sort_keys=True)}
    return encode_safetensors(tensors, meta)


def encode_safetensors(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> bytes:
    """Deterministic safetensors bytes: metadata sorted, tensors widest first then by name (aligned)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k)):  # widest first: aligned
        arr = tensors[name]
        raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


_REFIX = ("re-add the transform with Registry.add_transform(from_version, to_version, layers, replace=True) "
          "or restore the file from a backup")


def _safetensors_prefix(data: bytes) -> bool:
    """True when the bytes start as safetensors do: an 8-byte header length that fits, then ``{``."""
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def foreign_format(data: bytes) -> str | None:
    """Name the format of a file that is clearly not safetensors (pickle, zip, .npy), else None.

    A safetensors header length can itself begin with a pickle's magic bytes (640 = 0x0280 is
    ``80 02``), so bytes that start as safetensors are never called foreign.
    """
    if _safetensors_prefix(data):
        return None
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return f"a Python pickle (protocol {data[1]})"
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save writes these; they contain pickles)"
    if data[:6] == b"\x93NUMPY":
        return "a numpy .npy file"
    return None


def read_header(data: bytes, where: str) -> dict:
    """The JSON header of safetensors bytes, checked: an object whose ``__metadata__`` maps str to str."""
    foreign = foreign_format(data)
    if foreign is not None:
        raise RegistryError(f"{where} is {foreign}, not safetensors; bc_fast never unpickles files. Export the "
                            f"weights as safetensors in a trusted environment and {_REFIX}")
    if len(data) < 8:
        raise RegistryError(f"{where}: file is truncated ({len(data)} bytes); {_REFIX}")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise RegistryError(f"{where}: safetensors header length {n} is beyond the format's {MAX_HEADER_BYTES} byte "
                            f"limit: the file is corrupted or not safetensors; {_REFIX}")
    if n > len(data) - 8:
        raise RegistryError(f"{where}: header length {n} exceeds the file size; the file is truncated; {_REFIX}")
    header = _strict_json(data[8:8 + n], f"{where}: the safetensors header", _REFIX)
    if not isinstance(header, dict):
        raise RegistryError(f"{where}: the safetensors header must be a JSON object, got {type(header).__name__}; "
                            f"{_REFIX}")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        found = type(meta).__name__ if not isinstance(meta, dict) else "an object with non-string values"
        raise RegistryError(f"{where}: safetensors '__metadata__' must be an object of strings, got {found}; "
                            f"{_REFIX}")
    return header


def decode_transform(data: bytes, t: TransformInfo, where: str) -> list[Layer]:
    """Check transform file bytes against their manifest record and return the layers (read-only copies)."""
    meta, tensors = checked_tensors(data, t, where)
    _check_recorded_specs(meta, t, where)
    if len(tensors) != sum(1 + s["bias"] for s in t.layers):
        raise RegistryError(f"{where}: the file holds tensors the manifest does not list: {sorted(tensors)[:8]}")
    return [_decode_layer(tensors, j, spec, where) for j, spec in enumerate(t.layers)]


def checked_tensors(data: bytes, t: TransformInfo, where: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A transform file's metadata and tensors, after checking its sha256, format and recorded direction."""
    foreign = foreign_format(data)
    if foreign is None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != t.sha256:
            raise RegistryError(
                f"{where}: checksum mismatch for transform {t.from_version} -> {t.to_version}: manifest says "
                f"sha256 {t.sha256[:16]}..., file has {digest[:16]}...; the weights were modified or corrupted; "
                f"{_REFIX}")
    meta = read_header(data, where).get("__metadata__", {})
    if meta.get("format") != FILE_FORMAT:
        raise RegistryError(f"{where}: not a bc_fast transform file (metadata format={short_repr(meta.get('format'))})")
    rec = (meta.get("from_version"), meta.get("to_version"), meta.get("direction"))
    want = (str(t.from_version), str(t.to_version), t.direction)
    if rec != want:
        raise RegistryError(
            f"{where}: the file records a {rec[2]} transform {rec[0]} -> {rec[1]} but the manifest uses it as "
            f"{want[2]} {want[0]} -> {want[1]}; the transform is recorded in the other direction or misfiled")
    from safetensors.numpy import load as _st_load

    try:
        tensors = _st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise RegistryError(f"{where}: cannot parse safetensors: {e}; {_REFIX}") from e
    return meta, tensors


def recorded_json(meta: Mapping[str, str], key: str, where: str) -> Any:
    """The JSON a transform file's metadata records under ``key``, parsed as strictly as a manifest.

    No NaN, no duplicate keys, at most MAX_DEPTH levels: a RegistryError naming the file otherwise.
    """
    raw = meta.get(key, "null").encode("utf-8", "surrogatepass")  # a lone surrogate: "not UTF-8" below
    return _strict_json(raw, f"{where}: the file's recorded {key!r} metadata", _REFIX)


def _check_recorded_specs(meta: Mapping[str, Any], t: TransformInfo, where: str) -> None:
    """The layer program the file records (activations, widths, bias) must be the manifest's.

    The chain checksum covers the files' sha256, so this ties the manifest's activations to it: an
    edited manifest cannot silently change what an operator computes.
    """
    recorded = recorded_json(meta, "layers", where)
    try:
        specs = [_validate_layer_spec(s, f"{where}: recorded layers[{j}]", None) for j, s in enumerate(recorded)]
    except (ValueError, TypeError, RegistryError) as e:
        raise RegistryError(f"{where}: the file's recorded layer program is unreadable ({short_repr(str(e))}); "
                            f"{_REFIX}") from e
    if specs != [dict(s) for s in t.layers]:
        raise RegistryError(
            f"{where}: the manifest describes transform {t.from_version} -> {t.to_version} as {short_repr(t.layers)} "
            f"but the weight file records {short_repr(specs)}; the manifest was edited by hand. Restore it, or {_REFIX}")


def _decode_layer(tensors: Mapping[str, np.ndarray], j: int, spec: Mapping[str, Any], where: str) -> Layer:
    w = tensors.get(f"layers.{j}.weight")
    if w is None:
        raise RegistryError(f"{where}: tensor 'layers.{j}.weight' is missing")
    if w.shape != (spec["d_out"], spec["d_in"]):
        raise RegistryError(f"{where}: layers.{j}.weight has shape {w.shape}, manifest says "
                            f"({spec['d_out']}, {spec['d_in']}) (dimension mismatch)")
    b = tensors.get(f"layers.{j}.bias")
    if spec["bias"] != (b is not None):
        raise RegistryError(f"{where}: layers.{j}.bias presence disagrees with the manifest")
    if b is not None and b.shape != (spec["d_out"],):
        raise RegistryError(f"{where}: layers.{j}.bias has shape {b.shape}, expected ({spec['d_out']},)")
    try:
        return validate_layer(Layer(w, b, spec["activation"], spec["activation_width"]), f"layers[{j}]",
                              keep_float64=True)
    except (ValueError, TypeError) as e:
        raise RegistryError(f"{where}: {e}; {_REFIX}") from e
