"""CPU references for the FP8 kernels, written with torch on the CPU (independent of the Triton code).

``quantize_reference`` mirrors the kernels' float32 arithmetic step by step (amax of finite |x|, IEEE division for
the scale and its reciprocal, one float32 product, saturation, round-to-nearest-even by torch's own float8 cast),
so kernel codes and scales must equal it bit for bit. ``dequantize_reference`` decodes with torch's float8 dtypes and
multiplies in float64, where the product of an FP8 value and a float32 scale is exact; rounding that once to float32
and then to the output dtype is what the kernel's float32 product does. It is also the quantizer's CPU backend
(``quantize.py``), vectorised over whole groups, fast enough for a 135M-parameter model.

``error_bound`` is the float64 bound of dequantize(quantize(x)) that the property tests check.
"""
from __future__ import annotations

import torch

from impl.common.checks import require_tensor
from impl.fp8.formats import MIN_SCALE, Fp8Format, ScaleGroup, expand_scales, get_format, get_group


def _check_matrix(t: object, what: str) -> None:
    if require_tensor(t, what).ndim != 2:
        raise ValueError(f"{what} must be a matrix [N, K], got shape {tuple(t.shape)}")


def _group_dims(group: ScaleGroup, n: int, k: int) -> tuple[int, int]:
    return (max(n, 1) if group.gn == 0 else group.gn), (max(k, 1) if group.gk == 0 else group.gk)


def _grouped(x: torch.Tensor, group: ScaleGroup) -> torch.Tensor:
    """x [N, K] zero-padded to whole groups and viewed as [R, rows of a group, C, columns of a group]."""
    n, k = x.shape
    gn, gk = _group_dims(group, n, k)
    rows, cols = group.scale_shape(n, k)
    padded = torch.zeros(rows * gn, cols * gk, dtype=x.dtype, device=x.device)
    padded[:n, :k] = x
    return padded.view(rows, gn, cols, gk)


def group_amax(x: torch.Tensor, group: ScaleGroup) -> torch.Tensor:
    """max |x| over each scale group of a 2-D float32 tensor, NaN and +-inf counted as 0: [R, C] float32 (CPU)."""
    a = x.detach().to("cpu", torch.float32).abs()
    return _grouped(torch.where(torch.isfinite(a), a, torch.zeros_like(a)), group).amax(dim=(1, 3))


def group_sum(x: torch.Tensor, group: ScaleGroup) -> torch.Tensor:
    """Σ of a 2-D tensor over each scale group: [R, C] in x's dtype, on x's device."""
    return _grouped(x, group).sum(dim=(1, 3))


def scales_from_amax(amax: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """s = amax / FMAX (float32, IEEE), at least MIN_SCALE; 1.0 where amax == 0."""
    # FMAX as a tensor on amax's device: CUDA torch divides by a CPU scalar as a product with its reciprocal, which
    # can differ from the IEEE quotient the kernels compute (div_rn) by one ulp
    s = amax.to(torch.float32) / torch.full((), fmt.max, dtype=torch.float32, device=amax.device)
    s = torch.where(s < MIN_SCALE, torch.tensor(MIN_SCALE, dtype=torch.float32), s)
    return torch.where(amax > 0, s, torch.ones_like(s))


def encode_reference(y: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """float32 -> FP8 codes (uint8): saturate to +-FMAX (a clamp: NaN stays NaN), round to nearest even (torch's
    cast); two kernels on y's device, so loops that round one column at a time (GPTQ) stay cheap."""
    return y.clamp(-fmt.max, fmt.max).to(fmt.dtype).view(torch.uint8)


def decode_reference(codes: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """FP8 codes (uint8 or an fp8 tensor) -> float64, exactly."""
    if codes.dtype == torch.uint8:
        codes = codes.view(fmt.dtype)
    return codes.to(torch.float64)


def quantize_reference(x: torch.Tensor, group: str | ScaleGroup = "tensor", fmt: str | Fp8Format = "e4m3",
                       scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, K], scales float32 [R, C]) for a 2-D tensor; dynamic scales unless ``scales`` is given."""
    _check_matrix(x, "x")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if scales is not None:
        require_tensor(scales, "scales")
    group, fmt = get_group(group), get_format(fmt)
    x = x.detach().to("cpu", torch.float32)
    n, k = x.shape
    if scales is None:
        scales = scales_from_amax(group_amax(x, group), fmt)
    scales = scales.to("cpu", torch.float32).reshape(group.scale_shape(n, k))
    inv = torch.tensor(1.0, dtype=torch.float32) / scales
    y = x * expand_scales(inv, group, n, k)
    return encode_reference(y, fmt), scales


def dequantize_reference(codes: torch.Tensor, scales: torch.Tensor, group: str | ScaleGroup = "tensor",
                         fmt: str | Fp8Format = "e4m3", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """decode(q) * s for every element, rounded once to float32 and then to ``out_dtype`` (float64: exact)."""
    _check_matrix(codes, "codes")
    require_tensor(scales, "scales")
    if codes.dtype not in (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"codes must be uint8 or float8 codes, got {codes.dtype}")
    group, fmt = get_group(group), get_format(fmt)
    q = decode_reference(codes.detach().cpu(), fmt)
    n, k = q.shape
    if out_dtype == torch.float64:
        return q * expand_scales(scales.detach().to("cpu", torch.float64), group, n, k)  # exact
    # the exact product rounded once to float32 is the float32 product (IEEE multiplication): compute that
    s = expand_scales(scales.detach().to("cpu", torch.float32), group, n, k)
    return (q.to(torch.float32) * s).to(out_dtype)


def error_bound(x: torch.Tensor, scales: torch.Tensor, group: str | ScaleGroup = "tensor",
                fmt: str | Fp8Format = "e4m3", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float64 bound on |dequantize(quantize(x)) - x| per element, for finite x.

    Half an FP8 step at |x| / s (relative 2^-(m+1) for normals, half the subnormal step below), times s; plus
    |x| * 2^-21 for the float32 reciprocal and products; plus the final rounding to ``out_dtype`` (eps(out)); plus the
    saturation excess max(|x| - FMAX * s, 0) for values the dynamic scale clipped (only +-inf and finite values
    beyond a static scale's range).
    """
    _check_matrix(x, "x")
    require_tensor(scales, "scales")
    group, fmt = get_group(group), get_format(fmt)
    x = x.detach().to("cpu", torch.float64)
    n, k = x.shape
    s = expand_scales(scales.detach().to("cpu", torch.float64), group, n, k)
    half_rel = 2.0 ** -(fmt.man_bits + 1)
    half_sub = fmt.min_subnormal / 2
    ax = x.abs()
    step = torch.maximum(ax * half_rel, s * half_sub)
    eps_out = torch.finfo(out_dtype).eps
    clip = torch.clamp(ax - fmt.max * s, min=0)
    tiny = torch.finfo(out_dtype).tiny
    return step + ax * 2.0 ** -21 + (ax + step) * eps_out + clip + tiny
