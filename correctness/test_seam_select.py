"""seam: the selector and its promise, the statistics behind it, the interpolation rule, serving and checkpoints
(including bad input), and training properties."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.seam import make_family, synthetic_bundle
from impl import backend
from impl.seam.measure import InterpolationRule, accuracy, calibrate_bn, interpolates, interpolation_summary
from impl.seam.select import FloorError, Promise, floor_grid, promise_interval, promised, select, summarize, sweep
from impl.seam.serve import CheckpointError, SeamServer, load_checkpoint, save_checkpoint
from impl.seam.stats import bootstrap_accuracies, mean_ci95, pack_bits, promise_bound, t975, unpack_bits, z_of
from impl.seam.train import TrainConfig, distill_loss, finetune_family, lr_at, momentum_at, sample_configs, \
    train_anchor

pytestmark = pytest.mark.one_cpu_thread  # fixtures/seam.py
DEV = "cuda" if backend.ON_GPU else "cpu"
FEW = settings(max_examples=30 if backend.ON_GPU else 5, deadline=None)
RAW = Promise(confidence=None)


# ---- statistics ------------------------------------------------------------------------------------------------

def test_t_quantiles_and_intervals_match_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy gives the reference t quantiles")
    for df in (1, 2, 3, 7, 30):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-5)
    assert t975(200) == pytest.approx(stats.t.ppf(0.975, 200), rel=0.02)
    xs = [94.07, 94.59, 94.31]
    got = mean_ci95(xs)
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))
    assert (got["lo"], got["hi"]) == (pytest.approx(lo, rel=1e-6), pytest.approx(hi, rel=1e-6))
    assert got["range"] == pytest.approx(0.52) and got["n"] == 3
    assert mean_ci95([1.0])["lo"] is None
    with pytest.raises(ValueError, match="finite"):
        mean_ci95([1.0, float("nan")])


def test_promise_bound_formula_and_coverage():
    z = z_of(0.95)
    acc, n = 0.9, 1000
    p = (acc * n + z * z / 2) / (n + z * z)
    assert promise_bound(acc, n, 0.95) == pytest.approx(acc - z * math.sqrt(p * (1 - p) / n))
    assert promise_bound(acc, n, 0.95, n_eval=1000) < promise_bound(acc, n, 0.95) < acc
    assert promise_bound(acc, 10 * n, 0.99) > promise_bound(acc, n, 0.99) > promise_bound(acc, n, 0.999)
    assert promise_bound(1.0, 50, 0.95) < 1.0 and promise_bound(0.0, 5, 0.95) == 0.0
    # coverage: the true accuracy of a model measured on n images lies above its 95 % bound in >= ~95 % of draws
    rng = np.random.default_rng(0)
    draws = rng.binomial(n, acc, 4000) / n
    covered = np.mean([promise_bound(a, n, 0.95) <= acc for a in draws])
    assert 0.93 <= covered <= 0.98
    # predictive form: a fresh set of n_eval images shows at least the bound in >= ~95 % of draws
    fresh = rng.binomial(n, acc, 4000) / n
    kept = np.mean([f >= promise_bound(a, n, 0.95, n_eval=n) for a, f in zip(draws, fresh)])
    assert 0.93 <= kept <= 0.98
    for bad in (float("nan"), 1.0, 0.3, "0.9"):
        with pytest.raises(ValueError, match="confidence"):
            z_of(bad)


@settings(max_examples=50)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_bits_roundtrip(n, seed):
    bits = np.random.default_rng(seed).random(n) < 0.7
    assert np.array_equal(unpack_bits(pack_bits(bits), n), bits)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(pack_bits(bits), n + 8)


def test_bootstrap_is_paired_and_centred():
    rng = np.random.default_rng(1)
    a = rng.random(3000) < 0.9
    c = np.stack([a, a, ~a, rng.random(3000) < 0.5])
    boot = bootstrap_accuracies(c, n_boot=600, seed=3)
    assert boot.shape == (600, 4)
    assert np.array_equal(boot[:, 0], boot[:, 1])                    # same resample for every model
    assert np.allclose(boot[:, 0] + boot[:, 2], 1.0)
    assert abs(boot[:, 0].mean() - a.mean()) < 0.003
    assert boot[:, 0].std() == pytest.approx(math.sqrt(a.mean() * (1 - a.mean()) / 3000), rel=0.15)
    assert np.array_equal(boot, bootstrap_accuracies(c, n_boot=600, seed=3))  # seeded


# ---- selector ----------------------------------------------------------------------------------------------------

@st.composite
def tables(draw):
    """Two anchors and 0-12 stitches with random FLOPs (ties likely), accuracies (NaN possible) and latencies."""
    n = draw(st.integers(0, 12))
    flops = st.integers(1, 20).map(lambda f: f * 10**8)
    acc = st.one_of(st.floats(0, 1), st.just(float("nan")), st.sampled_from([0.5, 0.9]))
    count = st.integers(1, 20000)
    rows = [{"name": name, "is_anchor": True, "flops": draw(flops), "acc_val": draw(st.floats(0, 1)),
             "n_val": draw(count), "acc_test": draw(st.floats(0, 1)), "latency_b1_ms": draw(st.floats(0.1, 10))}
            for name in ("r34", "r50")]
    rows += [{"name": f"s{i}", "is_anchor": False, "flops": draw(flops), "acc_val": draw(acc), "n_val": draw(count),
              "acc_test": draw(st.floats(0, 1)), "latency_b1_ms": draw(st.floats(0.1, 10))} for i in range(n)]
    return rows


@settings(max_examples=300 if backend.ON_GPU else 100)
@given(rows=tables(), floor=st.floats(0, 1), budget=st.one_of(st.none(), st.floats(0.1, 10)),
       conf=st.sampled_from([None, 0.9, 0.99]), rank_by=st.sampled_from(["flops", "latency_b1_ms"]))
def test_select_returns_the_cheapest_row_that_can_promise_the_floor(rows, floor, budget, conf, rank_by):
    promise = Promise(conf)
    ok = [r for r in rows if np.isfinite(r["acc_val"]) and promised(r, promise) >= floor
          and (budget is None or r["latency_b1_ms"] <= budget)]
    if not ok:
        with pytest.raises(FloorError, match="no configuration can promise"):
            select(rows, floor, promise=promise, max_latency_ms=budget, rank_by=rank_by)
        return
    got = select(rows, floor, promise=promise, max_latency_ms=budget, rank_by=rank_by)
    assert promised(got, promise) >= floor and (conf is None or promised(got, promise) <= got["acc_val"])
    assert budget is None or got["latency_b1_ms"] <= budget
    assert got[rank_by] == min(r[rank_by] for r in ok)


@pytest.mark.parametrize("floor", [float("nan"), float("inf"), -0.01, 1.01, 93, "0.9", None, True])
def test_select_refuses_a_floor_that_is_not_a_fraction(floor):
    rows = [{"name": n, "is_anchor": True, "flops": f, "acc_val": a, "n_val": 1000}
            for n, f, a in (("r34", 1, 0.1), ("r50", 2, 0.2))]
    with pytest.raises(FloorError, match=r"number in \[0, 1\]"):
        select(rows, floor)  # NaN was served as the least accurate model: every comparison with NaN is False


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), 0.0, -1.0, "3"])
def test_select_refuses_a_latency_budget_that_is_not_positive(budget):
    rows = [{"name": "r34", "is_anchor": True, "flops": 1, "acc_val": 0.9, "n_val": 100, "latency_b1_ms": 1.0}]
    with pytest.raises(FloorError, match="latency budget"):
        select(rows, 0.5, max_latency_ms=budget)


def test_select_refuses_a_floor_above_every_promise_and_says_the_best():
    rows = [{"name": "r34", "is_anchor": True, "flops": 1, "acc_val": 0.93, "n_val": 10000},
            {"name": "r50", "is_anchor": True, "flops": 2, "acc_val": 0.94, "n_val": 10000}]
    best = promise_bound(0.94, 10000, 0.99)
    assert select(rows, best)["name"] == "r50"
    with pytest.raises(FloorError, match=rf"best promise is {best:.4f} \(r50"):
        select(rows, 0.94)  # the raw validation accuracy is more than the bound can promise
    assert select(rows, 0.94, promise=RAW)["name"] == "r50"
    with pytest.raises(FloorError, match="no image count"):
        select([{"name": "x", "is_anchor": True, "flops": 1, "acc_val": 0.9}], 0.5)
    with pytest.raises(FloorError, match="finite 'latency_b1_ms'"):
        select(rows, 0.5, rank_by="latency_b1_ms")


def test_select_ties_prefer_the_higher_promise_then_the_name():
    rows = [{"name": "b", "is_anchor": True, "flops": 5, "acc_val": 0.8, "n_val": 100},
            {"name": "a", "is_anchor": True, "flops": 5, "acc_val": 0.8, "n_val": 100},
            {"name": "c", "is_anchor": False, "flops": 5, "acc_val": 0.85, "n_val": 100}]
    assert select(rows, 0.7, promise=RAW)["name"] == "c"
    assert select(rows[:2], 0.7, promise=RAW)["name"] == "a"


def table_with_bits(test_accs: dict[str, float], n: int = 2000, seed: int = 0) -> list[dict]:
    """Two anchors and three stitches with fixed val accuracies and per-image test bits at ``test_accs``."""
    rng = np.random.default_rng(seed)
    spec = [("r34", True, 1.00e9, 0.930), ("r50", True, 1.20e9, 0.945), ("s1", False, 1.05e9, 0.934),
            ("s2", False, 1.10e9, 0.939), ("s3", False, 1.15e9, 0.943)]
    rows = []
    for name, anchor, flops, val in spec:
        bits = rng.random(n) < test_accs[name]
        rows.append({"name": name, "is_anchor": anchor, "flops": flops, "acc_val": val, "n_val": 10000,
                     "acc_test": float(bits.mean()), "n_test": n, "test_correct": pack_bits(bits),
                     "latency_b1_ms": flops / 1e9})
    return rows


def test_sweep_promise_and_saving_on_a_table_where_the_promise_holds_and_one_where_it_breaks():
    good = table_with_bits({"r34": 0.935, "r50": 0.95, "s1": 0.94, "s2": 0.944, "s3": 0.948})
    promise = Promise(0.99, n_eval=2000)
    floors = floor_grid(good, 21, promise)
    assert floors[0] == pytest.approx(promised(good[0], promise)) and floors[-1] == pytest.approx(
        promised(good[1], promise)) and len(floors) == 21
    sw = sweep(good, floors, promise=promise)
    s = summarize(sw)
    assert s["served"] == 21 and s["percent_promise_kept"] == 100.0
    assert all(r["selected_cost"] <= r["baseline_cost"] for r in sw)
    assert s["floors_where_stitch_qualifies"] > 0
    qual = [r for r in sw if r["stitch_qualifies"]]
    assert s["mean_saving_percent_where_stitch_qualifies"] == pytest.approx(
        100 * np.mean([1 - r["selected_cost"] / r["baseline_cost"] for r in qual]))
    assert all(r["selected_is_stitch"] for r in qual)
    ci = promise_interval(good, sw, n_boot=300)
    assert ci["lo"] <= s["percent_promise_kept"] <= ci["hi"] + 1e-9
    # the same choices, but the stitches are far worse on the test split than on validation: the promise breaks
    bad = table_with_bits({"r34": 0.935, "r50": 0.95, "s1": 0.90, "s2": 0.90, "s3": 0.90})
    s_bad = summarize(sweep(bad, floors, promise=promise))
    assert s_bad["percent_promise_kept"] < 95.0
    assert promise_interval(bad, sweep(bad, floors, promise=promise), n_boot=300)["hi"] < 95.0


def test_sweep_by_latency_ranks_by_latency():
    rows = table_with_bits({"r34": 0.935, "r50": 0.95, "s1": 0.94, "s2": 0.944, "s3": 0.948})
    rows[2]["latency_b1_ms"] = 5.0  # s1: fewest FLOPs but slow
    floors = floor_grid(rows, 11, Promise(0.99))
    by_flops = {r["selected"] for r in sweep(rows, floors, rank_by="flops")}
    by_lat = {r["selected"] for r in sweep(rows, floors, rank_by="latency_b1_ms")}
    assert "s1" in by_flops and "s1" not in by_lat


# ---- interpolation rule ----------------------------------------------------------------------------------------------

LO, HI = {"flops": 100.0, "acc": 0.90}, {"flops": 200.0, "acc": 0.94}


@pytest.mark.parametrize("point, ok, why", [
    ({"flops": 150, "acc": 0.92}, True, "interpolates"),            # on the line
    ({"flops": 150, "acc": 0.9176}, True, "interpolates"),          # 0.24 pp below: within tol 0.25 pp
    ({"flops": 150, "acc": 0.9170}, False, "below_line"),
    ({"flops": 100, "acc": 0.90}, True, "interpolates"),            # an anchor's own point
    ({"flops": 201, "acc": 0.95}, False, "flops_outside_anchor_range"),
    ({"flops": 99, "acc": 0.95}, False, "flops_outside_anchor_range"),
    ({"flops": 120, "acc": 0.9426}, True, "interpolates"),          # above the best anchor: the rule has no cap
])
def test_interpolation_rule_cases(point, ok, why):
    assert interpolates(point, LO, HI) == (ok, why)
    assert interpolates(point, HI, LO) == (ok, why)  # anchor order does not matter


def test_interpolation_rule_capped_variant():
    capped = InterpolationRule(cap=True)
    assert interpolates({"flops": 120, "acc": 0.9426}, LO, HI, capped) == (False, "above_best_anchor")
    assert interpolates({"flops": 120, "acc": 0.9424}, LO, HI, capped) == (True, "interpolates")


@settings(max_examples=300)
@given(f=st.floats(0, 300), a=st.floats(0.8, 1.0), a_lo=st.floats(0.8, 1.0), a_hi=st.floats(0.8, 1.0),
       tol=st.sampled_from([0.0, 0.0025, 0.01]), cap=st.booleans())
def test_interpolation_rule_matches_cross_product_form(f, a, a_lo, a_hi, tol, cap):
    lo, hi = {"flops": 100.0, "acc": a_lo}, {"flops": 200.0, "acc": a_hi}
    ok, _ = interpolates({"flops": f, "acc": a}, lo, hi, InterpolationRule(tol, cap))
    # above the line (shifted down by tol) <=> the cross product of (hi - lo) and (p - lo') is >= 0
    cross = (hi["flops"] - lo["flops"]) * (a + tol - lo["acc"]) - (hi["acc"] - lo["acc"]) * (f - lo["flops"])
    want = 100 <= f <= 200 and cross >= -1e-12 and (not cap or a <= max(a_lo, a_hi) + tol)
    if abs(cross) > 1e-9:  # away from the boundary, where rounding could decide
        assert ok == want


def test_interpolation_summary_counts_variants_and_interval():
    rng = np.random.default_rng(0)
    n = 4000
    spec = [("lo", True, 100, 0.90), ("hi", True, 200, 0.94), ("s1", False, 150, 0.93), ("s2", False, 150, 0.96),
            ("s3", False, 250, 0.95), ("s4", False, 180, 0.91)]
    rows = []
    for name, anchor, flops, acc in spec:
        bits = np.zeros(n, bool)
        bits[rng.permutation(n)[: int(acc * n)]] = True
        rows.append({"name": name, "is_anchor": anchor, "flops": flops, "acc_test": float(bits.mean()),
                     "n_test": n, "test_correct": pack_bits(bits)})
    s = interpolation_summary(rows, n_boot=300)
    assert (s["stitches"], s["interpolating"], s["fraction"]) == (4, 2, 0.5)
    assert s["percent_capped"] == 25.0 and s["in_flops_range"] == 3
    assert s["reasons"] == {"interpolates": 2, "flops_outside_anchor_range": 1, "below_line": 1}
    assert s["percent_ci95"] == {"lo": 50.0, "hi": 50.0, "n_boot": 300, "seed": 0}  # every verdict far from its edge
    assert interpolation_summary(rows, bits_key=None)["percent_ci95"] is None
    # s1 moved onto the edge of the tolerance band: resampling the test images flips it, the interval widens
    bits = np.zeros(n, bool)
    bits[rng.permutation(n)[: int((0.92 - 0.0025) * n)]] = True
    rows[2].update(acc_test=float(bits.mean()), test_correct=pack_bits(bits))
    edge = interpolation_summary(rows, n_boot=300)
    assert edge["percent_ci95"]["lo"] == 25.0 and edge["percent_ci95"]["hi"] == 50.0
    assert edge["percent_conservative"] == 25.0 and not edge["per_stitch"]["s1"]["interpolates_at_lower_end"]
    assert s["percent_conservative"] == 50.0 and s["interpolating_conservative"] == 2


def test_each_stitch_is_judged_at_the_lower_end_of_its_paired_margin():
    """Two stitches 0.2 pp above the anchors' line (0.45 pp above line − tol) on 4,000 test images: one errs on the
    anchors' hard images (the paired margin is tight: it counts), one errs at random (the margin's interval reaches
    below zero: it does not), although both interpolate at the point estimate."""
    n = 4000
    difficulty = np.random.default_rng(1).permutation(n) / n  # exact fractions below any threshold
    scattered = np.zeros(n, bool)
    scattered[np.random.default_rng(2).permutation(n)[: int(0.922 * n)]] = True
    spec = [("lo", True, 100, difficulty < 0.90), ("hi", True, 200, difficulty < 0.94),
            ("paired", False, 150, difficulty < 0.922), ("scattered", False, 150, scattered)]
    rows = [{"name": name, "is_anchor": anchor, "flops": flops, "acc_test": float(bits.mean()), "n_test": n,
             "test_correct": pack_bits(bits)} for name, anchor, flops, bits in spec]
    s = interpolation_summary(rows, n_boot=1000)
    v = s["per_stitch"]
    assert s["interpolating"] == 2 and v["paired"]["acc"] == v["scattered"]["acc"] == 0.922
    assert v["paired"]["interpolates_at_lower_end"] and not v["scattered"]["interpolates_at_lower_end"]
    assert v["scattered"]["margin_pp_ci95"]["lo"] < 0 < v["paired"]["margin_pp_ci95"]["lo"]
    assert s["percent_conservative"] == 50.0 and s["percent"] == 100.0


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
                     "acc_val": accuracy(fam, cfg, data.val, data, DEV, 16, channels_last=False), "n_val": 40,
                     "latency_b1_ms": 1.0})
    return fam, data, rows


def server_of(tiny_, **kw) -> SeamServer:
    fam, data, rows = tiny_
    return SeamServer(fam, rows, data.mean, data.std, data.channels, DEV, channels_last=False, image_size=12, **kw)


@FEW
@given(q=st.floats(0, 1))
def test_selected_configuration_meets_the_floor_when_re_measured(tiny, q):
    fam, data, rows = tiny
    accs = sorted(r["acc_val"] for r in rows)
    floor = float(np.quantile(accs, q))
    cfg = server_of(tiny, promise=RAW).select(floor)
    # re-measure the chosen configuration from scratch on the split it was chosen on (same batches, as measured)
    fam.active = None
    assert accuracy(fam, cfg, data.val, data, DEV, 16, channels_last=False) >= floor
    baseline = select([r for r in rows if r["is_anchor"]], floor, promise=RAW) if floor <= max(
        r["acc_val"] for r in rows if r["is_anchor"]) else None
    chosen = next(r for r in rows if r["name"] == cfg.name)
    assert baseline is None or chosen["flops"] <= baseline["flops"]


def test_serve_matches_the_family_and_accepts_image_layouts(tiny):
    fam, data, rows = tiny
    server = server_of(tiny)
    with pytest.raises(RuntimeError, match="select"):
        server.serve(np.zeros((1, 12, 12), np.uint8))
    with pytest.raises(FloorError, match="no configuration can promise"):
        server.select(0.999)
    cfg = server.use("r50_to_r34_p06")
    images = data.test.images
    got = server.serve(images.cpu().numpy()[:, 0], batch_size=5)             # (N, H, W) uint8, numpy
    assert got.shape == (len(images),) and got.dtype == np.int64
    assert np.array_equal(server.serve(images.float() / 255.0), got)          # floats in [0, 1]
    big_endian = (images.cpu().numpy().astype(np.float32) / 255.0).astype(">f4")
    assert np.array_equal(server.serve(big_endian), got)                      # non-native byte order converted
    from impl.seam.data import preprocess
    from impl.seam.train import autocast

    with torch.no_grad(), autocast(DEV):  # the same batches and precision as serve()
        want = torch.cat([fam(preprocess(images[i: i + 5], data.mean, data.std), cfg).argmax(1).cpu()
                          for i in range(0, len(images), 5)]).numpy()
    assert np.array_equal(got, want)
    assert server.serve(np.zeros((0, 12, 12), np.uint8)).shape == (0,)


@pytest.mark.parametrize("images, err, match", [
    (np.zeros((12, 12), np.uint8), ValueError, r"\(N, H, W\)"),
    (np.zeros((1, 12, 12), np.int32), TypeError, "uint8 or floating"),
    (np.zeros((1, 12, 12), bool), TypeError, "uint8 or floating"),
    (np.zeros((2, 3, 12, 12), np.uint8), ValueError, "3 channels; this family takes 1"),
    (np.zeros((2, 1, 28, 28), np.uint8), ValueError, "28x28; this family was trained and measured on 12x12"),
    (np.full((2, 12, 12), np.nan, np.float32), ValueError, "NaN or infinite"),
    (np.full((2, 12, 12), np.inf, np.float64), ValueError, "NaN or infinite"),
    (np.full((2, 12, 12), 255.0, np.float32), ValueError, r"lie in \[0, 1\]"),
])
def test_serve_refuses_images_it_was_not_trained_on(tiny, images, err, match):
    server = server_of(tiny)
    server.use("r34")
    before = images.copy()
    with pytest.raises(err, match=match):
        server.serve(images)
    assert np.array_equal(before, images, equal_nan=images.dtype.kind == "f")  # input untouched


def save_tiny(tiny_, path):
    fam, data, rows = tiny_
    meta = {"anchors": [{"arch": a, "num_classes": 10, "in_chans": 1, "small_stem": True, "width_div": 8,
                         "zero_init_last": False, "weights": None} for a in ("resnet34", "resnet50")],
            "stitch_bn": False, "data": {"mean": data.mean, "std": data.std, "channels": 1, "image_size": 12},
            "promise": {"confidence": 0.99, "n_eval": None}, "table": rows}
    return save_checkpoint(path, fam, meta)


def test_checkpoint_roundtrip_keeps_weights_and_bn_states(tiny, tmp_path):
    fam, data, rows = tiny
    save_tiny(tiny, tmp_path)
    fam2, meta2 = load_checkpoint(tmp_path, DEV)
    assert meta2["table"] == json.loads(json.dumps(rows)) and meta2["stitches"] == [c.name for c in fam.stitch_configs]
    x = torch.randn(3, 1, 12, 12, device=DEV)
    with torch.no_grad():
        for name in ("r34", "r50_to_r34_p11", "r34_to_r50_p01"):
            fam.active = fam2.active = None
            a, b = fam(x, fam.activate(name)), fam2(x, fam2.activate(name))
            assert torch.equal(a, b) if DEV == "cpu" else torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    server = SeamServer.from_checkpoint(tmp_path, DEV)
    assert server.promise == Promise(0.99, None) and server.image_size == 12
    assert server.select(0.0).name == select(rows, 0.0)["name"]


def test_checkpoint_problems_are_named(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not a seam checkpoint folder"):
        load_checkpoint(tmp_path / "nothing")
    d = save_tiny(tiny, tmp_path / "ok")
    (d / "bn_states.safetensors").rename(d / "moved")
    with pytest.raises(CheckpointError, match="missing bn_states.safetensors"):
        load_checkpoint(d)
    d = save_tiny(tiny, tmp_path / "width")  # meta says width / 4 but the weights are width / 8
    meta = json.loads((d / "meta.json").read_text())
    for a in meta["anchors"]:
        a["width_div"] = 4
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the family in meta.json: .*size mismatch"):
        load_checkpoint(d)
    d = save_tiny(tiny, tmp_path / "json")
    (d / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(d)
    d = save_tiny(tiny, tmp_path / "table")
    meta = json.loads((d / "meta.json").read_text())
    meta["table"].append({"name": "r34_to_r50_p99"})
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="r34_to_r50_p99"):
        SeamServer.from_checkpoint(d)
    d = save_tiny(tiny, tmp_path / "trunc")
    raw = (d / "family.safetensors").read_bytes()
    (d / "family.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cannot read the safetensors"):
        load_checkpoint(d)


def test_serve_cli_refuses_bad_floors_and_checkpoints_in_one_line(tiny, tmp_path, capsys):
    from impl.seam.serve import main

    d = save_tiny(tiny, tmp_path / "ck")
    for args, match in ((["--min-acc", "nan"], "number in [0, 1]"), (["--min-acc", "1.5"], "number in [0, 1]"),
                        (["--min-acc", "-0.1"], "number in [0, 1]"),
                        (["--min-acc", "0.5", "--max-latency-ms", "nan"], "latency budget"),
                        (["--min-acc", "0.5", "--max-latency-ms", "0"], "latency budget"),
                        (["--min-acc", "0.5", "--confidence", "nan"], "confidence"),
                        (["--min-acc", "0.999"], "no configuration can promise")):
        assert main(["--ckpt", str(d), "--device", "cpu", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and "Traceback" not in err, (args, err)
    assert main(["--ckpt", str(tmp_path / "none"), "--min-acc", "0.5", "--device", "cpu"]) == 2
    assert "not a seam checkpoint" in capsys.readouterr().err


# ---- training --------------------------------------------------------------------------------------------------

def test_one_cycle_schedule_matches_torch():
    cfg = TrainConfig(lr=0.4, pct_start=0.3, div_factor=25, final_div_factor=1e4)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9)
    total = 100
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=total, pct_start=0.3,
                                                anneal_strategy="cos", div_factor=25, final_div_factor=1e4,
                                                base_momentum=0.85, max_momentum=0.95)
    for step in range(total):
        # torch's phases end at steps 29 and 99 of 100: our cycle at progress 0.3·k/29, then 0.3 + 0.7·(k−29)/70
        p = 0.3 * step / 29 if step <= 29 else 0.3 + 0.7 * (step - 29) / 70
        want_lr, want_m = opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
        assert lr_at(p, cfg) == pytest.approx(want_lr, rel=1e-6, abs=1e-9), step
        assert momentum_at(p, cfg) == pytest.approx(want_m, rel=1e-6), step
        opt.step()
        sched.step()
    assert lr_at(1.0, cfg) == pytest.approx(0.4 / 25 / 1e4) and lr_at(0.3, cfg) == pytest.approx(0.4)


def test_distill_loss_is_the_tempered_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    T = 2.0
    p_t = torch.softmax(t / T, 1)
    want = T * T * (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum(1).mean()
    assert distill_loss(s, t, T) == pytest.approx(float(want), rel=1e-5)
    assert float(distill_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_sample_configs_is_seeded_and_respects_anchor_weight():
    fam = make_family(width_div=8)
    a = sample_configs(fam, 500, seed=3)
    assert a == sample_configs(fam, 500, seed=3) and a != sample_configs(fam, 500, seed=4)
    assert {c.name for c in a} == {c.name for c in fam.configs}  # anchors included
    assert not any(c.is_anchor for c in sample_configs(fam, 300, seed=3, anchor_weight=0.0))
    with pytest.raises(ValueError, match="anchor_weight"):
        sample_configs(fam, 3, 0, anchor_weight=-1)


def test_family_step_updates_only_the_sampled_configurations_and_distils():
    fam = make_family(width_div=16, directions="fast_to_slow").to(DEV)
    data = synthetic_bundle(48, 8, 8, size=8, device=DEV)
    teacher = make_family(width_div=16, seed=5).nets["r50"].to(DEV).eval()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = {k: v.detach().clone() for k, v in fam.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, max_steps=2, seed=7, distill_alpha=0.5)
    with pytest.raises(ValueError, match="needs a teacher"):
        finetune_family(fam, data, cfg, DEV, channels_last=False)
    out = finetune_family(fam, data, cfg, DEV, channels_last=False, teacher=teacher)
    assert out["steps"] == 2 and sum(out["steps_per_config"].values()) == 2
    trained = set(out["steps_per_config"])
    for c in fam.stitch_configs:
        w = f"stitches.{c.name}.conv.weight"
        changed = not torch.equal(before[w], fam.state_dict()[w])
        assert changed == (c.name in trained), c.name
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())  # the teacher stays frozen
    anchor = train_anchor(fam.nets["r34"], data, TrainConfig(epochs=1, batch_size=16, lr=0.05, max_steps=1), DEV,
                          False)
    assert anchor["steps"] == 1
    with pytest.raises(TypeError, match="not the family"):
        train_anchor(fam, data, cfg, DEV, False)


def test_time_budget_ends_training_early():
    fam = make_family(width_div=16).to(DEV)
    data = synthetic_bundle(64, 8, 8, size=8, device=DEV)
    out = train_anchor(fam.nets["r50"], data, TrainConfig(epochs=50, batch_size=16, time_budget_s=1e-9), DEV, False)
    assert out["budget_bound"] and out["steps"] < out["planned_steps"]


def test_anchor_training_learns_a_separable_task():
    """A few SGD steps on synthetic classes separated by brightness beat chance clearly (the loop really trains)."""
    torch.manual_seed(0)
    fam = make_family(width_div=16, num_classes=2, seed=1).to(DEV)
    data = synthetic_bundle(256, 64, 64, size=8, num_classes=2, device=DEV)
    train_anchor(fam.nets["r34"], data, TrainConfig(epochs=6, batch_size=32, lr=0.05), DEV, False)
    calibrate_bn(fam, "r34", data.train, data, DEV, calib_images=256, channels_last=False)
    assert accuracy(fam, "r34", data.test, data, DEV, 64, channels_last=False) >= 0.8


def _run_on_a_fake_clock(monkeypatch, cfg: TrainConfig, seconds_of_call, seed: int = 0):
    """``train_steps`` on a tiny r34 with ``time.perf_counter`` replaced by a clock that only the forward advances
    (call k by ``seconds_of_call(k)``); returns the run's stats and the learning rate of each step of its training
    optimiser (the optimiser that stepped most: a warm-up's own optimiser steps fewer times)."""
    import time

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from impl.seam.train import train_steps

    net = make_family(width_div=16, seed=seed).nets["r34"].to(DEV)
    data = synthetic_bundle(64, 8, 8, size=8, device=DEV)  # 4 steps per epoch at batch 16
    now, calls, lrs = [0.0], [0], {}

    def forward(x, _i):
        now[0] += seconds_of_call(calls[0])
        calls[0] += 1
        return net(x)

    def record(opt, _args, _kwargs):
        lrs.setdefault(opt, []).append(opt.param_groups[0]["lr"])  # keyed by the object, kept alive: ids get reused

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    handle = register_optimizer_step_pre_hook(record)
    try:
        out = train_steps(net, forward, data, cfg, DEV, "fake clock", False)
    finally:
        handle.remove()
    return out, max(lrs.values(), key=len), net


def test_a_slow_first_step_does_not_move_the_learning_rate(monkeypatch):
    """A first step that takes 7 s of a 25 s budget (compilation, autotuning) leaves the one-cycle schedule as the
    step count makes it: every step's learning rate is ``lr_at((step + 0.5) / planned_steps)``."""
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.2, time_budget_s=25.0)
    out, lrs, _ = _run_on_a_fake_clock(monkeypatch, cfg, lambda k: 7.0 if k == 0 else 0.01)
    assert out["steps"] == out["planned_steps"] == 12 and not out["budget_bound"]
    want = [lr_at((s + 0.5) / 12, cfg) for s in range(12)]
    assert lrs == pytest.approx(want, rel=1e-12)


def test_warm_up_runs_outside_the_budget_and_leaves_the_weights_as_they_were(monkeypatch):
    """Warm-up steps (the slow first one among them) are not charged to the budget, the schedule is the same, and
    training after a warm-up ends with the same weights as training without one."""
    base = dict(epochs=3, batch_size=16, lr=0.2, time_budget_s=25.0)
    warm, lrs, net_w = _run_on_a_fake_clock(monkeypatch, TrainConfig(**base, warmup_rounds=1, warmup_timed_steps=3),
                                            lambda k: 7.0 if k == 0 else 0.01)
    cold, lrs_cold, net_c = _run_on_a_fake_clock(monkeypatch, TrainConfig(**base, warmup_rounds=0), lambda k: 0.01)
    assert warm["warmup"]["steps"] == 4 and warm["warmup"]["step_s"] == pytest.approx(0.01)
    assert warm["warmup"]["seconds"] == pytest.approx(7.03) and warm["seconds"] == pytest.approx(0.12)
    assert warm["steps"] == cold["steps"] == 12 and lrs == pytest.approx(lrs_cold, rel=1e-12)
    for (k, a), b in zip(net_w.state_dict().items(), net_c.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), k


def test_a_slow_card_plans_fewer_steps_and_still_finishes_the_schedule(monkeypatch):
    """1 s per step after warm-up and a 5 s budget: 4 planned steps (95 % of the budget) of a complete cycle."""
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.2, time_budget_s=5.0, warmup_rounds=1, warmup_timed_steps=2)
    out, lrs, _ = _run_on_a_fake_clock(monkeypatch, cfg, lambda k: 1.0)
    assert out["requested_steps"] == 12 and out["planned_steps"] == out["steps"] == 4
    assert out["planned_by_budget"] and not out["budget_bound"]
    assert lrs == pytest.approx([lr_at((s + 0.5) / 4, cfg) for s in range(4)], rel=1e-12)


def test_the_budget_is_a_hard_stop_that_never_anneals_by_time(monkeypatch):
    """Without a warm-up estimate a slow card runs into the budget: the run stops there, flagged, and the steps it
    ran kept the step schedule."""
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.2, time_budget_s=5.0, warmup_rounds=0)
    out, lrs, _ = _run_on_a_fake_clock(monkeypatch, cfg, lambda k: 1.0)
    assert out["budget_bound"] and out["steps"] == 5 and out["planned_steps"] == 12
    assert lrs == pytest.approx([lr_at((s + 0.5) / 12, cfg) for s in range(5)], rel=1e-12)
