"""Table conversion: whole embedding tables turned into an older version, out of core.

What lives here: the single-process pipeline (:mod:`.pipeline`: chunked reading, the fused operator,
journaled writing, resume, verification, publishing with a provenance sidecar), its GPU compute stage
(:mod:`.gpu`) and the Ray Data engine that runs it file by file across workers
(:mod:`.distributed`). It may import :mod:`bc_fast.store`, :mod:`bc_fast.engine` and
``bc_fast._util``; nothing here knows about training or indexes.
"""

from .pipeline import (DEFAULT_VERIFY_ROWS, SIDECAR_SUFFIX, ConvertResult, VerificationError, apply_to_table,
                       convert_table, default_verify_tol, operator_fingerprint, read_sidecar, registry_job,
                       sidecar_path)

__all__ = ["DEFAULT_VERIFY_ROWS", "SIDECAR_SUFFIX", "ConvertResult", "VerificationError", "apply_to_table",
           "convert_table", "default_verify_tol", "operator_fingerprint", "read_sidecar", "registry_job",
           "sidecar_path"]
