"""Convolution y = act(conv2d(x, W) + b + r) in Triton, as an implicit GEMM with deterministic split-K.

Shapes (NCHW, groups = 1): x [B, C, H, W], W [CO, C, KH, KW], b [CO] or None, residual r [B, CO, HO, WO] or None,
y [B, CO, HO, WO] with HO = (H + 2·pad − KH) // stride + 1 (same for WO). dtype float16 or float32; float32
accumulation; act is identity or ReLU. FLOPs: 2·B·HO·WO·CO·C·KH·KW. Bytes (ideal): x + W + b + r + y.

The GEMM view: rows are output pixels (M = B·HO·WO), columns output channels (N = CO), the reduction runs over
K = C·KH·KW with W read as a row-major [CO, K] matrix and x gathered on the fly (padding by masks). At batch 1 with
a small image, M is tiny and the layer streams W once: memory-bound, like the GEMV. Few (M, N) tiles cannot keep
132 SMs busy, so the reduction is split ``split_k`` ways into a float32 workspace [split_k, M, N] that a second
kernel sums in a fixed order (no atomics: results are bit-reproducible), applying bias, residual and ReLU.
"""
from __future__ import annotations

import impl  # noqa: F401  (backend before triton)
import numpy as np
import torch
import triton
import triton.language as tl

from impl.l2cache.linear import DTYPES, _overlaps, _precision


# shapes stay unspecialised (one compiled kernel per flag set, not per shape); KH/KW stay constexpr so the
# im2col index arithmetic divides by constants
_SHAPES = ["C", "H", "W", "CO", "HO", "WO", "M", "K", "K_PER_SPLIT", "STRIDE", "PAD"]


@triton.jit(do_not_specialize=_SHAPES)
def conv2d_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, ws_ptr,  # x, W [CO, K], b, residual, y, workspace
                  C, H, W, CO, HO, WO, M, K, K_PER_SPLIT, STRIDE, PAD,
                  KH: tl.constexpr, KW: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, SPLIT: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (b, ho, wo) flattened
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    split = tl.program_id(2)
    m_mask, n_mask = offs_m < M, offs_n < CO
    bi = offs_m // (HO * WO)
    ho = (offs_m % (HO * WO)) // WO
    wo = offs_m % WO
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        ci = offs_k // (KH * KW)
        kh = (offs_k % (KH * KW)) // KW
        kw = offs_k % KW
        hi = ho[:, None] * STRIDE - PAD + kh[None, :]
        wi = wo[:, None] * STRIDE - PAD + kw[None, :]
        inside = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)  # zero padding by masking
        a_mask = m_mask[:, None] & k_mask[None, :] & inside
        a = tl.load(x_ptr + ((bi[:, None] * C + ci[None, :]) * H + hi) * W + wi, mask=a_mask, other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(w), input_precision=PRECISION)
    if SPLIT == 1:
        out_off = ((bi[:, None] * CO + offs_n[None, :]) * HO + ho[:, None]) * WO + wo[:, None]
        out_mask = m_mask[:, None] & n_mask[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(y_ptr + out_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws_off = (split * M + offs_m[:, None]) * CO + offs_n[None, :]
        tl.store(ws_ptr + ws_off, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["CO", "HO", "WO", "M"])
def splitk_epilogue_kernel(ws_ptr, b_ptr, r_ptr, y_ptr,  # workspace [SPLIT, M, CO] float32 -> y [B, CO, HO, WO]
                           CO, HO, WO, M,
                           HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, SPLIT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < CO)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT):  # fixed order: the sum is the same on every run
        acc += tl.load(ws_ptr + (s * M + offs_m[:, None]) * CO + offs_n[None, :], mask=mask, other=0.0)
    bi = offs_m // (HO * WO)
    ho = (offs_m % (HO * WO)) // WO
    wo = offs_m % WO
    out_off = ((bi[:, None] * CO + offs_n[None, :]) * HO + ho[:, None]) * WO + wo[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < CO, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + out_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


def conv_out_hw(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def _check_conv(x, w, b, residual, out, stride: int, padding: int) -> tuple[int, int]:
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"x must be [B, C, H, W] and W [CO, C, KH, KW], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"channels differ: x has C={x.shape[1]}, W expects {w.shape[1]} (groups=1 only)")
    if x.dtype not in DTYPES or w.dtype != x.dtype or any(t is not None and t.dtype != x.dtype for t in (b, residual)):
        raise TypeError(f"x, W, b and residual must share dtype float16 or float32, got {x.dtype} and {w.dtype}")
    if stride < 1 or padding < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], w.shape[2], w.shape[3], stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"the kernel {tuple(w.shape[2:])} does not fit the padded input {tuple(x.shape[2:])} "
                         f"(padding={padding})")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"b must be [CO] = [{w.shape[0]}], got {tuple(b.shape)}")
    shape = (x.shape[0], w.shape[0], ho, wo)
    if residual is not None and tuple(residual.shape) != shape:
        raise ValueError(f"residual must be {shape}, got {tuple(residual.shape)}")
    if out is not None:
        if tuple(out.shape) != shape or out.dtype != x.dtype:
            raise ValueError(f"out must be {shape} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
        if any(t is not None and _overlaps(out, t) for t in (x, w, b, residual)):
            raise ValueError("out must not overlap x, W, b or residual (other programs still read them)")
    if not all(t.is_contiguous() for t in (x, w, b, residual, out) if t is not None):
        raise ValueError("x, W, b, residual and out must be contiguous")
    return ho, wo


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, stride: int = 1, padding: int = 0,
           residual: torch.Tensor | None = None, relu: bool = False, out: torch.Tensor | None = None,
           split_k: int = 1, workspace: torch.Tensor | None = None, precision: str = "ieee") -> torch.Tensor:
    """Return act(conv2d(x, W, stride, padding) + b + residual) (see the module doc). With ``split_k > 1`` a
    float32 ``workspace`` of at least split_k·M·CO elements is used (allocated if not given)."""
    ho, wo = _check_conv(x, w, b, residual, out, stride, padding)
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    bsz, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    out = torch.empty((bsz, co, ho, wo), dtype=x.dtype, device=x.device) if out is None else out
    m, k = bsz * ho * wo, c * kh * kw
    if m == 0 or co == 0:
        return out
    if split_k > 1:
        need = split_k * m * co
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=x.device)
        if workspace.dtype != torch.float32 or workspace.numel() < need or not workspace.is_contiguous():
            raise ValueError(f"workspace must be contiguous float32 with >= {need} elements")
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 32
    k_per_split = triton.cdiv(triton.cdiv(max(k, 1), split_k), 32) * 32  # whole BLOCK_K steps per split
    placeholder = out  # for pointers the kernel never reads (HAS_BIAS / HAS_RES False, SPLIT == 1)
    grid = (triton.cdiv(m, bm), triton.cdiv(co, bn), split_k)
    conv2d_kernel[grid](x, w, placeholder if b is None else b, placeholder if residual is None else residual, out,
                        placeholder if workspace is None else workspace,
                        c, h, wd, co, ho, wo, m, k, k_per_split, stride, padding, KH=kh, KW=kw,
                        HAS_BIAS=b is not None, HAS_RES=residual is not None, RELU=relu, SPLIT=split_k,
                        PRECISION=_precision(x.dtype, precision), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, num_warps=4)
    if split_k > 1:
        splitk_epilogue_kernel[(triton.cdiv(m, 64), triton.cdiv(co, 64))](
            workspace, placeholder if b is None else b, placeholder if residual is None else residual, out,
            co, ho, wo, m, HAS_BIAS=b is not None, HAS_RES=residual is not None, RELU=relu, SPLIT=split_k,
            BLOCK_M=64, BLOCK_N=64, num_warps=4)
    return out


def pick_split_k(m: int, co: int, k: int, target_programs: int = 264) -> int:
    """Enough K-splits that the (M, N) tiles times splits reach ``target_programs``, with >= 4 K-steps each."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    tiles = triton.cdiv(m, bm) * triton.cdiv(co, 32)
    return int(max(1, min(triton.cdiv(target_programs, tiles), k // (4 * 32))))


def conv2d_reference(x, w, b=None, *, stride: int = 1, padding: int = 0, residual=None, relu: bool = False):
    """float64 reference on the CPU with torch's conv2d."""
    from fixtures.oracle import to_numpy

    t = lambda a: torch.from_numpy(np.asarray(to_numpy(a), dtype=np.float64))  # noqa: E731
    y = torch.nn.functional.conv2d(t(x), t(w), None if b is None else t(b), stride=stride, padding=padding)
    if residual is not None:
        y = y + t(residual)
    return (torch.relu(y) if relu else y).numpy()


def conv_flops(bsz: int, c: int, co: int, ho: int, wo: int, kh: int, kw: int) -> int:
    return 2 * bsz * ho * wo * co * c * kh * kw
