"""Split-K variant of the W8A16 decode GEMM, for measuring against ``fp8_gemv`` (serving does not use it yet).

    partial[s, m, n] = Σ_{k in split s} x[m, k] · q[n, k]         (one program per (BLOCK_N rows, split s))
    y[m, n]          = s_w[n] · Σ_s partial[s, m, n]               (a second kernel, splits summed in a fixed order)

Why: at batch 1 a [BLOCK_N, K] slab per program leaves few programs for the small-N projections of a decode step
(Llama-3-8B's o_proj: 4096 rows -> 256 programs of 16 rows on 132 SMs), so too few bytes are in flight to stream the
weights at copy bandwidth. Splitting K multiplies the programs; the partials are float32 ``[S, M, N]`` (a few hundred KB
at decode sizes) and the fixed-order sum keeps the result deterministic (no atomics). ``benches/bench_serve.py`` times
it beside the serving kernel.
"""
from __future__ import annotations

import impl  # noqa: F401  (backend before triton)
import torch
import triton
import triton.language as tl

from impl import backend
from impl.serve.fp8_gemv import check_w8a16_args, dot_codes, dot_meta


@triton.jit
def partial_kernel(x_ptr, w_ptr, ws_ptr, M, N, K, k_per_split, stride_xm, stride_wn,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)  # k_per_split is a multiple of BLOCK_K: splits never overlap
    acc = dot_codes(x_ptr, w_ptr, offs_m, offs_n, m_mask, n_mask, k_lo, k_hi, stride_xm, stride_wn,
                    DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    ws = ws_ptr + split * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ws, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def reduce_kernel(ws_ptr, s_ptr, y_ptr, M, N, SPLITS, stride_ym, PER_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], tl.float32)
    for split in range(0, SPLITS):  # a fixed order: the same bits on every call
        acc += tl.load(ws_ptr + split * M * N + offs, mask=mask, other=0.0)
    m, n = offs // N, offs % N
    scale = tl.load(s_ptr) if PER_TENSOR else tl.load(s_ptr + n, mask=mask, other=0.0)
    tl.store(y_ptr + m * stride_ym + n, (acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


def choose_splits(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """Enough splits for about two programs per SM, at most one per BLOCK_K chunk of K."""
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(n, block_n)), triton.cdiv(k, block_k)))


def w8a16_linear_splitk(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None,
                        splits: int | None = None, block_n: int = 32, block_k: int = 256, num_warps: int = 4,
                        num_stages: int = 3) -> torch.Tensor:
    """y = x · (s ⊙ q)ᵀ as ``fp8_gemv.w8a16_linear`` computes it, with K cut into ``splits`` parts (None: enough
    for two programs per SM). Same arguments and checks, plus ``splits >= 1``."""
    x, w, s, y = check_w8a16_args(x, weight, scale, out)
    (m, k), n = x.shape, w.shape[0]
    if not backend.ON_GPU or backend.INTERPRETED:
        block_n, block_k, num_stages = 16, 32, 1  # interpreter: small tiles, so small tests still split
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    splits = choose_splits(n, k, block_n, block_k, sms) if splits is None else splits
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if not (m and n):
        return y
    k_per_split = triton.cdiv(triton.cdiv(max(k, 1), splits), block_k) * block_k
    used = max(1, triton.cdiv(k, k_per_split))  # rounding k_per_split up can leave trailing splits empty
    ws = torch.empty(used, m, n, dtype=torch.float32, device=x.device)
    partial_kernel[(triton.cdiv(n, block_n), used)](
        x, w, ws, m, n, k, k_per_split, x.stride(0), w.stride(0), **dot_meta(x),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    block = 256
    reduce_kernel[(triton.cdiv(m * n, block),)](ws, s, y, m, n, used, y.stride(0), PER_TENSOR=s.numel() == 1,
                                                BLOCK=block)
    return y
