"""serve's benches: paged attention kernels (decode, prefill) and the FP8 vs bf16 linear at Llama-3-8B shapes.

- ``test_serve_paged_decode``: one decode step of attention for B sequences of L cached tokens, 32 query / 8 KV heads
  of 128 (8B shapes), on fragmented 16-token pages. Bytes: K and V read once (B·L·8·128·2·2) plus q and out. Anchor:
  torch SDPA on the same K/V stored contiguously (no block table).
- ``test_serve_paged_prefill``: causal prefill of B prompts of L tokens; FLOPs 2·2·B·H·D·L²/2. Anchor: SDPA causal
  on contiguous K/V.
- ``test_serve_linear``: y = x·Wᵀ for the four projections (fused QKV, O, fused gate/up, down) of one 8B layer at M
  tokens: ``bf16`` (cuBLAS), ``fp8`` (what serving runs: the path and config the GEMM table holds for this M, see
  ``choose.py``; ``extra_info.path`` names it) and ``fp8-scaled-mm`` (impl.fp8's W8A8 ``torch._scaled_mm`` with
  per-token activation quantisation); bytes = weight bytes + activations. M = 1 is the batch-1 decode GEMV whose
  ratio is the ceiling of the FP8 decode speed-up. (``python -m impl.serve.tune`` times every candidate config.)
"""
import pytest
import torch
import torch.nn.functional as F

from fixtures.oracle import assert_close
from fixtures.serve import fill_sequences, fragmented_cache, step_metadata
from impl import backend
from impl.backend import DEVICE, sized
from impl.common.shapes import LLAMA3_8B
from impl.serve import choose, fp8_adapter
from impl.serve import tune as serve_tune
from impl.serve.attention import make_backend, paged_attention_reference
from impl.serve.fp8_gemv import DecodeFp8Linear
from impl.serve.model import DenseLinear, ModelArgs

DTYPE = torch.bfloat16 if backend.ON_GPU else torch.float32
HEADS, KV_HEADS, HEAD_DIM = sized((LLAMA3_8B.n_heads, LLAMA3_8B.n_kv_heads, LLAMA3_8B.head_dim), (4, 2, 16))
ATTN_ARGS = ModelArgs(dim=HEADS * HEAD_DIM, n_layers=1, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                      ffn_dim=8, vocab_size=8)
DECODE_CASES = sized([(1, 4096), (32, 1024), (128, 1024)], [(3, 40)])
PREFILL_CASES = sized([(4, 1024), (1, 4096)], [(2, 24)])


def attention_inputs(batch: int, length: int, q_len: int):
    lengths = [length] * batch
    cache = fragmented_cache(ATTN_ARGS, lengths, 16 if backend.ON_GPU else 4, seed=batch, dtype=DTYPE,
                             device=DEVICE)
    fill_sequences(cache, lengths, 0, seed=batch)
    meta = step_metadata(cache, lengths, [q_len] * batch, DEVICE)
    q = torch.randn(batch * q_len, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    return cache, meta, q


def contiguous_kv(cache, meta, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V as [B, KVH, L, D] (the anchor's layout), gathered once outside the timed region."""
    def gather(x):
        rows = torch.stack([x[0][t].reshape(-1, KV_HEADS, HEAD_DIM)[:length] for t in meta.block_tables_host])
        return rows.transpose(1, 2).contiguous()
    return gather(cache.k), gather(cache.v)


@pytest.mark.parametrize("variant", ["triton", "sdpa-contiguous"])
@pytest.mark.parametrize("batch,length", DECODE_CASES, ids=[f"b{b}-ctx{n}" for b, n in DECODE_CASES])
def test_serve_paged_decode(device_bench, variant, batch, length):
    cache, meta, q = attention_inputs(batch, length, 1)
    scale = HEAD_DIM ** -0.5
    kv_bytes = 2 * batch * length * KV_HEADS * HEAD_DIM * cache.k.element_size()
    io_bytes = 2 * q.numel() * q.element_size()
    if variant == "triton":
        attn = make_backend("triton")
        fn = lambda: attn.attend(q, cache.k[0], cache.v[0], meta, scale=scale)  # noqa: E731
    else:
        k, v = contiguous_kv(cache, meta, batch, length)
        qb = q.view(batch, 1, HEADS, HEAD_DIM).transpose(1, 2)
        fn = lambda: F.scaled_dot_product_attention(qb, k, v, scale=scale, enable_gqa=True)  # noqa: E731
    out = device_bench(fn, bytes_moved=kv_bytes + io_bytes, flops=4 * batch * HEADS * HEAD_DIM * length,
                       batch=batch, context=length, variant=variant, dtype=str(DTYPE).replace("torch.", ""))
    out = out if variant == "triton" else out.transpose(1, 2).reshape(batch, HEADS, HEAD_DIM)
    if not backend.ON_GPU or batch == 1:  # the float64 reference loops on the host: check the small cases
        ref = paged_attention_reference(q, cache.k[0], cache.v[0], meta, scale=scale)
        assert_close(out.double(), ref, check_dtype=False, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("variant", ["triton", "sdpa-contiguous"])
@pytest.mark.parametrize("batch,length", PREFILL_CASES, ids=[f"b{b}-len{n}" for b, n in PREFILL_CASES])
def test_serve_paged_prefill(device_bench, variant, batch, length):
    cache, meta, q = attention_inputs(batch, length, length)
    scale = HEAD_DIM ** -0.5
    if variant == "triton":
        attn = make_backend("triton")
        fn = lambda: attn.attend(q, cache.k[0], cache.v[0], meta, scale=scale)  # noqa: E731
    else:
        k, v = contiguous_kv(cache, meta, batch, length)
        qb = q.view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
        fn = lambda: F.scaled_dot_product_attention(qb, k, v, scale=scale, is_causal=True, enable_gqa=True)  # noqa
    kv_bytes = 2 * batch * length * KV_HEADS * HEAD_DIM * cache.k.element_size()
    out = device_bench(fn, bytes_moved=kv_bytes + 2 * q.numel() * q.element_size(),
                       flops=2 * batch * HEADS * HEAD_DIM * length * length, batch=batch, length=length,
                       variant=variant, dtype=str(DTYPE).replace("torch.", ""))
    if variant != "triton":
        out = out.transpose(1, 2).reshape(batch * length, HEADS, HEAD_DIM)
    ref_rows = min(length, 4)  # compare the first few rows of sequence 0 with the float64 reference
    sub = step_metadata(cache, [ref_rows], [ref_rows], DEVICE)
    ref = paged_attention_reference(q[:ref_rows], cache.k[0], cache.v[0], sub, scale=scale)
    assert_close(out[:ref_rows].double(), ref, check_dtype=False, rtol=3e-2, atol=3e-2)


# all four projections of a layer: the decode step's weight streaming is their sum, and the small-N ones (wo, and
# wqkv) get the fewest programs per SM, so they are where a batch-1 GEMV falls short of copy bandwidth first
LINEAR_SHAPES = sized(LLAMA3_8B.linear_shapes(), {"wqkv": (48, 32), "w2": (16, 80)})
TOKENS = sized([1, 32, 128, 256], [1, 5])


@pytest.mark.parametrize("tokens", TOKENS, ids=[f"m{m}" for m in TOKENS])
@pytest.mark.parametrize("matrix", list(LINEAR_SHAPES))
@pytest.mark.parametrize("precision", ["bf16", "fp8", "fp8-scaled-mm"])
def test_serve_linear(device_bench, precision, matrix, tokens):
    n, k = LINEAR_SHAPES[matrix]
    dense = DenseLinear(k, n, DTYPE, DEVICE)
    dense.weight.data.normal_(0, 0.02)
    layer = dense if precision == "bf16" else fp8_adapter.quantize_linear(dense)
    path = "dense"
    if precision == "fp8":
        layer = DecodeFp8Linear(layer.inner, use_kernel=True)  # the kernel path on the CPU too (interpreter)
        path = layer.choice(tokens).name
    elif precision == "fp8-scaled-mm":
        layer = layer.inner  # impl.fp8's own path, without serving's table
        path = layer.path
    x = torch.randn(tokens, k, device=DEVICE, dtype=DTYPE)
    w_bytes = fp8_adapter.weight_bytes(layer)
    y = device_bench(lambda: layer(x), bytes_moved=w_bytes + (tokens * k + tokens * n) * x.element_size(),
                     flops=2 * tokens * n * k, flops_dtype="fp8" if "a8" in path or "scaled_mm" in path else "bf16",
                     precision=precision, matrix=matrix, tokens=tokens, n=n, k=k, weight_bytes=w_bytes, path=path,
                     gemm_table=choose.active_table().describe())
    check_linear(y, x, dense if precision == "bf16" else layer, tokens)


def linear_kind(layer, tokens: int) -> str:
    """The error model of the path ``layer`` serves ``tokens`` rows with: ``bf16`` (dense), ``a8`` (activations
    quantized to e4m3: the W8A8 GEMV tiles, or impl.fp8's scaled_mm / qdq paths) or ``w8a16``."""
    if isinstance(layer, DenseLinear):
        return "bf16"
    if isinstance(layer, DecodeFp8Linear):
        choice = layer.choice(tokens)
        if choice.path == "w8a16" and (layer.use_kernel or layer.inner.weight.is_cuda):
            return "a8" if choice.config.a8 else "w8a16"
        layer = layer.inner
    return "a8" if layer.path.startswith(("scaled_mm", "qdq")) else "w8a16"


def check_linear(y: torch.Tensor, x: torch.Tensor, layer, tokens: int) -> None:
    """|y - ref| within ``impl.serve.tune.error_bound`` elementwise: ref = x · (s ⊙ q)ᵀ in float64 over the weights
    the layer holds (FP8 codes times scales; the bf16 weight for dense), the bound K·2^-22·(|x|·|W|ᵀ) for the fp32
    sums plus 2^-7 |ref| for the output's rounding, plus e4m3's unit roundoff (2^-4, 5% margin) of |x|·|W|ᵀ where
    the activations are quantized."""
    inner = layer.inner if isinstance(layer, DecodeFp8Linear) else layer
    kind = linear_kind(layer, tokens)
    ref, a = serve_tune.reference(x, inner.weight, None if kind == "bf16" else inner.weight_scale)
    err = (y.double() - ref).abs()
    ratio = err / serve_tune.error_bound(kind, ref, a, x.shape[-1])
    assert bool(torch.isfinite(y).all()) and bool((ratio <= 1).all()), \
        f"{kind} linear off its float64 reference by {float(ratio.max()):.2f}x the bound"
