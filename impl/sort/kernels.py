"""The two bitonic-sort kernels in numba-cuda; each executes one pass program (see ``impl.sort.network``).

``block_kernel``     one block = one tile (contiguous, or a coset of wide masks) of T slots in shared memory; rounds
                     of e steps on E = 2^e keys per thread in registers, one ``syncthreads`` per round.
``register_kernel``  one thread = one coset of 2^F slots straight from global memory, F steps in registers.

Both load slot ``pos`` as its key (``pos >= n``: the +inf pad, never stored), encoding raw values on the first pass
and decoding on the last one. Kernel arguments, shared by both:
  prog   int64 program of the pass           src   unsigned view of the input (read on the encode pass)
  keys   key workspace (uint32/uint64)       vals  uint32 index workspace (pairs mode; a 1-element dummy otherwise)
  out    unsigned view of the output (keys-only) or int64 indices (argsort)
  n      number of real keys                 enc   order-key constants (``KeyFormat.params``)
Key modes: "keys" (keys-only), "composite" (argsort, key << 32 | index in one uint64), "pairs" (argsort of 64-bit
keys: uint64 key array + uint32 index array, compared lexicographically).
"""
from __future__ import annotations

from typing import Callable

import impl  # noqa: F401  (backend before numba)
import numba
import numpy as np
from numba import cuda

from impl.sort.keys import DECODE, ENCODE, decode_key, encode_key
from impl.sort.network import H_FLAGS, H_GENS, H_GPIVS, H_H, H_LOWMASK, H_NROUNDS, H_R, H_ROUNDS

MODES = ("keys", "composite", "pairs")
LOW32 = np.uint64(0xFFFFFFFF)
MAXV = np.uint32(0xFFFFFFFF)


@cuda.jit(device=True, inline=True)
def deposit_zeros(v, prog, off, count):
    """Insert a zero bit into ``v`` at each ascending bit position prog[off], ..., prog[off + count - 1]."""
    for q in range(count):
        p = prog[off + q]
        v = ((v >> p) << (p + 1)) | (v & ((1 << p) - 1))
    return v


@cuda.jit(device=True, inline=True)
def slot_position(x0, s, prog):
    """Global position of slot s of the coset x0: x0 ^ G(s >> r) ^ (s mod 2^r), G = XOR of the selected wide masks."""
    r = prog[H_R]
    pos = x0 ^ (s & ((1 << r) - 1))
    c = s >> r
    g = 0
    while c != 0:
        if c & 1:
            pos ^= prog[H_GENS + g]
        c >>= 1
        g += 1
    return pos


def _make_memory_ops(mode: str, key_np: np.dtype) -> tuple[Callable, Callable]:
    """Device functions that load a slot as (key, index) and store it back, encoding/decoding on the end passes."""
    maxk = key_np.type(np.iinfo(key_np).max)
    pairs, composite = mode == "pairs", mode == "composite"

    @cuda.jit(device=True, inline=True)
    def load_slot(pos, n, flags, src, keys, vals, enc):
        if pos >= n:
            return maxk, MAXV  # virtual +inf pad
        if flags & ENCODE:
            key = encode_key(np.uint64(src[pos]), enc)
            if composite:
                key = (key << np.uint64(32)) | np.uint64(pos)
            return key, np.uint32(pos)
        if pairs:
            return keys[pos], vals[pos]
        return keys[pos], MAXV

    @cuda.jit(device=True, inline=True)
    def store_slot(pos, n, flags, keys, vals, out, enc, key, val):
        if pos >= n:
            return  # pads stay virtual: min-to-lower comparators never move a real key onto them
        if flags & DECODE:
            if composite:
                out[pos] = np.int64(key & LOW32)
            elif pairs:
                out[pos] = np.int64(val)
            else:
                out[pos] = decode_key(np.uint64(key), enc)
        else:
            keys[pos] = key
            if pairs:
                vals[pos] = val

    return load_slot, store_slot


def _make_exchange(pairs: bool) -> Callable:
    @cuda.jit(device=True, inline=True)
    def exchange(rk, rv, c, d, c_low):
        """Compare-exchange register slots c and d; the lower global position (c if c_low) keeps the minimum."""
        a, b = rk[c], rk[d]
        if pairs:
            va, vb = rv[c], rv[d]
            gt = (a > b or (a == b and va > vb)) if c_low else (b > a or (a == b and vb > va))
            if gt:
                rv[c], rv[d] = vb, va
        else:
            gt = a > b if c_low else b > a
        if gt:
            rk[c], rk[d] = b, a

    return exchange


def _jit_kernel(fn, threads: int):
    # launch_bounds lets the compiler budget registers for the real block size (absent in the simulator's jit).
    if numba.config.ENABLE_CUDASIM:
        return cuda.jit(fn)
    return cuda.jit(launch_bounds=threads)(fn)


def make_block_kernel(tile: int, log_e: int, key_dtype, mode: str):
    """Compile-time specialised block kernel: T = ``tile`` slots in shared memory, E = 2^log_e keys per thread."""
    key_np = np.dtype(key_dtype)
    E, P = 1 << log_e, tile >> log_e
    KEY = numba.from_dtype(key_np)
    pairs = mode == "pairs"
    VT = tile if pairs else 1
    # Shared slot s lives at swz(s) = s ^ ((s >> SH) & (2^SH - 1)): threads whose cosets are 2^SH apart then hit
    # different banks. swz is linear over XOR, so a round swizzles its coset masks once instead of every slot.
    SH = 5 if key_np.itemsize == 4 else 4
    SM = (1 << SH) - 1
    RS = 1 + 4 * log_e
    load_slot, store_slot = _make_memory_ops(mode, key_np)
    exchange = _make_exchange(pairs)

    def block_kernel(prog, src, keys, vals, out, n, enc, block0):
        sk = cuda.shared.array(tile, KEY)
        sv = cuda.shared.array(VT, numba.uint32)
        rk = cuda.local.array(E, KEY)
        rv = cuda.local.array(E, numba.uint32)
        rs = cuda.local.array(E, numba.int64)
        t = cuda.threadIdx.x
        flags = prog[H_FLAGS]
        x0 = deposit_zeros(np.int64(cuda.blockIdx.x + block0) << prog[H_R], prog, H_GPIVS, prog[H_H])
        if (x0 & ~prog[H_LOWMASK]) >= n:
            return  # the whole coset is padding (uniform per block, so no thread misses a barrier)
        for m in range(E):
            s = t + m * P
            k, v = load_slot(slot_position(x0, s, prog), n, flags, src, keys, vals, enc)
            sk[s ^ ((s >> SH) & SM)] = k
            if pairs:
                sv[s ^ ((s >> SH) & SM)] = v
        cuda.syncthreads()
        for rd in range(prog[H_NROUNDS]):
            base = H_ROUNDS + rd * RS
            cnt = prog[base]
            s0 = deposit_zeros(np.int64(t), prog, base + 1 + 3 * log_e, log_e)
            rs[0] = s0 ^ ((s0 >> SH) & SM)  # swizzled shared indices of the thread's coset
            for j in range(log_e):
                mj = prog[base + 1 + j]
                mj ^= (mj >> SH) & SM
                for c in range(1 << j):
                    rs[c | (1 << j)] = rs[c] ^ mj
            for c in range(E):
                rk[c] = sk[rs[c]]
                if pairs:
                    rv[c] = sv[rs[c]]
            o0 = slot_position(x0, s0, prog)
            for i in range(log_e):
                if i < cnt:
                    obit = (o0 >> prog[base + 1 + log_e + i]) & 1
                    dep = prog[base + 1 + 2 * log_e + i]
                    for c in range(E):
                        if ((c >> i) & 1) == 0:
                            exchange(rk, rv, c, c | (1 << i), (obit ^ (cuda.popc(c & dep) & 1)) == 0)
            for c in range(E):
                sk[rs[c]] = rk[c]
                if pairs:
                    sv[rs[c]] = rv[c]
            cuda.syncthreads()  # the next round reads slots other threads wrote
        for m in range(E):
            s = t + m * P
            q = s ^ ((s >> SH) & SM)
            store_slot(slot_position(x0, s, prog), n, flags, keys, vals, out, enc, sk[q], sv[q] if pairs else MAXV)

    return _jit_kernel(block_kernel, P), block_kernel


def make_register_kernel(f: int, key_dtype, mode: str, threads: int):
    """Register kernel for passes of ``f`` fused steps (2^f keys per thread)."""
    key_np = np.dtype(key_dtype)
    E = 1 << f
    KEY = numba.from_dtype(key_np)
    pairs = mode == "pairs"
    load_slot, store_slot = _make_memory_ops(mode, key_np)
    exchange = _make_exchange(pairs)
    B = H_ROUNDS  # the single round of a register program

    def register_kernel(prog, src, keys, vals, out, n, enc, nthreads):
        tid = cuda.grid(1)
        if tid >= nthreads:
            return
        x = deposit_zeros(np.int64(tid), prog, B + 1 + 3 * f, f)
        if (x & ~prog[H_LOWMASK]) >= n:
            return
        rk = cuda.local.array(E, KEY)
        rv = cuda.local.array(E, numba.uint32)
        rs = cuda.local.array(E, numba.int64)
        flags = prog[H_FLAGS]
        rs[0] = x
        for j in range(f):
            mj = prog[B + 1 + j]
            for c in range(1 << j):
                rs[c | (1 << j)] = rs[c] ^ mj
        for c in range(E):
            rk[c], rv[c] = load_slot(rs[c], n, flags, src, keys, vals, enc)
        for i in range(f):
            obit = (x >> prog[B + 1 + f + i]) & 1
            dep = prog[B + 1 + 2 * f + i]
            for c in range(E):
                if ((c >> i) & 1) == 0:
                    exchange(rk, rv, c, c | (1 << i), (obit ^ (cuda.popc(c & dep) & 1)) == 0)
        for c in range(E):
            store_slot(rs[c], n, flags, keys, vals, out, enc, rk[c], rv[c])

    return _jit_kernel(register_kernel, threads), register_kernel


_CACHE: dict[tuple, tuple] = {}


def block_kernel_for(tile: int, log_e: int, key_dtype, mode: str):
    key = ("block", tile, log_e, np.dtype(key_dtype).name, mode)
    if key not in _CACHE:
        _CACHE[key] = make_block_kernel(tile, log_e, key_dtype, mode)
    return _CACHE[key][0]


def register_kernel_for(f: int, key_dtype, mode: str, threads: int):
    key = ("register", f, np.dtype(key_dtype).name, mode, threads)
    if key not in _CACHE:
        _CACHE[key] = make_register_kernel(f, key_dtype, mode, threads)
    return _CACHE[key][0]


def kernel_signature(kind: str, bits_dtype, key_dtype, mode: str):
    """The numba signature a pass is launched with (for ahead-of-time PTX checks)."""
    from numba import types

    arr = lambda dt: types.Array(numba.from_dtype(np.dtype(dt)), 1, "C")  # noqa: E731
    out = np.int64 if mode != "keys" else bits_dtype
    enc = types.Tuple((types.int64, types.uint64, types.uint64, types.uint64, types.uint64, types.int64))
    return (arr(np.int64), arr(bits_dtype), arr(key_dtype), arr(np.uint32), arr(out), types.int64, enc, types.int64)
