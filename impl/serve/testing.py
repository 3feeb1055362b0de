"""Test helpers shared by serve's correctness tests and benches: toy models, fragmented caches, paged inputs.

``fragmented_cache`` grows several sequences a few tokens at a time in turn (after holes were punched into the free
list), so block tables are non-contiguous and interleaved as in a long-running server. Every cache row starts as NaN
(or the e4m3 NaN code): a kernel that reads a row it should not shows up as NaN in its output.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fixtures.oracle import poison_
from impl.serve.kv_cache import AttentionMetadata, CacheConfig, PagedKVCache
from impl.serve.model import ModelArgs, Transformer
from impl.serve.weights import randomize_


def tiny_model(preset: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
               std: float = 0.2, **overrides) -> Transformer:
    """A random-weight model (std 0.2: logits spread enough that greedy choices are not near-ties)."""
    args = replace(ModelArgs.from_name(preset), **overrides)
    return randomize_(Transformer(args, dtype=dtype, device=device).eval(), seed=seed, std=std)


def fragmented_cache(args: ModelArgs, lengths: list[int], page_size: int, *, seed: int,
                     dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None,
                     device: str = "cpu", spare_pages: int = 4) -> PagedKVCache:
    """A cache whose sequences 0..B-1 hold ``lengths[b]`` reserved tokens on interleaved, shuffled pages."""
    rng = np.random.default_rng(seed)
    need = sum(-(-n // page_size) for n in lengths)
    cache = PagedKVCache(args, CacheConfig(need + spare_pages + len(lengths), page_size, kv_dtype),
                         dtype=dtype, device=device)
    poison_(cache.k)  # pages nobody wrote read as NaN (fp8: the 0x7F NaN byte): a kernel that reads one shows it
    poison_(cache.v)
    holes = 1000 + np.arange(len(lengths))
    for h in holes:  # one page each, freed below: holes in the free list
        cache.reserve(int(h), 1)
    grown = [0] * len(lengths)
    while any(g < n for g, n in zip(grown, lengths)):
        for b, n in enumerate(lengths):
            if grown[b] < n:
                grown[b] = min(n, grown[b] + int(rng.integers(1, 2 * page_size + 1)))
                cache.reserve(b, grown[b])
    for h in holes:
        cache.release(int(h))
    return cache


def fill_sequences(cache: PagedKVCache, lengths: list[int], layer: int, seed: int) -> None:
    """Write random K/V (N(0, 1)) to every reserved position of sequences 0..B-1 of ``layer``."""
    a = cache.args
    gen = torch.Generator().manual_seed(seed)
    meta = cache.metadata([(b, 0, n) for b, n in enumerate(lengths) if n > 0], "cpu")
    t = len(meta.slot_mapping)
    k = torch.randn(t, a.n_kv_heads, a.head_dim, generator=gen)
    v = torch.randn(t, a.n_kv_heads, a.head_dim, generator=gen)
    cache.write(layer, k.to(cache.k.device), v.to(cache.k.device), meta.slot_mapping.to(cache.k.device))


def step_metadata(cache: PagedKVCache, lengths: list[int], q_lens: list[int], device: str) -> AttentionMetadata:
    """Metadata of a step whose sequence b has q_lens[b] new tokens at the end of its lengths[b] tokens."""
    return cache.metadata([(b, n - q, q) for b, (n, q) in enumerate(zip(lengths, q_lens))], device)
