"""Grid placements of the FP8 rounding (quality.Variant.grid): scales times f in [1, 2) keep the error's statistics
and change the codes; the quality run measures them after everything the claims read, and records the spread."""
import types

import pytest
import torch

from impl.fp8 import quality
from impl.fp8.formats import E4M3, get_group
from impl.fp8.gptq import gptq_quantize
from impl.fp8.reference import dequantize_reference, quantize_reference
from impl.kvstitch.models import TinySpec, tiny_model


def weight(n=192, k=320, seed=0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def sq_error(w: torch.Tensor, q: quality.Fp8Weight, group: str) -> float:
    back = dequantize_reference(q.weight.view(torch.uint8), q.scale, get_group(group), E4M3, torch.float64)
    return float(((back - w.double()) ** 2).sum())


def test_placements_are_evenly_spaced_in_log2_over_one_binade_and_named():
    assert quality.grid_placements(4) == pytest.approx((2 ** 0.25, 2 ** 0.5, 2 ** 0.75))
    assert quality.grid_placements(1) == () == quality.grid_placements(0)
    v = quality.Variant("block", "w8a8", rounding="gptq", grid=2 ** 0.5)
    assert v.name == "block-w8a8-gptq-grid1.4142" and quality.Variant("block", "w8a8").name == "block-w8a8"
    for bad in (0.9, 2.0, float("nan")):
        with pytest.raises(ValueError, match="grid must lie in"):
            quality.Variant("channel", "w8a16", grid=bad)
    names = [v.name for v in quality.variants_for(["all"], ("channel",), ("w8a16",), gptq_policies=("all",),
                                                  grids=quality.grid_placements(3))]
    assert names == ["channel-w8a16", "channel-w8a16-gptq", "channel-w8a16-gptq-grid1.2599",
                     "channel-w8a16-gptq-grid1.5874"]
    assert not any("grid" in v.name for v in quality.variants_for(["all"], ("channel",), grids=(1.5,)))  # no GPTQ


@pytest.mark.parametrize("group", ["tensor", "channel", "block"])
def test_a_placement_changes_the_codes_but_not_the_size_of_the_error(group):
    w = weight()
    plain = quality.quantize_weight_like_checkpoint(w, group)
    moved = quality.quantize_weight_like_checkpoint(w, group, grid=2 ** 0.5)
    want = (quantize_reference(w, get_group(group), E4M3)[1].double() * 2 ** 0.5).float()
    assert torch.equal(moved.scale.reshape(want.shape), want)
    differ = (moved.weight.view(torch.uint8) != plain.weight.view(torch.uint8)).float().mean()
    assert differ > 0.5, "another placement must round (most of) the weights to other codes"
    ratio = sq_error(w, moved, group) / sq_error(w, plain, group)
    assert 0.8 < ratio < 1.25, ratio  # the same statistics: one draw against another


def test_a_factor_two_would_only_move_the_exponent():
    """Why placements stop short of 2: scales doubled give every normal weight the same value back."""
    w, g = weight(), get_group("channel")
    c1, s1 = quantize_reference(w, g, E4M3)
    c2, s2 = quantize_reference(w, g, E4M3, scales=s1 * 2)
    b1 = dequantize_reference(c1, s1, g, E4M3, torch.float64)
    b2 = dequantize_reference(c2, s2, g, E4M3, torch.float64)
    normal = w.abs() > s1 * 2 * 2 ** -6  # normal in both encodings
    assert normal.float().mean() > 0.99 and torch.equal(b1[normal], b2[normal])


def test_gptq_rounds_with_the_placed_scales():
    w = weight(64, 96, seed=2)
    x = torch.randn(512, 96, generator=torch.Generator().manual_seed(3))
    h = (x.T @ x / 512).double()
    got = quality.quantize_weights_gptq({"a": w}, "channel", {"a": h}, grid=2 ** 0.25)["a"]
    scales = (quantize_reference(w, get_group("channel"), E4M3)[1].double() * 2 ** 0.25).float()
    codes, s = gptq_quantize(w, h, "channel", scales=scales)
    assert torch.equal(got.weight.view(torch.uint8), codes) and torch.equal(got.scale.reshape(s.shape), s)


def tiny():
    model = tiny_model(TinySpec(arch="llama", layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8,
                                intermediate=48), seed=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    return model, torch.randint(0, 96, (64,), generator=g), torch.randint(0, 96, (96,), generator=g)


def test_placements_run_last_and_give_each_recipe_its_spread():
    model, calib, ids = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    variants = quality.variants_for(["all"], ("channel",), ("w8a16",), gptq_policies=("all",),
                                    grids=quality.grid_placements(4))
    moments = quality.group_moments(model, calib, ("channel",), window=32, bos=None)
    out = quality.evaluate_variants(model, ids, calib, variants, window=32, batch=2, bos=None, moments=moments,
                                    sensitivity_group=None, log=lambda *a: None)
    assert out["complete"] and "grid_skipped" not in out
    runs = [out["variants"][n] for n in ("channel-w8a16-gptq", *(f"channel-w8a16-gptq-grid{f:.4f}"
                                                                  for f in quality.grid_placements(4)))]
    spread = out["grid_spread"]
    assert list(spread) == ["channel-w8a16-gptq"]  # round to nearest ran at one placement only
    sp = spread["channel-w8a16-gptq"]
    assert sp["placements"] == 4 and sp["grids"] == [r["grid"] for r in runs]
    assert sp["min_delta_pct"] == min(r["delta_pct"] for r in runs) <= sp["delta_pct"] == runs[0]["delta_pct"]
    assert sp["max_delta_pct"] == max(r["delta_pct"] for r in runs)
    assert len({tuple(r["window_nll"]) for r in runs}) > 1, "the placements must run other codes"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_budget_that_ends_among_the_placements_leaves_the_record_complete(monkeypatch):
    """Placements only measure a spread: when time runs out among them, the claims' variants are all there."""
    model, calib, ids = tiny()
    clock = [0.0]
    perplexity = quality.perplexity

    def timed(*a, **k):
        clock[0] += 10.0
        return perplexity(*a, **k)

    monkeypatch.setattr(quality, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(quality, "perplexity", timed)
    variants = quality.variants_for(["all"], ("channel",), ("w8a16",), gptq_policies=("all",), grids=(1.5,))
    moments = quality.group_moments(model, calib, ("channel",), window=32, bos=None)
    out = quality.evaluate_variants(model, ids, calib, variants, window=32, batch=2, bos=None, moments=moments,
                                    sensitivity_group=None, deadline=25.0, log=lambda *a: None)
    assert out["complete"] and set(out["variants"]) == {"channel-w8a16", "channel-w8a16-gptq"}
    assert out["grid_skipped"] == ["channel-w8a16-gptq-grid1.5000"] and out["grid_spread"] == {}
    short = quality.evaluate_variants(model, ids, calib, variants, window=32, batch=2, bos=None, moments=moments,
                                      sensitivity_group=None, deadline=clock[0] + 15.0, log=lambda *a: None)
    assert not short["complete"] and "grid_skipped" not in short  # a claim's variant left out: incomplete
