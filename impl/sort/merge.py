"""Merge of two sorted runs of order keys on the device, decoding on the way out: the step that finishes a sort whose
plan stops at sorted runs (``build_cuda_plan(runs=...)``), so that the output comes out region by region.

    out[k] = decode(C[k]),  C = merge(A, B),  A = keys[0:na], B = keys[na:n], both ascending (order keys:
    ``impl.sort.keys``; descending sorts are ascending in their flipped keys), ties taken from A first.

Merge path: the first k outputs hold i = diag(k) keys of A and k − i of B, where i is the least index in
[max(0, k − |B|), min(k, |A|)] with A[i] > B[k − 1 − i] (a binary search). Block b of a launch writes outputs
[b·TILE, (b+1)·TILE) ∩ [0, n), TILE = threads·items. A partition launch first finds diag at every block boundary
(one thread each, all at once: one search's latency in all), then each merge block loads its A and B pieces (TILE
keys together) into shared memory, each thread finds its own diagonal there and merges ``items`` keys into
registers, and the block writes them back through shared memory so that consecutive threads store consecutive
outputs. Blocks are independent: a launch may cover any range of them (``merge_blocks``),
e.g. those of one output region, whose download can then start while later regions merge.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import impl  # noqa: F401  (backend before numba)
import numba
import numpy as np
from numba import config as numba_config
from numba import cuda

from impl.sort.keys import decode_key, encode_np, key_format


@dataclass(frozen=True)
class MergeConfig:
    threads: int = 256  # per block
    items: int = 8      # outputs per thread

    def __post_init__(self) -> None:
        if self.threads < 2 or self.threads & (self.threads - 1) or not 1 <= self.items <= 32:
            raise ValueError(f"threads must be a power of two >= 2 and items 1..32, got {self.threads} and "
                             f"{self.items}")

    @property
    def tile(self) -> int:
        return self.threads * self.items


GPU_MERGE = MergeConfig()
SIM_MERGE = MergeConfig(threads=8, items=4)  # the simulator runs one OS thread per CUDA thread


def default_merge_config() -> MergeConfig:
    return SIM_MERGE if numba_config.ENABLE_CUDASIM else GPU_MERGE


@cuda.jit(device=True, inline=True)
def diagonal(keys, na, n, k):
    """Keys of A = keys[0:na] among the first k outputs of merge(A, keys[na:n])."""
    lo = max(0, k - (n - na))
    hi = min(k, na)
    while lo < hi:
        mid = (lo + hi) // 2
        if keys[mid] <= keys[na + k - 1 - mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit
def partition_kernel(keys, na, n, tile, diags):
    """diags[b] = diag(min(b·tile, n)) for b = 0..len(diags)−1: where every merge block starts and ends."""
    b = cuda.grid(1)
    if b < diags.shape[0]:
        diags[b] = diagonal(keys, na, n, min(b * tile, n))


@functools.cache
def merge_kernel(key_dtype: np.dtype, out_dtype: np.dtype, threads: int, items: int):
    """The merge kernel for order keys of ``key_dtype`` (uint32/uint64) into outputs viewed as ``out_dtype``
    (the unsigned view of the sorted dtype); block b's ends are diags[b] and diags[b + 1]."""
    key_t, out_t = numba.from_dtype(np.dtype(key_dtype)), numba.from_dtype(np.dtype(out_dtype))
    tile = threads * items

    @cuda.jit
    def kernel(keys, na, n, diags, out, enc, first_block):
        sh = cuda.shared.array(tile, key_t)
        t = cuda.threadIdx.x
        blk = first_block + cuda.blockIdx.x
        lo = blk * tile
        hi = min(lo + tile, n)
        a0 = diags[blk]
        cnt = hi - lo
        ca = min(max(diags[blk + 1] - a0, 0), cnt)  # A's keys among this block's outputs: sh[0:ca], B's: sh[ca:cnt]
        # (the clamp only matters for unsorted input, whose output is wrong anyway: it keeps every access in bounds)
        b0 = na + lo - a0
        for q in range(t, cnt, threads):
            sh[q] = keys[a0 + q] if q < ca else keys[b0 + q - ca]
        cuda.syncthreads()
        d = min(t * items, cnt)
        i = diagonal(sh, ca, cnt, d)  # this thread's split of the block's A and B pieces
        j = ca + d - i
        reg = cuda.local.array(items, key_t)
        for q in range(items):
            if i < ca and (j >= cnt or sh[i] <= sh[j]):
                reg[q] = sh[i]
                i += 1
            elif j < cnt:
                reg[q] = sh[j]
                j += 1
        cuda.syncthreads()
        for q in range(items):
            if d + q < cnt:
                sh[d + q] = reg[q]
        cuda.syncthreads()
        for q in range(t, cnt, threads):
            out[lo + q] = out_t(decode_key(numba.uint64(sh[q]), enc))

    return kernel


def device_view(a):
    """``a`` as the merge kernel takes it: itself under the simulator (numpy or simulator arrays), else a numba view
    of any ``__cuda_array_interface__`` array (a CuPy workspace) that never synchronizes a stream (graph capture)."""
    if numba_config.ENABLE_CUDASIM or cuda.is_cuda_array(a) and hasattr(a, "copy_to_host"):
        return a
    return cuda.as_cuda_array(a, sync=False)


def merge_blocks(lo: int, hi: int, config: MergeConfig) -> tuple[int, int]:
    """(first block, blocks): the blocks whose first output lies in [lo, hi). Launches over consecutive ranges from 0
    write every output once, and once those up to [lo, hi) are done, outputs [0, hi) are written."""
    first = -(-lo // config.tile)
    return first, max(-(-hi // config.tile) - first, 0)


def partition_slots(n: int, config: MergeConfig) -> int:
    """Length of the diagonal array of a merge of n outputs: one per block and one for the end."""
    return -(-n // config.tile) + 1


def launch_partition(keys, na: int, n: int, diags, *, stream=0, config: MergeConfig | None = None) -> None:
    """Enqueue the diagonals of every merge block of ``keys[0:na]`` and ``keys[na:n]`` into ``diags`` (int64,
    ``partition_slots(n)`` long): one binary search per block, all at once, so the merge blocks wait for none."""
    config = config or default_merge_config()
    if not 0 <= na <= n:
        raise ValueError(f"need 0 <= na <= n, got na={na}, n={n}")
    if diags.shape[0] != partition_slots(n, config):
        raise ValueError(f"diags holds {diags.shape[0]} slots; a merge of {n} outputs in tiles of {config.tile} "
                         f"needs {partition_slots(n, config)}")
    threads = 128
    partition_kernel[-(-diags.shape[0] // threads), threads, stream](keys, np.int64(na), np.int64(n),
                                                                     np.int64(config.tile), diags)


def launch_merge(keys, na: int, n: int, diags, out_bits, enc: tuple, *, lo: int = 0, hi: int | None = None,
                 stream=0, config: MergeConfig | None = None) -> None:
    """Enqueue the merge of ``keys[0:na]`` and ``keys[na:n]`` (sorted order keys, from ``device_view``) into
    ``out_bits`` (the unsigned view of the output), decoding with ``enc`` (``KeyFormat.params``): the blocks of
    ``merge_blocks(lo, hi)``, their diagonals from ``launch_partition`` into ``diags`` (enqueued before)."""
    config = config or default_merge_config()
    hi = n if hi is None else hi
    if not 0 <= na <= n or not 0 <= lo <= hi <= n:
        raise ValueError(f"need 0 <= na <= n and 0 <= lo <= hi <= n, got na={na}, n={n}, lo={lo}, hi={hi}")
    first, blocks = merge_blocks(lo, hi, config)
    if blocks == 0:
        return
    kernel = merge_kernel(np.dtype(keys.dtype), np.dtype(out_bits.dtype), config.threads, config.items)
    kernel[blocks, config.threads, stream](keys, np.int64(na), np.int64(n), diags, out_bits, enc, np.int64(first))


def merge_sorted(a: np.ndarray, b: np.ndarray, *, descending: bool = False,
                 config: MergeConfig | None = None) -> np.ndarray:
    """Host convenience (tests): the values of sorted ``a`` and ``b`` (same dtype, each in the sort's order for
    ``descending``) merged through the kernel, as a new array."""
    fmt = key_format(a.dtype)
    if b.dtype != a.dtype:
        raise TypeError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    keys = np.concatenate([encode_np(a, descending=descending), encode_np(b, descending=descending)])
    keys = keys.astype(fmt.key_dtype)
    n = keys.size
    out = np.empty(n, dtype=fmt.dtype)
    if n == 0:
        return out
    config = config or default_merge_config()
    d_keys = cuda.to_device(keys)
    d_out = cuda.device_array(n, dtype=fmt.bits_dtype)
    diags = cuda.device_array(partition_slots(n, config), dtype=np.int64)
    launch_partition(d_keys, a.size, n, diags, config=config)
    launch_merge(d_keys, a.size, n, diags, d_out, fmt.params(descending=descending, canon_zero=False), config=config)
    return d_out.copy_to_host().view(fmt.dtype)


def merge_reference(a: np.ndarray, b: np.ndarray, *, descending: bool = False) -> np.ndarray:
    """CPU reference of ``merge_sorted``: the keys-only sort of both (``impl.sort.reference``'s order)."""
    from impl.sort.reference import sort_reference

    return sort_reference(np.concatenate([a, b]), descending=descending)
