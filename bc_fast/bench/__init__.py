"""The benchmark suite (``bc-fast bench``) and the harness the scripts in ``bench/`` share.

What lives here: :mod:`.harness` (round-robin timing with medians, preallocated buffers, the engines
compared against, machine facts, tables and charts) and :mod:`.suite` (bc_fast against numpy, torch
and faiss on every configuration, with its targets). The ``bench/*.py`` scripts are thin entry points
over these. It may import :mod:`bc_fast.index`, :mod:`bc_fast.engine` and ``bc_fast._util``.
"""
