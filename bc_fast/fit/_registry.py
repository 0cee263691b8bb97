"""Fit a transform between two registry versions from .npy files of paired embeddings (``bc-fast fit``)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..store.registry import Registry, RegistryError
from ._auto import AutoAdapter, make_adapter
from ._gram import accumulate_pairs, val_mask
from ._metrics import fit_metrics
from ._streaming import STREAMING_KINDS, fit_streaming_npy, npy_pair_chunks, open_npy

#: Kinds `bc-fast fit` fits from both files loaded whole (no streaming form).
IN_MEMORY_KINDS = ("mlp",)

#: At most this many validation rows are read back for the printed metrics (the neighbour search is
#: quadratic in them); the per-candidate validation MSE and R^2 use all validation rows.
MAX_METRIC_ROWS = 5000
CLI_AUTO_KINDS = ("ridge", "procrustes", "lowrank")


def _val_rows(src: np.ndarray, dst: np.ndarray, val_fraction: float, random_state: int,
              chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The first MAX_METRIC_ROWS validation rows of two (memory-mapped) arrays."""
    idx: list[np.ndarray] = []
    have = 0
    for s in range(0, src.shape[0], chunk_rows):
        rows = s + np.nonzero(val_mask(s, min(chunk_rows, src.shape[0] - s), val_fraction, random_state))[0]
        idx.append(rows[:MAX_METRIC_ROWS - have])
        have += idx[-1].shape[0]
        if have >= MAX_METRIC_ROWS:
            break
    rows = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
    return np.asarray(src[rows]), np.asarray(dst[rows])


def _check_target(reg: Registry, a: int, b: int, src: np.ndarray, dst: np.ndarray, replace: bool,
                  names: tuple[str, str]) -> None:
    """Everything that can be refused before fitting: adjacency, dims, an existing transform."""
    if abs(a - b) != 1:
        raise ValueError(f"--from {a} --to {b}: a transform connects adjacent versions; fit {a} -> {a - 1} "
                         f"(backward) or {a} -> {a + 1} (forward)")
    for v, arr, name, role in ((a, src, names[0], "source"), (b, dst, names[1], "target")):
        if arr.shape[1] != reg.dim(v):
            raise ValueError(f"{name} has dim {arr.shape[1]} but version {v} ({role}) of {reg.path} has dim "
                             f"{reg.dim(v)}: pass the version-{v} embeddings as the {role} file")
    if not replace and any((t.from_version, t.to_version) == (a, b) for t in reg.transforms()):
        raise RegistryError(f"{reg.path} already has a transform {a} -> {b}; pass --replace to overwrite it")


def fit_to_registry(registry: str | os.PathLike, from_version: int, to_version: int, src_path: str | os.PathLike,
                    dst_path: str | os.PathLike, *, kind: str = "auto", alpha: float | None = None,
                    rank: int | None = None, replace: bool = False, chunk_rows: int = 65536,
                    val_fraction: float = 0.1, random_state: int = 0, k: int = 10,
                    sample_rows: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Fit ``from_version -> to_version`` from two .npy files and add it to the registry.

    Closed-form kinds (and ``auto``, which here chooses among them) stream the memory-mapped
    files; ``local`` (a routed transform) streams them in two passes, choosing its settings on a
    sample of at most ``sample_rows`` training rows (:meth:`~bc_fast.fit.LocalAdapter.fit_chunks`);
    ``mlp`` loads both. The metrics are those of the fit on the training rows (for ``mlp``: of the
    transform written; for ``local``: its chosen settings fitted again on the training rows alone,
    two more passes), measured on (at most :data:`MAX_METRIC_ROWS`) hashed validation rows; the
    transform written is then refitted on all pairs. Nothing is written unless every step succeeded.

    Returns
    -------
    (estimator, metrics) : the fitted adapter and the dict stored as the transform's fit_metrics.
    """
    reg = Registry.open(registry)
    a, b = int(from_version), int(to_version)
    reg.dim(a), reg.dim(b)  # unknown versions: the registry's own message
    src, dst = open_npy(src_path, "SRC"), open_npy(dst_path, "DST")
    if src.shape[0] != dst.shape[0]:
        raise ValueError(f"{src_path} has {src.shape[0]} rows but {dst_path} has {dst.shape[0]}: the files must hold "
                         "the same items in the same order")
    _check_target(reg, a, b, src, dst, replace, (str(src_path), str(dst_path)))
    params: dict[str, Any] = {"val_fraction": val_fraction, "random_state": random_state}
    if alpha is not None:
        params["alpha"] = alpha
    if rank is None and kind == "lowrank":
        rank = min(64, src.shape[1], dst.shape[1])
    if rank is not None:
        if kind not in ("lowrank", "auto"):
            raise ValueError(f"--rank applies to --kind lowrank (or auto), not {kind}")
        params["rank"] = rank
    if sample_rows is not None:
        if kind != "local":
            raise ValueError(f"--sample-rows applies to --kind local, not {kind}")
        params["sample_rows"] = sample_rows
    t0 = time.perf_counter()
    if kind in IN_MEMORY_KINDS:
        est = make_adapter(kind, **params).fit(np.asarray(src), np.asarray(dst))
        probe = est
    elif kind == "local":
        est = fit_streaming_npy(src_path, dst_path, kind="local", chunk_rows=chunk_rows, **params)
        probe = est
    elif kind in STREAMING_KINDS:
        if kind == "auto":
            params["kinds"] = CLI_AUTO_KINDS
        elif kind == "procrustes":
            params.pop("alpha", None)
        stats = accumulate_pairs(npy_pair_chunks(src_path, dst_path, chunk_rows), val_fraction=val_fraction,
                                 random_state=random_state)
        probe = make_adapter(kind, **params, refit=False).fit_stats(stats)
        est = make_adapter(kind, **params).fit_stats(stats)
    else:
        raise ValueError(f"--kind must be one of auto, ridge, procrustes, lowrank, mlp, local; got {kind!r}")
    fit_time = time.perf_counter() - t0
    if kind == "local":
        probe = _local_probe(est, src_path, dst_path, chunk_rows, params)
    xv, yv = _val_rows(src, dst, val_fraction, random_state, chunk_rows)
    holder = est.best_estimator_ if isinstance(est, AutoAdapter) else est
    metrics: dict[str, Any] = {"adapter": est.adapter if kind != "auto" else f"auto:{est.chosen_}",
                               "n_pairs": int(src.shape[0]), "n_val": int(holder.n_val_), "fit_time_s": fit_time}
    if xv.shape[0] >= 2:
        metrics.update({f"val_{key}": v for key, v in fit_metrics(probe, xv, yv, k=k).items()})
    for name in ("alpha_", "rank"):
        if getattr(holder, name, None) is not None:
            metrics[name.rstrip("_")] = getattr(holder, name)
    if kind == "local":
        metrics["local"] = {"base": est.base_, "k": int(est.k_), "m": int(est.m_), "temperature": est.temperature_,
                            "prior_rows": float(est.prior_rows_), "n_fallback": int(est.fallback_.sum()),
                            "n_sample": est.n_sample_, "n_val_sample": est.n_val_sample_}
    if isinstance(est, AutoAdapter):
        metrics["candidates"] = {kk: {m: v for m, v in c.items() if m != "fit_time_s"} for kk, c in est.candidates_.items()}
    reg.add_transform(a, b, est, kind=est.kind, fit_metrics=metrics, replace=replace)
    return est, metrics


def _local_probe(est: Any, src_path: str | os.PathLike, dst_path: str | os.PathLike, chunk_rows: int,
                 params: dict[str, Any]) -> Any:
    """The local fit's chosen settings fitted on the training rows alone (``refit=False``): the transform
    written was refitted on every pair, so only this fit's validation metrics are held out."""
    if est.n_val_ < 2:
        return est  # fit_metrics needs 2 validation rows: none are measured
    chosen = {"base": est.base_, "k": int(est.k_), "m": int(est.m_), "temperature": float(est.temperature_),
              "prior_rows": float(est.prior_rows_)}
    return fit_streaming_npy(src_path, dst_path, kind="local", chunk_rows=chunk_rows, **params, **chosen,
                             refit=False)


def format_fit_table(metrics: dict[str, Any]) -> str:
    """The validation metrics as a small table (one row per candidate for auto, the chosen one marked)."""
    head = f"{'adapter':<12} {'val R^2':>9} {'val MSE':>10}"
    lines = [head, "-" * len(head)]
    chosen = str(metrics.get("adapter", "")).removeprefix("auto:")
    for name, c in (metrics.get("candidates") or {chosen: {"val_r2": None, "val_mse": None}}).items():
        if "skipped" in c:
            lines.append(f"{name:<12} skipped: {c['skipped']}")
            continue
        r2 = metrics.get("val_r2") if c.get("val_r2") is None else c["val_r2"]
        mse = metrics.get("val_mse") if c.get("val_mse") is None else c["val_mse"]
        mark = " *" if name == chosen and "candidates" in metrics else ""
        lines.append(f"{name:<12} {_f(r2, '.4f'):>9} {_f(mse, '.3e'):>10}{mark}")
    lines.append("")
    lines.append(f"chosen {chosen}: R^2 {_f(metrics.get('val_r2'), '.4f')}  cosine {_f(metrics.get('val_cosine'), '.4f')}"
                 f"  neighbour overlap@{metrics.get('val_k', '?')} {_f(metrics.get('val_neighbour_overlap'), '.4f')}"
                 f"  (on {metrics.get('val_n', 0)} of {metrics.get('n_val')} validation rows; fit "
                 f"{metrics.get('fit_time_s', 0):.2f} s)")
    return "\n".join(lines)


def _f(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(float(v), spec)
