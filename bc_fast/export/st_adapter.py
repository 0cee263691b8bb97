"""A FusedTransform as a sentence-transformers module: ``SentenceTransformer.encode`` emits version j.

Append the modules after a model's last one (pooling, normalize): ``SentenceTransformer(modules=[*model,
*st_modules(op)])``. Programs whose activations cover whole layers become sentence-transformers' own
``Dense`` and ``Normalize`` modules, which any sentence-transformers install loads. Others become one
:class:`BackwardAdapter`, saved with the model to ``bc_fast_adapter.safetensors`` (no pickle);
sentence-transformers loads a module class of another package only with ``trust_remote_code=True``, so
:func:`load_sentence_transformer` checks first that the saved model's modules are sentence-transformers'
own plus this class (imported from the installed bc_fast, nothing from the folder) and then loads it.
Imports torch at import: reach it through :mod:`bc_fast.export`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from .._util.fileio import atomic_write_bytes
from ..engine.layer import Layer
from ..engine.operator import FusedTransform
from .torch_module import _module_class

WEIGHTS_FILE = "bc_fast_adapter.safetensors"
FORMAT = "bc_fast.st_adapter/1"


class BackwardAdapter(torch.nn.Module):
    """Maps ``features["sentence_embedding"]`` through a fused operator (a :func:`.to_torch` module).

    The operator runs in float32 on the embedding's device, also in a model cast with ``.half()`` or
    ``.to(torch.bfloat16)`` (its weights stay float32; device moves apply); its output, rounded once to
    the embedding's dtype, replaces the embedding, so ``encode`` returns version-j vectors (normalised if
    the operator normalises) matching ``op.apply``.
    """

    def __init__(self, op: FusedTransform) -> None:
        super().__init__()
        self.op = op
        self.fused = _module_class()(op, keep_float32=True)

    def forward(self, features: dict[str, Any]) -> dict[str, Any]:
        emb = features["sentence_embedding"]
        features["sentence_embedding"] = self.fused(emb)  # float32 inside, emb's dtype out (keep_float32)
        return features

    def get_embedding_dimension(self) -> int:
        """The output width (the old version's dimension)."""
        return int(self.op.d_out)

    get_sentence_embedding_dimension = get_embedding_dimension  # the name before sentence-transformers 6

    def save(self, output_path: str, safe_serialization: bool = True) -> None:
        """Writes the operator to ``output_path/bc_fast_adapter.safetensors`` (atomically; always safetensors)."""
        del safe_serialization  # safetensors whatever the caller asks: nothing here is ever pickled
        tensors: dict[str, np.ndarray] = {}
        specs = []
        for i, layer in enumerate(self.op.layers):
            tensors[f"layer{i}.weight"] = np.ascontiguousarray(layer.weight, dtype=np.float32)
            if layer.bias is not None:
                tensors[f"layer{i}.bias"] = np.ascontiguousarray(layer.bias, dtype=np.float32)
            specs.append({"activation": layer.activation, "activation_width": layer.activation_width,
                          "bias": layer.bias is not None})
        meta = {"format": FORMAT, "layers": json.dumps(specs), "normalize": json.dumps(bool(self.op.normalize))}
        atomic_write_bytes(Path(output_path) / WEIGHTS_FILE, safetensors_bytes(tensors, metadata=meta))

    @staticmethod
    def load(input_path: str) -> BackwardAdapter:
        """Reads what :meth:`save` wrote; a clear ``ValueError`` naming the file if it is not that."""
        path = Path(input_path) / WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a bc_fast adapter module folder")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            specs = json.loads(meta["layers"])
            normalize = json.loads(meta["normalize"])
            layers = [Layer(tensors[f"layer{i}.weight"], tensors[f"layer{i}.bias"] if s["bias"] else None,
                            s["activation"], s["activation_width"]) for i, s in enumerate(specs)]
            return BackwardAdapter(FusedTransform(layers, normalize=bool(normalize)))
        except (ValueError, KeyError, TypeError, OSError, SafetensorError) as e:  # SafetensorError: a damaged file
            raise ValueError(f"{path} is not a valid bc_fast adapter: {e}") from e


CLASS_REF = f"{__name__}.BackwardAdapter"


def load_sentence_transformer(path: str | Path, **kwargs: Any) -> Any:
    """``SentenceTransformer(path, trust_remote_code=True, **kwargs)`` for a saved model whose modules are
    sentence-transformers' own and bc_fast adapters only; ``ValueError`` naming any other module type."""
    from sentence_transformers import SentenceTransformer

    modules_json = Path(path) / "modules.json"
    try:
        modules = json.loads(modules_json.read_text(encoding="utf-8"))
        types = [m["type"] for m in modules]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{modules_json}: not a saved SentenceTransformer ({e})") from e
    foreign = [t for t in types if not (isinstance(t, str) and (t.startswith("sentence_transformers.") or t == CLASS_REF))]
    if foreign:
        raise ValueError(f"{modules_json} names module types other than sentence-transformers' and {CLASS_REF}: "
                         f"{foreign}; load it with SentenceTransformer(..., trust_remote_code=True) only if you "
                         "trust that code")
    return SentenceTransformer(str(path), trust_remote_code=True, **kwargs)


def _st_modules() -> tuple[type, type]:
    """sentence-transformers' Dense and Normalize (their module moved in sentence-transformers 6)."""
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize
    except ImportError:
        from sentence_transformers.models import Dense, Normalize
    return Dense, Normalize


def st_modules(op: FusedTransform) -> list[torch.nn.Module]:
    """The sentence-transformers modules computing ``op`` (see the module docstring).

    When every layer's activation covers all its outputs (or none), they are sentence-transformers' own
    ``Dense`` layers (identity, ReLU or exact GELU) and a final ``Normalize`` if ``op`` normalises: a saved
    model then loads with plain ``SentenceTransformer(path)``. Otherwise (activations on the leading
    outputs only) one :class:`BackwardAdapter`.
    """
    if not isinstance(op, FusedTransform):
        raise TypeError(f"to_sentence_transformers takes a FusedTransform, got {type(op).__name__}")
    acts = {"none": torch.nn.Identity, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU}
    full = all(layer.activation_width in (None, 0, layer.d_out) or layer.activation == "none" for layer in op.layers)
    if not full:
        return [BackwardAdapter(op)]
    Dense, Normalize = _st_modules()
    modules: list[torch.nn.Module] = []
    for layer in op.layers:
        act = "none" if layer.activation_width == 0 else layer.activation
        w = torch.from_numpy(np.array(layer.weight, dtype=np.float32))
        b = None if layer.bias is None else torch.from_numpy(np.array(layer.bias, dtype=np.float32))
        modules.append(Dense(layer.d_in, layer.d_out, bias=b is not None, activation_function=acts[act](),
                             init_weight=w, init_bias=b))
    if op.normalize:
        modules.append(Normalize())
    return modules
