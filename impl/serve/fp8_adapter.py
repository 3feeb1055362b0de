"""The one door between serving and FP8 (issue 6, ``impl/fp8``): FP8 linears, model quantisation, FP8 checkpoints.

What serving needs from FP8:
  1. ``quantize_linear(dense) -> nn.Module``: an FP8 linear from a bf16/fp32 weight [out, in] (``y = x · Wᵀ``);
  2. ``load_fp8_model(dir, ...)``: a Transformer whose linears come from an FP8 checkpoint's weights and scales.

When ``impl.fp8`` provides them (``impl.fp8.linear`` / ``impl.fp8.loader``), they are used; until then this file's
own minimal path stands in and says so (``fp8_status()``): weights e4m3 with one scale per output channel
(s_w[n] = max|W[n, :]| / 448), activations quantised per token in the forward (s_x[m] = max|x[m, :]| / 448), and

    y[m, n] = s_x[m] · s_w[n] · Σ_k q_x[m, k] · q_w[n, k]

through ``torch._scaled_mm`` (row-wise scales, bf16 out) where the GPU has FP8 tensor cores (sm_89+), else by
dequantising the weight and calling ``F.linear`` (the CPU path, exact in float32 up to the weight's e4m3 rounding).
The LM head and embeddings stay in the model dtype (as vLLM keeps them).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impl.serve.model import DenseLinear, ModelArgs, Transformer

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
QUANTIZED = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def _impl_fp8(module: str) -> Any | None:
    """``impl.fp8.<module>`` if that package exists here, else None (impl/fp8 is built in parallel)."""
    try:
        return importlib.import_module(f"impl.fp8.{module}")
    except ModuleNotFoundError as e:
        if e.name in ("impl.fp8", f"impl.fp8.{module}"):
            return None
        raise


def fp8_status() -> dict[str, str]:
    """Which FP8 implementation serving uses, and the GEMM path on this device."""
    src = "impl.fp8" if _impl_fp8("linear") is not None else "serve fallback (impl/fp8 not present)"
    return {"fp8_linear_source": src, "fp8_gemm": "torch._scaled_mm row-wise" if scaled_mm_supported()
            else "dequantize + F.linear (no FP8 tensor cores here)"}


def scaled_mm_supported(device: torch.device | str | None = None) -> bool:
    if not torch.cuda.is_available():
        return False
    dev = torch.device(device or "cuda")
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)


def quantize_rowwise(w: Tensor) -> tuple[Tensor, Tensor]:
    """W [N, K] → (q [N, K] e4m3, s [N] float32) with q = sat(W / s), s[n] = max|W[n, :]| / 448 (1 for a zero row)."""
    wf = w.float()
    amax = wf.abs().amax(dim=-1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (wf / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


class Fp8Linear(nn.Module):
    """y = x · (s_w ⊙ q_w)ᵀ with an e4m3 weight and per-output-channel scales (see the module doc)."""

    def __init__(self, weight_fp8: Tensor, weight_scale: Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        if weight_fp8.dtype != FP8 or weight_scale.shape != (weight_fp8.shape[0],):
            raise ValueError(f"need an e4m3 weight [N, K] and scales [N], got {weight_fp8.dtype} "
                             f"{tuple(weight_fp8.shape)} and {tuple(weight_scale.shape)}")
        self.out_features, self.in_features = weight_fp8.shape
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        self.use_scaled_mm = scaled_mm_supported(weight_fp8.device) and weight_fp8.shape[1] % 16 == 0 \
            and weight_fp8.shape[0] % 16 == 0

    @classmethod
    def from_dense(cls, dense: nn.Module) -> "Fp8Linear":
        q, s = quantize_rowwise(dense.weight.data)
        return cls(q, s, dense.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not self.use_scaled_mm:
            w = (self.weight.float() * self.weight_scale[:, None]).to(x.dtype)
            return F.linear(x2, w).reshape(*lead, self.out_features)
        xf = x2.float()
        sx = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        xq = (xf / sx).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale[None, :],
                             out_dtype=self.out_dtype)
        return y.reshape(*lead, self.out_features)


def quantize_linear(dense: nn.Module) -> nn.Module:
    """An FP8 linear equivalent to ``dense`` (impl.fp8's when present)."""
    mod = _impl_fp8("linear")
    if mod is not None and hasattr(mod, "fp8_linear_from_dense"):
        return mod.fp8_linear_from_dense(dense)
    return Fp8Linear.from_dense(dense)


def quantize_model_(model: Transformer) -> Transformer:
    """Replace every decoder linear (QKV, O, gate/up, down) by an FP8 linear, one at a time (peak: one bf16 matrix)."""
    with torch.no_grad():
        for block in model.layers:
            for path in QUANTIZED:
                parent_name, child = path.split(".")
                parent = getattr(block, parent_name)
                dense = getattr(parent, child)
                setattr(parent, child, quantize_linear(dense))
                del dense
    return model


def weight_bytes(model: nn.Module, *, linears_only: bool = False) -> int:
    """Bytes of the weights (and scales) the forward reads; tied tensors counted once."""
    seen: set[int] = set()
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "inv_freq" or t.data_ptr() in seen:
            continue
        if linears_only and not any(f".{p}." in f".{name}" for p in QUANTIZED):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def load_fp8_model(model_dir: str | Path, cfg: dict[str, Any], args: ModelArgs, *, dtype: torch.dtype,
                   device: torch.device | str) -> Transformer:
    """A Transformer from an FP8 checkpoint (vLLM ``fp8``, DeepSeek block, compressed-tensors) via impl.fp8."""
    qc = cfg.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method not in ("fp8", "compressed-tensors"):
        raise ValueError(f"{model_dir}: unknown model layout: quantization_config.quant_method={method!r} "
                         "(serving reads dense checkpoints and FP8 ones: 'fp8', 'compressed-tensors')")
    loader = _impl_fp8("loader")
    if loader is None or not hasattr(loader, "load_linear_weights"):
        raise RuntimeError(f"{model_dir}: an FP8 checkpoint ({method}) needs impl.fp8's loader, which is not "
                           "present in this tree yet; serve a dense (bf16/fp32) checkpoint instead")
    return loader.load_linear_weights(model_dir, cfg, Transformer(args, dtype=dtype, device=device))


def dense_like(model: Transformer) -> bool:
    """True when no decoder linear is FP8 (all are ``DenseLinear``)."""
    return all(isinstance(getattr(getattr(b, p.split(".")[0]), p.split(".")[1]), DenseLinear)
               for b in model.layers for p in QUANTIZED)
