"""Pruning, healing and both training stages on tiny random models: each must change what it claims to change."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle import assert_close
from impl.kvstitch.config import HealConfig, PruneConfig, StageAConfig, StageBConfig, StitchConfig
from impl.kvstitch.hybrid import generate_hybrid
from impl.kvstitch.models import TinySpec, count_params, load_model, prefill, tiny_model
from impl.kvstitch.prune import choose, heal, importance, kd_loss, prune, pruned_config, spread_plan
from impl.kvstitch.stitch import StitchBundle
from impl.kvstitch.train import (continuation_loss, eval_kv_loss, load_lora, lora_lm, save_checkpoint, stage_a,
                                 stage_b)


def fixed(batch: torch.Tensor):
    while True:
        yield batch


def ids(b, t, seed, vocab=96):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=8)
@given(arch=st.sampled_from(["llama", "gemma3"]), layers=st.integers(2, 5), groups=st.integers(1, 2),
       seed=st.integers(0, 1000))
def test_prune_keep_all_is_the_parent_and_shapes_follow_the_plan(arch, layers, groups, seed):
    spec = TinySpec(layers=layers, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=48, arch=arch)
    m = tiny_model(spec, seed, torch.float64)
    calib = [ids(2, 12, seed)]
    same, _ = prune(m, PruneConfig(), calib)
    x = ids(2, 9, seed + 1)
    assert torch.equal(same(input_ids=x).logits, m(input_ids=x).logits)
    keep = max(1, layers - 1)
    child, plan = prune(m, PruneConfig(layers=keep, mlp_keep=0.5, kv_groups=groups), calib)
    cfg = child.config
    assert cfg.num_hidden_layers == keep and cfg.intermediate_size == 24 and cfg.num_key_value_heads == groups
    assert cfg.num_attention_heads == 2 * groups and cfg.kvstitch_parent_layers == plan["blocks"]
    assert plan["blocks"][0] == 0 and plan["blocks"][-1] == layers - 1 or keep == 1
    if getattr(cfg, "layer_types", None):
        assert cfg.layer_types == [m.config.layer_types[b] for b in plan["blocks"]]
    assert count_params(child) < count_params(m)
    assert torch.isfinite(child(input_ids=x).logits).all()
    kv = prefill(child, x)[0]
    assert [tuple(k.shape) for k, _ in kv] == [(2, groups, 9, 8)] * keep


def test_depth_pruning_drops_the_least_important_block():
    m = tiny_model(TinySpec(layers=4), 0, torch.float64)
    with torch.no_grad():  # block 2 becomes an identity: its attention and MLP write nothing
        m.model.layers[2].self_attn.o_proj.weight.zero_()
        m.model.layers[2].mlp.down_proj.weight.zero_()
    imp = importance(m, [ids(2, 10, 0)])
    assert imp["block"][2] < 1e-12 < imp["block"][[0, 1, 3]].min()
    assert choose(imp, PruneConfig(layers=3), m.config)["blocks"] == [0, 1, 3]
    child, _ = prune(m, PruneConfig(layers=3), [ids(2, 10, 0)])
    x = ids(1, 7, 1)
    assert_close(child(input_ids=x).logits, m(input_ids=x).logits, rtol=1e-10, atol=1e-10)


@given(n=st.integers(1, 40), data=st.data())
def test_spread_plan_keeps_distinct_blocks_spread_over_depth_with_chosen_shapes(n, data):
    from impl.kvstitch.models import tiny_config

    k = data.draw(st.integers(1, n))
    cfg = tiny_config(TinySpec(layers=n, intermediate=48))
    plan = spread_plan(cfg, PruneConfig(layers=k, mlp_keep=0.5, kv_groups=1))
    blocks = plan["blocks"]
    assert len(blocks) == k and blocks == sorted(set(blocks)) and blocks[0] == 0 and 0 <= blocks[-1] < n
    assert blocks[-1] == n - 1 or k == 1
    assert max((b - a for a, b in zip(blocks, blocks[1:])), default=0) <= -(-(n - 1) // max(k - 1, 1))
    imp = {"block": torch.rand(n), "channel": torch.rand(n, 48), "group": torch.rand(n, 2)}
    chosen = choose(imp, PruneConfig(layers=k, mlp_keep=0.5, kv_groups=1), cfg)
    a, b = pruned_config(cfg, plan), pruned_config(cfg, chosen)
    assert (a.num_hidden_layers, a.intermediate_size, a.num_key_value_heads, a.num_attention_heads) == \
        (b.num_hidden_layers, b.intermediate_size, b.num_key_value_heads, b.num_attention_heads)


def test_pruned_model_saves_and_reloads(tmp_path):
    m = tiny_model(TinySpec(layers=3, arch="gemma3"), 0)
    child, _ = prune(m, PruneConfig(layers=2, mlp_keep=0.5, kv_groups=1), [ids(2, 10, 0)])
    child.save_pretrained(tmp_path / "c")
    back = load_model(tmp_path / "c", attn="eager")
    x = ids(2, 6, 3)
    assert torch.equal(back(input_ids=x).logits, child(input_ids=x).logits)
    assert back.config.kvstitch_parent_layers == child.config.kvstitch_parent_layers


def test_heal_reduces_the_distillation_loss():
    teacher = tiny_model(TinySpec(layers=3), 0)
    student, _ = prune(teacher, PruneConfig(layers=2, mlp_keep=0.5), [ids(2, 10, 0)])
    batch = ids(4, 16, 1)
    with torch.no_grad():
        before = kd_loss(student(input_ids=batch).logits, teacher(input_ids=batch).logits).item()
    heal(student, teacher, fixed(batch), HealConfig(steps=15, lr=3e-3, log_every=100), log=lambda s: None)
    with torch.no_grad():
        after = kd_loss(student(input_ids=batch).logits, teacher(input_ids=batch).logits).item()
    assert after < 0.7 * before, (before, after)


def test_stage_a_fits_the_decode_models_kv():
    pm = tiny_model(TinySpec(layers=3), 0)
    qm, _ = prune(pm, PruneConfig(layers=2, kv_groups=1), [ids(2, 10, 0)])
    batch = ids(4, 16, 2)
    rand = StitchBundle(pm.config, qm.config, StitchConfig(init="random"))
    lsq = StitchBundle(pm.config, qm.config)
    loss0 = eval_kv_loss(pm, qm, rand, batch, 0.1)
    hist = stage_a(pm, qm, rand, fixed(batch), StageAConfig(steps=20, lr=1e-2, log_every=100), log=lambda s: None)
    assert hist["losses"][-1] < 0.5 * loss0
    stage_a(pm, qm, lsq, fixed(batch), StageAConfig(steps=1, lr=1e-9, log_every=100), log=lambda s: None)
    assert eval_kv_loss(pm, qm, lsq, batch, 0.1) < loss0  # the least-squares start beats a random one


def test_stage_b_trains_lora_and_stitches_only(tmp_path):
    pm = tiny_model(TinySpec(layers=3), 0)
    qm, _ = prune(pm, PruneConfig(layers=2, kv_groups=1), [ids(2, 10, 0)])
    base = {k: v.clone() for k, v in qm.state_dict().items()}
    pbase = {k: v.clone() for k, v in pm.state_dict().items()}
    bundle = StitchBundle(pm.config, qm.config)
    stage_a(pm, qm, bundle, fixed(ids(4, 16, 3)), StageAConfig(steps=1, log_every=100), log=lambda s: None)
    w0 = [p.detach().clone() for p in bundle.parameters()]
    batch = ids(4, 20, 4)
    cfg = StageBConfig(steps=15, lr=3e-3, stitch_lr=3e-3, prompt_len=12, lora_r=4, log_every=100)
    lora, hist = stage_b(pm, qm, bundle, fixed(batch), cfg, log=lambda s: None)
    assert hist["losses"][-1] < hist["losses"][0] - 0.1
    assert any(not torch.equal(a, b) for a, b in zip(w0, bundle.parameters())), "stitches did not move"
    assert all(torch.equal(v, base[k]) for k, v in qm.state_dict().items()), "decode base weights changed"
    assert all(torch.equal(v, pbase[k]) for k, v in pm.state_dict().items()), "prefill weights changed"
    save_checkpoint(tmp_path, bundle, lora)
    again = load_lora(qm, tmp_path / "lora")
    b2 = StitchBundle.load(tmp_path / "stitch")
    x = ids(2, 8, 5)
    assert torch.equal(generate_hybrid(pm, lora, bundle, x, 4), generate_hybrid(pm, again, b2, x, 4))
    with torch.no_grad():
        assert_close(continuation_loss(pm, again, b2, batch, 12), continuation_loss(pm, lora, bundle, batch, 12),
                     rtol=1e-5, atol=1e-6)


def test_prefill_lora_loss_is_the_continuation_loss_and_training_lowers_it():
    """Before its first update the LoRA is the identity, so lora_lm's loss must equal the continuation loss of the
    model after its own prefill (identity stitches, decode model = prefill model): this pins the slicing."""
    pm = tiny_model(TinySpec(layers=2), 0)
    base = {k: v.clone() for k, v in pm.state_dict().items()}
    batch = ids(4, 20, 6)
    cfg = StageBConfig(steps=15, lr=3e-3, prompt_len=12, lora_r=4, log_every=100)
    lora, hist = lora_lm(pm, fixed(batch), cfg, log=lambda s: None)
    with torch.no_grad():
        want = continuation_loss(pm, pm, StitchBundle(pm.config, pm.config).init_identity(), batch, 12).item()
    assert abs(hist["losses"][0] - want) <= 1e-4 * abs(want), (hist["losses"][0], want)
    assert hist["losses"][-1] < hist["losses"][0] - 0.1
    assert all(torch.equal(v, base[k]) for k, v in pm.state_dict().items()), "the base model's weights changed"
    with pytest.raises(ValueError, match="two tokens"):
        lora_lm(pm, fixed(ids(2, 13, 1)), cfg, log=lambda s: None)


def test_stage_b_rejects_a_too_short_continuation():
    pm = tiny_model(TinySpec(layers=2), 0)
    bundle = StitchBundle(pm.config, pm.config).init_identity()
    with pytest.raises(ValueError, match="two tokens"):
        continuation_loss(pm, pm, bundle, ids(1, 5, 0), 4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_held_out_loss_of_alone_and_identity_hybrid_agree_with_float64(arch):
    """continuation_nll: one model alone equals a float64 cross-entropy of the same tokens, and the hybrid of a
    model with itself through identity stitches has that same loss (tokens 1.. of each continuation)."""
    from impl.kvstitch.data import Task
    from impl.kvstitch.evaluate import continuation_nll
    from impl.kvstitch.train import continuation_loss, own_continuation_loss

    m = tiny_model(TinySpec(layers=2, arch=arch), 3)
    g = torch.Generator().manual_seed(0)
    task = Task("news", torch.randint(0, 96, (5, 7), generator=g), ["x"] * 5, torch.randint(0, 96, (5, 4), generator=g))
    ids = torch.cat([task.prompts, task.continuations], 1)
    with torch.no_grad():
        logits = m(input_ids=ids).logits.double()[:, 7:-1]
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 8:].flatten()).item()
    alone = continuation_nll(lambda x, p: own_continuation_loss(m, x, p), task, 2, "cpu")
    bundle = StitchBundle(m.config, m.config).init_identity()
    hybrid = continuation_nll(lambda x, p: continuation_loss(m, m, bundle, x, p), task, 3, "cpu")
    assert alone == pytest.approx(want, rel=1e-5) and hybrid == pytest.approx(want, rel=1e-5)
    assert continuation_nll(lambda x, p: own_continuation_loss(m, x, p), Task("wiki", task.prompts, ["x"] * 5), 2,
                            "cpu") is None  # no reference tokens: no loss
