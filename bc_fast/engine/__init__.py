"""The engine: the compiled core's Python face, and nothing about files, registries or training.

What lives here: :class:`Layer` and its validation, :class:`FusedTransform` (a fused layer program
applied to batches by ``bc_fast._core``, GIL released), chain fusion and its float64 reference
(:mod:`.fusion`), the GPU path (:mod:`.cuda`: CUDA arrays handed to ``bc_fast._cuda``;
:mod:`.device`: a checked GPU and host rows applied there), threads and build info (:mod:`.runtime`).
It may import only the compiled modules and ``bc_fast._util``; every other subpackage builds on it.
"""

from .fusion import apply_layers_reference, chain_flops, flatten_chain, fuse_chain
from .layer import ACTIVATIONS, Layer, validate_layer
from .operator import PRECISIONS, FusedTransform
from .runtime import build_info, get_num_threads, set_num_threads

__all__ = ["ACTIVATIONS", "PRECISIONS", "FusedTransform", "Layer", "apply_layers_reference", "build_info",
           "chain_flops", "flatten_chain", "fuse_chain", "get_num_threads", "set_num_threads",
           "validate_layer"]
