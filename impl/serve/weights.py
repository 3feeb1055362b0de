"""Weights: load a Hugging Face Llama directory (config.json + safetensors), randomise it, save it.

HF names map onto the model's fused layout: ``q/k/v_proj`` are stacked row-wise into ``wqkv`` [(H+2·KVH)·d, dim] and
``gate/up_proj`` into ``w13`` [2·ffn, dim]. Tensors are read one at a time (``safe_open``), so peak host memory is one
tensor beyond the model. A directory whose config carries a ``quantization_config`` is an FP8 checkpoint and goes to
``fp8_adapter``; anything else that does not match the config (unknown or missing tensor, wrong shape) is refused with
the tensor's name. Before anything is allocated, config.json and the safetensors headers are read and checked by
``impl.fp8.checkpoint_io`` (files confined to the folder, the config's sizes bounded by what the files hold). (The
SmolLM2 checkpoints come from impl/fp8 through ``fp8_adapter.smollm2_dir``.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from impl.serve.model import ModelArgs, Transformer


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json as a dict (a ``CheckpointError`` naming the file when it is not one JSON object)."""
    from impl.fp8.checkpoint_io import read_config as read_checked

    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory: no config.json")
    return read_checked(model_dir)


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The weight files (those an index.json names, else every *.safetensors), each confined to the folder."""
    from impl.fp8.checkpoint_io import safetensors_files as confined

    return confined(model_dir)


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every tensor of every shard, one tensor in host memory at a time."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def hf_targets(model: Transformer) -> dict[str, tuple[Tensor, int, tuple[int, ...]]]:
    """HF tensor name → (destination tensor, first row in it, expected shape) for a dense model."""
    a, d = model.args, model.args.head_dim
    out: dict[str, tuple[Tensor, int, tuple[int, ...]]] = {
        "model.embed_tokens.weight": (model.tok_embeddings, 0, (a.vocab_size, a.dim)),
        "model.norm.weight": (model.norm.weight, 0, (a.dim,)),
    }
    if not a.tie_embeddings:
        out["lm_head.weight"] = (model.output.weight, 0, (a.vocab_size, a.dim))
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        qkv, w13 = blk.attention.wqkv.weight, blk.feed_forward.w13.weight
        out[p + "self_attn.q_proj.weight"] = (qkv, 0, (a.n_heads * d, a.dim))
        out[p + "self_attn.k_proj.weight"] = (qkv, a.n_heads * d, (a.n_kv_heads * d, a.dim))
        out[p + "self_attn.v_proj.weight"] = (qkv, (a.n_heads + a.n_kv_heads) * d, (a.n_kv_heads * d, a.dim))
        out[p + "self_attn.o_proj.weight"] = (blk.attention.wo.weight, 0, (a.dim, a.n_heads * d))
        out[p + "mlp.gate_proj.weight"] = (w13, 0, (a.ffn_dim, a.dim))
        out[p + "mlp.up_proj.weight"] = (w13, a.ffn_dim, (a.ffn_dim, a.dim))
        out[p + "mlp.down_proj.weight"] = (blk.feed_forward.w2.weight, 0, (a.dim, a.ffn_dim))
        out[p + "input_layernorm.weight"] = (blk.attention_norm.weight, 0, (a.dim,))
        out[p + "post_attention_layernorm.weight"] = (blk.ffn_norm.weight, 0, (a.dim,))
    return out


def load_dense_weights(model: Transformer, model_dir: str | Path) -> None:
    """Copy every tensor of an HF Llama checkpoint into ``model``; refuse unknown, missing or misshapen tensors."""
    targets = hf_targets(model)
    seen: set[str] = set()
    for name, t in iter_tensors(model_dir):
        if name == "lm_head.weight" and model.args.tie_embeddings:
            continue  # some tied checkpoints store the head too; the embedding is the one used
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some exporters save; RoPE is recomputed from the config
        if name not in targets:
            raise ValueError(f"{model_dir}: unexpected tensor {name!r} {tuple(t.shape)} for a Llama of this config")
        dest, row, shape = targets[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{model_dir}: tensor {name!r} has shape {tuple(t.shape)}, the config wants {shape}")
        if not t.dtype.is_floating_point or t.dtype.itemsize < 2:
            raise ValueError(f"{model_dir}: tensor {name!r} is {t.dtype}; a dense checkpoint needs fp32/fp16/bf16")
        dest[row:row + shape[0]].copy_(t)
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise ValueError(f"{model_dir}: {len(missing)} tensors missing, first {missing[0]!r}")


def check_model_dir(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model directory, its sizes checked against the safetensors headers (``impl.fp8.checkpoint_io``:
    no tensor data is read); errors name the file and the key."""
    from impl.fp8 import checkpoint_io

    cfg = read_config(model_dir)
    entries = checkpoint_io.read_headers(safetensors_files(model_dir))
    checkpoint_io.check_sizes(Path(model_dir) / "config.json", cfg, entries)
    return cfg


def load_model(model_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu") -> Transformer:
    """A ``Transformer`` with the weights of an HF directory; FP8 checkpoints go through ``fp8_adapter``. The config's
    sizes are checked against the safetensors headers before any memory is allocated (``check_model_dir``)."""
    cfg = check_model_dir(model_dir)
    config_path = Path(model_dir) / "config.json"
    try:
        args = ModelArgs.from_hf_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from None
    if cfg.get("quantization_config"):
        from impl.serve import fp8_adapter

        return fp8_adapter.load_fp8_model(model_dir, cfg, args, dtype=dtype, device=device)
    model = Transformer(args, dtype=dtype, device=device)
    load_dense_weights(model, model_dir)
    return model.eval()


def randomize_(model: Transformer, seed: int = 0, std: float = 0.02) -> Transformer:
    """Fill every matrix with N(0, std²) and norms with 1 (speed does not depend on the values)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    return model


def to_hf_config(args: ModelArgs) -> dict[str, Any]:
    rope = {"rope_theta": args.rope_theta, "rope_type": "default", **(args.rope_scaling or {})}
    eos = list(args.eos_token_ids)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "intermediate_size": args.ffn_dim,
            "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_parameters": rope,
            "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}


def save_hf_dir(model: Transformer, out_dir: str | Path) -> Path:
    """Write ``model`` as an HF Llama directory (config.json + model.safetensors, unfused names)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: dest[row:row + shape[0]].detach().cpu().contiguous()
               for name, (dest, row, shape) in hf_targets(model).items()}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(to_hf_config(model.args), indent=2) + "\n")
    return out
