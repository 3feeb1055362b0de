"""seam: the whole recipe in ``--smoke`` mode (tiny, CPU) on Fashion-MNIST-style IDX files and on a generated
ImageFolder, its checkpoint, and the ledger: every claim reads the recipe's records and fails on a table where it must.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from impl.common.ledger import ResultsView, clean_commit, evaluate, load_claims
from impl.common.results import RESULTS
from impl.seam.data import IDX_FILES, default_data_dir, write_idx

pytestmark = pytest.mark.one_cpu_thread  # fixtures/seam.py
GPU = "NVIDIA H200"


def data_dir_for_smoke(tmp_path):
    """Fashion-MNIST if installed, else a small synthetic IDX set with the same file names."""
    d = default_data_dir()
    if (d / IDX_FILES["train"][0]).exists():
        return d
    rng = np.random.default_rng(0)
    for split, n in (("train", 400), ("test", 100)):
        y = rng.integers(0, 10, n)
        x = (rng.integers(0, 120, (n, 28, 28)) + 12 * y[:, None, None]).astype(np.uint8)
        write_idx(x, y.astype(np.uint8), tmp_path / IDX_FILES[split][0], tmp_path / IDX_FILES[split][1])
    return tmp_path


def image_folder(root, classes=("boot", "coat", "shirt"), n_train=12, n_val=4, size=(20, 18)):
    """A small RGB ImageFolder tree (train/<class>/*.png, val/<class>/*.png) whose class sets the colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 100, (*size, 3)) + 70 * np.eye(3, dtype=int)[k % 3]
                Image.fromarray(px.astype(np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def run_smoke(tmp, data_dir, *extra):
    from impl.seam.experiments import main

    before = sorted(p for p in RESULTS.glob("*/seam/*"))
    out = tmp / "out"
    assert main(["--smoke", "--out", str(out), "--data", str(data_dir), *extra]) == 0
    assert sorted(p for p in RESULTS.glob("*/seam/*")) == before, "smoke mode must not write results/"
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seam_smoke")
    return run_smoke(tmp, data_dir_for_smoke(tmp))


def test_smoke_recipe_measures_every_configuration(smoke):
    out, res = smoke
    assert set(res) == {"anchors", "configs", "interpolation", "selector", "training"}
    assert all(d["complete"] is True for d in res.values()) and len({d["run_id"] for d in res.values()}) == 1
    rows = res["configs"]["rows"]
    plan = res["configs"]["stitch_plan"]
    assert len(rows) == 2 + len(plan["keep"]) and sum(r["is_anchor"] for r in rows) == 2 and plan["keep"]
    lo, hi = plan["flops"]["r34"], plan["flops"]["r50"]
    for r in rows:
        assert 0 <= r["acc_test"] <= 1 and 0 <= r["acc_val"] <= 1 and r["params"] > 0
        assert r["flops"] == plan["flops"][r["name"]] and lo <= r["flops"] <= hi  # counted twice, the same; inside
        assert r["latency_b1_ms"] > 0 and r["latency_b2_ms"] > 0 and r["n_test"] == 32 and r["n_val"] == 32
        assert (r["acc_lstsq_only"] is None) == r["is_anchor"] and r["front"] == "r34" or r["is_anchor"]
    interp = res["interpolation"]
    assert interp["stitches"] == len(plan["keep"]) and sum(interp["reasons"].values()) == interp["stitches"]
    assert interp["percent_ci95"]["lo"] <= interp["percent"] + 1e-9
    assert interp["percent_conservative"] <= interp["percent"] and interp["interpolating_conservative"] is not None
    sel = res["selector"]
    assert sel["summary"]["floors"] == len(sel["floors"]) >= 1 and sel["summary"]["served"] >= 1
    assert "no configuration can promise" in sel["refusal_example"]["message"]
    assert set(sel["by_latency"]) == {"latency_b1_ms", "latency_b2_ms"}
    assert sel["serve_check"]["agreement_with_live_family"] == 1.0
    per = res["anchors"]["per_arch"]
    assert set(per) == {"r34", "r50"} and all(p["test_pct"]["n"] == 3 for p in per.values())
    assert res["anchors"]["order"]["seeds"] == 3
    t = res["training"]
    assert t["recipe_total_s"] >= t["training_s"] > 0 and t["family"]["steps"] == 3
    assert t["family"]["teacher"] in ("r34", "r50")
    assert (out / "seam_acc_vs_flops.png").stat().st_size > 0 and (out / "seam_selector.png").stat().st_size > 0


def test_smoke_recipe_runs_unchanged_on_an_image_folder(tmp_path):
    out, res = run_smoke(tmp_path, image_folder(tmp_path / "folder"), "--seeds", "1")
    c = res["configs"]
    assert c["data"]["kind"] == "folder" and c["image_shape"] == [3, 12, 12]
    assert (c["data"]["train"], c["data"]["val"], c["data"]["test"]) == (4, 32, 12)
    assert all(0 <= r["acc_test"] <= 1 and r["n_test"] == 12 for r in c["rows"])
    assert res["anchors"]["order"]["seeds"] == 1 and res["training"]["complete"] is True


def test_device_self_check_logic_runs_here():
    """The check the recipe runs first on a GPU (least squares against numpy, a stitched forward against the CPU),
    run on the CPU against itself: its logic and thresholds hold."""
    from impl.seam.experiments import gpu_self_check

    got = gpu_self_check("cpu")
    assert got["ok"] and got["lstsq_rel_err"] < 1e-9 and got["forward_rel_err"] == 0.0


def test_smoke_checkpoint_serves(smoke):
    from impl.seam.select import Promise, select
    from impl.seam.serve import SeamServer, main

    out, res = smoke
    server = SeamServer.from_checkpoint(out / "checkpoint")
    rows = res["configs"]["rows"]
    cfg = server.select(0.0)
    assert cfg.name == select(rows, 0.0, promise=Promise(0.99))["name"]
    pred = server.serve(np.zeros((3, 12, 12), np.uint8))
    assert pred.shape == (3,) and ((0 <= pred) & (pred < 10)).all()
    src = json.loads((out / "checkpoint" / "meta.json").read_text())["data"]["source"]
    assert main(["--ckpt", str(out / "checkpoint"), "--min-acc", "0", "--limit", "16", "--device", "cpu",
                 "--data", src]) == 0


# ---- the ledger ------------------------------------------------------------------------------------------------

def store(root, sections, device=GPU, card="card"):
    """Write ``{name: data}`` as result records of one card, as ``write_result`` stores them."""
    for name, data in sections.items():
        path = root / card / "seam" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": device, "commit": clean_commit(), "date": "2026-12-03T00:00:00+00:00",
                                    "data": data}))
    return ResultsView(card, root)


def verdicts(view):
    return {c.id: evaluate(c, view) for c in load_claims(("seam",))}


def test_claims_read_the_recipe_results(smoke, tmp_path):
    from impl.seam.claims import CLAIMS
    from impl.seam.plots import PLOTS, TABLES

    out, res = smoke
    assert {c.id for c in CLAIMS} == {"seam.anchor_order_margin_pp", "seam.interpolation_fraction",
                                      "seam.selector_promise_kept", "seam.selector_flops_saving"}
    empty = ResultsView("nothing-here", tmp_path)
    assert all(plot(empty, tmp_path) == [] for plot in PLOTS) and all(t(empty) == [] for t in TABLES)
    res["selector"]["summary"]["mean_saving_percent_where_stitch_qualifies"] = 3.0  # the smoke has no such floor
    on_cpu = verdicts(store(tmp_path, res, device="cpu", card="cpu-card"))
    for cid, row in on_cpu.items():
        assert row["measured_value"] is not None, (cid, row["reason"])
        assert row["verdict"] == "not measured" and "CPU" in row["reason"]  # a CPU number never passes a GPU claim
    view = store(tmp_path, res)
    on_gpu = verdicts(view)
    assert on_gpu["seam.interpolation_fraction"]["measured_value"] == pytest.approx(
        res["interpolation"]["percent_conservative"])
    assert all(r["verdict"] in ("pass", "fail") for r in on_gpu.values()), on_gpu
    pngs = [p for plot in PLOTS for p in plot(view, tmp_path)]
    assert len(pngs) == 2 and all(p.stat().st_size > 0 for p in pngs)
    lines = [line for t in TABLES for line in t(view)]
    assert any("| r34 | 3 |" in line for line in lines) and any("Whole recipe" in line for line in lines)
    assert any("can save more than" in line for line in lines)


def anchors_table(r34, r50):
    from impl.seam.experiments import anchor_summary

    runs = {n: [{"acc_test": a / 100, "acc_val": a / 100, "seed": s, "seconds": 1.0, "steps": 1}
                for s, a in enumerate(accs)] for n, accs in (("r34", r34), ("r50", r50))}
    return anchor_summary(runs, {"r34": 1.87e9, "r50": 2.09e9})


def test_an_exact_tie_of_gap_and_spread_is_a_zero_margin_and_fails():
    """The H200's anchors: r50 94.47% and r34 94.20% over three seeds, gap 0.27 pp = r34's seed range 0.27 pp. The
    margin must read 0 (not the float residue of the subtraction) and the claim, which asks for more, must fail."""
    order = anchors_table([94.27, 94.03, 94.30], [94.47, 94.42, 94.52])["order"]
    assert order["gap_pp"] == order["spread_pp"] == 0.27 and order["margin_pp"] == 0.0
    assert str(order["margin_pp"]) == "0.0"
    from impl.common import ledger

    claim = next(c for c in ledger.load_claims(("seam",)) if c.id == "seam.anchor_order_margin_pp")
    assert not ledger._OPS[claim.comparison](order["margin_pp"], claim.target)


def config_rows(accs: dict[str, float], n: int = 4000, seed: int = 0):
    """Anchors r34/r50 and stitches s<k> at FLOPs between them with test accuracy ``accs[name]``; every model gets
    right the images below its accuracy on one shared difficulty scale (models of one family err together)."""
    from impl.seam.stats import pack_bits

    difficulty = np.random.default_rng(seed).random(n)
    flops = {"r34": 1.872e9, "r50": 2.094e9, **{f"s{k}": 1.88e9 + 0.015e9 * k for k in range(12)}}
    rows = []
    for name, acc in accs.items():
        bits = difficulty < acc
        rows.append({"name": name, "is_anchor": name in ("r34", "r50"), "flops": flops[name],
                     "acc_val": acc, "n_val": 10000, "acc_test": float(bits.mean()), "n_test": n,
                     "test_correct": pack_bits(bits), "latency_b1_ms": 1.0 + flops[name] / 1e10})
    return rows


def recipe_records(anchors, rows):
    """The records the recipe writes, from its own summary functions, as one complete run."""
    from impl.seam.experiments import Recipe, selector_study
    from impl.seam.measure import interpolation_summary

    r = Recipe(n_boot=300)
    sections = {"anchors": anchors, "configs": {"rows": rows},
                "interpolation": interpolation_summary(rows, n_boot=300),
                "selector": selector_study(rows, r, rows[0]["n_test"], ["latency_b1_ms"])}
    return {k: {**v, "complete": True, "run_id": "one-run"} for k, v in sections.items()}


def line(t):  # accuracy of the anchors' line at stitch k
    return 0.943 + (0.949 - 0.943) * (1.88e9 + 0.015e9 * t - 1.872e9) / (2.094e9 - 1.872e9)


GOOD = {"r34": 0.943, "r50": 0.949, **{f"s{k}": line(k) + 0.004 for k in range(12)}}


def test_every_claim_passes_on_a_good_table_and_fails_on_a_bad_one(tmp_path):
    good = verdicts(store(tmp_path / "good", recipe_records(anchors_table([94.2, 94.3, 94.25], [94.9, 95.0, 94.95]),
                                                             config_rows(GOOD))))
    assert good["seam.anchor_order_margin_pp"]["verdict"] == "pass"
    assert good["seam.interpolation_fraction"]["verdict"] == "pass"
    assert good["seam.selector_promise_kept"]["verdict"] == "pass"
    # the saving cannot reach 10 % with anchors 11.8 % apart in FLOPs: it fails even on the good table
    assert good["seam.selector_flops_saving"]["verdict"] == "fail"
    assert 0 < good["seam.selector_flops_saving"]["measured_value"] < 100 * (1 - 1.872 / 2.094)

    # the seeds overlap; 2 of 12 stitches fall 0.5 pp below the tolerance band; the stitches do 1.5 pp worse on test
    # than on validation, so the promises made from validation break
    bad = dict(GOOD, s3=line(3) - 0.0075, s7=line(7) - 0.0075)
    rows = config_rows(bad)
    worse = config_rows({k: (v - 0.015 if k.startswith("s") else v) for k, v in bad.items()})
    for r, w in zip(rows, worse):
        if not r["is_anchor"]:
            r.update(acc_test=w["acc_test"], test_correct=w["test_correct"])
    bad_v = verdicts(store(tmp_path / "bad", recipe_records(anchors_table([94.2, 94.9, 94.5], [94.6, 95.0, 94.8]),
                                                            rows)))
    for cid, row in bad_v.items():
        assert row["verdict"] == "fail", (cid, row)


def test_a_selector_without_a_qualifying_stitch_saves_nothing(tmp_path):
    """No floor where a stitch qualifies: the saving claim fails at 0 % (measured), it is not left unmeasured."""
    recs = recipe_records(anchors_table([94.2, 94.3, 94.25], [94.9, 95.0, 94.95]), config_rows(GOOD))
    recs["selector"]["summary"].update(floors_where_stitch_qualifies=0, mean_saving_percent_where_stitch_qualifies=None)
    row = verdicts(store(tmp_path / "none", recs))["seam.selector_flops_saving"]
    assert (row["verdict"], row["measured_value"]) == ("fail", 0.0), row
    recs["selector"]["summary"]["floors_where_stitch_qualifies"] = 3  # a null mean over 3 floors is a broken record
    row = verdicts(store(tmp_path / "broken", recs))["seam.selector_flops_saving"]
    assert row["verdict"] == "not measured" and "is null" in row["reason"], row


def test_claims_need_a_finished_run_of_three_seeds(tmp_path):
    recs = recipe_records(anchors_table([94.2, 94.3], [94.9, 95.0]), config_rows(GOOD))
    v = verdicts(store(tmp_path / "two", recs))
    assert v["seam.anchor_order_margin_pp"]["verdict"] == "not measured"
    assert "2 seed(s); the claim needs at least 3" in v["seam.anchor_order_margin_pp"]["reason"]
    recs["interpolation"]["complete"] = False
    recs["selector"]["run_id"] = "another-run"
    v = verdicts(store(tmp_path / "mixed", recs))
    assert "not from a finished run" in v["seam.interpolation_fraction"]["reason"]
    assert "different runs" in v["seam.selector_promise_kept"]["reason"]


def test_failing_cases_fail():
    """Each claim's FAILING_CASES entry, stored as one clean complete GPU run, evaluates to fail."""
    import tempfile
    from pathlib import Path

    from impl.seam.claims import CLAIMS, FAILING_CASES

    assert set(FAILING_CASES) == {c.id for c in CLAIMS}
    for claim in CLAIMS:
        case = FAILING_CASES[claim.id]
        assert not case.benches
        with tempfile.TemporaryDirectory() as tmp:
            view = store(Path(tmp), {k.split("/", 1)[1]: v for k, v in case.results.items()})
            row = evaluate(claim, view)
        assert row["verdict"] == "fail", (claim.id, row)


def test_claim_statements_name_no_card():
    import re

    for c in load_claims(("seam",)):
        assert not re.search(r"\b(H100|H200|A100|L40S?|RTX|V100)\b", c.statement), c.id


# ---- the collapse guard: a diverged family fails loudly and writes nothing complete ------------------------------


def test_nonfinite_loss_stops_training():
    """One NaN weight makes every loss NaN: training raises instead of returning garbage weights."""
    from fixtures.seam import make_family, synthetic_bundle
    from impl.seam.train import CollapseError, TrainConfig, finetune_family

    fam = make_family(width_div=16)
    data = synthetic_bundle(48, 8, 8, size=8)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, max_steps=2, seed=7)
    assert finetune_family(fam, data, cfg, "cpu", channels_last=False)["steps"] == 2  # finite: trains
    with torch.no_grad():
        fam.nets["r34"].fc.weight[0, 0] = float("nan")
        fam.nets["r50"].fc.weight[0, 0] = float("nan")
    with pytest.raises(CollapseError, match="non-finite"):
        finetune_family(fam, data, cfg, "cpu", channels_last=False)


def test_anchor_accuracy_guard():
    from impl.seam.experiments import check_anchors_survived
    from impl.seam.train import CollapseError

    rows = [{"name": "r34", "is_anchor": True, "acc_val": 0.1052}, {"name": "r50", "is_anchor": True, "acc_val": 0.85},
            {"name": "r34_to_r50_p01", "is_anchor": False, "acc_val": 0.1}]
    with pytest.raises(CollapseError, match="r34 0.9280 -> 0.1052"):
        check_anchors_survived({"r34": 0.928, "r50": 0.9106}, rows, 10)
    check_anchors_survived({"r34": 0.12, "r50": 0.9106}, rows, 10)  # never trained above chance: nothing collapsed
    rows[0]["acc_val"] = 0.9
    check_anchors_survived({"r34": 0.928, "r50": 0.9106}, rows, 10)


def test_recipe_writes_nothing_complete_from_a_diverged_family(tmp_path, monkeypatch):
    """The whole recipe with results writing on: a NaN in the family makes it raise; only the anchors' record, marked
    incomplete, was written before."""
    import impl.common.results
    import impl.seam.experiments as ex
    from impl.seam.train import CollapseError

    written = []
    monkeypatch.setattr(impl.common.results, "write_result",
                        lambda system, name, data, **k: written.append((name, data["complete"])) or tmp_path / "x")
    monkeypatch.setattr(impl.common.results, "gpu_slug", lambda: "card")
    monkeypatch.setattr(ex.shutil, "copyfile", lambda *a: None)
    real_init = ex.init_stitches

    def init_then_poison(family, *a, **k):
        out = real_init(family, *a, **k)
        with torch.no_grad():
            for net in family.nets.values():  # both stem convs: every configuration's output is NaN
                next(net.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(ex, "init_stitches", init_then_poison)
    recipe = ex.preset("smoke")
    recipe.anchor_train.epochs, recipe.seeds = 0, (0,)  # no anchor training: the guard is what is tested
    with pytest.raises(CollapseError, match="family: training loss became non-finite"):
        ex.run(recipe, str(data_dir_for_smoke(tmp_path)), tmp_path / "out", True, {})
    assert written and all(name == "anchors" and not complete for name, complete in written)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved) == {"anchors"} and saved["anchors"]["complete"] is False


def test_grad_clip_bounds_the_step():
    """With ``grad_clip`` one Nesterov step moves all parameters together by at most lr·(1 + momentum)·clip."""
    from fixtures.seam import make_family, synthetic_bundle
    from impl.seam.train import TrainConfig, finetune_family, lr_at, momentum_at

    fam = make_family(width_div=16)
    data = synthetic_bundle(48, 8, 8, size=8)
    before = [p.detach().clone() for p in fam.parameters()]
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, weight_decay=0.0, max_steps=1, grad_clip=1e-3)
    out = finetune_family(fam, data, cfg, "cpu", channels_last=False)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(fam.parameters(), before)))
    assert out["grad_norm_curve"][0][1] > 10 * cfg.grad_clip  # the clip bound
    lr, m = lr_at(0.5, cfg), momentum_at(0.5, cfg)  # the only step runs at progress 0.5
    assert 0 < float(moved) <= lr * (1 + m) * cfg.grad_clip * (1 + 1e-4)


def test_the_family_takes_each_networks_best_validation_seed(monkeypatch, tmp_path):
    """Per network the seed with the highest validation accuracy (ties: the earlier seed) is kept for the family and
    named in the anchors record; test accuracy plays no part."""
    import impl.seam.experiments as ex
    from impl.seam.models import AnchorConfig

    assert ex.best_val_index([0.91, 0.95, 0.95, 0.93]) == 1 and ex.best_val_index([0.5]) == 0
    with pytest.raises(ValueError, match="no runs"):
        ex.best_val_index([])
    val = {("r34", 0): 0.90, ("r34", 1): 0.93, ("r34", 2): 0.92, ("r50", 0): 0.91, ("r50", 1): 0.91, ("r50", 2): 0.95}
    test = {("r34", 0): 0.99, ("r34", 1): 0.80, ("r34", 2): 0.80, ("r50", 0): 0.99, ("r50", 1): 0.80, ("r50", 2): 0.8}
    built = []

    def build(cfg):
        net = torch.nn.Linear(1, 1)
        net.tag = (cfg.name, len(built) // 2)  # built in order: seed 0 r34, seed 0 r50, seed 1 r34, ...
        built.append(net)
        return net

    def correct(net, split, *_args):
        acc = (val if split == "val" else test)[net.tag]
        return np.arange(100) < round(100 * acc)

    monkeypatch.setattr(ex, "build_anchor", build)
    monkeypatch.setattr(ex, "train_anchor", lambda *a, **k: {"seconds": 0.0, "steps": 0})
    monkeypatch.setattr(ex, "correctness", correct)
    data = type("D", (), {"val": "val", "test": "test"})()
    anchors = [AnchorConfig(arch="resnet34"), AnchorConfig(arch="resnet50")]
    kept, rec = ex.train_anchor_seeds(ex.Recipe(seeds=(0, 1, 2)), data, anchors, "cpu", False,
                                      ex.Recorder(tmp_path, write=False), {"r34": 1.87e9, "r50": 2.09e9})
    assert kept["r34"].tag == ("r34", 1) and kept["r50"].tag == ("r50", 2)
    assert rec["per_arch"]["r34"]["family_seed"] == 1 and rec["per_arch"]["r50"]["family_seed"] == 2


def test_rescore_recomputes_interpolation_from_stored_configs(tmp_path, monkeypatch):
    """A stored run's interpolation record is recomputed from its configs and names the commit that did it."""
    import impl.common.results as results
    from impl.seam.experiments import rescore

    recs = recipe_records(anchors_table([94.2, 94.3, 94.25], [94.9, 95.0, 94.95]), config_rows(GOOD))
    stale = {k: v for k, v in recs["interpolation"].items() if k not in ("percent_conservative", "per_stitch")}
    store(tmp_path, {"configs": recs["configs"], "interpolation": stale})
    monkeypatch.setattr(results, "git_commit", lambda short=True: "0123abcd")
    rec = json.loads(rescore("card", tmp_path).read_text())
    assert rec["data"]["percent_conservative"] == 100.0 and rec["data"]["run_id"] == "one-run"
    assert rec["rescored"]["commit"] == "0123abcd" and rec["rescored"]["of_commit"] == rec["commit"]
    monkeypatch.setattr(results, "git_commit", lambda short=True: "0123abcd+dirty")
    with pytest.raises(SystemExit, match="committed code"):
        rescore("card", tmp_path)


@pytest.mark.parametrize("zero", [True, False])
def test_recipe_anchors_start_with_each_residual_branch_switched_off(zero):
    """With ``zero_init_last`` the last BatchNorm of every residual branch starts at 0, so each block computes
    act(shortcut(x)); without it, torchvision's unit init."""
    from types import SimpleNamespace

    from impl.seam import experiments as ex
    from impl.seam.models import build_anchor

    recipe = ex.preset("full")
    recipe.anchor_starts = {a: ex.AnchorStart(zero_init_last=zero) for a in recipe.archs}
    recipe.width_div = 8
    data = SimpleNamespace(image_size=28, num_classes=10, channels=1)
    for cfg in ex.anchor_configs(recipe, data, {}):
        net = build_anchor(cfg)
        blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
        last = [b.bn3 if hasattr(b, "bn3") else b.bn2 for b in blocks]
        assert len(last) == 16
        assert all(bool((bn.weight == 0).all()) == zero for bn in last), cfg.arch
        assert all(bool((bn.weight == 1).all()) != zero for bn in last), cfg.arch


def test_ablation_variants_parse_and_refuse_bad_keys():
    from impl.seam.ablate import apply_variant, parse_variant
    from types import SimpleNamespace

    from impl.seam.experiments import ANCHOR_STARTS, anchor_configs, anchor_train_config, preset

    v = parse_variant("unit:zero_init_last=false,grad_clip=none,weight_decay=5e-5,batch_size=256")
    assert v.zero_init_last is False and dict(v.train) == {"grad_clip": None, "weight_decay": 5e-5, "batch_size": 256}
    base = preset("full")
    r = apply_variant(base, v)
    assert (r.anchor_train.weight_decay, r.anchor_train.batch_size) == (5e-5, 256)
    assert all((s.zero_init_last, s.grad_clip) == (False, None) for s in r.anchor_starts.values())
    for arch in base.archs:  # every run of the variant trains unclipped; the base recipe keeps each arch's own start
        assert anchor_train_config(r, arch, 0).grad_clip is None
        assert anchor_train_config(base, arch, 0).grad_clip == base.anchor_starts[arch].grad_clip
    assert base.anchor_train.weight_decay == 5e-4 and base.anchor_starts == ANCHOR_STARTS
    data = SimpleNamespace(image_size=28, num_classes=10, channels=1)
    assert [c.zero_init_last for c in anchor_configs(base, data, {})] == [True, False]  # r34 zero-init, r50 unit
    assert [c.zero_init_last for c in anchor_configs(r, data, {})] == [False, False]
    clipped = apply_variant(base, parse_variant("c:grad_clip=1"))
    assert {a: s.grad_clip for a, s in clipped.anchor_starts.items()} == {"resnet34": 1.0, "resnet50": 1.0}
    assert [s.zero_init_last for s in clipped.anchor_starts.values()] == [True, False]  # untouched
    assert parse_variant("base") == parse_variant("base:")
    for bad, words in (("x:momentum=0.9", "unknown key 'momentum'"), ("x:lr", "not key=value"),
                       ("x:lr=fast", "not a number"), (":lr=1", "no name"), ("x:zero_init_last=2", "true or false")):
        with pytest.raises(ValueError, match=words):
            parse_variant(bad)


def test_ablation_smoke_trains_each_variant_and_writes_only_under_out(tmp_path):
    from impl.seam.ablate import main

    before = sorted(p for p in RESULTS.glob("*/seam/*"))
    out = tmp_path / "out"
    assert main(["--smoke", "--data", str(data_dir_for_smoke(tmp_path)), "--out", str(out),
                 "--variant", "base", "--variant", "lr:lr=0.01", "--archs", "resnet50"]) == 0
    assert sorted(p for p in RESULTS.glob("*/seam/*")) == before
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [(r["variant"], r["arch"], r["seed"]) for r in rows] == [("base", "resnet50", 0), ("lr", "resnet50", 0)]
    assert rows[1]["overrides"] == {"lr": 0.01}
    assert all(0.0 <= r["acc_test"] <= 1.0 and r["steps"] >= 1 for r in rows)
