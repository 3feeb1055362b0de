"""Per-token FP8 activation quantisation fused into the kernel that produces the activation (W8A8 inputs).

A W8A8 linear (``torch._scaled_mm`` row-wise, or the FP8-activation tiles of ``fp8_gemv``) needs its input x [T, K]
as e4m3 codes with one scale per token, impl.fp8's dynamic per-row quantisation:

    s[t] = max(amax_k |x[t, k]| / 448, MIN_SCALE)  (1.0 for a row of zeros; NaN and ±inf never set it)
    q[t, k] = rne(clamp(x[t, k] · (1 / s[t]), ±448))

Run as its own kernel that is one more launch and one more read and write of x per linear (at batch 256 of an 8B
model ~3.4 µs each, 128 per step). Here the producer quantises instead of storing x:

- ``rmsnorm_quant``: the RMSNorm (+ residual) of ``fused.rmsnorm``, its row rounded to the model dtype as that kernel
  stores it, then quantised (the norm already holds the whole row, so the amax costs a register reduction).
- ``silu_mul_quant``: silu(g) · u of ``fused.silu_mul``, one program per row: held in registers (rows up to
  ``SILU_ROW`` products), or in two passes over it (the amax, then the codes, recomputing the product from L1/L2).

The codes and scales are bit-identical to ``impl.fp8.quant.quantize(producer(x), "channel", "e4m3")``: the same
rounded activations go through impl.fp8's own scale and encode helpers. ``Fp8Rows`` carries them to the linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import impl  # noqa: F401  (backend before triton)
import torch
import triton
import triton.language as tl

from impl.fp8.formats import E4M3, MIN_SCALE
from impl.fp8.kernels import _encode, _finite_abs, _max_finite_abs, _scale_from_amax
from impl.fp8.quant import EMULATE
from impl.serve.fused import (ScaledRows, check_gu, check_norm_args, early_trigger, load_gu, norm_row, norm_warps,
                               silu_mul_rounded, unpack)

SILU_ROW = 16384  # rows of gu up to this many products are quantised from registers in one pass
SILU_BLOCK = 2048  # columns per step of silu_mul_quant's two passes over longer rows


@dataclass(frozen=True)
class Fp8Rows:
    """Activations x [T, K] as x ≈ codes · scales: codes [T, K] float8_e4m3fn, scales [T, 1] float32 (one per token);
    ``dtype``: the dtype x had (a linear taking these rows returns that dtype)."""

    codes: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def check(self, k: int) -> None:
        """Raise unless these are [T, k] e4m3 codes with [T, 1] float32 scales on one device."""
        c, s = self.codes, self.scales
        if c.dtype != torch.float8_e4m3fn or c.ndim != 2 or c.shape[1] != k or c.stride(-1) != 1:
            raise ValueError(f"FP8 rows must be row-major [T, {k}] float8_e4m3fn codes, got {c.dtype} "
                             f"{tuple(c.shape)}")
        if s.dtype != torch.float32 or tuple(s.shape) != (c.shape[0], 1) or s.device != c.device:
            raise ValueError(f"FP8 row scales must be float32 [{c.shape[0]}, 1] on {c.device}, got {s.dtype} "
                             f"{tuple(s.shape)} on {s.device}")


@triton.jit
def quantize_row(y, mask, q_ptr, s_ptr, row, stride_q, cols,
                 FMAX: tl.constexpr, MIN_SCALE: tl.constexpr, EMULATE: tl.constexpr):
    """Store row ``row`` of y [BLOCK] (masked columns zero) as e4m3 codes with its per-row scale."""
    yf = y.to(tl.float32)
    s = _scale_from_amax(tl.max(_finite_abs(yf), axis=0), FMAX, MIN_SCALE)
    codes = _encode(yf * tl.math.div_rn(1.0, s), 0, FMAX, EMULATE)
    tl.store(q_ptr + row * stride_q + cols, codes, mask=mask)
    tl.store(s_ptr + row, s)


@triton.jit
def rmsnorm_quant_kernel(x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, h_ptr,    # codes uint8 [T, N], scales [T]
                         xr_ptr, xc_ptr,                              # X_SCALED: x's row and column scales
                         n_cols, stride_x, stride_r, stride_q, stride_h, eps,
                         HAS_RESIDUAL: tl.constexpr, X_SCALED: tl.constexpr, BLOCK: tl.constexpr,
                         FMAX: tl.constexpr, MIN_SCALE: tl.constexpr, EMULATE: tl.constexpr, TRIGGER: tl.constexpr):
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    y, mask = norm_row(x_ptr, r_ptr, w_ptr, h_ptr, xr_ptr, xc_ptr, row, n_cols, stride_x, stride_r, stride_h, eps,
                       HAS_RESIDUAL, X_SCALED, BLOCK)
    quantize_row(y, mask, q_ptr, s_ptr, row, stride_q, tl.arange(0, BLOCK), FMAX, MIN_SCALE, EMULATE)


@triton.jit
def silu_mul_quant_kernel(gu_ptr, q_ptr, s_ptr, xr_ptr, xc_ptr, n_cols, stride_gu, stride_q,
                          BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, X_SCALED: tl.constexpr, FMAX: tl.constexpr,
                          MIN_SCALE: tl.constexpr, EMULATE: tl.constexpr, TRIGGER: tl.constexpr):
    """One program per row. ONE_PASS: the row is one BLOCK, loaded at once and quantised from registers; else two
    passes of BLOCK columns (the amax, then the codes, recomputing the product from L1/L2). X_SCALED: gu is
    ``ScaledRows`` values, scaled as loaded."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    src = gu_ptr + row * stride_gu
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        g, u = load_gu(src, xr_ptr, xc_ptr, row, cols, mask, n_cols, X_SCALED)
        a = silu_mul_rounded(g, u)
        quantize_row(a, mask, q_ptr, s_ptr, row, stride_q, cols, FMAX, MIN_SCALE, EMULATE)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            mask = cols < n_cols
            g, u = load_gu(src, xr_ptr, xc_ptr, row, cols, mask, n_cols, X_SCALED)
            a = silu_mul_rounded(g, u)
            amax = _max_finite_abs(amax, a.to(tl.float32))
        s = _scale_from_amax(tl.max(amax, axis=0), FMAX, MIN_SCALE)
        inv = tl.math.div_rn(1.0, s)
        for k0 in range(0, n_cols, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            mask = cols < n_cols
            g, u = load_gu(src, xr_ptr, xc_ptr, row, cols, mask, n_cols, X_SCALED)
            a = silu_mul_rounded(g, u)
            tl.store(q_ptr + row * stride_q + cols, _encode(a.to(tl.float32) * inv, 0, FMAX, EMULATE),
                     mask=mask)
        tl.store(s_ptr + row, s)


# ---- thin wrappers ------------------------------------------------------------------------------------------------

def _empty_rows(t: int, k: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(t, k, dtype=torch.uint8, device=like.device),
            torch.empty(t, 1, dtype=torch.float32, device=like.device))


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"FP8 activations are quantised from bf16/fp16/fp32, got {x.dtype}")


def rmsnorm_quant(x: torch.Tensor | ScaledRows, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None = None) -> tuple[Fp8Rows, torch.Tensor | None]:
    """(rmsnorm(x [+ residual]) as per-token e4m3 rows, x + residual or None); shapes as ``fused.rmsnorm``."""
    x, xr, xc, scaled = unpack(x)
    r = check_norm_args(x, weight, residual)
    _check_dtype(x)
    t, n = x.shape
    q, s = _empty_rows(t, n, x)
    h = torch.empty_like(x) if residual is not None else None
    hh = h if h is not None else x  # not written without a residual
    if t:
        rmsnorm_quant_kernel[(t,)](x, r, weight, q, s, hh, xr, xc, n, x.stride(0), r.stride(0), q.stride(0),
                                   hh.stride(0), eps, HAS_RESIDUAL=residual is not None, X_SCALED=scaled,
                                   BLOCK=triton.next_power_of_2(n),
                                   FMAX=E4M3.max, MIN_SCALE=MIN_SCALE, EMULATE=EMULATE, TRIGGER=early_trigger(x),
                                   num_warps=norm_warps(n))
    return Fp8Rows(q.view(torch.float8_e4m3fn), s, x.dtype), h


def silu_mul_quant(gu: torch.Tensor | ScaledRows) -> Fp8Rows:
    """silu(gu[:, :F]) · gu[:, F:] (rounded as ``fused.silu_mul``) for gu [T, 2F] (or ``ScaledRows``), as per-token
    e4m3 rows [T, F]."""
    gu, xr, xc, scaled = unpack(gu)
    f = check_gu(gu)
    _check_dtype(gu)
    t = gu.shape[0]
    q, s = _empty_rows(t, f, gu)
    if t:
        block = triton.next_power_of_2(max(f, 1))
        one_pass = block <= SILU_ROW
        block = block if one_pass else SILU_BLOCK
        silu_mul_quant_kernel[(t,)](gu, q, s, xr, xc, f, gu.stride(0), q.stride(0), BLOCK=block, ONE_PASS=one_pass,
                                    X_SCALED=scaled, FMAX=E4M3.max, MIN_SCALE=MIN_SCALE, EMULATE=EMULATE,
                                    TRIGGER=early_trigger(gu), num_warps=silu_quant_warps(block, t))
    return Fp8Rows(q.view(torch.float8_e4m3fn), s, gu.dtype)


def silu_quant_warps(block: int, rows: int) -> int:
    """Warps of a ``silu_mul_quant`` program: ~1024 columns per warp (4 to 16), 32 for one-pass rows of 16384 at
    256+ rows (H200: 8.8 against 9.9 µs at 256 x 14336; at 128 rows 32 warps took 24 µs against 7.3). The codes do
    not depend on it (the amax is a max)."""
    if block >= SILU_ROW and rows >= 256:
        return 32
    return max(4, min(16, block // 1024))


def quantize_rows(x: torch.Tensor) -> Fp8Rows:
    """x [T, K] as per-token e4m3 rows by impl.fp8's own quantiser (the unfused path, and these kernels' oracle)."""
    from impl.fp8 import quant

    codes, scales = quant.quantize(x, "channel", "e4m3")
    return Fp8Rows(codes, scales.reshape(-1, 1), x.dtype)
