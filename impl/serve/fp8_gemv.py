"""Weight-only FP8 GEMM for decode-sized batches (W8A16): y = (x · qᵀ) ⊙ s, in Triton.

    y[m, n] = s[n] · Σ_k x[m, k] · q[n, k]        x [M, K] bf16/fp16/fp32, q [N, K] e4m3, s [N] (or one) float32

Why: at batch 1-128 a decode step is bound by reading the weights, and halving their bytes only pays if the GEMM
streams them at full bandwidth. cuBLASLt's FP8 ``_scaled_mm`` does not at small M (H100, this repo's fp8 benches:
M = 1, 8192² took 82 µs per-tensor and 148 µs with row-wise scales + activation quantisation, vs 80 µs for bf16), so
serving decodes through this kernel instead: each program streams a [BLOCK_N, K] slab of FP8 codes once, converts
them to the activation dtype in registers and accumulates x · qᵀ on the tensor cores in float32; the per-channel scale
multiplies the [M, BLOCK_N] result at the end. No activation quantisation (x stays bf16), so it is also more exact
than the W8A8 path. Prefill-sized inputs (M > ``MAX_M``) keep impl.fp8's ``_scaled_mm`` path.
"""
from __future__ import annotations

import impl  # noqa: F401  (backend before triton)
import torch
import triton
import triton.language as tl
from torch import nn

from impl import backend

MAX_M = 128  # one M tile holds the whole batch, so every weight byte is read once per call


def _configs() -> list[triton.Config]:
    if not backend.ON_GPU or backend.INTERPRETED:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4),
                                 (64, 256, 8, 3))]


CONFIGS = _configs()


@triton.jit
def dot_codes(x_ptr, w_ptr, offs_m, offs_n, m_mask, n_mask, k_lo, k_hi, stride_xm, stride_wn,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] = Σ_{k_lo <= k < k_hi} x[m, k] · q[n, k] in float32: the FP8 codes of each [BLOCK_N,
    BLOCK_K] slab are read once and converted to x's dtype in registers (tensor-core dot). Shared by the serving
    kernel (the whole of K) and the split-K variant (one split)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kk[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def w8a16_kernel(x_ptr, w_ptr, s_ptr, y_ptr,           # x [M, K], codes [N, K], scales [N] or [1], y [M, N]
                 M, N, K, stride_xm, stride_wn, stride_ym,
                 PER_TENSOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = dot_codes(x_ptr, w_ptr, offs_m, offs_n, m_mask, n_mask, 0, K, stride_xm, stride_wn,
                    DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if PER_TENSOR:
        scale = tl.load(s_ptr)
    else:
        scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    y = acc * scale
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


w8a16_tuned = triton.autotune(configs=CONFIGS, key=["N", "K", "BLOCK_M"])(w8a16_kernel)


def check_w8a16_args(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None):
    """Validate a W8A16 call; returns (x, codes, scales as float32 [1 or N], y) with x and the codes row-major."""
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [M, K] and weight [N, K] must share K, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype != torch.float8_e4m3fn or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"need an e4m3 weight and a bf16/fp16/fp32 x, got {weight.dtype} and {x.dtype}")
    m, n = x.shape[0], weight.shape[0]
    if m > MAX_M:
        raise ValueError(f"w8a16_linear serves at most {MAX_M} rows (decode); got {m}")
    s = scale.reshape(-1).float()
    if s.numel() not in (1, n):
        raise ValueError(f"scale must hold 1 or {n} values, got {s.numel()}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (m, n) or y.dtype != x.dtype or y.stride(-1) != 1:
        raise ValueError(f"out must be a row-major [{m}, {n}] {x.dtype} tensor")
    return x, w, s, y


def dot_meta(x: torch.Tensor) -> dict:
    """The launch constants both W8A16 wrappers pass: ``DOT_PRECISION`` (exact products for fp32 x) and ``BLOCK_M``
    (x's rows, padded to a tensor-core tile)."""
    return dict(DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                BLOCK_M=max(16, triton.next_power_of_2(x.shape[0])))


def w8a16_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None,
                 config: triton.Config | None = None) -> torch.Tensor:
    """y = x · (s ⊙ q)ᵀ for x [M, K] (M <= MAX_M), q [N, K] float8_e4m3fn, s [N] / [N, 1] / one float32 scale.
    ``config`` (one of ``CONFIGS``) skips the autotuner: tests check every config without tuning each shape."""
    x, w, s, y = check_w8a16_args(x, weight, scale, out)
    (m, k), n = x.shape, w.shape[0]
    if m and n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        kw = dict(PER_TENSOR=s.numel() == 1, **dot_meta(x))
        if config is None:
            w8a16_tuned[grid](x, w, s, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), **kw)
        else:
            w8a16_kernel[grid](x, w, s, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), **kw, **config.kwargs,
                               num_warps=config.num_warps, num_stages=config.num_stages)
    return y


class DecodeFp8Linear(nn.Module):
    """impl.fp8's ``Fp8Linear`` (``inner``) plus the W8A16 kernel for inputs of at most ``MAX_M`` rows.

    ``use_kernel`` None = on for CUDA tensors (the CPU runs ``inner``'s dequantize path, which the interpreter would
    only slow down); True forces the kernel (tests run it under the interpreter at toy size).
    """

    def __init__(self, inner: nn.Module, use_kernel: bool | None = None) -> None:
        super().__init__()
        group = getattr(getattr(inner, "group", None), "name", None)
        if inner.weight.dtype != torch.float8_e4m3fn or group not in ("tensor", "channel"):
            raise ValueError(f"DecodeFp8Linear needs an e4m3 weight with per-tensor or per-channel scales, got "
                             f"{inner.weight.dtype} with {group} scales")
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.use_kernel = use_kernel
        self.path = f"w8a16-triton (M<={MAX_M}) + {inner.path}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        kernel = self.use_kernel if self.use_kernel is not None else x.is_cuda
        if not kernel or x2.shape[0] > MAX_M:
            return self.inner(x)
        return w8a16_linear(x2, self.inner.weight, self.inner.weight_scale).reshape(*lead, self.out_features)
