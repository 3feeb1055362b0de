"""serve's claims: each passes on a clean set of stored results and fails on its own failing case; the attention
claims say why they are not measured; the plots draw from stored records."""
import json

import pytest

from impl.common.ledger import ResultsView, clean_commit, evaluate
from impl.serve import claims, plots

CARD_PATTERN = ("H100", "H200", "A100", "L40S", "B200")


def view_of(tmp_path, results: dict[str, dict], device: str = "NVIDIA H200") -> ResultsView:
    for key, data in results.items():
        system, name = key.split("/")
        path = tmp_path / "card" / system / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": device, "commit": clean_commit(), "date": "2026-12-01",
                                    "data": data}))
    return ResultsView("card", root=tmp_path)


def test_every_claim_passes_on_the_baseline_and_fails_on_its_case(tmp_path):
    ids = [c.id for c in claims.CLAIMS]
    cases = claims.failing_results()
    assert sorted(cases) == sorted(ids), "one failing case per claim"
    base = view_of(tmp_path / "base", claims.passing_results())
    for c in claims.CLAIMS:
        assert evaluate(c, base)["verdict"] == "pass", c.id
        row = evaluate(c, view_of(tmp_path / c.id, {**claims.passing_results(), **cases[c.id]}))
        assert row["verdict"] == "fail", (c.id, row)
        assert not any(card in c.statement for card in CARD_PATTERN), c.id


def test_attention_claims_say_why_flashinfer_was_not_measured(tmp_path):
    row = evaluate(claims.CLAIMS[-1], view_of(tmp_path / "none", {}))
    assert row["verdict"] == "not measured" and "flashinfer_setup plan" in row["reason"]
    failed = {"flashinfer_status": "not measured",
              "flashinfer_reason": "import flashinfer: ModuleNotFoundError: No module named 'cudnn'"}
    row = evaluate(claims.CLAIMS[-2], view_of(tmp_path / "fail", {f"serve/{claims.ATTENTION}": failed}))
    assert row["verdict"] == "not measured" and "No module named 'cudnn'" in row["reason"]


def test_endpoint_claims_say_what_the_load_test_needs(tmp_path):
    ids = [c for c in claims.CLAIMS if c.id.startswith("serve.endpoint_")]
    assert len(ids) == 3
    for c in ids:
        row = evaluate(c, view_of(tmp_path / c.id, {}))
        assert row["verdict"] == "not measured" and "impl.serve.loadtest" in row["reason"], row


def test_latency_plot_draws_both_modes(tmp_path):
    mode = {"latencies_s": [0.1, 0.2, 0.4], "ttfts_s": [0.01, 0.02, 0.05]}
    data = {**claims.GOOD_ENDPOINT, "model": "smollm2", "config": {"concurrency": 64}, "requests_per_s": 30.0,
            "modes": {"continuous": mode, "one_at_a_time": {k: [3 * x for x in v] for k, v in mode.items()}}}
    view = view_of(tmp_path, {f"serve/{claims.ENDPOINT}": data})
    pngs = plots.plot_latency(view, tmp_path)
    assert len(pngs) == 1 and pngs[0].name == "serve_latency.png" and pngs[0].stat().st_size > 1000
    assert plots.plot_latency(ResultsView("none", root=tmp_path), tmp_path) == []


def test_failing_cases_are_cases_once_the_ledger_has_them():
    if claims.Case is None:
        pytest.skip("impl.common.ledger has no Case yet: FAILING_CASES is built once it does")
    assert sorted(claims.FAILING_CASES) == sorted(c.id for c in claims.CLAIMS)


def test_bw_claim_names_the_linears_read_ceiling_of_the_same_tune_run(tmp_path):
    """serve.bw_pct_b1's source gives the ceiling one kernel per projection cannot pass (the tune run's fastest read of
    each projection's code bytes), only from the tune run whose table the decode record used, and only with all four."""
    claim = next(c for c in claims.CLAIMS if c.id == "serve.bw_pct_b1")
    reads = {"wqkv": 8.0, "wo": 6.0, "w13": 30.0, "w2": 16.0}

    def tune(run: str, names=tuple(reads)) -> dict:
        pairs = [{"projection": p, "m": 1, "candidates": [  # the faster of the two reads is the ceiling
            {"candidate": "read_anchor", "kind": "anchor", "median_us": reads[p] + (1.0 if p != "wo" else 0.0)},
            {"candidate": "stream_anchor", "kind": "anchor", "median_us": reads[p] + (1.0 if p == "wo" else 0.0)}]}
            for p in names]
        return {"run_id": run, "pairs": pairs + [{"projection": "wo", "m": 8, "candidates": []}]}

    decode = {**claims.passing_results()[f"serve/{claims.RESULT}"], "copy_gbps": 4000.0,
              "model_args": {"n_layers": 32}, "fp8": {"linear_weight_bytes": 6.0e9},
              "gemm_table": {"data": {"selected_in_run": "r1"}}}
    row = evaluate(claim, view_of(tmp_path / "same", {f"serve/{claims.RESULT}": decode,
                                                      f"serve/{claims.TUNE}": tune("r1")}))
    # 6e9 B in 32 x 60 us = 1.92 ms -> 3125 GB/s, 78.1% of 4000 GB/s
    assert "read ceiling" in row["source"] and "78.1% of copy" in row["source"] and "1.920 ms" in row["source"], row
    for other in (tune("r2"), tune("r1", ("wqkv", "wo", "w13"))):
        row = evaluate(claim, view_of(tmp_path / f"x{len(other['pairs'])}{other['run_id']}",
                                      {f"serve/{claims.RESULT}": decode, f"serve/{claims.TUNE}": other}))
        assert row["verdict"] == "pass" and "read ceiling" not in row["source"], row
