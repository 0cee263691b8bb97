"""bc_fast: backward-compatible embeddings, fused and fast.

Train embedding versions with backward transforms (``bc_fast.train``, needs torch),
fuse a chain of transforms into one operator, and apply it to batches with the
compiled core.

The package, by role (imports only go downward: cli -> experiments -> train / fit / eval ->
convert / index -> store / data -> engine -> _util):

- :mod:`bc_fast.engine`: :class:`FusedTransform`, :class:`Layer`, fusion, CPU and CUDA dispatch.
- :mod:`bc_fast.store`: the version registry and its on-disk format, table readers and writers.
- :mod:`bc_fast.convert`: table conversion (CPU, GPU, Ray Data); :mod:`bc_fast.index`: faiss legacy indexes.
- :mod:`bc_fast.train`, :mod:`bc_fast.fit`, :mod:`bc_fast.eval`, :mod:`bc_fast.data`: learning,
  post-hoc adapters, metrics and reports, real data sets.
- :mod:`bc_fast.experiments`: the paper's experiment and the demos; :mod:`bc_fast.bench`: the
  benchmark suite; :mod:`bc_fast.cli`: the ``bc-fast`` command.
"""

from ._util import moved_modules as _moved_modules
from ._util.core_import import check_core as _check_core

_check_core()
_moved_modules.install()

from .engine import FusedTransform, Layer, build_info, get_num_threads, set_num_threads  # noqa: E402

__version__ = "0.1.0"
__all__ = ["FusedTransform", "Layer", "build_info", "get_num_threads", "set_num_threads", "__version__"]
