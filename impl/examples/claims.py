"""The example kernel's claims: they prove the ledger end to end (a memory-bound kernel near the bandwidth peak), and
the regression gate's proof on the card (``.ci/gpu/gate_proof.sh`` → ``results/<gpu>/examples/gate_proof.json``)."""
from impl.common.ledger import Case, Claim, ExtraInfo, ResultValue

AXPY = "test_examples_axpy[67108864]"

CLAIMS = [
    Claim(id="examples.axpy_bandwidth", system="examples",
          statement="Triton axpy on 64M float32 moves its compulsory bytes (read x and y, write out) at >= 80% of "
                    "the card's calibrated bandwidth peak",
          unit="% of bandwidth peak", comparison=">=", target=80.0, measure=ExtraInfo(AXPY, "pct_peak_bw")),
    Claim(id="examples.gate_quiet_on_unchanged", system="examples",
          statement="The regression gate passes three gate runs in a row on unchanged code (each bench against its "
                    "own stored baseline, threshold from its spread, re-run in a fresh process before failing)",
          unit="fraction of 3 unchanged runs passed", comparison=">=", target=1.0,
          measure=ResultValue("examples", "gate_proof", "unchanged_pass_fraction")),
    Claim(id="examples.gate_catches_slowdown", system="examples",
          statement="The regression gate fails when the axpy canary does 25% more work (same answer), after its "
                    "fresh-process re-run",
          unit="caught (1 = yes)", comparison=">=", target=1.0,
          measure=ResultValue("examples", "gate_proof", "slowed_caught")),
]

_PROOF = {"unchanged_runs": 3, "unchanged_passed": 3, "unchanged_pass_fraction": 1.0, "slowed_caught": 1.0,
          "slowed_false_alarms": []}
FAILING_CASES = {
    "examples.axpy_bandwidth": Case(benches={AXPY: {"median": 1e-3, "extra_info": {"pct_peak_bw": 70.0}}}),
    "examples.gate_quiet_on_unchanged": Case(results={"examples/gate_proof": {
        **_PROOF, "unchanged_passed": 2, "unchanged_pass_fraction": 2 / 3}}),
    "examples.gate_catches_slowdown": Case(results={"examples/gate_proof": {**_PROOF, "slowed_caught": 0.0}}),
}
