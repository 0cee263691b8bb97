"""The benchmark suite (``bc-fast bench``) and the harness the scripts in ``bench/`` share.

What lives here: the harness (:mod:`.timing`: round-robin timing with medians; :mod:`.machine`: the
engines compared against and machine facts; :mod:`.report`: tables and charts; :mod:`.harness`:
preallocated buffers, checks against targets, and one import point for all of it) and :mod:`.suite`
(bc_fast against numpy, torch and faiss on every configuration, with its targets). The ``bench/*.py``
scripts are thin entry points over these. It may import :mod:`bc_fast.index`, :mod:`bc_fast.engine`
and ``bc_fast._util``.
"""
