"""Evaluation: metrics (numpy), consumer tasks (torch, imported on use) and reports.

``bc_fast.eval.metrics`` and ``bc_fast.eval.report`` need only numpy (and matplotlib
for plots); ``bc_fast.eval.consumers`` needs torch and is imported when first used.
"""

from .metrics import recall_at_k, roc_auc, roc_auc_macro

__all__ = ["recall_at_k", "roc_auc", "roc_auc_macro", "consumers", "report"]


def __getattr__(name: str):
    if name in ("consumers", "report"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
