"""Version registry: embedding versions and their transforms, safely on disk.

A registry is a directory::

    PATH/manifest.json                      format, versions (dim, metadata), transforms
    PATH/transforms/backward_2_to_1.safetensors    weights of B_2 (version 2 -> 1)
    ...

``manifest.json`` lists every version with its dimension and metadata, and every
transform with its kind, direction, from/to version, weight file, the file's
sha256 and fit metrics. The manifest carries a sha256 of its own canonical content
(``checksum``), so a truncated or hand-edited manifest is refused, and the
registry's :attr:`Registry.checksum` is stable across processes. Weights are
safetensors (never pickle) and are verified against their sha256 when loaded.
Every write goes to a temporary file in the same directory, is fsynced and
renamed into place, and the directory is fsynced: a crash leaves either the old or
the new registry, never a half-written one.

Versions are numbered 0, 1, 2, ... in the order they are added. A backward
transform ``B_k`` maps version ``k`` to ``k - 1``; :meth:`Registry.operator`
chains and fuses them into one :class:`~bc_fast.ops.FusedTransform`. Forward
transforms (``k - 1 -> k``) exist only when someone fitted one and added it with
:meth:`Registry.add_transform`.

Examples
--------
>>> reg = Registry.create(tmp / "reg")                       # doctest: +SKIP
>>> reg.add_version(dim=256, metadata={"model": "m0"})       # doctest: +SKIP
>>> reg.add_version(dim=256, backward=(W1, b1))              # doctest: +SKIP
>>> reg.operator(src=1, dst=0).apply(z1)                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .fusion import chain_flops, fuse_chain
from ._fileio import FileLock, atomic_write_bytes, fsync_dir
from ._arrays import as_numpy
from .ops import ACTIVATIONS, FusedTransform, Layer, validate_layer

__all__ = ["Registry", "RegistryError", "VersionInfo", "TransformInfo", "as_layers", "show", "KINDS"]

FORMAT = "bc_fast.registry"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRANSFORM_DIR = "transforms"
#: Transform kinds (descriptive; bc_fast.train's names). All but "mlp" must be affine layer programs.
KINDS = ("linear", "affine", "lowrank", "orthogonal", "truncate", "identity", "mlp")
DIRECTIONS = ("backward", "forward")
_FILE_FORMAT = "bc_fast.transform"


class RegistryError(ValueError):
    """A registry is missing, malformed, inconsistent, or used the wrong way."""


# ----------------------------------------------------------------------------- records


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

    @property
    def d_in(self) -> int:
        return int(self.layers[0]["d_in"])

    @property
    def d_out(self) -> int:
        return int(self.layers[-1]["d_out"])


# ----------------------------------------------------------------------------- helpers


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _content_checksum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _to_numpy(a: Any, where: str) -> np.ndarray:
    return None if a is None else as_numpy(a, where, copy_from_device=True)[0]  # type: ignore[return-value]


def _clean_layer(layer: Layer, where: str) -> Layer:
    layer = validate_layer(layer, where, keep_float64=True)
    if layer.bias is not None and not np.any(layer.bias):
        layer = Layer(layer.weight, None, layer.activation, layer.activation_width)
    return layer


def as_layers(transform: Any) -> list[Layer]:
    """Normalise a transform to a list of :class:`Layer`.

    Accepts a list of Layer, one Layer, a :class:`FusedTransform`, a ``(W, b)``
    pair (``b`` may be None), a bare weight matrix ``W`` of shape (d_out, d_in), an
    object with ``export_layers()`` or ``export()`` (the modules in ``bc_fast.train``), or a torch
    ``nn.Linear``-like module with ``weight``/``bias``.
    """
    name = type(transform).__name__
    if transform is None:
        raise TypeError("transform is None; pass a list of Layer, (W, b), or a module with export_layers()")
    if hasattr(transform, "export_layers"):
        layers = list(transform.export_layers())
    elif callable(getattr(transform, "export", None)) and not isinstance(transform, (FusedTransform, Layer)):
        layers = list(transform.export())  # bc_fast.train transforms
    elif isinstance(transform, FusedTransform):
        layers = list(transform.layers)
    elif isinstance(transform, Layer):
        layers = [transform]
    elif isinstance(transform, (list, tuple)) and transform and all(isinstance(l, Layer) for l in transform):
        layers = list(transform)
    elif isinstance(transform, tuple) and len(transform) == 2 and not isinstance(transform[0], Layer):
        layers = [Layer(_to_numpy(transform[0], "W"), _to_numpy(transform[1], "b"))]
    elif isinstance(transform, np.ndarray) or type(transform).__module__.startswith("torch") and hasattr(transform, "ndim"):
        layers = [Layer(_to_numpy(transform, "W"))]
    elif hasattr(transform, "weight") and hasattr(transform, "bias"):  # nn.Linear-like
        layers = [Layer(_to_numpy(transform.weight, f"{name}.weight"), _to_numpy(transform.bias, f"{name}.bias"))]
    else:
        raise TypeError(
            f"cannot read a transform from {name}; pass a list of bc_fast.Layer, a (W, b) pair, "
            f"a weight matrix, or an object with export_layers()")
    if not layers:
        raise ValueError(f"transform {name} exports no layers")
    out: list[Layer] = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"transform layer {i} must be a bc_fast.Layer, got {type(layer).__name__}")
        layer = _clean_layer(layer, f"layers[{i}]")
        if out and layer.d_in != out[-1].d_out:
            raise ValueError(f"layers[{i}] expects d_in={layer.d_in} but layers[{i - 1}] outputs {out[-1].d_out}")
        out.append(layer)
    return out


def _infer_kind(layers: Sequence[Layer]) -> str:
    if all(l.is_affine for l in layers):
        return "linear" if all(l.bias is None for l in layers) else "affine"
    return "mlp"


def _layer_specs(layers: Sequence[Layer]) -> list[dict]:
    return [{"d_in": l.d_in, "d_out": l.d_out, "activation": l.activation,
             "activation_width": l.activation_width, "bias": l.bias is not None} for l in layers]


def _json_clean(value: Any, where: str) -> Any:
    """Check that ``value`` is JSON (finite numbers, str keys); numpy scalars become Python."""
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
            out[k] = _json_clean(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where} must be JSON-serialisable (dict/list/str/number/bool/None), got {type(value).__name__}")


def _read_safetensors_metadata(data: bytes, where: str) -> dict:
    if len(data) < 8:
        raise RegistryError(f"{where}: file is truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise RegistryError(f"{where}: header length {n} exceeds the file size; the file is truncated")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise RegistryError(f"{where}: safetensors header is not valid JSON: {e}") from e
    return dict(header.get("__metadata__") or {})


# ----------------------------------------------------------------------------- manifest schema


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
        raise _err(where, f"field {key!r} must be {tname}, got {type(v).__name__} {v!r}")
    return v


def _validate_manifest(m: Any, src: str) -> tuple[list[VersionInfo], list[TransformInfo]]:
    if not isinstance(m, dict):
        raise _err(src, f"the manifest must be a JSON object, got {type(m).__name__}")
    fmt = _req(m, "format", str, src)
    if fmt != FORMAT:
        raise _err(src, f"field 'format' is {fmt!r}, expected {FORMAT!r}; this is not a bc_fast registry")
    fv = _req(m, "format_version", int, src)
    if fv > FORMAT_VERSION:
        raise _err(src, f"format_version {fv} is newer than this bc_fast supports ({FORMAT_VERSION}); upgrade bc_fast")
    if fv < 1:
        raise _err(src, f"field 'format_version' must be >= 1, got {fv}")
    _req(m, "checksum", str, src)
    _req(m, "metadata", dict, src)
    raw_versions = _req(m, "versions", list, src)
    versions: list[VersionInfo] = []
    for i, v in enumerate(raw_versions):
        w = f"{src}: versions[{i}]"
        if not isinstance(v, dict):
            raise RegistryError(f"{w} must be an object, got {type(v).__name__}")
        num = _req(v, "version", int, w)
        if num != i:
            raise RegistryError(f"{w}.version is {num}, expected {i}: versions must be numbered 0, 1, 2, ... in order")
        dim = _req(v, "dim", int, w)
        if dim < 1:
            raise RegistryError(f"{w}.dim must be a positive integer, got {dim}")
        versions.append(VersionInfo(num, dim, dict(_req(v, "metadata", dict, w)), str(v.get("created", ""))))
    transforms: list[TransformInfo] = []
    seen: set[tuple[int, int]] = set()
    for i, t in enumerate(_req(m, "transforms", list, src)):
        w = f"{src}: transforms[{i}]"
        if not isinstance(t, dict):
            raise RegistryError(f"{w} must be an object, got {type(t).__name__}")
        a = _req(t, "from_version", int, w)
        b = _req(t, "to_version", int, w)
        direction = _req(t, "direction", str, w)
        if direction not in DIRECTIONS:
            raise RegistryError(f"{w}.direction must be one of {DIRECTIONS}, got {direction!r}")
        for key, num in (("from_version", a), ("to_version", b)):
            if not 0 <= num < len(versions):
                raise RegistryError(f"{w}.{key}={num} names an unknown version (the registry has 0..{len(versions) - 1})")
        want_to = a - 1 if direction == "backward" else a + 1
        if b != want_to:
            raise RegistryError(
                f"{w} is recorded as {direction} from version {a} to version {b}, which is the other direction "
                f"or skips a version: a {direction} transform maps {a} -> {want_to}")
        if (a, b) in seen:
            raise RegistryError(f"{w}: a second transform {a} -> {b}; each pair may have one")
        seen.add((a, b))
        kind = _req(t, "kind", str, w)
        if kind not in KINDS:
            raise RegistryError(f"{w}.kind must be one of {KINDS}, got {kind!r}")
        fname = _req(t, "file", str, w)
        if os.path.isabs(fname) or ".." in Path(fname).parts or not fname.endswith(".safetensors"):
            raise RegistryError(f"{w}.file must be a relative .safetensors path inside the registry, got {fname!r}")
        sha = _req(t, "sha256", str, w)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise RegistryError(f"{w}.sha256 must be 64 lowercase hex digits, got {sha!r}")
        specs = _req(t, "layers", list, w)
        if not specs:
            raise RegistryError(f"{w}.layers is empty")
        d_prev = None
        for j, s in enumerate(specs):
            ws = f"{w}.layers[{j}]"
            if not isinstance(s, dict):
                raise RegistryError(f"{ws} must be an object")
            d_in = _req(s, "d_in", int, ws)
            d_out = _req(s, "d_out", int, ws)
            act = _req(s, "activation", str, ws)
            if act not in ACTIVATIONS:
                raise RegistryError(f"{ws}.activation must be one of {ACTIVATIONS}, got {act!r}")
            width = s.get("activation_width")
            if width is not None and (not isinstance(width, int) or isinstance(width, bool) or not 0 <= width <= d_out):
                raise RegistryError(f"{ws}.activation_width must be null or an integer in [0, {d_out}], got {width!r}")
            _req(s, "bias", bool, ws)
            if d_prev is not None and d_in != d_prev:
                raise RegistryError(f"{ws}.d_in={d_in} but the previous layer outputs {d_prev}")
            d_prev = d_out
        if specs[0]["d_in"] != versions[a].dim or specs[-1]["d_out"] != versions[b].dim:
            raise RegistryError(
                f"{w} maps {specs[0]['d_in']} -> {specs[-1]['d_out']} features but version {a} has dim "
                f"{versions[a].dim} and version {b} has dim {versions[b].dim} (dimension mismatch)")
        transforms.append(TransformInfo(a, b, direction, kind, fname, sha, tuple(specs),
                                        dict(_req(t, "fit_metrics", dict, w)), str(t.get("created", ""))))
    return versions, transforms


# ----------------------------------------------------------------------------- registry


class Registry:
    """Embedding versions and the transforms between them, stored in a directory.

    Use :meth:`create` or :meth:`open`; do not call the constructor directly.
    """

    def __init__(self, path: Path, manifest: dict, versions: list[VersionInfo],
                 transforms: list[TransformInfo], *, _private: object = None) -> None:
        if _private is not _TOKEN:
            raise TypeError("use Registry.create(path) or Registry.open(path)")
        self.path = Path(path)
        self._manifest = manifest
        self._versions = versions
        self._transforms = {(t.from_version, t.to_version): t for t in transforms}
        self._disk_checksum = manifest.get("_disk_checksum", manifest.get("checksum"))
        manifest.pop("_disk_checksum", None)
        self._layer_cache: dict[tuple[int, int], list[Layer]] = {}
        self._op_cache: dict[tuple[int, int, bool], FusedTransform] = {}
        self._pending_files: list[Path] = []

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(cls, path: str | os.PathLike, *, name: str | None = None,
               metadata: Mapping[str, Any] | None = None) -> "Registry":
        """Create an empty registry at ``path`` (a new or empty directory)."""
        p = Path(path)
        if (p / MANIFEST).exists():
            raise RegistryError(f"{p / MANIFEST} already exists; use Registry.open({str(p)!r})")
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise RegistryError(f"{p} exists and is not an empty directory; pick a new path for the registry")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": str(name if name is not None else p.name),
            "created": _now(),
            "metadata": _json_clean(dict(metadata or {}), "metadata"),
            "versions": [],
            "transforms": [],
        }
        manifest["checksum"] = _content_checksum(manifest)
        (p / TRANSFORM_DIR).mkdir(parents=True, exist_ok=True)
        fsync_dir(p)
        atomic_write_bytes(p / MANIFEST, _pretty(manifest))
        return cls(p, manifest, [], [], _private=_TOKEN)

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = False, allow_edited: bool = False) -> "Registry":
        """Open an existing registry.

        Parameters
        ----------
        path : directory holding ``manifest.json``
        verify : bool, default False
            Also load every weight file now and check its sha256 (otherwise each is
            checked when first used).
        allow_edited : bool, default False
            Accept a manifest whose content checksum does not match (edited by hand);
            the next write re-stamps it.
        """
        p = Path(path)
        mpath = p / MANIFEST
        if not mpath.is_file():
            hint = "" if p.exists() else " (the directory does not exist)"
            raise RegistryError(f"{mpath} not found{hint}; create a registry with Registry.create({str(p)!r})")
        manifest = _load_manifest(mpath, allow_edited=allow_edited)
        versions, transforms = _validate_manifest(manifest, str(mpath))
        reg = cls(p, manifest, versions, transforms, _private=_TOKEN)
        for t in transforms:
            if not (p / t.file).is_file():
                raise RegistryError(f"{mpath}: transform {t.from_version} -> {t.to_version} file {t.file} is missing")
        if verify:
            reg.verify()
        return reg

    # ------------------------------------------------------------------ reading

    @property
    def name(self) -> str:
        """The registry's name."""
        return str(self._manifest.get("name", ""))

    @property
    def metadata(self) -> dict:
        """Registry-level metadata (a copy)."""
        return json.loads(json.dumps(self._manifest["metadata"]))

    @property
    def checksum(self) -> str:
        """sha256 of the manifest's canonical content: identifies this exact registry state.

        Stable across processes and platforms; changes whenever a version or transform
        is added or replaced. Table conversion and legacy indexes stamp their outputs with it.
        """
        return str(self._manifest["checksum"])

    def versions(self) -> list[VersionInfo]:
        """All versions, oldest first."""
        return list(self._versions)

    def __len__(self) -> int:
        return len(self._versions)

    def __contains__(self, version: object) -> bool:
        return isinstance(version, (int, np.integer)) and 0 <= int(version) < len(self._versions)

    @property
    def latest(self) -> int:
        """The newest version number."""
        if not self._versions:
            raise RegistryError(f"{self.path} has no versions yet; add one with add_version(dim=...)")
        return len(self._versions) - 1

    def version(self, version: int) -> VersionInfo:
        """The record of one version."""
        return self._versions[self._check_version(version, "version")]

    def dim(self, version: int) -> int:
        """Embedding dimension of ``version``."""
        return self.version(version).dim

    def transforms(self) -> list[TransformInfo]:
        """Every recorded transform, sorted by (direction, from_version)."""
        return sorted(self._transforms.values(), key=lambda t: (t.direction, t.from_version))

    def transform_info(self, from_version: int, to_version: int) -> TransformInfo:
        """The manifest record of the transform ``from_version -> to_version``."""
        a = self._check_version(from_version, "from_version")
        b = self._check_version(to_version, "to_version")
        t = self._transforms.get((a, b))
        if t is None:
            raise RegistryError(self._missing_msg(a, b))
        return t

    def _check_version(self, version: Any, what: str) -> int:
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise TypeError(f"{what} must be an int version number, got {type(version).__name__} {version!r}")
        v = int(version)
        if not 0 <= v < len(self._versions):
            have = f"0..{len(self._versions) - 1}" if self._versions else "none yet"
            raise RegistryError(f"unknown version {v} ({what}) in registry {self.path}; known versions: {have}")
        return v

    def _missing_msg(self, a: int, b: int) -> str:
        if b < a:
            return (f"registry {self.path} has no backward transform {a} -> {b}; add it with "
                    f"add_transform({a}, {b}, layers) (or pass backward= when adding version {a})")
        return (f"no forward transform {a} -> {b} in registry {self.path}: dst={b} is newer than src={a}, and "
                f"there are no forward transforms unless fitted; fit one (bc_fast.fit) and add it with "
                f"add_transform({a}, {b}, layers)")

    def transform_layers(self, from_version: int, to_version: int) -> list[Layer]:
        """Load one transform's layers, verifying the weight file's sha256 and shapes."""
        t = self.transform_info(from_version, to_version)
        key = (t.from_version, t.to_version)
        if key not in self._layer_cache:
            self._layer_cache[key] = self._load_transform(t)
        return list(self._layer_cache[key])

    def _load_transform(self, t: TransformInfo) -> list[Layer]:
        fpath = self.path / t.file
        where = str(fpath)
        try:
            data = fpath.read_bytes()
        except OSError as e:
            raise RegistryError(f"{where}: cannot read transform {t.from_version} -> {t.to_version}: {e}") from e
        digest = hashlib.sha256(data).hexdigest()
        if digest != t.sha256:
            raise RegistryError(
                f"{where}: checksum mismatch for transform {t.from_version} -> {t.to_version}: manifest says "
                f"sha256 {t.sha256[:16]}..., file has {digest[:16]}...; the weights were modified or corrupted")
        meta = _read_safetensors_metadata(data, where)
        if meta.get("format") != _FILE_FORMAT:
            raise RegistryError(f"{where}: not a bc_fast transform file (metadata format={meta.get('format')!r})")
        rec = (meta.get("from_version"), meta.get("to_version"), meta.get("direction"))
        want = (str(t.from_version), str(t.to_version), t.direction)
        if rec != want:
            raise RegistryError(
                f"{where}: the file records a {rec[2]} transform {rec[0]} -> {rec[1]} but the manifest uses it as "
                f"{want[2]} {want[0]} -> {want[1]}; the transform is recorded in the other direction or misfiled")
        from safetensors.numpy import load as _st_load

        try:
            tensors = _st_load(data)
        except Exception as e:  # safetensors raises its own error type
            raise RegistryError(f"{where}: cannot parse safetensors: {e}") from e
        layers: list[Layer] = []
        for j, spec in enumerate(t.layers):
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
            layers.append(Layer(w, b, spec["activation"], spec["activation_width"]))
        if len(tensors) != sum(1 + s["bias"] for s in t.layers):
            raise RegistryError(f"{where}: the file holds tensors the manifest does not list: {sorted(tensors)}")
        return layers

    def chain_layers(self, src: int, dst: int) -> list[list[Layer]]:
        """The transforms from ``src`` to ``dst`` in application order, each a list of Layer.

        ``src > dst`` uses backward transforms ``B_src, ..., B_(dst+1)``; ``src < dst``
        needs fitted forward transforms; ``src == dst`` is an empty chain.
        """
        a = self._check_version(src, "src")
        b = self._check_version(dst, "dst")
        step = -1 if b < a else 1
        missing = [(v, v + step) for v in range(a, b, step) if (v, v + step) not in self._transforms]
        if missing:
            raise RegistryError(self._missing_msg(*missing[0]))
        return [self.transform_layers(v, v + step) for v in range(a, b, step)]

    def fused_layers(self, src: int, dst: int) -> list[Layer]:
        """The chain ``src -> dst`` fused into a short program (see :func:`bc_fast.fusion.fuse_chain`)."""
        a = self._check_version(src, "src")
        b = self._check_version(dst, "dst")
        if a == b:
            d = self._versions[a].dim
            return [Layer(np.eye(d, dtype=np.float32))]
        return fuse_chain(self.chain_layers(a, b))

    def operator(self, src: int | None = None, dst: int = 0, *, normalize: bool = False) -> FusedTransform:
        """A fused operator mapping version ``src`` embeddings to version ``dst``.

        Parameters
        ----------
        src : int, default latest
        dst : int, default 0
        normalize : bool, default False
            L2-normalise the output rows.

        Returns
        -------
        FusedTransform with ``d_in = dim(src)`` and ``d_out = dim(dst)``. Affine chains
        are one matrix and bias (composed in float64, stored in float32); ``src == dst``
        is the identity.
        """
        a = self.latest if src is None else self._check_version(src, "src")
        b = self._check_version(dst, "dst")
        key = (a, b, bool(normalize))
        op = self._op_cache.get(key)
        if op is None:
            op = FusedTransform(self.fused_layers(a, b), normalize=normalize)
            self._op_cache[key] = op
        return op

    def chain_checksum(self, src: int, dst: int) -> str:
        """sha256 identifying the chain ``src -> dst`` (dims and weight-file hashes).

        Unlike :attr:`checksum` it does not change when unrelated versions are added, so
        an index built for version ``dst`` stays valid as the registry grows.
        """
        a = self._check_version(src, "src")
        b = self._check_version(dst, "dst")
        step = -1 if b < a else 1
        shas = []
        for v in range(a, b, step):
            shas.append(self.transform_info(v, v + step).sha256)
        body = {"src": a, "dst": b, "dims": [self._versions[v].dim for v in range(a, b + step, step)], "sha256": shas}
        return hashlib.sha256(_canonical(body)).hexdigest()

    def verify(self) -> None:
        """Load every transform and check its sha256, shapes and direction; raise RegistryError if any fails."""
        self._layer_cache.clear()
        for t in self.transforms():
            self.transform_layers(t.from_version, t.to_version)

    # ------------------------------------------------------------------ writing

    def add_version(self, version: int | None = None, *, dim: int, metadata: Mapping[str, Any] | None = None,
                    backward: Any = None, kind: str | None = None,
                    fit_metrics: Mapping[str, Any] | None = None) -> VersionInfo:
        """Add the next version, with its backward transform to the previous one.

        Parameters
        ----------
        version : int, optional
            Must be the next number (``len(registry)``); omit it to take the next.
        dim : int
            Embedding dimension of the new version.
        metadata : dict, optional
            JSON-serialisable free-form metadata (model name, data cut, ...).
        backward : transform, optional
            ``B_version`` mapping the new version to ``version - 1``: a list of Layer,
            a ``(W, b)`` pair, a weight matrix, or a ``bc_fast.train`` module with
            ``export_layers()``. Required for every version but 0 unless added later
            with :meth:`add_transform`.
        kind : one of :data:`KINDS`, optional
            Default: the transform's own ``kind`` attribute if it is one of KINDS
            (bc_fast.train modules have one), else inferred from the layers.
        fit_metrics : dict, optional
            JSON-serialisable metrics of the fit (alignment MSE, ...).
        """
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        nxt = len(self._versions)
        if version is None:
            version = nxt
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        if int(version) != nxt:
            if 0 <= int(version) < nxt:
                raise RegistryError(f"version {int(version)} already exists in {self.path}; the next version is {nxt}")
            raise RegistryError(f"versions are added in order: the next version of {self.path} is {nxt}, got {int(version)}")
        if version == 0 and backward is not None:
            raise RegistryError("version 0 has no previous version, so it takes no backward transform")
        meta = _json_clean(dict(metadata or {}), "metadata")
        info = {"version": nxt, "dim": int(dim), "metadata": meta, "created": _now()}
        new_versions = self._versions + [VersionInfo(nxt, int(dim), meta, info["created"])]
        entry = None
        if backward is not None:
            entry = self._write_transform(nxt, nxt - 1, backward, "backward", kind, fit_metrics, new_versions)
        with self._transaction() as m:
            m["versions"].append(info)
            if entry is not None:
                m["transforms"].append(entry)
        return self._versions[-1]

    def add_transform(self, from_version: int, to_version: int, transform: Any, *, kind: str | None = None,
                      fit_metrics: Mapping[str, Any] | None = None, replace: bool = False) -> TransformInfo:
        """Record a backward (``k -> k-1``) or fitted forward (``k -> k+1``) transform.

        Parameters
        ----------
        from_version, to_version : int
            Adjacent versions. ``to_version = from_version - 1`` is backward.
        transform : see :meth:`add_version` ``backward``
        replace : bool, default False
            Replace an existing transform for the same pair (its old file is removed
            after the manifest switched).
        """
        a = self._check_version(from_version, "from_version")
        b = self._check_version(to_version, "to_version")
        if abs(a - b) != 1:
            raise RegistryError(f"transforms connect adjacent versions; {a} -> {b} skips versions (chain them instead)")
        direction = "backward" if b < a else "forward"
        old = self._transforms.get((a, b))
        if old is not None and not replace:
            raise RegistryError(f"{self.path} already has a {direction} transform {a} -> {b}; pass replace=True")
        entry = self._write_transform(a, b, transform, direction, kind, fit_metrics, self._versions)
        with self._transaction() as m:
            m["transforms"] = [t for t in m["transforms"] if (t["from_version"], t["to_version"]) != (a, b)]
            m["transforms"].append(entry)
        if old is not None and old.file != entry["file"]:
            with contextlib.suppress(OSError):
                (self.path / old.file).unlink()
        return self._transforms[(a, b)]

    def _write_transform(self, a: int, b: int, transform: Any, direction: str, kind: str | None,
                         fit_metrics: Mapping[str, Any] | None, versions: list[VersionInfo]) -> dict:
        layers = as_layers(transform)
        d_a, d_b = versions[a].dim, versions[b].dim
        d_in, d_out = layers[0].d_in, layers[-1].d_out
        if (d_in, d_out) != (d_a, d_b):
            if (d_in, d_out) == (d_b, d_a):
                raise RegistryError(
                    f"the {direction} transform {a} -> {b} must map dim {d_a} -> {d_b}, but it maps {d_in} -> "
                    f"{d_out}: it is the transform in the other direction ({b} -> {a}); pass the {direction} one")
            raise RegistryError(
                f"dimension mismatch: the {direction} transform {a} -> {b} must map version {a} (dim {d_a}) to "
                f"version {b} (dim {d_b}), but its layers map {d_in} -> {d_out}")
        inferred = _infer_kind(layers)
        if kind is None:
            own = getattr(transform, "kind", None)
            kind = own if isinstance(own, str) and own in KINDS else inferred
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind != "mlp" and inferred == "mlp":
            raise ValueError(f"kind={kind!r} but the transform has activation layers; use kind='mlp'")
        if kind == "linear" and inferred == "affine":
            raise ValueError("kind='linear' but the transform has a bias; use kind='affine'")
        metrics = _json_clean(dict(fit_metrics or {}), "fit_metrics")
        specs = _layer_specs(layers)
        tensors: dict[str, np.ndarray] = {}
        for j, l in enumerate(layers):
            tensors[f"layers.{j}.weight"] = l.weight
            if l.bias is not None:
                tensors[f"layers.{j}.bias"] = l.bias
        from safetensors.numpy import save as _st_save

        data = _st_save(tensors, metadata={
            "format": _FILE_FORMAT, "from_version": str(a), "to_version": str(b), "direction": direction,
            "kind": kind, "layers": json.dumps(specs, sort_keys=True)})
        sha = hashlib.sha256(data).hexdigest()
        rel = f"{TRANSFORM_DIR}/{direction}_{a}_to_{b}_{sha[:12]}.safetensors"
        (self.path / TRANSFORM_DIR).mkdir(exist_ok=True)
        target = self.path / rel
        if not target.exists():  # same name = same content (sha in the name); never touch a live file
            atomic_write_bytes(target, data)
            self._pending_files.append(target)
        return {"from_version": a, "to_version": b, "direction": direction, "kind": kind, "file": rel,
                "sha256": sha, "layers": specs, "fit_metrics": metrics, "created": _now()}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict]:
        """Lock, check nobody else changed the manifest, apply the edit, validate, write atomically."""
        mpath = self.path / MANIFEST
        try:
            with FileLock(self.path / ".lock"):
                if mpath.is_file():
                    try:
                        on_disk = json.loads(mpath.read_bytes()).get("checksum")
                    except (ValueError, AttributeError):
                        on_disk = None
                    if on_disk != self._disk_checksum:
                        raise RegistryError(
                            f"{mpath} changed on disk since this Registry was opened; reopen it with Registry.open")
                m = json.loads(json.dumps(self._manifest))
                yield m
                m["checksum"] = _content_checksum(m)
                versions, transforms = _validate_manifest(m, str(mpath))
                atomic_write_bytes(mpath, _pretty(m))
        except BaseException:
            for f in self._pending_files:  # weight files the failed edit would have referenced
                with contextlib.suppress(OSError):
                    f.unlink()
            self._pending_files.clear()
            raise
        self._pending_files.clear()
        self._manifest = m
        self._disk_checksum = m["checksum"]
        self._versions = versions
        self._transforms = {(t.from_version, t.to_version): t for t in transforms}
        self._layer_cache.clear()
        self._op_cache.clear()

    # ------------------------------------------------------------------ display

    def describe(self) -> str:
        """A human-readable summary: versions, transforms, fused chains from the latest version."""
        lines = [f"bc_fast registry {self.path}",
                 f"  name: {self.name}   format: {FORMAT} v{self._manifest['format_version']}   "
                 f"checksum: {self.checksum[:16]}"]
        if self._manifest["metadata"]:
            lines.append(f"  metadata: {json.dumps(self._manifest['metadata'], sort_keys=True)}")
        if not self._versions:
            lines.append("  no versions")
            return "\n".join(lines)
        lines.append(f"  versions ({len(self._versions)}, latest {self.latest}):")
        for v in self._versions:
            meta = json.dumps(v.metadata, sort_keys=True) if v.metadata else ""
            lines.append(f"    v{v.version:<3} dim {v.dim:<6} {meta}".rstrip())
        lines.append(f"  transforms ({len(self._transforms)}):")
        for t in self.transforms():
            shape = " -> ".join([str(t.d_in)] + [
                f"{s['d_out']}" + ("" if s["activation"] == "none" or s["activation_width"] == 0
                                   else f"({s['activation']})") for s in t.layers])
            metrics = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.fit_metrics.items()))
            lines.append(f"    v{t.from_version} -> v{t.to_version}  {t.direction:<8} {t.kind:<6} {shape:<24} "
                         f"sha256 {t.sha256[:12]}  {t.file}" + (f"  fit: {metrics}" if metrics else ""))
        latest = self.latest
        chains = []
        for dst in range(latest - 1, -1, -1):
            try:
                steps = [[Layer(np.empty((s["d_out"], s["d_in"]), np.float32), None, s["activation"],
                                s["activation_width"]) for s in self.transform_info(v, v - 1).layers]
                         for v in range(latest, dst, -1)]
            except RegistryError:
                chains.append(f"    v{latest} -> v{dst}: incomplete (missing backward transform)")
                continue
            flat = [l for s in steps for l in s]
            n_act = sum(not l.is_affine for l in flat)
            desc = "affine, 1 matrix" if n_act == 0 else f"{n_act} activation layer(s)"
            chains.append(f"    v{latest} -> v{dst}: {len(steps)} step(s), {len(flat)} layer(s), {desc}, "
                          f"{chain_flops(flat)} MACs/row step by step")
        if chains:
            lines.append("  chains from latest:")
            lines.extend(chains)
        return "\n".join(lines)

    def show(self) -> str:
        """Alias of :meth:`describe`."""
        return self.describe()

    def __repr__(self) -> str:
        n = len(self._versions)
        return f"Registry({str(self.path)!r}, versions={n}, transforms={len(self._transforms)})"


_TOKEN = object()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v)


def _pretty(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _load_manifest(mpath: Path, *, allow_edited: bool) -> dict:
    raw = mpath.read_bytes()
    if not raw.strip():
        raise RegistryError(f"{mpath} is empty (truncated write?); restore it from a backup")
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise RegistryError(f"{mpath} is not valid JSON (truncated or hand-edited?): {e}") from e
    if not isinstance(m, dict):
        raise RegistryError(f"{mpath}: the manifest must be a JSON object, got {type(m).__name__}")
    stored = m.get("checksum")
    if not allow_edited and isinstance(stored, str):
        try:
            actual = _content_checksum(m)
        except ValueError as e:
            raise RegistryError(f"{mpath}: manifest holds values JSON cannot represent canonically: {e}") from e
        if actual != stored:
            raise RegistryError(
                f"{mpath}: content checksum mismatch (field 'checksum' is {stored[:16]}..., content hashes to "
                f"{actual[:16]}...): the manifest was edited by hand or corrupted. Edit registries through the "
                f"Python API; to accept a deliberate edit, open with Registry.open(path, allow_edited=True)")
    elif allow_edited:
        m["checksum"] = _content_checksum(m)
        m["_disk_checksum"] = stored
    return m


def show(path: str | os.PathLike) -> str:
    """Open the registry at ``path``, verify every weight file, and return its description.

    This is what ``bc-fast registry show PATH`` prints.
    """
    return Registry.open(path, verify=True).describe()
