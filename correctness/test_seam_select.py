"""seam: the selector, the interpolation rule, serving and checkpoints, training properties, the recipe's smoke run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from impl import backend
from impl.seam.measure import InterpolationRule, accuracy, calibrate_bn, interpolates, interpolation_summary
from impl.seam.select import constraint_grid, select, summarize, sweep
from impl.seam.serve import SeamServer, load_checkpoint, save_checkpoint
from impl.seam.testing import make_family, synthetic_bundle, one_cpu_thread  # noqa: F401  (autouse)
from impl.seam.train import TrainConfig, finetune_family, lr_at, sample_configs, train_anchor

DEV = "cuda" if backend.ON_GPU else "cpu"


FEW = settings(max_examples=30 if backend.ON_GPU else 5)


# ---- selector ----------------------------------------------------------------------------------------------------

@st.composite
def tables(draw):
    """Two anchors and 0-12 stitches with random FLOPs (ties likely), accuracies (NaN possible) and latencies."""
    n = draw(st.integers(0, 12))
    flops = st.integers(1, 20).map(lambda f: f * 10**8)
    acc = st.one_of(st.floats(0, 1), st.just(float("nan")), st.sampled_from([0.5, 0.9]))
    rows = [{"name": name, "is_anchor": True, "flops": draw(flops), "acc_val": draw(st.floats(0, 1)),
             "acc_test": draw(st.floats(0, 1)), "latency_b1_ms": draw(st.floats(0.1, 10))} for name in ("r34", "r50")]
    rows += [{"name": f"s{i}", "is_anchor": False, "flops": draw(flops), "acc_val": draw(acc),
              "acc_test": draw(st.floats(0, 1)), "latency_b1_ms": draw(st.floats(0.1, 10))} for i in range(n)]
    return rows


@settings(max_examples=300 if backend.ON_GPU else 100)
@given(rows=tables(), min_acc=st.floats(0, 1), budget=st.one_of(st.none(), st.floats(0.1, 10)))
def test_select_returns_the_lightest_row_meeting_the_constraint(rows, min_acc, budget):
    got = select(rows, min_acc, budget)
    feasible = [r for r in rows if r["acc_val"] >= min_acc and (budget is None or r["latency_b1_ms"] <= budget)]
    if not feasible:
        assert got is None
        return
    assert got is not None and got["acc_val"] >= min_acc  # never misses the constraint on the data it chose on
    assert budget is None or got["latency_b1_ms"] <= budget
    assert got["flops"] == min(r["flops"] for r in feasible)


@settings(max_examples=200 if backend.ON_GPU else 60)
@given(rows=tables())
def test_sweep_is_never_heavier_than_the_anchor_baseline(rows):
    rows = [r for r in rows if np.isfinite(r["acc_val"])]
    grid = constraint_grid(rows)
    best_anchor = max(r["acc_val"] for r in rows if r["is_anchor"])
    assert grid and max(grid) <= best_anchor
    sw = sweep(rows, grid)
    for r in sw:
        assert r["baseline"] is not None and r["lighter_or_equal"]
        assert r["strictly_lighter"] == r["stitch_lighter_than_baseline_exists"]
    s = summarize(sw)
    assert s["fraction_lighter_or_equal"] == 1.0
    assert s["fraction_strictly_lighter_where_stitch_between"] in (None, 1.0)


def test_constraint_grid_never_rounds_past_the_best_anchor():
    rows = [{"name": n, "is_anchor": True, "flops": 1, "acc_val": 0.1171875} for n in ("r34", "r50")]
    assert constraint_grid(rows) == [0.1171875]  # rounded to 6 digits it was 0.117188: no constraint left
    rows.append({"name": "s", "is_anchor": False, "flops": 1, "acc_val": 0.05})
    grid = constraint_grid(rows, n=5)
    assert grid[0] == 0.05 and grid[-1] == 0.1171875 and len(grid) == 5


def test_select_handles_no_feasible_row_and_ties():
    rows = [{"name": "b", "is_anchor": True, "flops": 5, "acc_val": 0.8},
            {"name": "a", "is_anchor": True, "flops": 5, "acc_val": 0.8},
            {"name": "c", "is_anchor": False, "flops": 5, "acc_val": 0.85}]
    assert select(rows, 0.9) is None
    assert select(rows, 0.7)["name"] == "c"  # same FLOPs: higher accuracy wins
    assert select(rows[:2], 0.7)["name"] == "a"  # then the name


# ---- interpolation rule ----------------------------------------------------------------------------------------------

LO, HI = {"flops": 100.0, "acc": 0.90}, {"flops": 200.0, "acc": 0.94}


@pytest.mark.parametrize("point, ok, why", [
    ({"flops": 150, "acc": 0.92}, True, "interpolates"),            # on the line
    ({"flops": 150, "acc": 0.9176}, True, "interpolates"),          # 0.24 pp below: within tol 0.25 pp
    ({"flops": 150, "acc": 0.9170}, False, "below_line"),
    ({"flops": 100, "acc": 0.90}, True, "interpolates"),            # an anchor's own point
    ({"flops": 201, "acc": 0.95}, False, "flops_outside_anchor_range"),
    ({"flops": 99, "acc": 0.95}, False, "flops_outside_anchor_range"),
    ({"flops": 120, "acc": 0.9426}, False, "above_best_anchor"),
    ({"flops": 120, "acc": 0.9424}, True, "interpolates"),
])
def test_interpolation_rule_cases(point, ok, why):
    assert interpolates(point, LO, HI) == (ok, why)
    assert interpolates(point, HI, LO) == (ok, why)  # anchor order does not matter


@settings(max_examples=300)
@given(f=st.floats(0, 300), a=st.floats(0.8, 1.0), a_lo=st.floats(0.8, 1.0), a_hi=st.floats(0.8, 1.0),
       tol=st.sampled_from([0.0, 0.0025, 0.01]))
def test_interpolation_rule_matches_cross_product_form(f, a, a_lo, a_hi, tol):
    lo, hi = {"flops": 100.0, "acc": a_lo}, {"flops": 200.0, "acc": a_hi}
    ok, _ = interpolates({"flops": f, "acc": a}, lo, hi, InterpolationRule(tol))
    # above the line (shifted down by tol) <=> the cross product of (hi - lo) and (p - lo') is >= 0
    cross = (hi["flops"] - lo["flops"]) * (a + tol - lo["acc"]) - (hi["acc"] - lo["acc"]) * (f - lo["flops"])
    want = 100 <= f <= 200 and cross >= -1e-12 and a <= max(a_lo, a_hi) + tol
    if abs(cross) > 1e-9:  # away from the boundary, where rounding could decide
        assert ok == want


def test_interpolation_summary_counts_and_variants():
    rows = [{"name": "lo", "is_anchor": True, "flops": 100, "acc_test": 0.90},
            {"name": "hi", "is_anchor": True, "flops": 200, "acc_test": 0.94},
            {"name": "s1", "is_anchor": False, "flops": 150, "acc_test": 0.93},
            {"name": "s2", "is_anchor": False, "flops": 150, "acc_test": 0.96},
            {"name": "s3", "is_anchor": False, "flops": 250, "acc_test": 0.95},
            {"name": "s4", "is_anchor": False, "flops": 180, "acc_test": 0.91}]
    s = interpolation_summary(rows)
    assert (s["stitches"], s["interpolating"], s["fraction"]) == (4, 1, 0.25)
    assert s["fraction_uncapped"] == 0.5 and s["in_flops_range"] == 3
    assert s["reasons"] == {"interpolates": 1, "above_best_anchor": 1, "flops_outside_anchor_range": 1,
                            "below_line": 1}


# ---- serving and checkpoints -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """A narrow family with per-configuration BN statistics and measured val accuracies on synthetic data."""
    fam = make_family(width_div=8).to(DEV)
    data = synthetic_bundle(96, 40, 24, size=12, device=DEV)
    rows = []
    for cfg in fam.configs:
        calibrate_bn(fam, cfg, data.train, data, DEV, calib_images=64, batch_size=64, channels_last=False)
        rows.append({"name": cfg.name, "is_anchor": cfg.is_anchor, "flops": 1 + fam.num_params(cfg),
                     "acc_val": accuracy(fam, cfg, data.val, data, DEV, 16, channels_last=False),
                     "latency_b1_ms": 1.0})
    return fam, data, rows


@FEW
@given(q=st.floats(0, 1))
def test_selected_configuration_meets_the_constraint_when_re_measured(tiny, q):
    fam, data, rows = tiny
    accs = sorted(r["acc_val"] for r in rows)
    min_acc = float(np.quantile(accs, q))
    server = SeamServer(fam, rows, data.mean, data.std, data.channels, DEV, channels_last=False)
    cfg = server.select(min_acc)
    # re-measure the chosen configuration from scratch on the split it was chosen on (same batches, as measured)
    fam.active = None
    assert accuracy(fam, cfg, data.val, data, DEV, 16, channels_last=False) >= min_acc
    baseline = select([r for r in rows if r["is_anchor"]], min_acc)
    chosen = next(r for r in rows if r["name"] == cfg.name)
    assert baseline is None or chosen["flops"] <= baseline["flops"]


def test_serve_matches_the_family_and_accepts_image_layouts(tiny):
    fam, data, rows = tiny
    server = SeamServer(fam, rows, data.mean, data.std, data.channels, DEV, channels_last=False)
    with pytest.raises(RuntimeError, match="select"):
        server.serve(np.zeros((1, 12, 12), np.uint8))
    with pytest.raises(ValueError, match="no configuration reaches"):
        server.select(1.5)
    cfg = server.use("r50_to_r34_p06")
    images = data.test.images
    got = server.serve(images.cpu().numpy()[:, 0], batch_size=5)             # (N, H, W) uint8, numpy
    assert got.shape == (len(images),) and got.dtype == np.int64
    assert np.array_equal(server.serve(images.float() / 255.0), got)          # floats in [0, 1]
    from impl.seam.data import preprocess
    from impl.seam.train import autocast

    with torch.no_grad(), autocast(DEV):  # the same batches and precision as serve()
        want = torch.cat([fam(preprocess(images[i: i + 5], data.mean, data.std), cfg).argmax(1).cpu()
                          for i in range(0, len(images), 5)]).numpy()
    assert np.array_equal(got, want)
    assert server.serve(np.zeros((0, 12, 12), np.uint8)).shape == (0,)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        server.serve(np.zeros((12, 12), np.uint8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        server.serve(np.zeros((1, 12, 12), np.int32))


def test_checkpoint_roundtrip_keeps_weights_and_bn_states(tiny, tmp_path):
    fam, data, rows = tiny
    meta = {"anchors": [{"arch": "resnet34", "num_classes": 10, "in_chans": 1, "small_stem": True, "width_div": 8,
                         "zero_init_last": False, "weights": None},
                        {"arch": "resnet50", "num_classes": 10, "in_chans": 1, "small_stem": True, "width_div": 8,
                         "zero_init_last": False, "weights": None}],
            "granularity": "block", "stitch_bn": False,
            "data": {"mean": data.mean, "std": data.std, "channels": 1, "image_size": 12}, "table": rows}
    save_checkpoint(tmp_path, fam, meta)
    fam2, meta2 = load_checkpoint(tmp_path, DEV)
    assert meta2["table"] == json.loads(json.dumps(rows))
    x = torch.randn(3, 1, 12, 12, device=DEV)
    with torch.no_grad():
        for name in ("r34", "r50_to_r34_p11", "r34_to_r50_p01"):
            fam.active = fam2.active = None
            a, b = fam(x, fam.activate(name)), fam2(x, fam2.activate(name))
            assert torch.equal(a, b) if DEV == "cpu" else torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    server = SeamServer.from_checkpoint(tmp_path, DEV)
    assert server.select(0.0).name == select(rows, 0.0)["name"]
    with pytest.raises(FileNotFoundError, match="not a seam checkpoint"):
        load_checkpoint(tmp_path / "nothing")


# ---- training --------------------------------------------------------------------------------------------------

def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(lr=0.4, warmup_frac=0.1)
    assert lr_at(0.0, cfg) == 0.0 and lr_at(0.05, cfg) == pytest.approx(0.2) and lr_at(0.1, cfg) == pytest.approx(0.4)
    assert lr_at(1.0, cfg) == pytest.approx(0.0, abs=1e-12) and lr_at(0.55, cfg) == pytest.approx(0.2)
    xs = [lr_at(p, cfg) for p in np.linspace(0.1, 1, 50)]
    assert all(a >= b for a, b in zip(xs, xs[1:]))


def test_sample_configs_is_seeded_and_respects_anchor_weight():
    fam = make_family(width_div=8)
    a = sample_configs(fam, 500, seed=3)
    assert a == sample_configs(fam, 500, seed=3) and a != sample_configs(fam, 500, seed=4)
    assert {c.name for c in a} == {c.name for c in fam.configs}  # anchors included
    assert not any(c.is_anchor for c in sample_configs(fam, 300, seed=3, anchor_weight=0.0))
    with pytest.raises(ValueError, match="anchor_weight"):
        sample_configs(fam, 3, 0, anchor_weight=-1)


def test_family_step_updates_only_the_sampled_configurations():
    fam = make_family(width_div=16).to(DEV)
    data = synthetic_bundle(48, 8, 8, size=8, device=DEV)
    before = {k: v.detach().clone() for k, v in fam.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, max_steps=2, seed=7)
    out = finetune_family(fam, data, cfg, DEV, channels_last=False)
    assert out["steps"] == 2 and sum(out["steps_per_config"].values()) == 2
    trained = set(out["steps_per_config"])
    for c in fam.stitch_configs:
        w = f"stitches.{c.name}.conv.weight"
        changed = not torch.equal(before[w], fam.state_dict()[w])
        assert changed == (c.name in trained), c.name
    anchor = train_anchor(fam, "r34", data, TrainConfig(epochs=1, batch_size=16, lr=0.05, max_steps=1), DEV, False)
    assert anchor["steps"] == 1
    with pytest.raises(ValueError, match="not an anchor"):
        train_anchor(fam, "r34_to_r50_p01", data, cfg, DEV, False)


def test_time_budget_ends_training_early():
    fam = make_family(width_div=16).to(DEV)
    data = synthetic_bundle(64, 8, 8, size=8, device=DEV)
    out = train_anchor(fam, "r50", data, TrainConfig(epochs=50, batch_size=16, time_budget_s=1e-9), DEV, False)
    assert out["budget_bound"] and out["steps"] < out["planned_steps"]


def test_anchor_training_learns_a_separable_task():
    """A few SGD steps on synthetic classes separated by brightness beat chance clearly (the loop really trains)."""
    torch.manual_seed(0)
    fam = make_family(width_div=16, num_classes=2, seed=1).to(DEV)
    data = synthetic_bundle(256, 64, 64, size=8, num_classes=2, device=DEV)
    train_anchor(fam, "r34", data, TrainConfig(epochs=6, batch_size=32, lr=0.05, warmup_frac=0.1), DEV, False)
    calibrate_bn(fam, "r34", data.train, data, DEV, calib_images=256, channels_last=False)
    assert accuracy(fam, "r34", data.test, data, DEV, 64, channels_last=False) >= 0.8
