"""join — inner equi-join of two tables on the GPU, four ways.

    from impl.join import make_operator
    result = make_operator("hash-cuda")(build_keys, probe_keys)   # JoinResult: matching (build row, probe row) pairs
    result.pairs()                                                  # host (total, 2) int64 array, sorted

  hash-numba       epoch-tagged bucketed hash table in numba-cuda (build / count+scan / write)  ``hash_numba.py``
  hash-cuda        the same kernels in CUDA C++ through CuPy, plus fused single launches and a   ``hash_cuda.py``
                   radix-partitioned scheme (shared-memory tables per partition); ``chains=True``
                   links duplicate build keys' rows behind one slot (many-to-many joins)
  tc-triton        hash partitions + bit-sliced ±1 keys compared by ``tl.dot`` in one pass      ``tc_triton.py``
  sortmerge-torch  torch.sort + searchsorted + duplicate expansion (GPU baseline)              ``sortmerge.py``
and host anchors (pandas, DuckDB, polars) in ``host.py``. Every operator returns a ``JoinResult`` (``common.py``).
``hash_table.py`` is the hash joins' shared host side; ``data.py`` the benches' and tests' tables; ``tune.py``
decides both GPU joins' designs on a GPU; ``ncu.py`` (Nsight Compute command line, CSV, attribution) and
``ncu_driver.py`` (the profiled process) serve ``recipe.py`` (profile and sweep as functions), whose command line is
``experiments.py``; ``compile_check.py`` builds the kernels for sm_90 without a GPU; ``claims.py`` holds the ledger
entries and failing cases, ``plots.py`` their figures and tables.
"""
from __future__ import annotations

from typing import Any

from impl.join.common import JoinResult

__all__ = ["IMPLS", "JoinResult", "make_operator"]

IMPLS = ("hash-numba", "hash-cuda", "tc-triton", "sortmerge-torch")


def make_operator(name: str, **config: Any):
    """A join operator by name; ``config`` goes to its config dataclass (HashConfig / TCConfig)."""
    if name == "hash-numba":
        from impl.join.hash_numba import HashConfig, HashJoinNumba

        return HashJoinNumba(HashConfig(**config))
    if name == "hash-cuda":
        from impl.join.hash_cuda import HashJoinCuda
        from impl.join.hash_numba import HashConfig

        return HashJoinCuda(HashConfig(**config))
    if name == "tc-triton":
        from impl.join.tc_triton import TCConfig, TensorCoreJoin

        return TensorCoreJoin(TCConfig(**config))
    if name == "sortmerge-torch":
        if config:
            raise TypeError(f"sortmerge-torch takes no config, got {sorted(config)}")
        from impl.join.sortmerge import SortMergeJoin

        return SortMergeJoin()
    raise ValueError(f"unknown join {name!r}; one of {IMPLS}")
