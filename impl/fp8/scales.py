"""Scale choice for FP8 weights: amax / FMAX (the default) or, per scale group, the candidate with the least squared
rounding error ("mse").

For a group g of the weight W (``formats.ScaleGroup``) and s_amax(g) = amax_g / FMAX (``reference.scales_from_amax``):

    s_mse(g) = argmin over f in F of  Σ_{i in g} (w_i − s · decode(encode(w_i · (1 / s))))²,   s = f · s_amax(g)
    F = {0.5, 0.5 + 0.5 / (steps − 1), ..., 1.0}

f < 1 saturates the group's largest values at ±FMAX · s in exchange for an FP8 grid placed differently against the
rest; f in [0.5, 1] spans every placement (a factor of 2 only moves the exponent). Ties keep the larger f (less
saturation), so f = 1 (amax) wins unless another candidate is strictly better. The codes are then the quantizer's
own with those scales (``quantize_reference(w, group, fmt, scales=...)``): the checkpoint format is unchanged.
"""
from __future__ import annotations

import torch

from impl.fp8.formats import MIN_SCALE, Fp8Format, ScaleGroup, expand_scales, get_format, get_group
from impl.fp8.reference import decode_reference, encode_reference, group_amax, group_sum, scales_from_amax

SCALE_CHOICES = ("amax", "mse")
STEPS = 41


def rounding_error(w: torch.Tensor, s: torch.Tensor, group: ScaleGroup, fmt: Fp8Format) -> torch.Tensor:
    """Σ (w − dequantize(quantize(w, s)))² per group [R, C] (float64): the reference quantizer's arithmetic
    (float32 w · (1 / s), then ``encode_reference``) on w's device."""
    n, k = w.shape
    back = decode_reference(encode_reference(w * expand_scales(1.0 / s, group, n, k), fmt), fmt)
    return group_sum((w.to(torch.float64) - back * expand_scales(s.to(torch.float64), group, n, k)) ** 2, group)


def choose_scales(w: torch.Tensor, group: str | ScaleGroup, fmt: str | Fp8Format = "e4m3", how: str = "amax",
                  steps: int = STEPS) -> torch.Tensor:
    """float32 scales [R, C] (CPU) of the finite 2-D weight ``w`` chosen by ``how`` (module doc)."""
    if how not in SCALE_CHOICES:
        raise ValueError(f"scales must be one of {SCALE_CHOICES}, got {how!r}")
    if w.ndim != 2 or not torch.isfinite(w).all():
        raise ValueError(f"w must be a finite 2-D weight, got shape {tuple(w.shape)}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    group, fmt = get_group(group), get_format(fmt)
    w = w.detach().to(torch.float32)
    amax = scales_from_amax(group_amax(w.cpu(), group), fmt).to(w.device)
    if how == "amax":
        return amax.cpu()
    best, best_err = amax, rounding_error(w, amax, group, fmt)
    for f in torch.linspace(1.0, 0.5, steps)[1:].tolist():  # from amax down: a tie keeps the larger f
        s = (amax * f).to(torch.float32).clamp_min(MIN_SCALE)
        err = rounding_error(w, s, group, fmt)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best.cpu()
