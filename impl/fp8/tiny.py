"""Small checkpoints made from scratch: random Llama configs for tests, and big random FP8 ones for the load bench.

``tiny_config`` gives a Llama config whose projections are not multiples of 128 (so block scales have partial
blocks and fused shards misalign). ``write_dense_checkpoint`` writes random bf16/fp32 weights for a config;
``write_random_fp8_checkpoint`` writes FP8 codes and scales directly in a layout (no quantization: for speed).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from impl.common.shapes import DecoderShape
from impl.fp8.formats import get_format
from impl.fp8.layouts import ModelSpec, get_layout


def tiny_config(**over: Any) -> dict[str, Any]:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 80, "intermediate_size": 144,
           "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 16, "num_hidden_layers": 2,
           "vocab_size": 97, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "rope_theta": 10000.0, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "bos_token_id": 1, "eos_token_id": 2}
    cfg.update(over)
    return cfg


def shape_config(shape: DecoderShape, **over: Any) -> dict[str, Any]:
    """``tiny_config`` with the layer sizes of ``shape`` (``impl.common.shapes``): hidden, MLP, heads, head and
    vocabulary sizes; layer count and RoPE base stay the tiny config's unless ``over`` sets them."""
    sizes = {k: v for k, v in shape.hf_config().items() if k not in ("num_hidden_layers", "rope_theta")}
    return tiny_config(**{**sizes, **over})


def write_config(dst: Path, config: dict[str, Any]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_dense_checkpoint(dst: str | Path, config: dict[str, Any], *, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights (std 0.05, norms near 1) for every tensor of the config's spec; returns them."""
    dst = Path(dst)
    spec = ModelSpec.from_config(config)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in {**spec.dense, **{f"{m}.weight": s for m, s in spec.linears.items()},
                        **spec.biases}.items():
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.05 * torch.randn(shape, generator=g)
        tensors[name] = t.to(dtype)
    write_config(dst, config)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def random_codes(shape: tuple[int, ...], fmt: str = "e4m3", *, generator: torch.Generator | None = None,
                 device: str = "cpu") -> torch.Tensor:
    """Uniformly random finite FP8 codes (NaN/inf codes replaced by zero), as the fp8 dtype."""
    f = get_format(fmt)
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator, device=device)
    special = (b & 0x7F) == 0x7F if f.name == "e4m3" else (b & 0x7C) == 0x7C
    return torch.where(special, torch.zeros_like(b), b).view(f.dtype)


def write_random_fp8_checkpoint(dst: str | Path, config: dict[str, Any], layout: str, *, seed: int = 0,
                                shard_bytes: int = 1 << 31) -> int:
    """An FP8 checkpoint with random codes and scales in ``layout``; returns the bytes of tensors written."""
    dst = Path(dst)
    lay = get_layout(layout)
    spec = ModelSpec.from_config(config)
    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    files: dict[str, str] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(files.values())) + 1:05d}.safetensors"
        save_file(shard, str(dst / name), metadata={"format": "pt"})
        files.update({k: name for k in shard})
        shard, size = {}, 0

    def add(name: str, t: torch.Tensor) -> None:
        nonlocal size, total
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes

    write_config(dst, {**config, "quantization_config": lay.quantization_config()})
    for name, shape in spec.dense.items():
        add(name, (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16))
    for module, (n, k) in spec.linears.items():
        add(f"{module}.weight", random_codes((n, k), generator=g))
        add(f"{module}.{lay.scale_name}",
            (1e-4 * (1 + torch.rand(lay.stored_scale_shape(n, k), generator=g))).to(torch.float32))
    if shard:
        flush()
    if len(set(files.values())) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}) + "\n")
    else:
        only = next(iter(set(files.values())))
        (dst / only).rename(dst / "model.safetensors")
    return total
