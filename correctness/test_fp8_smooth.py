"""SmoothQuant folding (impl.fp8.smooth): the folded model computes the same function on Llama- and Gemma-style
blocks, restores bit for bit, its factors follow the formula, GPTQ's moments transform as the inputs do, and the
smoothing lowers the per-token e4m3 error of inputs with outlier channels."""
import json
import math

import pytest
import torch

from impl.fp8 import quality, smooth
from impl.fp8.formats import TOKEN
from impl.fp8.linear import quantize_activations
from impl.kvstitch.models import TinySpec, tiny_model

ARCHS = ("llama", "gemma3")


def model_of(arch: str, dtype=torch.float64):
    return tiny_model(TinySpec(arch=arch, layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=48),
                      seed=1, dtype=dtype)


def random_factors(model, sites, seed=0):
    """s = exp(N(0, 1)) per channel: far from 1, so a fold into the wrong tensor shows in the output."""
    g = torch.Generator().manual_seed(seed)
    k = {n: lin.in_features for _, n, _, _, lin in quality.block_linears(model)}
    return {s.producer: torch.exp(torch.randn(k[s.consumers[0]], generator=g)) for s in sites}


IDS = torch.tensor([[3, 17, 5, 88, 41, 9, 60, 2, 33, 71, 12, 50]])


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_name_the_norms_that_feed_each_linear(arch):
    model = model_of(arch)
    sites = smooth.find_sites(quality.decoder_blocks(model))
    assert len(sites) == 6 and {s.kind for s in sites} == {"norm" if arch == "llama" else "norm1p", "rows"}
    mlp_norm = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    assert sites[1] == smooth.Site(f"layers.0.{mlp_norm}", sites[1].kind, ("layers.0.mlp.gate_proj",
                                                                            "layers.0.mlp.up_proj"))
    assert sites[2].consumers == ("layers.0.mlp.down_proj",) and sites[2].producer == "layers.0.mlp.up_proj"
    linears = {n for _, n, _, _, _ in quality.block_linears(model)}
    assert {c for s in sites for c in s.consumers} == linears - {f"layers.{i}.self_attn.o_proj" for i in (0, 1)}


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_keeps_the_function_and_restores_bit_for_bit(arch):
    model = model_of(arch)
    blocks = quality.decoder_blocks(model)
    sites = smooth.find_sites(blocks)
    factors = random_factors(model, sites)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = model(input_ids=IDS).logits
    with smooth.smoothed(blocks, sites, factors):
        folded = model(input_ids=IDS).logits
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    # Gemma's norms compute in float32 whatever the model's dtype
    tol = 1e-9 if arch == "llama" else 1e-5
    assert (folded - base).abs().max() <= tol * base.abs().max()
    assert len(changed) == 2 * 2 + 2 * 6  # two norms and six linears per block (up_proj: columns and rows)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the consumers scaled without the producer's fold: a different function (the check above can fail)
    cols_only = {n: [op for op in ops if op[0] == "cols"] for n, ops in smooth.fold_ops(sites, factors).items()}
    params = smooth.block_parameters(blocks)
    with torch.no_grad():
        for n, ops in cols_only.items():
            if ops:
                params[n].copy_(smooth.fold(params[n], ops))
    assert (model(input_ids=IDS).logits - base).abs().max() > 1e-2 * base.abs().max()


def test_factors_follow_the_formula_and_leave_dead_channels_alone():
    site = smooth.Site("p", "norm", ("a", "b"))
    amax = {"p": torch.tensor([4.0, 0.0, 9.0, 1.0])}
    w = {"a": torch.tensor([[2.0, 2.0, -0.25, 0.0]]), "b": torch.tensor([[-0.5, 1.0, 1.0, 0.0], [0.1, 0.1, 0.1, 0.0]])}
    wmax = smooth.weight_amax([site], w)
    assert torch.equal(wmax["p"], torch.tensor([2.0, 2.0, 1.0, 0.0]))
    s = smooth.smoothing_factors([site], amax, wmax, 0.5)["p"]
    assert torch.allclose(s, torch.tensor([2.0 / math.sqrt(2.0), 1.0, 3.0, 1.0]))
    assert torch.allclose(smooth.smoothing_factors([site], amax, wmax, 1.0)["p"], torch.tensor([4.0, 1.0, 9.0, 1.0]))
    assert torch.allclose(smooth.smoothing_factors([site], amax, wmax, 0.0)["p"], torch.tensor([0.5, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="alpha"):
        smooth.smoothing_factors([site], amax, wmax, 1.5)
    with pytest.raises(ValueError, match="one length"):
        smooth.smoothing_factors([site], {"p": torch.ones(3)}, wmax, 0.5)


def test_unknown_norm_is_refused_by_name():
    with pytest.raises(ValueError, match="LayerNorm"):
        smooth.norm_kind(torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="kind"):
        smooth.Site("p", "cols", ("a",))


def test_fold_ops_apply_their_math():
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    s = torch.tensor([2.0, 4.0])
    assert torch.equal(smooth.fold(t, [("cols", s)]), torch.tensor([[2.0, 8.0], [6.0, 16.0]]))
    assert torch.equal(smooth.fold(t, [("rows", s)]), torch.tensor([[0.5, 1.0], [0.75, 1.0]]))
    assert torch.equal(smooth.fold(torch.tensor([1.0, 3.0]), [("norm1p", s)]), torch.tensor([0.0, 0.0]))
    assert torch.equal(smooth.fold(torch.tensor([1.0, 3.0]), [("norm", s)]), torch.tensor([0.5, 0.75]))
    bf = smooth.fold(t.bfloat16(), [("cols", s)])
    assert bf.dtype == torch.bfloat16 and torch.equal(bf.float(), torch.tensor([[2.0, 8.0], [6.0, 16.0]]))


def test_moments_transform_as_the_folded_models_inputs():
    model = model_of("llama")
    blocks = quality.decoder_blocks(model)
    sites = smooth.find_sites(blocks)
    factors = random_factors(model, sites, seed=3)
    calib = torch.randint(0, 96, (48,))
    dense = quality.input_moments(model, calib, window=24, bos=None)
    with smooth.smoothed(blocks, sites, factors):
        measured = quality.input_moments(model, calib, window=24, bos=None)
    got = smooth.smoothed_moments(dense, sites, factors)
    for name in dense:
        # the moments accumulate float32 products: agreement to float32's precision
        assert torch.allclose(got[name], measured[name], rtol=1e-5, atol=1e-6 * measured[name].abs().max()), name
    o = "layers.0.self_attn.o_proj"
    assert torch.equal(got[o], dense[o])
    assert not torch.allclose(got["layers.0.self_attn.q_proj"], dense["layers.0.self_attn.q_proj"])


def test_input_amax_is_the_channel_max_of_each_sites_input():
    model = model_of("llama", torch.float32)
    sites = smooth.find_sites(quality.decoder_blocks(model))
    linears = {n: lin for _, n, _, _, lin in quality.block_linears(model)}
    seen = {}
    hook = linears["layers.1.mlp.down_proj"].register_forward_pre_hook(
        lambda m, a: seen.setdefault("x", []).append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with smooth.InputAmax(linears, sites) as rec:
        model(input_ids=IDS)
        model(input_ids=IDS[:, :5] + 1)
    hook.remove()
    assert set(rec.amax) == {s.producer for s in sites}
    assert torch.equal(rec.amax["layers.1.mlp.up_proj"], torch.cat(seen["x"]).abs().amax(0))


def test_smoothing_lowers_per_token_error_of_outlier_inputs():
    """Two input channels 1e5x the rest (massive activations; their weights 1e5x smaller, so every channel carries
    signal): per-token e4m3 scales send the other channels into subnormals; after smoothing (alpha 0.5) the output
    error drops several-fold. Inverted factors make it worse (the check can fail)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g, dtype=torch.float64) * 0.01
    x[:, [5, 40]] *= 1e5
    w = torch.randn(96, 64, generator=g, dtype=torch.float64) * 0.1
    w[:, [5, 40]] /= 1e5
    y = x @ w.T
    site = smooth.Site("p", "norm", ("w",))

    def err(s):
        xq = quantize_activations((x / s).float(), TOKEN, torch.float32, reference=True).double()
        return float((xq @ (w * s).T - y).norm() / y.norm())

    s = smooth.smoothing_factors([site], {"p": x.abs().amax(0)}, smooth.weight_amax([site], {"w": w}), 0.5)["p"]
    s = s.double()
    plain, smoothed = err(torch.ones(64, dtype=torch.float64)), err(s)
    assert smoothed < plain / 3 and plain > 0.1
    assert err(1 / s) > plain


def test_quality_run_measures_smoothed_variants_and_leaves_the_model_as_it_was():
    """alpha chosen per group on the calibration tokens (the grid's least calibration perplexity, recorded), the
    smoothed variants run with it, the model's own weights back afterwards."""
    model = model_of("llama", torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(4)
    calib, ids = torch.randint(0, 96, (64,), generator=g), torch.randint(0, 96, (96,), generator=g)
    variants = quality.variants_for(["all"], ("channel",), ("w8a8",), gptq_policies=("all",),
                                    smooth_policies=("all",))
    assert [v.name for v in variants] == ["channel-w8a8", "channel-w8a8-gptq", "channel-w8a8-smooth",
                                          "channel-w8a8-gptq-smooth"]
    moments = quality.group_moments(model, calib, ("channel",), window=32, bos=None)
    out = quality.evaluate_variants(model, ids, calib, variants, window=32, batch=2, bos=None, moments=moments,
                                    sensitivity_group=None, log=lambda *a: None)
    rec = out["smooth"]
    assert out["complete"] and rec["smoothed_linears"] == 12 and rec["sites"] == {"norm": 4, "norm1p": 0, "rows": 2}
    grid = rec["calib_ppl"]["channel"]
    assert list(grid) == ["none", *(f"{a:g}" for a in quality.ALPHA_GRID)]
    alpha = rec["alpha"]["channel"]
    assert (f"{alpha:g}" if alpha is not None else "none") == min(grid, key=grid.get)
    assert set(out["activations_only"]) == {"token", "1x128"} | ({f"token-smooth{alpha:g}"} if alpha else set())
    plain, sm = out["variants"]["channel-w8a8"], out["variants"]["channel-w8a8-smooth"]
    assert sm["smooth"] and sm["smooth_alpha"] == alpha and plain["smooth_alpha"] is None
    assert (sm["window_nll"] == plain["window_nll"]) == (alpha is None)  # "none" won: the plain model's figures
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    gptq, gptq_sm = out["variants"]["channel-w8a8-gptq"], out["variants"]["channel-w8a8-gptq-smooth"]
    assert gptq["calib_ppl"] > 1 and gptq_sm["calib_ppl"] > 1 and "calib_ppl" not in plain
    from impl.fp8.experiments import layout_table

    row = layout_table("tiny", out["variants"], None)["vllm-channel"]["w8a8-recipe"]
    want = min(("channel-w8a8-gptq", "channel-w8a8-gptq-smooth"), key=lambda n: out["variants"][n]["calib_ppl"])
    assert row["via"] == want and row["abs_hi"] == out["variants"][want]["abs_hi"]
    fixed = quality.evaluate_variants(model, ids, calib, variants[2:3], window=32, batch=2, bos=None,
                                      sensitivity_group=None, smooth_alpha=0.25, log=lambda *a: None)
    assert fixed["smooth"]["alpha"] == {"channel": 0.25} and fixed["smooth"]["calib_ppl"] == {}
    assert fixed["variants"]["channel-w8a8-smooth"]["smooth_alpha"] == 0.25


def test_quantizer_folds_the_smoothing_into_the_checkpoint(tmp_path, capsys):
    """The written norms are the folded ones, every smoothed linear's codes are those of W diag(s) (o_proj's of W),
    the recipe records the smoothing; a fold into a tensor the checkpoint lacks is refused before writing, and
    the CLI refuses --smooth without a calibration text."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from impl.fp8 import quantize as Q
    from impl.fp8.formats import CHANNEL
    from impl.fp8.layouts import CheckpointError
    from impl.fp8.reference import quantize_reference
    from impl.fp8.tiny import tiny_config, write_dense_checkpoint

    src = tmp_path / "dense"
    tensors = write_dense_checkpoint(src, tiny_config(), seed=2)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    sites = smooth.find_sites(quality.decoder_blocks(model))
    sites, factors = smooth.prefixed(sites, random_factors(model, sites), "model.")
    Q.quantize_checkpoint(src, tmp_path / "q", "vllm-channel", smooth=Q.SmoothRecipe(0.5, sites, factors),
                          log=lambda *a: None)
    got = load_file(str(tmp_path / "q" / "model.safetensors"))
    ops = smooth.fold_ops(sites, factors)
    folded = 0
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):
            want = quantize_reference(smooth.fold(t, ops[name]) if name in ops else t, CHANNEL)[0]
            assert torch.equal(got[name].view(torch.uint8), want), name
        else:
            assert torch.equal(got[name], smooth.fold(t, ops[name]) if name in ops else t), name
        folded += name in ops
    assert folded == 2 * (2 + 6) and "model.layers.0.self_attn.o_proj.weight" not in ops
    recipe = json.loads((tmp_path / "q" / Q.RECIPE).read_text())
    assert recipe["rounding"] == "nearest" and recipe["smooth"]["alpha"] == 0.5
    assert recipe["smooth"]["smoothed_linears"] == 12 and len(recipe["smooth"]["sites"]) == 6

    bad = Q.SmoothRecipe(0.5, [smooth.Site("model.layers.9.input_layernorm", "norm", ())],
                      {"model.layers.9.input_layernorm": torch.ones(80)})
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.input_layernorm\.weight: the smoothing folds"):
        Q.quantize_checkpoint(src, tmp_path / "bad", "vllm-channel", smooth=bad, log=lambda *a: None)
    assert not (tmp_path / "bad").exists()
    assert Q.main([str(src), str(tmp_path / "c"), "--layout", "vllm-channel", "--smooth", "0.5"]) == 2
    assert "--smooth needs --calibration" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_the_recipe_is_chosen_on_calibration_tokens_not_on_the_evaluation_text():
    """Of the GPTQ candidates, the one with the least calibration perplexity, even where the other did better on the
    evaluation windows; a candidate without its calibration perplexity is refused; W8A16 has one candidate."""
    v = {"channel-w8a8-gptq": {"calib_ppl": 20.0, "abs_hi": 0.5},
         "channel-w8a8-gptq-smooth": {"calib_ppl": 19.5, "abs_hi": 0.9},
         "channel-w8a16-gptq": {"abs_hi": 0.4}}
    assert quality.recipe_of("channel", "w8a8", v)["via"] == "channel-w8a8-gptq-smooth"
    v["channel-w8a8-gptq-smooth"]["calib_ppl"] = 20.5
    assert quality.recipe_of("channel", "w8a8", v)["via"] == "channel-w8a8-gptq"
    assert quality.recipe_of("channel", "w8a16", v)["via"] == "channel-w8a16-gptq"
    assert quality.recipe_of("block", "w8a8", v) is None
    del v["channel-w8a8-gptq"]["calib_ppl"]
    with pytest.raises(ValueError, match="calibration perplexity"):
        quality.recipe_of("channel", "w8a8", v)
