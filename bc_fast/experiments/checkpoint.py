"""Per-seed checkpoints of :func:`bc_fast.experiments.run_experiment`, so that long runs resume.

A full-preset run takes tens of minutes per seed; one file per finished seed
(``seed_<s>.json``, written atomically) means a crash or an interrupted session loses at most
the seed in progress. A rerun with ``resume=True`` reuses every seed whose checkpoint was made
with the same settings on the same data and trains only the rest; the results are identical
to an uninterrupted run (every per-seed value round-trips exactly: float64 through JSON).

The first seed of a run also stores what the demo pipeline serves (embeddings and B_k layers
of the kept strategies) in ``seed_<s>_artifacts.npz``, read back with ``allow_pickle=False``.
Whatever device trained the seed, what is saved is host data (numpy; a torch tensor that reaches
a checkpoint is copied to the CPU first), so a CPU-only machine resumes from it; the file records
that device under ``"device"``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .._util.fileio import atomic_write_bytes, read_json_object

#: v2 (stop 39): consumer scores with item-genre early-stopped on its own stop items and the selection AUC over
#: the selection side; a v1 checkpoint holds the old ones, so resuming from it is refused.
FORMAT = "bc_fast.experiment.seed v2"

#: Config fields that do not change what one seed computes: how many seeds, CI replicates, which
#: strategies' artifacts are kept, the preset's name, and torch threads and device (which can change
#: at most the float rounding of torch's arithmetic, not the method; each checkpoint records the
#: device it was trained on).
_NOT_PER_SEED = frozenset({"seed", "seeds", "n_boot", "keep", "threads", "device", "name"})


def seed_settings(cfg: Any) -> dict:
    """The config fields that decide one seed's results, as JSON values."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in _NOT_PER_SEED}))


def _same_settings(saved: dict, now: dict, defaults: dict) -> bool:
    """Equal, where a setting that the checkpoint predates counts as equal at its default value."""
    return all(saved.get(k, defaults.get(k)) == v for k, v in now.items()) and set(saved) <= set(now)


def data_fingerprint(data: Any) -> dict:
    """Name, sizes and a SHA-256 of the interactions, attributes and labels of ``data``."""
    h = hashlib.sha256()
    for a in (data.user, data.item, data.rating, data.timestamp):
        h.update(np.ascontiguousarray(a).tobytes())
    for name in sorted(data.item_attrs):
        tokens, offsets = data.item_attrs[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(tokens).tobytes())
        h.update(np.ascontiguousarray(offsets).tobytes())
    if data.item_labels is not None:
        h.update(np.ascontiguousarray(data.item_labels).tobytes())
    return {"name": data.name, "interactions": int(data.num_edges), "users": int(data.num_users),
            "items": int(data.num_items), "sha256": h.hexdigest()}


def _host(x: Any) -> Any:
    """A torch tensor (on any device) as a numpy array on the host; anything else as is."""
    if type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return x


def _encode(x: Any) -> Any:
    """Arrays (numpy, or torch tensors on any device) and int-keyed dicts as tagged JSON objects; the rest as is."""
    x = _host(x)
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": x.dtype.str, "shape": list(x.shape)}
    if isinstance(x, dict):
        if x and all(isinstance(k, (int, np.integer)) for k in x):
            return {"__intkeys__": [[int(k), _encode(v)] for k, v in x.items()]}
        return {str(k): _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        if "__ndarray__" in x:
            dtype = np.dtype(x["dtype"])
            if dtype.kind not in "fiub":
                raise ValueError(f"unexpected array dtype {dtype} in a seed checkpoint")
            return np.array(x["__ndarray__"], dtype=dtype).reshape(x["shape"])
        if "__intkeys__" in x:
            return {int(k): _decode(v) for k, v in x["__intkeys__"]}
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def _diff(saved: dict, now: dict) -> str:
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    return ", ".join(f"{k}={saved.get(k)!r} there, {now.get(k)!r} now" for k in keys[:6])


class SeedCheckpoints:
    """The checkpoint directory of one experiment: save finished seeds, restore them on resume.

    Parameters
    ----------
    directory : path
        Created on the first save.
    cfg : ExperimentConfig
    data : InteractionData
    """

    def __init__(self, directory: str | Path, cfg: Any, data: Any) -> None:
        self.dir = Path(directory)
        self.settings = seed_settings(cfg)
        self.defaults = seed_settings(type(cfg)())
        self.data = data_fingerprint(data)

    def path(self, seed: int) -> Path:
        """The checkpoint file of ``seed``."""
        return self.dir / f"seed_{int(seed)}.json"

    def _artifacts_path(self, seed: int) -> Path:
        return self.dir / f"seed_{int(seed)}_artifacts.npz"

    def save(self, seed: int, result: dict, timing: dict[str, float], artifacts: dict | None = None, *,
             device: str | None = None) -> Path:
        """Write one finished seed (and, given, its artifacts) atomically; return the JSON path.

        ``device`` (e.g. ``"cuda:0 (NVIDIA H200)"``) records where the seed was trained.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        has_artifacts = artifacts is not None
        if has_artifacts:
            atomic_write_bytes(self._artifacts_path(seed), _artifacts_bytes(artifacts))
        doc = {"format": FORMAT, "seed": int(seed), "settings": self.settings, "data": self.data,
               "device": device, "timing": {k: float(v) for k, v in timing.items()}, "has_artifacts": has_artifacts,
               "result": _encode(result)}
        return atomic_write_bytes(self.path(seed), json.dumps(doc, separators=(",", ":")).encode())

    def load(self, seed: int, *, need_artifacts: bool) -> tuple[dict, dict, dict | None] | None:
        """``(result, timing, artifacts)`` of a finished seed, or None when it has to be trained.

        None when no checkpoint exists, or when ``need_artifacts`` and it was saved without them.
        Raises ValueError naming the file when it is unreadable or was made with other settings
        or other data (results of different runs must not be mixed).
        """
        path = self.path(seed)
        if not path.exists():
            return None
        fix = f"delete {path} (or the whole directory) to train this seed again, or run without resume"
        doc = read_json_object(path, what="experiment seed checkpoint", fix=fix)
        if doc.get("format") != FORMAT or doc.get("seed") != int(seed) or "result" not in doc:
            raise ValueError(f"{path}: not a {FORMAT} checkpoint of seed {seed}; {fix}")
        if doc.get("data") != self.data:
            raise ValueError(f"{path} was made on other data ({doc.get('data')}, now {self.data}); {fix}")
        if not isinstance(doc.get("settings"), dict) or not _same_settings(doc["settings"], self.settings, self.defaults):
            raise ValueError(f"{path} was made with other settings ({_diff(doc.get('settings') or {}, self.settings)}); "
                             f"{fix}")
        if need_artifacts and not doc.get("has_artifacts"):
            return None
        try:
            result = _decode(doc["result"])
            timing = {str(k): float(v) for k, v in dict(doc.get("timing", {})).items()}
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: damaged experiment seed checkpoint ({str(e)[:200]}); {fix}") from None
        artifacts = _read_artifacts(self._artifacts_path(seed), fix) if need_artifacts else None
        return result, timing, artifacts


def _artifacts_bytes(artifacts: dict) -> bytes:
    """Embeddings and B_k layers of the kept strategies as one .npz (no pickled objects)."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for name, art in artifacts.items():
        layers = []
        for k, chain in enumerate(art["layers"]):
            layers.append([{"activation": lay.activation, "activation_width": lay.activation_width,
                            "bias": lay.bias is not None} for lay in chain])
            for i, lay in enumerate(chain):
                arrays[f"{name}|layer|{k}|{i}|weight"] = np.asarray(_host(lay.weight))
                if lay.bias is not None:
                    arrays[f"{name}|layer|{k}|{i}|bias"] = np.asarray(_host(lay.bias))
        for what in ("user", "item"):
            for k, a in enumerate(art[what]):
                arrays[f"{name}|{what}|{k}"] = np.asarray(_host(a))
        meta[name] = {"dims": list(art["dims"]), "layers": layers, "versions": len(art["user"]),
                      "scores": list(art.get("scores", []))}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _read_artifacts(path: Path, fix: str) -> dict:
    from ..engine import Layer

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
        out = {}
        for name, m in meta.items():
            layers = [[Layer(arrays[f"{name}|layer|{k}|{i}|weight"],
                             arrays[f"{name}|layer|{k}|{i}|bias"] if d["bias"] else None,
                             d["activation"], d["activation_width"]) for i, d in enumerate(chain)]
                      for k, chain in enumerate(m["layers"])]
            out[name] = {"dims": m["dims"], "layers": layers, "scores": m["scores"],
                         "user": [arrays[f"{name}|user|{k}"] for k in range(m["versions"])],
                         "item": [arrays[f"{name}|item|{k}"] for k in range(m["versions"])]}
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable experiment artifacts ({str(e)[:200]}); {fix}") from None
