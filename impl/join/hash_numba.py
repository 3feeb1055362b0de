"""Hash join with numba-cuda kernels: open addressing (linear probing), per-key row chains, count -> scan -> write.

Table: ``capacity = max(64, next_pow2(ceil(n_build / load_factor)))`` slots, stored interleaved in one array of the
key dtype, ``table[2s] = key`` (-1 = empty) and ``table[2s+1] = head`` (position of the key's last-inserted build
row, -1 = none); ``table[2·cap+1]`` heads the side list of rows whose key *is* -1 (they never enter a slot, so the
empty marker is never ambiguous). ``nxt[i]`` chains build rows of equal keys (-1 ends a chain). Duplicate keys share
one slot, so heavy keys cost one atomic per row, not a probe sequence per row.

Kernels (THREADS threads per block; the same algorithm as ``hash_join.cu``, which this file twins on the CPU):
  build:  slot = mix32(key) & mask, linear probe; claim an empty slot with atomicCAS(key), then
          nxt[i] = atomicExch(head, i) pushes row i on the key's chain.
  count:  ITEMS consecutive probe rows per thread: find each row's chain head (stored in ``heads``), count the chain;
          per-thread counts -> per-block sums; the last block to finish (atomic ticket) scans the block sums into
          exclusive ``offsets`` and ``offsets[nblocks]`` = total, then resets the ticket.
  write:  block-exclusive scan of the per-thread counts + the block's offset = where each thread writes; walk the
          chains writing (build_rows[h], probe_rows[j]). Output order: probe order; within a probe row, chain order.
Bytes (1M x 1M int32, unique keys, ~50% hits): keys/rows read 16 MB, table 16 MB cleared, heads 4 MB written+read,
output 4 MB; every table access is a random 32-byte sector, mostly from L2 (the table fits in the 50 MB L2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import impl  # noqa: F401  (backend before numba)
import numpy as np
import torch
from numba import cuda

from impl import backend
from impl.join.common import EMPTY, HASH_MUL, Workspace, next_pow2, run_join

MAX_GRID = backend.sized(gpu=65535, cpu=8)  # the simulator runs every thread as an OS thread: keep grids short


@dataclass(frozen=True)
class HashConfig:
    """Hash-table and launch parameters shared by the numba and CUDA C++ hash joins."""

    load_factor: float = 0.5  # distinct keys / slots, before rounding the slot count up to a power of two
    threads: int = 256        # threads per block (a power of two)
    items: int = 4            # consecutive probe rows per thread in count/write

    def __post_init__(self) -> None:
        if not 0.0 < self.load_factor < 1.0:
            raise ValueError(f"load_factor must be in (0, 1), got {self.load_factor}")
        if self.threads < 32 or self.threads > 1024 or self.threads & (self.threads - 1):
            raise ValueError(f"threads must be a power of two in [32, 1024], got {self.threads}")
        if self.items < 1:
            raise ValueError(f"items must be >= 1, got {self.items}")

    def capacity(self, n_build: int) -> int:
        return max(64, next_pow2(math.ceil(n_build / self.load_factor)))

    def probe_blocks(self, n_probe: int) -> int:
        return math.ceil(n_probe / (self.threads * self.items))


@dataclass
class Built:
    table: torch.Tensor  # (2·cap + 2,) key dtype: interleaved (key, head) slots, then the side-list head
    nxt: torch.Tensor    # (n_build,) key dtype: next build row with the same key, -1 ends
    rows: torch.Tensor   # build row ids
    mask: int            # cap - 1
    wide: int            # 1 for int64 keys (hash folds the high word)


@dataclass
class Probed:
    built: Built
    heads: torch.Tensor          # (n_probe,) chain head per probe row, -1 = no match
    thread_counts: torch.Tensor  # (nblocks·threads,) int64 matches per thread
    offsets: torch.Tensor        # (nblocks + 1,) int64 exclusive output offset per block, then the total
    rows: torch.Tensor           # probe row ids
    total: int


def _make_kernels(threads: int, items: int) -> dict[str, Any]:
    from numba import int32, int64

    @cuda.jit(device=True)
    def slot_of(k, mask, wide):
        x = np.int64(k)
        if wide:
            x = x ^ (x >> 32)
        x = x & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * HASH_MUL) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * HASH_MUL) & 0xFFFFFFFF
        return ((x >> 16) ^ x) & mask

    @cuda.jit(device=True)
    def find_head(k, table, mask, wide):
        if k == EMPTY:
            return np.int64(table[table.size - 1])  # the side list of rows keyed -1
        s = slot_of(k, mask, wide)
        while True:
            kk = table[2 * s]
            if kk == k:
                return np.int64(table[2 * s + 1])
            if kk == EMPTY:
                return np.int64(EMPTY)
            s = (s + 1) & mask

    @cuda.jit(device=True)
    def block_exclusive_scan(sh, t, v):
        """(exclusive prefix of v over the block's threads, block total); Hillis-Steele in shared memory."""
        sh[t] = v
        cuda.syncthreads()
        d = 1
        while d < threads:  # uniform bound: every thread reaches every barrier
            x = sh[t - d] if t >= d else 0
            cuda.syncthreads()
            sh[t] += x
            cuda.syncthreads()
            d *= 2
        excl = sh[t] - v
        total = sh[threads - 1]
        cuda.syncthreads()  # sh is reused by the caller
        return excl, total

    @cuda.jit
    def hash_build_nb(keys, table, nxt, mask, wide):
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        side = table.size - 1
        while i < keys.size:
            k = keys[i]
            if k == EMPTY:
                nxt[i] = cuda.atomic.exch(table, side, i)
            else:
                s = slot_of(k, mask, wide)
                while True:
                    cur = table[2 * s]  # a stale EMPTY only costs a CAS; a claimed key never changes
                    if cur == EMPTY:
                        cur = cuda.atomic.cas(table, 2 * s, EMPTY, k)
                    if cur == EMPTY or cur == k:
                        nxt[i] = cuda.atomic.exch(table, 2 * s + 1, i)
                        break
                    s = (s + 1) & mask
            i += stride

    @cuda.jit
    def hash_count_nb(pkeys, table, nxt, mask, wide, heads, thread_counts, block_counts, offsets, done):
        sh = cuda.shared.array(threads, int64)
        last = cuda.shared.array(1, int32)
        t = cuda.threadIdx.x
        b = cuda.blockIdx.x
        g = b * threads + t
        c = 0
        for r in range(items):
            j = g * items + r
            if j < pkeys.size:
                h = find_head(pkeys[j], table, mask, wide)
                heads[j] = h
                while h != EMPTY:
                    c += 1
                    h = nxt[h]
        thread_counts[g] = c
        _, total = block_exclusive_scan(sh, t, c)
        if t == 0:
            block_counts[b] = total
            cuda.threadfence()  # publish this block's sum before taking a ticket
            ticket = cuda.atomic.add(done, 0, 1)
            last[0] = 1 if ticket == cuda.gridDim.x - 1 else 0
        cuda.syncthreads()
        if last[0] == 1:  # the last block to finish scans every block's sum
            cuda.threadfence()
            nblocks = cuda.gridDim.x
            chunk = (nblocks + threads - 1) // threads
            lo = min(t * chunk, nblocks)
            hi = min(lo + chunk, nblocks)
            s = 0
            for i in range(lo, hi):
                s += block_counts[i]
            run, grand = block_exclusive_scan(sh, t, s)
            for i in range(lo, hi):
                offsets[i] = run
                run += block_counts[i]
            if t == 0:
                offsets[nblocks] = grand
                done[0] = 0  # ready for the next launch

    @cuda.jit
    def hash_write_nb(heads, nxt, thread_counts, offsets, brows, prows, out_b, out_p):
        sh = cuda.shared.array(threads, int64)
        t = cuda.threadIdx.x
        b = cuda.blockIdx.x
        g = b * threads + t
        excl, _ = block_exclusive_scan(sh, t, thread_counts[g])
        o = offsets[b] + excl
        for r in range(items):
            j = g * items + r
            if j < heads.size:
                h = heads[j]
                pj = prows[j]
                while h != EMPTY:
                    out_b[o] = brows[h]
                    out_p[o] = pj
                    o += 1
                    h = nxt[h]

    return {"build": hash_build_nb, "count": hash_count_nb, "write": hash_write_nb}


_KERNELS: dict[tuple[int, int], dict[str, Any]] = {}


def kernels(config: HashConfig) -> dict[str, Any]:
    key = (config.threads, config.items)
    if key not in _KERNELS:
        _KERNELS[key] = _make_kernels(*key)
    return _KERNELS[key]


def as_numba(t: torch.Tensor) -> Any:
    """A zero-copy numba view of a tensor: a device array on the GPU, the numpy view under the simulator."""
    if t.is_cuda:
        if backend.SIMULATED:
            raise RuntimeError("numba runs in its simulator but the tensor is on the GPU; use LAB_BACKEND consistently")
        return cuda.as_cuda_array(t, sync=False)  # same (default) stream as torch: no sync needed
    if not backend.SIMULATED:
        raise RuntimeError(f"numba-cuda kernels need CUDA tensors on a GPU, got a tensor on {t.device}")
    return t.numpy()


class HashJoinNumba:
    """CUDA hash join written in numba-cuda (the default; the CPU twin of ``HashJoinCuda``)."""

    name = "hash-numba"

    def __init__(self, config: HashConfig = HashConfig()) -> None:
        self.config = config
        self.ws = Workspace()
        self._views: dict[int, tuple[torch.Tensor, Any]] = {}

    def _nb(self, t: torch.Tensor) -> Any:
        """``as_numba`` for workspace tensors, cached (the workspace hands out the same view objects again)."""
        hit = self._views.get(id(t))
        if hit is None or hit[0] is not t:
            if len(self._views) > 32:  # views of buffers the workspace has since replaced: let them go
                self._views.clear()
            hit = self._views[id(t)] = (t, as_numba(t))
        return hit[1]

    def build(self, keys: torch.Tensor, rows: torch.Tensor) -> Built:
        cap = self.config.capacity(keys.numel())
        table = self.ws.get("table", 2 * cap + 2, keys.dtype, keys.device)
        table.fill_(EMPTY)
        nxt = self.ws.get("nxt", keys.numel(), keys.dtype, keys.device)
        built = Built(table, nxt, rows, cap - 1, int(keys.dtype == torch.int64))
        n = keys.numel()
        if n:
            grid = min(math.ceil(n / self.config.threads), MAX_GRID)
            kernels(self.config)["build"][grid, self.config.threads](
                as_numba(keys), self._nb(table), self._nb(nxt), built.mask, built.wide)
        return built

    def probe(self, built: Built, keys: torch.Tensor, rows: torch.Tensor) -> Probed:
        cfg, n, dev = self.config, keys.numel(), keys.device
        nblocks = cfg.probe_blocks(n)
        heads = self.ws.get("heads", n, keys.dtype, dev)
        tcounts = self.ws.get("thread_counts", nblocks * cfg.threads, torch.int64, dev)
        offsets = self.ws.get("offsets", nblocks + 1, torch.int64, dev)
        if n == 0:
            return Probed(built, heads, tcounts, offsets, rows, 0)
        bcounts = self.ws.get("block_counts", nblocks, torch.int64, dev)
        done = self.ws.get("done", 1, torch.int32, dev, zeros=True)
        kernels(cfg)["count"][nblocks, cfg.threads](
            as_numba(keys), self._nb(built.table), self._nb(built.nxt), built.mask, built.wide, self._nb(heads),
            self._nb(tcounts), self._nb(bcounts), self._nb(offsets), self._nb(done))
        total = int(offsets[nblocks].item())  # the one host sync: the output size
        return Probed(built, heads, tcounts, offsets, rows, total)

    def materialize(self, probed: Probed, out_build: torch.Tensor, out_probe: torch.Tensor) -> None:
        cfg = self.config
        nblocks = cfg.probe_blocks(probed.heads.numel())
        kernels(cfg)["write"][nblocks, cfg.threads](
            self._nb(probed.heads), self._nb(probed.built.nxt), self._nb(probed.thread_counts),
            self._nb(probed.offsets), as_numba(probed.built.rows), as_numba(probed.rows), as_numba(out_build),
            as_numba(out_probe))

    def __call__(self, build_keys, probe_keys, build_rows=None, probe_rows=None, *, timed: bool = False):
        return run_join(self, build_keys, probe_keys, build_rows, probe_rows, timed=timed)


def hash_join_numba(build_keys, probe_keys, build_rows=None, probe_rows=None, *, config: HashConfig = HashConfig(),
                    timed: bool = False):
    """Inner equi-join with the numba hash join; returns a ``JoinResult`` (see ``impl.join.common``)."""
    return HashJoinNumba(config)(build_keys, probe_keys, build_rows, probe_rows, timed=timed)
