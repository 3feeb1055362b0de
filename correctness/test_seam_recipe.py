"""seam: the whole recipe in ``--smoke`` mode (tiny, CPU), its checkpoint and plots, and the ledger's keys."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from impl.common.ledger import ResultsView, evaluate, load_claims
from impl.common.results import RESULTS
from impl.seam.data import IDX_FILES, default_data_dir, write_idx


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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
