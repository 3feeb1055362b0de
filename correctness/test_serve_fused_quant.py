"""Per-token FP8 quantisation fused into the RMSNorm and SiLU·up kernels (``fused_quant``): the codes and scales must
equal impl.fp8's quantiser applied to the unfused kernel's output, bit for bit (checked also against impl.fp8's CPU
mirror), and the FP8 linears and the model must give the same results whether the norm or the linear quantises."""
from contextlib import contextmanager
from unittest import mock

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
from impl.fp8.reference import quantize_reference
from impl.serve import fp8_adapter, fused_quant
from impl.serve.choose import GemmChoice, GemmTable
from impl.serve.fp8_gemv import DecodeFp8Linear, GemvConfig, gemv
from impl.serve.fused import rmsnorm, silu_mul
from impl.serve.fused_quant import Fp8Rows, quantize_rows, rmsnorm_quant, silu_mul_quant
from impl.serve.model import DenseLinear

DTYPES = ["float32", "float16"] + (["bfloat16"] if backend.ON_GPU else [])  # the interpreter has no bf16
PATTERNS = ["random", "all_equal", "zipf", "nasty", "extremes"]
EXAMPLES = settings(max_examples=min(settings.default.max_examples, 30))  # new block sizes recompile on a GPU
A8 = GemvConfig(dot=True, a8=True, block_n=16, block_k=32)


def tensor(rows: int, cols: int, seed: int, dtype: str, pattern: str = "random") -> torch.Tensor:
    """[rows, cols] at activation scale; ``nasty``/``extremes`` bring NaN, ±inf, −0.0 and the dtype's extremes."""
    x = make_array(rows * cols, "float16" if dtype == "float16" else "float32", pattern, seed).reshape(rows, cols)
    x = torch.from_numpy(x.astype(np.float32) / (50 if pattern in ("random", "zipf", "all_equal") else 1))
    return x.to(DEVICE, getattr(torch, dtype))


def assert_same_rows(got: Fp8Rows, want_values: torch.Tensor) -> None:
    """``got`` holds exactly impl.fp8's per-token quantisation of ``want_values``: the Triton quantiser's codes and
    scales, and those of impl.fp8's CPU mirror (where it takes the dtype)."""
    want = quantize_rows(want_values)
    assert got.dtype == want_values.dtype and got.shape == want_values.shape
    assert torch.equal(bits(got.codes), bits(want.codes)), "codes differ from quant.quantize of the unfused output"
    assert torch.equal(bits(got.scales), bits(want.scales)), "scales differ from quant.quantize of the unfused output"
    if want_values.numel():
        codes, scales = quantize_reference(want_values.cpu(), "channel", "e4m3")
        # the sign of a NaN is not specified: NaN codes (S.1111.111) count as one code against the CPU mirror
        assert torch.equal(nan_as_one(bits(got.codes).cpu()), nan_as_one(codes.view(torch.uint8)))
        assert torch.equal(got.scales.cpu().reshape(scales.shape), scales)


@contextmanager
def poisoned(pattern: str):
    """Outputs start as garbage (``poison_``'s fills differ): every code and scale must be written by the kernel."""
    real = fused_quant._empty_rows

    def empty(t, k, like):
        q, s = real(t, k, like)
        return poison_(q, pattern), poison_(s, pattern)

    with mock.patch.object(fused_quant, "_empty_rows", empty):
        yield


@EXAMPLES
@given(rows=st.integers(0, 7), cols=st.sampled_from([1, 7, 64, 100, 576, 4096]), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES), residual=st.booleans(), pattern=st.sampled_from(PATTERNS),
       zero_row=st.booleans(), poison=st.sampled_from(["nan", "max"]))
def test_rmsnorm_quant_equals_rmsnorm_then_quantize(rows, cols, seed, dtype, residual, pattern, zero_row, poison):
    x, r = tensor(rows, cols, seed, dtype, pattern), tensor(rows, cols, seed + 1, dtype)
    if zero_row and rows:  # a row of zeros takes scale 1.0
        x[0], r[0] = 0, 0
    w = tensor(1, cols, seed + 2, dtype)[0] * 50
    x0, r0 = x.clone(), r.clone()
    with poisoned(poison):
        got, h = rmsnorm_quant(x, w, 1e-5, r if residual else None)
    want, want_h = rmsnorm(x, w, 1e-5, r if residual else None)
    assert_same_rows(got, want)
    assert (h is None) == (not residual)
    if residual:
        assert torch.equal(bits(h), bits(want_h)), "the residual sum must be the unfused kernel's"
    assert torch.equal(bits(x), bits(x0)) and torch.equal(bits(r), bits(r0)), "inputs must not be modified"


@EXAMPLES
@given(rows=st.integers(0, 5), f=st.sampled_from([1, 5, 64, 300, fused_quant.SILU_BLOCK + 3]),
       one_pass=st.booleans(),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES), pattern=st.sampled_from(PATTERNS),
       poison=st.sampled_from(["nan", "max"]))
def test_silu_mul_quant_equals_silu_mul_then_quantize(rows, f, one_pass, seed, dtype, pattern, poison):
    gu = tensor(rows, 2 * f, seed, dtype, pattern) * (50 if pattern == "random" else 1)
    gu0 = gu.clone()
    with poisoned(poison), mock.patch.object(fused_quant, "SILU_ROW", fused_quant.SILU_ROW if one_pass else 1):
        got = silu_mul_quant(gu)
    assert_same_rows(got, silu_mul(gu))
    assert torch.equal(bits(gu), bits(gu0))


def test_fused_quant_rejects_bad_input():
    w = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="2-D"):
        rmsnorm_quant(torch.zeros(8, device=DEVICE), w, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm_quant(torch.zeros(2, 8, device=DEVICE), torch.ones(4, device=DEVICE), 1e-5)
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        rmsnorm_quant(torch.zeros(2, 8, dtype=torch.float64, device=DEVICE), w.double(), 1e-5)
    with pytest.raises(ValueError, match="even width"):
        silu_mul_quant(torch.zeros(2, 7, device=DEVICE))
    rows = quantize_rows(torch.ones(3, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T, 16\]"):
        rows.check(16)
    with pytest.raises(ValueError, match="scales"):
        Fp8Rows(rows.codes, rows.scales.reshape(-1), rows.dtype).check(8)


def layer_with_table(n: int, k: int, choice: GemmChoice, seed: int = 0) -> DecodeFp8Linear:
    dense = DenseLinear(k, n, torch.float32, DEVICE)
    dense.weight.data.normal_(0, 0.05, generator=torch.Generator(device=DEVICE).manual_seed(seed))
    table = GemmTable({(n, k): [(64, choice)]}, origin="synthetic")
    return DecodeFp8Linear(fp8_adapter.quantize_linear(dense).inner, use_kernel=True, table=table)


def test_fp8_linear_gives_the_same_bits_from_rows_as_from_values():
    """An FP8-activation (a8) layer: y(Fp8Rows of x) equals y(x) bit for bit, SwiGLU input included; a layer whose
    path takes bf16 activations says it does not take rows, and refuses them."""
    layer = layer_with_table(48, 64, GemmChoice("w8a16", A8, "measured"))
    x = tensor(5, 64, 3, "float32")
    assert layer.takes_fp8_rows(5, x.device)
    assert torch.equal(bits(layer(quantize_rows(x))), bits(layer(x)))
    gu = tensor(5, 128, 4, "float32") * 50
    assert torch.equal(bits(layer(silu_mul_quant(gu))), bits(layer(gu, swiglu=True)))
    assert torch.equal(bits(gemv(silu_mul_quant(gu), layer.inner.weight, layer.inner.weight_scale, A8)),
                       bits(layer(gu, swiglu=True)))
    with pytest.raises(ValueError, match="a8"):
        gemv(quantize_rows(x), layer.inner.weight, layer.inner.weight_scale, GemvConfig(dot=True, block_n=16))
    plain = layer_with_table(48, 64, GemmChoice("w8a16", GemvConfig(dot=True, block_n=16), "measured"))
    assert not plain.takes_fp8_rows(5, x.device)
    with pytest.raises(ValueError, match="without FP8 activations"):
        plain(quantize_rows(x))
    cpu_default = DecodeFp8Linear(layer.inner, table=layer.table)  # use_kernel None: kernels on CUDA tensors only
    assert cpu_default.takes_fp8_rows(5, torch.device("cuda")) and not cpu_default.takes_fp8_rows(5, "cpu")


def test_model_with_fp8_norm_outputs_equals_the_linears_quantising():
    """A toy model whose FP8 linears all take per-token FP8 activations (a8 tiles), fused: with the norms and the
    SwiGLU quantising (the default) and with every linear quantising its own input, the same logits bit for bit."""
    model = fp8_adapter.quantize_model_(tiny_model(device=DEVICE))
    a = model.args
    serve_projections_by(model, GemmChoice("w8a16", A8, "measured"))
    model.set_fused(True)
    calls = []
    real = fused_quant.rmsnorm_quant

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    logits = {}
    for norms_quantise in (True, False):
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused_quant, "rmsnorm_quant", spy)
            if not norms_quantise:
                mp.setattr(DecodeFp8Linear, "takes_fp8_rows", lambda self, m, device: False)
            logits[norms_quantise] = prefill_logits(model, DEVICE)
        assert len(calls) == (2 * a.n_layers if norms_quantise else 0)
    model.set_fused(backend.ON_GPU)
    assert torch.equal(bits(logits[True]), bits(logits[False]))
    with pytest.raises(ValueError, match="fused"):
        model.set_fused(False).layers[0].attention_norm(torch.zeros(2, a.dim, device=DEVICE), True)


@pytest.mark.skipif(not backend.ON_GPU, reason="needs a CUDA GPU: row-wise torch._scaled_mm runs on sm_89+ only")
def test_rowwise_scaled_mm_gives_the_same_bits_from_rows_as_from_values():
    """impl.fp8's row-wise path (cuBLASLt/CUTLASS FP8 GEMM): from the norm's FP8 rows and from the bf16 values it
    quantises itself, the same output bits; the SwiGLU input quantised in silu_mul_quant likewise."""
    dense = DenseLinear(4096, 1024, torch.bfloat16, DEVICE)
    dense.weight.data.normal_(0, 0.02, generator=torch.Generator(device=DEVICE).manual_seed(0))
    layer = fp8_adapter.quantize_linear(dense)
    layer.table = GemmTable({(1024, 4096): [(256, GemmChoice("inner", None, "measured"))]}, origin="synthetic")
    assert layer.inner.path == "scaled_mm-rowwise" and layer.takes_fp8_rows(200, torch.device(DEVICE))
    x, r = tensor(200, 4096, 1, "bfloat16"), tensor(200, 4096, 2, "bfloat16")
    w = tensor(1, 4096, 3, "bfloat16")[0] * 50
    rows, h = rmsnorm_quant(x, w, 1e-5, r)
    want = layer(rmsnorm(x, w, 1e-5, r)[0])
    assert torch.equal(bits(layer(rows)), bits(want)) and want.dtype == torch.bfloat16
    gu = tensor(200, 8192, 4, "bfloat16") * 50
    wide = DenseLinear(4096, 1024, torch.bfloat16, DEVICE)
    wide.weight.data.normal_(0, 0.02, generator=torch.Generator(device=DEVICE).manual_seed(1))
    down = fp8_adapter.quantize_linear(wide)
    down.table = layer.table
    assert torch.equal(bits(down(gu, swiglu=True)), bits(down.inner(silu_mul(gu))))
