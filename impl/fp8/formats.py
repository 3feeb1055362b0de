"""FP8 formats and scale groups: the vocabulary every other module of ``impl.fp8`` speaks.

An FP8 tensor here is a pair (q, s): q holds FP8 codes (shape [N, K]), s float32 scales, and the real value of
element (i, j) is ``decode(q[i, j]) * s[i // gn, j // gk]``. The scale group (gn, gk) names the layout:

  tensor   (0, 0)      one scale                         s: [1, 1]
  channel  (1, 0)      one per row (output channel)      s: [N, 1]      (per-token for activations [M, K])
  group    (1, 128)    1x128 along K (DeepSeek acts)     s: [N, ceil(K/128)]
  block    (128, 128)  128x128 tiles (DeepSeek weights)  s: [ceil(N/128), ceil(K/128)]

where 0 means "the whole dimension". Group sizes are powers of two (>= 16 along K).

Formats: e4m3fn (4 exponent bits, bias 7, no infinities, NaN = S.1111.111, max 448) and e5m2 (bias 15, IEEE
infinities and NaNs, max 57344).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fp8Format:
    """One FP8 encoding: its name, torch dtype, largest finite value and bit layout."""

    name: str
    dtype: torch.dtype
    max: float
    exp_bits: int
    man_bits: int
    bias: int
    code: int  # the kernels' constexpr FMT: 0 = e4m3fn, 1 = e5m2

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.man_bits)

    @property
    def unit_roundoff(self) -> float:
        """u = 2^-(man_bits + 1): |rne(t) - t| <= u |t| for t in the normal range (2^-4 for e4m3, 2^-3 for e5m2)."""
        return 2.0 ** -(self.man_bits + 1)


E4M3 = Fp8Format("e4m3", torch.float8_e4m3fn, 448.0, 4, 3, 7, 0)
E5M2 = Fp8Format("e5m2", torch.float8_e5m2, 57344.0, 5, 2, 15, 1)
FORMATS = {"e4m3": E4M3, "e4m3fn": E4M3, "e5m2": E5M2}

MIN_SCALE = 2.0 ** -120
"""Smallest dynamic scale: keeps 1/s finite; groups with amax < max * 2^-120 (about 5e-34) lose precision."""


def get_format(fmt: str | Fp8Format | torch.dtype) -> Fp8Format:
    """The ``Fp8Format`` for a name ('e4m3', 'e4m3fn', 'e5m2'), a torch fp8 dtype or a format."""
    if isinstance(fmt, Fp8Format):
        return fmt
    if isinstance(fmt, torch.dtype):
        for f in (E4M3, E5M2):
            if f.dtype == fmt:
                return f
        raise TypeError(f"{fmt} is not an FP8 dtype (float8_e4m3fn or float8_e5m2)")
    if fmt not in FORMATS:
        raise ValueError(f"unknown FP8 format {fmt!r}; one of {sorted(FORMATS)}")
    return FORMATS[fmt]


@dataclass(frozen=True)
class ScaleGroup:
    """Elements sharing one scale: ``gn`` rows by ``gk`` columns; 0 means the whole dimension."""

    gn: int
    gk: int

    def __post_init__(self) -> None:
        for name, g, least in (("rows", self.gn, 1), ("columns", self.gk, 16)):
            if g != 0 and (g < least or g & (g - 1)):
                raise ValueError(f"scale group {name} must be 0 (whole dimension) or a power of two >= {least}, "
                                 f"got {g}")

    @property
    def name(self) -> str:
        return {(0, 0): "tensor", (1, 0): "channel"}.get((self.gn, self.gk), f"{self.gn}x{self.gk}")

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        """Shape of the canonical 2-D scale tensor for an [n, k] matrix."""
        rows = 1 if self.gn == 0 else math.ceil(n / self.gn)
        cols = 1 if self.gk == 0 else math.ceil(k / self.gk)
        return rows, cols


TENSOR = ScaleGroup(0, 0)
CHANNEL = ScaleGroup(1, 0)
TOKEN = CHANNEL
GROUP128 = ScaleGroup(1, 128)
BLOCK128 = ScaleGroup(128, 128)
GRANULARITIES = {"tensor": TENSOR, "channel": CHANNEL, "token": TOKEN, "group": GROUP128, "block": BLOCK128}


def activation_group(weight: ScaleGroup) -> ScaleGroup:
    """The dynamic scale group of the activations x [M, K] that multiply a weight [N, K] with scale group ``weight``:
    one scale per token, or per 1 x gk slice of a token where the weight's scales split K into groups of gk (as
    vLLM and DeepSeek-V3 run 128x128 block-scaled weights: x in 1x128 groups, so each K-group of the product has
    one activation and one weight scale)."""
    return ScaleGroup(1, weight.gk) if weight.gk else TOKEN


def activation_name(weight: ScaleGroup, mode: str) -> str:
    """How a linear with weight scale group ``weight`` rounds its activations in ``mode``, as records and claims
    name it: "none" (w8a16: weight-only), "token" or "1x<gk>" (w8a8: ``activation_group``)."""
    if mode == "w8a16":
        return "none"
    g = activation_group(weight)
    return "token" if g.gk == 0 else f"1x{g.gk}"


def get_group(g: str | ScaleGroup | tuple[int, int]) -> ScaleGroup:
    """A ``ScaleGroup`` from a name ('tensor', 'channel', 'token', 'group', 'block'), a pair or a group."""
    if isinstance(g, ScaleGroup):
        return g
    if isinstance(g, tuple):
        return ScaleGroup(*g)
    if g not in GRANULARITIES:
        raise ValueError(f"unknown scale granularity {g!r}; one of {sorted(GRANULARITIES)}")
    return GRANULARITIES[g]


def expand_scales(scales: torch.Tensor, group: ScaleGroup, n: int, k: int) -> torch.Tensor:
    """Broadcast canonical scales [R, C] to one scale per element, [n, k]."""
    rn = n if group.gn == 0 else group.gn
    rk = k if group.gk == 0 else group.gk
    s = scales.reshape(group.scale_shape(n, k))
    return s.repeat_interleave(rn, dim=0)[:n].repeat_interleave(rk, dim=1)[:, :k]
