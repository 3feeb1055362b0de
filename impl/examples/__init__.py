"""Two tiny kernels, one Triton and one numba-cuda, that prove the CPU/GPU execution mechanism and the harness.

    from impl.examples import axpy, blocksum
    axpy(2.0, x, y)          # 2·x + y (torch tensors, float32/float16), computed in float32
    blocksum(a, 128)         # per-block sums of a 1-D numpy array, 128 threads per block

``axpy_triton.py`` and ``blocksum_numba.py`` hold each kernel, its wrapper and its float64/numpy reference;
``claims.py`` the ledger entries (axpy's bandwidth, the regression gate's proof) and their failing cases.
"""
import impl  # noqa: F401  (backend before triton)
from impl.examples.axpy_triton import axpy, axpy_reference
from impl.examples.blocksum_numba import blocksum, blocksum_reference

__all__ = ["axpy", "axpy_reference", "blocksum", "blocksum_reference"]
