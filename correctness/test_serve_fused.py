"""The fused Triton kernels (RMSNorm + residual, RoPE + KV split/store, SiLU·up) against the torch ops they replace,
and the whole model fused vs unfused through the paged cache (interpreted here, native on a GPU)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle import assert_close, poison_
from fixtures.serve import tiny_model
from fixtures.strategies import make_array
from impl import backend
from impl.backend import DEVICE
from impl.fp8.linear import unit_roundoff
from impl.serve.attention import make_backend
from impl.serve.fused import rmsnorm, rope_split, silu_mul
from impl.serve.kv_cache import CacheConfig, PagedKVCache, PagedStep
from impl.serve.model import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq

DTYPES = ["float32"] + (["bfloat16"] if backend.ON_GPU else [])
TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "bfloat16": dict(rtol=1.6e-2, atol=1e-2)}
EXAMPLES = settings(max_examples=min(settings.default.max_examples, 40))  # new block sizes recompile on a GPU


def tensor(rows: int, cols: int, seed: int, dtype: str, pattern: str = "random") -> torch.Tensor:
    x = make_array(rows * cols, "float32", pattern, seed).reshape(rows, cols) / 50  # typical activation scale
    return torch.from_numpy(x).to(DEVICE, getattr(torch, dtype))


@EXAMPLES
@given(rows=st.integers(0, 9), cols=st.sampled_from([1, 7, 48, 64, 100, 576]), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES), residual=st.booleans(), pattern=st.sampled_from(["random", "all_equal", "zipf"]))
def test_rmsnorm_matches_torch_ops(rows, cols, seed, dtype, residual, pattern):
    x, r = tensor(rows, cols, seed, dtype, pattern), tensor(rows, cols, seed + 1, dtype)
    norm = RMSNorm(cols, 1e-5, getattr(torch, dtype), DEVICE)
    norm.weight.data = tensor(1, cols, seed + 2, dtype)[0] * 50
    x0 = x.clone()
    got, h = rmsnorm(x, norm.weight, 1e-5, r if residual else None)
    want_h = x + r if residual else x
    assert_close(got, norm(want_h), **TOL[dtype])
    if residual:
        assert torch.equal(h, want_h), "the residual sum must round exactly as torch's add"
    assert torch.equal(x, x0)


def check_rope(got: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``got`` vs the float64 rotation x·cos + rotate_half(x)·sin of the same (rounded) inputs, within
    2u·(|x·cos| + |rotate_half(x)·sin|) + u·|result| (u = unit roundoff of the dtype): two products and a sum, each
    rounded, and the terms may cancel (a result of 1.0 from terms near 8 carries their rounding, not 1.0's)."""
    xd, c, s_ = x.double().cpu(), cos.double().cpu()[:, None, :], sin.double().cpu()[:, None, :]
    half = x.shape[-1] // 2
    rot = torch.cat([-xd[..., half:], xd[..., :half]], dim=-1)
    ref = xd * c + rot * s_
    u = unit_roundoff(x.dtype)
    bound = 2 * u * ((xd * c).abs() + (rot * s_).abs()) + u * ref.abs() + torch.finfo(x.dtype).tiny
    err = (got.double().cpu() - ref).abs()
    assert bool((err <= bound).all()), f"RoPE off by {float((err / bound).max()):.2f}x its rounding bound"


@EXAMPLES
@given(t=st.integers(0, 6), heads=st.sampled_from([(1, 1), (4, 2), (6, 2), (9, 3)]), dim=st.sampled_from([8, 24, 64]),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES))
def test_rope_split_matches_apply_rope_and_stores_each_slot(t, heads, dim, seed, dtype):
    h, kvh = heads
    qkv = tensor(t, (h + 2 * kvh) * dim, seed, dtype) * 50
    pos = torch.from_numpy(np.random.default_rng(seed).integers(0, 5000, t)).to(DEVICE)
    cos, sin = rope_cos_sin(pos, rope_inv_freq(dim, 5e5).to(DEVICE), qkv.dtype)
    slots = torch.from_numpy(np.random.default_rng(seed).permutation(t + 5)[:t]).to(DEVICE)
    q = poison_(torch.empty(t, h, dim, dtype=qkv.dtype, device=DEVICE))
    k = poison_(torch.empty(t + 5, kvh, dim, dtype=qkv.dtype, device=DEVICE))
    v = poison_(torch.empty_like(k))
    rope_split(qkv, cos, sin, h, kvh, q, k, v, slots)
    parts = qkv.view(t, h + 2 * kvh, dim)
    for got, x in ((q, parts[:, :h]), (k[slots], parts[:, h:h + kvh])):
        check_rope(got, x, cos, sin)
        check_rope(apply_rope(x, cos, sin), x, cos, sin)  # the torch ops it replaces meet the same bound
    assert torch.equal(v[slots], parts[:, h + kvh:])
    untouched = torch.ones(t + 5, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert bool(torch.isnan(k[untouched]).all() and torch.isnan(v[untouched]).all()), "a row outside slots changed"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees exp overflow on nasty inputs
@EXAMPLES
@given(rows=st.integers(0, 5), f=st.sampled_from([1, 5, 80, 1536, 2100]), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES), pattern=st.sampled_from(["random", "nasty"]))
def test_silu_mul_matches_torch_ops(rows, f, seed, dtype, pattern):
    gu = tensor(rows, 2 * f, seed, dtype, pattern) * 50
    want = F.silu(gu[:, :f]) * gu[:, f:]
    assert_close(silu_mul(gu), want, **TOL[dtype])


def test_fused_wrappers_reject_bad_input():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, torch.ones(4, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="even width"):
        silu_mul(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        silu_mul(torch.zeros(8, device=DEVICE))
    q = torch.empty(2, 2, 4, device=DEVICE)
    kv = torch.empty(3, 1, 4, device=DEVICE)
    cs = torch.zeros(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="heads"):
        rope_split(torch.zeros(2, 15, device=DEVICE), cs, cs, 2, 1, q, kv, kv, torch.arange(2, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        rope_split(torch.zeros(2, 16, device=DEVICE), cs, cs, 2, 1, q, kv.double(), kv, torch.arange(2, device=DEVICE))


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["kv-model-dtype", "kv-fp8"])
def test_fused_model_equals_unfused_through_the_paged_cache(kv_dtype):
    """Prefill 11 tokens, then decode 2, fused and unfused, each with its own cache: same logits, same cache."""
    model = tiny_model(device=DEVICE)
    logits, caches = {}, {}
    for fused in (False, True):
        model.set_fused(fused)
        cache = PagedKVCache(model.args, CacheConfig(8, 4, kv_dtype), dtype=model.dtype, device=DEVICE)
        out, start = [], 0
        for chunk in (list(range(5, 16)), [3], [9]):
            cache.reserve(0, start + len(chunk))
            meta = cache.metadata([(0, start, len(chunk))], DEVICE)
            with torch.no_grad():
                out.append(model(torch.tensor(chunk, device=DEVICE), PagedStep(cache, make_backend("triton"), meta)))
            start += len(chunk)
        logits[fused], caches[fused] = torch.cat(out), cache
    model.set_fused(backend.ON_GPU)
    assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    k_fused, k_plain = caches[True].k.float(), caches[False].k.float()
    assert_close(k_fused, k_plain, **(dict(rtol=1e-5, atol=1e-6) if kv_dtype is None else dict(rtol=0.13, atol=1e-3)))
