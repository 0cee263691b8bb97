"""faiss indexes for legacy versions, served from the latest embeddings.

What lives here: :class:`LegacyIndex` and :func:`build_legacy_index` (an index of version j built
from the latest table through the fused chain, queried with latest-version queries; saved with a
checksummed sidecar, :mod:`.sidecar`), faiss helpers (BLAS threshold, ``LinearTransform`` export,
array checks) in :mod:`.faiss_utils`, IVF indexes built shard by shard, on Ray or in one process,
in :mod:`.sharded`, and legacy search of a converted LanceDB table with latest-version queries
(:class:`~bc_fast.index.lance_search.LanceLegacyTable`; lancedb is imported only when it is used).
It may import :mod:`bc_fast.convert` (converted datasets' sidecars), :mod:`bc_fast.store`,
:mod:`bc_fast.engine` and ``bc_fast._util``.
"""

from .faiss_utils import (DEFAULT_BLAS_MIN_QUERIES, blas_threshold, blas_threshold_for, faiss_linear_transform,
                          faiss_metric, set_blas_threshold)
from .lance_search import LanceLegacyTable
from .legacy import LegacyIndex, build_legacy_index, export_faiss_pretransform

__all__ = ["DEFAULT_BLAS_MIN_QUERIES", "LanceLegacyTable", "LegacyIndex", "blas_threshold", "blas_threshold_for",
           "build_legacy_index", "export_faiss_pretransform", "faiss_linear_transform", "faiss_metric",
           "set_blas_threshold"]
