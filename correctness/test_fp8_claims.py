"""The fp8 ledger entries evaluate against stored results and the plots draw from them (a fake results folder)."""
import json

from impl.common.ledger import ResultsView, clean_commit, evaluate, load_claims
from impl.fp8 import claims
from impl.fp8.layouts import LAYOUTS


def fake_results(root):
    d = root / "h100-fake"
    (d / "machine").mkdir(parents=True)
    (d / "fp8").mkdir()
    benches = []
    for nk in (4096, 8192):
        for m in (1, 64, 8192):
            for variant, t in (("bf16", 1.0), ("fp8", 0.55 if m > 64 else 1.1), ("fp8-linear", 0.7)):
                name = f"test_fp8_gemm[{variant}-M{m}-N{nk}-K{nk}]"
                benches.append({"name": name, "fullname": f"benches/bench_fp8.py::{name}", "stats": {"median": t},
                                "extra_info": {"m": m, "n": nk, "variant": variant}})
    for kind, pct in (("dequant", 88.0), ("requant", 79.0)):
        name = f"test_fp8_{kind}[block-14336x4096]"
        benches.append({"name": name, "fullname": name, "stats": {"median": 1e-4}, "extra_info": {"pct_peak_bw": pct}})
    run = {"benchmarks": benches, "commit_info": {"id": clean_commit()}, "datetime": "2026-01-01",
           "machine_info": {"gpu": "NVIDIA H100"}}
    (d / "machine" / "0001_run.json").write_text(json.dumps(run))
    layouts = {n: {"ppl": 20.1, "ppl_delta_pct": 0.5 if n != "ct-block" else 1.5, "within_1pct": n != "ct-block"}
               for n in LAYOUTS}
    (d / "fp8" / "smollm2_ppl.json").write_text(json.dumps(
        {"device": "NVIDIA H100", "commit": clean_commit(), "date": "2026", "data": {"tokens": 1000, "bf16": {"ppl": 20.0},
                                                                          "layouts": layouts}}))
    return ResultsView("h100-fake", root)


def test_fp8_claims_evaluate(tmp_path):
    view = fake_results(tmp_path)
    rows = {c.id: evaluate(c, view) for c in load_claims() if c.system == "fp8"}
    assert rows["fp8.dequant_bw_pct"]["verdict"] == "pass"
    assert rows["fp8.requant_bw_pct"]["verdict"] == "fail"
    speedup = rows["fp8.gemm_speedup"]
    assert speedup["verdict"] == "pass" and abs(speedup["measured_value"] - 1 / 0.55) < 1e-3
    assert rows["fp8.ppl_vllm_tensor"]["verdict"] == "pass" and rows["fp8.ppl_ct_block"]["verdict"] == "fail"
    assert rows["fp8.load_gbps"]["verdict"] == "not measured"
    assert all(f"fp8.ppl_{n.replace('-', '_')}" in rows for n in LAYOUTS)


def test_fp8_plots_draw_from_results_and_skip_without(tmp_path):
    view = fake_results(tmp_path)
    out = tmp_path / "plots"
    out.mkdir()
    made = [p for plot in claims.PLOTS for p in plot(view, out)]
    assert sorted(p.name for p in made) == ["fp8_kernel_bandwidth.png", "fp8_perplexity.png", "fp8_speedup_vs_m.png"]
    assert all(p.stat().st_size > 1000 for p in made)
    empty = ResultsView("nothing-here", tmp_path)
    assert all(plot(empty, out) == [] for plot in claims.PLOTS)
