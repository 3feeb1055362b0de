"""Tensor-core join in Triton: hash partitions, then ``tl.dot`` of bit-sliced ±1 key encodings tests equality.

Encoding: a key's B bits (B = 32 for int32, 64 for int64) become a vector e(k) ∈ {-1, +1}^B, so
``e(a) · e(b) = B - 2·hamming(a, b)`` and ``a == b  ⟺  e(a) · e(b) == B``. In fp16 (or int8) every product is ±1
and every partial sum an integer of magnitude ≤ 64, so the fp32 (int32) accumulator is exact. ``tl.dot`` of a
[BM, B] build tile with a [B, BN] probe tile tests BM × BN key pairs on the tensor cores at once.

Partitioning keeps the work (and memory) linear instead of n_build × n_probe: both sides are hash-partitioned into
P = next_pow2(n_build / bucket_rows) buckets by ``mix32(key) & (P - 1)`` (the hash join's hash) — a histogram with
atomics, a cumsum, and an atomic scatter into one combined array (build rows first, then probe rows). Only equal
buckets are compared: a program takes BN consecutive partitioned probe rows (a tile that may straddle a few
buckets, so probe-side skew is spread evenly over programs), and for each bucket in the tile loops over that
bucket's build rows BM at a time. Comparisons ≈ n_probe · bucket_rows · (1 + BN / bucket_rows), never n².

Output: a count pass (matches per probe row) -> exclusive cumsum (the total is the one host sync) -> a write pass
that recomputes the tiles and places each match with a cumsum along the build axis, so outputs are exact-size.
Kernels (launches per join: zero, hist, cumsum, scatter, count, cumsum, write): ``tc_partition_hist``,
``tc_partition_scatter``, ``tc_join_count``, ``tc_join_write``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import impl  # noqa: F401  (backend before triton)
import torch
import triton
import triton.language as tl

from impl import backend
from impl.join.common import HASH_MUL, Workspace, hash_keys_torch, next_pow2, run_join

ENCODINGS = {"fp16": tl.float16, "fp32": tl.float32, "int8": tl.int8}
_MUL = tl.constexpr(HASH_MUL)  # kernels may read only constexpr globals


@triton.jit
def _bucket_of(k, pmask, WIDE: tl.constexpr):
    """mix32(fold(k)) & pmask, in int64 (the arithmetic of ``common.hash_keys``)."""
    x = k.to(tl.int64)
    if WIDE:
        x = x ^ (x >> 32)
    x = x & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * _MUL) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * _MUL) & 0xFFFFFFFF
    return ((x >> 16) ^ x) & pmask


@triton.jit
def _hist_side(keys_ptr, counts_ptr, base, n, bucket_off, pmask, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = base + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    tl.atomic_add(counts_ptr + bucket_off + _bucket_of(k, pmask, WIDE), 1, mask=m)


@triton.jit
def tc_partition_hist(bkeys_ptr, pkeys_ptr,  # build / probe keys
                      counts_ptr,            # (2P,) int32 bucket sizes: build buckets, then probe buckets
                      nb, np_, pmask,        # rows per side, P - 1
                      build_programs,        # programs [0, build_programs) take build rows, the rest probe rows
                      WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < build_programs:
        _hist_side(bkeys_ptr, counts_ptr, pid * BLOCK, nb, 0, pmask, WIDE, BLOCK)
    else:
        _hist_side(pkeys_ptr, counts_ptr, (pid - build_programs) * BLOCK, np_, pmask + 1, pmask, WIDE, BLOCK)


@triton.jit
def _scatter_side(keys_ptr, counts_ptr, bounds_ptr, part_keys_ptr, part_pos_ptr, base, n, bucket_off, pmask,
                  WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = base + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    b = bucket_off + _bucket_of(k, pmask, WIDE)
    # Counting down hands out the slots bounds[b] + count - 1 ... bounds[b] (the histogram's counts are consumed).
    left = tl.atomic_add(counts_ptr + b, -1, mask=m)
    slot = tl.load(bounds_ptr + b, mask=m, other=0) + left - 1
    tl.store(part_keys_ptr + slot, k, mask=m)
    tl.store(part_pos_ptr + slot, offs.to(tl.int32), mask=m)


@triton.jit
def tc_partition_scatter(bkeys_ptr, pkeys_ptr, counts_ptr,
                         bounds_ptr,                   # (2P + 1,) int32 exclusive bucket starts, then the end
                         part_keys_ptr, part_pos_ptr,  # (nb + np_,) partitioned keys / positions within their side
                         nb, np_, pmask, build_programs,
                         WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < build_programs:
        _scatter_side(bkeys_ptr, counts_ptr, bounds_ptr, part_keys_ptr, part_pos_ptr, pid * BLOCK, nb, 0, pmask,
                      WIDE, BLOCK)
    else:
        _scatter_side(pkeys_ptr, counts_ptr, bounds_ptr, part_keys_ptr, part_pos_ptr,
                      (pid - build_programs) * BLOCK, np_, pmask + 1, pmask, WIDE, BLOCK)


@triton.jit
def _encode(k, valid, KBITS: tl.constexpr, ENC: tl.constexpr, ROWS: tl.constexpr):
    """±1 bit-slices of k: [len(k), KBITS] if ROWS else [KBITS, len(k)]; invalid entries encode as all zeros."""
    if ROWS:
        bits = (k[:, None] >> tl.arange(0, KBITS)[None, :]) & 1
        e = tl.where(valid[:, None], bits * 2 - 1, 0)
    else:
        bits = (k[None, :] >> tl.arange(0, KBITS)[:, None]) & 1
        e = tl.where(valid[None, :], bits * 2 - 1, 0)
    return e.to(ENC)


@triton.jit
def _probe_tile(part_keys_ptr, bounds_ptr, nb, np_, pmask, WIDE: tl.constexpr, BN: tl.constexpr):
    """This program's BN partitioned probe rows: (index into the combined arrays, valid, keys, buckets)."""
    r = nb + tl.program_id(0) * BN + tl.arange(0, BN)
    valid = r < nb + np_
    pk = tl.load(part_keys_ptr + r, mask=valid, other=0)
    pb = _bucket_of(pk, pmask, WIDE)
    return r, valid, pk, pb


@triton.jit
def _bucket_build_range(bounds_ptr, b, pmask):
    """Build rows [start, end) of bucket b; empty when the bucket has no probe rows at all (nothing to match)."""
    start = tl.load(bounds_ptr + b)
    end = tl.load(bounds_ptr + b + 1)
    has_probe = tl.load(bounds_ptr + pmask + 2 + b) > tl.load(bounds_ptr + pmask + 1 + b)
    return start, tl.where(has_probe, end, start)


@triton.jit
def tc_join_count(part_keys_ptr, bounds_ptr,
                  cnt_ptr,            # (np_,) int32 out: matches per partitioned probe row
                  nb, np_, pmask,
                  WIDE: tl.constexpr, KBITS: tl.constexpr, ENC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    r, valid, pk, pb = _probe_tile(part_keys_ptr, bounds_ptr, nb, np_, pmask, WIDE, BN)
    enc_p = _encode(pk, valid, KBITS, ENC, False)  # [KBITS, BN]
    b_lo = tl.min(tl.where(valid, pb, pmask + 1), axis=0)
    b_hi = tl.max(tl.where(valid, pb, -1), axis=0)
    cnt = tl.zeros([BN], dtype=tl.int32)
    for b in range(b_lo, b_hi + 1):
        start, end = _bucket_build_range(bounds_ptr, b, pmask)
        enc_b = tl.where((pb == b)[None, :], enc_p, tl.zeros_like(enc_p))  # only this bucket's probe rows
        for m0 in range(start, end, BM):
            rm = m0 + tl.arange(0, BM)
            mm = rm < end
            bk = tl.load(part_keys_ptr + rm, mask=mm, other=0)
            eq = tl.dot(_encode(bk, mm, KBITS, ENC, True), enc_b) == KBITS  # [BM, BN] key equality
            cnt += tl.sum(eq.to(tl.int32), axis=0)
    tl.store(cnt_ptr + (r - nb), cnt, mask=valid)


@triton.jit
def tc_join_write(part_keys_ptr, part_pos_ptr, bounds_ptr,
                  offs_ptr,                 # (np_ + 1,) int64 exclusive output offset per partitioned probe row
                  brows_ptr, prows_ptr,     # row ids by position within each side
                  out_b_ptr, out_p_ptr,     # (total,) outputs
                  nb, np_, pmask,
                  WIDE: tl.constexpr, KBITS: tl.constexpr, ENC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    r, valid, pk, pb = _probe_tile(part_keys_ptr, bounds_ptr, nb, np_, pmask, WIDE, BN)
    enc_p = _encode(pk, valid, KBITS, ENC, False)
    prow = tl.load(prows_ptr + tl.load(part_pos_ptr + r, mask=valid, other=0), mask=valid)
    running = tl.load(offs_ptr + (r - nb), mask=valid, other=0)  # next free output slot per probe row
    b_lo = tl.min(tl.where(valid, pb, pmask + 1), axis=0)
    b_hi = tl.max(tl.where(valid, pb, -1), axis=0)
    for b in range(b_lo, b_hi + 1):
        start, end = _bucket_build_range(bounds_ptr, b, pmask)
        enc_b = tl.where((pb == b)[None, :], enc_p, tl.zeros_like(enc_p))
        for m0 in range(start, end, BM):
            rm = m0 + tl.arange(0, BM)
            mm = rm < end
            bk = tl.load(part_keys_ptr + rm, mask=mm, other=0)
            eq = (tl.dot(_encode(bk, mm, KBITS, ENC, True), enc_b) == KBITS).to(tl.int32)
            dest = running[None, :] + (tl.cumsum(eq, axis=0) - eq)  # matches of a probe row in build order
            brow = tl.load(brows_ptr + tl.load(part_pos_ptr + rm, mask=mm, other=0), mask=mm)
            hit = eq != 0
            tl.store(out_b_ptr + dest, tl.broadcast_to(brow[:, None], [BM, BN]), mask=hit)
            tl.store(out_p_ptr + dest, tl.broadcast_to(prow[None, :], [BM, BN]), mask=hit)
            running += tl.sum(eq, axis=0)


@dataclass(frozen=True)
class TCConfig:
    """Partitioning and tiling of the tensor-core join."""

    bucket_rows: int = 32   # target mean build rows per hash bucket
    block_m: int = 64       # build rows per tl.dot tile
    block_n: int = 64       # probe rows per tl.dot tile (= per program)
    enc: str = "fp16" if not backend.INTERPRETED else "fp32"  # the interpreter has no fast fp16 matmul
    num_warps: int = 4
    part_block: int = 1024  # rows per program in the partition kernels

    def __post_init__(self) -> None:
        if self.enc not in ENCODINGS:
            raise ValueError(f"enc must be one of {sorted(ENCODINGS)}, got {self.enc!r}")
        for name in ("block_m", "block_n", "part_block"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (a tl.dot tile side), got {v}")
        if self.bucket_rows < 1:
            raise ValueError(f"bucket_rows must be >= 1, got {self.bucket_rows}")

    def buckets(self, n_build: int) -> int:
        return next_pow2(max(1, math.ceil(n_build / self.bucket_rows)))


@dataclass
class TCBuilt:
    keys: torch.Tensor  # build keys / rows as given (partitioning needs both sides, so it happens in probe)
    rows: torch.Tensor


@dataclass
class TCProbed:
    part_keys: torch.Tensor  # (nb + np_,) both sides partitioned by bucket
    part_pos: torch.Tensor   # (nb + np_,) int32 position of each partitioned row within its side
    bounds: torch.Tensor     # (2P + 1,) int32 bucket starts in the combined arrays
    offsets: torch.Tensor    # (np_ + 1,) int64 exclusive output offsets per partitioned probe row, then total
    build_rows: torch.Tensor
    probe_rows: torch.Tensor
    nb: int
    np_: int
    pmask: int
    total: int


class TensorCoreJoin:
    """Hash-partitioned tensor-core join (Triton); same three-phase interface as the hash joins.

    ``build`` only records the build side: partitioning both sides in one launch pair is cheaper than two, so the
    build side's partitioning is timed with the probe phase (the bench's build phase is therefore ~0).
    """

    name = "tc-triton"

    def __init__(self, config: TCConfig = TCConfig()) -> None:
        self.config = config
        self.ws = Workspace()

    def build(self, keys: torch.Tensor, rows: torch.Tensor) -> TCBuilt:
        return TCBuilt(keys, rows)

    def probe(self, built: TCBuilt, keys: torch.Tensor, rows: torch.Tensor) -> TCProbed:
        cfg, dev = self.config, keys.device
        nb, np_ = built.keys.numel(), keys.numel()
        if nb + np_ >= 2**31:
            raise ValueError(f"the tensor-core join indexes both tables with int32: nb + np = {nb + np_} >= 2**31")
        p = cfg.buckets(nb)
        wide = keys.dtype == torch.int64
        counts = self.ws.get("counts", 2 * p, torch.int32, dev).zero_()
        bounds = self.ws.get("bounds", 2 * p + 1, torch.int32, dev, zeros=True)  # bounds[0] stays 0
        part_keys = self.ws.get("part_keys", nb + np_, keys.dtype, dev)
        part_pos = self.ws.get("part_pos", nb + np_, torch.int32, dev)
        offsets = self.ws.get("offsets", np_ + 1, torch.int64, dev, zeros=True)  # offsets[0] stays 0
        probed = TCProbed(part_keys, part_pos, bounds, offsets, built.rows, rows, nb, np_, p - 1, 0)
        if np_ == 0:
            return probed
        gb, gp = triton.cdiv(nb, cfg.part_block), triton.cdiv(np_, cfg.part_block)
        tc_partition_hist[(gb + gp,)](built.keys, keys, counts, nb, np_, p - 1, gb, WIDE=wide, BLOCK=cfg.part_block)
        torch.cumsum(counts, 0, dtype=torch.int32, out=bounds[1:])
        tc_partition_scatter[(gb + gp,)](built.keys, keys, counts, bounds, part_keys, part_pos, nb, np_, p - 1, gb,
                                         WIDE=wide, BLOCK=cfg.part_block)
        cnt = self.ws.get("cnt", np_, torch.int32, dev)
        tc_join_count[(triton.cdiv(np_, cfg.block_n),)](
            part_keys, bounds, cnt, nb, np_, p - 1, WIDE=wide, KBITS=64 if wide else 32, ENC=ENCODINGS[cfg.enc],
            BM=cfg.block_m, BN=cfg.block_n, num_warps=cfg.num_warps)
        torch.cumsum(cnt, 0, out=offsets[1:])
        probed.total = int(offsets[np_].item())  # the one host sync: the output size
        return probed

    def materialize(self, probed: TCProbed, out_build: torch.Tensor, out_probe: torch.Tensor) -> None:
        cfg = self.config
        wide = probed.part_keys.dtype == torch.int64
        tc_join_write[(triton.cdiv(probed.np_, cfg.block_n),)](
            probed.part_keys, probed.part_pos, probed.bounds, probed.offsets, probed.build_rows, probed.probe_rows,
            out_build, out_probe, probed.nb, probed.np_, probed.pmask, WIDE=wide, KBITS=64 if wide else 32,
            ENC=ENCODINGS[cfg.enc], BM=cfg.block_m, BN=cfg.block_n, num_warps=cfg.num_warps)

    def __call__(self, build_keys, probe_keys, build_rows=None, probe_rows=None, *, timed: bool = False):
        return run_join(self, build_keys, probe_keys, build_rows, probe_rows, timed=timed)


def tc_join(build_keys, probe_keys, build_rows=None, probe_rows=None, *, config: TCConfig = TCConfig(),
            timed: bool = False):
    """Inner equi-join on tensor cores; returns a ``JoinResult``."""
    return TensorCoreJoin(config)(build_keys, probe_keys, build_rows, probe_rows, timed=timed)


def dot_flops(probed: TCProbed, config: TCConfig) -> int:
    """Tensor-core FLOPs one pass (count or write) issues: 2·BM·BN·KBITS per (probe tile, bucket, build tile)."""
    if probed.np_ == 0:
        return 0
    p = probed.pmask + 1
    kbits = 64 if probed.part_keys.dtype == torch.int64 else 32
    buckets = hash_keys_torch(probed.part_keys[probed.nb:], kbits == 64) & probed.pmask
    tile = torch.arange(probed.np_, device=buckets.device) // config.block_n
    pairs = torch.unique(tile * p + buckets)
    sizes = (probed.bounds[1:p + 1] - probed.bounds[:p]).to(torch.int64)
    build_tiles = (sizes[pairs % p] + config.block_m - 1) // config.block_m
    return int(2 * config.block_m * config.block_n * kbits * int(build_tiles.sum()))


def compile_specs() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """(name, kernel, signature, constexprs) of every kernel variant the joins launch, for ``compile_check``."""
    specs = []
    for kt, wide in (("i32", False), ("i64", True)):
        part = {"WIDE": wide, "BLOCK": 1024}
        specs.append((f"tc_partition_hist[{kt}]", tc_partition_hist,
                      {"bkeys_ptr": f"*{kt}", "pkeys_ptr": f"*{kt}", "counts_ptr": "*i32", "nb": "i32", "np_": "i32",
                       "pmask": "i32", "build_programs": "i32", "WIDE": "constexpr", "BLOCK": "constexpr"}, part))
        specs.append((f"tc_partition_scatter[{kt}]", tc_partition_scatter,
                      {"bkeys_ptr": f"*{kt}", "pkeys_ptr": f"*{kt}", "counts_ptr": "*i32", "bounds_ptr": "*i32",
                       "part_keys_ptr": f"*{kt}", "part_pos_ptr": "*i32", "nb": "i32", "np_": "i32", "pmask": "i32",
                       "build_programs": "i32", "WIDE": "constexpr", "BLOCK": "constexpr"}, part))
        for enc in ("fp16", "int8"):
            tile = {"WIDE": wide, "KBITS": 64 if wide else 32, "ENC": ENCODINGS[enc], "BM": 64, "BN": 64}
            specs.append((f"tc_join_count[{kt}-{enc}]", tc_join_count,
                          {"part_keys_ptr": f"*{kt}", "bounds_ptr": "*i32", "cnt_ptr": "*i32", "nb": "i32",
                           "np_": "i32", "pmask": "i32", **{k: "constexpr" for k in tile}}, tile))
            for rt in ("i32", "i64"):
                specs.append((f"tc_join_write[{kt}-{enc}-{rt}]", tc_join_write,
                              {"part_keys_ptr": f"*{kt}", "part_pos_ptr": "*i32", "bounds_ptr": "*i32",
                               "offs_ptr": "*i64", "brows_ptr": f"*{rt}", "prows_ptr": f"*{rt}",
                               "out_b_ptr": f"*{rt}", "out_p_ptr": f"*{rt}", "nb": "i32", "np_": "i32",
                               "pmask": "i32", **{k: "constexpr" for k in tile}}, tile))
    return specs
