"""Hash join with numba-cuda kernels: ``hash_join.cu``'s algorithm in numba (its CPU twin, run by the same tests).

The table, the phases and the host protocol are ``hash_table``'s (read its module doc and ``hash_join.cu``):
  build:  per build row, the first bucket with an empty slot along its double-hashing sequence; CAS the slot's tag
          (epoch << shift | position), then store the key.
  count:  tiles of THREADS * ITEMS probe rows (row r * THREADS + t of a tile on thread t); per row a head (-1 none,
          the build position of a single match, -2 several), per thread a count, per tile a total; the last block
          to finish (atomic ticket) scans the tile totals into offsets and publishes the total in state[0].
  write:  block scan of the thread counts + the tile offset; pairs staged in shared memory a window of TILE pairs at
          a time and copied out contiguously; places >= capacity are skipped.
  linear64 (int32 keys; int64 keys with ``linear_wide``): lbuild, one row per thread, along the linear sequence (a
          bucket's slots, then the next bucket): int32 keys CAS the whole 64-bit slot on the table's int64 view,
          int64 keys CAS the slot's tag word, then store its key; lprobe counts a row's matches up to the first
          empty slot, reserves its pairs with one atomic add (the C++ kernel reserves per warp) and writes them.
The table words are the C++ layout viewed as the key dtype: word 2s = key, word 2s + 1 = tag (int32 tables hold the
tag's bit pattern, int64 tables the tag in the low half and a zero pad above). The fused single-launch scheme needs
co-resident blocks, which the simulator does not have: it runs in the C++ emulation only (``hash_join_emulated.cpp``).
The partitioned scheme has no numba twin: asked for it, this backend runs linear64 (``HashJoinBase._linear``); its
C++ kernels are checked under the emulation.
"""
from __future__ import annotations

import math
from typing import Any

import impl  # noqa: F401  (backend before numba)
import numpy as np
import torch
from numba import cuda

from impl import backend
from impl.join.common import HASH_MUL
from impl.join.hash_table import (HEAD_MANY, HEAD_NONE, STEP_SALT, Built, HashConfig, HashJoinBase, Probed,
                                  plan_layout)

MAX_GRID = backend.sized(gpu=65535, cpu=8)  # the simulator runs every thread as an OS thread: keep grids short
__all__ = ["HashJoinNumba", "HashConfig", "hash_join_numba", "kernels", "plan_layout"]


def _make_kernels(threads: int, items: int) -> dict[str, Any]:
    from numba import int32, int64

    tile = threads * items

    @cuda.jit(device=True)
    def mix32(x):
        x = (((x >> 16) ^ x) * HASH_MUL) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * HASH_MUL) & 0xFFFFFFFF
        return (x >> 16) ^ x

    @cuda.jit(device=True)
    def hash_of(k, wide):
        x = np.int64(k)
        if wide:
            x = x ^ (x >> 32)
        return mix32(x & 0xFFFFFFFF)

    @cuda.jit(device=True)
    def first_bucket(h, nb):
        return (h * nb) >> 32  # h < 2**32 and nb < 2**31: the product fits in int64

    @cuda.jit(device=True)
    def bucket_step(h, nb):
        return 1 + mix32((h ^ STEP_SALT) & 0xFFFFFFFF) % (nb - 1)

    @cuda.jit(device=True)
    def tag_at(table, slot):
        return np.int64(table[2 * slot + 1]) & 0xFFFFFFFF

    @cuda.jit(device=True)
    def word(v, wide):
        """A tag as the table word that holds it (int32 tables: the signed bit pattern)."""
        if not wide and v >= 2147483648:
            return v - 4294967296
        return v

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
    def hash_build_nb(keys, table, nb, slots, shift, epoch, wide, state):
        t = cuda.threadIdx.x
        base = cuda.blockIdx.x * tile
        while base < keys.size:
            for r in range(items):
                i = base + r * threads + t
                if i < keys.size:
                    k = keys[i]
                    mine = (epoch << shift) | i
                    h = hash_of(k, wide)
                    b = first_bucket(h, nb)
                    step = 0
                    placed = False
                    tries = 0
                    while tries < nb and not placed:
                        s = 0
                        while s < slots and not placed:
                            slot = b * slots + s
                            cur = tag_at(table, slot)
                            while (cur >> shift) != epoch:
                                old = np.int64(cuda.atomic.cas(table, 2 * slot + 1, word(cur, wide),
                                                               word(mine, wide))) & 0xFFFFFFFF
                                if old == cur:
                                    table[2 * slot] = k
                                    placed = True
                                    break
                                cur = old
                            s += 1
                        if not placed:
                            if step == 0:
                                step = bucket_step(h, nb)
                            b = (b + step) % nb
                        tries += 1
                    if not placed:
                        state[1] = 2
            base += cuda.gridDim.x * tile

    @cuda.jit(device=True)
    def walk(table, k, nb, slots, shift, epoch, wide):
        """(matches of k, the first match's build position) along k's bucket sequence."""
        cnt = 0
        first = HEAD_NONE
        h = hash_of(k, wide)
        b = first_bucket(h, nb)
        step = bucket_step(h, nb)
        tries = 0
        while tries < nb:
            full = True
            for s in range(slots):
                tg = tag_at(table, b * slots + s)
                if (tg >> shift) != epoch:
                    full = False
                    break
                if table[2 * (b * slots + s)] == k:
                    if cnt == 0:
                        first = tg & ((1 << shift) - 1)
                    cnt += 1
            if not full:
                break
            b = (b + step) % nb
            tries += 1
        return cnt, first

    @cuda.jit
    def hash_count_nb(pkeys, table, nb, slots, shift, epoch, wide, heads, tcounts, tile_totals, tile_offsets,
                      state):
        sh = cuda.shared.array(threads, int64)
        last = cuda.shared.array(1, int32)
        t = cuda.threadIdx.x
        tl = cuda.blockIdx.x
        c = 0
        for r in range(items):
            j = tl * tile + r * threads + t
            if j < pkeys.size:
                cnt, first = walk(table, pkeys[j], nb, slots, shift, epoch, wide)
                heads[j] = HEAD_NONE if cnt == 0 else (first if cnt == 1 else HEAD_MANY)
                c += cnt
        tcounts[tl * threads + t] = c
        _, total = block_exclusive_scan(sh, t, c)
        if t == 0:
            tile_totals[tl] = total
            cuda.threadfence()  # publish this tile's total before taking a ticket
            ticket = cuda.atomic.add(state, 4, 1)
            last[0] = 1 if ticket == cuda.gridDim.x - 1 else 0
        cuda.syncthreads()
        if last[0] == 1:  # the last block to finish scans every tile's total
            cuda.threadfence()
            ntiles = cuda.gridDim.x
            chunk = (ntiles + threads - 1) // threads
            lo = min(t * chunk, ntiles)
            hi = min(lo + chunk, ntiles)
            s = 0
            for i in range(lo, hi):
                s += tile_totals[i]
            run, grand = block_exclusive_scan(sh, t, s)
            for i in range(lo, hi):
                tile_offsets[i] = run
                run += tile_totals[i]
            if t == 0:
                state[0] = grand
                state[4] = 0  # the ticket is ready for the next launch

    @cuda.jit
    def hash_write_nb(pkeys, table, nb, slots, shift, epoch, wide, heads, tcounts, tile_offsets, brows, has_b,
                      prows, has_p, out_b, out_p, capacity):
        sh = cuda.shared.array(threads, int64)
        stage_b = cuda.shared.array(tile, int64)
        stage_p = cuda.shared.array(tile, int64)
        t = cuda.threadIdx.x
        tl = cuda.blockIdx.x
        c = tcounts[tl * threads + t]
        excl, tile_total = block_exclusive_scan(sh, t, c)
        offset = tile_offsets[tl]
        if offset < capacity:
            w = 0
            while w < tile_total:
                if excl < w + tile and excl + c > w:
                    o = excl
                    for r in range(items):
                        j = tl * tile + r * threads + t
                        if j >= pkeys.size or o >= w + tile:
                            continue
                        hd = heads[j]
                        if hd == HEAD_NONE:
                            continue
                        pj = prows[j] if has_p else j
                        if hd >= 0:
                            if o >= w:
                                stage_b[o - w] = brows[hd] if has_b else hd
                                stage_p[o - w] = pj
                            o += 1
                            continue
                        k = pkeys[j]  # several matches: walk the key's buckets again
                        h = hash_of(k, wide)
                        b = first_bucket(h, nb)
                        step = bucket_step(h, nb)
                        tries = 0
                        while tries < nb and o < w + tile:
                            full = True
                            for s in range(slots):
                                tg = tag_at(table, b * slots + s)
                                if (tg >> shift) != epoch:
                                    full = False
                                    break
                                if table[2 * (b * slots + s)] == k:
                                    if o >= w and o < w + tile:
                                        pos = tg & ((1 << shift) - 1)
                                        stage_b[o - w] = brows[pos] if has_b else pos
                                        stage_p[o - w] = pj
                                    o += 1
                            if not full:
                                break
                            b = (b + step) % nb
                            tries += 1
                cuda.syncthreads()
                m = min(tile, tile_total - w)
                i = t
                while i < m:
                    at = offset + w + i
                    if at < capacity:
                        out_b[at] = stage_b[i]
                        out_p[at] = stage_p[i]
                    i += threads
                cuda.syncthreads()
                w += tile

    # ---- linear64: the table viewed as int64 words. int32 keys: one word per slot, key in the low half, tag above;
    # int64 keys (wide): two words per slot, word 2s the key, word 2s + 1 the tag (a zero pad above it) ----

    @cuda.jit(device=True)
    def packed(k, tag):
        """The int64 word of slot {key k, tag} (the tag's top bit lands in the sign)."""
        hi = tag - 4294967296 if tag >= 2147483648 else tag
        return (np.int64(hi) << 32) | (np.int64(k) & 0xFFFFFFFF)

    @cuda.jit(device=True)
    def tag_of(w):
        return (np.int64(w) >> 32) & 0xFFFFFFFF

    @cuda.jit(device=True)
    def key_of(w):
        lo = np.int64(w) & 0xFFFFFFFF
        return lo - 4294967296 if lo >= 2147483648 else lo

    @cuda.jit(device=True)
    def slot_tag(words, slot, wide):
        return np.int64(words[2 * slot + 1]) if wide else tag_of(words[slot])

    @cuda.jit(device=True)
    def slot_key(words, slot, wide):
        return np.int64(words[2 * slot]) if wide else key_of(words[slot])

    @cuda.jit(device=True)
    def claim(words, slot, k, tag, shift, epoch, wide):
        """Take the slot for (k, tag) while it is empty: one 64-bit CAS of the packed slot, or (wide) a CAS of the
        tag word and then the key's store. True once taken by this call."""
        if wide:
            cur = np.int64(words[2 * slot + 1])
            while (cur >> shift) != epoch:
                old = np.int64(cuda.atomic.cas(words, 2 * slot + 1, cur, np.int64(tag)))
                if old == cur:
                    words[2 * slot] = k
                    return True
                cur = old
            return False
        mine = packed(k, tag)
        cur = np.int64(words[slot])
        while (tag_of(cur) >> shift) != epoch:
            old = np.int64(cuda.atomic.cas(words, slot, cur, mine))
            if old == cur:
                return True
            cur = old
        return False

    @cuda.jit
    def linear_build_nb(keys, words, nb, slots, shift, epoch, wide, state):
        """One row per thread, grid-stride; a CAS per attempt; next slot, then the next bucket."""
        i = cuda.blockIdx.x * threads + cuda.threadIdx.x
        while i < keys.size:
            k = keys[i]
            slot = first_bucket(hash_of(k, wide), nb) * slots
            placed = False
            tries = 0
            while tries < nb * slots and not placed:
                placed = claim(words, slot, k, (epoch << shift) | i, shift, epoch, wide)
                slot = slot + 1 if slot + 1 < nb * slots else 0
                tries += 1
            if not placed:
                state[1] = 2
            i += cuda.gridDim.x * threads

    @cuda.jit(device=True)
    def linear_walk(words, k, nb, slots, shift, epoch, wide, emit, at, pj, brows, has_b, out_b, out_p, capacity):
        """(matches of k along its linear sequence up to the first empty slot, the first one's build position);
        with ``emit`` the pairs go to out_* from offset ``at`` (offsets >= capacity dropped)."""
        cnt = 0
        first = HEAD_NONE
        slot = first_bucket(hash_of(k, wide), nb) * slots
        tries = 0
        while tries < nb * slots:
            tg = slot_tag(words, slot, wide)
            if (tg >> shift) != epoch:
                break
            if slot_key(words, slot, wide) == k:
                pos = tg & ((1 << shift) - 1)
                if cnt == 0:
                    first = pos
                if emit and at + cnt < capacity:
                    out_b[at + cnt] = brows[pos] if has_b else pos
                    out_p[at + cnt] = pj
                cnt += 1
            slot = slot + 1 if slot + 1 < nb * slots else 0
            tries += 1
        return cnt, first

    @cuda.jit
    def linear_probe_nb(pkeys, words, nb, slots, shift, epoch, wide, brows, has_b, prows, has_p, out_b, out_p,
                        capacity, state):
        """One row per thread, grid-stride: count, reserve the row's pairs with one atomic add on state[5], write
        them (capacity 0: count only); the last block publishes the total and resets counter and ticket. (The C++
        kernel reserves per warp; the simulator has no warp lockstep, so the twin reserves per row.)"""
        last = cuda.shared.array(1, int32)
        t = cuda.threadIdx.x
        j = cuda.blockIdx.x * threads + t
        while j < pkeys.size:
            k = pkeys[j]
            pj = prows[j] if has_p else j
            cnt, first = linear_walk(words, k, nb, slots, shift, epoch, wide, False, 0, pj, brows, has_b, out_b,
                                     out_p, 0)
            if cnt > 0:
                at = cuda.atomic.add(state, 5, cnt)
                if capacity > 0 and at < capacity:
                    linear_walk(words, k, nb, slots, shift, epoch, wide, True, at, pj, brows, has_b, out_b,
                                out_p, capacity)
            j += cuda.gridDim.x * threads
        cuda.syncthreads()
        if t == 0:
            cuda.threadfence()
            ticket = cuda.atomic.add(state, 6, 1)
            last[0] = 1 if ticket == cuda.gridDim.x - 1 else 0
        cuda.syncthreads()
        if last[0] == 1 and t == 0:
            cuda.threadfence()
            total = cuda.atomic.exch(state, 5, 0)
            state[6] = 0
            state[0] = total

    return {"build": hash_build_nb, "count": hash_count_nb, "write": hash_write_nb, "lbuild": linear_build_nb,
            "lprobe": linear_probe_nb}


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


class HashJoinNumba(HashJoinBase):
    """The hash join in numba-cuda (split and linear64 schemes; linear64 stands in for linear64-fused and
    partitioned; the CPU twin of ``HashJoinCuda``)."""

    name = "hash-numba"
    linear_available = True

    def __init__(self, config: HashConfig = HashConfig()) -> None:
        super().__init__(config)
        self._views: dict[int, tuple[torch.Tensor, Any]] = {}

    def _nb(self, t: torch.Tensor) -> Any:
        """``as_numba`` for workspace tensors, cached (the workspace hands out the same view objects again)."""
        hit = self._views.get(id(t))
        if hit is None or hit[0] is not t:
            if len(self._views) > 32:  # views of buffers the workspace has since replaced: let them go
                self._views.clear()
            hit = self._views[id(t)] = (t, as_numba(t))
        return hit[1]

    def _check_device(self, t: torch.Tensor) -> None:
        if t.is_cuda == backend.SIMULATED:
            where = "CPU tensors (the numba simulator)" if backend.SIMULATED else "CUDA tensors"
            raise ValueError(f"{self.name} needs {where}, got a tensor on {t.device}")

    def _table_args(self, built: Built) -> tuple:
        lay = built.layout
        return (self._nb(built.table), lay.buckets, lay.slots, lay.shift, built.epoch,
                int(built.table.dtype == torch.int64))

    def _linear_args(self, built: Built) -> tuple:
        lay = built.layout
        return (self._nb(built.table.view(torch.int64)), lay.buckets, lay.slots, lay.shift, built.epoch,
                int(built.table.dtype == torch.int64))

    def _launch_probe(self, keys: torch.Tensor, built: Built, rows: torch.Tensor | None, out_b: torch.Tensor | None,
                      out_p: torch.Tensor | None, capacity: int, state: torch.Tensor) -> None:
        rdt = out_b.dtype if out_b is not None else built.row_dtype
        dummy = self.ws.get("no_rows", 1, rdt, keys.device)
        br = built.rows
        grid = min(math.ceil(keys.numel() / self.config.threads), MAX_GRID)
        kernels(self.config)["lprobe"][grid, self.config.threads](
            as_numba(keys), *self._linear_args(built), as_numba(br if br is not None else dummy), int(br is not None),
            as_numba(rows if rows is not None else dummy), int(rows is not None),
            as_numba(out_b if out_b is not None else dummy), as_numba(out_p if out_p is not None else dummy),
            capacity, self._nb(state))

    def _launch_build(self, keys: torch.Tensor, built: Built, state: torch.Tensor) -> None:
        if self._linear(keys.dtype):
            grid = min(math.ceil(keys.numel() / self.config.threads), MAX_GRID)
            kernels(self.config)["lbuild"][grid, self.config.threads](as_numba(keys), *self._linear_args(built),
                                                                      self._nb(state))
            return
        grid = min(math.ceil(keys.numel() / self.config.tile), MAX_GRID)
        kernels(self.config)["build"][grid, self.config.threads](as_numba(keys), *self._table_args(built),
                                                                 self._nb(state))

    def _launch_count(self, keys: torch.Tensor, built: Built, probed: Probed, state: torch.Tensor) -> None:
        cfg = self.config
        tiles_ = self.ws.get("tile_totals", cfg.tiles(keys.numel()), torch.int64, keys.device)
        kernels(cfg)["count"][cfg.tiles(keys.numel()), cfg.threads](
            as_numba(keys), *self._table_args(built), self._nb(probed.heads), self._nb(probed.thread_counts),
            self._nb(tiles_), self._nb(probed.tile_offsets), self._nb(state))

    def _launch_write(self, probed: Probed, out_b: torch.Tensor, out_p: torch.Tensor, capacity: int) -> None:
        cfg, n = self.config, probed.keys.numel()
        dummy = self.ws.get("no_rows", 1, out_b.dtype, out_b.device)
        br, pr = probed.built.rows, probed.rows
        kernels(cfg)["write"][cfg.tiles(n), cfg.threads](
            as_numba(probed.keys), *self._table_args(probed.built), self._nb(probed.heads),
            self._nb(probed.thread_counts), self._nb(probed.tile_offsets),
            as_numba(br if br is not None else dummy), int(br is not None),
            as_numba(pr if pr is not None else dummy), int(pr is not None), as_numba(out_b), as_numba(out_p),
            capacity)


def hash_join_numba(build_keys, probe_keys, build_rows=None, probe_rows=None, *, config: HashConfig = HashConfig(),
                    timed: bool = False):
    """Inner equi-join with the numba hash join; returns a ``JoinResult`` (see ``impl.join.common``)."""
    return HashJoinNumba(config)(build_keys, probe_keys, build_rows, probe_rows, timed=timed)
