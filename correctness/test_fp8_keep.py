"""Linears kept dense by sensitivity (quality's ``lin<k>`` policy): the k decoder linears whose quantization alone
moves the next-token distributions most on the calibration windows stay ``nn.Linear``, the checkpoint's ignore list
names exactly them, and a policy that is not one of the known forms is refused before anything runs."""
import pytest
import torch
from torch import nn

from impl.fp8 import experiments, quality
from impl.fp8.formats import TOKEN
from impl.fp8.linear import Fp8Linear
from impl.kvstitch.models import TinySpec, tiny_model

QUIET = {"log": lambda *a: None}


def tiny():
    """A 2-block random Llama (14 linears) with calibration and evaluation tokens drawn apart."""
    model = tiny_model(TinySpec(arch="llama", layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8,
                                intermediate=48), seed=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    return model, torch.randint(0, 96, (96,), generator=g), torch.randint(0, 96, (96,), generator=g)


def names(model) -> list[str]:
    return [name for _, name, _, _, _ in quality.block_linears(model)]


@pytest.mark.parametrize("bad", ["lin", "lin0", "lin-2", "lin2.5", "LIN2", "lin 2", "top", "top0", "first_last",
                                 "none", "", "lin٣"])
def test_a_policy_outside_the_known_forms_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="unknown keep policy .*lin<k>"):
        quality.Variant("channel", "w8a8", policy=bad)
    with pytest.raises(ValueError, match="unknown keep policy"):
        quality.variants_for([bad], ("channel",), ("w8a8",))


def test_the_cli_refuses_a_bad_policy_before_running(capsys):
    for flag in ("--policies", "--gptq-policies", "--smooth-policies", "--mse-policies"):
        with pytest.raises(SystemExit) as e:
            experiments.main(["--cpu", flag, "all", "lin0"])
        assert e.value.code == 2
        assert "unknown keep policy 'lin0'" in capsys.readouterr().err


def test_policies_parse_and_kept_linears_need_a_linear_policy():
    assert quality.parse_policy("all") == ("all", 0) and quality.parse_policy("first-last") == ("first-last", 2)
    assert quality.parse_policy("top4") == ("top", 4) and quality.parse_policy("lin12") == ("lin", 12)
    with pytest.raises(ValueError, match="keep_linears come from a lin<k> policy"):
        quality.Variant("channel", "w8a8", policy="top2", keep_linears=("layers.0.mlp.down_proj",))
    vs = quality.variants_for(["all", "lin8"], ("channel",), ("w8a8",), gptq_policies=("lin8",),
                              smooth_policies=("lin8",))
    assert [v.name for v in vs] == ["channel-w8a8", "channel-w8a8-keep-lin8", "channel-w8a8-gptq-keep-lin8",
                                    "channel-w8a8-smooth-keep-lin8", "channel-w8a8-gptq-smooth-keep-lin8"]


def test_resolve_keeps_the_k_first_of_the_ranking_and_the_ignore_list_names_exactly_them():
    ranking = ["layers.1.mlp.down_proj", "layers.0.self_attn.q_proj", "layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    v = quality.resolve_keep(quality.Variant("block", "w8a8", policy="lin2"), [], 2, ranking)
    assert v.keep == () and v.keep_linears == ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj")
    assert v.name == "block-w8a8-keep-lin2"
    assert quality.ignore_list(v) == ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="needs the linear sensitivity ranking"):
        quality.resolve_keep(quality.Variant("block", "w8a8", policy="lin2"), [0, 1], 2, [])
    assert quality.resolve_keep(quality.Variant("block", "w8a8", policy="top1"), [1, 0], 2, ranking).keep_linears == ()


@pytest.mark.parametrize("group,mode", [("channel", "w8a8"), ("block", "w8a8"), ("tensor", "w8a16")])
def test_linear_sensitivity_is_each_linears_own_kl_as_the_variant_runs_it(group, mode):
    """Against a direct computation: one linear replaced by its FP8 twin (weight rounded to nearest; W8A8: input
    rounded as the mode does), KL(base || that model) averaged over every position of the calibration windows."""
    model, calib, _ = tiny()
    kl = quality.linear_sensitivity(model, calib, group, mode, window=32, batch=2, bos=None, **QUIET)
    assert list(kl) == names(model) and all(v > 0 for v in kl.values())
    rows = calib.reshape(-1, 32)
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=rows).logits.double(), -1)
        for i, name, parent, attr, lin in quality.block_linears(model)[::5]:
            w = quality.quantize_weight_like_checkpoint(lin.weight.data, group)
            setattr(parent, attr, Fp8Linear(w, compute_dtype=torch.float32, mode=mode))
            try:
                lq = torch.log_softmax(model(input_ids=rows).logits.double(), -1)
            finally:
                setattr(parent, attr, lin)
            want = float((base.exp() * (base - lq)).sum(-1).mean())
            assert kl[name] == pytest.approx(want, rel=1e-3), name


def test_w8a8_sensitivity_holds_the_activation_rounding():
    """The W8A8 ranking is not the weight-only one: each linear's W8A8 KL differs from its W8A16 KL, and rounding
    the input alone (weights dense) already moves the distributions."""
    model, calib, _ = tiny()
    a8 = quality.linear_sensitivity(model, calib, "channel", "w8a8", window=32, batch=3, bos=None, **QUIET)
    a16 = quality.linear_sensitivity(model, calib, "channel", "w8a16", window=32, batch=3, bos=None, **QUIET)
    assert all(a8[n] != a16[n] for n in a8)
    base = quality.BaseDistributions(model, calib.reshape(-1, 32))
    name = names(model)[0]
    with quality.replaced(model, lambda i, n, lin: quality.RoundedInput(lin, TOKEN) if n == name else None):
        assert base.kl(model) > 0


def test_a_lin_policy_keeps_the_most_sensitive_linears_dense_ranked_on_calibration_only():
    model, calib, ids = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    variants = quality.variants_for(["all", "lin3"], ("channel",), ("w8a8",), smooth_policies=("lin3",))
    run = dict(window=32, batch=2, bos=None, sensitivity_group=None, smooth_alpha=0.5, **QUIET)
    out = quality.evaluate_variants(model, ids, calib, variants, **run)
    sens = out["linear_sensitivity"]
    assert set(sens) == {"channel-w8a8", "channel-w8a8-smooth0.5"}
    rec = sens["channel-w8a8"]
    assert rec["calib_tokens"] == calib.numel() and rec["mode"] == "w8a8" and rec["rounding"] == "nearest"
    assert rec["ranking"] == sorted(rec["kl"], key=lambda n: -rec["kl"][n]) and len(rec["ranking"]) == 14
    assert sens["channel-w8a8-smooth0.5"]["kl"] != rec["kl"], "the smoothed variant's ranking is its own"

    r = out["variants"]["channel-w8a8-keep-lin3"]
    kept = tuple(sorted(rec["ranking"][:3], key=lambda n: (int(n.split(".")[1]), n)))
    assert r["policy"] == "lin3" and tuple(r["keep_linears"]) == kept and r["keep"] == []
    assert r["paths"] == {"qdq-torch": 11} and out["variants"]["channel-w8a8"]["paths"] == {"qdq-torch": 14}
    assert r["ignore"] == ["lm_head", *(f"model.{n}" for n in kept)]
    rs = out["variants"]["channel-w8a8-smooth-keep-lin3"]
    assert tuple(rs["keep_linears"]) == tuple(sorted(sens["channel-w8a8-smooth0.5"]["ranking"][:3],
                                                     key=lambda n: (int(n.split(".")[1]), n)))

    # the ranking is the calibration windows' alone: other evaluation text keeps the same linears, and it is what
    # linear_sensitivity gives on calib -- not what it gives on the evaluation text
    other = quality.evaluate_variants(model, torch.flip(ids, [0]), calib, variants[:2], **run)
    assert other["linear_sensitivity"]["channel-w8a8"]["ranking"] == rec["ranking"]
    assert other["variants"]["channel-w8a8-keep-lin3"]["keep_linears"] == r["keep_linears"]
    direct = quality.linear_sensitivity(model, calib, "channel", "w8a8", window=32, batch=2, bos=None, **QUIET)
    assert sorted(direct, key=lambda n: -direct[n]) == rec["ranking"]
    on_eval = quality.linear_sensitivity(model, ids, "channel", "w8a8", window=32, batch=2, bos=None, **QUIET)
    assert sorted(on_eval, key=lambda n: -on_eval[n])[:3] != rec["ranking"][:3], "the test could not tell them apart"

    v = quality.resolve_keep(variants[1], [], 2, rec["ranking"])
    with quality.Swapped(model, v) as sw:
        for _, name, parent, attr, _ in quality.block_linears(model):
            layer = getattr(parent, attr)
            if name in kept:
                assert type(layer) is nn.Linear, name
            else:
                assert isinstance(layer, Fp8Linear) and layer.path == "qdq-torch", name
    assert sw.paths == {"qdq-torch": 11}
    assert all(type(getattr(p, a)) is nn.Linear for _, _, p, a, _ in quality.block_linears(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_keeping_the_top_ranked_linears_lowers_the_change_more_than_the_bottom_ranked():
    """The ranking means something: the W8A8 model with its 3 most sensitive linears dense is closer to the base
    model (KL on the calibration windows) than with its 3 least sensitive dense."""
    model, calib, _ = tiny()
    kl = quality.linear_sensitivity(model, calib, "channel", "w8a8", window=32, batch=2, bos=None, **QUIET)
    ranking = sorted(kl, key=lambda n: -kl[n])
    base = quality.BaseDistributions(model, calib.reshape(-1, 32))
    got = {}
    for tag, kept in (("top", ranking[:3]), ("bottom", ranking[-3:])):
        v = quality.Variant("channel", "w8a8", policy="lin3", keep_linears=tuple(kept))
        with quality.Swapped(model, v):
            got[tag] = base.kl(model)
    assert got["top"] < got["bottom"]


def test_layer_errors_leave_out_the_kept_linears():
    model, calib, _ = tiny()
    v = quality.Variant("channel", "w8a8", policy="lin2", keep_linears=("layers.0.mlp.down_proj",
                                                                         "layers.1.self_attn.q_proj"))
    errs = quality.layer_errors(model, calib[:32], v)
    assert set(errs) == set(names(model)) - set(v.keep_linears)


def test_block_policy_still_keeps_the_most_sensitive_block():
    """``top<k>`` beside ``lin<k>``: the block ranking is each block's own W8A16 KL (direct computation), and the
    variant keeps its top block dense (7 linears) with no kept linears."""
    model, calib, ids = tiny()
    kl = quality.block_sensitivity(model, calib, "channel", window=32, bos=None, **QUIET)
    rows = calib.reshape(-1, 32)
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=rows).logits.double(), -1)
        with quality.Swapped(model, quality.Variant("channel", "w8a16"), blocks=(1,)):
            lq = torch.log_softmax(model(input_ids=rows).logits.double(), -1)
    assert kl[1] == pytest.approx(float((base.exp() * (base - lq)).sum(-1).mean()), rel=1e-3)
    out = quality.evaluate_variants(model, ids, calib, quality.variants_for(["top1"], ("channel",), ("w8a16",)),
                                    window=32, batch=2, bos=None, **QUIET)
    r = out["variants"]["channel-w8a16-keep-top1"]
    assert r["keep"] == [max(range(2), key=lambda i: kl[i])] and r["keep_linears"] == []
    assert r["paths"] == {"dequant-torch": 7} and "linear_sensitivity" not in out
