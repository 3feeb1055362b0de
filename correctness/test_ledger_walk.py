"""Walk every claim of every system: its bench ids exist among the benches pytest collects at GPU sizes, its module's
FAILING_CASES has an entry on which the claim's verdict is "fail", and its statement names no card (the card is in
the report's device column)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from impl.common import ledger, report
from impl.common.results import ROOT

# Systems whose claims modules do not carry FAILING_CASES and card-free statements yet: their checks are expected
# failures until then. Empty this set (one line) once every system's module has them.
PENDING_SYSTEMS: set[str] = set()

CARD_NAMES = re.compile(r"\b(H100|H200|H800|H20|GH200|GB200|B200|B100|A100|A10G?|A30|A40|L40S?|L4|V100|T4|RTX ?\d{4}"
                        r"|MI\d{3}X?)\b", re.I)
_COLLECT = """
import sys
import impl.backend as backend
backend.sized = lambda gpu, cpu: gpu  # bench ids at the sizes a GPU run stores, without running anything
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "benches"]))
"""

CLAIMS = ledger.load_claims(ledger.discover_systems())
MODULES = dict(ledger.claims_modules(ledger.discover_systems()))


def _pending(claim: ledger.Claim) -> list[pytest.MarkDecorator]:
    if claim.system in PENDING_SYSTEMS:
        return [pytest.mark.xfail(reason=f"{claim.system}'s claims module is pending (PENDING_SYSTEMS)", strict=False)]
    return []


def _params(check: str) -> list:
    return [pytest.param(c, id=c.id, marks=_pending(c) if check != "benches" else []) for c in CLAIMS]


@pytest.fixture(scope="session")
def gpu_bench_ids() -> set[str]:
    out = subprocess.run([sys.executable, "-c", _COLLECT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "LAB_BACKEND": "cpu"})
    ids = {line.split("::", 1)[1] for line in out.stdout.splitlines() if line.startswith("benches/") and "::" in line}
    assert out.returncode == 0 and ids, f"collecting benches failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return ids


def test_walk_covers_every_system():
    assert {c.system for c in CLAIMS} == {s for s, m in MODULES.items() if getattr(m, "CLAIMS", [])}
    assert set(ledger.SYSTEMS) == set(ledger.discover_systems())


@pytest.mark.parametrize("claim", _params("benches"))
def test_claim_bench_ids_exist(claim, gpu_bench_ids):
    missing = [b for b in ledger.referenced_benches(claim.measure) if b not in gpu_bench_ids]
    assert not missing, f"{claim.id} reads bench ids no bench module produces at GPU sizes: {missing}"


@pytest.mark.parametrize("claim", _params("case"))
def test_claim_has_a_failing_case(claim, tmp_path):
    cases = getattr(MODULES[claim.system], "FAILING_CASES", None)
    assert cases is not None, f"impl/{claim.system}/claims.py has no FAILING_CASES"
    assert claim.id in cases, f"FAILING_CASES of {claim.system} has no entry for {claim.id}"
    row = ledger.evaluate(claim, ledger.materialise(cases[claim.id], tmp_path))
    assert row["verdict"] == "fail", f"{claim.id} on its failing case: {row['verdict']} ({row['reason']})"


@pytest.mark.parametrize("claim", _params("card"))
def test_claim_statement_names_no_card(claim):
    found = CARD_NAMES.findall(claim.statement)
    assert not found, f"{claim.id}'s statement names a card ({found}): the card is the report's device column"


@pytest.mark.parametrize("system", sorted(MODULES))
def test_failing_cases_name_only_known_claims(system):
    cases = getattr(MODULES[system], "FAILING_CASES", {})
    ids = {c.id for c in CLAIMS if c.system == system}
    assert set(cases) <= ids, f"FAILING_CASES of {system} names unknown claims: {sorted(set(cases) - ids)}"
    assert all(isinstance(c, ledger.Case) for c in cases.values()), f"FAILING_CASES of {system} must hold Case objects"


def test_card_regex_catches_card_names():
    assert CARD_NAMES.search("takes 0.8 ms on the H100") and CARD_NAMES.search("an L40S") and \
        CARD_NAMES.search("H200 run")
    assert not CARD_NAMES.search("SmolLM2-135M on 2 GPUs, 14336x4096, ResNet50, Gemma-3-270M, the seed's GPU")


@pytest.mark.parametrize("slug", report.slugs_with_results())
def test_stored_reports_are_current_and_read_cleanly(slug):
    """Each committed claims.json is what the ledger gives on the committed results (re-render after changing a claim
    or a rule: `python -m impl report`), and no stored file is unreadable."""
    view = ledger.ResultsView(slug)
    rows = [ledger.evaluate(c, view) for c in CLAIMS]
    stored = json.loads((view.dir / "claims.json").read_text())
    assert not view.unreadable, f"unreadable stored files in results/{slug}/: {view.unreadable}"
    changed = [r["id"] for r, s in zip(rows, stored) if r != s] + [r["id"] for r in rows[len(stored):]]
    assert len(rows) == len(stored) and not changed, \
        f"results/{slug}/claims.json is stale for {changed[:8]}: run `python -m impl report {slug}`"
