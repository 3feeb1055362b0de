"""Next-token sampling: greedy, temperature and top-p (nucleus), one generator per request.

With temperature τ > 0 the next token is drawn from p ∝ exp(logits / τ) restricted to the nucleus: the fewest
most-probable tokens whose mass reaches top_p (ties broken by token id), renormalised. τ = 0 is greedy (argmax,
lowest id on ties). Each request draws from its own ``torch.Generator`` seeded from its ``seed``, so its tokens do not
depend on which other requests share the batch. A temperature so small that logits / τ overflow is the τ -> 0 limit:
greedy. A row with NaN logits samples its argmax instead of raising (the engine ends that request with an error).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

SEED_LIMIT = 2**64  # a torch.Generator takes seeds in [0, 2**64)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. ``stop_token_ids`` None = the model's EOS ids; () = never stop early.
    Integers must be integers (not bools, floats or text); ``seed`` lies in [0, 2**64)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        for key in ("temperature", "top_p"):
            v = getattr(self, key)
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise ValueError(f"{key} must be a number, got {type(v).__name__} {v!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be an int in [0, 2**64), got {self.seed!r}")
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            if not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

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
    keep_sorted[0] = True  # the most probable token always (a top_p below float32's range compares as 0)
    keep = torch.zeros_like(keep_sorted).scatter(0, order.indices, keep_sorted)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def sample_one(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits [V] (float32)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    # logits / τ overflowed (τ -> 0: the greedy limit) or the row holds NaN: all mass on the argmax, no host sync
    onehot = torch.zeros_like(probs).scatter_(0, torch.argmax(logits).reshape(1), 1.0)
    probs = torch.where(torch.isfinite(probs).all(), probs, onehot)
    probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_checked(logits: Tensor, params: list[SamplingParams],
                   generators: list[torch.Generator | None]) -> tuple[list[int], list[bool]]:
    """Token ids and whether each row's logits are all finite, for logits [B, V]: the greedy rows' argmax and the
    flags come back in one host read; sampled rows are drawn one by one (``sample_one``)."""
    if logits.shape[0] != len(params):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(params)} requests")
    tokens, flags = torch.stack((torch.argmax(logits, dim=-1), torch.isfinite(logits).all(dim=-1).long())).tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[i] = sample_one(logits[i], p, g)
    return tokens, [bool(f) for f in flags]


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Token ids for a batch: logits [B, V]; greedy rows in one argmax, sampled rows one by one."""
    return sample_checked(logits, params, generators)[0]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    if not (_is_int(seed) and 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return torch.Generator(device=device).manual_seed(int(seed))
