"""GPTQ rounding of FP8 weights against round-to-nearest (the checkpoint's own quantizer) and a float64 output-error
oracle: same scales, nearest codes when the inputs are uncorrelated, lower layer error when they are not."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from impl.fp8 import gptq
from impl.fp8.gptq import GptqConfig, InputMoments, gptq_quantize, placement_factors, upper_inverse_factor
from impl.fp8.quality import Swapped, Variant
from impl.fp8.reference import dequantize_reference, quantize_reference

GROUPS = ["tensor", "channel", "block"]


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0, 0] = 0.3  # an outlier: per-tensor and block scales are set by it
    return w


def correlated_inputs(t: int, k: int, seed: int, rank: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.2 * torch.randn(t, k, generator=g)


def output_error(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: str) -> float:
    wq = dequantize_reference(codes, scales, group, out_dtype=torch.float64)
    return float(((x.double() @ (w.double() - wq).t()) ** 2).sum())


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 140), k=st.integers(16, 300), group=st.sampled_from(GROUPS), seed=st.integers(0, 2**16))
def test_uncorrelated_inputs_give_round_to_nearest_codes_and_scales(n, k, group, seed):
    w = weights(n, k, seed)
    codes, scales = gptq_quantize(w, torch.eye(k, dtype=torch.float64) * 3.0, group, GptqConfig(block=32))
    want_codes, want_scales = quantize_reference(w, group)
    assert torch.equal(scales, want_scales) and torch.equal(codes, want_codes)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", [(96, 200), (130, 256)])
def test_correlated_inputs_lower_the_layer_output_error(group, n, k):
    w, x = weights(n, k, 1), correlated_inputs(2048, k, 2)
    h = x.double().t() @ x.double() / x.shape[0]
    codes, scales = gptq_quantize(w, h, group, GptqConfig(block=64))
    near_codes, near_scales = quantize_reference(w, group)
    assert torch.equal(scales, near_scales)  # the checkpoint format is unchanged: only rounding decisions move
    gptq, nearest = output_error(x, w, codes, scales, group), output_error(x, w, near_codes, scales, group)
    assert gptq < 0.5 * nearest, (gptq, nearest)


def test_block_size_changes_nothing_but_rounding_noise():
    w, x = weights(64, 192, 3), correlated_inputs(1024, 192, 4)
    h = x.double().t() @ x.double() / x.shape[0]
    errs = [output_error(x, w, *gptq_quantize(w, h, "channel", GptqConfig(block=b)), "channel") for b in (1, 48, 192)]
    assert max(errs) <= 1.05 * min(errs), errs


@pytest.mark.parametrize("group", GROUPS)
def test_act_order_is_plain_gptq_on_columns_sorted_by_input_energy(group):
    """act_order: the same algorithm on W, S, H permuted by decreasing H[k, k], codes put back in W's order; the
    scales (fixed first) and so each code's group stay those of W's own order."""
    n, k = 40, 256
    w = weights(n, k, 7)
    x = correlated_inputs(1024, k, 8) * torch.linspace(0.1, 3.0, k)[torch.randperm(k, generator=torch.Generator()
                                                                                 .manual_seed(9))]
    h = x.double().t() @ x.double() / x.shape[0]
    codes, scales = gptq_quantize(w, h, group, GptqConfig(block=64, act_order=True))
    assert torch.equal(scales, quantize_reference(w, group)[1])
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    if group == "channel":  # one scale per row: permuting columns keeps every code's scale, so plain GPTQ applies
        pc, ps = gptq_quantize(w[:, perm], h[perm][:, perm], group, GptqConfig(block=64, act_order=False))
        assert torch.equal(ps, scales) and torch.equal(pc[:, torch.argsort(perm)], codes)
    plain = gptq_quantize(w, h, group, GptqConfig(block=64, act_order=False))[0]
    near = quantize_reference(w, group)[0]
    err = {name: output_error(x, w, c, scales, group) for name, c in (("act", codes), ("plain", plain),
                                                                       ("nearest", near))}
    assert err["act"] < err["nearest"], err
    assert err["act"] <= 1.1 * err["plain"], err  # sorted columns: no worse than W's order on this input


def band_rows(group: str, n: int) -> list[range]:
    """The rows sharing one row of scales: one (channel), 128 (block), all (tensor)."""
    band = {"channel": 1, "block": 128, "tensor": n}[group]
    return [range(r, min(r + band, n)) for r in range(0, n, band)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", [(40, 192), (300, 160)])
def test_placements_keep_per_band_the_gptq_run_with_the_least_output_error(group, n, k):
    """placements = J: per band of rows, the codes and scales of the one GPTQ run at scales x 2^(j/J) whose output
    error ||X (W - Ŵ)ᵀ||² over the band's rows is least (float64 oracle on the inputs themselves)."""
    w, x = weights(n, k, 11), correlated_inputs(1024, k, 12) * torch.linspace(0.2, 4.0, k)
    h = x.double().t() @ x.double() / x.shape[0]
    amax = quantize_reference(w, group)[1]
    runs = [gptq_quantize(w, h, group, GptqConfig(block=64), (amax.double() * f).float())
            for f in placement_factors(4)]
    codes, scales = gptq_quantize(w, h, group, GptqConfig(block=64, placements=4))
    picked = 0
    for band, rows in enumerate(band_rows(group, n)):
        r = list(rows)
        errs = [output_error(x, w[r], c[r], s[band:band + 1], group) for c, s in runs]
        best = min(range(len(runs)), key=lambda j: (errs[j], j))
        picked += best != 0
        assert torch.equal(codes[r], runs[best][0][r]), (rows, errs)
        assert torch.equal(scales[band], runs[best][1][band])
    total = output_error(x, w, codes, scales, group)
    assert total <= output_error(x, w, *runs[0], group)  # never worse than amax's own placement
    if group == "channel":
        assert picked > 0, "every row kept amax's placement: the search did nothing"


@pytest.mark.parametrize("group", GROUPS)
def test_placements_stacked_in_one_column_loop_give_the_codes_of_one_loop_each(group, monkeypatch):
    """A batch carries its placements as stacked rows of one column loop where memory allows; split one placement
    per loop (the memory budget below one placement) the codes and scales are the same, bit for bit."""
    ws = [weights(72, 160, s) for s in (13, 14)]
    x = correlated_inputs(1024, 160, 15) * torch.linspace(0.2, 4.0, 160)
    h = x.double().t() @ x.double() / x.shape[0]
    cfg = GptqConfig(block=64, placements=4)
    assert gptq.placements_per_pass(2, 72, 160, torch.device("cpu"), 4) == 4
    stacked = gptq.gptq_quantize_many([(w, h, group, None) for w in ws], cfg)
    monkeypatch.setattr(gptq, "CPU_PASS_BYTES", 1)
    assert gptq.placements_per_pass(2, 72, 160, torch.device("cpu"), 4) == 1
    alone = gptq.gptq_quantize_many([(w, h, group, None) for w in ws], cfg)
    for (c1, s1), (c2, s2) in zip(stacked, alone):
        assert torch.equal(c1, c2) and torch.equal(s1, s2)


def test_placement_factors_span_one_binade_from_amax():
    assert placement_factors(4) == pytest.approx((1.0, 2 ** 0.25, 2 ** 0.5, 2 ** 0.75))
    assert placement_factors(1) == (1.0,) == placement_factors(0)
    with pytest.raises(ValueError, match="placements >= 1"):
        GptqConfig(placements=0)


def test_saturation_and_dead_inputs_stay_finite():
    w = weights(32, 64, 5)
    x = correlated_inputs(512, 64, 6)
    x[:, 7] = 0.0  # an input never active in the calibration
    h = x.double().t() @ x.double() / x.shape[0]
    codes, scales = gptq_quantize(w * 50, h, "channel")  # large carried errors push values to +-448
    assert not torch.isin(codes, torch.tensor([0x7F, 0xFF], dtype=torch.uint8)).any(), "a NaN code"
    assert torch.isfinite(dequantize_reference(codes, scales, "channel")).all()
    u = upper_inverse_factor(h, 0.01)
    damped = h.clone()
    damped[7, 7] = 1.0
    damped += 0.01 * damped.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    assert torch.allclose(u.t() @ u @ damped, torch.eye(64, dtype=torch.float64), atol=1e-6)
    assert torch.equal(u, u.triu())


def test_bad_shapes_and_configs_are_refused():
    with pytest.raises(ValueError, match=r"h \[K, K\]"):
        gptq_quantize(torch.zeros(4, 16), torch.eye(8))
    with pytest.raises(ValueError, match="damp"):
        GptqConfig(damp=0.0)
    with pytest.raises(ValueError, match="inputs must be one of"):
        GptqConfig(inputs="quantized")
    with pytest.raises(ValueError, match="finite square"):
        upper_inverse_factor(torch.full((3, 3), float("nan")), 0.01)


def test_input_moments_match_x_transpose_x_and_share_one_product_between_siblings():
    a, b, c = nn.Linear(12, 5), nn.Linear(12, 7), nn.Linear(5, 3)
    x = torch.randn(2, 9, 12)
    with InputMoments({"a": a, "b": b, "c": c}) as mom:
        for _ in range(2):  # two calibration batches accumulate
            ya = a(x)
            b(x)  # reads the same tensor as a
            c(ya)
    flat = x.reshape(-1, 12).double()
    assert torch.allclose(mom.hessian("a"), flat.t() @ flat / 18, atol=1e-5)
    assert torch.equal(mom.hessian("a"), mom.hessian("b")) and mom.rows == {"a": 36, "b": 36, "c": 36}
    ya2 = ya.reshape(-1, 5).double()
    assert torch.allclose(mom.hessian("c"), ya2.t() @ ya2 / 18, atol=1e-5)
    assert not a._forward_pre_hooks, "hooks left behind"
    with pytest.raises(ValueError, match="no calibration input"):
        InputMoments({"a": a}).hessian("a")


def test_input_moments_never_take_a_new_tensor_at_a_freed_address_for_the_last_one():
    """A tensor whose memory (and version count) a new input of the same shape inherits, as a caching allocator
    hands a freed block to the next tensor of its size: the new input gets its own product, not the last one's."""
    import numpy as np

    a, b = nn.Linear(4, 3), nn.Linear(4, 2)
    buf = np.arange(8, dtype=np.float32).reshape(2, 4)
    with InputMoments({"a": a, "b": b}) as mom:
        first = torch.from_numpy(buf)
        a(first)
        del first
        buf[:] = np.float32(-1.5)  # numpy writes leave torch's version counter alone
        second = torch.from_numpy(buf)  # same address, same shape, version 0
        b(second)
    assert second.data_ptr() == buf.ctypes.data
    assert torch.allclose(mom.hessian("b"), torch.full((4, 4), 2.25, dtype=torch.float64))
    x0 = torch.arange(8, dtype=torch.float64).reshape(2, 4)
    assert torch.allclose(mom.hessian("a"), x0.t() @ x0 / 2)


def test_a_gptq_variant_names_itself_and_needs_moments():
    v = Variant("channel", "w8a16", rounding="gptq")
    assert v.name == "channel-w8a16-gptq" and Variant("block", "w8a8", (0,), "top1", "gptq").name == \
        "block-w8a8-gptq-keep-top1"
    with pytest.raises(ValueError, match="rounding"):
        Variant("channel", "w8a16", rounding="stochastic")
    with pytest.raises(ValueError, match="input moments"):
        Swapped(nn.Linear(4, 4), v)



def test_many_weights_in_one_batch_give_each_ones_codes():
    """Weights of several shapes and scale groups through one call (two of one shape share a batch): each gets
    exactly the codes and scales it gets alone, and a bad shape is named."""
    from impl.fp8.gptq import gptq_quantize_many

    g = torch.Generator().manual_seed(5)
    items = []
    for n, k, group in ((80, 96, "channel"), (16, 96, "tensor"), (80, 96, "block"), (50, 200, "channel"),
                        (3, 200, "block")):
        x = torch.randn(256, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.1 * torch.randn(256, k, generator=g)
        x[:, 3] = 0.0
        items.append((0.05 * torch.randn(n, k, generator=g), x.double().t() @ x.double() / 256, group, None))
    cfg = GptqConfig(block=32)
    many = gptq_quantize_many(items, cfg)
    for (w, h, group, _), (codes, scales) in zip(items, many):
        alone = gptq_quantize(w, h, group, cfg)
        assert codes.shape == w.shape and torch.equal(codes, alone[0]) and torch.equal(scales, alone[1]), group
    with pytest.raises(ValueError, match=r"\[N, K\] and h \[K, K\]"):
        gptq_quantize_many([items[0], (items[1][0], items[3][1], "tensor", None)], cfg)


def test_a_gptq_variant_rounds_with_the_settings_it_is_given():
    """Swapped's GPTQ weights are quantize_weights_gptq's with the settings passed (the quality record keeps them),
    so settings that round differently give different codes."""
    from impl.fp8 import quality
    from impl.kvstitch.models import TinySpec, tiny_model

    model = tiny_model(TinySpec(layers=1, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=48), seed=3)
    g = torch.Generator().manual_seed(7)
    moments = quality.input_moments(model, torch.randint(0, 96, (256,), generator=g), window=64, bos=None)
    v = Variant("channel", "w8a16", rounding="gptq")
    codes = {}
    for cfg in (GptqConfig(block=8, act_order=False), GptqConfig(block=8, damp=0.5)):
        cache: dict = {}
        with Swapped(model, v, cache=cache, moments=moments, gptq=cfg):
            pass
        want = quality.quantize_weights_gptq({n: lin.weight.data for _, n, _, _, lin in quality.block_linears(model)},
                                             "channel", moments, "amax", cfg)
        got = {key[-1]: w for key, (w, _) in cache.items()}
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n].weight.view(torch.uint8), want[n].weight.view(torch.uint8)) for n in want)
        codes[cfg] = got
    a, b = codes.values()
    assert any(not torch.equal(a[n].weight.view(torch.uint8), b[n].weight.view(torch.uint8)) for n in a)
