"""The experiments' CPU smoke run, the ncu command line and CSV parser, and the claims/plots over stored results."""
import json

import pytest

from impl import backend

from impl.common.ledger import NotMeasured, ResultsView, clean_commit, evaluate
from impl.common.results import RESULTS
from impl.l2cache import claims, ncu
from impl.l2cache.experiments import SMOKE, per_policy_metrics, run
from impl.l2cache.testing import l2_guard  # noqa: F401  (autouse)


def test_smoke_run_covers_every_workload_and_policy_and_writes_nothing():
    before = sorted(RESULTS.rglob("l2cache/*"))
    out = run(SMOKE, smoke=True)
    assert sorted(RESULTS.rglob("l2cache/*")) == before, "--smoke must not write results"
    pol = out["policies"]
    pairs = {(r["workload"], r["policy"]) for r in pol["table"]}
    assert pairs == {(w, p) for w in SMOKE.workloads for p in SMOKE.policies}
    assert pol["all_bit_identical"] and out["restored"]
    assert all(r["median_ms"] > 0 for r in pol["table"])
    assert pol["best"] is not None and pol["best"]["policy"] != "default"
    assert pol["prefetch_best"]["policy"] == "prefetch"
    stream = [r for r in pol["table"] if r["policy"] == "stream_activations"]
    assert {r["workload"]: r["applicable"] for r in stream} == {"mlp_tiny": True, "conv_tiny": True,
                                                                 "ofa_tiny": backend.ON_GPU}  # a graph pool exists only on a GPU
    order = out["ncu"]["driver_order"]
    assert [p for p, _ in order] == list(SMOKE.policies) * SMOKE.ncu_requests
    assert "| workload |" in pol["table_md"] and len(pol["table_md"].splitlines()) == 2 + len(pol["table"])


def test_profile_command_keeps_the_cache_and_profiles_whole_graphs(tmp_path):
    cmd = ncu.profile_command(tmp_path / "r", ["--ncu-driver", "mlp_16mb"], ncu="ncu", python="py")
    joined = " ".join(cmd)
    for flag in ("--cache-control none", "--clock-control none", "--graph-profiling graph",
                 "--profile-from-start off", "--metrics " + ",".join(ncu.METRICS)):
        assert flag in joined
    assert cmd[-4:] == ["-m", "impl.l2cache.experiments", "--ncu-driver", "mlp_16mb"]
    assert ncu.import_command(tmp_path / "r.ncu-rep")[-5:] == ["--csv", "--page", "raw", "--print-units", "base"]


RAW = '''==PROF== Connected to process
"ID","Process ID","Kernel Name","dram__bytes_read.sum","dram__bytes_write.sum","lts__t_sector_hit_rate.pct"
"","","","byte","Mbyte","%"
"0","42","Graph 1","1,048,576","2.5","61.25"
"1","42","Graph 1","2097152","0","99"
'''


def test_parse_raw_csv_scales_units_and_reads_every_row():
    rows = ncu.parse_raw_csv(RAW)
    assert rows == [{"dram_read_bytes": 1048576.0, "dram_write_bytes": 2.5e6, "l2_hit_pct": 61.25},
                    {"dram_read_bytes": 2097152.0, "dram_write_bytes": 0.0, "l2_hit_pct": 99.0}]


def test_parse_raw_csv_names_what_is_missing():
    with pytest.raises(ValueError, match="no ncu CSV header"):
        ncu.parse_raw_csv("==PROF== nothing profiled\n")
    with pytest.raises(ValueError, match="lacks the metric"):
        ncu.parse_raw_csv('"ID","dram__bytes_read.sum"\n"0","5"\n')
    with pytest.raises(ValueError, match="no result rows"):
        ncu.parse_raw_csv(RAW.splitlines()[1] + "\n" + RAW.splitlines()[2] + "\n")


def test_per_policy_metrics_averages_each_policys_requests():
    rows = [{"dram_read_bytes": v, "l2_hit_pct": 50.0} for v in (10.0, 30.0, 4.0, 6.0)]
    got = per_policy_metrics(rows, ["default", "persist_weights"], 2)
    assert got == {"default": {"dram_read_bytes": 20.0, "l2_hit_pct": 50.0},
                   "persist_weights": {"dram_read_bytes": 5.0, "l2_hit_pct": 50.0}}
    with pytest.raises(ValueError, match="expected 6"):
        per_policy_metrics(rows, ["a", "b", "c"], 2)


# ---- claims and plots ---------------------------------------------------------------------------------------

def _record(name: str, data: dict) -> dict:
    return {"system": "l2cache", "name": name, "device": "NVIDIA H100 80GB HBM3", "commit": clean_commit(), "date": "2026-11-28",
            "data": data}


def test_claims_are_not_measured_without_results(tmp_path):
    view = ResultsView("h100-80gb-hbm3", root=tmp_path)
    assert {c.id for c in claims.CLAIMS} == {"l2cache.best_gain_pct", "l2cache.prefetch_gain_pct",
                                             "l2cache.dram_read_drop"}
    for c in claims.CLAIMS:
        assert isinstance(c.measure(view), NotMeasured)
        assert evaluate(c, view)["verdict"] == "not measured"
    assert all(plot(view, tmp_path) == [] for plot in claims.PLOTS)


def test_claims_and_plots_read_stored_results(tmp_path):
    d = tmp_path / "h100-80gb-hbm3" / "l2cache"
    d.mkdir(parents=True)
    table = [{"workload": w, "policy": p, "weight_bytes": wb, "weight_over_carveout": wb / 32768000, "median_ms": 0.1,
              "p10_ms": 0.1, "p90_ms": 0.1, "gain_pct": g, "applicable": True, "bit_identical": True, "note": ""}
             for w, wb in (("mlp_16mb", 16e6), ("mlp_64mb", 66e6))
             for p, g in (("default", 0.0), ("persist_weights", 30.0 if wb > 3e7 else 1.0), ("prefetch", 2.0))]
    pol = {"table": table, "best": {"workload": "mlp_64mb", "policy": "persist_weights", "gain_pct": 30.0},
           "prefetch_best": {"workload": "mlp_64mb", "policy": "prefetch", "gain_pct": 2.0}}
    sweep = {"points": [{"weight_over_carveout": x, "gain_pct": g} for x, g in ((0.5, 0.5), (1.0, 3.0), (2.0, 35.0))]}
    ncu_data = {"best": {"dram_read_drop_pct": 48.0}}
    for name, data in (("policies", pol), ("sweep", sweep), ("ncu", ncu_data)):
        (d / f"{name}.json").write_text(json.dumps(_record(name, data)))
    view = ResultsView("h100-80gb-hbm3", root=tmp_path)
    verdicts = {c.id: evaluate(c, view) for c in claims.CLAIMS}
    assert verdicts["l2cache.best_gain_pct"]["measured_value"] == 30.0
    assert verdicts["l2cache.best_gain_pct"]["verdict"] == "pass"
    assert verdicts["l2cache.prefetch_gain_pct"]["verdict"] == "pass"
    assert verdicts["l2cache.dram_read_drop"]["measured_value"] == 48.0
    import matplotlib

    matplotlib.use("Agg")
    out = tmp_path / "plots"
    out.mkdir()
    made = [p for plot in claims.PLOTS for p in plot(view, out)]
    assert [p.name for p in made] == ["l2cache_gain_vs_weights.png", "l2cache_policy_table.png"]
    assert all(p.stat().st_size > 1000 for p in made)
