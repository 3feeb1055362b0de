"""The paged KV cache: free-list invariants under random reserve/release, slot mapping, FP8 storage."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.oracle import assert_close
from impl.serve.kv_cache import FP8_MAX, CacheConfig, OutOfPages, PageAllocator, PagedKVCache
from impl.serve.model import ModelArgs

ARGS = ModelArgs(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=8, vocab_size=8)


@given(num_pages=st.integers(1, 12), page_size=st.sampled_from([1, 2, 5, 16]),
       ops=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 60)), max_size=40))
def test_reserve_release_keep_the_free_list_exact(num_pages, page_size, ops):
    cache = PagedKVCache(ARGS, CacheConfig(num_pages, page_size), dtype=torch.float32, device="cpu")
    lengths: dict[int, int] = {}
    for seq, n in ops:
        if n == 0:
            cache.release(seq)
            lengths.pop(seq, None)
            continue
        before = {s: list(t) for s, t in cache.block_tables.items()}
        free_before = cache.allocator.num_free
        try:
            cache.reserve(seq, n)
            lengths[seq] = max(lengths.get(seq, 0), n)
        except OutOfPages:
            assert cache.allocator.num_free == free_before and cache.block_tables.get(seq, []) == before.get(seq, [])
        tables = [t for t in cache.block_tables.values()]
        used = [p for t in tables for p in t]
        assert len(used) == len(set(used)), "a page belongs to two sequences"
        assert 0 not in used and all(1 <= p <= num_pages for p in used), "the null page or a bad id was handed out"
        assert len(used) + cache.allocator.num_free == num_pages
        for s, n_tok in lengths.items():
            assert len(cache.block_tables[s]) >= -(-n_tok // page_size)


def test_allocator_rejects_double_free_and_reports_shortage():
    alloc = PageAllocator(3)
    pages = alloc.alloc(2)
    with pytest.raises(OutOfPages, match="need 2, 1 of 3 free"):
        alloc.alloc(2)
    alloc.free(pages)
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free(pages[:1])
    with pytest.raises(ValueError, match="num_pages"):
        CacheConfig(0)


@given(page_size=st.sampled_from([1, 3, 4, 8]), lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
       seed=st.integers(0, 2**31 - 1))
def test_metadata_slots_address_each_token(page_size, lengths, seed):
    cache = PagedKVCache(ARGS, CacheConfig(128, page_size), dtype=torch.float32, device="cpu")
    rng = np.random.default_rng(seed)
    for step in range(max(lengths)):  # grow in turns: interleaved pages
        for b, n in enumerate(lengths):
            if step < n:
                cache.reserve(b, step + 1)
    starts = [int(rng.integers(0, n)) for n in lengths]
    meta = cache.metadata([(b, s, n - s) for b, (s, n) in enumerate(zip(starts, lengths))], "cpu")
    tag = torch.arange(len(meta.slot_mapping), dtype=torch.float32)
    cache.write(1, tag[:, None, None].expand(-1, 1, 8), -tag[:, None, None].expand(-1, 1, 8), meta.slot_mapping)
    row = 0
    for b, (s, n) in enumerate(zip(starts, lengths)):
        table = cache.block_tables[b]
        for p in range(s, n):
            assert cache.k[1, table[p // page_size], p % page_size, 0, 0] == row
            assert cache.v[1, table[p // page_size], p % page_size, 0, 0] == -row
            row += 1
    assert meta.positions.tolist() == [p for s, n in zip(starts, lengths) for p in range(s, n)]
    assert meta.seq_lens.tolist() == lengths and meta.q_lens == [n - s for s, n in zip(starts, lengths)]
    assert bool((cache.k[0] == 0).all()), "another layer was written"


def test_fp8_cache_saturates_and_round_trips():
    cache = PagedKVCache(ARGS, CacheConfig(2, 4, torch.float8_e4m3fn, k_scale=0.5, v_scale=2.0), dtype=torch.float32,
                         device="cpu")
    cache.reserve(0, 4)
    x = torch.tensor([0.0, -0.0, 1.0, 1000.0, -1000.0, 0.3, float("nan"), 3.14159])
    k = x.view(1, 1, 8).expand(4, 1, 8).contiguous()
    slots = cache.metadata([(0, 0, 4)], "cpu").slot_mapping
    cache.write(0, k, k, slots)
    got_k = cache.k[0, 1, 0, 0].float() * 0.5
    want_k = (x / 0.5).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * 0.5
    assert_close(got_k, want_k, signed_zero=True)
    assert float(got_k[3]) == FP8_MAX * 0.5 and float(got_k[4]) == -FP8_MAX * 0.5  # saturated, not NaN
    got_v = cache.v[0, 1, 0, 0].float() * 2.0
    assert_close(got_v, (x / 2.0).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * 2.0)
    with pytest.raises(ValueError, match="kv_dtype"):
        PagedKVCache(ARGS, CacheConfig(2, 4, torch.float16), dtype=torch.float32, device="cpu")
