"""Weight-only FP8 GEMV/GEMM for decode-sized batches (W8A16): y = (x · qᵀ) ⊙ s, one Triton kernel per call.

    y[m, n] = s[n] · Σ_k x[m, k] · q[n, k]       x [M, K] bf16/fp16/fp32, q [N, K] e4m3 (or x's dtype), s [N] or [1]
    SwiGLU input (``swiglu=True``): x = silu_mul(gu) computed while loading, from gu = [g | u] [M, 2K]

Why: at batch 1-128 a decode step is bound by reading the weights, and FP8 only pays if the GEMV streams them at full
bandwidth. Grid (M tiles, N tiles, K splits), M tiles fastest, so the programs of one N tile read its codes at about
the same time (once from DRAM, the other M tiles from L2). Each program streams a [BLOCK_N, K/splits] slab of codes,
BLOCK_K contiguous bytes per row (16-byte loads), always holding the next tile's codes while it multiplies the current
one, and accumulates in float32 on the CUDA cores (``dot=False``: an [M, N, K] broadcast-multiply summed over K, for
the few rows of batch-1..8 decode, where a 16-row tensor-core tile would waste most of its work) or on the tensor
cores (``dot=True``). With splits > 1 every program stores its float32 partial tile and increments the tile's counter;
the program that arrives last adds the partials in split order 0, 1, ... (the same bits whichever program is last; no
float atomics), scales, writes y and resets the counter for the next call. One launch, so a split costs no second
kernel. Each row's result depends only on that row and the config (the tile layout is fixed by the config, not by M):
with one config for every M, the kernel is batch-invariant.

PDL (``pdl=True``, GPU only): the program loads its first codes, then waits for the previous kernel on the stream
(``gdc_wait``) before it reads x or writes anything, so with programmatic dependent launch the weight stream starts
while the kernel before it is still finishing. Weights are never written by a preceding kernel, so this is safe.
``prefetch`` (MiB, GPU only): before anything else every program asks L2 for the first codes of its slab with the
bulk copy unit (``cp.async.bulk.prefetch.L2``: no registers, no shared memory, nothing waits for it), the call's
total capped at that many MiB; with PDL the weights then stream from DRAM while the previous kernel (a norm, RoPE,
attention) runs, and without it the prefetch runs ahead of the pipeline's own loads.

Persistent (``persistent`` programs per SM, tensor-core W8A16 only, no K splits): ``gemv_persistent_kernel``
launches that many programs, each taking every P-th tile over all of K; on a GPU the tile and K loops are one
flattened software pipeline, so a program's next tile streams in while it finishes the current one.

``GemvConfig`` names one configuration; ``choose.py`` holds the measured table of which configuration (or which other
GEMM path) serves each (projection, M).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import impl  # noqa: F401  (backend before triton)
import torch
import triton
import triton.language as tl
from torch import nn

from impl import backend
from impl.common.timing import sm_count
from impl.serve.fused import ScaledRows, silu_mul_rounded
from impl.serve.fused_quant import Fp8Rows, quantize_rows, silu_mul_quant

COUNTER_SLOTS = 1 << 16  # split-K tile counters per device: (M tiles) x (N tiles) of one call must fit
MAX_WORKSPACE_BYTES = 256 << 20


@dataclass(frozen=True)
class GemvConfig:
    """One launch configuration. ``block_m`` 0 = M rounded up to a power of two (at least 16 with ``dot``), capped at
    ``max_block_m``; a fixed ``block_m`` makes the result of each row independent of M (batch-invariant)."""

    dot: bool = False
    a8: bool = False
    block_n: int = 16
    block_k: int = 512
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 1
    block_m: int = 0
    max_block_m: int = 128
    bits: bool = False  # dot kind: codes -> bf16 by integer bit operations (``decode_bits``), not the F2F unit
    prefetch: int = 0  # MiB of L2 the call's first codes may fill by bulk prefetch before anything else (0: none)
    persistent: int = 0  # programs per SM of the persistent kernel (``gemv_persistent_kernel``); 0: one per tile
    mma: bool = False  # the CUDA C++ tensor-core kernel (``fp8_mma``): num_warps split K, unroll loads in flight
    # (with a8 and row_run: the W8A8 row kernel, e4m3 x e4m3 on the tensor cores, nothing decoded)
    unroll: int = 8  # mma: 16-byte code loads per lane in flight (chunks of 64 codes a warp)
    row_run: int = 0  # mma, one token: each warp computes this many whole rows (``fp8_mma``'s row kernel); 0: tiles
    pipe: bool = False  # mma row/sweep kernel: two register sets, the next loads in flight while one set is used
    sweep: int = 0  # mma, one token: blocks of this many rows whose warps sweep the rows' bytes in address order

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "block_m", "max_block_m"):
            v = getattr(self, name)
            if v < 0 or (v and v & (v - 1)):
                raise ValueError(f"GemvConfig.{name} must be a power of two (or 0 for block_m), got {v}")
        if self.block_n < 1 or self.block_k < 16 or self.splits < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"GemvConfig needs block_n >= 1, block_k >= 16, splits, warps, stages >= 1: {self}")
        if self.dot and (self.block_n < 16 or 0 < self.block_m < 16):
            raise ValueError(f"a tensor-core (dot) config needs block_n and block_m >= 16: {self}")
        if self.a8 and not (self.dot or self.mma):
            raise ValueError(f"FP8 activations (a8) need a tensor-core kernel (dot, or mma's row kernel): {self}")
        if self.bits and (not self.dot or self.a8):
            raise ValueError(f"bit decoding (bits) is for the W8A16 tensor-core (dot, not a8) kernel: {self}")
        if not 0 <= self.prefetch <= 48:
            raise ValueError(f"GemvConfig.prefetch is MiB of L2 (0..48), got {self.prefetch}")
        if self.persistent < 0 or (self.persistent and (not self.dot or self.a8 or self.splits > 1 or self.prefetch)):
            raise ValueError(f"a persistent config is a W8A16 tensor-core (dot, not a8) one without K splits or "
                             f"prefetch: {self}")
        if self.mma and (self.dot or self.bits or self.splits > 1 or self.prefetch or self.persistent
                         or self.block_m or self.num_warps > 32 or self.unroll < 1 or self.unroll & (self.unroll - 1)
                         or not 0 <= self.row_run <= 4):
            raise ValueError(f"an mma config (CUDA C++ kernel) takes only num_warps (<= 32), unroll (a power of "
                             f"two) and row_run (0-4): {self}")
        if self.row_run and not self.mma:
            raise ValueError(f"row_run is the mma kernel's: {self}")
        if self.sweep and (not self.mma or self.row_run or not 1 <= self.sweep <= 64):
            raise ValueError(f"sweep (1-64 rows a block) is an mma kernel of its own, without row_run: {self}")
        if self.mma and self.a8 and not self.row_run:
            raise ValueError(f"an mma config with FP8 activations (a8) is the one-token row kernel's (row_run > 0): "
                             f"{self}")
        if self.pipe and not (self.row_run or self.sweep):
            raise ValueError(f"pipe is the mma row and sweep kernels' (mma with row_run or sweep > 0): {self}")

    @property
    def name(self) -> str:
        if self.mma:
            rows = f"r{self.row_run}" if self.row_run else f"s{self.sweep}" if self.sweep else ""
            pipe = "p" if self.pipe else ""
            return f"mma{rows}-w{self.num_warps}u{self.unroll}{pipe}{'-a8' if self.a8 else ''}"
        m = f"m{self.block_m}" if self.block_m else ""
        kind = "a8" if self.a8 else "dotb" if self.bits else "dot" if self.dot else "fma"
        pf = f"f{self.prefetch}" if self.prefetch else ""
        per = f"-P{self.persistent}" if self.persistent else ""
        return (f"{kind}-{m}n{self.block_n}k{self.block_k}s{self.splits}"
                f"w{self.num_warps}p{self.num_stages}{pf}{per}")

    def rows_per_tile(self, m: int) -> int:
        if self.block_m:
            return self.block_m
        return min(max(16 if self.dot else 1, triton.next_power_of_2(max(m, 1))), self.max_block_m)

    def shared_bytes(self, m: int, x_bytes: int = 2) -> int:
        """Shared memory the tensor-core pipeline holds: num_stages x (x tile + code tile); CUDA-core tiles and the
        mma kernel (its warps' partial sums) ~0."""
        if not self.dot:
            return 0
        x_item = 1 if self.a8 else x_bytes
        return self.num_stages * self.block_k * (self.rows_per_tile(m) * x_item + self.block_n)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GemvConfig":
        """From ``to_dict``'s dict (fields added later take their defaults when absent)."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown GemvConfig fields {sorted(unknown)}")
        return cls(**d)


def interpreter_config(cfg: GemvConfig) -> GemvConfig:
    """The interpreter runs programs one by one in numpy: small tiles keep CPU tests fast and still split K."""
    if (backend.ON_GPU and not backend.INTERPRETED) or cfg.mma:
        return cfg
    small = dict(block_n=min(cfg.block_n, 16), block_k=min(cfg.block_k, 32), num_stages=1)
    return GemvConfig(**{**cfg.to_dict(), **small})


@triton.jit
def _load_x(x_ptr, offs_m, kk, m_mask, k_mask, stride_xm, K, SWIGLU: tl.constexpr):
    """x[offs_m, kk] in x's dtype; with SWIGLU x is [g | u] and the tile is silu_mul's rounded product."""
    mask = m_mask[:, None] & k_mask[None, :]
    ptrs = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
    if SWIGLU:
        g = tl.load(ptrs, mask=mask, other=0.0)
        u = tl.load(ptrs + K, mask=mask, other=0.0)
        return silu_mul_rounded(g, u)
    return tl.load(ptrs, mask=mask, other=0.0)


# e4m3 -> bf16 by bit operations, 4 codes per 32-bit register: PRMT spreads bytes b0, b1 (b2, b3) into the two
# 16-bit lanes with the byte's sign replicated above it ([ssssssss | s eeee mmm]); shifted left by 4 and masked with
# 0x87F0 each lane is the bf16 s 0000eeee mmm0000 = code value x 2^-120 (e4m3 subnormals land on bf16 subnormals);
# a bf16x2 multiply by 2^120 makes it exact. Integer and FMA pipes only: Triton's own e4m3 -> bf16 goes through f16
# and a conversion-unit F2F per element (16/clk/SM on sm_90). The two NaN codes 0x7F/0xFF decode to +-480 (weights
# from impl.fp8's quantizer saturate at 448 and hold no NaN). ``decode_bits_reference`` is its CPU twin.
_BITS_ASM = tl.constexpr("""{
.reg .b32 t0, t1, c;
prmt.b32 t0, $2, 0, 0x9180;
prmt.b32 t1, $2, 0, 0xB3A2;
shl.b32 t0, t0, 4;
shl.b32 t1, t1, 4;
and.b32 t0, t0, 0x87F087F0;
and.b32 t1, t1, 0x87F087F0;
mov.b32 c, 0x7B807B80;
mul.rn.bf16x2 $0, t0, c;
mul.rn.bf16x2 $1, t1, c;
}""")
BITS_EXPONENT_SHIFT = 120


@triton.jit
def _bits_to_bf16(w):
    """e4m3 codes [.., ..] -> bf16 values (the PTX above; GPU only, the interpreter has no inline assembly)."""
    return tl.inline_asm_elementwise(_BITS_ASM, "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16,
                                     is_pure=True, pack=4)


# L2 prefetch of a contiguous byte range (sm_90 bulk copy unit; no registers or shared memory hold the data): $1 the
# 16-byte aligned address, $2 the size, a multiple of 16; a size of 0 issues nothing. The result register is unused.
_PREFETCH_ASM = tl.constexpr("""{
.reg .pred p;
setp.ne.u32 p, $2, 0;
@p cp.async.bulk.prefetch.L2.global [$1], $2;
mov.u32 $0, 0;
}""")


@triton.jit
def prefetch_ranges(offs_n, n_mask, stride_wn, k_lo, k_hi, pf_bytes, CHUNKS: tl.constexpr):
    """(byte offset into the codes, size) [BLOCK_N, CHUNKS] of the pieces ``_prefetch_codes`` asks L2 for: the first
    ``pf_bytes`` of each row's [k_lo, k_hi), cut into CHUNKS pieces of a multiple of 16 bytes; rows past N and pieces
    past the end get size 0."""
    row_bytes = tl.minimum(pf_bytes, k_hi - k_lo)
    chunk = (row_bytes + 16 * CHUNKS - 1) // (16 * CHUNKS) * 16
    start = tl.arange(0, CHUNKS)[None, :] * chunk
    size = tl.minimum(tl.maximum(row_bytes - start, 0), chunk)
    size = tl.where(n_mask[:, None], size, 0)
    return offs_n[:, None].to(tl.int64) * stride_wn + k_lo + start, size


@triton.jit
def _prefetch_codes(w_ptr, offs_n, n_mask, stride_wn, k_lo, k_hi, pf_bytes, CHUNKS: tl.constexpr):
    """Bulk L2 prefetch of ``prefetch_ranges``' pieces, every thread its own piece. GPU only (inline assembly). Not a
    load: nothing waits for it and it changes no result; the loads that follow find the codes in L2 or in flight."""
    off, size = prefetch_ranges(offs_n, n_mask, stride_wn, k_lo, k_hi, pf_bytes, CHUNKS)
    addr = (w_ptr + off).to(tl.int64)
    tl.inline_asm_elementwise(_PREFETCH_ASM, "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _multiply(acc, x, w, DOT: tl.constexpr, A8: tl.constexpr, FP8_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BITS: tl.constexpr = False):
    """acc[BLOCK_M, BLOCK_N] += x[BLOCK_M, BLOCK_K] · w[BLOCK_N, BLOCK_K]ᵀ in float32 (A8: x holds e4m3 codes too, an
    FP8 x FP8 tensor-core product; the interpreter has no FP8 dot and multiplies the decoded values in float32).
    BITS (bf16 x on a GPU): the codes are decoded by ``_bits_to_bf16``."""
    if A8:  # (if/else, not early returns: Triton would build the branches after a return too)
        if FP8_DOT:
            acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    elif DOT:
        if BITS:
            acc = tl.dot(x, tl.trans(_bits_to_bf16(w)), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr,             # x [M, K] (SWIGLU: [M, 2K]), codes [N, K], scales, y [M, N]
                sx_ptr,                                  # A8: x is e4m3 codes [M, K] with float32 row scales [M]
                ws_ptr, cnt_ptr,                         # split-K: float32 partials [S, M, N], int32 tile counters
                M, N, K, k_per_split, num_splits, stride_xm, stride_wn, stride_ym, pf_bytes,
                PER_TENSOR: tl.constexpr, SWIGLU: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
                A8: tl.constexpr, FP8_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr = False,
                PREFETCH: tl.constexpr = False, CHUNKS: tl.constexpr = 1):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)  # k_per_split is a multiple of BLOCK_K: splits never overlap
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if PREFETCH:  # first, before waiting for the previous kernel: with PDL the codes stream while it runs
        _prefetch_codes(w_ptr, offs_n, n_mask, stride_wn, k_lo, k_hi, pf_bytes, CHUNKS)
    if DOT:  # tensor cores: Triton's software pipeline (num_stages) keeps the next tiles in flight in shared memory
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < k_hi
            x = _load_x(x_ptr, offs_m, kk, m_mask, k_mask, stride_xm, K, SWIGLU)
            w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _multiply(acc, x, w, DOT, A8, FP8_DOT, DOT_PRECISION, BITS)
    else:  # CUDA cores: the next tile (codes and x) is loaded into registers while this one is multiplied
        kk = k_lo + offs_k
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < k_hi)[None, :], other=0.0)
        if USE_PDL:  # only weights were read so far: now wait for the kernel that wrote x (and may read y's memory)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = _load_x(x_ptr, offs_m, kk, m_mask, kk < k_hi, stride_xm, K, SWIGLU)
        if BLOCK_M == 1:  # one row: products summed element-wise, reduced over K once at the end
            acc_k = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            nk = k0 + BLOCK_K + offs_k
            nk_mask = nk < k_hi
            w_next = tl.load(w_rows + nk[None, :], mask=n_mask[:, None] & nk_mask[None, :], other=0.0)
            x_next = _load_x(x_ptr, offs_m, nk, m_mask, nk_mask, stride_xm, K, SWIGLU)
            if BLOCK_M == 1:
                acc_k += w.to(tl.float32) * x.to(tl.float32)
            else:
                acc = _multiply(acc, x, w, DOT, A8, FP8_DOT, DOT_PRECISION)
            w, x = w_next, x_next
        if BLOCK_M == 1:
            acc = tl.sum(acc_k, axis=1)[None, :]
    if PER_TENSOR:
        scale = tl.load(s_ptr)
    else:
        scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if A8:
        scale = scale * tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    out_mask = m_mask[:, None] & n_mask[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT:
        tile_ws = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + split * M * N + tile_ws, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is stored before the counter says so (release below)
        tile = pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:  # the last of this tile's programs: sum the partials in split order
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(0, num_splits):
                total += tl.load(ws_ptr + s * M * N + tile_ws, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, (total * scale).to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next call
    else:
        tl.store(y_ptrs, (acc * scale).to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def gemv_persistent_kernel(x_ptr, w_ptr, s_ptr, y_ptr,  # x [M, K], codes [N, K], scales [1 or N], y [M, N]
                           M, N, K, stride_xm, stride_wn, stride_ym,
                           PER_TENSOR: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                           STAGES: tl.constexpr, FLATTEN: tl.constexpr):
    """Persistent W8A16 tensor-core GEMV: program p takes tiles p, p + P, ... of the (M tiles x N tiles) grid, each
    over all of K, the tile loop and the K loop flattened into one software pipeline (FLATTEN, on a GPU), so the next
    tile's codes are in flight while this tile finishes: one pipeline ramp per program, not one per tile."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    m_tiles = tl.cdiv(M, BLOCK_M)
    tiles = m_tiles * tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), num_stages=STAGES, flatten=FLATTEN):
        offs_m = (tile % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (tile // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < K
            x = _load_x(x_ptr, offs_m, kk, m_mask, k_mask, stride_xm, K, False)
            w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _multiply(acc, x, w, True, False, False, DOT_PRECISION, BITS)
        if PER_TENSOR:
            scale = tl.load(s_ptr)
        else:
            scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], (acc * scale).to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def persistent_programs(cfg: GemvConfig, tiles: int, device: torch.device) -> int:
    """Programs of a persistent launch: ``cfg.persistent`` per SM, at most one per tile (the interpreter counts two
    SMs, so that its programs still take several tiles each)."""
    sms = sm_count(device.index) if device.type == "cuda" and not backend.INTERPRETED else 2
    return max(1, min(tiles, cfg.persistent * sms))


def check_args(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None,
               swiglu: bool) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a call; returns (x, weight, scales as float32 [1 or N], y) with x and weight row-major."""
    if len(x.shape) != 2 or weight.ndim != 2:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    k = weight.shape[1]
    if isinstance(x, Fp8Rows):
        x.check(k)
    if x.shape[1] != (2 * k if swiglu else k):
        what = "[M, 2K] (gate | up)" if swiglu else "[M, K]"
        raise ValueError(f"x must be {what} for weight [N, K={k}], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bf16/fp16/fp32, got {x.dtype}")
    if weight.dtype not in (torch.float8_e4m3fn, x.dtype):
        raise TypeError(f"weight must be e4m3 or x's dtype {x.dtype}, got {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")
    m, n = x.shape[0], weight.shape[0]
    s = scale.reshape(-1).float()
    if s.numel() not in (1, n):
        raise ValueError(f"scale must hold 1 or {n} values, got {s.numel()}")
    x = x if isinstance(x, Fp8Rows) or x.stride(-1) == 1 else x.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (m, n) or y.dtype != x.dtype or y.stride(-1) != 1 or y.device != x.device:
        raise ValueError(f"out must be a row-major [{m}, {n}] {x.dtype} tensor on {x.device}")
    return x, w, s, y


def new_counters(device: torch.device | str) -> torch.Tensor:
    """Zeroed tile counters for split-K calls; each call leaves them zero again."""
    return torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def device_counters(device: torch.device) -> torch.Tensor:
    """The counters split-K calls on ``device`` share. Calls on one stream run one after another (with PDL too: a
    program touches them only after ``gdc_wait``), so one set serves them all; calls running at the same time on two
    streams must pass their own (``new_counters``). Made on first use, which must not be inside a CUDA-graph capture
    (serving's warm-up runs every call once before capturing)."""
    cnt = _COUNTERS.get(device)
    if cnt is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K counters would be made inside a CUDA-graph capture: run the call once first")
        cnt = _COUNTERS[device] = new_counters(device)
    return cnt


def split_plan(k: int, splits: int, block_k: int) -> tuple[int, int]:
    """(K per split, rounded up to BLOCK_K; number of non-empty splits)."""
    per = triton.cdiv(triton.cdiv(max(k, 1), splits), block_k) * block_k
    return per, max(1, triton.cdiv(k, per))


def gemv(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, scale: torch.Tensor, config: GemvConfig, *,
         out: torch.Tensor | None = None, swiglu: bool = False, counters: torch.Tensor | None = None,
         pdl: bool = False) -> torch.Tensor:
    """y = x · (s ⊙ q)ᵀ (module doc) with one ``GemvConfig``. ``counters`` (from ``new_counters``) are read only when
    the config splits K; None takes the device's shared set (``device_counters``). ``pdl`` only on a GPU.

    ``config.a8``: x is first quantised per row to e4m3 (s_x = amax/448, impl.fp8's W8A8 activation quantisation;
    with ``swiglu`` by ``fused_quant.silu_mul_quant``, in one pass over gu) and the kernel multiplies FP8 by FP8:
    y = s_x[m] · s[n] · Σ_k q_x[m, k] · q[n, k]. x may already be such rows (``fused_quant.Fp8Rows``, from a norm
    that quantised its output); y then has the rows' dtype."""
    rows = x if isinstance(x, Fp8Rows) else None
    if rows is not None and (not config.a8 or swiglu):
        raise ValueError(f"FP8 rows are the input of an FP8-activation (a8) config without swiglu, got {config}")
    x, w, s, y = check_args(x, weight, scale, out, swiglu)
    cfg = interpreter_config(config)
    (m, n), k = y.shape, w.shape[1]
    if m == 0 or n == 0:
        return y
    sx = s  # not read unless a8
    if cfg.a8:
        if w.dtype != torch.float8_e4m3fn:
            raise TypeError(f"FP8 activations need an e4m3 weight, got {w.dtype}")
        if rows is None:
            rows = silu_mul_quant(x) if swiglu else quantize_rows(x)
            swiglu = False
        x, sx = rows.codes, rows.scales.reshape(-1)
    elif swiglu and (cfg.dot or cfg.mma):  # tensor-core tiles take silu_mul's product from its own kernel (one pass)
        from impl.serve.fused import silu_mul

        x, swiglu = silu_mul(x), False
    if cfg.mma:
        from impl.serve.fp8_mma import mma_gemv

        return mma_gemv(x, w, s, y, cfg.num_warps, cfg.unroll, pdl=pdl and x.is_cuda, row_run=cfg.row_run,
                        pipe=cfg.pipe, sweep=cfg.sweep, sx=sx if cfg.a8 else None)
    block_m = cfg.rows_per_tile(m)
    on_gpu = x.is_cuda and not backend.INTERPRETED
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if on_gpu and pdl:
        launch["launch_pdl"] = True
    if cfg.persistent:
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, cfg.block_n)
        gemv_persistent_kernel[(persistent_programs(cfg, tiles, x.device),)](
            x, w, s, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), PER_TENSOR=s.numel() == 1,
            DOT_PRECISION="ieee" if y.dtype == torch.float32 else "tf32", USE_PDL=on_gpu and pdl, BLOCK_M=block_m,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BITS=uses_bits(cfg, x, w), STAGES=cfg.num_stages,
            FLATTEN=on_gpu, **launch)
        return y
    per, used = split_plan(k, cfg.splits, cfg.block_k)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, cfg.block_n), used)
    split = used > 1
    if split:
        if grid[0] * grid[1] > COUNTER_SLOTS:
            raise ValueError(f"{grid[0] * grid[1]} tiles need more than {COUNTER_SLOTS} counters; use fewer splits "
                             "or larger tiles")
        if used * m * n * 4 > MAX_WORKSPACE_BYTES:
            raise ValueError(f"split-K workspace of {used * m * n * 4} bytes is too large; use fewer splits")
        ws = torch.empty(used, m, n, dtype=torch.float32, device=x.device)
        cnt = device_counters(x.device) if counters is None else counters
        if cnt.dtype != torch.int32 or cnt.numel() < COUNTER_SLOTS or cnt.device != x.device:
            raise ValueError(f"counters must be new_counters(device): int32 [{COUNTER_SLOTS}] on {x.device}")
    else:
        ws, cnt = y, y  # not read
    pf = prefetch_row_bytes(cfg, grid[1] * grid[2], per, w) if on_gpu else 0
    gemv_kernel[grid](x, w, s, y, sx, ws, cnt, m, n, k, per, used, x.stride(0), w.stride(0), y.stride(0), pf,
                      PER_TENSOR=s.numel() == 1, SWIGLU=swiglu, SPLIT=split, DOT=cfg.dot, A8=cfg.a8,
                      FP8_DOT=on_gpu, DOT_PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
                      USE_PDL=on_gpu and pdl, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                      BITS=uses_bits(cfg, x, w), PREFETCH=pf > 0, CHUNKS=prefetch_chunks(cfg), **launch)
    return y


def prefetch_row_bytes(cfg: GemvConfig, slabs: int, per: int, w: torch.Tensor) -> int:
    """Bytes of codes each row of a program's slab asks L2 for before anything else (``_prefetch_codes``): the
    config's ``prefetch`` MiB spread over the call's ``slabs`` distinct (N tile, split) slabs of BLOCK_N rows, in
    16-byte units, at most the slab's ``per`` bytes of K. 0 (no prefetch) without ``prefetch``, for codes wider than
    a byte, or where a row's codes do not start 16-byte aligned (the bulk copy unit's rule)."""
    if (not cfg.prefetch or w.element_size() != 1 or w.stride(0) % 16 or w.shape[1] % 16 or w.data_ptr() % 16
            or per % 16):
        return 0
    per_row = (cfg.prefetch << 20) // (max(slabs, 1) * cfg.block_n) // 16 * 16
    return min(per_row, per)


def prefetch_chunks(cfg: GemvConfig) -> int:
    """Pieces each row's prefetch is cut into so that every thread of the program issues one (a power of two)."""
    return max(1, 32 * cfg.num_warps // cfg.block_n)


def uses_bits(cfg: GemvConfig, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a call decodes codes with ``_bits_to_bf16``: a ``bits`` config, bf16 x, e4m3 codes, compiled for a GPU
    (the interpreter decodes with ``.to``, the same values: ``decode_bits_reference`` is checked against it)."""
    return (cfg.bits and x.dtype == torch.bfloat16 and w.dtype == torch.float8_e4m3fn and x.is_cuda
            and not backend.INTERPRETED)


def decode_bits_reference(codes: "np.ndarray") -> "np.ndarray":
    """CPU twin of ``_bits_to_bf16``, step by step on uint32 words of 4 codes: PRMT with sign replication, shift,
    mask, then the bf16 value times 2^120 (exact). codes uint8 [4n] -> float64 [4n]."""
    import numpy as np

    c = np.ascontiguousarray(codes, dtype=np.uint8)
    if c.size % 4:
        raise ValueError(f"codes come 4 to a register, got {c.size}")
    b = c.reshape(-1, 4).astype(np.uint32)
    rep = np.where(b & 0x80, 0xFF, 0x00).astype(np.uint32)  # PRMT selector nibble 8|i: byte i's sign replicated
    t0 = b[:, 0] | rep[:, 0] << 8 | b[:, 1] << 16 | rep[:, 1] << 24  # selector 0x9180
    t1 = b[:, 2] | rep[:, 2] << 8 | b[:, 3] << 16 | rep[:, 3] << 24  # selector 0xB3A2
    lanes = []
    for t in (t0, t1):
        u = (t << 4) & 0x87F087F0
        lanes += [u & 0xFFFF, u >> 16]
    halves = np.stack([lanes[0], lanes[1], lanes[2], lanes[3]], axis=1).reshape(-1).astype(np.uint32)
    as_f32 = (halves << 16).view(np.float32).astype(np.float64)  # bf16 bits are the top half of float32's
    return as_f32 * 2.0 ** BITS_EXPONENT_SHIFT


def default_config(m: int, n: int, k: int, sms: int = 132) -> GemvConfig:
    """The configuration used where no measured table entry exists: CUDA-core tiles for up to 8 rows, tensor-core
    tiles above, and enough K splits for about four programs per SM (at most one split per 2 BLOCK_K)."""
    if m <= 8:
        block_n, block_k, dot = 16, 512, False
    else:
        block_n, block_k, dot = 64, 128, True
    bm = GemvConfig(dot=dot).rows_per_tile(m)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, block_n)
    splits = max(1, min(triton.cdiv(4 * sms, tiles), triton.cdiv(k, 2 * block_k)))
    return GemvConfig(dot=dot, block_n=block_n, block_k=block_k, splits=splits, num_stages=1 if not dot else 3)


_UNIT: dict[torch.device, torch.Tensor] = {}


def unit_scaled_mm(rows: Fp8Rows, weight: torch.Tensor, col_scale: torch.Tensor) -> ScaledRows:
    """y = (codes ⊙ s_x) · (W ⊙ s_w)ᵀ for per-token rows, kept factored as ``ScaledRows``: the FP8 GEMM runs with
    unit scales, values = round(codes · Wᵀ) in the rows' dtype ([M, N]: cuBLASLt's per-tensor FP8 GEMM on a GPU,
    float32 products on a CPU), beside the rows' scales [M, 1] and ``col_scale`` [N]; the kernel that consumes y
    applies them as it loads (``fused.unscale``). Why: cuBLASLt's row-wise-scaled FP8 kernels are slower than its
    per-tensor ones at decode shapes (H200 tune of 60408f5, Llama-3-8B: the down projection at 128 rows 29.9 µs
    deferred against 45.2 row-wise, wqkv at one row 11.9 against 20.7), and the scales cost the consumer two
    multiplies. y's rounding: values are rounded to the dtype once and the scaled product once more (two roundings
    where the row-wise GEMM makes one)."""
    codes = rows.codes
    if codes.is_cuda:
        one = _UNIT.get(codes.device)
        if one is None:
            one = _UNIT[codes.device] = torch.ones((), dtype=torch.float32, device=codes.device)
        out = rows.dtype if rows.dtype in (torch.bfloat16, torch.float16) else torch.float32
        values = torch._scaled_mm(codes, weight.t(), scale_a=one, scale_b=one, out_dtype=out).to(rows.dtype)
    else:
        values = (codes.float() @ weight.float().t()).to(rows.dtype)
    return ScaledRows(values, rows.scales, col_scale)


class DecodeFp8Linear(nn.Module):
    """impl.fp8's ``Fp8Linear`` (``inner``) served through a measured choice per number of rows M.

    ``choice(m)`` (``choose.GemmChoice``) says which path serves M rows: ``w8a16`` (this module's kernel with a
    ``GemvConfig``), ``inner`` (impl.fp8's path: W8A8 ``torch._scaled_mm`` with per-token activation scales on a
    GPU, dequantize + GEMM on a CPU) or ``deferred`` (W8A8 with unit scales, ``unit_scaled_mm``: the result is
    ``ScaledRows`` when the caller asks for it with ``defer=True``, its consumer applying the scales, else made dense
    here). ``use_kernel`` None = the kernels only for CUDA tensors (the CPU runs ``inner``, which the interpreter
    would only slow down); True forces them (tests run them under the interpreter at toy size).
    """

    takes_swiglu = True  # forward(gu, swiglu=True) computes W · silu_mul(gu) (model.FeedForward uses it)

    def __init__(self, inner: nn.Module, use_kernel: bool | None = None, table=None) -> None:
        super().__init__()
        group = getattr(getattr(inner, "group", None), "name", None)
        if inner.weight.dtype != torch.float8_e4m3fn or group not in ("tensor", "channel"):
            raise ValueError(f"DecodeFp8Linear needs an e4m3 weight with per-tensor or per-channel scales, got "
                             f"{inner.weight.dtype} with {group} scales")
        from impl.serve import choose

        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.use_kernel = use_kernel
        self.table = table if table is not None else choose.active_table()

    @property
    def path(self) -> str:
        """The paths this layer may take; which one serves which M is the table's (engines report the table)."""
        return f"w8a16-triton-or-mma | {self.inner.path}{' | deferred' if self.can_defer else ''} per GEMM table"

    def choice(self, m: int):
        choice = self.table.lookup(self.out_features, self.in_features, m)
        if choice.path == "deferred" and not self.can_defer:
            from impl.serve.choose import rule_choice

            return rule_choice(self.out_features, self.in_features, m)
        return choice

    @property
    def can_defer(self) -> bool:
        """Whether the ``deferred`` path computes this layer: no bias and no static input scale (the activation
        scales are the rows' own)."""
        return self.inner.bias is None and self.inner.input_scale is None

    @property
    def col_scale(self) -> torch.Tensor:
        """The weight scales as ``ScaledRows.col_scale``: float32 [N] (impl.fp8's row-wise operand, made once)."""
        return self.inner.row_scale().reshape(-1)

    def _kernel(self, device: torch.device | str) -> bool:
        return self.use_kernel if self.use_kernel is not None else torch.device(device).type == "cuda"

    def takes_fp8_rows(self, m: int, device: torch.device) -> bool:
        """Whether M rows on ``device`` take a path that first quantises them per token to e4m3 (W8A8: the
        FP8-activation tiles of ``gemv``, the deferred path, or impl.fp8's row-wise ``_scaled_mm``), so that the
        kernel producing them may hand over ``Fp8Rows`` instead (``fused_quant``: the same codes, without a kernel of
        their own)."""
        if not self._kernel(device):
            return False
        choice = self.choice(m)
        if choice.path == "w8a16":
            return choice.config.a8
        return choice.path == "deferred" or self.inner.quantizes_per_token

    def defers_scale(self, m: int, device: torch.device) -> bool:
        """Whether ``forward(x, defer=True)`` of M rows on ``device`` returns ``ScaledRows`` (the deferred path)."""
        return self._kernel(device) and self.choice(m).path == "deferred"

    def forward(self, x: torch.Tensor | Fp8Rows | ScaledRows, swiglu: bool = False,
                defer: bool = False) -> torch.Tensor | ScaledRows:
        """y for x [..., K] (or ``Fp8Rows`` [M, K] where ``takes_fp8_rows(M)``); with ``swiglu`` x is [..., 2K] =
        [gate | up] (a tensor or ``ScaledRows``) and y = W · silu_mul(x). ``defer``: ``ScaledRows`` where the path
        for M rows is ``deferred``. A path that takes FP8 rows gets them from ``fused_quant`` (``silu_mul_quant`` for
        a SwiGLU input, ``quantize_rows`` otherwise): the codes impl.fp8's quantiser would make, in one kernel."""
        if isinstance(x, Fp8Rows):
            return self.forward_fp8_rows(x, defer)
        if isinstance(x, ScaledRows) and not swiglu:
            x = x.dense()
        lead = x.shape[:-1]
        x2 = x if isinstance(x, ScaledRows) else x.reshape(-1, x.shape[-1])
        m = x2.shape[0]
        if self.takes_fp8_rows(m, x.device):
            y = self.forward_fp8_rows(silu_mul_quant(x2) if swiglu else quantize_rows(x2), defer)
            return y if isinstance(y, ScaledRows) else y.reshape(*lead, self.out_features)
        config = self.choice(m).config if self._kernel(x.device) else None  # a W8A16 kernel's, or None: inner
        if swiglu and (config is None or isinstance(x2, ScaledRows)):  # the product first, then bf16 activations
            from impl.serve.fused import silu_mul

            fused = x.device.type == "cuda" or isinstance(x2, ScaledRows)  # the SwiGLU kernel applies the scales
            x2, swiglu = silu_mul(x2) if fused else swiglu_torch(x2), False
        if config is None:
            return self.inner(x2).reshape(*lead, self.out_features)
        y = gemv(x2, self.inner.weight, self.inner.weight_scale, config, swiglu=swiglu, pdl=self.table.pdl)
        return y.reshape(*lead, self.out_features)

    def forward_fp8_rows(self, rows: Fp8Rows, defer: bool = False) -> torch.Tensor | ScaledRows:
        """y [M, N] for activations already quantised per token (``Fp8Rows``), by the path the table holds for M
        (``ScaledRows`` with ``defer`` on the deferred path)."""
        m = rows.shape[0]
        if not self.takes_fp8_rows(m, rows.device):
            raise ValueError(f"this layer serves {m} rows on {rows.device} without FP8 activations; pass a tensor")
        choice = self.choice(m)
        if choice.path == "deferred":
            rows.check(self.in_features)
            y = unit_scaled_mm(rows, self.inner.weight, self.col_scale)
            return y if defer else y.dense()
        if choice.path == "w8a16":
            return gemv(rows, self.inner.weight, self.inner.weight_scale, choice.config, pdl=self.table.pdl)
        return self.inner.forward_fp8_rows(rows.codes, rows.scales).to(rows.dtype)


def swiglu_torch(gu: torch.Tensor) -> torch.Tensor:
    """silu(g) · u for gu = [g | u], rounded to gu's dtype after each op (torch's order, as ``fused.silu_mul``)."""
    g, u = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u
