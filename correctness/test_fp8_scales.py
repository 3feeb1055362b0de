"""MSE-chosen FP8 weight scales against a float64 oracle of the rounding error: never worse than amax in any group,
amax kept on ties, the codes the reference quantizer's with the chosen scales; the quantizer writes and records them."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.fp8 import quantize as Q
from impl.fp8.formats import get_format, get_group
from impl.fp8.loader import load_checkpoint
from impl.fp8.quality import Variant, variants_for
from impl.fp8.reference import dequantize_reference, group_amax, group_sum, quantize_reference, scales_from_amax
from impl.fp8.scales import choose_scales
from impl.fp8.tiny import tiny_config, write_dense_checkpoint

GROUPS = ["tensor", "channel", "block"]


def oracle_error(w: torch.Tensor, s: torch.Tensor, group: str) -> torch.Tensor:
    """Σ (w - dequantize(quantize(w, s)))² per group, float64, through the reference quantizer."""
    codes, s = quantize_reference(w, group, "e4m3", scales=s)
    e = (w.double() - dequantize_reference(codes, s, group, out_dtype=torch.float64)) ** 2
    return group_sum(e, get_group(group))


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 150), k=st.integers(1, 300), group=st.sampled_from(GROUPS), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 0.02, 3.0]))
def test_mse_scales_are_never_worse_than_amax_in_any_group(n, k, group, seed, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale
    w[0, 0] = 7 * scale  # an outlier sets its groups' amax
    amax = scales_from_amax(group_amax(w, get_group(group)), get_format("e4m3"))
    assert torch.equal(choose_scales(w, group, how="amax"), amax)
    s = choose_scales(w, group, how="mse")
    assert s.shape == amax.shape and s.dtype == torch.float32
    assert ((s <= amax) & (s >= 0.5 * amax * (1 - 1e-6))).all()
    err_mse, err_amax = oracle_error(w, s, group), oracle_error(w, amax, group)
    assert (err_mse <= err_amax).all(), (err_mse - err_amax).max()


@pytest.mark.parametrize("group", GROUPS)
def test_mse_scales_lower_the_total_rounding_error_of_a_real_sized_weight(group):
    """A 576 x 576 Gaussian weight (SmolLM2's q_proj shape). Measured here: total error x0.995 (tensor), x0.947
    (channel, 65% of rows better), x0.977 (block); the bounds leave room for nothing but a broken search."""
    w = torch.randn(576, 576, generator=torch.Generator().manual_seed(0)) * 0.05
    s = choose_scales(w, group, how="mse")
    amax = choose_scales(w, group, how="amax")
    err_mse, err_amax = oracle_error(w, s, group), oracle_error(w, amax, group)
    bound = {"tensor": 0.999, "channel": 0.96, "block": 0.985}[group]
    assert (err_mse <= err_amax).all() and err_mse.sum() < bound * err_amax.sum(), (err_mse.sum(), err_amax.sum())
    if group == "channel":
        assert (err_mse < err_amax).float().mean() > 0.5


def test_ties_keep_amax_and_zero_groups_keep_scale_one():
    s = torch.tensor([[0.01], [0.5]])
    codes = torch.tensor([[0x7E, 0x38, 0x00, 0x40], [0xFE, 0x30, 0x01, 0x44]], dtype=torch.uint8)  # 448 at the top
    w = dequantize_reference(codes, s, "channel")  # exactly on the amax grid: error 0
    assert torch.equal(choose_scales(w, "channel", how="mse"), scales_from_amax(group_amax(w, get_group("channel")),
                                                                               get_format("e4m3")))
    zeros = torch.zeros(3, 5)
    assert torch.equal(choose_scales(zeros, "channel", how="mse"), torch.ones(3, 1))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="scales must be one of"):
        choose_scales(torch.ones(2, 2), "channel", how="percentile")
    with pytest.raises(ValueError, match="finite 2-D weight"):
        choose_scales(torch.tensor([[1.0, float("nan")]]), "channel", how="mse")
    with pytest.raises(ValueError, match="steps"):
        choose_scales(torch.ones(2, 2), "channel", how="mse", steps=1)
    with pytest.raises(ValueError, match="scales must be one of"):
        Variant("channel", "w8a16", scales="min")


def test_variant_names_and_the_policies_each_choice_runs():
    assert Variant("channel", "w8a16", scales="mse").name == "channel-w8a16-mse"
    assert Variant("block", "w8a8", (0, 5), "first-last", "gptq", "mse").name == "block-w8a8-gptq-mse-keep-first-last"
    vs = variants_for(["all", "top2"], ("channel",), ("w8a16",), gptq_policies=("all",), mse_policies=("all",))
    assert sorted(v.name for v in vs) == sorted(["channel-w8a16", "channel-w8a16-keep-top2", "channel-w8a16-gptq",
                                                 "channel-w8a16-mse", "channel-w8a16-gptq-mse"])


@pytest.mark.parametrize("layout", ["vllm-tensor", "ct-channel", "vllm-block"])
def test_quantizer_writes_mse_scales_and_records_them(tmp_path, layout):
    tensors = write_dense_checkpoint(tmp_path / "src", tiny_config(), seed=5)
    Q.quantize_checkpoint(tmp_path / "src", tmp_path / "q", layout, scales="mse", log=lambda *a: None)
    ck = load_checkpoint(tmp_path / "q", "cpu")
    group = ck.linears["model.layers.0.mlp.up_proj"].group
    differ = 0
    for module, w in ck.linears.items():
        src = tensors[f"{module}.weight"]
        s = choose_scales(src, group, how="mse")
        codes, _ = quantize_reference(src, group, "e4m3", scales=s)
        assert torch.equal(w.scale, s) and torch.equal(w.weight.view(torch.uint8), codes), module
        differ += int(not torch.equal(s, choose_scales(src, group, how="amax")))
    assert differ > 0, "no scale moved: the test cannot tell mse from amax"
    recipe = json.loads((tmp_path / "q" / Q.RECIPE).read_text())
    assert recipe["scales"] == "mse" and recipe["rounding"] == "nearest"
    with pytest.raises(ValueError, match="scales must be one of"):
        Q.quantize_checkpoint(tmp_path / "src", tmp_path / "bad", layout, scales="p99", log=lambda *a: None)
