"""Routed (local, per-cluster) transforms in a registry: what is accepted, the file, the loaded step.

What lives here: :data:`RoutedStep` (a registry's routed step: a :class:`bc_fast.engine.routed.RoutedParams`,
the map of :class:`bc_fast.fit.LocalAdapter`, whose arrays are read-only float32 copies), :func:`as_routed`
(what :meth:`Registry.add_transform <bc_fast.store.registry.Registry.add_transform>` accepts as a routed
transform), :func:`prepare_routed` (the checked manifest entry and file bytes) and :func:`decode_routed`
(file bytes back to a step, checked against the manifest).

File layout (safetensors, float32)::

    routed.centroids  (k, d_in)          cluster centres C_c
    routed.weights    (k, d_out, d_in)   per-cluster matrices A_c
    routed.bias       (k, d_out)         per-cluster offsets b_c
    __metadata__      format, from_version, to_version, direction, kind="routed",
                      routed = JSON {d_in, d_out, k, m, temperature}

The manifest entry records the same spec under ``routed`` (no ``layers``); the file's sha256 is checked
on every load, and the spec it records must equal the manifest's. It may import :mod:`.manifest`,
:mod:`bc_fast.engine` and ``bc_fast._util``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..engine.routed import RoutedParams, RoutedTransform
from .manifest import (
    _REFIX,
    FILE_FORMAT,
    MAX_DIM,
    ROUTED_FORMAT_VERSION,
    ROUTED_KIND,
    RegistryError,
    TransformInfo,
    checked_tensors,
    encode_safetensors,
    json_clean,
    recorded_json,
    validate_routed_spec,
    weight_file,
)

__all__ = ["RoutedStep", "as_routed", "decode_routed", "prepare_routed", "stamp_format_version"]

_TENSORS = ("centroids", "weights", "bias")
_FIELDS = (*_TENSORS, "m", "temperature")


#: A registry's routed step: the routed map's parameters, its arrays read-only float32 copies (:func:`make_step`).
RoutedStep = RoutedParams


def _real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def make_step(centroids: Any, weights: Any, bias: Any, m: Any, temperature: Any, where: str) -> RoutedStep:
    """A checked :class:`RoutedStep`; ValueError starting with ``where`` names the field and the problem."""
    arrays = {}
    for name, v in (("centroids", centroids), ("weights", weights), ("bias", bias)):
        a = np.asarray(v)
        if a.dtype.kind not in "fiu":
            raise ValueError(f"{where}: {name} must hold real numbers, got dtype {a.dtype}")
        arrays[name] = a
    c, a, b = arrays["centroids"], arrays["weights"], arrays["bias"]
    if c.ndim != 2 or 0 in c.shape:
        raise ValueError(f"{where}: centroids must be (k, d_in) with k, d_in >= 1, got shape {c.shape}")
    k, d_in = c.shape
    if a.ndim != 3 or a.shape[0] != k or a.shape[2] != d_in or a.shape[1] < 1:
        raise ValueError(f"{where}: weights must be (k, d_out, d_in) = ({k}, d_out, {d_in}) to match the centroids "
                         f"{c.shape}, got shape {a.shape} (k or d_in inconsistent)")
    if b.shape != (k, a.shape[1]):
        raise ValueError(f"{where}: bias must be (k, d_out) = ({k}, {a.shape[1]}), got shape {b.shape}")
    if max(k, d_in, a.shape[1]) > MAX_DIM:
        raise ValueError(f"{where}: k, d_in and d_out must be at most {MAX_DIM}, got {k}, {d_in}, {a.shape[1]}")
    if not _real(m) or not 1 <= int(m) <= k or int(m) != m:
        raise ValueError(f"{where}: m must be an integer in [1, k] = [1, {k}] (clusters blended per row), got {m!r}")
    if not _real(temperature) or not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature!r}")
    out = {}
    for name, arr in arrays.items():
        f32 = np.array(arr, dtype=np.float32, order="C")  # a copy: the stored step never aliases the caller's
        if not np.isfinite(f32).all():
            raise ValueError(f"{where}: {name} holds {int((~np.isfinite(f32)).sum())} NaN or Inf value(s) "
                             "(or values beyond the float32 range)")
        f32.flags.writeable = False
        out[name] = f32
    return RoutedStep(out["centroids"], out["weights"], out["bias"], int(m), float(temperature))


def as_routed(transform: Any, where: str) -> RoutedStep | None:
    """The routed step in ``transform``, or None when it is not a routed transform (then a layer program).

    Accepted: a fitted :class:`bc_fast.fit.LocalAdapter` (anything with ``routed_params()``; also an
    :class:`bc_fast.fit.AutoAdapter` whose ``best_estimator_`` is one), a
    :class:`bc_fast.fit._routing.RoutedParams` (anything with its five fields), or a mapping with keys
    ``centroids, weights, bias, m, temperature``.
    """
    if isinstance(transform, RoutedTransform):
        raise TypeError(f"{where}: a compiled RoutedTransform cannot be stored (its centroids are folded into "
                        "routing scores and it may already hold fused affine steps); pass the fitted LocalAdapter "
                        "or its routed_params()")
    inner = getattr(transform, "best_estimator_", None)  # an AutoAdapter that chose the local adapter
    if callable(getattr(inner, "routed_params", None)):
        transform = inner
    if callable(getattr(transform, "routed_params", None)):
        transform = transform.routed_params()
    if isinstance(transform, Mapping):
        if "centroids" not in transform:
            return None
        missing = [f for f in _FIELDS if f not in transform]
        if missing:
            raise ValueError(f"{where}: routed parameters lack {missing}; expected keys {list(_FIELDS)}")
        fields = [transform[f] for f in _FIELDS]
    elif all(hasattr(transform, f) for f in _FIELDS):
        fields = [getattr(transform, f) for f in _FIELDS]
    else:
        return None
    return make_step(*fields, where=where)


def _encode(step: RoutedStep, a: int, b: int, direction: str) -> bytes:
    meta = {"format": FILE_FORMAT, "from_version": str(a), "to_version": str(b), "direction": direction,
            "kind": ROUTED_KIND, "routed": json.dumps(step.spec(), sort_keys=True)}
    return encode_safetensors({f"routed.{n}": getattr(step, n) for n in _TENSORS}, meta)


def prepare_routed(step: RoutedStep, a: int, b: int, direction: str, kind: str | None, dims: tuple[int, int],
                   fit_metrics: Mapping[str, Any] | None, created: str) -> tuple[dict, bytes]:
    """Check a routed step against the versions it connects (``dims = (dim(a), dim(b))``); return its manifest
    entry and file bytes."""
    name = f"the {direction} routed transform {a} -> {b}"
    if kind not in (None, ROUTED_KIND):
        raise ValueError(f"kind={kind!r} but {name} is a routed (local) map; use kind='routed' or leave kind unset")
    if (step.d_in, step.d_out) != dims:
        other = " (it is the transform in the other direction)" if (step.d_in, step.d_out) == dims[::-1] else ""
        raise RegistryError(f"dimension mismatch: {name} must map version {a} (dim {dims[0]}) to version {b} "
                            f"(dim {dims[1]}), but its centroids and weights map {step.d_in} -> {step.d_out}{other}")
    data = _encode(step, a, b, direction)
    sha = hashlib.sha256(data).hexdigest()
    entry = {"from_version": a, "to_version": b, "direction": direction, "kind": ROUTED_KIND,
             "file": weight_file(direction, a, b, sha), "sha256": sha, "routed": step.spec(),
             "fit_metrics": json_clean(dict(fit_metrics or {}), "fit_metrics"), "created": created}
    return entry, data


def stamp_format_version(manifest: dict, entry: Mapping[str, Any]) -> None:
    """Raise a manifest's format_version to :data:`ROUTED_FORMAT_VERSION` when ``entry`` is a routed transform."""
    if entry.get("kind") == ROUTED_KIND:
        manifest["format_version"] = max(int(manifest["format_version"]), ROUTED_FORMAT_VERSION)


def decode_routed(data: bytes, t: TransformInfo, where: str) -> RoutedStep:
    """Check routed transform file bytes against their manifest record and return the step."""
    meta, tensors = checked_tensors(data, t, where)
    name = f"routed transform {t.from_version} -> {t.to_version}"
    if meta.get("kind") != ROUTED_KIND:
        raise RegistryError(f"{where}: the manifest records {name} but the file holds a {meta.get('kind')!r} "
                            f"transform; the manifest was edited by hand. Restore it, or {_REFIX}")
    raw = recorded_json(meta, "routed", where)
    try:
        recorded = validate_routed_spec(raw, f"{where}: recorded routed spec")
    except (ValueError, TypeError) as e:
        raise RegistryError(f"{where}: the file's recorded routed spec is unreadable ({e}); {_REFIX}") from e
    if recorded != t.routed:
        raise RegistryError(f"{where}: the manifest describes {name} as {t.routed} but the weight file records "
                            f"{recorded}; the manifest was edited by hand. Restore it, or {_REFIX}")
    want = {f"routed.{n}" for n in _TENSORS}
    if set(tensors) != want:
        raise RegistryError(f"{where}: {name} must hold exactly the tensors {sorted(want)}, got {sorted(tensors)[:8]}")
    spec = t.routed
    shapes = {"centroids": (spec["k"], spec["d_in"]), "weights": (spec["k"], spec["d_out"], spec["d_in"]),
              "bias": (spec["k"], spec["d_out"])}
    for n, shape in shapes.items():
        arr = tensors[f"routed.{n}"]
        if arr.shape != shape or arr.dtype != np.float32:
            raise RegistryError(f"{where}: routed.{n} is {arr.dtype} {arr.shape}, the manifest says float32 {shape}; "
                                f"{_REFIX}")
    try:
        return make_step(*(tensors[f"routed.{n}"] for n in _TENSORS), spec["m"], spec["temperature"], where=where)
    except ValueError as e:
        raise RegistryError(f"{e}; {_REFIX}") from e

