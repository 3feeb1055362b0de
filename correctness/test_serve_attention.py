"""Every attention backend (flashinfer, Triton paged, torch SDPA) against the float64 reference attention.

Inputs are drawn over heads, KV heads (GQA groups 1-4), head dims (including ones that are not powers of two),
sequence lengths, new-token counts (decode = 1 per sequence, prefill chunks after cached tokens) and page sizes, on
fragmented caches whose unused rows are NaN, with bf16/fp32 or FP8 KV.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.oracle import assert_close, check_kernel
from fixtures.serve import fill_sequences, fragmented_cache, step_metadata
from impl import backend
from impl.backend import DEVICE
from impl.serve.attention import (available_backends, make_backend, paged_attention_reference, select_backend)
from impl.serve.model import ModelArgs
from impl.serve.triton_attention import paged_decode, paged_prefill

BACKENDS = list(available_backends())
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
DTYPES = [torch.float32] + ([torch.bfloat16] if backend.ON_GPU else [])
# each new head dim / dtype compiles the kernels again on a GPU: cap the gpu profile's 100 examples
EXAMPLES = settings(max_examples=min(settings.default.max_examples, 40))


@st.composite
def attention_cases(draw, decode: bool | None = None):
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([8, 24, 64, 128]))  # each one is a kernel compile on a GPU
    page_size = draw(st.sampled_from([1, 3, 4, 16, 32]))
    batch = draw(st.integers(1, 4))
    is_decode = draw(st.booleans()) if decode is None else decode
    lengths, q_lens = [], []
    for _ in range(batch):
        n = draw(st.integers(1, 80))
        lengths.append(n)
        q_lens.append(1 if is_decode else draw(st.integers(1, n)))
    fp8_kv = draw(st.booleans())
    return dict(kv_heads=kv_heads, heads=kv_heads * group, head_dim=head_dim, page_size=page_size,
                lengths=lengths, q_lens=q_lens, fp8_kv=fp8_kv, seed=draw(st.integers(0, 2**31 - 1)))


def build(case: dict, dtype: torch.dtype):
    """Cache (on DEVICE) with K/V for every position, metadata, and q [T, H, D]."""
    args = ModelArgs(dim=case["heads"] * case["head_dim"], n_layers=1, n_heads=case["heads"],
                     n_kv_heads=case["kv_heads"], head_dim=case["head_dim"], ffn_dim=8, vocab_size=8)
    cache = fragmented_cache(args, case["lengths"], case["page_size"], seed=case["seed"], dtype=dtype,
                             kv_dtype=torch.float8_e4m3fn if case["fp8_kv"] else None, device=DEVICE)
    fill_sequences(cache, case["lengths"], 0, case["seed"])
    meta = step_metadata(cache, case["lengths"], case["q_lens"], DEVICE)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    q = torch.randn(sum(case["q_lens"]), case["heads"], case["head_dim"], generator=gen).to(DEVICE, dtype)
    return cache, meta, q


def skip_unavailable(name: str, case: dict | None = None) -> None:
    reason = available_backends()[name]
    if reason:
        pytest.skip(reason)
    if name == "flashinfer" and case is not None and case["head_dim"] not in (64, 128):
        pytest.skip("flashinfer compiles head dims 64/128/256 only")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", BACKENDS)
@EXAMPLES
@given(case=attention_cases())
def test_backend_matches_float64_reference(name, dtype, case):
    skip_unavailable(name, case)
    cache, meta, q = build(case, dtype)
    q0, k0 = q.clone(), cache.k.clone()
    scale = case["head_dim"] ** -0.5
    got = make_backend(name).attend(q, cache.k[0], cache.v[0], meta, scale=scale)
    ref = paged_attention_reference(q, cache.k[0], cache.v[0], meta, scale=scale)
    assert_close(got.double(), ref, check_dtype=False, **TOL[dtype], msg=f"{name} {case}")
    assert torch.equal(q, q0) and torch.equal(cache.k.view(torch.uint8), k0.view(torch.uint8)), "inputs modified"


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@EXAMPLES
@given(case=attention_cases(decode=None))
def test_triton_kernels_write_every_output(decode, case):
    if decode:
        case = {**case, "q_lens": [1] * len(case["lengths"])}
    cache, meta, q = build(case, torch.float32)
    scale = case["head_dim"] ** -0.5
    ref = paged_attention_reference(q, cache.k[0], cache.v[0], meta, scale=scale).float().numpy()
    if decode:
        run = lambda out: paged_decode(q, cache.k[0], cache.v[0], meta.block_tables, meta.seq_lens, scale=scale,
                                       out=out)
    else:
        run = lambda out: paged_prefill(q, cache.k[0], cache.v[0], meta.block_tables, meta.q_start, meta.seq_lens,
                                        meta.max_q_len, scale=scale, out=out)
    check_kernel(run, torch.empty_like(q), ref, **TOL[torch.float32])


def test_page_shift_maps_powers_of_two_only():
    """Power-of-two pages map positions by shift and mask, every other size divides (-1)."""
    from impl.serve.triton_attention import page_shift

    assert [page_shift(n) for n in (1, 2, 3, 4, 12, 16, 32, 48)] == [0, 1, -1, 2, -1, 4, 5, -1]


@pytest.mark.parametrize("page_size", [3, 4, 5, 8], ids=lambda n: f"page{n}")
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_triton_kernels_match_with_shifted_and_divided_pages(decode, page_size):
    """The same sequences through pages that the kernels address by shifts (4, 8) or by division (3, 5)."""
    case = dict(kv_heads=2, heads=4, head_dim=16, page_size=page_size, lengths=[70, 41, 17],
                q_lens=[1, 1, 1] if decode else [37, 41, 3], fp8_kv=False, seed=11)
    cache, meta, q = build(case, torch.float32)
    ref = paged_attention_reference(q, cache.k[0], cache.v[0], meta, scale=0.25).float().numpy()
    if decode:
        run = lambda out: paged_decode(q, cache.k[0], cache.v[0], meta.block_tables, meta.seq_lens, scale=0.25,
                                       out=out)
    else:
        run = lambda out: paged_prefill(q, cache.k[0], cache.v[0], meta.block_tables, meta.q_start, meta.seq_lens,
                                        meta.max_q_len, scale=0.25, out=out)
    check_kernel(run, torch.empty_like(q), ref, **TOL[torch.float32])


@pytest.mark.parametrize("tiles", [(16, 16), (32, 16), (16, 32)], ids=str)
def test_triton_prefill_unmasked_key_blocks_match_the_reference(tiles):
    """Small tiles, long cached prefixes and chunks that start mid-block: key blocks wholly below a query block
    take the unmasked path, the rest the masked one; every row must still match float64."""
    from impl.serve.triton_attention import PrefillTiles

    case = dict(kv_heads=2, heads=4, head_dim=16, page_size=4, lengths=[70, 41, 17], q_lens=[37, 41, 3],
                fp8_kv=False, seed=5)
    cache, meta, q = build(case, torch.float32)
    ref = paged_attention_reference(q, cache.k[0], cache.v[0], meta, scale=0.25).float().numpy()
    run = lambda out: paged_prefill(q, cache.k[0], cache.v[0], meta.block_tables, meta.q_start, meta.seq_lens,
                                    meta.max_q_len, scale=0.25, out=out,
                                    tiles=PrefillTiles(block_m=tiles[0], block_n=tiles[1], num_warps=4))
    check_kernel(run, torch.empty_like(q), ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="power of two"):
        PrefillTiles(block_m=24)


def test_triton_decode_writes_zeros_for_empty_rows():
    """CUDA-graph padding rows have K/V length 0 and must come out as zeros, not NaN (0/0)."""
    case = dict(kv_heads=2, heads=4, head_dim=16, page_size=4, lengths=[5, 9], q_lens=[1, 1], fp8_kv=False, seed=3)
    cache, meta, q = build(case, torch.float32)
    seq_lens = torch.tensor([5, 0], dtype=torch.int32, device=DEVICE)
    out = paged_decode(q, cache.k[0], cache.v[0], meta.block_tables, seq_lens, scale=0.25)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    ref = paged_attention_reference(q[:1], cache.k[0], cache.v[0], step_metadata(cache, [5], [1], DEVICE), scale=0.25)
    assert_close(out[:1].double(), ref, check_dtype=False, **TOL[torch.float32])


@pytest.fixture
def poisoned_partials(monkeypatch):
    """Split-decode partials start as NaN, so a chunk program that skips its write shows up in the output."""
    from impl.serve import triton_attention

    real = triton_attention.split_partials
    monkeypatch.setattr(triton_attention, "split_partials",
                        lambda *a: tuple(t.fill_(float("nan")) for t in real(*a)))


@settings(EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the patch holds for every example
@given(case=attention_cases(decode=True), splits=st.sampled_from([None, 1, 2, 3, 8]),
       block_n=st.sampled_from([16, 32]), chunk_blocks=st.sampled_from([1, 2]), data=st.data())
def test_triton_split_decode_matches_the_reference(poisoned_partials, case, splits, block_n, chunk_blocks, data):
    """Split-KV with chunks of one or two small key blocks (sequences of 1-80 tokens: up to 5 chunks, many slots
    empty, sequences shorter than one chunk), 1-8 programs per (sequence, KV head), some rows of length 0 (CUDA-graph
    padding: zeros); the combine must reproduce the one-pass softmax to float32 accuracy."""
    from impl.serve.triton_attention import SplitRule

    cache, meta, q = build(case, torch.float32)
    lengths = [0 if data.draw(st.booleans(), label="empty row") else n for n in case["lengths"]]
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    scale = case["head_dim"] ** -0.5
    ref = paged_attention_reference(q, cache.k[0], cache.v[0], meta, scale=scale)
    ref[[b for b, n in enumerate(lengths) if n == 0]] = 0.0
    rule = SplitRule(min_chunk=block_n * chunk_blocks)
    run = lambda out: paged_decode(q, cache.k[0], cache.v[0], meta.block_tables, seq_lens,  # noqa: E731
                                   scale=scale, out=out, splits=splits, block_n=block_n, rule=rule)
    check_kernel(run, torch.empty_like(q), ref.float().numpy(), **TOL[torch.float32])


def test_triton_split_decode_combines_chunks_with_different_maxima(poisoned_partials):
    """Chunks whose running maxima differ widely (keys scaled up along the sequence): a combine that does not rescale
    each chunk by 2^(m_c - M) before summing (or sums l without the weights) is far off. The second sequence (1100
    keys) has more than MAX_CHUNKS chunks' worth of min_chunk, so its chunks grow to whole blocks of 32."""
    from impl.serve.triton_attention import SplitRule

    case = dict(kv_heads=1, heads=2, head_dim=8, page_size=16, lengths=[300, 1100], q_lens=[1, 1], fp8_kv=False,
                seed=11)
    cache, meta, q = build(case, torch.float32)
    for pages in meta.block_tables_host:  # K grows along each sequence: the chunks' maxima differ by tens (base 2)
        for i, page in enumerate(pages):
            cache.k[0][page] *= (1 + (16 * i + torch.arange(16, device=DEVICE)) / 100)[:, None, None]
    ref = paged_attention_reference(q, cache.k[0], cache.v[0], meta, scale=1.0)
    out = paged_decode(q, cache.k[0], cache.v[0], meta.block_tables, meta.seq_lens, scale=1.0, block_n=16,
                       rule=SplitRule(min_chunk=16))
    assert_close(out.double(), ref, check_dtype=False, **TOL[torch.float32])


def test_triton_split_decode_output_bits_do_not_depend_on_batch_grid_or_table_width():
    """A sequence decoded alone (narrow block table, one program per head) and inside a batch (wider table, padded
    row, more programs per head) gives the same bits: the chunks depend on its own length only, the combine always
    reduces over MAX_CHUNKS slots. Batch-invariant serving and graph == eager rely on it."""
    from impl.serve.triton_attention import SplitRule

    rule = SplitRule(min_chunk=16)
    case = dict(kv_heads=2, heads=4, head_dim=16, page_size=4, lengths=[45, 80, 3], q_lens=[1, 1, 1], fp8_kv=False,
                seed=4)
    cache, meta, q = build(case, torch.float32)
    together = {z: paged_decode(q, cache.k[0], cache.v[0], meta.block_tables, meta.seq_lens, scale=0.3, block_n=16,
                                rule=rule, splits=z).cpu() for z in (None, 1, 2, 5)}
    for b, n in enumerate(case["lengths"]):
        table = meta.block_tables[b:b + 1, :-(-n // 4)]  # just the pages it uses: fewer partial slots
        for z in (None, 1, 3):
            alone = paged_decode(q[b:b + 1], cache.k[0], cache.v[0], table.contiguous(), meta.seq_lens[b:b + 1],
                                 scale=0.3, block_n=16, rule=rule, splits=z).cpu()
            for got in together.values():
                assert torch.equal(alone[0], got[b]), f"row {b} differs (alone, splits {z})"


def test_decode_split_rule_depends_on_shapes_only():
    """Slots from the block table's reach, programs from batch x KV heads against the SM count: one value per
    CUDA-graph bucket; 1 program once (sequences x KV heads) fill the SMs (32 x 8 on 132 SMs)."""
    from impl.serve.triton_attention import MAX_CHUNKS, SplitRule, decode_chunks, decode_splits

    assert decode_chunks(4096) == 16 and decode_chunks(256) == 1 and decode_chunks(257) == 2
    assert decode_chunks(1 << 20) == MAX_CHUNKS
    assert decode_splits(1, 8, 4096, 132) == 16       # 1 x 4096: 128 programs of 256 positions
    assert decode_splits(4, 8, 4096, 132) == 9        # ceil(264 / 32)
    assert decode_splits(32, 8, 1024, 132) == 1       # 256 programs already
    assert decode_splits(128, 8, 1024, 132) == 1
    assert decode_splits(1, 8, 176, 132) == 1         # the experiment's context: one chunk
    assert decode_splits(1, 1, 1 << 20, 132) == MAX_CHUNKS
    assert decode_splits(1, 8, 4096, 132, SplitRule(waves=1, min_chunk=512)) == 8
    with pytest.raises(ValueError, match="power of two"):
        SplitRule(min_chunk=48)
    case = dict(kv_heads=1, heads=1, head_dim=8, page_size=4, lengths=[5], q_lens=[1], fp8_kv=False, seed=0)
    cache, meta, q = build(case, torch.float32)
    with pytest.raises(ValueError, match="splits"):
        paged_decode(q, cache.k[0], cache.v[0], meta.block_tables, meta.seq_lens, scale=1.0, splits=0)
    with pytest.raises(ValueError, match="multiple of block_n"):
        paged_decode(q, cache.k[0], cache.v[0], meta.block_tables, meta.seq_lens, scale=1.0, block_n=32,
                     rule=SplitRule(min_chunk=16))


def test_triton_backend_with_another_split_rule_decodes_and_prefills():
    """flashinfer_check's split-KV timing candidates: the Triton backend with other chunks and key blocks for decode,
    its default prefill."""
    from impl.serve.attention import TritonPagedAttention
    from impl.serve.triton_attention import SplitRule

    for q_lens in ([1, 1], [4, 9]):
        case = dict(kv_heads=2, heads=4, head_dim=16, page_size=4, lengths=[21, 9], q_lens=q_lens, fp8_kv=False,
                    seed=2)
        cache, meta, q = build(case, torch.float32)
        got = TritonPagedAttention(split_rule=SplitRule(min_chunk=16), decode_block_n=16).attend(
            q, cache.k[0], cache.v[0], meta, scale=0.25)
        ref = paged_attention_reference(q, cache.k[0], cache.v[0], meta, scale=0.25)
        assert_close(got.double(), ref, check_dtype=False, **TOL[torch.float32])


def test_triton_wrappers_reject_bad_input():
    case = dict(kv_heads=2, heads=4, head_dim=16, page_size=4, lengths=[5], q_lens=[1], fp8_kv=False, seed=0)
    cache, meta, q = build(case, torch.float32)
    k, v = cache.k[0], cache.v[0]
    with pytest.raises(ValueError, match="q must be"):
        paged_decode(q[0], k, v, meta.block_tables, meta.seq_lens, scale=1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode(q[:, :3], k, v, meta.block_tables, meta.seq_lens, scale=1.0)
    with pytest.raises(TypeError, match="int32"):
        paged_decode(q, k, v, meta.block_tables.long(), meta.seq_lens, scale=1.0)
    with pytest.raises(TypeError, match="cache dtype"):
        paged_decode(q, k.double(), v.double(), meta.block_tables, meta.seq_lens, scale=1.0)
    with pytest.raises(ValueError, match="rows"):
        paged_decode(q, k, v, meta.block_tables, meta.seq_lens[:0], scale=1.0)
    with pytest.raises(ValueError, match="q_start"):
        paged_prefill(q, k, v, meta.block_tables, meta.q_start.long(), meta.seq_lens, 1, scale=1.0)


def test_backend_choice_is_explicit():
    chosen, why = select_backend("auto")
    assert why.startswith("auto:") and chosen.name in BACKENDS
    if not backend.ON_GPU:
        assert chosen.name == "sdpa" and "interpreter" in why
    assert select_backend("triton")[0].name == "triton"
    cpu, why = select_backend("auto", torch.device("cpu"))  # a CPU model, also on a GPU machine
    assert cpu.name == "sdpa" and "CPU" in why
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("paged-magic")
    if available_backends()["flashinfer"]:
        with pytest.raises(RuntimeError, match="flashinfer"):
            select_backend("flashinfer")


def test_reference_is_plain_softmax_attention():
    """The float64 reference itself, on one sequence, against a direct numpy evaluation of the formula."""
    case = dict(kv_heads=1, heads=2, head_dim=8, page_size=3, lengths=[7], q_lens=[3], fp8_kv=False, seed=5)
    cache, meta, q = build(case, torch.float32)
    pages = meta.block_tables_host[0]
    k = cache.k[0].cpu()[pages].reshape(-1, 1, 8)[:7, 0].double().numpy()
    v = cache.v[0].cpu()[pages].reshape(-1, 1, 8)[:7, 0].double().numpy()
    ref = paged_attention_reference(q, cache.k[0], cache.v[0], meta, scale=0.5).numpy()
    for t in range(3):
        for h in range(2):
            s = 0.5 * k[: 4 + t + 1] @ q[t, h].double().cpu().numpy()
            w = np.exp(s - s.max())
            np.testing.assert_allclose(ref[t, h], (w / w.sum()) @ v[: 4 + t + 1], rtol=1e-12)
