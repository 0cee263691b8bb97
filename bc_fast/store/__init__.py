"""Storage: the version registry, its on-disk format, and embedding tables on disk.

What lives here: :class:`Registry` (versions, transforms, fused operators; locked, atomic,
checksummed writes; :mod:`.registry`, with its helpers :mod:`.transform_input`, :mod:`.registry_paths`
and :mod:`.registry_describe`), the manifest and safetensors transform format (:mod:`.manifest`; routed
transforms: :mod:`.routed_format`, and the fusion of a chain through one in :mod:`.routed_chain`), and
the streaming table readers and writers for ``.npy``, folders of ``.npy`` shards, Parquet and the
embedded vector stores (:mod:`.tables`, which picks the format; :mod:`.table_base`, :mod:`.npy`,
:mod:`.parquet`, :mod:`.lance`, :mod:`.chroma`, :mod:`.milvus`). It may import :mod:`bc_fast.engine`
and ``bc_fast._util`` only.
"""

from .manifest import RegistryError, TransformInfo, VersionInfo
from .registry import Registry, as_layers, show
from .tables import open_table

__all__ = ["Registry", "RegistryError", "TransformInfo", "VersionInfo", "as_layers", "open_table", "show"]
