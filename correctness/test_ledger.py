"""The ledger's rules, each on a small stored-results folder built here: provenance (clean, known, complete, one
run, one device), CPU results kept out of GPU folders, runs ordered by date, unreadable files, intervals judged at
their conservative end, best-of-many figures re-measured, figures above a calibrated peak, one list of systems."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.git import commit, git
from impl.common import ledger, report, results
from impl.common.stats import median_interval, paired_bootstrap, quartile_top_rank, ratio_interval, summary_interval

HEAD = ledger.clean_commit()
GPU = "NVIDIA H200"
needs_history = pytest.mark.skipif(results.commit_exists(HEAD) is None,
                                   reason="this checkout has no full git history: commit existence cannot be checked")


def store_run(root, slug, device, benches, *, number=1, date="2026-11-28T01:00:00+00:00", commit=HEAD, dirty=False):
    run = {"machine_info": {"gpu": device}, "commit_info": {"id": commit, "dirty": dirty}, "datetime": date,
           "benchmarks": benches}
    path = root / slug / "Linux-CPython-3.12-64bit" / f"{number:04d}_run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))
    return path


def bench(name, median, rounds=None, **extra):
    rounds = rounds or [median] * 20
    return {"name": name, "fullname": f"benches/bench_x.py::{name}", "extra_info": {"rounds_s": rounds, **extra},
            "stats": {"median": median, "min": min(rounds), "max": max(rounds), "rounds": len(rounds)}}


def store_result(root, slug, system, name, data, *, device=GPU, commit=HEAD[:12], **top):
    path = root / slug / system / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device, "commit": commit, "date": "2026-11-28", "data": data, **top}))
    return path


def claim(measure, comparison=">=", target=1.0, needs_gpu=True):
    return ledger.Claim(id="examples.t", system="examples", statement="s", unit="x", comparison=comparison,
                        target=target, measure=measure, needs_gpu=needs_gpu)


def verdict(measure, root, slug="h200", **kw):
    return ledger.evaluate(claim(measure, **kw), ledger.ResultsView(slug, root))


# ---- provenance ------------------------------------------------------------------------------------------------

def test_a_clean_known_complete_record_passes(tmp_path):
    store_result(tmp_path, "h200", "examples", "r", {"x": 2.0})
    row = verdict(ledger.ResultValue("examples", "r", "x"), tmp_path)
    assert row["verdict"] == "pass" and row["provenance"][0]["commit"] == HEAD[:12]


def test_uncommitted_code_never_gives_a_verdict(tmp_path):
    store_result(tmp_path, "h200", "examples", "r", {"x": 2.0}, commit=HEAD[:12] + "+dirty")
    row = verdict(ledger.ResultValue("examples", "r", "x"), tmp_path)
    assert row["verdict"] == "not measured" and "uncommitted" in row["reason"] and row["measured_value"] == 2.0
    store_run(tmp_path, "h200", GPU, [bench("a", 2.0)], dirty=True)
    row = verdict(ledger.BenchStat("a"), tmp_path)
    assert row["verdict"] == "not measured" and "uncommitted" in row["reason"]


@pytest.mark.parametrize("commit", ["unknown", "", None])
def test_an_unknown_commit_never_gives_a_verdict(tmp_path, monkeypatch, commit):
    monkeypatch.setattr(ledger, "commit_exists", lambda sha: None)  # where git cannot tell (the GPU machine)
    store_result(tmp_path, "h200", "examples", "r", {"x": 2.0}, commit=commit)
    row = verdict(ledger.ResultValue("examples", "r", "x"), tmp_path)
    assert row["verdict"] == "not measured" and "is unknown" in row["reason"]


@needs_history
def test_a_commit_outside_this_repository_never_gives_a_verdict(tmp_path):
    store_result(tmp_path, "h200", "examples", "r", {"x": 2.0}, commit="deadbeef0123")
    row = verdict(ledger.ResultValue("examples", "r", "x"), tmp_path)
    assert row["verdict"] == "not measured" and "not a commit of this repository" in row["reason"]
    assert results.commit_exists(HEAD) is True and results.commit_exists("deadbeef0123") is False


def test_the_stated_commit_vouches_for_itself_where_git_history_stops_earlier(monkeypatch):
    """The GPU machine's copy of the tree carries a .git that may stop at an older commit: the commit stated by
    LAB_COMMIT (the one measured) must count as this repository's, and others as undecidable, never as foreign."""
    stated = "feedfacecafe" + "0" * 28  # in no local history, like a commit made after the device's .git
    monkeypatch.setenv("LAB_COMMIT", stated)
    monkeypatch.setattr(results, "_KNOWN_COMMITS", {})
    assert results.commit_exists(stated[:12]) is True
    assert results.commit_exists("deadbeef0123") is None
    assert ledger.commit_problem(stated[:12]) is None


@pytest.fixture
def copy_of_a_commit(tmp_path, monkeypatch):
    """A one-commit repository standing in for the GPU machine's copy (code, results/, an ignored build folder),
    with LAB_COMMIT and LAB_TREE as `python -m impl provenance` prints them; the per-process check is reset."""
    (tmp_path / "impl").mkdir()
    (tmp_path / "impl" / "k.py").write_text("x = 1\n")
    (tmp_path / "results" / "h200").mkdir(parents=True)
    (tmp_path / "results" / "h200" / "r.json").write_text("{}\n")
    (tmp_path / ".gitignore").write_text("/build/\n")
    git(tmp_path, "init", "-q")
    monkeypatch.setattr(results, "ROOT", tmp_path)
    monkeypatch.setenv("LAB_COMMIT", commit(tmp_path, "c"))
    monkeypatch.setenv("LAB_TREE", results.code_tree("HEAD"))
    results.stated_tree_problem.cache_clear()
    yield tmp_path
    results.stated_tree_problem.cache_clear()


def test_a_copy_of_the_stated_commit_is_clean_whatever_its_run_writes(copy_of_a_commit):
    (copy_of_a_commit / "results" / "h200" / "new.json").write_text("{}\n")  # what a run writes
    (copy_of_a_commit / "build").mkdir()
    (copy_of_a_commit / "build" / "k.cubin").write_bytes(b"\0")  # ignored outputs
    assert results.stated_tree_problem() is None
    assert not results.git_commit().endswith("+dirty")


@pytest.mark.parametrize("change", ["edit", "add", "no_git", "no_tree"])
def test_a_copy_that_is_not_the_stated_commit_gives_dirty_records(copy_of_a_commit, monkeypatch, change):
    """An edited or added source file, or no LAB_TREE to check against, makes every record say +dirty; the copy's
    own .git is not needed for the check (the machine's may stop at an older commit)."""
    if change == "edit":
        (copy_of_a_commit / "impl" / "k.py").write_text("x = 2\n")
    elif change == "add":
        (copy_of_a_commit / "impl" / "new.py").write_text("y = 1\n")
    elif change == "no_git":
        shutil.rmtree(copy_of_a_commit / ".git")
        (copy_of_a_commit / "impl" / "k.py").write_text("x = 3\n")
    else:
        monkeypatch.delenv("LAB_TREE")
    problem = results.stated_tree_problem()
    assert problem and ("LAB_TREE" in problem if change == "no_tree" else "edited or stale" in problem)
    assert results.git_commit().endswith("+dirty")


def test_without_its_git_a_copy_of_the_stated_commit_still_checks_clean(copy_of_a_commit):
    shutil.rmtree(copy_of_a_commit / ".git")
    assert results.stated_tree_problem() is None


def test_every_ci_script_parses():
    ci = results.ROOT / ".ci"
    scripts = sorted(ci.rglob("*.sh")) + [ci / "run", ci / "setup"]
    bad = {}
    for f in scripts:
        out = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True, timeout=60)
        if out.returncode:
            bad[f.name] = out.stderr.strip()
    assert len(scripts) > 5 and not bad, bad


@pytest.mark.parametrize("tree", ["wrong", "missing"])
def test_the_device_scripts_stop_before_any_step_unless_the_files_are_the_stated_commit(tree):
    """.ci/gpu/provenance.sh, which every device script sources first, must end the script (exit 4 on a tree that is
    not LAB_COMMIT's, an error without LAB_TREE) before anything after it runs."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "LAB_COMMIT": HEAD}
    env.pop("LAB_TREE", None)
    if tree == "wrong":
        env["LAB_TREE"] = "0" * 40
    out = subprocess.run(["bash", "-c", "source .ci/gpu/provenance.sh; echo reached"], cwd=results.ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert "reached" not in out.stdout, out.stdout + out.stderr
    assert out.returncode == 4 if tree == "wrong" else out.returncode != 0, out.stderr
    assert ("not LAB_COMMIT" if tree == "wrong" else "LAB_TREE") in out.stderr


@pytest.mark.parametrize("where", ["data", "top"])
def test_an_unfinished_run_is_not_measured(tmp_path, where):
    data = {"x": 2.0, **({"complete": False} if where == "data" else {})}
    store_result(tmp_path, "h200", "examples", "r", data, **({"complete": False} if where == "top" else {}))
    row = verdict(ledger.ResultValue("examples", "r", "x"), tmp_path)
    assert row["verdict"] == "not measured" and "complete: false" in row["reason"]


def test_a_ratio_takes_both_sides_from_one_run_and_shows_both(tmp_path):
    store_run(tmp_path, "h200", GPU, [bench("slow", 3.0), bench("fast", 1.0)], number=1)
    row = verdict(ledger.BenchRatio("slow", "fast"), tmp_path, target=2.0)
    assert row["verdict"] == "pass" and [p["what"] for p in row["provenance"]] == ["slow", "fast"]
    md = report._markdown("h200", ledger.ResultsView("h200", tmp_path), [row], {})
    assert "`slow` from" in md and "`fast` from" in md
    store_run(tmp_path, "h200", GPU, [bench("fast", 1.0)], number=2, date="2026-11-28T02:00:00+00:00")
    row = verdict(ledger.BenchRatio("slow", "fast"), tmp_path, target=2.0)
    assert row["verdict"] == "not measured" and "one run" in row["reason"]


def test_sides_on_different_devices_are_not_compared(tmp_path):
    store_result(tmp_path, "h200", "examples", "a", {"x": 3.0}, run_id="r1")
    store_result(tmp_path, "h200", "examples", "b", {"x": 1.0}, device="NVIDIA H100 80GB HBM3", run_id="r1")

    class Quotient:  # a difference/ratio measure over two records, as a system might write one
        def __call__(self, view):
            a, b = (ledger.ResultValue("examples", n, "x")(view) for n in ("a", "b"))
            return ledger.Measured(a.value / b.value, a.device, a.commit, a.date, "a/b", a.provenance + b.provenance)

        def describe(self):
            return "a / b"

    row = verdict(Quotient(), tmp_path, target=2.0)
    assert row["verdict"] == "not measured" and "different devices" in row["reason"]


def test_a_cpu_run_in_a_gpu_folder_is_never_read(tmp_path):
    """A newer CPU bench file with smaller medians must not turn a GPU ratio into a pass labelled with the GPU."""
    store_run(tmp_path, "h200", GPU, [bench("tc", 10.0), bench("hash", 1.0)], number=1)
    store_run(tmp_path, "h200", None, [bench("tc", 1.0)], number=2, date="2026-11-29T00:00:00+00:00")
    view = ledger.ResultsView("h200", tmp_path)
    row = ledger.evaluate(claim(ledger.BenchRatio("tc", "hash"), "<=", 5.0), view)
    assert row["verdict"] == "fail" and row["measured_value"] == 10.0 and row["device"] == GPU
    assert "0002_run.json" in "".join(view.ignored) and "CPU" in "".join(view.ignored.values())


def test_cpu_numbers_cannot_pass_a_gpu_claim(tmp_path):
    store_run(tmp_path, "cpu", None, [bench("a", 5.0)])
    row = verdict(ledger.BenchStat("a"), tmp_path, slug="cpu")
    assert row["verdict"] == "not measured" and "CPU" in row["reason"]


def test_runs_are_ordered_by_their_recorded_date_not_their_path(tmp_path):
    store_run(tmp_path, "h200", GPU, [bench("a", 1.0)], number=2, date="2026-11-28T01:00:00+00:00")
    store_run(tmp_path, "h200", GPU, [bench("a", 5.0)], number=1, date="2026-11-28T03:00:00+00:00")
    assert ledger.ResultsView("h200", tmp_path).bench("a")["stats"]["median"] == 5.0


def test_write_result_keeps_cpu_numbers_out_of_gpu_folders(tmp_path, monkeypatch):
    if results.backend.ON_GPU:
        pytest.skip("checks the refusal on a machine without a GPU")
    with pytest.raises(RuntimeError, match="results/cpu/ only"):
        results.write_result("examples", "probe", {"x": 1}, slug="h200")
    path = results.write_result("examples", "probe", {"x": 1, "complete": True}, slug="h200", root=tmp_path)
    rec = json.loads(path.read_text())
    assert rec["device"] == "cpu" and rec["run_id"] == results.RUN_ID and rec["data"]["complete"] is True
    monkeypatch.setenv("LAB_RESULTS_SLUG", "h200")
    with pytest.raises(RuntimeError, match="LAB_RESULTS_SLUG='h200'"):
        results.gpu_slug()
    with pytest.raises(RuntimeError, match="LAB_RESULTS_SLUG"):
        results.write_result("examples", "probe", {"x": 1})
    monkeypatch.setenv("LAB_RESULTS_SLUG", "cpu")
    assert results.gpu_slug() == "cpu"


# ---- unreadable files ---------------------------------------------------------------------------------------------

def test_unreadable_files_make_their_claims_not_measured_and_the_rest_renders(tmp_path):
    store_run(tmp_path, "h200", GPU, [bench("test_examples_axpy[67108864]", 1e-3, pct_peak_bw=90.0)])
    d = tmp_path / "h200"
    (d / "kvstitch").mkdir()
    (d / "kvstitch" / "rouge_smollm2.json").write_text('{"device": "NVIDIA H200", "data": {"interp')
    (d / "kvstitch" / "rouge_gemma3.json").write_text("[]")
    (d / "calibration.json").write_text('{"peaks": {"copy_gb')
    summary = report.render("h200", root=tmp_path)
    rows = {r["id"]: r for r in json.loads((d / "claims.json").read_text())}
    assert "kvstitch/rouge_smollm2.json unreadable (JSONDecodeError" in rows["kvstitch.interpolation_smollm2"]["reason"]
    assert "kvstitch/rouge_gemma3.json unreadable (holds a JSON list" in rows["kvstitch.interpolation_gemma3"]["reason"]
    assert rows["examples.axpy_bandwidth"]["verdict"] == "pass"
    md = (d / "REPORT.md").read_text()
    assert "## Problems" in md and "calibration.json" in md and "rouge_gemma3.json" in md
    assert any("calibration.json" in p for p in summary["problems"])


def test_an_unreadable_bench_file_stops_every_bench_claim(tmp_path):
    store_run(tmp_path, "h200", GPU, [bench("a", 2.0)])
    (tmp_path / "h200" / "Linux-CPython-3.12-64bit" / "0002_x.json").write_text('{"benchmarks": [')
    row = verdict(ledger.BenchStat("a"), tmp_path)
    assert row["verdict"] == "not measured" and "0002_x.json unreadable" in row["reason"]
    row = verdict(ledger.BenchStat("missing"), tmp_path)
    assert "0002_x.json unreadable" in row["reason"]


def test_a_plot_that_fails_on_its_data_is_listed_not_fatal(tmp_path, monkeypatch):
    from impl.join import plots

    def broken(view, out):
        raise KeyError("table")

    monkeypatch.setattr(plots, "PLOTS", [broken])
    store_run(tmp_path, "h200", GPU, [bench("a", 1.0)])
    summary = report.render("h200", root=tmp_path)
    assert any("plot join.broken not drawn: KeyError" in p for p in summary["problems"])


def test_the_over_peak_diagnosis_needs_a_readable_calibration(tmp_path):
    store_run(tmp_path, "h200", GPU, [bench("a", 1e-3, pct_peak_bw=101.0, gbps=4300.0)])
    (tmp_path / "h200" / "calibration.json").write_text("{")
    row = verdict(ledger.ExtraInfo("a", "pct_peak_bw"), tmp_path, target=80)
    assert row["verdict"] == "not measured" and "calibration.json unreadable" in row["reason"]


# ---- noise: intervals --------------------------------------------------------------------------------------------

def test_a_ratio_passes_only_when_its_conservative_end_does(tmp_path):
    rng = np.random.default_rng(0)
    noisy = list(1.0 + 0.3 * rng.random(20))  # median ~1.15, spread 30%
    store_run(tmp_path, "h200", GPU, [bench("slow", 1.5 * float(np.median(noisy)), [1.5 * x for x in noisy]),
                                      bench("fast", float(np.median(noisy)), noisy)])
    row = verdict(ledger.BenchRatio("slow", "fast"), tmp_path, target=1.4)
    assert row["measured_value"] == pytest.approx(1.5) and row["interval"][0] < 1.4 < row["interval"][1]
    assert row["verdict"] == "fail" and row["judged_value"] == row["interval"][0]
    row2 = verdict(ledger.BenchRatio("slow", "fast"), tmp_path, target=1.4)
    assert row2 == row, "the interval is deterministic: re-rendering gives the same row"


def test_a_time_limit_judges_the_slow_end(tmp_path):
    store_run(tmp_path, "h200", GPU, [bench("t", 1.0, [0.9] * 5 + [1.0] * 6 + [1.1] * 9)])  # 95%: [x6, x15]
    assert verdict(ledger.BenchStat("t"), tmp_path, comparison="<=", target=1.05)["verdict"] == "fail"
    assert verdict(ledger.BenchStat("t"), tmp_path, comparison="<=", target=1.25)["verdict"] == "pass"


def test_a_rate_just_over_its_target_on_noise_fails(tmp_path):
    rounds = [0.99] * 5 + [1.0] * 6 + [1.02] * 9  # median 1.0, x15 = 1.02: the rate's slow end is 2% below its point
    store_run(tmp_path, "h200", GPU, [bench("k", 1.0, rounds, pct_peak_bw=80.04)])
    row = verdict(ledger.ExtraInfo("k", "pct_peak_bw"), tmp_path, target=80.0)
    assert row["measured_value"] == 80.04 and row["verdict"] == "fail" and row["judged_value"] < 80.0


def test_runs_stored_without_rounds_use_their_summary(tmp_path):
    entry = {"name": "old", "fullname": "old", "extra_info": {},
             "stats": {"median": 1.0, "min": 0.5, "max": 3.0, "q1": 0.95, "q3": 1.05, "rounds": 20}}
    store_run(tmp_path, "h200", GPU, [entry])
    row = verdict(ledger.BenchStat("old"), tmp_path, comparison="<=", target=1.1)
    assert row["interval"] == [0.95, 1.05] and row["verdict"] == "pass" and "quartiles" in row["source"]


def test_result_interval_judges_the_end_the_comparison_needs(tmp_path):
    store_result(tmp_path, "h200", "examples", "r", {"gap": {"diff": 0.02, "lo": -0.01, "hi": 0.05}})
    m = ledger.ResultInterval("examples", "r", "gap.diff", lo="gap.lo", hi="gap.hi")
    assert verdict(m, tmp_path, comparison=">", target=0.0)["verdict"] == "fail"
    assert verdict(m, tmp_path, comparison="<=", target=0.04)["verdict"] == "fail"
    assert verdict(m, tmp_path, comparison="<=", target=0.06)["verdict"] == "pass"
    assert verdict(m, tmp_path, comparison=">", target=-0.02)["verdict"] == "pass"
    store_result(tmp_path, "h200", "examples", "r", {"gap": {"diff": 0.2, "lo": -0.01, "hi": 0.05}})
    assert "outside its interval" in verdict(m, tmp_path, comparison=">", target=0.0)["reason"]


def test_a_best_of_many_figure_passes_only_when_remeasured_in_a_fresh_run(tmp_path):
    m = ledger.Reselected(ledger.ResultValue("examples", "r", "best.gain"), marker="best")
    store_result(tmp_path, "h200", "examples", "r", {"best": {"gain": 9.0}}, run_id="run-b")
    assert "re-measured in a fresh run" in verdict(m, tmp_path, target=8.0)["reason"]
    store_result(tmp_path, "h200", "examples", "r", {"best": {"gain": 9.0, "selected_in_run": "run-b",
                                                               "verdict_run": "run-b"}}, run_id="run-b")
    assert "same run" in verdict(m, tmp_path, target=8.0)["reason"]
    store_result(tmp_path, "h200", "examples", "r", {"best": {"gain": 9.0, "selected_in_run": "run-a",
                                                               "verdict_run": "run-c"}}, run_id="run-b")
    assert "not the run that wrote" in verdict(m, tmp_path, target=8.0)["reason"]
    store_result(tmp_path, "h200", "examples", "r", {"best": {"gain": 9.0, "selected_in_run": "run-a",
                                                               "verdict_run": "run-b"}}, run_id="run-b")
    assert verdict(m, tmp_path, target=8.0)["verdict"] == "pass"


# ---- peaks ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pct,culprit", [(100.2, "calibration is the likelier culprit"),
                                         (130.0, "byte count is the likelier culprit")])
def test_a_figure_above_its_peak_is_not_a_measurement(tmp_path, pct, culprit):
    store_run(tmp_path, "h200", GPU, [bench("k", 1e-3, pct_peak_bw=pct, gbps=4260 * pct / 100)])
    (tmp_path / "h200" / "calibration.json").write_text(json.dumps({"peaks": {"copy_gbps": 4260.0}}))
    row = verdict(ledger.ExtraInfo("k", "pct_peak_bw"), tmp_path, target=80)
    assert row["verdict"] == "not measured" and "above 100%" in row["reason"] and culprit in row["reason"]


def test_over_peak_message_names_the_culprit():
    from impl.common.benchkit import derived_metrics, over_peak_message

    peaks = {"copy_gbps": 4000.0, "bw_peak_gbps": 4200.0, "bw_kernels": {"copy_1gib": 4100.0, "read_sum_1gib": 4200.0},
             "bf16_peak_tflops": 800.0}
    ok = derived_metrics(1e-3, 4_000_000_000, 0, peaks)
    assert ok["pct_peak_bw"] == pytest.approx(100 * 4000 / 4200) and over_peak_message(ok, peaks) is None
    slightly = derived_metrics(1e-3, 4_300_000_000, 0, peaks)
    assert "calibration is the likelier culprit" in over_peak_message(slightly, peaks)
    far = derived_metrics(1e-3, 6_000_000_000, 0, peaks, traffic_bytes=9_000_000_000)
    msg = over_peak_message(far, peaks)
    assert "byte count is the likelier culprit" in msg and "read_sum_1gib 4200" in msg
    assert far["traffic_gbps"] == pytest.approx(9000.0)
    flops = derived_metrics(1e-3, 0, 10**12, peaks)  # 1000 TFLOP/s against an 800 peak
    assert "FLOP count" in over_peak_message(flops, peaks)


def test_device_bench_stores_rounds_and_traffic_and_fails_above_the_peak(request, monkeypatch):
    import conftest

    benchmark = request.getfixturevalue("benchmark")
    monkeypatch.setattr(benchmark, "disabled", False)  # time on the host clock here, as a GPU run would store
    monkeypatch.setattr(conftest, "_PEAKS", {"bw_peak_gbps": 1e-6})
    monkeypatch.setattr(conftest.backend, "ON_GPU", False)
    run = request.getfixturevalue("device_bench")
    request.addfinalizer(lambda: setattr(benchmark, "has_error", True))  # a probe of the fixture: never stored
    with pytest.raises(pytest.fail.Exception, match="likelier culprit"):
        run(lambda: sum(range(100)), bytes_moved=1000, traffic_bytes=3000, rounds=7, warmup=1)
    x = benchmark.extra_info
    assert len(x["rounds_s"]) == 7 and x["traffic_bytes"] == 3000 and x["traffic_gbps"] > x["gbps"] > 0
    assert "over_peak" in x and x["pct_peak_bw"] > 100


# ---- systems ---------------------------------------------------------------------------------------------------

def test_one_list_of_systems(monkeypatch):
    assert "serve" in ledger.SYSTEMS and ledger.discover_systems() == ledger.SYSTEMS
    monkeypatch.setattr(ledger, "SYSTEMS", tuple(s for s in ledger.SYSTEMS if s != "serve"))
    with pytest.raises(RuntimeError, match="serve"):
        ledger.discover_systems()


def test_history_banner_on_cards_no_longer_lent(tmp_path):
    for slug in ("h100-80gb-hbm3", results.CURRENT_CARD):
        store_run(tmp_path, slug, "NVIDIA H100 80GB HBM3" if slug != "h200" else GPU, [bench("a", 1.0)])
        report.render(slug, root=tmp_path)
    assert "History: this card is no longer lent" in (tmp_path / "h100-80gb-hbm3" / "REPORT.md").read_text()
    assert "History" not in (tmp_path / results.CURRENT_CARD / "REPORT.md").read_text()


# ---- kvstitch rescore ------------------------------------------------------------------------------------------

def test_rescore_keeps_the_run_commit_and_records_its_own(tmp_path, monkeypatch):
    from impl.kvstitch import rescore

    store_result(tmp_path, "h200", "kvstitch", "rouge_smollm2", {
        "references": {"news": ["a b"]}, "prefill": {"scores": {"news": {"generations": ["a b"]}}}, "decodes": [],
        "interpolation": 1.0}, commit="110319a", run_id="gpu-run")
    monkeypatch.setattr(rescore, "rouge_available", lambda: True)
    monkeypatch.setattr(rescore, "rouge", lambda gens, refs: {"rougeL": 0.5})
    monkeypatch.setattr(rescore, "summarise", lambda d: d)
    monkeypatch.setattr(results, "git_commit", lambda short=True: HEAD[:12])
    assert rescore.rescore("h200", root=tmp_path) == 0
    rec = json.loads((tmp_path / "h200" / "kvstitch" / "rouge_smollm2.json").read_text())
    assert rec["commit"] == "110319a" and rec["run_id"] == "gpu-run"
    assert rec["rescored"]["commit"] == HEAD[:12] and rec["rescored"]["of_commit"] == "110319a"
    row = verdict(ledger.ResultValue("kvstitch", "rouge_smollm2", "interpolation"), tmp_path)
    assert row["verdict"] == "pass" and f"rescored at {HEAD[:12]}" in row["commit"]
    rec["rescored"]["commit"] += "+dirty"
    (tmp_path / "h200" / "kvstitch" / "rouge_smollm2.json").write_text(json.dumps(rec))
    row = verdict(ledger.ResultValue("kvstitch", "rouge_smollm2", "interpolation"), tmp_path)
    assert row["verdict"] == "not measured" and "rescoring commit" in row["reason"]
    monkeypatch.setattr(results, "git_commit", lambda short=True: HEAD[:12] + "+dirty")
    with pytest.raises(rescore.RescoreRefused, match="committed code"):
        rescore.rescore("h200", root=tmp_path)


# ---- stats ---------------------------------------------------------------------------------------------------

def test_median_interval_covers_the_median_at_its_level():
    rng = np.random.default_rng(1)
    for n, level in ((20, 0.95), (20, 0.975), (9, 0.95), (40, 0.95)):
        hits = sum(iv.lo <= np.log(2) <= iv.hi for iv in (median_interval(rng.exponential(size=n), level)
                                                           for _ in range(3000)))
        k_cov = median_interval(rng.exponential(size=n), level).coverage
        assert k_cov >= level and hits / 3000 >= level - 0.015, (n, level, hits / 3000, k_cov)


def test_ratio_interval_holds_the_ratio_of_medians():
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(2000):
        a, b = rng.exponential(size=20) * 3, rng.exponential(size=20)
        iv = ratio_interval(a, b)
        hits += iv.lo <= 3.0 <= iv.hi
    assert hits / 2000 >= 0.95
    with pytest.raises(ValueError, match="positive"):
        ratio_interval([1.0] * 5, [0.0] * 5)


@given(n=st.integers(2, 200), level=st.sampled_from([0.95, 0.975]), seed=st.integers(0, 2**31))
def test_summary_interval_contains_the_order_statistic_interval(n, level, seed):
    """The fallback for old records: [q1, q3] only where it certainly contains the exact interval."""
    from pytest_benchmark.stats import Stats

    xs = list(np.random.default_rng(seed).exponential(size=n))
    s = Stats()
    for x in xs:
        s.update(x)
    exact = median_interval(xs, level)
    fallback = summary_interval(s.median, n, s.q1, s.q3, s.min, s.max, level)
    assert fallback.lo <= exact.lo and fallback.hi >= exact.hi
    assert quartile_top_rank(n) >= 1


def test_paired_bootstrap_is_deterministic_and_sees_a_shift():
    rng = np.random.default_rng(3)
    a = rng.random(200)
    same = paired_bootstrap(a, a)
    assert same["lo"] == same["hi"] == same["diff"] == 0
    up = paired_bootstrap(a, a + 0.05 + 0.02 * rng.standard_normal(200), n=1000, seed=7)
    assert 0 < up["lo"] < 0.05 < up["hi"]
    again = paired_bootstrap(a, a + 0.05, n=500, seed=1)
    assert again == paired_bootstrap(a, a + 0.05, n=500, seed=1)
    strata = paired_bootstrap([a[:50], a[50:]], [a[:50] + 0.1, a[50:] + 0.1], stat="median")
    assert strata["diff"] == pytest.approx(0.1) and strata["n"] == 200
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="stat"):
        paired_bootstrap([0.1], [0.2], stat="mode")


MiB = 1 << 20
SIZED_PEAKS = {"bw_peak_gbps": 3322.0, "copy_gbps": 3046.0,
               "bw_kernels": {"copy_1gib": 3054.0, "read_sum_1gib": 3103.0, "triad_3x256mib": 3144.0,
                              "triad_3x64mib": 3250.0, "triad_3x32mib": 3322.0},
               "bw_kernel_bytes": {"copy_1gib": 2048 * MiB, "read_sum_1gib": 1024 * MiB, "triad_3x256mib": 768 * MiB,
                                   "triad_3x64mib": 192 * MiB, "triad_3x32mib": 96 * MiB}}  # an H100's, 91fde28


@pytest.mark.parametrize("nbytes, peak", [(0, 3322.0), (50 * MiB, 3322.0), (96 * MiB, 3322.0), (192 * MiB, 3322.0),
                                          (193 * MiB, 3250.0), (350 * MiB, 3250.0), (385 * MiB, 3144.0),
                                          (1536 * MiB, 3144.0), (1537 * MiB, 3103.0), (4096 * MiB, 3054.0),
                                          (5000 * MiB, 3054.0)])
def test_a_bench_is_held_against_the_fastest_kernel_of_at_least_half_its_bytes(nbytes, peak):
    """A much smaller calibration kernel keeps more of its traffic in L2: it bounds benches up to twice its size,
    never a larger one; beyond every kernel's reach the largest bounds it; without sizes, the fastest of all."""
    from impl.common.benchkit import bandwidth_peak, derived_metrics

    assert bandwidth_peak(SIZED_PEAKS, nbytes) == peak
    unsized = {k: v for k, v in SIZED_PEAKS.items() if k != "bw_kernel_bytes"}
    assert bandwidth_peak(unsized, nbytes) == 3322.0
    if nbytes:
        m = derived_metrics(1e-3, nbytes, 0, SIZED_PEAKS)
        assert m["peak_bw_gbps"] == peak and m["pct_peak_bw"] == pytest.approx(100 * nbytes / 1e6 / peak)


def test_stored_h100_kernels_stay_under_their_size_peak():
    """The figures that set the rule: on an H100 (91fde28) the 352 MB channel requantize moved 3182 GB/s, above the
    768 MiB triad (3144) and below the 192 MiB one (3250); held against kernels of at least half its bytes it reads
    97.9%, not over its peak."""
    from impl.common.benchkit import derived_metrics, over_peak_message

    nbytes = 28672 * 4096 * 3
    m = derived_metrics(nbytes / 3182e9, nbytes, 0, SIZED_PEAKS)
    assert m["peak_bw_gbps"] == 3250.0 and m["pct_peak_bw"] == pytest.approx(97.9, abs=0.05)
    assert over_peak_message(m, SIZED_PEAKS, nbytes=nbytes) is None


def test_a_large_kernel_can_still_fail_against_its_own_size_peak():
    """The size-matched peak is no free pass: a 350 MiB kernel at 90% of the 3 x 64 MiB triad fails a 92% target,
    and one above that triad is over its peak, with the kernels it was matched against named."""
    from impl.common.benchkit import derived_metrics, over_peak_message

    nbytes = 350 * MiB
    slow = derived_metrics(nbytes / (0.90 * 3250.0e9), nbytes, 0, SIZED_PEAKS)
    assert slow["pct_peak_bw"] == pytest.approx(90.0) and slow["pct_peak_bw"] < 92.0
    fast = derived_metrics(nbytes / (1.02 * 3250.0e9), nbytes, 0, SIZED_PEAKS)
    msg = over_peak_message(fast, SIZED_PEAKS, nbytes=nbytes)
    assert msg and "those moving at least half its 367 MB" in msg and "triad_3x64mib 3250" in msg
    assert "triad_3x32mib" not in msg, "a kernel under half its bytes is not what it is held against"


def test_calibration_peaks_are_the_best_of_their_kernels():
    """The calibration's code path at tiny sizes on this machine's device (its figures mean nothing here): the
    bandwidth peak is the best kernel, the GEMM peak the best shape, and derived metrics hold benches against them."""
    from impl.common import calibrate
    from impl.common.benchkit import bandwidth_peak, derived_metrics, flops_peak

    p = calibrate.measure_peaks(calibrate.TINY)
    assert set(p["bw_kernels"]) == {"copy_1gib", "copy_256mib", "read_sum_1gib", "triad_3x256mib", "triad_3x128mib",
                                    "triad_3x64mib", "triad_3x32mib", "triad_3x16mib"}
    sizes = sorted(calibrate.bandwidth_kernel_bytes().values())
    assert all(b <= 2 * a for a, b in zip(sizes, sizes[1:])), "a kernel within [B / 2, B] for every bench size B"
    assert p["bw_peak_gbps"] == max(p["bw_kernels"].values()) > 0
    assert p["bf16_peak_tflops"] == max(p["bf16_gemm_shapes"].values()) > 0
    assert {k.rsplit("-", 1)[1] for k in p["bf16_gemm_shapes"]} == {"nn", "nt"}, "both operand layouts are timed"
    products = []
    for lay in ("nn", "nt"):
        torch.manual_seed(0)
        products.append(calibrate._gemm_fn("bf16", 8, 16, 32, layout=lay)())
    assert torch.equal(*products), "the two layouts multiply the same matrices"
    with pytest.raises(ValueError, match="layout"):
        calibrate._gemm_fn("bf16", 8, 16, 32, layout="tt")
    assert p["bw_kernel_bytes"] == calibrate.bandwidth_kernel_bytes(calibrate.TINY)
    assert set(p["bw_kernel_bytes"]) == set(p["bw_kernels"])
    assert bandwidth_peak(p) == p["bw_peak_gbps"] and flops_peak(p, "bf16") == p["bf16_peak_tflops"]
    assert bandwidth_peak(p, 1) == p["bw_peak_gbps"], "every kernel moves at least one byte"
    assert bandwidth_peak({"copy_gbps": 3000.0}) == 3000.0 and flops_peak({"bf16_tflops": 700.0}, "bf16") == 700.0
    smallest = min(p["bw_kernel_bytes"].values())
    m = derived_metrics(1.0, smallest, 0, p)
    assert m["pct_peak_bw"] == pytest.approx(100 * smallest / 1e9 / p["bw_peak_gbps"])
    assert m["peak_bw_gbps"] == p["bw_peak_gbps"]
    if not results.backend.ON_GPU:
        assert calibrate.calibrate() == {}


def test_beside_appends_its_note_to_a_measured_source_only():
    """``Beside`` keeps the measure's value, verdict inputs and provenance, adds the note to its source, and passes
    a not-measured result through untouched (no note about a figure that does not exist)."""
    measured = ledger.Measured(value=3.0, device="card", commit="abc", date="2026-12-05", source="bench x")

    class Fixed:
        def __init__(self, out):
            self.out = out

        def __call__(self, view):
            return self.out

        def describe(self):
            return "a fixed figure"

    b = ledger.Beside(Fixed(measured), lambda view: "; the ceiling: 4", "its ceiling")
    got = b(None)
    assert (got.value, got.commit, got.source) == (3.0, "abc", "bench x; the ceiling: 4")
    assert b.describe() == "a fixed figure, beside its ceiling"
    missing = ledger.NotMeasured("no record")
    assert ledger.Beside(Fixed(missing), lambda view: "never", "x")(None) is missing
