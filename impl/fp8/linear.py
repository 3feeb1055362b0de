"""FP8 linear layers: y = x @ W^T (+ b) with W held in FP8 and dequantized by its scales.

Paths (``Fp8Linear.path``, chosen once at construction and stated in ``Fp8Linear.reason``):
  scaled_mm-tensor   per-tensor weight scale: x quantized (always e4m3) per tensor (static ``input_scale`` or
                     dynamic, by our kernel), then ``torch._scaled_mm(xq, Wq^T, s_x, s_w)`` on FP8 tensor cores
                     (sm_89+).
  scaled_mm-rowwise  per-channel weight scales: x quantized per token, ``_scaled_mm`` with row-wise scales
                     s_x [M, 1] and s_w [1, N] (Hopper, sm_90).
  dequant-triton     any scales (128x128 blocks, 1x128 groups, fused shards): the Triton kernel dequantizes W to
                     the compute dtype on every call, then a dense GEMM.
                     (Also every e5m2 weight: the FP8 GEMMs here take e4m3 weights.)
  dequant-torch      the same with the CPU reference dequantizer (whole models on a CPU, where Triton runs
                     interpreted and would take minutes per forward); the dequantized weight is kept after the first
                     call (the codes never change).
  qdq-triton         W8A8 where no FP8 GEMM takes the weight's scales: x quantized to e4m3 (our kernel) per token,
                     or per 1x128 slice of a token for weights scaled in 128-wide K groups (``activation_group``),
                     dequantized, times the dequantized W in the compute dtype -- the numbers of an FP8 GEMM with
                     those activation scales (DeepSeek-V3's block GEMM), computed dense.
  qdq-torch          the same on the CPU with the reference quantizer (bit-identical codes and scales).

Modes (``mode``): None picks the fastest path the weight allows (the per-tensor path quantizes activations per
tensor); "w8a16" is weight-only (activations stay in the compute dtype: a dequant path); "w8a8" quantizes the
activations dynamically to e4m3 -- per token, or per 1x128 slice of a token where the weight's scales are 128 wide
along K (block and group weights, as vLLM quantizes activations for block-scaled checkpoints) -- or with the
checkpoint's static input scale, on FP8 tensor cores where ``_scaled_mm`` takes the weight's scales (per-tensor
weights as a broadcast row-wise scale), else qdq.
Compute dtype: bfloat16 on a GPU, float32 on the CPU. Output dtype: x's dtype. Shapes: x [..., K] -> y [..., N].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from impl import backend
from impl.common.checks import require_tensor
from impl.fp8 import quant
from impl.fp8.formats import CHANNEL, E4M3, TENSOR, ScaleGroup, activation_group, get_format, get_group
from impl.fp8.reference import dequantize_reference, quantize_reference

PATHS = ("scaled_mm-tensor", "scaled_mm-rowwise", "dequant-triton", "dequant-torch", "qdq-triton", "qdq-torch")
MODES = ("w8a16", "w8a8")


@dataclass
class Fp8Weight:
    """An FP8 weight as the kernels want it: codes [N, K] (row-major, fp8 dtype), float32 scales [R, C]."""

    weight: torch.Tensor
    scale: torch.Tensor
    group: ScaleGroup
    input_scale: torch.Tensor | None = None  # static activation scale (float32, one element), or None: dynamic
    bias: torch.Tensor | None = None
    shards: tuple[tuple[str, int], ...] = ()  # fused weights: (name, rows) of each shard, in order

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scale.numel() * 4


def quantize_weight(w: torch.Tensor, group: str | ScaleGroup = "channel", fmt: str = "e4m3") -> Fp8Weight:
    """Quantize a high-precision [N, K] weight with dynamic scales (Triton kernel) into an ``Fp8Weight``."""
    group = get_group(group)
    q, s = quant.quantize(w, group, fmt)
    return Fp8Weight(q, s, group)


def scaled_mm_support(device: torch.device | str) -> tuple[bool, bool, str]:
    """(per-tensor FP8 GEMM available, row-wise available, why not) for ``torch._scaled_mm`` on ``device``."""
    if not (backend.ON_GPU and torch.device(device).type == "cuda"):
        return False, False, "no CUDA device: FP8 tensor cores need sm_89+"
    if not hasattr(torch, "_scaled_mm"):
        return False, False, "this torch has no _scaled_mm"
    cap = torch.cuda.get_device_capability(torch.device(device))
    if cap < (8, 9):
        return False, False, f"compute capability {cap} < 8.9 has no FP8 tensor cores"
    return True, cap >= (9, 0), "" if cap >= (9, 0) else "row-wise scaled_mm needs sm_90"


def choose_path(w: Fp8Weight, device: torch.device | str, mode: str | None = None) -> tuple[str, str]:
    """(path, reason) for a weight on a device in a mode (None, "w8a16", "w8a8"); see the module doc."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be None or one of {MODES}, got {mode!r}")
    path, reason = _fastest_path(w, device)
    if mode == "w8a16" and not path.startswith("dequant"):
        gpu = backend.ON_GPU and torch.device(device).type == "cuda"
        return ("dequant-triton" if gpu else "dequant-torch"), "w8a16: weight-only, activations in the compute dtype"
    if mode == "w8a8":
        if path == "scaled_mm-tensor" and w.input_scale is None:
            _, rowwise_ok, _ = scaled_mm_support(device)
            if rowwise_ok:
                return "scaled_mm-rowwise", "w8a8: per-token activation scales, the per-tensor weight scale broadcast"
            return "qdq-triton", "w8a8: per-token activations need row-wise scaled_mm (sm_90); dequantized GEMM"
        if path.startswith("dequant"):
            qdq = "qdq-triton" if path == "dequant-triton" else "qdq-torch"
            return qdq, f"w8a8: per-token e4m3 activations, computed dense ({reason})"
    return path, reason


def _fastest_path(w: Fp8Weight, device: torch.device | str) -> tuple[str, str]:
    n, k = w.shape
    tensor_ok, rowwise_ok, why = scaled_mm_support(device)
    if not tensor_ok:
        if backend.ON_GPU and torch.device(device).type == "cuda":
            return "dequant-triton", f"dequantize + GEMM: {why}"
        return "dequant-torch", f"dequantize + GEMM on the CPU ({why}; Triton would run interpreted)"
    if w.weight.dtype == torch.float8_e5m2:
        return "dequant-triton", "e5m2 weights: dequantize (Triton) + bf16 GEMM (FP8 GEMMs here take e4m3 weights)"
    if k % 16 or n % 16:
        return "dequant-triton", f"_scaled_mm needs K and N divisible by 16, got K={k}, N={n}"
    if w.group == TENSOR:
        return "scaled_mm-tensor", "per-tensor weight scale: FP8 tensor cores with per-tensor activation scale"
    if w.group == CHANNEL and rowwise_ok and w.input_scale is None:
        return "scaled_mm-rowwise", "per-channel weight scales: FP8 tensor cores with per-token activation scales"
    if w.group == CHANNEL and rowwise_ok:
        return "scaled_mm-rowwise", "per-channel weight scales, static activation scale broadcast per row"
    return "dequant-triton", (f"{w.group.name} weight scales: torch._scaled_mm has no such scaling here; "
                              "dequantize (Triton) + bf16 GEMM")


class Fp8Linear(nn.Module):
    """A linear layer over an ``Fp8Weight``; ``path`` and ``reason`` say how it computes (module doc)."""

    def __init__(self, w: Fp8Weight, *, path: str | None = None, compute_dtype: torch.dtype | None = None,
                 mode: str | None = None) -> None:
        super().__init__()
        if w.weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or w.weight.ndim != 2:
            raise TypeError(f"weight must be a 2-D FP8 tensor, got {w.weight.dtype} {tuple(w.weight.shape)}")
        self.out_features, self.in_features = w.shape
        self.group = w.group
        self.fmt = get_format(w.weight.dtype)
        self.register_buffer("weight", w.weight)
        scale = w.scale.to(torch.float32).reshape(w.group.scale_shape(*w.shape))
        self.register_buffer("weight_scale", aligned16(scale))
        self.register_buffer("input_scale", None if w.input_scale is None
                             else aligned16(w.input_scale.reshape(()).float()))
        self.register_buffer("bias", w.bias)
        self.shards = w.shards
        auto_path, auto_reason = choose_path(w, w.weight.device, mode)
        self.mode = mode
        if path is None:
            path, reason = auto_path, auto_reason
        elif path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        elif path.startswith("scaled_mm") and not auto_path.startswith("scaled_mm"):
            raise ValueError(f"path {path!r} is not available for this weight: {auto_reason}")
        elif path == "scaled_mm-rowwise" and w.group != CHANNEL:
            raise ValueError(f"scaled_mm-rowwise needs per-channel weight scales, got {w.group.name}")
        elif path == "scaled_mm-tensor" and w.group != TENSOR:
            raise ValueError(f"scaled_mm-tensor needs a per-tensor weight scale, got {w.group.name}")
        else:
            reason = "chosen by the caller"
        self.path, self.reason = path, reason
        if path.startswith("scaled_mm"):  # the codes are copied only where an FP8 GEMM reads them
            self.weight = aligned16(self.weight)
        on_gpu = w.weight.device.type == "cuda"
        self.compute_dtype = compute_dtype or (torch.bfloat16 if on_gpu else torch.float32)
        self._dense: torch.Tensor | None = None  # the torch paths' dequantized weight, made on first use
        self._row_scale: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.fmt.name}, scales={self.group.name}, "
                f"path={self.path}")

    def dequantized_weight(self) -> torch.Tensor:
        """W in the compute dtype, [N, K]."""
        if self.path.endswith("-torch"):
            if self._dense is None or self._dense.dtype != self.compute_dtype:
                w = dequantize_reference(self.weight, self.weight_scale, self.group, self.fmt, self.compute_dtype)
                self._dense = w.to(self.weight.device)
            return self._dense
        return quant.dequantize(self.weight, self.weight_scale, self.group, out_dtype=self.compute_dtype)

    def quantized_input(self, x2: torch.Tensor) -> torch.Tensor:
        """x as the qdq paths see it: e4m3 codes with dynamic scales of ``activation_group`` (or the static input
        scale), dequantized to the compute dtype."""
        group = TENSOR if self.input_scale is not None else activation_group(self.group)
        return quantize_activations(x2, group, self.compute_dtype, reference=self.path == "qdq-torch",
                                    scale=self.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if require_tensor(x, "x").ndim == 0:
            raise ValueError(f"x must be [..., {self.in_features}], got a scalar")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, this layer takes {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.path.startswith("scaled_mm"):
            y = self._forward_scaled_mm(x2)
        else:
            xc = self.quantized_input(x2) if self.path.startswith("qdq") else x2.to(self.compute_dtype)
            y = xc @ self.dequantized_weight().t()
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _forward_scaled_mm(self, x2: torch.Tensor) -> torch.Tensor:
        xin = x2 if x2.dtype in quant.HIGH_DTYPES else x2.to(self.compute_dtype)
        if self.path == "scaled_mm-tensor":
            xq, sx = quant.quantize(xin, TENSOR, E4M3, scales=self.input_scale)
            sw = self.weight_scale.reshape(())
            sx = sx.reshape(())
        else:
            if self.input_scale is not None:
                xq, sx = quant.quantize(xin, TENSOR, E4M3, scales=self.input_scale)
                sx = sx.reshape(1, 1).expand(x2.shape[0], 1).contiguous()
            else:
                xq, sx = quant.quantize(xin, CHANNEL, E4M3)
            sw = self.row_scale()
        return self._scaled_mm(xq, sx, sw)

    def _scaled_mm(self, xq: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        # Wq is [N, K] row-major, so Wq.t() is the column-major [K, N] operand cuBLASLt wants
        return torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=sw, bias=bias, out_dtype=torch.bfloat16)

    @property
    def quantizes_per_token(self) -> bool:
        """Whether this layer quantises its input per token with dynamic scales before an FP8 GEMM (row-wise
        ``_scaled_mm``, no static input scale): then ``forward_fp8_rows`` takes such rows made elsewhere."""
        return self.path == "scaled_mm-rowwise" and self.input_scale is None

    def row_scale(self) -> torch.Tensor:
        """The weight scales as ``_scaled_mm``'s row-wise operand: [1, N] float32 (a per-tensor scale broadcast)."""
        if self._row_scale is None:  # made once
            self._row_scale = self.weight_scale.reshape(-1, 1).expand(self.out_features, 1).reshape(
                1, self.out_features).contiguous()
        return self._row_scale

    def forward_fp8_rows(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """y = (codes ⊙ s_x) · (W ⊙ s_w)ᵀ (+ b), bf16 [M, N], for activations already quantised per token: codes
        [M, K] e4m3, scales [M, 1] float32 (``quant.quantize(x, "channel", "e4m3")``, or a kernel that produced x
        and quantised it as it did). The ``scaled_mm-rowwise`` path only."""
        if not self.quantizes_per_token:
            raise ValueError(f"pre-quantised activations take the scaled_mm-rowwise path with dynamic activation "
                             f"scales; this layer's is {self.path} (static input scale: {self.input_scale is not None})")
        if codes.dtype != torch.float8_e4m3fn or codes.ndim != 2 or codes.shape[1] != self.in_features:
            raise ValueError(f"codes must be [M, {self.in_features}] float8_e4m3fn, got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        if scales.dtype != torch.float32 or tuple(scales.shape) != (codes.shape[0], 1):
            raise ValueError(f"scales must be float32 [{codes.shape[0]}, 1], got {scales.dtype} {tuple(scales.shape)}")
        return self._scaled_mm(codes, scales, self.row_scale())


def quantize_activations(x2: torch.Tensor, group: ScaleGroup, compute_dtype: torch.dtype, *, reference: bool,
                         scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] rounded to e4m3 codes with dynamic scales of ``group`` (or the static one-element ``scale``, with
    the tensor group) and dequantized to ``compute_dtype``, [M, K]: by the CPU reference quantizer where
    ``reference``, else by our kernel (the same codes and scales)."""
    scales = None if scale is None else scale.reshape(1, 1)
    if reference:
        codes, s = quantize_reference(x2, group, E4M3, scales=None if scales is None else scales.cpu())
        return dequantize_reference(codes, s, group, E4M3, compute_dtype).to(x2.device)
    xin = x2 if x2.dtype in quant.HIGH_DTYPES else x2.to(compute_dtype)
    q, s = quant.quantize(xin, group, E4M3, scales=scales)
    return quant.dequantize(q, s, group, out_dtype=compute_dtype)


def aligned16(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it where its data is not 16-byte aligned: cuBLASLt's FP8 GEMMs refuse such operands and scale
    pointers (CUBLAS_STATUS_NOT_SUPPORTED), and a loader's tensors are views of its file buffer, aligned only to
    their element."""
    return t.clone() if t.data_ptr() % 16 else t


def linear_reference(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """float64 x @ dequant(W)^T (+ b) on the CPU: the FP8 linear's exact target before activation quantization."""
    fmt = get_format(w.weight.dtype)
    wd = dequantize_reference(w.weight, w.scale, w.group, fmt, torch.float64)
    y = x.detach().cpu().double().reshape(-1, w.shape[1]) @ wd.t()
    if w.bias is not None:
        y = y + w.bias.detach().cpu().double()
    return y.reshape(*x.shape[:-1], w.shape[0])


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 (round to nearest): |fl(t) - t| <= u |t|; 2^-8 for bf16, 2^-11 fp16, 2^-24 fp32."""
    return torch.finfo(dtype).eps / 2


def linear_error_bound(x: torch.Tensor, w: Fp8Weight, path: str, compute_dtype: torch.dtype) -> torch.Tensor:
    """Stated bound on |Fp8Linear(x) - linear_reference(x, w)| per output element (float64, on the CPU).

    With A = |x| @ |W|^T (W the exact dequantized weight), b the bias, y the exact output, K the inner dimension,
    u the unit roundoff of the compute dtype:
      dequant paths     (u_x + 2 u + K 2^-24) A + u |b| + (u + u_o) |y|:  x rounded to the compute dtype (u_x = u
                        where x's dtype is finer, else 0), W rounded once, fp32 sums, the product x W^T rounded
                        (|x W^T| <= A: with a bias, y can be far smaller than the product), b rounded, the sum
                        rounded, then the cast back to x's dtype (u_o = its unit roundoff where it is coarser)
      scaled_mm paths   E + K 2^-23 A + 2^-8 |b| + 2^-8 |y| with E = u8 A + 2^-10 s_x |1| @ |W|^T the e4m3
                        activations (u8 = 2^-4 e4m3's unit roundoff, subnormal step s_x 2^-9 / 2); fp32 sums, b
                        rounded to bf16, bf16 out
      qdq paths         E + the dequant paths' bound with A + E for A and u_x = u (dequantized x rounded)
    The whole is scaled by (1 + 8 u) for the second-order terms of the roundings above.
    """
    fmt = get_format(w.weight.dtype)
    wd = dequantize_reference(w.weight, w.scale, w.group, fmt, torch.float64)
    xa = x.detach().cpu().double().reshape(-1, w.shape[1]).abs()
    a = xa @ wd.abs().t()
    y = linear_reference(x, w).reshape(a.shape).abs()
    b = w.bias.detach().cpu().double().abs()[None, :] if w.bias is not None else torch.zeros(1, 1, dtype=torch.float64)
    k = w.shape[1]
    # the per-token scale: a 1xgk group's scale (activation_group) is never larger, nor its subnormal step
    sx = xa.amax(dim=1, keepdim=True) / E4M3.max if w.input_scale is None else w.input_scale.double().cpu()
    # e4m3 activations: half a step (unit roundoff) of normals, half the subnormal step (in units of s_x)
    act = E4M3.unit_roundoff * a + E4M3.min_subnormal / 2 * sx * wd.abs().sum(1)[None, :]
    if path.startswith("scaled_mm"):
        u = unit_roundoff(torch.bfloat16)  # the bias and the output are bf16
        bound = act + k * 2.0 ** -23 * a + u * (b + y)
    else:
        u = unit_roundoff(compute_dtype)
        ux = unit_roundoff(x.dtype)
        u_x, u_o = (u if ux < u else 0.0), (ux if ux > u else 0.0)
        if path.startswith("qdq"):  # the dequantized activations are rounded to the compute dtype
            a, u_x = a + act, u
        bound = (u_x + 2 * u + k * 2.0 ** -24) * a + u * b + (u + u_o) * y
        if path.startswith("qdq"):
            bound = bound + act
    return (bound * (1 + 8 * u)).reshape(*x.shape[:-1], w.shape[0]) + 1e-30
