"""Post-hoc adapters between embedding versions, fitted from paired embeddings.

Given the same items embedded by two models (``X_src`` (n, d_src), ``X_dst`` (n, d_dst)),
fit a map ``X_src -> X_dst``: backward (new -> old, to query old indexes and feed old
consumers) or forward (old -> new). Every adapter follows scikit-learn's conventions
(``fit`` returns self, fitted attributes end in ``_``, ``get_params``/``set_params``),
transforms float32 through the compiled core, and exports a layer program that
:meth:`bc_fast.store.Registry.add_transform` stores and fuses with other transforms.

========== ==================================================== ================== =====
kind       map                                                  how                torch
========== ==================================================== ================== =====
ridge      ``W x + b``                                          closed form, f64   no
procrustes ``Q (x - m_x) + m_y``, Q a partial isometry          SVD, f64           no
lowrank    ``U V x + b`` (reduced-rank ridge)                   closed form, f64   no
mlp        ``P x + W2 gelu(W1 x + b1) + b``                     Adam, early stop   yes
local      ``sum_j w_j (A_cj x + b_cj)``, top-m of k clusters  k-means + closed   no
           (routed, :mod:`bc_fast.fit._routing`)                form per cluster
auto       the best kind on validation rows: neighbour          all of the above
           overlap@10 (default), label precision, or MSE
========== ==================================================== ================== =====

The closed-form kinds need only float64 sums of the pairs, so :func:`fit_streaming` and
:func:`fit_streaming_npy` fit them from chunks without ever holding all pairs. The
validation rows are chosen by a hash of the row index: streaming and in-memory fits agree.
The local kind streams too, in two passes over re-iterable chunks (k-means and its settings on a
bounded sample, then per-cluster sums of all rows): :meth:`LocalAdapter.fit_chunks`.

It may import :mod:`bc_fast.train` (the residual MLP module), :mod:`bc_fast.eval` (neighbour
overlap), :mod:`bc_fast.index`, :mod:`bc_fast.store`, :mod:`bc_fast.engine` and ``bc_fast._util``.

>>> est = RidgeAdapter().fit(X_new, X_old)             # doctest: +SKIP
>>> fit_metrics(est, X_new_val, X_old_val)             # doctest: +SKIP
>>> registry.add_transform(2, 1, est, fit_metrics=...)  # doctest: +SKIP
"""

from ._auto import KINDS, AutoAdapter, fit_adapter, make_adapter
from ._base import BaseAdapter, NotFittedError
from ._estimators import LowRankAdapter, ProcrustesAdapter, RidgeAdapter
from ._gram import PairStats, accumulate_pairs, val_mask
from ._local import LocalAdapter
from ._metrics import fit_metrics, label_precision, neighbour_overlap
from ._mlp import MLPAdapter
from ._registry import fit_to_registry, format_fit_table
from ._routing import RoutedParams, routed_reference
from ._streaming import fit_streaming, fit_streaming_npy, npy_pair_chunks

__all__ = [
    "KINDS", "AutoAdapter", "BaseAdapter", "LocalAdapter", "LowRankAdapter", "MLPAdapter", "NotFittedError",
    "PairStats", "ProcrustesAdapter", "RidgeAdapter", "RoutedParams", "accumulate_pairs", "fit_adapter", "fit_metrics",
    "fit_streaming", "fit_streaming_npy", "fit_to_registry", "format_fit_table", "label_precision", "make_adapter",
    "neighbour_overlap", "npy_pair_chunks", "routed_reference", "val_mask",
]
