"""Evaluation: metrics (numpy), consumer tasks (torch, imported on use), retrieval and reports.

``bc_fast.eval.metrics`` and ``bc_fast.eval.report`` need only numpy (and matplotlib
for plots); ``bc_fast.eval.retrieval`` (legacy-index overlap, recall and retention)
needs faiss and ``bc_fast.eval.consumers`` torch: both are imported when first used.
It may import :mod:`bc_fast.index`, :mod:`bc_fast.store`, :mod:`bc_fast.data`, :mod:`bc_fast.engine`
and ``bc_fast._util``; never :mod:`bc_fast.train` or :mod:`bc_fast.fit`, which build on it.
"""

from .metrics import recall_at_k, roc_auc, roc_auc_macro

__all__ = ["recall_at_k", "roc_auc", "roc_auc_macro", "consumers", "report", "retrieval"]


def __getattr__(name: str):
    if name in ("consumers", "report", "retrieval"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
