"""The deferred FP8 path: an FP8 GEMM with unit scales hands its output to the next fused kernel as ``ScaledRows``
(values, per-token scales, per-channel scales), and that kernel applies the scales as it loads. Each consumer must
give the bits it gives on the same rows made dense in torch (on a GPU too: ``fused.unscale`` rounds each scaling
product by itself), the linear must match float64 within its stated bound, and the model must give the same logits
bit for bit whether its consumers or its linears apply the scales."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle import bits, nan_as_one, poison_
from fixtures.serve import prefill_logits, serve_projections_by, tiny_model
from fixtures.strategies import make_array
from impl import backend
from impl.backend import DEVICE
from impl.serve import fp8_adapter, fused_quant, tune
from impl.serve.choose import GemmChoice, GemmTable
from impl.serve.fp8_gemv import DecodeFp8Linear, GemvConfig, unit_scaled_mm
from impl.serve.fused import ScaledRows, rmsnorm, rope_split, silu_mul
from impl.serve.fused_quant import quantize_rows, rmsnorm_quant, silu_mul_quant
from impl.serve.model import DenseLinear

DTYPES = ["float32", "float16"] + (["bfloat16"] if backend.ON_GPU else [])
PATTERNS = ["random", "all_equal", "zipf", "nasty", "extremes"]
EXAMPLES = settings(max_examples=min(settings.default.max_examples, 25))
DEFERRED = GemmChoice("deferred", None, "measured")


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bits, NaN counting as one value (the sign and payload of a NaN that arithmetic makes are not
    specified: torch's and the kernel's conversions of a NaN row differ there; e4m3 NaN codes likewise)."""
    if got.dtype == torch.float8_e4m3fn:
        return torch.equal(nan_as_one(bits(got)), nan_as_one(bits(want)))
    if got.dtype.is_floating_point:
        nan = torch.isnan(got)
        return torch.equal(nan, torch.isnan(want)) and torch.equal(bits(got)[~nan], bits(want)[~nan])
    return torch.equal(bits(got), bits(want))


def same_rows(got, want) -> bool:
    """Two ``Fp8Rows`` with equal codes and scales."""
    return same(got.codes, want.codes) and same(got.scales, want.scales)


def scaled_rows(rows: int, cols: int, seed: int, dtype: str, pattern: str = "random") -> ScaledRows:
    """Values as an FP8 GEMM leaves them (up to ~448² K), per-token scales ~1e-3, per-channel scales ~1e-3..1e-2,
    with the pattern's NaN, ±inf, −0.0 and extremes in the values."""
    v = make_array(rows * cols, "float16" if dtype == "float16" else "float32", pattern, seed).reshape(rows, cols)
    v = torch.from_numpy(v.astype(np.float32) * (1 if pattern in ("nasty", "extremes") else 200.0))
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(rows, 1, generator=g) * 2e-3 + 1e-4
    c = torch.rand(cols, generator=g) * 1e-2 + 1e-3
    return ScaledRows(v.to(DEVICE, getattr(torch, dtype)), r.to(DEVICE), c.to(DEVICE))


@EXAMPLES
@given(rows=st.integers(0, 6), cols=st.sampled_from([1, 7, 64, 100, 576]), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES), pattern=st.sampled_from(PATTERNS), residual=st.booleans())
def test_norms_take_scaled_rows_as_their_dense_values(rows, cols, seed, dtype, pattern, residual):
    x = scaled_rows(rows, cols, seed, dtype, pattern)
    r = scaled_rows(rows, cols, seed + 1, dtype).dense() if residual else None
    w = scaled_rows(1, cols, seed + 2, dtype).dense()[0]
    v0 = x.values.clone()
    got, h = rmsnorm(x, w, 1e-5, r)
    want, want_h = rmsnorm(x.dense(), w, 1e-5, r)
    assert same(got, want)
    if residual:
        assert same(h, want_h), "the residual sum must be that of the dense rows"
    with_poison = fused_quant._empty_rows

    def poisoned(t, k, like):
        q, s = with_poison(t, k, like)
        return poison_(q, "max"), poison_(s, "nan")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_quant, "_empty_rows", poisoned)
        got_q, _ = rmsnorm_quant(x, w, 1e-5, r)
    assert same_rows(got_q, rmsnorm_quant(x.dense(), w, 1e-5, r)[0])
    assert torch.equal(bits(x.values), bits(v0)), "inputs must not be modified"


@EXAMPLES
@given(rows=st.integers(0, 5), f=st.sampled_from([1, 5, 64, 300, fused_quant.SILU_BLOCK + 3]),
       one_pass=st.booleans(), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES),
       pattern=st.sampled_from(PATTERNS))
def test_swiglu_kernels_take_scaled_rows_as_their_dense_values(rows, f, one_pass, seed, dtype, pattern):
    gu = scaled_rows(rows, 2 * f, seed, dtype, pattern)
    assert same(silu_mul(gu), silu_mul(gu.dense()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_quant, "SILU_ROW", fused_quant.SILU_ROW if one_pass else 1)
        got, want = silu_mul_quant(gu), silu_mul_quant(gu.dense())
    assert same_rows(got, want)


@settings(max_examples=min(settings.default.max_examples, 10))
@given(t=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_rope_split_takes_scaled_rows_as_their_dense_values(t, seed):
    heads, kv_heads, dim = 4, 2, 16
    qkv = scaled_rows(t, (heads + 2 * kv_heads) * dim, seed, "float32")
    ang = torch.rand(t, dim // 2, generator=torch.Generator().manual_seed(seed)) * 6
    cos = torch.cat([ang.cos(), ang.cos()], 1).to(DEVICE)
    sin = torch.cat([ang.sin(), ang.sin()], 1).to(DEVICE)
    slots = torch.arange(t, device=DEVICE).flip(0)
    outs = []
    for x in (qkv, qkv.dense()):
        q = poison_(torch.empty(t, heads, dim, device=DEVICE))
        k, v = poison_(torch.empty(t, kv_heads, dim, device=DEVICE)), poison_(torch.empty(t, kv_heads, dim,
                                                                                          device=DEVICE))
        rope_split(x, cos, sin, heads, kv_heads, q, k, v, slots)
        outs.append((q, k, v))
    for got, want in zip(*outs):
        assert same(got, want) and bool(torch.isfinite(got).all())


def test_scaled_rows_are_checked_and_mean_their_scaled_product():
    v = torch.tensor([[3.0, -5.0], [0.5, 7.0]])
    y = ScaledRows(v, torch.tensor([[2.0], [4.0]]), torch.tensor([0.5, 0.25])).dense()
    assert torch.equal(y, torch.tensor([[3.0, -2.5], [1.0, 7.0]]))
    with pytest.raises(ValueError, match="row scales"):
        ScaledRows(v, torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="column scales"):
        ScaledRows(v, torch.ones(2, 1), torch.ones(3))
    with pytest.raises(ValueError, match="row scales"):
        ScaledRows(v, torch.ones(2, 1, dtype=torch.float64), torch.ones(2))
    with pytest.raises(ValueError, match="2-D"):
        ScaledRows(torch.ones(4), torch.ones(4, 1), torch.ones(1))


def deferred_layer(n: int, k: int, seed: int = 0, bias: bool = False) -> DecodeFp8Linear:
    dense = DenseLinear(k, n, torch.float32, DEVICE)
    dense.weight.data.normal_(0, 0.05, generator=torch.Generator(device=DEVICE).manual_seed(seed))
    layer = fp8_adapter.quantize_linear(dense)
    if bias:
        layer.inner.bias = torch.ones(n, device=DEVICE)
    table = GemmTable({(n, k): [(64, DEFERRED)]}, origin="synthetic")
    return DecodeFp8Linear(layer.inner, use_kernel=True, table=table)


def test_deferred_linear_matches_float64_and_its_scaled_rows():
    """y of the deferred path is within the tune's stated bound of x · (s ⊙ q)ᵀ in float64 (a doubled column scale
    or a missing scale is not); with defer=True the layer returns ScaledRows whose dense() is that y, bit for bit,
    from bf16 rows, from FP8 rows and from a SwiGLU input given as ScaledRows."""
    layer = deferred_layer(48, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert layer.defers_scale(5, x.device) and layer.takes_fp8_rows(5, x.device)
    y = layer(x)
    ref, a = tune.reference(x, layer.inner.weight, layer.inner.weight_scale)
    assert bool(((y.double() - ref).abs() <= tune.error_bound("deferred", ref, a, 64)).all())
    sr = layer(x, defer=True)
    bad = y.double().clone()
    bad[:, 7] *= 2  # one channel's scale applied twice
    for wrong in (bad, sr.values.double(), (sr.values.float() * sr.row_scale).double()):  # scales left out
        assert not bool(((wrong - ref).abs() <= tune.error_bound("deferred", ref, a, 64)).all())
    assert isinstance(sr, ScaledRows) and torch.equal(bits(sr.dense()), bits(y))
    assert torch.equal(bits(layer(quantize_rows(x), defer=True).dense()), bits(y))
    gu = scaled_rows(5, 128, 3, "float32")
    assert torch.equal(bits(layer(gu, swiglu=True)), bits(layer(silu_mul(gu.dense()))))
    assert torch.equal(bits(unit_scaled_mm(quantize_rows(x), layer.inner.weight, layer.col_scale).values),
                       bits(sr.values))


@pytest.mark.parametrize("choice", [GemmChoice("w8a16", GemvConfig(dot=True, block_n=16, block_k=32), "measured"),
                                    GemmChoice("inner", None, "measured")], ids=["w8a16", "inner"])
def test_a_layer_not_deferring_takes_a_scaled_swiglu_input_as_its_product(choice):
    """A deferred w13 hands the down projection ScaledRows; where that projection's path takes bf16 activations (a
    W8A16 kernel, or impl.fp8's dequantising path on a CPU) it computes W · silu_mul(gu.dense()), and where it takes
    per-token FP8 rows (impl.fp8's row-wise path on a GPU) W · silu_mul_quant(gu.dense())."""
    layer = deferred_layer(48, 64)
    layer.table = GemmTable({(48, 64): [(64, choice)]}, origin="synthetic")
    gu = scaled_rows(5, 128, 3, "float32")
    rows = layer.takes_fp8_rows(5, gu.device)
    assert rows == (choice.path == "inner" and layer.inner.quantizes_per_token)
    want = layer(silu_mul_quant(gu.dense())) if rows else layer(silu_mul(gu.dense()))
    assert same(layer(gu, swiglu=True, defer=True), want)


def test_a_layer_that_cannot_defer_takes_the_rule():
    layer = deferred_layer(48, 64, bias=True)
    assert not layer.can_defer and not layer.defers_scale(5, torch.device(DEVICE))
    assert layer.choice(5).source == "rule"
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert isinstance(layer(x, defer=True), torch.Tensor)
    cpu_default = DecodeFp8Linear(deferred_layer(48, 64).inner, table=layer.table)  # kernels on CUDA tensors only
    assert not cpu_default.defers_scale(5, "cpu") and cpu_default.defers_scale(5, torch.device("cuda"))


def test_model_gives_the_same_logits_whether_consumers_or_linears_apply_the_scales():
    """A toy model whose FP8 linears all take the deferred path, fused: with the scales applied by the norms, RoPE
    and SwiGLU kernels (ScaledRows handed over) and with every linear applying its own (defers_scale off), the same
    logits bit for bit; and those logits stay near the dense model's (not garbage
    that agrees with itself)."""
    dense_logits = prefill_logits(tiny_model(device=DEVICE).set_fused(True), DEVICE)
    model = fp8_adapter.quantize_model_(tiny_model(device=DEVICE))
    serve_projections_by(model, DEFERRED)
    model.set_fused(True)
    handed: list[int] = []
    real = DecodeFp8Linear.forward

    def spy(self, x, swiglu=False, defer=False):
        y = real(self, x, swiglu, defer)
        handed.append(isinstance(y, ScaledRows))
        return y

    logits = {}
    for consumers_scale in (True, False):
        handed.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(DecodeFp8Linear, "forward", spy)
            if not consumers_scale:
                mp.setattr(DecodeFp8Linear, "defers_scale", lambda self, m, device: False)
            logits[consumers_scale] = prefill_logits(model, DEVICE)
        assert handed and all(handed) == consumers_scale and any(handed) == consumers_scale
    model.set_fused(backend.ON_GPU)
    assert same(logits[True], logits[False])
    err = (logits[True] - dense_logits).abs().max() / dense_logits.abs().max()
    assert float(err) < 0.2, f"FP8 logits {float(err):.3f} of the dense model's range away from it"


@pytest.mark.skipif(not backend.ON_GPU, reason="needs a CUDA GPU: torch._scaled_mm runs on sm_89+ only")
def test_unit_scaled_mm_on_the_gpu_matches_the_rowwise_gemm():
    """cuBLASLt's per-tensor FP8 GEMM with unit scales, the scales applied after: within two bf16 units of the
    row-wise GEMM's output (one rounding more) and within the tune's bound of float64."""
    dense = DenseLinear(4096, 1024, torch.bfloat16, DEVICE)
    dense.weight.data.normal_(0, 0.02, generator=torch.Generator(device=DEVICE).manual_seed(0))
    layer = fp8_adapter.quantize_linear(dense)
    x = torch.randn(200, 4096, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE).bfloat16()
    rows = quantize_rows(x)
    got = unit_scaled_mm(rows, layer.inner.weight, layer.col_scale).dense()
    rowwise = layer.inner.forward_fp8_rows(rows.codes, rows.scales)
    assert got.dtype == torch.bfloat16 and bool(torch.isfinite(got).all())
    assert bool(((got.float() - rowwise.float()).abs() <= 2 ** -7 * rowwise.float().abs() + 1e-30).all())
    ref, a = tune.reference(x, layer.inner.weight, layer.inner.weight_scale)
    assert bool(((got.double() - ref).abs() <= tune.error_bound("deferred", ref, a, 4096)).all())
