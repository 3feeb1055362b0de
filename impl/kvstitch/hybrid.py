"""Greedy generation in one process: a model alone, and the hybrid prefill model -> stitches -> decode model.

Both paths share one loop: the prompt ``ids`` ``[B, T]`` (unpadded, equal lengths) is prefilled, token 0 is the argmax
of the prefill's last logits (the prefill worker emits the first token, as in disaggregated serving), then the decoder
takes one token at a time for ``n_new - 1`` more steps. With the decode model equal to the prefill model and a
passthrough bundle the hybrid runs exactly the operations of the model alone, so the tokens match bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from impl.common.checks import require_tensor
from impl.kvstitch.models import build_cache, empty_cache, forward, kv_of, prefill
from impl.kvstitch.stitch import StitchBundle


def check_prompt(ids: torch.Tensor, vocab: int) -> None:
    require_tensor(ids, "prompt ids")
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"prompt ids must be a [batch, tokens] int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
    if ids.shape[1] < 1:
        raise ValueError("prompt must have at least one token")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"prompt token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")


@torch.no_grad()
def decode_loop(model: nn.Module, cache, first: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy tokens ``[B, n_new]`` starting with ``first`` ``[B]``, each next one from ``model`` over ``cache``."""
    toks = [first]
    for _ in range(n_new - 1):
        logits = forward(model, toks[-1][:, None], cache).logits[:, -1]
        toks.append(logits.argmax(-1))
    return torch.stack(toks, dim=1)


@torch.no_grad()
def generate_alone(model: nn.Module, ids: torch.Tensor, n_new: int) -> torch.Tensor:
    """The model's own greedy continuation ``[B, n_new]`` of ``ids``."""
    check_prompt(ids, model.config.vocab_size)
    cache = empty_cache(model.config)
    logits = forward(model, ids, cache, logits_to_keep=1).logits[:, -1]
    return decode_loop(model, cache, logits.argmax(-1), n_new)


@torch.no_grad()
def stitched_cache(prefill_model: nn.Module, decode_model: nn.Module, bundle: StitchBundle, ids: torch.Tensor):
    """Prefill ``ids`` with the prefill model, stitch, and return (decode-model cache, first token ``[B]``)."""
    check_prompt(ids, prefill_model.config.vocab_size)
    kv, last = prefill(prefill_model, ids)
    dtype = next(decode_model.parameters()).dtype
    return build_cache(decode_model.config, bundle(kv, out_dtype=dtype)), last.argmax(-1)


@torch.no_grad()
def generate_hybrid(prefill_model: nn.Module, decode_model: nn.Module, bundle: StitchBundle, ids: torch.Tensor,
                    n_new: int) -> torch.Tensor:
    """Greedy tokens ``[B, n_new]``: prefill model reads ``ids`` and emits token 0, decode model continues."""
    cache, first = stitched_cache(prefill_model, decode_model, bundle, ids)
    return decode_loop(decode_model, cache, first, n_new)


def own_kv(model: nn.Module, ids: torch.Tensor):
    """The model's own KV of ``ids`` (stage (a)'s regression target)."""
    return prefill(model, ids)[0]


__all__ = ["check_prompt", "decode_loop", "generate_alone", "generate_hybrid", "stitched_cache", "own_kv", "kv_of"]
