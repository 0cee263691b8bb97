"""The human-readable description of a registry (``bc-fast registry show``).

What lives here: :func:`describe_registry`, the text :meth:`Registry.describe
<bc_fast.store.registry.Registry.describe>` returns (versions, transforms with their shapes, sha256
and fit metrics, the fused chains from the latest version and their cost). It reads the registry
handle it is given (its public API) and never the disk. It may import :mod:`.manifest`, :mod:`bc_fast.engine` and
``bc_fast._util`` (not :mod:`.registry`, which calls it).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..engine import Layer
from ..engine.fusion import chain_flops
from .manifest import FORMAT, RegistryError

__all__ = ["describe_registry"]


def describe_registry(reg: Any) -> str:
    """A human-readable summary: versions, transforms, fused chains from the latest version.

    ``reg`` is a :class:`~bc_fast.store.registry.Registry` (its manifest as this handle read it). Only its
    public API is used, except the manifest's format version, which nothing else needs.
    """
    lines = [f"bc_fast registry {reg.path}",
             f"  name: {reg.name}   format: {FORMAT} v{reg._manifest['format_version']}   "
             f"checksum: {reg.checksum[:16]}"]
    metadata, versions, transforms = reg.metadata, reg.versions(), reg.transforms()
    if metadata:
        lines.append(f"  metadata: {json.dumps(metadata, sort_keys=True)}")
    if not versions:
        lines.append("  no versions")
        return "\n".join(lines)
    lines.append(f"  versions ({len(versions)}, latest {reg.latest}):")
    for v in versions:
        meta = json.dumps(v.metadata, sort_keys=True) if v.metadata else ""
        lines.append(f"    v{v.version:<3} dim {v.dim:<6} {meta}".rstrip())
    lines.append(f"  transforms ({len(transforms)}):")
    for t in transforms:
        shape = " -> ".join([str(t.d_in)] + [
            f"{s['d_out']}" + ("" if s["activation"] == "none" or s["activation_width"] == 0
                               else f"({s['activation']})") for s in t.layers])
        if t.routed is not None:
            r = t.routed
            shape = f"{t.d_in} -> {t.d_out} (k={r['k']}, m={r['m']}, T={r['temperature']:.4g})"
        metrics = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.fit_metrics.items()))
        lines.append(f"    v{t.from_version} -> v{t.to_version}  {t.direction:<8} {t.kind:<6} {shape:<24} "
                     f"sha256 {t.sha256[:12]}  {t.file}" + (f"  fit: {metrics}" if metrics else ""))
    latest = reg.latest
    chains = []
    for dst in range(latest - 1, -1, -1):
        try:
            infos = [reg.transform_info(v, v - 1) for v in range(latest, dst, -1)]
        except RegistryError:
            chains.append(f"    v{latest} -> v{dst}: incomplete (missing backward transform)")
            continue
        flat = [Layer(np.empty((s["d_out"], s["d_in"]), np.float32), None, s["activation"], s["activation_width"])
                for t in infos for s in t.layers]
        routed = [t.routed for t in infos if t.routed is not None]
        n_act = sum(not l.is_affine for l in flat)
        desc = "affine, 1 matrix" if n_act == 0 else f"{n_act} activation layer(s)"
        macs = chain_flops(flat) + sum(r["k"] * r["d_in"] + r["m"] * r["d_out"] * r["d_in"] for r in routed)
        if routed:  # what Registry.operator makes of it: bc_fast.store.routed_chain
            fuses = len(routed) == 1 and n_act == 0
            desc = f"{len(routed)} routed step(s), " + ("fuses into 1 routed operator" if fuses else "does not fuse")
        chains.append(f"    v{latest} -> v{dst}: {len(infos)} step(s), {len(flat)} layer(s), {desc}, "
                      f"{macs} MACs/row step by step")
    if chains:
        lines.append("  chains from latest:")
        lines.extend(chains)
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v)
