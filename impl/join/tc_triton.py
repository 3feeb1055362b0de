"""Tensor-core join in Triton: hash partitions, then ``tl.dot`` of bit-sliced ±1 key encodings tests equality.

Encoding: a key's B bits (B = 32 for int32, 64 for int64) become e(k) ∈ {-1, +1}^B (e_i = 1 - 2·bit_i), so
``e(a) · e(b) = B - 2·hamming(a, b)`` and ``a == b  ⟺  e(a) · e(b) == B``. In int8 (or fp16) every product is ±1
and every partial sum an integer of magnitude ≤ 64, so the int32 (fp32) accumulator is exact. ``tl.dot`` of an
[M, B] tile of one side with a [B, N] chunk of the other tests M × N key pairs on the tensor cores at once.

Partitioning keeps the work linear instead of n_build × n_probe. Both sides are hash-partitioned into
P = next_pow2(max(n_build, n_probe) / bucket_rows) buckets by ``mix32(key) & (P - 1)`` (the hash join's hash): a
histogram with atomics, a cumsum, and an atomic scatter of keys and row ids into one combined array (build rows
first, then probe rows, each side in bucket order). The larger side is the *tile* side, the other the *scan* side.
Equal keys share a bucket, so the matches of BM consecutive partitioned tile rows (a *sub-tile*, whose buckets
form a range [b_first, b_last]) all lie in one contiguous *run* of scan rows: those of buckets b_first..b_last.
The scatter records each sub-tile's run while it places the rows, and stores the scan side's encodings
(KBITS bytes per row) so the join pass loads its dot operands instead of computing them.
Comparisons per tile row ≈ BM · n_scan / n_tile + bucket_rows (+ BN / 2 of padding), never n².

One pass counts and writes (``tc_join_pass``): a program takes SUB sub-tiles, compares each with its run in
chunks of BN scan rows by one batched ``tl.dot`` [SUB, BM, B] x [SUB, B, BN], counts the matches of every row
(and remembers its first), reserves the program's pairs with ONE atomic add on a global counter, and writes them
into a speculative output of n_probe pairs (enough whenever build keys are unique). Rows that match at most once
are written straight from the counts; a program with a row matching more than once walks its runs again and
places every pair with a cumsum along the run. The host reads the counter once (pinned copy + event: the one host
sync); a total above the capacity re-runs the pass exact-size (many-to-many). Launches per join: hist, cumsum,
scatter, pass (+ a counter reset and the pass again on overflow); the scatter consumes the histogram back to
zeros, so nothing is cleared per join.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import impl  # noqa: F401  (backend before triton)
import torch
import triton
import triton.language as tl

from impl import backend
from impl.join.common import (HASH_MUL, JoinResult, Workspace, check_inputs, check_output_fits, next_pow2,
                              run_join)

ENCODINGS = {"fp16": tl.float16, "fp32": tl.float32, "int8": tl.int8}
TORCH_ENCODINGS = {"fp16": torch.float16, "fp32": torch.float32, "int8": torch.int8}
_MUL = tl.constexpr(HASH_MUL)  # kernels may read only constexpr globals


@triton.jit
def _bucket_of(k, pmask, WIDE: tl.constexpr):
    """mix32(fold(k)) & pmask (``common.hash_keys``), in uint32 arithmetic: products wrap mod 2^32 as intended."""
    if WIDE:
        x = (k ^ (k >> 32)).to(tl.uint32)  # the low word of the fold
    else:
        x = k.to(tl.uint32, bitcast=True)
    x = ((x >> 16) ^ x) * _MUL
    x = ((x >> 16) ^ x) * _MUL
    return (((x >> 16) ^ x) & pmask).to(tl.int32)


# ---- partitioning ---------------------------------------------------------------------------------------------------

@triton.jit
def _hist_side(keys_ptr, counts_ptr, base, n, bucket_off, pmask, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = base + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    tl.atomic_add(counts_ptr + bucket_off + _bucket_of(k, pmask, WIDE), 1, mask=m, sem="relaxed")


@triton.jit
def tc_partition_hist(bkeys_ptr, pkeys_ptr,  # build / probe keys
                      counts_ptr,            # (2P,) int32 bucket sizes: build buckets, then probe buckets
                      counter_ptr,           # (4,) int64 output counters of the join passes, zeroed here
                      nb, np_, pmask,        # rows per side, P - 1
                      build_programs,        # programs [0, build_programs) take build rows, the rest probe rows
                      WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(counter_ptr + tl.arange(0, 4), tl.zeros([4], dtype=tl.int64))
    if pid < build_programs:
        _hist_side(bkeys_ptr, counts_ptr, pid * BLOCK, nb, 0, pmask, WIDE, BLOCK)
    else:
        _hist_side(pkeys_ptr, counts_ptr, (pid - build_programs) * BLOCK, np_, pmask + 1, pmask, WIDE, BLOCK)


@triton.jit
def _scatter_side(keys_ptr, rows_ptr, counts_ptr, bounds_ptr, part_keys_ptr, part_rows_ptr, enc_ptr, runs_ptr,
                  side_base, base, n, bucket_off, other_off, pmask, is_scan, WIDE: tl.constexpr, PRE: tl.constexpr,
                  HAS_ROWS: tl.constexpr, KBITS: tl.constexpr, ENC: tl.constexpr, RUN: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Scatter rows [base, base + BLOCK) of one side (its buckets at bucket_off, the other side's at other_off)."""
    offs = base + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    bucket = _bucket_of(k, pmask, WIDE)
    b = bucket_off + bucket
    # Counting down hands out the slots bounds[b] + count - 1 ... bounds[b] and leaves the counts at zero.
    left = tl.atomic_add(counts_ptr + b, -1, mask=m, sem="relaxed")
    slot = tl.load(bounds_ptr + b, mask=m, other=0) + left - 1
    tl.store(part_keys_ptr + slot, k, mask=m)
    if HAS_ROWS:
        tl.store(part_rows_ptr + slot, tl.load(rows_ptr + offs, mask=m), mask=m)
    else:  # row ids are positions
        tl.store(part_rows_ptr + slot, offs.to(tl.int64), mask=m)
    r = slot - side_base  # the row's place in its side's partition
    if is_scan:
        if PRE:  # the scan side's ±1 encodings, KBITS per partitioned row
            at = r.to(tl.int64)[:, None] * KBITS + tl.arange(0, KBITS)[None, :]
            tl.store(enc_ptr + at, _encode_rows(k, m, KBITS, ENC), mask=m[:, None])
    else:
        # Tile side: the first row of each RUN-row sub-tile writes where the sub-tile's scan run starts (its bucket's
        # first scan row), the last row where it ends (the end of its bucket's scan rows).
        sub = runs_ptr + 2 * (r // RUN)
        tl.store(sub, tl.load(bounds_ptr + other_off + bucket, mask=m & (r % RUN == 0)), mask=m & (r % RUN == 0))
        last = m & ((r % RUN == RUN - 1) | (r == n - 1))
        tl.store(sub + 1, tl.load(bounds_ptr + other_off + bucket + 1, mask=last), mask=last)


@triton.jit
def tc_partition_scatter(bkeys_ptr, pkeys_ptr,         # keys per side
                         brows_ptr, prows_ptr,         # row ids per side (unused without HAS_ROWS)
                         counts_ptr,                   # (2P,) the histogram; consumed back to zeros
                         bounds_ptr,                   # (2P + 1,) int32 exclusive bucket starts, then the end
                         part_keys_ptr, part_rows_ptr,  # (nb + np_,) partitioned keys / row ids
                         enc_ptr,                      # (n_scan, KBITS) encodings of the scan side (PRE only)
                         runs_ptr,                     # (n_tile / RUN, 2) int32 scan runs [start, end) per sub-tile
                         nb, np_, pmask, build_programs,
                         scan_probe,                   # 1: the probe side is the scan side, 0: the build side
                         PRE: tl.constexpr, WIDE: tl.constexpr, HAS_ROWS: tl.constexpr, KBITS: tl.constexpr,
                         ENC: tl.constexpr, RUN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < build_programs:
        _scatter_side(bkeys_ptr, brows_ptr, counts_ptr, bounds_ptr, part_keys_ptr, part_rows_ptr, enc_ptr, runs_ptr,
                      0, pid * BLOCK, nb, 0, pmask + 1, pmask, scan_probe == 0, WIDE, PRE, HAS_ROWS, KBITS, ENC, RUN,
                      BLOCK)
    else:
        _scatter_side(pkeys_ptr, prows_ptr, counts_ptr, bounds_ptr, part_keys_ptr, part_rows_ptr, enc_ptr, runs_ptr,
                      nb, (pid - build_programs) * BLOCK, np_, pmask + 1, 0, pmask, scan_probe == 1, WIDE, PRE,
                      HAS_ROWS, KBITS, ENC, RUN, BLOCK)


# ---- the join pass ------------------------------------------------------------------------------------------------

@triton.jit
def _signs(k, shift):
    """1 - 2·bit: bit i of k moved to the sign by ``k << (BITS - 1 - i)``, spread by an arithmetic shift, | 1."""
    return ((k << shift) >> (k.dtype.primitive_bitwidth - 2)) | 1


@triton.jit
def _encode_rows(k, valid, KBITS: tl.constexpr, ENC: tl.constexpr):
    """[n, KBITS] ±1 bit-slices (1 - 2·bit: the same map on both sides leaves the dot unchanged) of 1-D keys k;
    invalid rows encode as zeros (equal to nothing)."""
    e = _signs(k[:, None], (KBITS - 1 - tl.arange(0, KBITS))[None, :].to(k.dtype))
    return tl.where(valid[:, None], e, 0).to(ENC)


@triton.jit
def _encode_tiles(k, KBITS: tl.constexpr, ENC: tl.constexpr):
    """[S, M, KBITS] encodings of [S, M] keys (the A operands of the batched dot)."""
    return _signs(k[:, :, None], (KBITS - 1 - tl.arange(0, KBITS))[None, None, :].to(k.dtype)).to(ENC)


@triton.jit
def _equal(part_keys_ptr, enc_ptr, scan_base, cols, end, enc_t, PRE: tl.constexpr, KBITS: tl.constexpr,
           ENC: tl.constexpr):
    """[S, M, N] key equality of each sub-tile's rows (``enc_t``: [S, M, KBITS]) with its scan rows ``cols``
    ([S, N]; those >= the sub-tile's ``end`` are padding). PRE: the scan rows' encodings are read from ``enc_ptr``
    (rows relative to ``scan_base``) instead of computed from their keys."""
    cm = cols < end[:, None]
    if PRE:
        at = (cols - scan_base).to(tl.int64)[:, :, None] * KBITS + tl.arange(0, KBITS)[None, None, :]
        enc_s = tl.permute(tl.load(enc_ptr + at, mask=cm[:, :, None], other=0), (0, 2, 1))
    else:
        k = tl.load(part_keys_ptr + cols, mask=cm, other=0)
        e = _signs(k[:, None, :], (KBITS - 1 - tl.arange(0, KBITS))[None, :, None].to(k.dtype))
        enc_s = tl.where(cm[:, None, :], e, 0).to(ENC)
    if enc_t.shape[0] == 1:  # one sub-tile: a plain 2-D dot (warpgroup MMA for BM >= 64 on sm_90)
        acc = tl.dot(tl.reshape(enc_t, [enc_t.shape[1], KBITS]), tl.reshape(enc_s, [KBITS, enc_s.shape[2]]))
        return tl.reshape(acc, [1, enc_t.shape[1], enc_s.shape[2]]) == KBITS
    return tl.dot(enc_t, enc_s) == KBITS


@triton.jit
def tc_join_pass(part_keys_ptr, part_rows_ptr,  # (nb + np_,) partitioned keys / row ids, build rows first
                 enc_ptr,                       # (n_scan, KBITS) the scan side's encodings (PRE only)
                 runs_ptr,                      # (n_tile / BM, 2) int32 scan run [start, end) of each sub-tile
                 counter_ptr,                   # int64 output counter (pairs reserved so far)
                 out_t_ptr, out_s_ptr,          # outputs: the tile row's id / the scan row's id
                 capacity,                      # pairs the outputs hold; pairs reserved beyond it are not written
                 tile_base, n_tile,             # the tile side's rows [tile_base, tile_base + n_tile)
                 scan_base,                     # the scan side's first row: nb (probe) or 0 (build)
                 PRE: tl.constexpr, KBITS: tl.constexpr, ENC: tl.constexpr,
                 SUB: tl.constexpr,             # sub-tiles per program (one batched dot over them)
                 BM: tl.constexpr,              # tile rows per sub-tile (the dot's M)
                 BN: tl.constexpr,              # scan rows per chunk (the dot's N)
                 BNW: tl.constexpr):            # scan rows per chunk when writing repeated matches
    """Count the matches of SUB·BM tile rows, reserve their pairs with one atomic, write them.

    Each sub-tile of BM consecutive tile rows is compared with its own scan run, BN rows at a time, by a batched
    ``tl.dot`` [SUB, BM, KBITS] x [SUB, KBITS, BN]; the loop runs to the longest run of the program.
    """
    sub = tl.program_id(0) * SUB + tl.arange(0, SUB)  # this program's sub-tiles
    rows = sub[:, None] * BM + tl.arange(0, BM)[None, :]  # [SUB, BM] tile rows
    valid = rows < n_tile
    # Rows past the end encode key 0; their counts are dropped below.
    enc_t = _encode_tiles(tl.load(part_keys_ptr + tile_base + rows, mask=valid, other=0), KBITS, ENC)
    live = sub * BM < n_tile
    start = tl.load(runs_ptr + 2 * sub, mask=live, other=0)
    end = tl.load(runs_ptr + 2 * sub + 1, mask=live, other=0)
    cnt = tl.zeros([SUB, BM], dtype=tl.int32)    # matches per tile row
    first = tl.zeros([SUB, BM], dtype=tl.int32)  # the first matching scan row (meaningful where cnt > 0)
    for c0 in range(0, tl.max(end - start, axis=0), BN):
        cols = start[:, None] + c0 + tl.arange(0, BN)[None, :]
        eq = _equal(part_keys_ptr, enc_ptr, scan_base, cols, end, enc_t, PRE, KBITS, ENC)
        j = tl.min(tl.where(eq, tl.arange(0, BN)[None, None, :], BN), axis=2)  # first equal column, or BN
        first = tl.where(cnt == 0, start[:, None] + c0 + j, first)
        cnt += tl.sum(eq.to(tl.int32), axis=2)
    cnt = tl.where(valid, cnt, 0)
    flat = tl.reshape(cnt, [SUB * BM])
    if tl.max(flat, axis=0) <= 1:  # every row matches at most once: write from the counts (int32 offsets)
        n_pairs = tl.sum(flat, axis=0)
        if n_pairs > 0:
            base = tl.atomic_add(counter_ptr, n_pairs.to(tl.int64), sem="relaxed")
            dest = base + (tl.cumsum(flat, axis=0) - flat)
            hit = (flat > 0) & (dest < capacity)
            t_row = tile_base + tl.reshape(rows, [SUB * BM])
            tl.store(out_t_ptr + dest, tl.load(part_rows_ptr + t_row, mask=hit), mask=hit)
            tl.store(out_s_ptr + dest, tl.load(part_rows_ptr + tl.reshape(first, [SUB * BM]), mask=hit), mask=hit)
    else:
        wide = flat.to(tl.int64)
        n_pairs64 = tl.sum(wide, axis=0)
        base = tl.atomic_add(counter_ptr, n_pairs64, sem="relaxed")
        if base + n_pairs64 <= capacity:  # (pairs that do not fit are written by the exact-size re-run)
            dest = tl.reshape(base + tl.cumsum(wide, axis=0) - wide, [SUB, BM])  # each row's first output slot
            t_id = tl.load(part_rows_ptr + tile_base + rows, mask=valid)
            for c0 in range(0, tl.max(end - start, axis=0), BNW):  # narrow chunks: [.., BNW] addresses in registers
                cols = start[:, None] + c0 + tl.arange(0, BNW)[None, :]
                eq = (_equal(part_keys_ptr, enc_ptr, scan_base, cols, end, enc_t, PRE, KBITS, ENC)
                      & valid[:, :, None]).to(tl.int32)
                at = dest[:, :, None] + (tl.cumsum(eq, axis=2) - eq)  # a row's matches in run order
                s_id = tl.load(part_rows_ptr + cols, mask=cols < end[:, None])
                hit = eq != 0
                tl.store(out_t_ptr + at, tl.broadcast_to(t_id[:, :, None], [SUB, BM, BNW]), mask=hit)
                tl.store(out_s_ptr + at, tl.broadcast_to(s_id[:, None, :], [SUB, BM, BNW]), mask=hit)
                dest += tl.sum(eq, axis=2)


# ---- host side --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TCConfig:
    """Partitioning and tiling of the tensor-core join."""

    bucket_rows: int = 4    # target mean rows per hash bucket on the larger side
    block_m: int = 16       # tile rows per sub-tile (the dot's M)
    sub_tiles: int = 4      # sub-tiles per program: one batched dot, one output reservation for all of them
    block_n: int = 32       # scan rows per chunk (the dot's N)
    write_n: int = 16       # scan rows per chunk when a tile with repeated matches writes (bounds its registers)
    pre_encode: bool = True  # the scatter stores the scan side's encodings (KBITS values per row) for the pass
    enc: str = "int8" if not backend.INTERPRETED else "fp32"  # the interpreter has no fast int8/fp16 matmul
    num_warps: int = 4
    num_stages: int = 1     # software pipelining of the scan loop (runs are 1-2 chunks long)
    part_block: int = 1024  # rows per program in the histogram kernel
    scatter_block: int = 256  # rows per program in the scatter ([rows, KBITS] encodings stay in registers)

    def __post_init__(self) -> None:
        if self.enc not in ENCODINGS:
            raise ValueError(f"enc must be one of {sorted(ENCODINGS)}, got {self.enc!r}")
        for name in ("block_m", "block_n", "write_n", "part_block", "scatter_block"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (a tl.dot tile side), got {v}")
        if self.sub_tiles < 1 or self.sub_tiles & (self.sub_tiles - 1):
            raise ValueError(f"sub_tiles must be a power of two >= 1, got {self.sub_tiles}")
        if self.bucket_rows < 1:
            raise ValueError(f"bucket_rows must be >= 1, got {self.bucket_rows}")
        if self.num_warps not in (1, 2, 4, 8) or self.num_stages < 1:
            raise ValueError(f"num_warps must be 1, 2, 4 or 8 and num_stages >= 1, got {self.num_warps}, "
                             f"{self.num_stages}")

    @property
    def program_rows(self) -> int:
        return self.sub_tiles * self.block_m

    @property
    def scatter_warps(self) -> int:
        """One row per thread: the scattered stores need no layout change, the encodings stay in registers."""
        return min(8, max(1, self.scatter_block // 32))

    def buckets(self, n_rows: int) -> int:
        return next_pow2(max(1, math.ceil(n_rows / self.bucket_rows)))


@dataclass
class TCBuilt:
    keys: torch.Tensor  # build keys / rows as given (partitioning needs both sides, so it happens in probe)
    rows: torch.Tensor | None


@dataclass
class TCProbed:
    """Both sides partitioned, and which one the programs tile."""

    part_keys: torch.Tensor  # (nb + np_,) keys by bucket: build rows, then probe rows
    part_rows: torch.Tensor  # (nb + np_,) their row ids (positions within their side when none were given)
    bounds: torch.Tensor     # (2P + 1,) int32 bucket starts in the combined arrays, then nb + np_
    counter: torch.Tensor    # (4,) int64 output counters: [0] the speculative / count pass, [2] the exact-size pass
                             # (16 bytes apart: the kernels see aligned pointers, one specialization)
    enc: torch.Tensor        # (n_scan, KBITS) the scan side's encodings (empty unless config.pre_encode)
    runs: torch.Tensor       # (n_tile / block_m, 2) int32 scan run [start, end) of each sub-tile
    nb: int
    np_: int
    pmask: int
    tile_probe: bool         # True: programs tile the probe side and scan the build side
    total: int = 0

    @property
    def tile(self) -> tuple[int, int, int, int]:
        """(tile_base, n_tile, scan_base, scan_bounds) of the pass kernel."""
        p = self.pmask + 1
        return (self.nb, self.np_, 0, 0) if self.tile_probe else (0, self.nb, self.nb, p)


class TensorCoreJoin:
    """Hash-partitioned tensor-core join (Triton); the hash joins' three-phase interface plus a one-pass call.

    ``build`` only records the build side (both sides are partitioned together, in one launch pair, in ``probe``);
    ``probe`` partitions and runs the pass in count mode (capacity 0) and reads the total; ``materialize`` runs the
    pass again with the exact-size outputs. ``__call__`` partitions and runs ONE pass into a speculative output.
    ``launches`` / ``syncs`` count stream operations (Triton kernels, torch's cumsum and memsets, the readback copy)
    and host syncs, for the benches.
    """

    name = "tc-triton"

    def __init__(self, config: TCConfig = TCConfig()) -> None:
        self.config = config
        self.ws = Workspace()
        self.launches = 0
        self.syncs = 0
        self._counts_dirty = False  # the histogram is all zeros unless a partition was interrupted
        self._host_total: torch.Tensor | None = None
        self._event = None

    # -- phases --
    def build(self, keys: torch.Tensor, rows: torch.Tensor | None) -> TCBuilt:
        return TCBuilt(keys, rows)

    def partition(self, bk: torch.Tensor, pk: torch.Tensor, br: torch.Tensor | None,
                  pr: torch.Tensor | None) -> TCProbed:
        """Both sides into P hash buckets (hist, cumsum, scatter); also zeroes the passes' output counters."""
        cfg, dev = self.config, pk.device
        nb, np_ = bk.numel(), pk.numel()
        if nb + np_ >= 2**31:
            raise ValueError(f"the tensor-core join indexes both tables with int32: nb + np = {nb + np_} >= 2**31")
        p = cfg.buckets(max(nb, np_))
        wide, kbits = pk.dtype == torch.int64, 64 if pk.dtype == torch.int64 else 32
        has_rows = br is not None
        row_dtype = br.dtype if has_rows else torch.int64
        tile_probe = np_ >= nb
        n_enc = (nb if tile_probe else np_) if cfg.pre_encode else 0
        n_runs = triton.cdiv(np_ if tile_probe else nb, cfg.block_m)
        enc_dtype = TORCH_ENCODINGS[cfg.enc]
        check_output_fits(0, torch.int32, dev, what="the tensor-core join's partitions",
                          extra_bytes=(nb + np_) * (pk.element_size() + torch.empty((), dtype=row_dtype)
                                                    .element_size()) + 12 * p
                          + n_enc * kbits * torch.empty((), dtype=enc_dtype).element_size() + 8 * n_runs)
        counts = self.ws.get("counts", 2 * p, torch.int32, dev, zeros=True)
        if self._counts_dirty:
            counts.zero_()
            self.launches += 1
        bounds = self.ws.get("bounds", 2 * p + 1, torch.int32, dev, zeros=True)  # bounds[0] stays 0
        probed = TCProbed(self.ws.get("part_keys", nb + np_, pk.dtype, dev),
                          self.ws.get("part_rows", nb + np_, row_dtype, dev), bounds,
                          self.ws.get("counter", 4, torch.int64, dev),
                          self.ws.get("enc", max(n_enc, 1) * kbits, enc_dtype, dev).view(-1, kbits)[:n_enc],
                          self.ws.get("runs", 2 * max(n_runs, 1), torch.int32, dev).view(-1, 2)[:n_runs], nb, np_,
                          p - 1, tile_probe)
        gb, gp = triton.cdiv(nb, cfg.part_block), triton.cdiv(np_, cfg.part_block)
        self._counts_dirty = True
        tc_partition_hist[(max(gb + gp, 1),)](bk, pk, counts, probed.counter, nb, np_, p - 1, gb, WIDE=wide,
                                              BLOCK=cfg.part_block)
        torch.cumsum(counts, 0, dtype=torch.int32, out=bounds[1:])
        sb, sp = triton.cdiv(nb, cfg.scatter_block), triton.cdiv(np_, cfg.scatter_block)
        if sb + sp:
            tc_partition_scatter[(sb + sp,)](bk, pk, br if has_rows else bk, pr if has_rows else pk, counts, bounds,
                                             probed.part_keys, probed.part_rows, probed.enc, probed.runs, nb, np_,
                                             p - 1, sb, int(not tile_probe), PRE=cfg.pre_encode, WIDE=wide,
                                             HAS_ROWS=has_rows, KBITS=kbits, ENC=ENCODINGS[cfg.enc], RUN=cfg.block_m,
                                             BLOCK=cfg.scatter_block, num_warps=cfg.scatter_warps)
        self._counts_dirty = False
        self.launches += 2 + int(sb + sp > 0)
        return probed

    def join_pass(self, probed: TCProbed, out_build: torch.Tensor, out_probe: torch.Tensor, slot: int) -> None:
        """One counting-and-writing pass over all tiles into outputs of ``len(out_build)`` pairs (0: count only)."""
        cfg = self.config
        tile_base, n_tile, scan_base, _ = probed.tile
        if n_tile == 0:
            return
        out_t, out_s = (out_probe, out_build) if probed.tile_probe else (out_build, out_probe)
        wide = probed.part_keys.dtype == torch.int64
        tc_join_pass[(triton.cdiv(n_tile, cfg.program_rows),)](
            probed.part_keys, probed.part_rows, probed.enc, probed.runs, probed.counter[2 * slot:], out_t, out_s,
            out_build.numel(), tile_base, n_tile, scan_base, PRE=cfg.pre_encode, KBITS=64 if wide else 32,
            ENC=ENCODINGS[cfg.enc], SUB=cfg.sub_tiles, BM=cfg.block_m, BN=cfg.block_n, BNW=cfg.write_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        self.launches += 1

    def read_total(self, probed: TCProbed, slot: int = 0) -> int:
        """The pairs a pass counted: the one host sync (a pinned copy and an event on a GPU)."""
        self.syncs += 1
        self.launches += 1  # the copy of the counter to the host
        counter = probed.counter[2 * slot:2 * slot + 1]
        if not counter.is_cuda:
            return int(counter.item())
        if self._host_total is None:
            self._host_total = torch.empty(1, dtype=torch.int64, pin_memory=True)
            self._event = torch.cuda.Event()
        self._host_total.copy_(counter, non_blocking=True)
        self._event.record()
        self._event.synchronize()
        return int(self._host_total[0])

    def probe(self, built: TCBuilt, keys: torch.Tensor, rows: torch.Tensor | None) -> TCProbed:
        probed = self.partition(built.keys, keys, built.rows, rows)
        if keys.numel():
            empty = probed.part_rows[:0]
            self.join_pass(probed, empty, empty, slot=0)  # capacity 0: count only
            probed.total = self.read_total(probed, slot=0)
        return probed

    def materialize(self, probed: TCProbed, out_build: torch.Tensor, out_probe: torch.Tensor) -> None:
        probed.counter[2:3].zero_()
        self.launches += 1
        self.join_pass(probed, out_build, out_probe, slot=1)

    # -- the one-pass join --
    def __call__(self, build_keys, probe_keys, build_rows=None, probe_rows=None, *, timed: bool = False):
        """Inner equi-join (``common`` module doc); one host sync. ``timed``: the three phases one by one."""
        t = check_inputs(build_keys, probe_keys, build_rows, probe_rows, default_rows=False)
        br, pr = t.build_rows, t.probe_rows
        if (br is None) != (pr is None):  # one side's ids given: the other side's positions, as ids
            br, pr = (torch.arange(k.numel(), dtype=torch.int64, device=k.device) if r is None else r
                      for r, k in ((br, t.build_keys), (pr, t.probe_keys)))
        if timed:
            return run_join(self, t.build_keys, t.probe_keys, br, pr, timed=True)
        return self.speculative_join(t.build_keys, t.probe_keys, br, pr)

    def speculative_join(self, bk: torch.Tensor, pk: torch.Tensor, br: torch.Tensor | None,
                         pr: torch.Tensor | None) -> JoinResult:
        rdt = br.dtype if br is not None else torch.int64
        n, dev = pk.numel(), pk.device
        check_output_fits(n, rdt, dev, what="the speculative output (one pair per probe row)")
        ob, op = torch.empty(n, dtype=rdt, device=dev), torch.empty(n, dtype=rdt, device=dev)
        if n == 0 or bk.numel() == 0:
            return JoinResult(ob[:0], op[:0])
        probed = self.partition(bk, pk, br, pr)
        self.join_pass(probed, ob, op, slot=0)
        total = probed.total = self.read_total(probed, slot=0)
        if total > n:  # many-to-many: the speculative outputs were short; the pass again, exact-size
            check_output_fits(total, rdt, dev)
            ob, op = torch.empty(total, dtype=rdt, device=dev), torch.empty(total, dtype=rdt, device=dev)
            self.materialize(probed, ob, op)
            return JoinResult(ob, op)
        return JoinResult(ob[:total], op[:total])


def tc_join(build_keys, probe_keys, build_rows=None, probe_rows=None, *, config: TCConfig = TCConfig(),
            timed: bool = False):
    """Inner equi-join on tensor cores; returns a ``JoinResult``."""
    return TensorCoreJoin(config)(build_keys, probe_keys, build_rows, probe_rows, timed=timed)


# ---- accounting -------------------------------------------------------------------------------------------------

def scan_chunks(probed: TCProbed, config: TCConfig) -> torch.Tensor:
    """int64 [programs]: the BN-row chunks each program's loop takes (its longest sub-tile run, as the kernel)."""
    if probed.runs.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    run = (probed.runs[:, 1] - probed.runs[:, 0]).to(torch.int64)
    run = torch.nn.functional.pad(run, (0, (-run.numel()) % config.sub_tiles))
    return (run.view(-1, config.sub_tiles).amax(dim=1) + config.block_n - 1) // config.block_n


def dot_flops(probed: TCProbed, config: TCConfig, rewalk: torch.Tensor | None = None) -> int:
    """Tensor-core FLOPs of one pass: 2·SUB·BM·BN·KBITS per (program, chunk); programs flagged in ``rewalk``
    (bool [programs]: a row matches more than once) walk again in chunks of write_n rows to write."""
    chunks = scan_chunks(probed, config)
    kbits = 64 if probed.part_keys.dtype == torch.int64 else 32
    flops = 2 * config.program_rows * config.block_n * kbits * int(chunks.sum())
    if rewalk is not None and chunks.numel():
        write_chunks = (chunks * config.block_n + config.write_n - 1) // config.write_n  # an upper bound
        flops += 2 * config.program_rows * config.write_n * kbits * int(write_chunks[rewalk.to(chunks.device)].sum())
    return flops


def rewalk_programs(probed: TCProbed, config: TCConfig) -> torch.Tensor:
    """bool [programs]: programs in which some tile row matches more than once (they write by a second walk)."""
    tile_base, n_tile, _, _ = probed.tile
    scan = probed.part_keys[probed.nb:] if not probed.tile_probe else probed.part_keys[:probed.nb]
    own = probed.part_keys[tile_base:tile_base + n_tile]
    s = torch.sort(scan).values
    matches = torch.searchsorted(s, own, right=True) - torch.searchsorted(s, own)
    pad = (-n_tile) % config.program_rows
    return torch.nn.functional.pad(matches, (0, pad)).view(-1, config.program_rows).amax(dim=1) > 1


def compile_specs() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """(name, kernel, signature, constexprs) of every kernel variant the joins launch, for ``compile_check``."""
    specs = []
    for kt, wide in (("i32", False), ("i64", True)):
        kbits = 64 if wide else 32
        specs.append((f"tc_partition_hist[{kt}]", tc_partition_hist,
                      {"bkeys_ptr": f"*{kt}", "pkeys_ptr": f"*{kt}", "counts_ptr": "*i32", "counter_ptr": "*i64",
                       "nb": "i32", "np_": "i32", "pmask": "i32", "build_programs": "i32", "WIDE": "constexpr",
                       "BLOCK": "constexpr"}, {"WIDE": wide, "BLOCK": 1024}))
        for enc, et in (("int8", "i8"), ("fp16", "fp16")):
            for rt, has_rows, pre in (("i32", True, True), ("i64", True, False), ("i64", False, True)):
                name = f"tc_partition_scatter[{kt}-{enc}-{rt}{'' if has_rows else '-positions'}{'-pre' if pre else ''}]"
                specs.append((name, tc_partition_scatter, scatter_signature(kt, rt, et, has_rows),
                              {"PRE": pre, "WIDE": wide, "HAS_ROWS": has_rows, "KBITS": kbits, "ENC": ENCODINGS[enc],
                               "RUN": 16, "BLOCK": 256}))
            for rt, pre in (("i32", True), ("i64", False)):
                tile = {"PRE": pre, "KBITS": kbits, "ENC": ENCODINGS[enc], "SUB": 4, "BM": 16, "BN": 32, "BNW": 16}
                specs.append((f"tc_join_pass[{kt}-{enc}-{rt}{'-pre' if pre else ''}]", tc_join_pass,
                              pass_signature(kt, rt, et), tile))
        one = {"PRE": True, "KBITS": kbits, "ENC": tl.int8, "SUB": 1, "BM": 64, "BN": 64, "BNW": 16}  # the 2-D dot
        specs.append((f"tc_join_pass[{kt}-int8-i32-pre-one-tile]", tc_join_pass, pass_signature(kt, "i32", "i8"), one))
    return specs


def scatter_signature(kt: str, rt: str, et: str, has_rows: bool = True) -> dict[str, str]:
    """Triton signature of ``tc_partition_scatter`` for key / row-id / encoding types (i32, i64, i8, fp16 ...)."""
    given = rt if has_rows else kt
    return {"bkeys_ptr": f"*{kt}", "pkeys_ptr": f"*{kt}", "brows_ptr": f"*{given}", "prows_ptr": f"*{given}",
            "counts_ptr": "*i32", "bounds_ptr": "*i32", "part_keys_ptr": f"*{kt}", "part_rows_ptr": f"*{rt}",
            "enc_ptr": f"*{et}", "runs_ptr": "*i32", "nb": "i32", "np_": "i32", "pmask": "i32",
            "build_programs": "i32", "scan_probe": "i32",
            **{k: "constexpr" for k in ("PRE", "WIDE", "HAS_ROWS", "KBITS", "ENC", "RUN", "BLOCK")}}


def pass_signature(kt: str, rt: str, et: str = "i8") -> dict[str, str]:
    """Triton signature of ``tc_join_pass`` for key / row-id / encoding types."""
    return {"part_keys_ptr": f"*{kt}", "part_rows_ptr": f"*{rt}", "enc_ptr": f"*{et}", "runs_ptr": "*i32",
            "counter_ptr": "*i64", "out_t_ptr": f"*{rt}", "out_s_ptr": f"*{rt}", "capacity": "i64",
            "tile_base": "i32", "n_tile": "i32", "scan_base": "i32",
            **{k: "constexpr" for k in ("PRE", "KBITS", "ENC", "SUB", "BM", "BN", "BNW")}}
