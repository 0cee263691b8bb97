"""bc_fast: backward-compatible embeddings, fused and fast.

Train embedding versions with backward transforms (``bc_fast.train``, needs torch),
fuse a chain of transforms into one operator, and apply it to batches with the
compiled core.
"""

from .ops import FusedTransform, Layer, build_info, get_num_threads, set_num_threads

__version__ = "0.1.0"
__all__ = ["FusedTransform", "Layer", "build_info", "get_num_threads", "set_num_threads", "__version__"]
