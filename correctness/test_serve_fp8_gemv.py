"""The weight-only FP8 decode GEMM (W8A16) against a float64 reference, and its module against impl.fp8's linear."""
import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle import assert_close, check_kernel
from impl import backend
from impl.backend import DEVICE
from impl.serve import fp8_adapter
from impl.serve.fp8_gemv import CONFIGS, MAX_M, DecodeFp8Linear, w8a16_linear
from impl.serve.fp8_gemv_splitk import choose_splits, w8a16_linear_splitk
from impl.serve.model import DenseLinear

SMALL = triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4, num_stages=2)  # fits shared memory at M = 128
X_DTYPES = ["float32"] + (["bfloat16"] if backend.ON_GPU else [])
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


def fp8_weight(n: int, k: int, seed: int, zero_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, n)[:, None]  # rows of very different ranges
    if zero_rows and n > 1:
        w[1] = 0
    s = torch.where(w.abs().amax(1) > 0, w.abs().amax(1) / 448, torch.ones(n))
    return (w / s[:, None]).to(torch.float8_e4m3fn).to(DEVICE), s.to(DEVICE)


@settings(max_examples=min(settings.default.max_examples, 40))  # each block size is a compile on a GPU
@given(m=st.sampled_from([0, 1, 2, 5, 16, 17, 40, MAX_M]), n=st.sampled_from([1, 16, 33, 100]),
       k=st.sampled_from([16, 48, 100, 130]), seed=st.integers(0, 2**31 - 1), per_tensor=st.booleans(),
       zero_rows=st.booleans(), dtype=st.sampled_from(X_DTYPES))
def test_w8a16_matches_float64_reference(m, n, k, seed, per_tensor, zero_rows, dtype):
    q, s = fp8_weight(n, k, seed, zero_rows)
    if per_tensor:
        s = s.max().reshape(1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, getattr(torch, dtype))
    x0, q0 = x.clone(), q.clone()
    ref = x.double().cpu() @ (q.double().cpu() * s.double().cpu()[:, None] if not per_tensor
                              else q.double().cpu() * s.double().cpu()).T
    got = w8a16_linear(x, q, s, config=SMALL)  # one config here (no tuning per shape); each tuning one is checked below
    assert got.dtype == x.dtype
    scale = max(float(ref.abs().max()), 1e-30) if ref.numel() else 1.0
    assert_close(got.double(), ref.to(got.device), check_dtype=False, rtol=TOL[dtype]["rtol"],
                 atol=TOL[dtype]["atol"] * scale)
    assert torch.equal(x, x0) and torch.equal(q.view(torch.uint8), q0.view(torch.uint8)), "inputs modified"


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", X_DTYPES)
def test_every_tuning_config_matches_the_reference(config, dtype):
    """Each config the autotuner may pick, at decode shapes with ragged N and K; then the tuned path itself."""
    q, s = fp8_weight(200, 1000, 3, True)
    for m in (1, 7):
        x = torch.randn(m, 1000, generator=torch.Generator().manual_seed(m)).to(DEVICE, getattr(torch, dtype))
        ref = x.double().cpu() @ (q.double().cpu() * s.double().cpu()[:, None]).T
        scale = float(ref.abs().max())
        for got in (w8a16_linear(x, q, s, config=config), w8a16_linear(x, q, s)):
            assert_close(got.double(), ref.to(got.device), check_dtype=False, rtol=TOL[dtype]["rtol"],
                         atol=TOL[dtype]["atol"] * scale)


def test_w8a16_writes_every_output_and_rejects_bad_input():
    q, s = fp8_weight(33, 48, 0, False)
    x = torch.randn(3, 48).to(DEVICE)
    ref = (x.double().cpu() @ (q.double().cpu() * s.double().cpu()[:, None]).T).float().numpy()
    check_kernel(lambda out: w8a16_linear(x, q, s, out=out), torch.empty(3, 33, device=DEVICE), ref,
                 rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="share K"):
        w8a16_linear(x[:, :40], q, s)
    with pytest.raises(TypeError, match="e4m3"):
        w8a16_linear(x, q.float(), s)
    with pytest.raises(ValueError, match="at most"):
        w8a16_linear(torch.zeros(MAX_M + 1, 48, device=DEVICE), q, s)
    with pytest.raises(ValueError, match="1 or 33"):
        w8a16_linear(x, q, s[:5])
    with pytest.raises(ValueError, match="row-major"):
        w8a16_linear(x, q, s, out=torch.empty(33, 3, device=DEVICE).T)


@pytest.mark.parametrize("rows", [1, 7, MAX_M + 3])
def test_decode_linear_equals_impl_fp8_linear(rows):
    """The wrapper's kernel path (M <= MAX_M) computes x · (s ⊙ q)ᵀ of impl.fp8's weight within float32 rounding;
    beyond MAX_M it is impl.fp8's linear, whose GPU path (W8A8 ``_scaled_mm``) also rounds x per token to e4m3."""
    dense = DenseLinear(64, 48, torch.float32, DEVICE)
    dense.weight.data.normal_(0, 0.05, generator=torch.Generator(device=DEVICE).manual_seed(rows))
    layer = fp8_adapter.quantize_linear(dense)
    assert isinstance(layer, DecodeFp8Linear)
    forced = DecodeFp8Linear(layer.inner, use_kernel=True)
    x = torch.randn(2, rows, 64, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    w = layer.inner.dequantized_weight().double()
    ref = x.double() @ w.t()
    w8a8_bound = 2.0 ** -4 * (x.double().abs() @ w.abs().t()) + 1e-5  # e4m3 rounds x by <= 2^-4 relative
    for y, kernel in ((forced(x), 2 * rows <= MAX_M), (layer.inner(x), False)):
        assert y.shape == (2, rows, 48)
        if kernel or not layer.inner.path.startswith("scaled_mm"):
            assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
        else:
            err = (y.double() - ref).abs()
            assert bool((err <= w8a8_bound).all()), f"W8A8 off by {float((err / w8a8_bound).max()):.2f}x its bound"
    with pytest.raises(ValueError, match="per-tensor or per-channel"):
        DecodeFp8Linear(dense)


@settings(max_examples=min(settings.default.max_examples, 30))
@given(m=st.sampled_from([1, 3, 16, 40]), n=st.sampled_from([1, 17, 64]), k=st.sampled_from([0, 1, 31, 100, 257]),
       splits=st.sampled_from([None, 1, 2, 3, 7, 50]), seed=st.integers(0, 2**31 - 1), per_tensor=st.booleans(),
       dtype=st.sampled_from(X_DTYPES))
def test_split_k_matches_float64_reference(m, n, k, splits, seed, per_tensor, dtype):
    """The split-K variant: any number of splits (more than K has chunks, K = 0 too) gives x · (s ⊙ q)ᵀ."""
    q, s = fp8_weight(n, max(k, 1), seed, True)
    q = q[:, :k]
    if per_tensor:
        s = s.max().reshape(1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, getattr(torch, dtype))
    ref = x.double().cpu() @ (q.double().cpu() * s.double().cpu().reshape(-1, 1)).T
    scale = max(float(ref.abs().max()), 1e-30) if ref.numel() else 1.0
    check_kernel(lambda out: w8a16_linear_splitk(x, q, s, out=out, splits=splits),
                 torch.empty(m, n, device=DEVICE, dtype=x.dtype), ref.numpy(), check_dtype=False,
                 rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


def test_split_k_is_deterministic_and_rejects_bad_splits():
    q, s = fp8_weight(33, 300, 0, False)
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    a, b = w8a16_linear_splitk(x, q, s, splits=5), w8a16_linear_splitk(x, q, s, splits=5)
    assert torch.equal(a, b), "a fixed-order sum must give the same bits every call"
    assert choose_splits(4096, 4096, 32, 256, 132) == 3 and choose_splits(28672, 4096, 32, 256, 132) == 1
    assert choose_splits(64, 16, 32, 256, 132) == 1  # never more splits than chunks of K
    with pytest.raises(ValueError, match="splits"):
        w8a16_linear_splitk(x, q, s, splits=0)
    with pytest.raises(ValueError, match="share K"):
        w8a16_linear_splitk(x[:, :10], q, s)
