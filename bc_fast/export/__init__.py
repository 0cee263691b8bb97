"""The fused operator carried into other runtimes, so a model emits an old version directly.

:func:`to_torch` turns a :class:`~bc_fast.FusedTransform` into a ``torch.nn.Module``;
:func:`to_sentence_transformers` into modules appended to a ``SentenceTransformer``; :func:`to_onnx` and
:func:`append_onnx` into an ONNX graph. Imports only :mod:`bc_fast.engine` and :mod:`bc_fast._util`
(floor 2); torch, sentence-transformers and onnx are imported when a function here is called.
"""

from typing import Any

from .onnx_graph import append_onnx, to_onnx
from .torch_module import to_torch

__all__ = ["FusedModule", "append_onnx", "load_sentence_transformer", "to_onnx", "to_sentence_transformers",
           "to_torch"]


def to_sentence_transformers(op: Any) -> list[Any]:
    """sentence-transformers modules computing ``op`` on the sentence embedding (append them to a model):
    its own ``Dense``/``Normalize`` where they express the program, else one bc_fast ``BackwardAdapter``.

    >>> model = SentenceTransformer(modules=[*model, *to_sentence_transformers(op)])  # doctest: +SKIP
    """
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ImportError(f"to_sentence_transformers needs torch ({e}); pip install 'bc_fast[train]'") from None
    from .st_adapter import st_modules

    return st_modules(op)


def load_sentence_transformer(path: Any, **kwargs: Any) -> Any:
    """Loads a saved SentenceTransformer that holds bc_fast adapters (checks its module types first)."""
    from .st_adapter import load_sentence_transformer as load

    return load(path, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "FusedModule":  # the torch class, built (and torch imported) on first access
        from .torch_module import _module_class

        return _module_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
