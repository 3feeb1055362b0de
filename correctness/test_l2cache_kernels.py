"""l2cache's Triton kernels against float64 torch/numpy references (hypothesis over shapes), the weight arena, and
the weight-shared networks built from the kernels."""
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fixtures.oracle import assert_close, check_kernel
from fixtures.strategies import make_array, seeds
from impl.backend import DEVICE
from impl.l2cache.arena import ALIGN, Arena
from impl.l2cache.conv import conv2d, conv2d_reference, conv_out_hw
from impl.l2cache.linear import linear, linear_reference
from impl.l2cache.nets import (ChainConfig, ChainMLP, ConvNetConfig, MLPConfig, SharedConvNet, SharedMLP,
                               mlp_for_bytes)
from impl.l2cache.touch import touch, touch_reference

pytestmark = pytest.mark.l2_state  # every test: the L2 state is checked (and put back) afterwards

DT = {"float32": torch.float32, "float16": torch.float16}
# every flag combination is a Triton compile on the GPU (~1 s): cap the examples there, keep the CI profile's here
KERNEL_EXAMPLES = settings(max_examples=min(settings.default.max_examples, 25))


def tensor(shape, dtype: str, seed: int, pattern: str = "random", scale: float = 1.0) -> torch.Tensor:
    n = math.prod(shape)
    a = make_array(n, "float32", pattern, seed) / 100.0 * scale  # make_array draws N(0, 100²)
    return torch.from_numpy(a.astype(dtype).reshape(shape)).to(DEVICE)


def tol(dtype: str, k: int) -> dict:
    # float32 accumulation over k terms vs a float64 reference; float16 adds the output's rounding (2^-11)
    if dtype == "float16":
        return {"rtol": 2e-3, "atol": 2e-3 * math.sqrt(max(k, 1))}
    return {"rtol": 1e-5, "atol": 2e-6 * math.sqrt(max(k, 1))}


# ---- linear -------------------------------------------------------------------------------------------------

@KERNEL_EXAMPLES
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(0, 90), dtype=st.sampled_from(["float32", "float16"]),
       bias=st.booleans(), relu=st.booleans(), path=st.sampled_from(["auto", "gemv", "gemm"]), seed=seeds())
def test_linear_matches_float64_reference(m, n, k, dtype, bias, relu, path, seed):
    x, w = tensor((m, k), dtype, seed), tensor((n, k), dtype, seed + 1)
    b = tensor((n,), dtype, seed + 2) if bias else None
    x0, w0 = x.clone(), w.clone()
    ref = linear_reference(x, w, b, relu).astype(dtype)
    check_kernel(lambda out: linear(x, w, b, relu=relu, out=out, path=path), torch.empty((m, n), dtype=DT[dtype],
                 device=DEVICE), ref, **tol(dtype, k))
    assert torch.equal(x, x0) and torch.equal(w, w0), "inputs were modified"


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@given(n=st.integers(1, 40), k=st.integers(1, 60), seed=seeds(), path=st.sampled_from(["gemv", "gemm"]))
def test_linear_propagates_nan_and_inf_like_the_reference(n, k, seed, path):
    x = tensor((1, k), "float32", seed, pattern="nasty", scale=0.01)
    x = torch.where(torch.isfinite(x), x.clamp(-10, 10), x)  # NaN/±inf kept; finite values kept moderate
    w = tensor((n, k), "float32", seed + 1)
    got = linear(x, w, path=path)
    assert_close(got, linear_reference(x, w).astype("float32"), **tol("float32", k))


def test_linear_empty_and_single_element():
    x, w = torch.zeros((0, 5), device=DEVICE), torch.ones((3, 5), device=DEVICE)
    assert linear(x, w).shape == (0, 3)
    one = linear(torch.full((1, 1), 2.0, device=DEVICE), torch.full((1, 1), -3.0, device=DEVICE),
                 torch.full((1,), 1.0, device=DEVICE))
    assert one.item() == -5.0


def test_linear_rejects_bad_input():
    x, w = torch.zeros((2, 4), device=DEVICE), torch.zeros((3, 4), device=DEVICE)
    with pytest.raises(ValueError, match="inner dimensions"):
        linear(x, torch.zeros((3, 5), device=DEVICE))
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        linear(x[0], w)
    with pytest.raises(TypeError, match="dtype"):
        linear(x, w.double())
    with pytest.raises(ValueError, match="contiguous"):
        linear(torch.zeros((4, 2), device=DEVICE).t(), w)
    with pytest.raises(ValueError, match="overlap"):
        linear(x, torch.zeros((4, 4), device=DEVICE), out=x)
    with pytest.raises(ValueError, match="path"):
        linear(x, w, path="gemx")
    with pytest.raises(ValueError, match=r"b must be \[N\]"):
        linear(x, w, torch.zeros(4, device=DEVICE))


# ---- convolution --------------------------------------------------------------------------------------------

@KERNEL_EXAMPLES
@given(bsz=st.integers(1, 2), c=st.integers(1, 6), co=st.integers(1, 40), h=st.integers(1, 9), wd=st.integers(1, 9),
       k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), pad=st.integers(0, 2),
       dtype=st.sampled_from(["float32", "float16"]), bias=st.booleans(), res=st.booleans(), relu=st.booleans(),
       split=st.sampled_from([1, 2, 3]), seed=seeds())
def test_conv2d_matches_float64_reference(bsz, c, co, h, wd, k, stride, pad, dtype, bias, res, relu, split, seed):
    ho, wo = conv_out_hw(h, wd, k, k, stride, pad)
    assume(ho >= 1 and wo >= 1)
    x, w = tensor((bsz, c, h, wd), dtype, seed), tensor((co, c, k, k), dtype, seed + 1, scale=0.5)
    b = tensor((co,), dtype, seed + 2) if bias else None
    r = tensor((bsz, co, ho, wo), dtype, seed + 3) if res else None
    x0, w0 = x.clone(), w.clone()
    ref = conv2d_reference(x, w, b, stride=stride, padding=pad, residual=r, relu=relu).astype(dtype)
    out = torch.empty((bsz, co, ho, wo), dtype=DT[dtype], device=DEVICE)
    check_kernel(lambda o: conv2d(x, w, b, stride=stride, padding=pad, residual=r, relu=relu, out=o, split_k=split),
                 out, ref, **tol(dtype, c * k * k))
    assert torch.equal(x, x0) and torch.equal(w, w0), "inputs were modified"


def test_conv2d_split_k_is_bit_identical_to_itself_and_close_to_no_split():
    x, w = tensor((1, 16, 4, 4), "float32", 1), tensor((24, 16, 3, 3), "float32", 2)
    one = conv2d(x, w, padding=1)
    runs = [conv2d(x, w, padding=1, split_k=4) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]), "split-K must be deterministic (fixed-order reduction)"
    assert_close(runs[0], one.cpu().numpy(), **tol("float32", 144))


def test_conv2d_rejects_bad_input():
    x, w = torch.zeros((1, 3, 5, 5), device=DEVICE), torch.zeros((4, 3, 3, 3), device=DEVICE)
    with pytest.raises(ValueError, match="channels differ"):
        conv2d(x, torch.zeros((4, 2, 3, 3), device=DEVICE))
    with pytest.raises(ValueError, match="does not fit"):
        conv2d(torch.zeros((1, 3, 2, 2), device=DEVICE), w)
    with pytest.raises(ValueError, match="stride"):
        conv2d(x, w, stride=0)
    with pytest.raises(TypeError, match="dtype"):
        conv2d(x.half(), w)
    with pytest.raises(ValueError, match="residual must be"):
        conv2d(x, w, residual=torch.zeros((1, 4, 5, 5), device=DEVICE))
    with pytest.raises(ValueError, match="overlap"):
        conv2d(x, torch.zeros((3, 3, 1, 1), device=DEVICE), out=x)
    with pytest.raises(ValueError, match="workspace"):
        conv2d(x, w, split_k=2, workspace=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        conv2d(x[0], w)


# ---- touch (the prefetch read) ------------------------------------------------------------------------------

@given(n=st.integers(1, 9000), data=st.data(), programs=st.one_of(st.none(), st.integers(1, 5)),
       pattern=st.sampled_from(["random", "extremes", "all_equal"]), seed=seeds())
def test_touch_reads_every_word_of_the_range(n, data, programs, pattern, seed):
    words = torch.from_numpy(make_array(n, "int32", pattern, seed)).to(DEVICE)
    start = data.draw(st.integers(0, n - 1))
    count = data.draw(st.integers(0, n - start))
    out = touch(words, start, count, programs=programs)
    used = out.shape[0] if programs is None else programs
    got = int(np.bitwise_xor.reduce(out[:used].cpu().numpy())) if used else 0
    assert got == touch_reference(words, start, count)


def test_touch_rejects_bad_input():
    w = torch.zeros(10, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="int32"):
        touch(w.float(), 0, 1)
    with pytest.raises(ValueError, match="outside"):
        touch(w, 5, 6)
    with pytest.raises(ValueError, match="programs"):
        touch(w, 0, 4, programs=0)


# ---- arena --------------------------------------------------------------------------------------------------

@given(shapes=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 7)), min_size=1, max_size=6),
       dtype=st.sampled_from([torch.float16, torch.float32, torch.int32]))
def test_arena_lays_out_aligned_disjoint_views_and_keeps_values(shapes, dtype):
    ts = {f"t{i}": torch.arange(a * b, dtype=torch.float32).reshape(a, b) for i, (a, b) in enumerate(shapes)}
    arena = Arena.from_tensors(ts, DEVICE, dtype)
    ends = []
    for name, t in ts.items():
        v = arena[name]
        assert v.dtype == dtype and v.shape == t.shape and torch.equal(v.cpu(), t.to(dtype))
        assert arena.offsets[name] % ALIGN == 0
        ends.append((arena.offsets[name], arena.offsets[name] + v.numel() * v.element_size()))
    ends.sort()
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:])), "views overlap"
    span = arena.span()
    assert span.ptr == arena.buffer.data_ptr() and span.offset == 0 and span.nbytes == ends[-1][1]
    assert arena.words.numel() * 4 == arena.nbytes


# ---- the weight-shared networks -----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [MLPConfig("t", 24, 3, dtype="float32"), MLPConfig("t2", 40, 2, batch=3)],
                         ids=["mlp-f32", "mlp-f16-batch3"])
def test_shared_mlp_matches_reference(cfg):
    net = SharedMLP(cfg, seed=3)
    got = net.forward()
    assert_close(got, net.reference().astype(cfg.dtype), **tol(cfg.dtype, cfg.hidden * cfg.layers))
    assert len({s for s in net.layer_spans()}) == 1, "every layer reads the one shared weight span"


@pytest.mark.parametrize("cfg", [ConvNetConfig("t", 6, 4, 3, dtype="float32"), ConvNetConfig("t2", 8, 3, 2)],
                         ids=["conv-f32", "conv-f16"])
def test_shared_convnet_matches_reference(cfg):
    net = SharedConvNet(cfg, seed=4)
    got = net.forward()
    assert_close(got, net.reference().astype(cfg.dtype), **tol(cfg.dtype, 9 * cfg.channels * cfg.layers))


@pytest.mark.parametrize("cfg", [ChainConfig("hyb", 24, 2, own=1, dtype="float32"),
                                 ChainConfig("hyb2", 16, 1, own=2, dtype="float32"),
                                 ChainConfig("stack", 20, 3, shared=False, dtype="float32"),
                                 ChainConfig("albert", 24, 3, own=0)], ids=["hybrid", "hybrid2", "stack", "albert-f16"])
def test_chain_mlp_matches_reference_and_lays_out_its_schedule(cfg):
    net = ChainMLP(cfg, seed=5)
    assert_close(net.forward(), net.reference().astype(cfg.dtype), **tol(cfg.dtype, cfg.hidden * 3 * cfg.layers))
    spans = net.layer_spans()
    per_layer = cfg.own + cfg.shared
    assert len(spans) == cfg.layers * per_layer
    if cfg.shared:
        assert len({spans[i] for i in range(0, len(spans), per_layer)}) == 1, "every layer starts with the shared W"
        assert net.persist_span() == spans[0] and net.sharing == "layers"
    else:
        assert len(set(spans)) == len(spans) and net.persist_span() == net.weight_span()
    assert len(set(spans)) == cfg.layers * cfg.own + cfg.shared
    with pytest.raises(ValueError, match="at least one matrix"):
        ChainConfig("bad", 8, 2, own=0, shared=False)


def test_presets_have_the_advertised_weight_sizes():
    from impl.l2cache.nets import CONV_PRESETS, MLP_PRESETS

    for name, cfg in {**MLP_PRESETS, **CONV_PRESETS}.items():
        mb = int(name.split("_")[1][:-2])
        assert abs(cfg.weight_bytes / 1e6 - mb) / mb < 0.1, f"{name}: {cfg.weight_bytes} B"
    assert abs(mlp_for_bytes(48 << 20).weight_bytes - (48 << 20)) / (48 << 20) < 0.05
