"""The eight embedding-version strategies of the paper (Table 3) and their options."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Strategy", "STRATEGIES", "STRATEGY_NAMES", "get_strategy"]


@dataclass(frozen=True)
class Strategy:
    """How version k >= 1 is produced.

    Attributes
    ----------
    name : str
    model : {"fixed", "finetune", "fresh"}
        fixed: keep M_0; finetune: continue training M_{k-1}; fresh: train a new M_k.
    transform : {"identity", "truncate", "learned"}
        What B_k is: identity (same space), truncation to d_{k-1} (fixed) or learned.
    fit : {"none", "posthoc", "joint"}
        How B_k is fitted: not at all, after M_k is trained, or jointly with M_k.
    multi_step : bool
        Multi-step alignment loss (BC-Aligner) instead of single-step.
    description : str
    """

    name: str
    model: str
    transform: str
    fit: str
    multi_step: bool
    description: str

    @property
    def aligns(self) -> bool:
        """True if an alignment loss is used (joint or post hoc)."""
        return self.fit != "none"


_ALL = [
    Strategy("fix-m0", "fixed", "identity", "none", False, "train M_0 once and use it forever (no update)"),
    Strategy("nobc", "fresh", "truncate", "none", False,
             "train every M_k from scratch, no compatibility (consumers read the first d_0 dims)"),
    Strategy("finetune-m0", "finetune", "identity", "none", False, "keep fine-tuning M_0 on new data"),
    Strategy("posthoc-sloss", "fresh", "learned", "posthoc", False, "nobc models + B_k fitted afterwards, single-step loss"),
    Strategy("posthoc-mloss", "fresh", "learned", "posthoc", True, "nobc models + B_k fitted afterwards, multi-step loss"),
    Strategy("joint-notrans", "fresh", "truncate", "joint", False,
             "M_k trained so that its first d_{k-1} dims match M_{k-1} (B_k = truncation)"),
    Strategy("joint-sloss", "fresh", "learned", "joint", False, "M_k and B_k trained jointly, single-step loss"),
    Strategy("joint-mloss", "fresh", "learned", "joint", True, "BC-Aligner: M_k and B_k trained jointly, multi-step loss"),
]
STRATEGIES: dict[str, Strategy] = {s.name: s for s in _ALL}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)
_ALIASES = {"bc-aligner": "joint-mloss", "bcaligner": "joint-mloss", "train-once": "fix-m0",
            "posthoc-linear-sloss": "posthoc-sloss", "posthoc-linear-mloss": "posthoc-mloss",
            "joint-linear-sloss": "joint-sloss", "joint-linear-mloss": "joint-mloss",
            "joint-notrans-sloss": "joint-notrans"}


def get_strategy(name: str | Strategy) -> Strategy:
    """Look a strategy up by name (``bc-aligner`` is an alias of ``joint-mloss``).

    Raises
    ------
    ValueError
        If the name is unknown.
    """
    if isinstance(name, Strategy):
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGY_NAMES} (or 'bc-aligner')")
    return STRATEGIES[key]
