"""seam: the whole recipe in ``--smoke`` mode (tiny, CPU), its checkpoint and plots, and the ledger's keys."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from impl.common.ledger import ResultsView, evaluate, load_claims
from impl.common.results import RESULTS
from impl.seam.data import IDX_FILES, default_data_dir, write_idx
from impl.seam.testing import one_cpu_thread  # noqa: F401  (autouse)


def data_dir_for_smoke(tmp_path):
    """Fashion-MNIST if installed, else a small synthetic IDX set with the same file names."""
    d = default_data_dir()
    if (d / IDX_FILES["train"][0]).exists():
        return d
    rng = np.random.default_rng(0)
    for split, n in (("train", 5200), ("test", 100)):
        y = rng.integers(0, 10, n)
        x = (rng.integers(0, 120, (n, 28, 28)) + 12 * y[:, None, None]).astype(np.uint8)
        write_idx(x, y.astype(np.uint8), tmp_path / IDX_FILES[split][0], tmp_path / IDX_FILES[split][1])
    return tmp_path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from impl.seam.experiments import main

    tmp = tmp_path_factory.mktemp("seam_smoke")
    seam_results = sorted(p for p in RESULTS.glob("*/seam/*"))
    out = tmp / "out"
    assert main(["--smoke", "--out", str(out), "--data", str(data_dir_for_smoke(tmp))]) == 0
    assert sorted(p for p in RESULTS.glob("*/seam/*")) == seam_results, "smoke mode must not write results/"
    return out, json.loads((out / "results.json").read_text())


def test_smoke_recipe_measures_every_configuration(smoke):
    out, res = smoke
    rows = res["configs"]["rows"]
    assert len(rows) == 32 and sum(r["is_anchor"] for r in rows) == 2
    for r in rows:
        assert 0 <= r["acc_test"] <= 1 and 0 <= r["acc_val"] <= 1 and r["flops"] > 0 and r["params"] > 0
        assert r["latency_b1_ms"] > 0 and r["latency_b2_ms"] > 0
        assert (r["acc_lstsq_only"] is None) == r["is_anchor"]
    interp = res["interpolation"]
    assert interp["stitches"] == 30 and 0 <= interp["interpolating"] <= 30
    assert sum(interp["reasons"].values()) == 30
    sel = res["selector"]["summary"]
    assert sel["fraction_lighter_or_equal"] == 1.0
    t = res["training"]
    assert t["training_s"] > 0 and t["family"]["steps"] == 3
    assert set(t["anchors"]) == {"r34", "r50"} and all(a["steps"] == 2 for a in t["anchors"].values())
    assert (out / "seam_acc_vs_flops.png").stat().st_size > 0 and (out / "seam_selector.png").stat().st_size > 0


def test_smoke_checkpoint_serves(smoke):
    from impl.seam.serve import SeamServer, main

    out, res = smoke
    server = SeamServer.from_checkpoint(out / "checkpoint")
    cfg = server.select(0.0)
    assert cfg.name == min(res["configs"]["rows"], key=lambda r: (r["flops"], -r["acc_val"], r["name"]))["name"]
    pred = server.serve(np.zeros((3, 16, 16), np.uint8))
    assert pred.shape == (3,) and ((0 <= pred) & (pred < 10)).all()
    assert main(["--ckpt", str(out / "checkpoint"), "--min-acc", "0", "--limit", "16", "--device", "cpu",
                 "--data", str(json.loads((out / "checkpoint" / "meta.json").read_text())["data"].get("source")
                               or default_data_dir())]) == 0


def test_claims_read_the_recipe_results(smoke, tmp_path):
    out, res = smoke
    claims = [c for c in load_claims(("seam",))]
    assert {c.id for c in claims} >= {"seam.interpolation_fraction", "seam.selector_lighter", "seam.train_time_s"}
    from impl.seam.claims import PLOTS

    empty = ResultsView("nothing-here", tmp_path)
    assert all(plot(empty, tmp_path) == [] for plot in PLOTS)
    for name, data in res.items():  # the shape write_result stores, under a fake card's folder
        path = tmp_path / "fake-card" / "seam" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": "cpu", "commit": "test", "date": "", "data": data}))
    view = ResultsView("fake-card", tmp_path)
    for c in claims:
        row = evaluate(c, view)
        assert row["measured_value"] is not None, (c.id, row["reason"])
        assert row["verdict"] == "not measured" and "CPU" in row["reason"]  # a CPU number never passes a GPU claim
    pngs = [p for plot in PLOTS for p in plot(view, tmp_path)]
    assert len(pngs) == 2 and all(p.stat().st_size > 0 for p in pngs)


@pytest.mark.parametrize("heavy_acc,says_why", [(0.90, True), (0.95, False)])
def test_strictly_lighter_claim_says_why_it_has_no_case(tmp_path, heavy_acc, says_why):
    from impl.common.ledger import NotMeasured
    from impl.seam.claims import CLAIMS

    rows = [{"name": "r34", "is_anchor": True, "flops": 1e9, "acc_test": 0.92},
            {"name": "r50", "is_anchor": True, "flops": 2e9, "acc_test": heavy_acc}]
    for name, data in (("configs", {"rows": rows}),
                       ("selector", {"summary": {"percent_strictly_lighter_where_stitch_between": None}})):
        path = tmp_path / "card" / "seam" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": "GPU", "commit": "c", "date": "", "data": data}))
    claim = next(c for c in CLAIMS if c.id == "seam.selector_strictly_lighter_where_between")
    got = claim.measure(ResultsView("card", tmp_path))
    assert isinstance(got, NotMeasured) and "is null" in got.reason
    assert ("no case: the heavier anchor r50" in got.reason) == says_why


# ---- the collapse guard: a diverged family fails loudly and writes nothing ---------------------------------------


def test_nonfinite_loss_stops_training():
    """One NaN weight makes every loss NaN: training raises instead of returning garbage weights."""
    from impl.seam.testing import make_family, synthetic_bundle
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


def test_recipe_writes_nothing_from_a_diverged_family(tmp_path, monkeypatch):
    """The whole recipe with results writing on: a NaN in the family makes it raise before any result is written."""
    import impl.common.results
    import impl.seam.experiments as ex
    from impl.seam.train import CollapseError

    written = []
    monkeypatch.setattr(impl.common.results, "write_result", lambda *a, **k: written.append(a))
    real_init = ex.init_stitches

    def init_then_poison(family, *a, **k):
        out = real_init(family, *a, **k)
        with torch.no_grad():
            for net in family.nets.values():  # both stem convs: every configuration's output is NaN
                next(net.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(ex, "init_stitches", init_then_poison)
    recipe = ex.preset("smoke")
    recipe.anchor_train.epochs = 0  # no anchor training: the guard is what is tested
    with pytest.raises(CollapseError, match="family: training loss became non-finite"):
        ex.run(recipe, str(data_dir_for_smoke(tmp_path)), tmp_path / "out", True, {})
    assert written == [] and not (tmp_path / "out" / "results.json").exists()


def test_grad_clip_bounds_the_step():
    """With ``grad_clip`` one Nesterov step moves all parameters together by at most lr·(1 + momentum)·clip."""
    from impl.seam.testing import make_family, synthetic_bundle
    from impl.seam.train import TrainConfig, finetune_family

    fam = make_family(width_div=16)
    data = synthetic_bundle(48, 8, 8, size=8)
    before = [p.detach().clone() for p in fam.parameters()]
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, weight_decay=0.0, max_steps=1, grad_clip=1e-3)
    out = finetune_family(fam, data, cfg, "cpu", channels_last=False)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(fam.parameters(), before)))
    assert out["grad_norm_curve"][0][1] > 10 * cfg.grad_clip  # the clip bound
    assert 0 < float(moved) <= cfg.lr * (1 + cfg.momentum) * cfg.grad_clip * (1 + 1e-4)
