"""Next-token sampling: greedy, temperature and top-p (nucleus), one generator per request.

With temperature τ > 0 the next token is drawn from p ∝ exp(logits / τ) restricted to the nucleus: the fewest
most-probable tokens whose mass reaches top_p (ties broken by token id), renormalised. τ = 0 is greedy (argmax,
lowest id on ties). Each request draws from its own ``torch.Generator`` seeded from its ``seed``, so its tokens do not
depend on which other requests share the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. ``stop_token_ids`` None = the model's EOS ids; () = never stop early."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """probs [V] (summing to 1) → the nucleus distribution [V]: zero outside the smallest top-mass set, renormalised."""
    if top_p >= 1:
        return probs
    order = torch.sort(probs, descending=True, stable=True)
    mass_before = torch.cumsum(order.values, 0) - order.values
    keep_sorted = mass_before < top_p  # a token is kept while the mass above it is short of top_p
    keep = torch.zeros_like(keep_sorted).scatter(0, order.indices, keep_sorted)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def sample_one(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits [V] (float32)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Token ids for a batch: logits [B, V]; greedy rows in one argmax, sampled rows one by one."""
    if logits.shape[0] != len(params):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(params)} requests")
    tokens = torch.argmax(logits, dim=-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[i] = sample_one(logits[i], p, g)
    return tokens


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
