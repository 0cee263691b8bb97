"""Version registry: embedding versions and their transforms, safely on disk.

A registry is a directory::

    PATH/manifest.json                      format, versions (dim, metadata), transforms
    PATH/transforms/backward_2_to_1_<sha12>.safetensors    weights of B_2 (version 2 -> 1)
    ...

``manifest.json`` lists every version with its dimension and metadata, and every
transform with its kind, direction, from/to version, weight file, the file's
sha256 and fit metrics. The manifest carries a sha256 of its own canonical content
(``checksum``), so a truncated or hand-edited manifest is refused, and the
registry's :attr:`Registry.checksum` is stable across processes. Weights are
safetensors (never pickle) and are verified against their sha256 when loaded. The
format itself (schema, checksum, transform files) lives in :mod:`bc_fast.store.manifest`;
this module is the API: opening, locking, writing, fusing, describing. Its helpers live beside it:
what counts as a transform (:mod:`.transform_input`), checked paths inside the directory
(:mod:`.registry_paths`) and the human-readable description (:mod:`.registry_describe`).

Safety on disk:

* Every write holds the registry's lock (``PATH/.lock``), checks that nobody changed
  the manifest since this handle read it, writes to a temporary file in the same
  directory, fsyncs and renames it into place: a crash leaves either the old or the
  new registry. The next successful write removes what a killed writer left behind
  (bc_fast's own temporary and unreferenced weight files, nothing else).
* Symlinks that lead out of the registry directory (the manifest, ``transforms/`` or a
  weight file) are refused on every read and before every write.
* :meth:`Registry.create` that was killed half-way leaves a directory that the next
  ``create`` recognises and finishes; ``open`` says so.

Versions are numbered 0, 1, 2, ... in the order they are added. A backward
transform ``B_k`` maps version ``k`` to ``k - 1``; :meth:`Registry.operator`
chains and fuses them into one :class:`~bc_fast.engine.FusedTransform`. Forward
transforms (``k - 1 -> k``) exist only when someone fitted one and added it with
:meth:`Registry.add_transform`. A routed (local, per-cluster) transform (a fitted
:class:`bc_fast.fit.LocalAdapter`, kind ``"routed"``: :mod:`.routed_format`) is stored
the same way; a chain through it fuses into one :class:`~bc_fast.engine.routed.RoutedTransform`
when its other steps are affine (:mod:`.routed_chain` says what fuses and what does not).

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
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .._util.fileio import FileLock, atomic_write_bytes, fsync_dir  # noqa: F401  (atomic_write_bytes: index.py)
from .manifest import (  # noqa: F401  (the format's names stay importable from here)
    DIRECTIONS, FORMAT, FORMAT_VERSION, KINDS, LOCK, MANIFEST, MANIFEST_TEMP_NAME, MAX_DIM, MAX_MANIFEST_BYTES, TEMP_NAME, TRANSFORM_DIR,
    WEIGHT_NAME, RegistryError, TransformInfo, VersionInfo, canonical, content_checksum, decode_transform,
    encode_transform, json_clean, layer_specs, parse_manifest, pretty, validate_manifest, weight_file,
)
from .registry_describe import describe_registry
from .registry_paths import _create_leftovers, _inside, _not_found_msg, _read_manifest_bytes, _remove_orphans
from .routed_chain import fuse_routed_chain
from .routed_format import RoutedStep, as_routed, decode_routed, prepare_routed, stamp_format_version
from .transform_input import _infer_kind, as_layers
from ..engine.fusion import fuse_chain
from ..engine import FusedTransform, Layer
from ..engine.routed import RoutedTransform

__all__ = ["Registry", "RegistryError", "VersionInfo", "TransformInfo", "as_layers", "show", "KINDS"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


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
        self._layer_cache: dict[tuple[int, int], list[Layer] | RoutedStep] = {}
        self._op_cache: dict[tuple[int, int, bool, str], FusedTransform | RoutedTransform] = {}
        self._pending_files: list[Path] = []  # weight files the running transaction created

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(cls, path: str | os.PathLike, *, name: str | None = None,
               metadata: Mapping[str, Any] | None = None) -> "Registry":
        """Create an empty registry at ``path`` (a new or empty directory).

        A directory left by a ``create`` that was killed half-way (no manifest, only
        bc_fast's lock file and an empty ``transforms/`` folder) counts as empty.
        """
        p = Path(path)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": str(name if name is not None else p.name),
            "created": _now(),
            "metadata": json_clean(dict(metadata or {}), "metadata"),
            "versions": [],
            "transforms": [],
        }
        manifest["checksum"] = content_checksum(manifest)
        cls._check_creatable(p)
        p.mkdir(parents=True, exist_ok=True)
        with FileLock(_inside(p, LOCK)):
            cls._check_creatable(p)  # again under the lock: another process may have won the race
            for leftover in _create_leftovers(p) or []:
                if leftover.name not in (LOCK, TRANSFORM_DIR):
                    leftover.unlink()
            _inside(p, TRANSFORM_DIR).mkdir(exist_ok=True)
            fsync_dir(p)
            atomic_write_bytes(_inside(p, MANIFEST), pretty(manifest))
        return cls(p, manifest, [], [], _private=_TOKEN)

    @staticmethod
    def _check_creatable(p: Path) -> None:
        if (p / MANIFEST).exists() or (p / MANIFEST).is_symlink():
            raise RegistryError(f"{p / MANIFEST} already exists; use Registry.open({str(p)!r})")
        if p.exists() and (not p.is_dir() or _create_leftovers(p) is None):
            raise RegistryError(f"{p} exists and is not an empty directory; pick a new path for the registry")

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
        mpath = _inside(p, MANIFEST)
        if not mpath.is_file():
            raise RegistryError(_not_found_msg(p))
        manifest = parse_manifest(_read_manifest_bytes(mpath), str(mpath), allow_edited=allow_edited)
        versions, transforms = validate_manifest(manifest, str(mpath))
        reg = cls(p, manifest, versions, transforms, _private=_TOKEN)
        for t in transforms:
            if not _inside(p, t.file).is_file():
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
                f"there are no forward transforms unless fitted; fit one from paired embeddings with "
                f"`bc-fast fit --registry {self.path} --from {a} --to {b} V{a}.npy V{b}.npy` or "
                f"bc_fast.fit.fit_adapter(X_{a}, X_{b}) and add_transform({a}, {b}, est)")

    def transform_layers(self, from_version: int, to_version: int) -> list[Layer]:
        """Load one transform's layers, verifying the weight file's sha256 and shapes (RegistryError for a
        routed transform, which has none: :meth:`transform_step`)."""
        step = self.transform_step(from_version, to_version)
        if isinstance(step, RoutedStep):
            raise RegistryError(self._routed_msg(int(from_version), int(to_version)))
        return step

    def transform_step(self, from_version: int, to_version: int) -> list[Layer] | RoutedStep:
        """Load one transform, verifying its file's sha256 and shapes: its layers, or a :class:`RoutedStep`."""
        t = self.transform_info(from_version, to_version)
        key = (t.from_version, t.to_version)
        if key not in self._layer_cache:
            self._layer_cache[key] = self._load_transform(t)
        step = self._layer_cache[key]
        return step if isinstance(step, RoutedStep) else list(step)

    def _routed_msg(self, a: int, b: int) -> str:
        return (f"transform {a} -> {b} of registry {self.path} is a routed (local) transform, not a layer program; "
                f"Registry.operator() runs chains through it, chain_steps() / transform_step() load it")

    def _load_transform(self, t: TransformInfo) -> list[Layer] | RoutedStep:
        fpath = _inside(self.path, t.file)
        try:
            try:
                data = fpath.read_bytes()
            except OSError as e:
                raise RegistryError(
                    f"{fpath}: cannot read transform {t.from_version} -> {t.to_version}: {e}") from e
            return decode_routed(data, t, str(fpath)) if t.is_routed else decode_transform(data, t, str(fpath))
        except RegistryError as e:
            self._raise_if_stale(e)
            raise

    def _raise_if_stale(self, cause: BaseException) -> None:
        """Explain a failed read by a manifest that another handle or process changed since this one read it."""
        mpath = self.path / MANIFEST
        try:
            on_disk = json.loads(_read_manifest_bytes(mpath)).get("checksum")
        except (OSError, ValueError, AttributeError, RecursionError, RegistryError):
            return
        if on_disk != self._disk_checksum:
            raise RegistryError(
                f"this Registry handle is stale: {mpath} changed on disk since it was opened (another handle or "
                f"process added or replaced transforms), so the file it expects is gone or different ({cause}); "
                f"reopen with Registry.open({str(self.path)!r})") from cause

    def chain_layers(self, src: int, dst: int) -> list[list[Layer]]:
        """The transforms from ``src`` to ``dst`` in application order, each a list of Layer.

        ``src > dst`` uses backward transforms ``B_src, ..., B_(dst+1)``; ``src < dst``
        needs fitted forward transforms; ``src == dst`` is an empty chain. A chain through a
        routed transform has no layer program (RegistryError): use :meth:`chain_steps`.
        """
        steps = self.chain_steps(src, dst)
        for v, s in zip(self._chain_pairs(int(src), int(dst)), steps):
            if isinstance(s, RoutedStep):
                raise RegistryError(self._routed_msg(*v))
        return steps  # type: ignore[return-value]

    def chain_steps(self, src: int, dst: int) -> list[list[Layer] | RoutedStep]:
        """As :meth:`chain_layers`, with a routed transform as its :class:`RoutedStep`."""
        a = self._check_version(src, "src")
        b = self._check_version(dst, "dst")
        missing = [p for p in self._chain_pairs(a, b) if p not in self._transforms]
        if missing:
            raise RegistryError(self._missing_msg(*missing[0]))
        return [self.transform_step(*p) for p in self._chain_pairs(a, b)]

    @staticmethod
    def _chain_pairs(a: int, b: int) -> list[tuple[int, int]]:
        step = -1 if b < a else 1
        return [(v, v + step) for v in range(a, b, step)]

    def fused_layers(self, src: int, dst: int) -> list[Layer]:
        """The chain ``src -> dst`` fused into a short program (see :func:`bc_fast.engine.fusion.fuse_chain`)."""
        a = self._check_version(src, "src")
        b = self._check_version(dst, "dst")
        if a == b:
            d = self._versions[a].dim
            return [Layer(np.eye(d, dtype=np.float32))]
        return fuse_chain(self.chain_layers(a, b), labels=[f"{p} -> {q}" for p, q in self._chain_pairs(a, b)])

    def operator(self, src: int | None = None, dst: int = 0, *, normalize: bool = False,
                 precision: str = "fp32") -> FusedTransform | RoutedTransform:
        """A fused operator mapping version ``src`` embeddings to version ``dst``.

        Parameters
        ----------
        src : int, default latest
        dst : int, default 0
        normalize : bool, default False
            L2-normalise the output rows.
        precision : {"fp32", "bf16"}, default "fp32"
            GEMM arithmetic, as :class:`FusedTransform`'s ``precision``.

        Returns
        -------
        FusedTransform with ``d_in = dim(src)`` and ``d_out = dim(dst)``. Affine chains
        are one matrix and bias (composed in float64, stored in float32); ``src == dst``
        is the identity. A chain through a routed transform is one :class:`RoutedTransform`
        (CPU, fp32) when its other steps are affine; two routed steps, or a routed and an MLP
        step, raise RegistryError (see :mod:`bc_fast.store.routed_chain`).
        """
        a = self.latest if src is None else self._check_version(src, "src")
        b = self._check_version(dst, "dst")
        key = (a, b, bool(normalize), str(precision))
        op = self._op_cache.get(key)
        if op is None:
            steps = self.chain_steps(a, b) if a != b else []
            if any(isinstance(s, RoutedStep) for s in steps):
                op = fuse_routed_chain(steps, [f"{p} -> {q}" for p, q in self._chain_pairs(a, b)],
                                       normalize=bool(normalize), precision=str(precision))
            else:
                op = FusedTransform(self.fused_layers(a, b), normalize=normalize, precision=precision)
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
        return hashlib.sha256(canonical(body)).hexdigest()

    def verify(self) -> None:
        """Load every transform and check its sha256, shapes and direction; raise RegistryError if any fails."""
        self._layer_cache.clear()
        for t in self.transforms():
            self.transform_step(t.from_version, t.to_version)

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
            Embedding dimension of the new version (at most :data:`bc_fast.store.manifest.MAX_DIM`).
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
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= int(dim) <= MAX_DIM:
            raise ValueError(f"dim must be a positive integer of at most {MAX_DIM}, got {dim!r}")
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
        meta = json_clean(dict(metadata or {}), "metadata")
        info = {"version": nxt, "dim": int(dim), "metadata": meta, "created": _now()}
        new_versions = self._versions + [VersionInfo(nxt, int(dim), meta, info["created"])]
        prepared = None
        if backward is not None:
            prepared = self._prepare_transform(nxt, nxt - 1, backward, "backward", kind, fit_metrics, new_versions)
        with self._transaction() as m:
            m["versions"].append(info)
            if prepared is not None:
                m["transforms"].append(self._put_weights(*prepared))
                stamp_format_version(m, prepared[0])
        return self._versions[-1]

    def add_transform(self, from_version: int, to_version: int, transform: Any, *, kind: str | None = None,
                      fit_metrics: Mapping[str, Any] | None = None, replace: bool = False) -> TransformInfo:
        """Record a backward (``k -> k-1``) or fitted forward (``k -> k+1``) transform.

        Parameters
        ----------
        from_version, to_version : int
            Adjacent versions. ``to_version = from_version - 1`` is backward.
        transform : see :meth:`add_version` ``backward``; also a fitted :class:`bc_fast.fit.LocalAdapter`,
            its ``routed_params()`` or a dict of them: a routed transform (kind ``"routed"``)
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
        prepared = self._prepare_transform(a, b, transform, direction, kind, fit_metrics, self._versions)
        with self._transaction(obsolete=[] if old is None else [old.file]) as m:
            entry = self._put_weights(*prepared)
            m["transforms"] = [t for t in m["transforms"] if (t["from_version"], t["to_version"]) != (a, b)]
            m["transforms"].append(entry)
            stamp_format_version(m, entry)
        return self._transforms[(a, b)]

    def _prepare_transform(self, a: int, b: int, transform: Any, direction: str, kind: str | None,
                           fit_metrics: Mapping[str, Any] | None, versions: list[VersionInfo]) -> tuple[dict, bytes]:
        """Check a transform against the versions it connects; return its manifest entry and file bytes."""
        routed = as_routed(transform, f"{direction} transform {a} -> {b}")
        if routed is not None:
            return prepare_routed(routed, a, b, direction, kind, (versions[a].dim, versions[b].dim), fit_metrics,
                                  _now())
        if kind == "routed":
            raise ValueError(f"kind='routed' but the {direction} transform {a} -> {b} is a layer program; pass a "
                             "fitted LocalAdapter (or its routed_params()) for a routed transform")
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
        for j, l in enumerate(layers[:-1]):
            if l.d_out > MAX_DIM:
                raise ValueError(f"layers[{j}] has {l.d_out} outputs, more than a registry stores ({MAX_DIM})")
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
        metrics = json_clean(dict(fit_metrics or {}), "fit_metrics")
        data = encode_transform(layers, a, b, direction, kind)
        sha = hashlib.sha256(data).hexdigest()
        entry = {"from_version": a, "to_version": b, "direction": direction, "kind": kind,
                 "file": weight_file(direction, a, b, sha), "sha256": sha, "layers": layer_specs(layers),
                 "fit_metrics": metrics, "created": _now()}
        return entry, data

    def _put_weights(self, entry: dict, data: bytes) -> dict:
        """Write a transform file inside a transaction (under the lock); return its manifest entry."""
        _inside(self.path, TRANSFORM_DIR).mkdir(exist_ok=True)
        target = _inside(self.path, entry["file"])
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == entry["sha256"]:
            return entry  # the same bytes are already there (content-addressed name): never touch a live file
        existed = target.exists()
        atomic_write_bytes(target, data)
        if not existed:
            self._pending_files.append(target)
        return entry

    @contextlib.contextmanager
    def _transaction(self, *, obsolete: Sequence[str] = ()) -> Iterator[dict]:
        """Lock, check nobody else changed the manifest, let the caller edit a copy, validate, write atomically.

        Weight files are written by the caller inside the block (still under the lock), so
        a file that no manifest references is an orphan of a killed writer: after the
        commit, orphans and ``obsolete`` files that are no longer referenced are removed.
        """
        mpath = _inside(self.path, MANIFEST)
        _inside(self.path, TRANSFORM_DIR)
        self._pending_files = []
        with FileLock(_inside(self.path, LOCK)):
            self._check_not_stale(mpath)
            m = json.loads(json.dumps(self._manifest))
            try:
                yield m
                m["checksum"] = content_checksum(m)
                versions, transforms = validate_manifest(m, str(mpath))
                atomic_write_bytes(_inside(self.path, MANIFEST), pretty(m))
            except BaseException:
                for f in self._pending_files:  # weight files the failed edit would have referenced
                    with contextlib.suppress(OSError):
                        f.unlink()
                raise
            finally:
                self._pending_files = []
            self._manifest = m
            self._disk_checksum = m["checksum"]
            self._versions = versions
            self._transforms = {(t.from_version, t.to_version): t for t in transforms}
            self._layer_cache.clear()
            self._op_cache.clear()
            _remove_orphans(self.path, {os.path.normpath(t.file) for t in self._transforms.values()}, obsolete)

    def _check_not_stale(self, mpath: Path) -> None:
        if not mpath.is_file():
            return
        try:
            on_disk = json.loads(_read_manifest_bytes(mpath)).get("checksum")
        except (ValueError, AttributeError, RecursionError):
            on_disk = None
        if on_disk != self._disk_checksum:
            raise RegistryError(
                f"{mpath} changed on disk since this Registry was opened (another handle or process wrote to it); "
                f"reopen with Registry.open({str(self.path)!r}) and repeat the change")

    # ------------------------------------------------------------------ display

    def describe(self) -> str:
        """A human-readable summary: versions, transforms, fused chains from the latest version."""
        return describe_registry(self)

    def show(self) -> str:
        """Alias of :meth:`describe`."""
        return self.describe()

    def __repr__(self) -> str:
        n = len(self._versions)
        return f"Registry({str(self.path)!r}, versions={n}, transforms={len(self._transforms)})"


_TOKEN = object()


def show(path: str | os.PathLike) -> str:
    """Open the registry at ``path``, verify every weight file, and return its description.

    This is what ``bc-fast registry show PATH`` prints.
    """
    return Registry.open(path, verify=True).describe()
