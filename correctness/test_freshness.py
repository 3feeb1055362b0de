"""Which stored verdicts predate changes to the code they measured (impl.common.freshness), on a scratch git
repository laid out like this one."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures.git import commit, git
from impl.common import freshness

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed here")


def write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def edit(root: Path, rel: str, text: str, message: str) -> str:
    """One file rewritten and committed."""
    write(root, rel, text)
    return commit(root, message)


def row(system: str, sha: str, verdict: str = "pass", provenance: list[str] | None = None) -> dict:
    return {"id": f"{system}.x", "system": system, "verdict": verdict, "commit": sha[:12],
            "provenance": [{"commit": c[:12]} for c in provenance or []]}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    for rel in ("impl/fp8/quant.py", "impl/fp8/claims.py", "impl/fp8/plots.py", "impl/sort/bitonic.py",
                "impl/common/timing.py", "impl/common/ledger.py", "benches/bench_fp8.py", "conftest.py"):
        write(tmp_path, rel, "x = 1\n")
    write(tmp_path, "impl/serve/engine.py", "from impl.fp8 import quant\n")
    return tmp_path


def stale(repo: Path, rows: list[dict]) -> dict[tuple[str, str], freshness.Staleness]:
    write(repo, "results/h200/claims.json", json.dumps(rows))
    return {(s.system, s.commit): s for s in freshness.of_slug("h200", root=repo, results=repo / "results")}


def test_a_commit_to_a_systems_code_makes_its_verdicts_stale_and_names_the_file(repo):
    a = commit(repo, "measured here")
    edit(repo, "impl/fp8/quant.py", "x = 2\n", "kernel change")
    got = stale(repo, [row("fp8", a), row("sort", a)])
    fp8, sort = got[("fp8", a[:12])], got[("sort", a[:12])]
    assert (fp8.changed, fp8.files, fp8.dirty) == (1, ["impl/fp8/quant.py"], False)
    assert (sort.changed, sort.files) == (0, [])
    assert "1 commit since touch its code (impl/fp8/quant.py)" in freshness.describe(fp8)
    assert "unchanged" in freshness.describe(sort)


def test_a_change_undone_later_leaves_the_verdicts_standing(repo):
    """A commit to the measured code and its revert: commits touched it, but the code is what was measured."""
    a = commit(repo, "measured here")
    edit(repo, "impl/fp8/quant.py", "x = 2\n", "an experiment")
    edit(repo, "impl/fp8/quant.py", "x = 1\n", "the experiment taken back")
    fp8 = stale(repo, [row("fp8", a)])[("fp8", a[:12])]
    assert (fp8.changed, fp8.files, fp8.stale) == (2, [], False)
    assert "its code is unchanged since (2 commits since touched it and left it as measured)" in \
        freshness.describe(fp8)
    write(repo, "impl/fp8/quant.py", "x = 3\n")  # uncommitted: stale again
    assert stale(repo, [row("fp8", a)])[("fp8", a[:12])].stale


def test_a_system_is_stale_through_the_code_it_imports_and_the_shared_harness(repo):
    a = commit(repo, "measured here")
    edit(repo, "impl/fp8/quant.py", "x = 2\n", "fp8 change")
    edit(repo, "impl/common/timing.py", "x = 2\n", "timer change")
    got = stale(repo, [row("serve", a), row("sort", a)])
    assert got[("serve", a[:12])].changed == 2 and got[("sort", a[:12])].changed == 1
    assert "impl/fp8" in freshness.code_paths("serve", repo) and "impl/fp8" not in freshness.code_paths("sort", repo)


def test_report_side_files_do_not_make_a_verdict_stale(repo):
    a = commit(repo, "measured here")
    for rel in ("impl/fp8/claims.py", "impl/fp8/plots.py", "impl/common/ledger.py"):
        write(repo, rel, "x = 2\n")
    commit(repo, "a claim's wording, a plot, the ledger")
    got = stale(repo, [row("fp8", a)])
    assert got[("fp8", a[:12])].changed == 0


def test_uncommitted_edits_are_said(repo):
    a = commit(repo, "measured here")
    write(repo, "impl/fp8/quant.py", "x = 3\n")
    s = stale(repo, [row("fp8", a)])[("fp8", a[:12])]
    assert s.changed == 0 and s.dirty and "uncommitted" in freshness.describe(s)


def test_every_run_of_a_claim_counts_and_unmeasured_rows_are_skipped(repo):
    a = commit(repo, "first run")
    write(repo, "impl/fp8/quant.py", "x = 2\n")
    b = commit(repo, "second run")
    got = stale(repo, [row("fp8", b, provenance=[a, b]), row("sort", a, verdict="not measured")])
    assert set(got) == {("fp8", a[:12]), ("fp8", b[:12])}
    assert got[("fp8", a[:12])].changed == 1 and got[("fp8", b[:12])].changed == 0


def test_a_commit_missing_from_history_is_unknown_not_fresh(repo):
    commit(repo, "the only commit")
    s = stale(repo, [row("fp8", "0123456789ab" * 3)])[("fp8", "0123456789ab")]
    assert s.changed is None and "not in this checkout's history" in s.why
    assert "unknown whether its code changed" in freshness.describe(s)


def test_outside_a_git_checkout_every_group_is_unknown(tmp_path):
    write(tmp_path, "impl/fp8/quant.py", "x = 1\n")
    s = stale(tmp_path, [row("fp8", "0123456789ab")])[("fp8", "0123456789ab")]
    assert s.changed is None and s.why


def test_no_stored_claims_gives_nothing(tmp_path):
    assert freshness.of_slug("h200", root=tmp_path, results=tmp_path / "results") == []


def test_the_stale_command_prints_one_line_per_group(monkeypatch, capsys):
    from impl import __main__ as cli

    groups = [freshness.Staleness("fp8", "69a2474c6f82", 50, changed=3, files=["impl/fp8/quant.py"]),
              freshness.Staleness("sort", "fe3a9dd6188f", 10, changed=0)]
    monkeypatch.setattr(freshness, "of_slug", lambda slug: groups)
    assert cli.main(["stale", "h200"]) == 0
    out = capsys.readouterr().out
    assert "h200: 1 of 2 (system, commit) groups" in out
    assert "fp8: 50 claims measured at 69a2474c6f82: 3 commits since touch its code (impl/fp8/quant.py)" in out
    assert "sort: 10 claims measured at fe3a9dd6188f: its code is unchanged since" in out
