"""The join's non-kernel parts: the CUDA C++ source compiles (nvcc, NVRTC), every kernel compiles for sm_90, the
bench data generator's cases, the Nsight Compute parser and experiment smoke run, the claims and their plots."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures.nvcc import compile_for_sm90
from fixtures.nvrtc import assert_compiles_with_nvrtc
from impl.common import ledger
from impl.common.results import ROOT
from impl.join import experiments, ncu, tc_triton
from impl.join.claims import CLAIMS, FAILING_CASES
from impl.join.data import Case, make_tables, spread_keys
from impl.join.hash_cuda import KERNEL_NAMES, SOURCE
from impl.join.plots import PLOTS, TABLES


# ---- the CUDA C++ source ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("defines", [[], ["-DJOIN_THREADS=128", "-DJOIN_ITEMS=2"], ["-DJOIN_RECONVERGE=1"],
                                     ["-DJOIN_LROWS=4"], ["-DJOIN_CHAINS=1"], ["-DJOIN_CHAINS=1", "-DJOIN_LROWS=2"]],
                         ids=["default", "128x2", "reconverge", "lrows4", "chains", "chains-lrows2"])
def test_hash_join_cu_compiles_with_nvcc(tmp_path, defines):
    """Every kernel the wrapper launches is in the sm_90 cubin, and ptxas spills no register in any of them."""
    report, blob = compile_for_sm90(SOURCE, defines, tmp_path)
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and not any(spills), f"ptxas spills registers: {report[-3000:]}"
    missing = [k for k in KERNEL_NAMES if k.encode() not in blob]
    assert not missing, f"kernels the wrapper launches are missing from the cubin: {missing}"


def test_hash_join_cu_compiles_with_nvrtc_like_cupy():
    assert_compiles_with_nvrtc(SOURCE.read_bytes(), "hash_join.cu",
                               [b"-std=c++17", b"--gpu-architecture=sm_90", b"-DJOIN_THREADS=256", b"-DJOIN_ITEMS=4"])


def test_every_kernel_compiles_for_sm90():
    """numba kernels -> PTX (cc 9.0), Triton kernels -> sm_90 cubin, in a compile-only subprocess."""
    proc = subprocess.run([sys.executable, "-m", "impl.join.compile_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    assert proc.returncode == 0, json.dumps(report, indent=1)[-4000:] + proc.stderr[-2000:]
    assert len(report["numba"]) == 18 and all(v > 1000 for v in report["numba"].values())
    assert len(report["triton"]) == len(tc_triton.compile_specs()) and all(v > 1000 for v in report["triton"].values())


# ---- bench data -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_spread_keys_is_injective_and_signed(dtype):
    keys = spread_keys(torch.arange(200_000), dtype)
    assert keys.dtype == getattr(torch, dtype) and torch.unique(keys).numel() == 200_000
    assert (keys < 0).any() and (keys > 0).any()


def test_bench_cases_have_their_shape():
    n = 20_000
    bk, br, pk, pr = make_tables(Case("uniform", n), seed=3)
    assert torch.unique(bk).numel() == n and torch.equal(br, torch.arange(n, dtype=torch.int32))
    hits = torch.isin(pk, bk).double().mean().item()
    assert 0.47 < hits < 0.53, f"uniform: {hits:.3f} of probes match, want ~0.5"
    bk, _, pk, _ = make_tables(Case("m2m", n), seed=3)
    per_key = n / torch.unique(bk).numel()
    assert 7 < per_key < 10, f"m2m: {per_key:.1f} build rows per key, want ~8"
    _, _, zk, _ = make_tables(Case("zipf", n), seed=3)
    _, _, uk, _ = make_tables(Case("uniform", n), seed=3)
    top = lambda k: torch.unique(k, return_counts=True)[1].max().item()  # noqa: E731
    assert top(zk) > 20 * top(uk), "zipf: the hottest probe key should dwarf the uniform case's"


# ---- Nsight Compute parsing and the experiment's smoke mode --------------------------------------------------------

def test_ncu_numbers_and_csv_parse():
    assert ncu.to_number("1,234,567") == 1234567
    assert ncu.to_number("9,5") == 9.5 and ncu.to_number("12.5") == 12.5
    assert ncu.to_number("n/a") is None
    assert ncu.parse_ncu_csv("==PROF== nothing profiled\n") == []
    kernels = ncu.parse_ncu_csv(ncu.SMOKE_CSV)
    assert [k["id"] for k in kernels] == [0, 1, 2]
    assert kernels[1]["dram__bytes_read.sum"] == 4e6 and kernels[2]["gpu__time_duration.sum"] == 30_000


def test_ncu_summary_attributes_and_weights():
    s = ncu.summarize(ncu.parse_ncu_csv(ncu.SMOKE_CSV), copy_gbps=3000.0)
    assert set(s) == {"hash_cuda", "tc_triton"}
    h = s["hash_cuda"]
    assert h["occupancy_pct"] == 80.0  # the torch fill before the build is a helper: not in the occupancy
    assert h["dram_bytes"] == 4e6 + 16_777_216 and h["kernel_time_us"] == 15.0  # ...but in bytes and time
    assert h["dram_gbps"] == pytest.approx((4e6 + 16_777_216) / 15_000)
    assert s["tc_triton"]["occupancy_pct"] == 40.0


def test_ncu_command_profiles_without_cache_or_clock_control():
    cmd = ncu.ncu_command("ncu", ncu.CORE_METRICS, 1000, ["hash-cuda"], "/tmp/x.csv")
    joined = " ".join(cmd)
    assert "--cache-control none" in joined and "--csv" in joined and "impl.join.ncu_driver" in joined
    for m in ("sm__warps_active.avg.pct_of_peak_sustained_active", "dram__bytes_read.sum", "dram__bytes_write.sum",
              "sm__throughput.avg.pct_of_peak_sustained_elapsed"):
        assert m in joined


def test_experiments_smoke_runs_and_writes_nothing(capsys):
    before = sorted(p for p in (ROOT / "results").rglob("*") if "join" in p.parts)
    assert experiments.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    pairs = {line.split("->")[1] for line in out.splitlines() if line.startswith("ncu_driver:")}
    assert len(pairs) == 1 and int(pairs.pop().split()[0]) > 0, "the driver's joins disagree or found nothing"
    assert sum(line.startswith("sweep ") for line in out.splitlines()) == 3
    assert sorted(p for p in (ROOT / "results").rglob("*") if "join" in p.parts) == before


# ---- claims and plots ---------------------------------------------------------------------------------------------

def test_claims_cover_the_issue_and_start_unmeasured(tmp_path):
    ids = {c.id for c in ledger.load_claims(("join",))}
    assert ids == {"join.hash_1m_us", "join.zipf_1m_us", "join.m2m_1m_ratio", "join.hash_10m_i64_ms",
                   "join.hash_100m_i64_ms", "join.triton_1m_ms", "join.tc_vs_hash_ratio", "join.hash_occupancy",
                   "join.tc_occupancy"}
    assert not [c.id for c in CLAIMS if re.search(r"\b(H100|H200|A100|L40S?)\b", c.statement)], "a statement names a card"
    view = ledger.ResultsView("h100-80gb-hbm3", root=tmp_path)
    assert all(ledger.evaluate(c, view)["verdict"] == "not measured" for c in CLAIMS)
    assert all(plot(view, tmp_path) == [] for plot in PLOTS)


def _fake_results(root: Path, slug: str) -> None:
    def bench(name, seconds, **info):
        return {"group": None, "name": name, "fullname": f"benches/bench_join.py::{name}", "params": {},
                "param": None, "options": {}, "extra_info": info, "stats": {"median": seconds, "mean": seconds}}

    benches = []
    for impl_, scale in (("hash-cuda", 1.0), ("tc-triton", 6.0), ("sortmerge-torch", 8.0), ("pandas", 900.0)):
        for case, n in (("100k", 100_000), ("1M", 1_000_000), ("10M", 10_000_000)):
            benches.append(bench(f"test_join_x[{impl_}-total-{case}]", scale * 50e-6 * n / 1e6, impl=impl_,
                                 phase="total", case=case, kind="uniform", n=n))
        for phase in ("build", "probe", "materialize"):
            benches.append(bench(f"test_join_x[{impl_}-{phase}-1M]", scale * 15e-6, impl=impl_, phase=phase,
                                 case="1M", kind="uniform", n=1_000_000))
    benches.append(bench("test_join_hash[cuda-total-1M]", 50e-6, impl="hash-cuda", phase="total", case="1M",
                         kind="uniform", n=1_000_000))
    benches.append(bench("test_join_tc[total-1M]", 700e-6, impl="tc-triton", phase="total", case="1M",
                         kind="uniform", n=1_000_000, flops=2_100_000_000, flops_per_useful_comparison=4200.0,
                         launches=5, host_syncs=1))
    run = {"commit_info": {"id": ledger.clean_commit()}, "datetime": "2026-11-28T00:00:00", "machine_info": {"gpu": "NVIDIA H100"},
           "benchmarks": benches}
    (root / slug / "machine").mkdir(parents=True)
    (root / slug / "machine" / "0001_fake.json").write_text(json.dumps(run))
    profile = {"device": "NVIDIA H100", "commit": ledger.clean_commit(), "date": "2026-11-28", "data": {
        "hash_cuda": {"occupancy_pct": 70.0, "kernels": [{"kernel": "hash_build_cu", "own": True,
                                                          "sm__warps_active.avg.pct_of_peak_sustained_active": 70.0}]},
        "tc_triton": {"occupancy_pct": 30.0, "kernels": [{"kernel": "tc_join_pass", "own": True,
                                                          "sm__warps_active.avg.pct_of_peak_sustained_active": 30.0}]}}}
    (root / slug / "join").mkdir()
    (root / slug / "join" / "ncu.json").write_text(json.dumps(profile))


def test_claims_evaluate_and_plots_draw_from_stored_results(tmp_path):
    _fake_results(tmp_path, "h100-80gb-hbm3")
    view = ledger.ResultsView("h100-80gb-hbm3", root=tmp_path)
    rows = {c.id: ledger.evaluate(c, view) for c in CLAIMS}
    assert rows["join.hash_1m_us"]["measured_value"] == pytest.approx(50.0)
    assert rows["join.hash_1m_us"]["verdict"] == "fail"  # 50 µs > 40 µs
    assert rows["join.triton_1m_ms"]["verdict"] == "fail"  # 0.7 ms > 0.4 ms
    assert rows["join.tc_vs_hash_ratio"]["measured_value"] == pytest.approx(14.0)
    assert rows["join.hash_occupancy"]["verdict"] == "fail" and rows["join.tc_occupancy"]["verdict"] == "pass"
    out = tmp_path / "png"
    out.mkdir()
    drawn = [p for plot in PLOTS for p in plot(view, out)]
    assert sorted(p.name for p in drawn) == ["join_ncu.png", "join_phases_1m.png", "join_time_vs_rows.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in drawn)
    lines = [line for table in TABLES for line in table(view)]
    row = next(line for line in lines if line.startswith("| hash-cuda | int32 | 1,000,000 |"))
    assert "50.0 µs" in row and "4e+10" in row  # 2M rows in 50 µs
    tc = next(line for line in lines if line.startswith("| total |"))
    assert tc.split(" | ")[1:] == ["700.0 µs", "2.10 G", "4,200", "3.0", "5", "1 |"]  # 2.1 GFLOP in 700 µs


def test_end_to_end_claims_name_the_eager_time_beside_the_queued_one(tmp_path):
    """The 1M claim is judged on the queued median; its source names the eager median the bench stored beside it
    (the time a caller waits), and says nothing where the bench stored none."""
    bench = FAILING_CASES["join.hash_1m_us"].benches["test_join_hash[cuda-total-1M]"]
    eager = {**bench, "extra_info": {**bench["extra_info"], "eager_median_s": 346e-6}}
    claim = next(c for c in CLAIMS if c.id == "join.hash_1m_us")
    with_eager = ledger.evaluate(claim, ledger.materialise(ledger.Case(benches={
        "test_join_hash[cuda-total-1M]": eager}), tmp_path / "a"))
    assert with_eager["measured_value"] == pytest.approx(45.0) and with_eager["verdict"] == "fail"
    assert "eager (as a caller waits, host work included): 346 µs" in with_eager["source"]
    without = ledger.evaluate(claim, ledger.materialise(FAILING_CASES["join.hash_1m_us"], tmp_path / "b"))
    assert "as a caller waits" not in without["source"] and without["measured_value"] == pytest.approx(45.0)


@pytest.mark.parametrize("claim_id", sorted(c.id for c in CLAIMS))
def test_every_claim_fails_on_its_failing_case(tmp_path, claim_id):
    view = ledger.materialise(FAILING_CASES[claim_id], tmp_path)
    claim = next(c for c in CLAIMS if c.id == claim_id)
    row = ledger.evaluate(claim, view)
    assert row["verdict"] == "fail", row


def test_ncu_driver_runs_each_join_once(capsys):
    from impl.join import ncu_driver

    assert ncu_driver.main(["--n", "64", "--impls", "sortmerge-torch,tc-triton"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ncu_driver:")]
    assert len(lines) == 2 and len({line.split("->")[1] for line in lines}) == 1


def test_ncu_driver_passes_config_overrides_and_refuses_bad_ones(capsys, monkeypatch):
    from impl.join import ncu_driver

    seen = {}
    real = ncu_driver.make_operator
    monkeypatch.setattr(ncu_driver, "make_operator", lambda name, **kw: seen.setdefault(name, kw) and real(name, **kw)
                        or real(name, **kw))
    assert ncu_driver.main(["--n", "64", "--impls", "hash-numba", "--config", '{"hash-numba": {"items": 4}}']) == 0
    assert seen == {"hash-numba": {"items": 4}}
    for bad, why in [("[1]", "must map"), ("{", "not JSON"), ('{"tc-triton": {}}', "not run")]:
        with pytest.raises(SystemExit):
            ncu_driver.main(["--n", "64", "--impls", "hash-numba", "--config", bad])
        assert why in capsys.readouterr().err


# ---- the GPU tuning script, dry run ------------------------------------------------------------------------------

@pytest.mark.slow
def test_tune_dry_run_checks_times_and_writes_json(tmp_path, capsys):
    from impl.join import tune

    assert tune.main(["--out", str(tmp_path), "--dry-run", "--n", "64", "--big", "96", "--reps", "1",
                      "--variants", "split-exact-2sync", "--budget-s", "120"]) == 0
    rec = json.loads((tmp_path / "tune.json").read_text())
    (v,) = rec["variants"]
    assert rec["complete"] and v["checks"] == {k: "ok" for k in tune.CASES_1M}
    assert v["times"]["uniform-64"]["pairs"] > 0 and v["times"]["uniform-64"]["host_syncs"] == 1
    assert "split-exact-2sync" in capsys.readouterr().out
    assert rec["commit"] and rec["date"] and rec["device"] and rec["run_id"]  # where and from what it was measured


def test_tune_dry_run_times_the_tensor_core_variant_by_phase(tmp_path, capsys):
    from impl.join import tune

    assert tune.main(["--out", str(tmp_path), "--dry-run", "--n", "64", "--big", "96", "--reps", "1",
                      "--variants", "tc", "--budget-s", "120"]) == 0
    rec = json.loads((tmp_path / "tune.json").read_text())
    (v,) = rec["variants"]
    assert rec["complete"] and v["checks"] == {k: "ok" for k in tune.CASES_1M}
    assert v["times"]["uniform-64"]["host_syncs"] == 1 and v["times"]["uniform-64"]["launches"] == 5
    phases = v["times"]["phases"]
    assert {"partition", "probe", "materialize", "total"} <= set(phases) and phases["flops_per_pass"] > 0
    out = capsys.readouterr().out
    assert "decision at n: tc tc " in out and "per useful comparison" in out


def test_tune_table_marks_failures_and_skips():
    from impl.join import tune

    rec = {"n": 10, "big": 20, "variants": [
        {"label": "a", "checks": {"uniform": "ok"}, "times": {"uniform-10": {"median_us": 5.0, "launches": 1,
                                                                               "host_syncs": 1}}},
        {"label": "b", "checks": {"uniform": "differs: 3 pairs, sort-merge 4"}},
        {"label": "c", "config": {}, "skipped": "budget (1 s left)"}]}
    lines = tune.table(rec).splitlines()
    assert lines[2].split()[:3] == ["a", "ok", "5.0"] and lines[3].split()[1] == "FAIL" and lines[4].split()[1] == "skip"
    assert lines[-3:] == ["decision at n: hash a 5.0 us", "decision int64 at N: no checked variant timed it",
                          "decision m2m at n: no checked variant timed it"]
    rec["variants"].append({"label": "tc-x", "checks": {"uniform": "ok"},
                            "times": {"uniform-10": {"median_us": 40.0}}})
    rec["variants"].append({"label": "w", "checks": {"uniform": "ok"},
                            "times": {"uniform64-20": {"median_us": 9.0}, "m2m-10": {"median_us": 7.0}}})
    rec["variants"][0]["times"]["uniform64-20"] = {"median_us": 11.0}
    want = ["decision at n: hash a 5.0 us; tc tc-x 40.0 us; tc/hash 8.00x (claim: <= 10)",
            "decision int64 at N: hash w 9.0 us", "decision m2m at n: hash w 7.0 us"]
    assert tune.table(rec).splitlines()[-3:] == want


def test_tuned_hash_config_takes_the_fastest_checked_hash_variant(tmp_path):
    """The join bench's hash configuration on a GPU: of a tune record's variants, the fastest among those that passed
    every check on the timed case closest to the bench's (size and key type; n on int32 keys when no checked variant
    timed that case), as the record's base config with the variant's overrides; not a variant that failed a check, a
    tensor-core variant, or one that is not a HashConfig; None without a record or a candidate."""
    from impl.join.hash_table import HashConfig
    from impl.join.tune import tuned_hash_config

    ok = {"uniform": "ok", "zipf": "ok"}
    variants = [
        {"label": "split", "config": {"scheme": "split"}, "checks": ok, "times": {"uniform-100": {"median_us": 50.0}}},
        {"label": "broken", "config": {"scheme": "linear64", "items": 2}, "checks": {"uniform": "ok", "zipf": "wrong"},
         "times": {"uniform-100": {"median_us": 10.0}}},
        {"label": "tc-fast", "config": {"encoding": "int8"}, "checks": ok,
         "times": {"uniform-100": {"median_us": 5.0}}},
        {"label": "exact", "config": {"scheme": "linear64", "_exact": True}, "checks": ok,
         "times": {"uniform-100": {"median_us": 8.0}}},
        {"label": "partitioned", "config": {"scheme": "partitioned", "part_rows": 1024}, "checks": ok,
         "times": {"uniform-100": {"median_us": 20.0}, "uniform-999": {"median_us": 1.0}}},
        {"label": "untimed", "config": {"scheme": "linear64"}, "checks": ok, "times": {}},
        {"label": "wide-big", "config": {"scheme": "linear64", "linear_wide": True}, "checks": ok,
         "times": {"uniform-100": {"median_us": 30.0}, "uniform64-999": {"median_us": 3.0}}},
    ]
    base = {**{k: getattr(HashConfig(), k) for k in HashConfig.__dataclass_fields__}, "retired_field": 1}
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"n": 100, "big": 999, "base_config": base, "variants": variants}))
    fields, label = tuned_hash_config(path)
    assert label == "partitioned"
    assert HashConfig(**fields) == HashConfig(scheme="partitioned", part_rows=1024)
    assert tuned_hash_config(path, rows=10**4, wide=True)[1] == "wide-big"  # the int64 case at the large size
    assert tuned_hash_config(path, rows=10**4)[1] == "partitioned"  # int32 at the large size
    assert tuned_hash_config(path, rows=50, wide=True)[1] == "partitioned"  # no int64 time at n: n's int32 choice
    path.write_text(json.dumps({"n": 100, "big": 999, "base_config": base, "variants": variants[1:4]}))
    assert tuned_hash_config(path) is None
    assert tuned_hash_config(tmp_path / "missing.json") is None
