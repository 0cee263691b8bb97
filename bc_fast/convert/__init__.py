"""Table conversion: whole embedding tables turned into an older version, out of core.

What lives here, one module per stage of a conversion, each importing only the ones below it:
:mod:`.pipeline` (the entry points :func:`apply_to_table` and :func:`convert_table`, and the CPU
pipeline that reads, computes and writes chunks), :mod:`.publish` (the atomic rename into place, the
sidecar, the overwrite rules), :mod:`.job` (what is converted and how it is checked: the plan, the
sidecar's content, verification, the registry's operator and provenance) and :mod:`.journal` (the
journal and the checksums that make a killed run resumable); beside them the GPU compute stage
(:mod:`.gpu`) and the Ray Data engine that runs the pipeline file by file across workers
(:mod:`.distributed`, with the dataset's own journal and publishing in :mod:`.dataset`). How a run
works is told in :mod:`.pipeline`. The package may import :mod:`bc_fast.store`, :mod:`bc_fast.engine`
and ``bc_fast._util``; nothing here knows about training or indexes.
"""

from .job import (DEFAULT_VERIFY_ROWS, SIDECAR_SUFFIX, ConvertResult, VerificationError, default_verify_tol,
                  operator_fingerprint, read_sidecar, registry_job, sidecar_path)
from .pipeline import apply_to_table, convert_table

__all__ = ["DEFAULT_VERIFY_ROWS", "SIDECAR_SUFFIX", "ConvertResult", "VerificationError", "apply_to_table",
           "convert_table", "default_verify_tol", "operator_fingerprint", "read_sidecar", "registry_job",
           "sidecar_path"]
