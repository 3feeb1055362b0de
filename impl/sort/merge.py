"""Merge of two sorted runs of order keys on the device, decoding on the way out or not: the steps that finish a
sort whose plan stops at sorted runs (``build_cuda_plan(runs=...)``), so that the output comes out region by region.

    out[k] = decode(C[k]) (or C[k]),  C = merge(A, B),  A = a[0:na], B = b[0:nb], both ascending (order keys:
    ``impl.sort.keys``; descending sorts are ascending in their flipped keys), ties taken from A first.

A and B are separate arrays (views of two runs, in one buffer or two), so that a tree of merges can combine sorted runs
level by level between two buffers, the last level decoding into the output.
Merge path: the first k outputs hold i = diag(k) keys of A and k − i of B, where i is the least index in
[max(0, k − nb), min(k, na)] with A[i] > B[k − 1 − i] (a search). Block b of a launch writes outputs
[b·TILE, (b+1)·TILE) ∩ [0, na + nb), TILE = threads·items. A partition launch first finds diag at every block
boundary (a block each, all at once, its threads probing together: a few rounds of one load each), then each merge
block loads its A and B pieces (TILE keys together) into shared memory, each thread finds its own diagonal there
(a binary search) and merges ``items`` keys into registers, and the block writes them back through shared memory
so that consecutive threads store consecutive outputs. Blocks are independent: a launch may cover any range of them
(``merge_blocks``), e.g. those of one output region, whose download can then start while later regions merge.
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
    probes: int = 32    # threads narrowing one diagonal's search together (a probes-ary search)

    def __post_init__(self) -> None:
        if self.threads < 2 or self.threads & (self.threads - 1) or not 1 <= self.items <= 32:
            raise ValueError(f"threads must be a power of two >= 2 and items 1..32, got {self.threads} and "
                             f"{self.items}")
        if not 2 <= self.probes <= 1024:
            raise ValueError(f"probes must be in 2..1024, got {self.probes}")

    @property
    def tile(self) -> int:
        return self.threads * self.items


GPU_MERGE = MergeConfig()
SIM_MERGE = MergeConfig(threads=8, items=4, probes=3)  # the simulator runs one OS thread per CUDA thread
NO_DECODE = (np.int64(0), np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0), np.int64(0))  # an encoded merge's
# placeholder for ``enc`` (the kernel then never reads it; one argument type for both variants)
u32, u64 = numba.uint32, numba.uint64  # indices: unsigned (no negative-index wraparound code), 32-bit within a block


def default_merge_config() -> MergeConfig:
    return SIM_MERGE if numba_config.ENABLE_CUDASIM else GPU_MERGE


@cuda.jit(device=True, inline=True)
def diagonal_shared(sh, ca, cnt, d):
    """Keys of A = sh[0:ca] among the first d outputs of merge(A, sh[ca:cnt]) (uint32 throughout)."""
    nb = cnt - ca
    lo = d - nb if d > nb else u32(0)
    hi = d if d < ca else ca
    while lo < hi:
        mid = (lo + hi) >> u32(1)
        if sh[mid] <= sh[ca + d - u32(1) - mid]:
            lo = mid + u32(1)
        else:
            hi = mid
    return lo


@functools.cache
def partition_kernel(probes: int):
    """Block j of the partition launch (``probes`` threads): diags[j] = diag(k), k = min(j·tile, na + nb), the least
    i in [max(0, k − nb), min(k, na)] with a[i] > b[k − 1 − i] (else the upper end). Each round the threads test
    ``probes`` evenly spaced i at once and keep the gap between the last false and the first true test: a
    probes-ary search, ~log_probes(n) rounds of one global load each instead of log2(n)."""

    @cuda.jit
    def kernel(a, na, b, nb, tile, diags):
        flags = cuda.shared.array(probes, numba.boolean)
        bounds = cuda.shared.array(2, numba.uint64)
        j = u64(cuda.blockIdx.x)
        t = u64(cuda.threadIdx.x)
        nau, nbu = u64(na), u64(nb)
        k = min(j * u64(tile), nau + nbu)
        lo = k - nbu if k > nbu else u64(0)
        hi = k if k < nau else nau
        while lo < hi:
            step = (hi - lo + u64(probes - 1)) // u64(probes)
            i = lo + t * step
            flags[t] = i >= hi or a[i] > b[k - u64(1) - i]
            cuda.syncthreads()
            if t == u64(0):
                new_lo, new_hi = lo, hi
                for s in range(probes):
                    at = lo + u64(s) * step
                    if at >= hi or flags[s]:
                        new_hi = min(at, hi)
                        break
                    new_lo = at + u64(1)
                bounds[0], bounds[1] = new_lo, new_hi
            cuda.syncthreads()
            lo, hi = bounds[0], bounds[1]
            cuda.syncthreads()
        if t == u64(0):
            diags[j] = lo

    return kernel


@functools.cache
def merge_kernel(key_dtype: np.dtype, out_dtype: np.dtype, threads: int, items: int, decode: bool = True):
    """The merge kernel for order keys of ``key_dtype`` (uint32/uint64) into outputs viewed as ``out_dtype``
    (``decode``: the unsigned view of the sorted dtype; else ``key_dtype``, the keys left encoded); block j's ends
    are diags[j] and diags[j + 1]."""
    key_t, out_t = numba.from_dtype(np.dtype(key_dtype)), numba.from_dtype(np.dtype(out_dtype))
    tile = threads * items

    @cuda.jit
    def kernel(a, na, b, nb, diags, out, enc, first_block):
        sh = cuda.shared.array(tile, key_t)
        t = u32(cuda.threadIdx.x)
        blk = u64(first_block) + u64(cuda.blockIdx.x)
        lo = blk * u64(tile)
        hi = min(lo + u64(tile), u64(na) + u64(nb))
        a0, a1 = u64(diags[blk]), u64(diags[blk + u64(1)])
        cnt = u32(hi - lo)
        ca = u32(min(a1 - a0, u64(cnt))) if a1 > a0 else u32(0)  # A's keys here: sh[0:ca], B's: sh[ca:cnt]
        # (the clamp only matters for unsorted input, whose output is wrong anyway: it keeps every access in bounds)
        b0 = lo - a0
        q = t
        while q < cnt:
            sh[q] = a[a0 + u64(q)] if q < ca else b[b0 + u64(q - ca)]
            q += u32(threads)
        cuda.syncthreads()
        d = min(t * u32(items), cnt)
        i = diagonal_shared(sh, ca, cnt, d)  # this thread's split of the block's A and B pieces
        j = ca + d - i
        reg = cuda.local.array(items, key_t)
        for q in range(items):
            if i < ca and (j >= cnt or sh[i] <= sh[j]):
                reg[q] = sh[i]
                i += u32(1)
            elif j < cnt:
                reg[q] = sh[j]
                j += u32(1)
        cuda.syncthreads()
        for q in range(items):
            if d + u32(q) < cnt:
                sh[d + u32(q)] = reg[q]
        cuda.syncthreads()
        q = t
        while q < cnt:
            if decode:
                out[lo + u64(q)] = out_t(decode_key(u64(sh[q]), enc))
            else:
                out[lo + u64(q)] = sh[q]
            q += u32(threads)

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


def launch_partition(a, na: int, b, nb: int, diags, *, stream=0, config: MergeConfig | None = None) -> None:
    """Enqueue the diagonals of every merge block of ``a[0:na]`` and ``b[0:nb]`` into ``diags`` (int64,
    ``partition_slots(na + nb)`` long): a block's cooperative search per diagonal (``partition_kernel``), all at
    once, so the merge blocks wait for none."""
    config = config or default_merge_config()
    check_runs(a, na, b, nb)
    if diags.shape[0] != partition_slots(na + nb, config):
        raise ValueError(f"diags holds {diags.shape[0]} slots; a merge of {na + nb} outputs in tiles of {config.tile} "
                         f"needs {partition_slots(na + nb, config)}")
    partition_kernel(config.probes)[diags.shape[0], config.probes, stream](a, np.int64(na), b, np.int64(nb),
                                                                           np.int64(config.tile), diags)


def launch_merge(a, na: int, b, nb: int, diags, out, enc: tuple | None, *, lo: int = 0, hi: int | None = None,
                 stream=0, config: MergeConfig | None = None) -> None:
    """Enqueue the merge of ``a[0:na]`` and ``b[0:nb]`` (sorted order keys, from ``device_view``) into ``out``:
    decoded with ``enc`` (``KeyFormat.params``) into the unsigned view of the output, or (``enc`` None) left encoded in
    an array of the keys' dtype; the blocks of ``merge_blocks(lo, hi)``, their diagonals from ``launch_partition``
    into ``diags`` (enqueued before)."""
    config = config or default_merge_config()
    n = na + nb
    hi = n if hi is None else hi
    check_runs(a, na, b, nb)
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"need 0 <= lo <= hi <= na + nb, got lo={lo}, hi={hi}, na + nb={n}")
    if out.shape[0] < n:
        raise ValueError(f"out holds {out.shape[0]} keys, the merge writes {n}")
    first, blocks = merge_blocks(lo, hi, config)
    if blocks == 0:
        return
    decode = enc is not None
    if not decode and np.dtype(out.dtype) != np.dtype(a.dtype):
        raise TypeError(f"an encoded merge writes keys of {np.dtype(a.dtype)}, not {np.dtype(out.dtype)}")
    kernel = merge_kernel(np.dtype(a.dtype), np.dtype(out.dtype), config.threads, config.items, decode)
    kernel[blocks, config.threads, stream](a, np.int64(na), b, np.int64(nb), diags, out,
                                          enc if decode else NO_DECODE, np.int64(first))


def check_runs(a, na: int, b, nb: int) -> None:
    """Refuse run lengths outside their arrays and runs of different key dtypes."""
    if not 0 <= na <= a.shape[0] or not 0 <= nb <= b.shape[0]:
        raise ValueError(f"need 0 <= na <= len(a) and 0 <= nb <= len(b), got na={na} of {a.shape[0]}, "
                         f"nb={nb} of {b.shape[0]}")
    if np.dtype(a.dtype) != np.dtype(b.dtype):
        raise TypeError(f"a and b must hold keys of one dtype, got {np.dtype(a.dtype)} and {np.dtype(b.dtype)}")


def merge_sorted(a: np.ndarray, b: np.ndarray, *, descending: bool = False,
                 config: MergeConfig | None = None) -> np.ndarray:
    """Host convenience (tests): the values of sorted ``a`` and ``b`` (same dtype, each in the sort's order for
    ``descending``) merged through the kernel, as a new array."""
    fmt = key_format(a.dtype)
    if b.dtype != a.dtype:
        raise TypeError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    n = a.size + b.size
    out = np.empty(n, dtype=fmt.dtype)
    if n == 0:
        return out
    config = config or default_merge_config()
    d_a, d_b = (cuda.to_device(encode_np(r, descending=descending).astype(fmt.key_dtype)) for r in (a, b))
    d_out = cuda.device_array(n, dtype=fmt.bits_dtype)
    diags = cuda.device_array(partition_slots(n, config), dtype=np.int64)
    launch_partition(d_a, a.size, d_b, b.size, diags, config=config)
    launch_merge(d_a, a.size, d_b, b.size, diags, d_out, fmt.params(descending=descending, canon_zero=False),
                 config=config)
    return d_out.copy_to_host().view(fmt.dtype)


def merge_reference(a: np.ndarray, b: np.ndarray, *, descending: bool = False) -> np.ndarray:
    """CPU reference of ``merge_sorted``: the keys-only sort of both (``impl.sort.reference``'s order)."""
    from impl.sort.reference import sort_reference

    return sort_reference(np.concatenate([a, b]), descending=descending)
