"""The two-run protocol (selection, then verdict) on the CPU, the gain intervals, the chooser's rule and its
restoring server, the ncu command line and parser, and the claims: gates, failing cases, plots."""
import json
import re

import numpy as np
import pytest

from impl.common.ledger import NotMeasured, ResultsView, clean_commit, evaluate
from impl.common.results import RESULTS
from impl.l2cache import claims, ncu, plots
from impl.l2cache.chooser import Comparison, compare_policies, pick_best, serve_best
from impl.l2cache.control import L2Controller
from impl.l2cache.experiments import main
from impl.l2cache.fake import FakeL2Driver
from impl.l2cache.ncu import dram_drop
from impl.l2cache.nets import ChainConfig, ChainMLP
from impl.l2cache.policies import POLICIES
from impl.l2cache.recipe import SMOKE_SELECT, SelectionUnreadable, make_controller, read_record, select
from impl.l2cache.serving import lab_streams, stream_handles
from impl.l2cache.stats import GainInterval, gain_interval

pytestmark = pytest.mark.l2_state  # every test: the L2 state is checked (and put back) afterwards

GPU = "NVIDIA H200"


# ---- the two runs -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_selects_then_judges_in_a_second_run(tmp_path):
    before = sorted(RESULTS.rglob("l2cache/*"))
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    assert sorted(RESULTS.rglob("l2cache/*")) == before, "the smoke run must write only to --out"
    sel, ver = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("selection", "verdict"))
    s, v = sel["data"], ver["data"]
    assert v["selected_in_run"] == s["run_id"] != v["verdict_run"]
    assert s["restored"] is True and v["restored"] is True and v["selection_restored"] is True
    # every policy was measured somewhere, or dropped with its reason; outputs bit-identical everywhere
    seen = {(r["workload"], r["policy"]): r for r in s["table"]}
    for policy in POLICIES:
        rows = [r for (w, p), r in seen.items() if p == policy]
        assert rows and all(r["excluded"] or r["gain_pct"] is not None or policy == "default" for r in rows)
    assert s["outputs_differ"] == [] and v["outputs_differ"] == []
    for key, pick in (("best", "best"), ("ofa", "ofa_best"), ("prefetch", "prefetch_best")):
        picked, got = s["selection"][pick], v["results"][key]
        assert (got["workload"], got["policy"]) == (picked["workload"], picked["policy"])
        g = got["gain"]
        assert g["lo_pct"] <= g["gain_pct"] <= g["hi_pct"] and g["rounds"] == 2 and got["bit_identical"]
    assert s["selection"]["best"]["sharing"] in ("layers", "subnets")
    assert s["selection"]["prefetch_best"]["policy"].startswith("prefetch_")
    (ch,) = v["chooser"]
    assert ch["served"] == ch["chosen"] and ch["offline_best"] == pick_best(s["comparisons"][ch["workload"]])
    assert len(s["sweep"]["points"]) == 1 and s["sweep"]["points"][0]["gain"] is not None
    # the claims read these very records (here: measured on a CPU, so not measured, and no crash)
    root = tmp_path / "view"
    (root / "cpu" / "l2cache").mkdir(parents=True)
    for n in ("selection", "verdict"):
        (root / "cpu" / "l2cache" / f"{n}.json").write_text((tmp_path / f"{n}.json").read_text())
    view = ResultsView("cpu", root=root)
    rows = {c.id: evaluate(c, view) for c in claims.CLAIMS}
    assert rows["l2cache.best_gain_pct"]["reason"] == "measured on a CPU; a GPU claim needs a GPU measurement"
    assert all(r["verdict"] == "not measured" for r in rows.values())
    import matplotlib

    matplotlib.use("Agg")
    assert [p.name for plot in plots.PLOTS for p in plot(view, tmp_path)] == [
        "l2cache_gain_vs_weights.png", "l2cache_policy_table.png"]


def test_a_wrong_result_stops_the_run_before_anything_is_timed(monkeypatch):
    """Correctness first: when the served chain disagrees with its float64 reference, nothing is measured and the
    record says why (here the reference is made wrong, which the check cannot tell from a wrong kernel)."""
    right = ChainMLP.reference
    monkeypatch.setattr(ChainMLP, "reference", lambda self: right(self) + 1.0)
    sel = select(SMOKE_SELECT, make_controller(True), None, smoke=True)
    assert sel["correctness"]["ok"] is False and "chain under default" in sel["correctness"]["error"]
    assert sel["comparisons"] == {} and sel["sweep"]["points"] == [] and sel["complete"] is False
    assert sel["selection"] == {"best": None, "ofa_best": None, "prefetch_best": None} and sel["restored"]


def test_a_run_stopped_by_sigterm_puts_the_device_back():
    import os
    import signal

    from impl.l2cache.control import AccessWindow
    from impl.l2cache.recipe import Guard

    ctl = L2Controller(FakeL2Driver())
    handles = stream_handles(lab_streams())
    before = ctl.snapshot(handles)
    with pytest.raises(SystemExit):
        with Guard(ctl) as guard:
            ctl.apply(handles, carveout=1 << 20, window=AccessWindow(4096, 1 << 20, 1.0, "persisting"))
            os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends when a run overstays
            pytest.fail("SIGTERM did not stop the run")
    assert guard.restored is True and ctl.snapshot(handles) == before
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_the_verdict_refuses_a_missing_or_broken_selection(tmp_path):
    with pytest.raises(SelectionUnreadable, match="run --select first"):
        read_record(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"data": {"table": []}}')
    with pytest.raises(SelectionUnreadable, match="KeyError"):
        read_record(tmp_path / "bad.json")


# ---- intervals --------------------------------------------------------------------------------------------------

def _rounds(rng, n_rounds, n, scale, drift=0.0):
    return [list(scale * (1 + drift * rng.standard_normal()) * rng.lognormal(0, 0.05, n)) for _ in range(n_rounds)]


def test_gain_of_identical_constant_times_is_exact():
    g = gain_interval([[2.0] * 5] * 3, [[1.5] * 5] * 3)
    assert (g.gain_pct, g.lo_pct, g.hi_pct) == (25.0, 25.0, 25.0) and (g.rounds, g.requests) == (3, 5)


def test_gain_interval_covers_the_true_gain():
    """95% intervals of a true 10% gain (lognormal request noise, rounds that drift) cover it in most trials."""
    covered = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        d = _rounds(rng, 6, 60, 1.0, drift=0.02)
        p = [[0.9 * t for t in r] for r in _rounds(rng, 6, 60, 1.0, drift=0.02)]
        g = gain_interval(d, p, n_boot=400)
        covered += g.lo_pct <= 10.0 <= g.hi_pct
    assert covered >= 25, f"the true gain was inside only {covered}/30 intervals"


def test_round_drift_widens_the_interval():
    """The rounds are resampled too: the same requests, regrouped into rounds that drift, give a wider interval
    than one steady round would."""
    rng = np.random.default_rng(1)
    d, p = _rounds(rng, 6, 50, 1.0, drift=0.05), _rounds(rng, 6, 50, 0.9, drift=0.05)
    drifting = gain_interval(d, p)
    pooled = gain_interval([sum(d, [])], [sum(p, [])])
    assert drifting.hi_pct - drifting.lo_pct > 1.3 * (pooled.hi_pct - pooled.lo_pct)


def test_gain_interval_refuses_bad_rounds():
    with pytest.raises(ValueError, match="same number"):
        gain_interval([[1.0, 2.0], [1.0]], [[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="paired"):
        gain_interval([[1.0]], [[1.0], [1.0]])
    with pytest.raises(ValueError, match="finite"):
        gain_interval([[1.0, float("nan")]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="at least one"):
        gain_interval([], [])


# ---- the chooser --------------------------------------------------------------------------------------------------

def _cmp(lows: dict[str, float], excluded: dict[str, str] | None = None) -> Comparison:
    c = Comparison("w", rounds_ms={"default": [[1.0]], **{p: [[1.0]] for p in lows}},
                   digests={"default": [["a"]], **{p: [["a"]] for p in lows}}, excluded=excluded or {})
    c.gains = {p: GainInterval(lo + 1, lo, lo + 2, 0.95, 1, 1, 1) for p, lo in lows.items()}
    return c


def test_pick_best_takes_the_simplest_policy_that_reaches_the_best_lower_end():
    # _cmp's intervals are [lo, lo + 2]: 3 reaches 5 only with hi 5 -> persist_weights' [3, 5] ties prefetch's [5, 7]
    assert pick_best(_cmp({"persist_weights": 3.0, "prefetch_kernel": 5.0})) == "persist_weights"
    assert pick_best(_cmp({"persist_weights": 2.9, "prefetch_kernel": 5.0})) == "prefetch_kernel"
    assert pick_best(_cmp({"persist_prefetch": 6.0, "prefetch_kernel": 5.0})) == "prefetch_kernel"
    assert pick_best(_cmp({"persist_weights": -0.1, "prefetch_kernel": 0.0})) == "default"
    assert pick_best(_cmp({"persist_weights": 3.0, "prefetch_kernel": 5.0},
                          {"prefetch_kernel": "outputs differ from the default's"})) == "persist_weights"
    c = _cmp({"persist_weights": 3.0, "stream_activations": 4.0})
    c.digests["stream_activations"] = [["b"]]  # changed outputs: never chosen, offline or online
    assert not c.bit_identical("stream_activations") and pick_best(c) == "persist_weights"
    d = c.as_dict()
    assert pick_best(d) == "persist_weights" and pick_best(_cmp({"a": 1.0}).as_dict()) == "a"


class Tampered(ChainMLP):
    """A model whose output changes while a carve-out is set: what a policy that changes outputs looks like."""

    def __init__(self, driver):
        super().__init__(ChainConfig("tampered", 16, 1, own=1, dtype="float32"))
        self.driver = driver

    def forward(self, kind=0, hooks=None):
        from impl.l2cache.policies import NO_HOOKS

        out = super().forward(kind, hooks or NO_HOOKS)
        return out + 1.0 if self.driver.carveout else out


def test_compare_policies_drops_what_cannot_apply_repeats_or_changes_outputs():
    drv = FakeL2Driver()
    ctl = L2Controller(drv)
    cmp = compare_policies(Tampered(drv), ctl, ("persist_weights", "prefetch_kernel", "prefetch_stream",
                                                "persist_prefetch", "stream_activations"),
                           rounds=2, reps=2, warmup=0, runner_kw={"graphs": False})
    ex = cmp.excluded
    assert ex["persist_weights"] == ex["persist_prefetch"] == "outputs differ from the default's"
    assert "prefetch_kernel" not in ex and "prefetch_stream" not in ex
    assert set(cmp.gains) == {"prefetch_kernel", "prefetch_stream", "stream_activations"}
    assert all(len(r) == 2 for r in cmp.rounds_ms.values())
    assert pick_best(cmp) not in ("persist_weights", "persist_prefetch")
    same = compare_policies(ChainMLP(ChainConfig("albert", 16, 2, own=0, dtype="float32")), ctl,
                            ("persist_weights", "persist_prefetch", "prefetch_kernel"), rounds=1, reps=1, warmup=0,
                            runner_kw={"graphs": False})
    assert same.excluded == {"persist_prefetch": "same settings as persist_weights",
                             "prefetch_kernel": "not applicable: nothing to prefetch: every layer reads the same "
                                                "weights (or the persisted ones)"}


class Exploding:
    name = "exploding"
    prefetch = ""

    def plan(self, weights, activations, limits):
        raise RuntimeError("plan failed")


def test_a_failing_candidate_drops_out_and_the_device_is_restored(monkeypatch):
    monkeypatch.setitem(POLICIES, "exploding", Exploding())
    ctl = L2Controller(FakeL2Driver())
    handles = stream_handles(lab_streams())
    before = ctl.snapshot(handles)
    wl = ChainMLP(ChainConfig("c", 16, 1, own=1, dtype="float32"))
    cmp = compare_policies(wl, ctl, ("exploding", "prefetch_kernel"), rounds=1, reps=1, warmup=0,
                           runner_kw={"graphs": False})
    assert cmp.excluded["exploding"] == "failed: RuntimeError: plan failed" and "prefetch_kernel" in cmp.gains
    assert ctl.snapshot(handles) == before


def test_serve_best_restores_the_device_even_on_ctrl_c():
    drv = FakeL2Driver()
    ctl = L2Controller(drv)
    handles = stream_handles(lab_streams())
    before = ctl.snapshot(handles)
    wl = ChainMLP(ChainConfig("c", 16, 1, own=1, dtype="float32"))
    with pytest.raises(KeyboardInterrupt):
        with serve_best(wl, ctl, ("persist_weights",), rounds=1, reps=1, runner_kw={"graphs": False}) as (r, ch):
            assert r.info["policy"] == ch.policy
            r.request()
            raise KeyboardInterrupt
    assert ctl.snapshot(handles) == before


# ---- ncu ----------------------------------------------------------------------------------------------------------

def test_profile_command_keeps_the_cache_and_profiles_whole_graphs(tmp_path):
    cmd = ncu.profile_command(tmp_path / "r", ["--ncu-driver", "spec.json"], ncu="ncu", python="py")
    joined = " ".join(cmd)
    for flag in ("--cache-control none", "--clock-control none", "--graph-profiling graph",
                 "--profile-from-start off", "--metrics " + ",".join(ncu.METRICS)):
        assert flag in joined
    assert cmd[-4:] == ["-m", "impl.l2cache.experiments", "--ncu-driver", "spec.json"]
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


def test_dram_drop_judges_the_worst_pair_of_requests():
    rows = {"default": [{"dram_read_bytes": v, "l2_hit_pct": 10.0} for v in (100.0, 120.0)],
            "persist_weights": [{"dram_read_bytes": v, "l2_hit_pct": 50.0} for v in (60.0, 105.0)]}
    got = dram_drop(rows, "persist_weights")
    assert got["dram_read_drop_pct"] == pytest.approx(100 * (110 - 82.5) / 110)
    assert got["dram_read_drop_lo_pct"] == pytest.approx(100 * (100 - 105) / 110)  # < 0: no drop for sure
    assert (got["default_l2_hit_pct"], got["policy_l2_hit_pct"]) == (10.0, 50.0)


# ---- claims -------------------------------------------------------------------------------------------------------

def _view(tmp_path, results: dict[str, dict], device: str = GPU) -> ResultsView:
    for key, data in results.items():
        system, name = key.split("/")
        d = tmp_path / "h200" / system
        d.mkdir(parents=True, exist_ok=True)
        rec = {"system": system, "name": name, "device": device, "commit": clean_commit(), "date": "2026-12-01",
               "complete": True, "data": data}
        (d / f"{name}.json").write_text(json.dumps(rec))
    return ResultsView("h200", root=tmp_path)


def test_claims_are_not_measured_without_results(tmp_path):
    view = ResultsView("h200", root=tmp_path)
    for c in claims.CLAIMS:
        assert isinstance(c.measure(view), NotMeasured)
        assert evaluate(c, view)["verdict"] == "not measured"
    assert all(plot(view, tmp_path) == [] for plot in plots.PLOTS)


def test_every_claim_passes_on_good_records_and_fails_on_its_failing_case(tmp_path):
    good = _view(tmp_path / "good", {"l2cache/verdict": claims.verdict_data(), "l2cache/ncu": claims.ncu_data()})
    rows = {c.id: evaluate(c, good) for c in claims.CLAIMS}
    assert {i: r["verdict"] for i, r in rows.items()} == {c.id: "pass" for c in claims.CLAIMS}, rows
    assert rows["l2cache.best_gain_pct"]["measured_value"] == 20.0  # the interval's lower end, not the point
    assert set(claims.FAILING_CASES) == {c.id for c in claims.CLAIMS}
    for c in claims.CLAIMS:
        case = claims.FAILING_CASES[c.id]
        view = _view(tmp_path / c.id, case.results)
        assert evaluate(c, view)["verdict"] == "fail", (c.id, evaluate(c, view))


@pytest.mark.parametrize("change,why", [
    ({"bit_identical": False}, "cannot pass"), ({"sharing": "requests"}, "not weight-shared"),
    ({"complete": False}, "did not complete"), ({"gain": None, "skipped": "GPU time budget spent"}, "budget")],
    ids=["outputs-differ", "not-shared", "incomplete", "skipped"])
def test_a_gain_claim_cannot_pass_when_a_gate_fails(tmp_path, change, why):
    data = claims.verdict_data()
    data["results"]["best"].update(change)
    got = claims.CLAIMS[0].measure(_view(tmp_path, {"l2cache/verdict": data}))
    assert isinstance(got, NotMeasured) and why in got.reason


@pytest.mark.parametrize("over,why", [({"verdict_run": "sel-1"}, "must both be named and differ"),
                                      ({"selected_in_run": None}, "must both be named"),
                                      ({"restored": False}, "as it found it")])
def test_a_verdict_that_is_the_selection_or_left_the_device_changed_judges_nothing(tmp_path, over, why):
    view = _view(tmp_path, {"l2cache/verdict": claims.verdict_data(**over), "l2cache/ncu": claims.ncu_data()})
    for c in claims.CLAIMS[:3]:
        got = c.measure(view)
        assert isinstance(got, NotMeasured) and why in got.reason


def test_ncu_from_another_run_is_not_used(tmp_path):
    n = claims.ncu_data()
    n["verdict_run"] = "ver-9"
    got = claims.CLAIMS[3].measure(_view(tmp_path, {"l2cache/verdict": claims.verdict_data(), "l2cache/ncu": n}))
    assert isinstance(got, NotMeasured) and "different runs" in got.reason


def test_statements_name_no_card():
    for c in claims.CLAIMS:
        assert not re.search(r"\b(H100|H200|A100|L40S?|B200|GH200)\b", c.statement), c.id


def _selection() -> dict:
    table = [{"workload": w, "policy": p, "sharing": "layers", "kind": "chain", "weight_bytes": wb, "persist_bytes": wb,
              "median_ms": 0.1, "gain_pct": g, "lo_pct": None if g is None else g - 2,
              "hi_pct": None if g is None else g + 2, "bit_identical": True, "excluded": ex, "prefetch": ""}
             for w, wb in (("hybrid1", 3.5e7), ("mlp_big", 6.6e7))
             for p, g, ex in (("default", None, None), ("persist_weights", 20.0 if wb < 5e7 else 9.0, None),
                              ("prefetch_kernel", 1.0, None), ("persist_prefetch", None, "same settings"))]
    pts = [{"weight_over_carveout": x, "gain": {"gain_pct": g, "lo_pct": g - 1, "hi_pct": g + 1}}
           for x, g in ((0.5, 0.2), (0.9, 1.0), (1.7, 12.0))]
    return {"limits": {"max_persisting_bytes": 39_321_600, "l2_bytes": 62_914_560, "max_window_bytes": 1 << 27},
            "table": table, "sweep": {"points": pts}}


def test_report_table_shows_both_runs(tmp_path):
    sel = {**_selection(), "run_id": "sel-1", "table_md": "| workload |\n|---|\n| hybrid1 |"}
    ver = claims.verdict_data()
    ver["results"]["ofa"] = {"skipped": "GPU time budget spent"}
    view = _view(tmp_path, {"l2cache/selection": sel, "l2cache/verdict": ver, "l2cache/ncu": claims.ncu_data()})
    text = "\n".join(plots.run_tables(view))
    assert "**verdict run** ver-2 of selection run sel-1" in text and "| best | hybrid1 | persist_weights |" in text
    assert "GPU time budget spent" in text and "chose persist_weights, offline best persist_weights (match)" in text
    assert "DRAM read 400.0 -> 200.0 MB" in text and "| hybrid1 |" in text
    assert plots.run_tables(ResultsView("h200", root=tmp_path / "empty")) == []


def test_plots_draw_the_intervals(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    view = _view(tmp_path, {"l2cache/selection": _selection(), "l2cache/verdict": claims.verdict_data()})
    out = tmp_path / "plots"
    out.mkdir()
    made = [p for plot in plots.PLOTS for p in plot(view, out)]
    assert [p.name for p in made] == ["l2cache_gain_vs_weights.png", "l2cache_policy_table.png"]
    assert all(p.stat().st_size > 1000 for p in made)
