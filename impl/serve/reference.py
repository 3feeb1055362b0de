"""References the engine is checked against: one sequence with a contiguous KV cache (no pages, no batching).

``ContiguousKV`` keeps K/V of a single sequence in ``[layers, max_len, KVH, D]`` tensors (gpt-fast's static cache) and
attends with torch SDPA under the causal mask, so ``greedy_contiguous`` is the plain, unpaged decoding loop: prefill
the prompt, then one token at a time. The paged engine must produce the same tokens and (within float tolerance) the
same logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from impl.serve.attention import causal_mask
from impl.serve.model import Transformer


class ContiguousKV:
    """``StepContext`` for one sequence with a contiguous cache; set ``positions`` before each forward."""

    def __init__(self, model: Transformer, max_len: int) -> None:
        a = model.args
        shape = (a.n_layers, max_len, a.n_kv_heads, a.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.positions = torch.zeros(0, dtype=torch.int64, device=model.device)
        self.logits_index: Tensor | None = None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.k[layer, self.positions] = k
        self.v[layer, self.positions] = v
        n = int(self.positions[-1]) + 1
        keys = self.k[layer, :n].transpose(0, 1)[None]
        vals = self.v[layer, :n].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, vals, scale=q.shape[-1] ** -0.5,
                                             attn_mask=causal_mask(q.shape[0], n, q.device), enable_gqa=True)
        return out[0].transpose(0, 1)


@torch.inference_mode()
def greedy_contiguous(model: Transformer, prompt: list[int], max_new_tokens: int,
                      stop_token_ids: tuple[int, ...] = ()) -> tuple[list[int], list[Tensor]]:
    """Greedy tokens and the logits [vocab] that chose each, decoding one sequence without pages."""
    ctx = ContiguousKV(model, len(prompt) + max_new_tokens)
    tokens, logits_seen = [], []
    ids = torch.tensor(prompt, dtype=torch.int64, device=model.device)
    start = 0
    for _ in range(max_new_tokens):
        ctx.positions = torch.arange(start, start + len(ids), device=model.device)
        ctx.logits_index = torch.tensor([len(ids) - 1], device=model.device)
        logits = model(ids, ctx)[0]
        nxt = int(torch.argmax(logits))
        tokens.append(nxt)
        logits_seen.append(logits.cpu())
        start += len(ids)
        ids = torch.tensor([nxt], dtype=torch.int64, device=model.device)
        if nxt in stop_token_ids:
            break
    return tokens, logits_seen
