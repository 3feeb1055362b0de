"""Per-block sums with a shared-memory tree reduction in numba-cuda (runs under NUMBA_ENABLE_CUDASIM=1 in CI).

out[b] = Σ x[b·T : (b+1)·T] for T threads per block; x is 1-D float32/float64/int32/int64 of n elements; out has
ceil(n / T) elements of x's dtype (integers accumulate in int64, then cast back).
"""
from __future__ import annotations

import math

import impl  # noqa: F401  (backend before numba)
import numpy as np
from numba import cuda

THREADS = 128


def _make_kernel(threads: int, acc_dtype):
    @cuda.jit
    def blocksum_kernel(x, out):
        buf = cuda.shared.array(shape=threads, dtype=acc_dtype)
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * threads + tid
        buf[tid] = x[i] if i < x.size else 0  # pad the tail block with zeros
        cuda.syncthreads()
        stride = threads // 2
        while stride > 0:
            if tid < stride:
                buf[tid] += buf[tid + stride]
            cuda.syncthreads()  # every thread reaches this: the loop bound is uniform
            stride //= 2
        if tid == 0:
            out[cuda.blockIdx.x] = buf[0]

    return blocksum_kernel


_KERNELS: dict[tuple[int, str], object] = {}


def blocksum(x: np.ndarray, threads: int = THREADS) -> np.ndarray:
    """Host wrapper: copies x to the device, launches ceil(n/threads) blocks, returns the sums on the host."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64, np.int32, np.int64):
        raise TypeError(f"unsupported dtype {x.dtype}; use float32, float64, int32 or int64")
    if threads & (threads - 1):
        raise ValueError(f"threads must be a power of two, got {threads}")
    blocks = math.ceil(x.size / threads)
    if blocks == 0:
        return np.zeros(0, dtype=x.dtype)
    acc = np.float64 if x.dtype.kind == "f" else np.int64
    key = (threads, np.dtype(acc).name)
    if key not in _KERNELS:
        from numba import from_dtype

        _KERNELS[key] = _make_kernel(threads, from_dtype(np.dtype(acc)))
    d_out = cuda.device_array(blocks, dtype=acc)
    _KERNELS[key][blocks, threads](cuda.to_device(x), d_out)
    return d_out.copy_to_host().astype(x.dtype)


def blocksum_reference(x: np.ndarray, threads: int = THREADS) -> np.ndarray:
    pad = (-x.size) % threads
    acc = np.float64 if x.dtype.kind == "f" else np.int64
    return np.concatenate([x.astype(acc), np.zeros(pad, acc)]).reshape(-1, threads).sum(axis=1).astype(x.dtype)
