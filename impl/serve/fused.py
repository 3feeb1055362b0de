"""Fused Triton kernels for the decoder's small ops, so a GPU decode step is ~10 kernels per layer instead of ~35.

At batch 1 a step of an 8B model reads ~15 GB of weights in ~5 ms, while each tiny elementwise kernel costs ~2 µs
even inside a CUDA graph: unfused, RMSNorm (6 ops), RoPE on q and k (~10), the KV-cache writes (2) and SwiGLU (2)
add ~2.5 ms per step. These kernels do each group in one pass, rounding where torch/HF round (the model dtype after
each elementwise op), so fused and unfused agree to the last bit or two:

- ``rmsnorm``: y = w ⊙ round(x / sqrt(mean(x²) + eps)); with a residual r, first h = round(x + r) (also returned).
- ``rope_split``: from the fused projection qkv [T, (H + 2·KVH)·D] writes RoPE(q) to q_out [T, H, D] and RoPE(k), v
  to rows ``slots`` of k_out/v_out [S, KVH, D] (the paged cache itself, or scratch tensors), with HF's
  x·cos + rotate_half(x)·sin, each product and the sum rounded to the model dtype.
- ``silu_mul``: out = round(round(silu(g)) · u) for gu = [g | u] [T, 2F] → [T, F].

Each kernel also takes its input as ``ScaledRows``: the unscaled output of an FP8 GEMM with its per-token and
per-channel scales beside it, y = round((values · row_scale) · col_scale), which the kernel applies as it loads (the
FP8 GEMM then runs with unit scales: ``fp8_gemv.DecodeFp8Linear``'s ``deferred`` path).

The model uses them on a GPU (``Transformer(fused=...)``); CI runs them under TRITON_INTERPRET=1 against the
torch ops they replace.
"""
from __future__ import annotations

from dataclasses import dataclass

import impl  # noqa: F401  (backend before triton)
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from impl import backend


@dataclass(frozen=True)
class ScaledRows:
    """y [T, N] = round((values · row_scale) · col_scale) to values' dtype, kept factored: values [T, N] (an FP8
    GEMM's output with unit scales, x_q · W_qᵀ, rounded to the model dtype), row_scale [T, 1] float32 (one per
    token), col_scale [N] float32 (one per output channel). A fused kernel applies the scales as it loads its input
    (``unscale``); ``dense`` computes y in torch, the same float32 products in the same order."""

    values: torch.Tensor
    row_scale: torch.Tensor
    col_scale: torch.Tensor

    def __post_init__(self) -> None:
        v, r, c = self.values, self.row_scale, self.col_scale
        if v.ndim != 2 or (v.numel() and v.stride(-1) != 1):
            raise ValueError(f"scaled rows' values must be 2-D with a contiguous last dimension, got {tuple(v.shape)}")
        if r.dtype != torch.float32 or tuple(r.shape) != (v.shape[0], 1) or (r.numel() > 1 and r.stride(0) != 1):
            raise ValueError(f"row scales must be contiguous float32 [{v.shape[0]}, 1], got {r.dtype} {tuple(r.shape)}")
        if c.dtype != torch.float32 or tuple(c.shape) != (v.shape[1],) or (c.numel() > 1 and c.stride(0) != 1):
            raise ValueError(f"column scales must be contiguous float32 [{v.shape[1]}], got {c.dtype} {tuple(c.shape)}")
        if r.device != v.device or c.device != v.device:
            raise ValueError(f"values, row and column scales must be on one device, got {v.device}, {r.device}, "
                             f"{c.device}")

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def dense(self) -> torch.Tensor:
        """y as a tensor [T, N] in values' dtype."""
        return ((self.values.float() * self.row_scale) * self.col_scale).to(self.values.dtype)


def unpack(x: "torch.Tensor | ScaledRows") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(values, row scales, column scales, scaled) for a kernel launch; a plain tensor passes itself as the unused
    scale pointers."""
    if isinstance(x, ScaledRows):
        return x.values, x.row_scale, x.col_scale, True
    return x, x, x, False


# On a GPU each scaling product is rounded by itself (libdevice's mul.rn, which the compiler never fuses into a
# following add): with Triton's default FMA contraction a float32 row's scaled value would go straight into the
# residual sum unrounded, and differ from ``ScaledRows.dense()`` (the H200 showed it). The interpreter never fuses.
_MUL_RN = tl.constexpr(not backend.INTERPRETED)


@triton.jit
def unscale(x, rs_ptr, cs_ptr, row, cols, mask, SCALED: tl.constexpr):
    """x (loaded from ``ScaledRows.values`` at row ``row``, columns ``cols``) as round((x · rs[row]) · cs[cols]) in
    x's dtype, each product rounded as ``ScaledRows.dense`` rounds it; x unchanged unless SCALED."""
    if SCALED:
        r = tl.load(rs_ptr + row)
        c = tl.load(cs_ptr + cols, mask=mask, other=0.0)
        if _MUL_RN:
            y = libdevice.mul_rn(libdevice.mul_rn(x.to(tl.float32), r + tl.zeros_like(c)), c)
        else:
            y = x.to(tl.float32) * r * c
        x = y.to(x.dtype)
    return x


@triton.jit
def norm_row(x_ptr, r_ptr, w_ptr, h_ptr, xr_ptr, xc_ptr, row, n_cols, stride_x, stride_r, stride_h, eps,
             HAS_RESIDUAL: tl.constexpr, X_SCALED: tl.constexpr, BLOCK: tl.constexpr):
    """(the normalised row in x's dtype [BLOCK], its column mask): rmsnorm of row ``row`` of x (+ r, stored to h);
    X_SCALED: x is ``ScaledRows`` values with scales at xr_ptr/xc_ptr."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = unscale(tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0), xr_ptr, xc_ptr, row, cols, mask,
                X_SCALED)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual stream, rounded as torch's add
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * rstd).to(x.dtype)  # HF rounds the normalised row to the model dtype, then scales by the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    return (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask


@triton.jit
def rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr,        # x, residual, weight [N], out, x + residual
                   xr_ptr, xc_ptr,                              # X_SCALED: x's row [T] and column [N] scales
                   n_cols, stride_x, stride_r, stride_o, stride_h, eps,
                   HAS_RESIDUAL: tl.constexpr, X_SCALED: tl.constexpr, BLOCK: tl.constexpr, TRIGGER: tl.constexpr):
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    y, mask = norm_row(x_ptr, r_ptr, w_ptr, h_ptr, xr_ptr, xc_ptr, row, n_cols, stride_x, stride_r, stride_h, eps,
                       HAS_RESIDUAL, X_SCALED, BLOCK)
    tl.store(out_ptr + row * stride_o + tl.arange(0, BLOCK), y, mask=mask)


@triton.jit
def rope_split_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slots_ptr, xr_ptr, xc_ptr,
                      stride_qkv, stride_cs, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                      n_heads, n_kv_heads,
                      HALF: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr, X_SCALED: tl.constexpr,
                      TRIGGER: tl.constexpr):
    """One program per token: all its heads as one [HEADS, BLOCK] tile of half-heads (rows 0..H-1 q, then k, then
    v), so a batch of T tokens is T programs, not T x (H + 2 KVH) programs of one half-head each."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0)
    head = tl.arange(0, HEADS)[:, None]
    offs = tl.arange(0, BLOCK)[None, :]
    n_rot = n_heads + n_kv_heads
    cols = offs < HALF
    live = (head < n_rot + n_kv_heads) & cols
    col = head * (2 * HALF) + offs
    x1 = unscale(tl.load(qkv_ptr + t * stride_qkv + col, mask=live, other=0.0), xr_ptr, xc_ptr, t, col, live,
                 X_SCALED)
    x2 = unscale(tl.load(qkv_ptr + t * stride_qkv + col + HALF, mask=live, other=0.0), xr_ptr, xc_ptr, t, col + HALF,
                 live, X_SCALED)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    c1 = tl.load(cos_ptr + t * stride_cs + offs, mask=cols, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_cs + HALF + offs, mask=cols, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_cs + offs, mask=cols, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_cs + HALF + offs, mask=cols, other=0.0).to(tl.float32)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    dt = x1.dtype
    # rotate_half(x) = (-x2, x1); every product and the sum rounded to the model dtype, as torch computes it
    o1 = ((a1 * c1).to(dt).to(tl.float32) + (-a2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)).to(dt)
    is_q = live & (head < n_heads)
    is_k = live & (head >= n_heads) & (head < n_rot)
    is_v = live & (head >= n_rot)
    q_dst = q_ptr + t * stride_qt + head * stride_qh + offs  # each pointer is used only where its mask is set
    k_dst = k_ptr + slot * stride_ks + (head - n_heads) * stride_kh + offs
    v_dst = v_ptr + slot * stride_vs + (head - n_rot) * stride_vh + offs
    tl.store(q_dst, o1, mask=is_q)
    tl.store(q_dst + HALF, o2, mask=is_q)
    tl.store(k_dst, o1, mask=is_k)
    tl.store(k_dst + HALF, o2, mask=is_k)
    tl.store(v_dst, x1, mask=is_v)
    tl.store(v_dst + HALF, x2, mask=is_v)


@triton.jit
def silu_mul_rounded(g, u):
    """round(round(silu(g)) · u) in g's dtype (shared with the W8A16 kernel's fused SwiGLU input)."""
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    return (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, xr_ptr, xc_ptr, n_cols, stride_gu, stride_o, BLOCK: tl.constexpr,
                    X_SCALED: tl.constexpr, TRIGGER: tl.constexpr):
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g, u = load_gu(gu_ptr + row * stride_gu, xr_ptr, xc_ptr, row, cols, mask, n_cols, X_SCALED)
    tl.store(out_ptr + row * stride_o + cols, silu_mul_rounded(g, u), mask=mask)


@triton.jit
def load_gu(src, xr_ptr, xc_ptr, row, cols, mask, n_cols, X_SCALED: tl.constexpr):
    """(g, u) at ``cols`` of one row of gu = [g | u] (``src``: the row's start), scaled when X_SCALED."""
    g = unscale(tl.load(src + cols, mask=mask, other=0.0), xr_ptr, xc_ptr, row, cols, mask, X_SCALED)
    u = unscale(tl.load(src + n_cols + cols, mask=mask, other=0.0), xr_ptr, xc_ptr, row, n_cols + cols, mask,
                X_SCALED)
    return g, u


# ---- thin wrappers ------------------------------------------------------------------------------------------------

def early_trigger(x: torch.Tensor) -> bool:
    """On a GPU every kernel here lets the next one launch at once (``gdc_launch_dependents`` first): a W8A16 GEMV
    launched with PDL then streams its first weights while this kernel runs, and waits for it (``gdc_wait``) before
    reading what it wrote. Kernels launched without PDL still start after this one ends. Off in the interpreter."""
    return x.is_cuda and not backend.INTERPRETED


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim != 2 or (x.stride(-1) != 1 and x.numel() > 0 and x.shape[-1] > 1):
        raise ValueError(f"{what} must be 2-D with a contiguous last dimension, got {tuple(x.shape)}")
    return x


def norm_warps(n_cols: int) -> int:
    """Warps of a norm program over a row of ``n_cols``: at most 8 columns per thread (up to 32 warps). Then every
    load and store of the row, 16-bit or 8-bit, gets the same 8-per-thread layout, so the sum of squares adds in the
    same order in ``rmsnorm_kernel`` and in ``fused_quant``'s norm (whose one-byte stores would otherwise take 16
    columns per thread and reorder the sum): the two give the same bits."""
    return max(1, min(32, triton.next_power_of_2(n_cols) // 256))


def check_norm_args(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """Validate a norm's inputs; returns the tensor to pass as the residual (x itself when there is none)."""
    _rows(x, "x")
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [{x.shape[1]}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}")
    return _rows(residual, "residual") if residual is not None else x


def rmsnorm(x: torch.Tensor | ScaledRows, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rmsnorm(x [+ residual]), x + residual or None); x, residual [T, N], weight [N], all one dtype (x may be
    ``ScaledRows``: then x means its ``dense()``)."""
    x, xr, xc, scaled = unpack(x)
    r = check_norm_args(x, weight, residual)
    out = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    if x.shape[0]:
        rmsnorm_kernel[(x.shape[0],)](x, r, weight, out, h if h is not None else out, xr, xc, x.shape[1], x.stride(0),
                                      r.stride(0), out.stride(0), (h if h is not None else out).stride(0), eps,
                                      HAS_RESIDUAL=residual is not None, X_SCALED=scaled,
                                      BLOCK=triton.next_power_of_2(x.shape[1]), TRIGGER=early_trigger(x),
                                      num_warps=norm_warps(x.shape[1]))
    return out, h


def rope_split(qkv: torch.Tensor | ScaledRows, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
               q_out: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, slots: torch.Tensor) -> None:
    """q_out[t] = RoPE(q[t]); k_out[slots[t]] = RoPE(k[t]); v_out[slots[t]] = v[t] (see the module doc)."""
    qkv, xr, xc, scaled = unpack(qkv)
    _rows(qkv, "qkv")
    t, width = qkv.shape
    dim = q_out.shape[-1]
    if width != (n_heads + 2 * n_kv_heads) * dim or cos.shape != (t, dim) or sin.shape != cos.shape:
        raise ValueError(f"qkv [{t}, {width}] does not hold {n_heads}+2x{n_kv_heads} heads of {dim}, or cos/sin "
                         f"{tuple(cos.shape)} are not [{t}, {dim}]")
    if k_out.dtype != qkv.dtype or v_out.dtype != qkv.dtype or q_out.dtype != qkv.dtype:
        raise TypeError("q_out, k_out and v_out must have qkv's dtype (quantise FP8 caches afterwards)")
    if slots.shape != (t,):
        raise ValueError(f"slots must be [{t}], got {tuple(slots.shape)}")
    if t:
        rope_split_kernel[(t,)](
            qkv, cos, sin, q_out, k_out, v_out, slots, xr, xc, qkv.stride(0), cos.stride(0), q_out.stride(0),
            q_out.stride(1), k_out.stride(0), k_out.stride(1), v_out.stride(0), v_out.stride(1), n_heads, n_kv_heads,
            HALF=dim // 2, BLOCK=triton.next_power_of_2(dim // 2),
            HEADS=triton.next_power_of_2(n_heads + 2 * n_kv_heads), X_SCALED=scaled, TRIGGER=early_trigger(qkv))


def check_gu(gu: torch.Tensor) -> int:
    """Validate a SwiGLU input gu = [gate | up] [T, 2F]; returns F."""
    _rows(gu, "gu")
    if gu.shape[1] % 2:
        raise ValueError(f"gu must have an even width (gate | up), got {gu.shape[1]}")
    return gu.shape[1] // 2


def silu_mul(gu: torch.Tensor | ScaledRows) -> torch.Tensor:
    """silu(gu[:, :F]) · gu[:, F:] for gu [T, 2F] (or ``ScaledRows``) → [T, F]."""
    gu, xr, xc, scaled = unpack(gu)
    check_gu(gu)
    t, width = gu.shape
    out = torch.empty(t, width // 2, dtype=gu.dtype, device=gu.device)
    block = min(1024, triton.next_power_of_2(max(width // 2, 1)))
    if t:
        silu_mul_kernel[(t, triton.cdiv(width // 2, block))](gu, out, xr, xc, width // 2, gu.stride(0), out.stride(0),
                                                              BLOCK=block, X_SCALED=scaled, TRIGGER=early_trigger(gu))
    return out
