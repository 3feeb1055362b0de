"""RoPE tables of any Hugging Face causal LM, and the exact inverse rotation.

HF models cache keys *after* rotary embedding: ``k_rot = k * cos + rotate_half(k) * sin`` with ``cos, sin`` of shape
``[B, T, D]`` (the same angle on dims ``i`` and ``i + D/2``, times an attention scaling ``s`` that is 1 for plain RoPE).
Because ``cos^2 + sin^2 = s^2`` element-wise, the inverse is
``k = (k_rot * cos - rotate_half(k_rot) * sin) / (cos^2 + sin^2)``.

``Rope`` builds the model's own rotary module from its config (so Llama, Qwen, Gemma-3 with per-layer-type bases all
work without the weights) and returns ``cos, sin`` per decoder layer.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (the HF layout of RoPE pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``x`` ``[B, H, T, D]`` with ``cos, sin`` ``[B, T, D]`` (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate`: rotate by the negative angle and divide by the scaling squared."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def text_config(config):
    """The decoder config of a (possibly multimodal) config."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def rotary_class(config) -> type[nn.Module]:
    """The ``*RotaryEmbedding`` class of the modelling module that serves ``config.model_type``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = text_config(config)
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.model_type)
    if name is None:
        raise ValueError(f"model_type {cfg.model_type!r} has no causal-LM class in transformers")
    module = sys.modules[getattr(transformers, name).__module__]
    found = [c for n, c in vars(module).items() if n.endswith("RotaryEmbedding") and isinstance(c, type)]
    if not found:
        raise ValueError(f"{module.__name__} defines no RotaryEmbedding: kvstitch needs a RoPE model")
    return found[0]


class Rope:
    """``cos, sin`` per decoder layer of one model, computed by that model's own rotary module."""

    def __init__(self, config) -> None:
        self.config = text_config(config)
        self.module = rotary_class(self.config)(config=self.config)
        self.module.eval()
        self.per_type = "layer_type" in inspect.signature(self.module.forward).parameters
        types = getattr(self.config, "layer_types", None)
        n = self.config.num_hidden_layers
        self.layer_types: list[str | None] = list(types) if (self.per_type and types) else [None] * n
        if len(self.layer_types) != n:
            raise ValueError(f"config has {n} layers but {len(self.layer_types)} layer_types")

    @torch.no_grad()
    def tables(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str | None, tuple]:
        """``{layer_type: (cos, sin)}`` for ``positions`` ``[B, T]`` (int64), each ``[B, T, D]``."""
        self.module.to(positions.device)
        x = torch.empty(0, dtype=dtype, device=positions.device)
        out = {}
        for t in dict.fromkeys(self.layer_types):
            out[t] = self.module(x, positions, t) if t is not None else self.module(x, positions)
        return out

    def per_layer(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> list[tuple]:
        """``[(cos, sin)] * num_layers`` for ``positions`` ``[B, T]``."""
        tabs = self.tables(positions, dtype)
        return [tabs[t] for t in self.layer_types]


def positions_for(batch: int, start: int, length: int, device) -> torch.Tensor:
    """Position ids ``[B, T]``: ``start .. start+length-1`` for every row (prompts here are never padded)."""
    return torch.arange(start, start + length, device=device).unsqueeze(0).expand(batch, length)
