"""The regression gate (``python -m impl gate``): every bench of the chosen systems against its own baseline, with a
threshold set by that bench's measured spread, and a re-run in a fresh process before anything fails.

* Baseline of a bench: its entry in the newest stored run of this card (``results/<slug>/``, runs ordered by their
  recorded date) that contains it and comes from a clean commit of this repository. Each system is thus compared
  with its own latest run, not with whichever file happens to be newest.
* Threshold of a bench: ``t = max(10%, 3 × IQR / median, p90 / median − 1)`` of its baseline rounds (the stored
  per-round times, or the stored IQR for runs without them). A bench whose rounds scatter widely gets a wider band,
  and so does one with a heavy tail: the tensor-core many-to-many join's rounds reach 1.45x their median (p90) in
  one process, and its median moved 722 -> 891 µs between two fresh processes of unchanged code.
* A bench regresses when its median in the gate's run exceeds ``(1 + t) ×`` the baseline median. Run-to-run noise
  of one process can exceed ``t`` (the 1M hash join read 147, 187 and 150 µs in three fresh processes; on another
  H200 the hash zipf join read 453 and 424 µs against a baseline of 369), so a bench that exceeds it is run again in
  a fresh process, up to ``RERUNS`` times, until one run is within it; the gate fails only on benches over it every
  time. A re-run that does not produce a bench (stopped by the budget) makes the gate incomplete, not a verdict.
* Benches without a baseline are listed as new; baseline benches the run did not produce (skipped, deselected) as
  not run. Neither fails the gate.

Self-test (``--slow-check``; ``.ci/gpu/gate_proof.sh`` runs ``proof``): the example axpy bench does 25% more work
(``LAB_GATE_SLOW_CANARY``, same answer), and the gate must catch it; three gate runs on unchanged code must pass.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from impl.common.ledger import ResultsView, bench_rounds, commit_problem
from impl.common.results import RESULTS, ROOT

MIN_THRESHOLD = 0.10
IQR_FACTOR = 3.0
TAIL_MIN_ROUNDS = 10
RERUNS = 2  # fresh-process re-runs of a bench over its threshold; it regresses only if every one is over too
CANARY_ENV = "LAB_GATE_SLOW_CANARY"
CANARY_EXTRA = 0.25
CANARY_BENCH = "test_examples_axpy"

Runner = Callable[[list[str], "str | None", dict[str, str], float], dict[str, dict[str, Any]]]


@dataclass
class Row:
    """One bench's comparison: medians in seconds, ``ratio`` = candidate / baseline, ``status`` one of ok, regressed,
    noise (over the threshold once, not on the fresh re-run), new, not run."""

    name: str
    status: str
    threshold: float | None = None
    base_median: float | None = None
    first_median: float | None = None
    rerun_median: float | None = None
    base_file: str | None = None

    @property
    def ratio(self) -> float | None:
        cand = self.rerun_median if self.rerun_median is not None else self.first_median
        return cand / self.base_median if cand is not None and self.base_median else None


@dataclass
class GateResult:
    rows: list[Row] = field(default_factory=list)
    complete: bool = True
    note: str = ""

    @property
    def regressed(self) -> list[str]:
        return [r.name for r in self.rows if r.status == "regressed"]

    @property
    def rc(self) -> int:
        return 1 if self.regressed or not self.complete else 0

    def as_dict(self) -> dict[str, Any]:
        return {"rc": self.rc, "complete": self.complete, "note": self.note, "regressed": self.regressed,
                "counts": {s: sum(r.status == s for r in self.rows) for s in ("ok", "regressed", "noise", "new",
                                                                               "not run")},
                "rows": [{**asdict(r), "ratio": r.ratio} for r in self.rows]}


def threshold(entry: dict[str, Any]) -> float:
    """``max(10%, 3 × IQR / median, p90 / median − 1)`` of a stored bench (its rounds where stored; the p90 term
    needs ``TAIL_MIN_ROUNDS`` of them)."""
    rounds = bench_rounds(entry)
    tail = 0.0
    if rounds and len(rounds) >= 4:
        import statistics

        q = statistics.quantiles(rounds, n=4)
        iqr, med = q[2] - q[0], statistics.median(rounds)
        if len(rounds) >= TAIL_MIN_ROUNDS and med > 0:
            tail = statistics.quantiles(rounds, n=10)[8] / med - 1
    else:
        iqr, med = float(entry["stats"].get("iqr") or 0.0), float(entry["stats"]["median"])
    return max(MIN_THRESHOLD, IQR_FACTOR * iqr / med, tail) if med > 0 else MIN_THRESHOLD


def refused_runs(view: ResultsView) -> dict[str, str]:
    """Stored runs that cannot be a baseline, and why (uncommitted or unknown code)."""
    return {run["file"]: f"commit {run['commit']!r} {why}" for run in view.runs
            if (why := commit_problem(run["commit"]))}


def baselines(view: ResultsView) -> dict[str, dict[str, Any]]:
    """fullname -> that bench's entry in the newest clean stored run of the card that contains it."""
    out: dict[str, dict[str, Any]] = {}
    refused = refused_runs(view)
    for run in view.runs:  # oldest first
        if run["file"] in refused:
            continue
        for entry in run["benches"].values():
            if not (entry.get("extra_info") or {}).get("slow_canary"):
                out[entry.get("fullname", entry["name"])] = entry
    return out


def over(base: dict[str, Any], median: float, t: float) -> bool:
    return median > (1 + t) * float(base["stats"]["median"])


def compare(base: dict[str, dict[str, Any]], first: dict[str, dict[str, Any]],
            rerun: dict[str, dict[str, Any]] | None = None) -> list[Row]:
    """Rows for every bench in ``base`` or ``first``; ``rerun`` holds the fastest fresh-process re-run of each bench
    that was over its threshold in ``first`` (absent from it: no re-run produced it, so it stays regressed)."""
    rows = []
    for name in sorted(set(base) | set(first)):
        b, c = base.get(name), first.get(name)
        if b is None:
            rows.append(Row(name, "new", first_median=c["stats"]["median"]))
            continue
        t = threshold(b)
        row = Row(name, "not run", t, b["stats"]["median"], base_file=b["_meta"]["file"])
        if c is not None:
            row.first_median = c["stats"]["median"]
            row.status = "ok"
            if over(b, row.first_median, t):
                again = (rerun or {}).get(name)
                row.rerun_median = again["stats"]["median"] if again else None
                row.status = "noise" if again is not None and not over(b, row.rerun_median, t) else "regressed"
        rows.append(row)
    return rows


def bench_targets(systems: list[str]) -> list[str]:
    found = [str(p.relative_to(ROOT)) for s in systems for p in sorted(ROOT.glob(f"benches/bench_{s}.py"))]
    missing = [s for s in systems if not (ROOT / "benches" / f"bench_{s}.py").exists()]
    if missing:
        raise SystemExit(f"no benches/bench_<system>.py for {missing}")
    return found


def run_bounded(cmd: list[str], env: dict[str, str], timeout_s: float) -> int | None:
    """Run ``cmd`` in its own process group from the repository root; kill the group after ``timeout_s`` (then
    None): the gate never hangs on a bench."""
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"gate: stopped after {timeout_s:.0f} s (budget): {' '.join(cmd[:6])} ...", flush=True)
        return None


def run_pytest_benches(targets: list[str], k: str | None, env: dict[str, str], timeout_s: float) -> dict[str, dict]:
    """Run ``targets`` (bench files or node ids) in a fresh pytest process, nothing stored; fullname -> entry."""
    with tempfile.TemporaryDirectory(prefix="gate_") as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "--benchmark-only",
               "--benchmark-enable", f"--benchmark-json={out}", "--benchmark-columns=median,iqr,rounds",
               *(["-k", k] if k else [])]
        run_bounded(cmd, env, timeout_s)
        try:
            run = json.loads(out.read_text())
        except (OSError, ValueError):  # no file, or one pytest-benchmark opened but never filled (run stopped)
            return {}
    meta = {"file": "(this gate run)", "commit": (run.get("commit_info") or {}).get("id", "unknown"),
            "date": run.get("datetime", ""), "device": (run.get("machine_info") or {}).get("gpu") or "cpu"}
    return {b["fullname"]: {**b, "_meta": meta} for b in run.get("benchmarks", []) if b.get("stats")}


def gate(systems: list[str], *, slug: str, k: str | None = None, root: Path = RESULTS,
         env: dict[str, str] | None = None, budget_s: float = 1800.0,
         runner: Runner = run_pytest_benches) -> GateResult:
    """Run the benches of ``systems`` once, re-run the ones over their threshold in a fresh process, and compare."""
    t0 = time.monotonic()
    view = ResultsView(slug, root)
    base = baselines(view)
    if not base:
        refused = "".join(f"; {f}: {why}" for f, why in refused_runs(view).items())
        return GateResult(complete=False, note=f"no clean stored run in results/{slug}/ to gate against{refused}")
    env = env or {}
    first = runner(bench_targets(systems), k, env, budget_s)

    def still_over(name: str, found: dict[str, dict[str, Any]]) -> bool:
        return over(base[name], found[name]["stats"]["median"], threshold(base[name]))

    suspects = [n for n in first if n in base and still_over(n, first)]
    rerun: dict[str, dict[str, Any]] = {}  # each suspect's fastest re-run
    result = GateResult()
    for attempt in range(RERUNS):
        left = budget_s - (time.monotonic() - t0)
        if not suspects:
            break
        if left <= 5:
            result.complete, result.note = False, "no time left to re-run the benches over their threshold"
            break
        print(f"gate: {len(suspects)} bench(es) over their threshold; re-running them in a fresh process "
              f"({attempt + 1} of at most {RERUNS})", flush=True)
        again = runner(suspects, None, env, left)
        missing = [n for n in suspects if n not in again]
        if missing:
            result.complete = False
            result.note = f"the re-run did not produce {len(missing)} bench(es) (stopped by the budget?): {missing[:3]}"
        for n, entry in again.items():
            if n not in rerun or entry["stats"]["median"] < rerun[n]["stats"]["median"]:
                rerun[n] = entry
        suspects = [n for n in suspects if n in again and still_over(n, again)]
    if not first:
        result.complete, result.note = False, "the gate's bench run produced no results"
    result.rows = compare(base, first, rerun)
    return result


def table(result: GateResult) -> str:
    shown = [r for r in result.rows if r.status != "ok"] or result.rows[:0]
    lines = [f"gate: {len(result.rows)} benches — " + ", ".join(f"{v} {k}" for k, v in
                                                                 result.as_dict()["counts"].items() if v)]
    if shown:
        lines.append(f"{'bench':70} {'status':9} {'base':>10} {'run':>10} {'rerun':>10} {'ratio':>6} {'limit':>6}")
    for r in shown:
        def us(x: float | None) -> str:
            return f"{x * 1e6:.1f}µs" if x is not None else "—"

        lines.append(f"{r.name[-70:]:70} {r.status:9} {us(r.base_median):>10} {us(r.first_median):>10} "
                     f"{us(r.rerun_median):>10} {(f'{r.ratio:.2f}' if r.ratio else '—'):>6} "
                     f"{(f'+{100 * r.threshold:.0f}%' if r.threshold is not None else '—'):>6}")
    if result.note:
        lines.append(f"gate: {result.note}")
    lines.append(("gate: FAILED (regressions above)" if result.regressed else "gate: FAILED (incomplete)")
                 if result.rc else "gate: passed")
    return "\n".join(lines)


# ---- the GPU proof -------------------------------------------------------------------------------------------

def proof(systems: list[str], *, slug: str, k: str | None, budget_s: float, runner: Runner = run_pytest_benches,
          save_baseline: Callable[[], bool] | None = None, root: Path = RESULTS) -> dict[str, Any]:
    """Store a fresh baseline run (``save_baseline``), gate unchanged code three times, then once with the canary
    slowed by 25%: the summary says whether the three passed and the slowed one was caught (and nothing else)."""
    t0 = time.monotonic()

    def left() -> float:
        return budget_s - (time.monotonic() - t0)

    summary: dict[str, Any] = {"systems": systems, "k": k, "canary": CANARY_BENCH, "canary_extra": CANARY_EXTRA,
                               "unchanged": [], "slowed": None}
    if save_baseline is not None and not save_baseline():
        summary.update(complete=False, note="the baseline run failed")
        return summary
    def one(label: str, env: dict[str, str], budget: float) -> dict[str, Any]:
        result = gate(systems, slug=slug, k=k, root=root, env=env, budget_s=budget, runner=runner)
        print(f"== gate proof, {label}:\n{table(result)}", flush=True)
        return result.as_dict()

    for i in range(3):
        if left() < 30:
            break
        summary["unchanged"].append(one(f"unchanged code, run {i + 1} of 3", {}, left() / 2))
    if left() >= 20:
        summary["slowed"] = one(f"canary slowed by {CANARY_EXTRA:.0%}", {CANARY_ENV: str(CANARY_EXTRA)}, left())
    runs = summary["unchanged"]
    slowed = summary["slowed"] or {}
    caught = [n for n in slowed.get("regressed", []) if CANARY_BENCH in n]
    summary.update(
        complete=len(runs) == 3 and bool(slowed) and all(r["complete"] for r in runs) and slowed.get("complete", False),
        unchanged_passed=sum(r["rc"] == 0 for r in runs), unchanged_runs=len(runs),
        unchanged_pass_fraction=sum(r["rc"] == 0 for r in runs) / 3,
        slowed_caught=1.0 if caught else 0.0,
        slowed_false_alarms=[n for n in slowed.get("regressed", []) if CANARY_BENCH not in n],
        benches_gated=max((len(r["rows"]) for r in runs), default=0), seconds=round(time.monotonic() - t0, 1))
    return summary


def save_baseline_run(systems: list[str], k: str | None, timeout_s: float, *, slug: str, root: Path = RESULTS,
                      name: str = "gate_baseline") -> bool:
    """Store one bench run of ``systems`` as ``<root>/<slug>/<machine>/NNNN_<name>.json``; True when it was stored
    (a bench that fails its own check, e.g. a figure above its peak, still stores its times: the gate reads times)."""
    where = Path(root) / slug
    before = set(where.glob(f"*/[0-9][0-9][0-9][0-9]_{name}.json"))
    cmd = [sys.executable, "-m", "pytest", *bench_targets(systems), "-q", "-p", "no:cacheprovider",
           "--benchmark-only", "--benchmark-enable", f"--benchmark-storage=file://{where}", f"--benchmark-save={name}",
           *(["-k", k] if k else [])]
    rc = run_bounded(cmd, {}, timeout_s)
    made = set(where.glob(f"*/[0-9][0-9][0-9][0-9]_{name}.json")) - before
    print(f"gate: baseline run exited {rc}; stored {sorted(str(p.name) for p in made) or 'nothing'}", flush=True)
    return bool(made)


def main(argv: list[str] | None = None) -> int:
    from impl import backend
    from impl.common.ledger import discover_systems
    from impl.common.results import gpu_slug, write_result

    p = argparse.ArgumentParser(prog="python -m impl gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("systems", nargs="*", help="systems to gate (default: all)")
    p.add_argument("-k", default=None, help="pytest -k expression to narrow the benches")
    p.add_argument("--slow-check", action="store_true",
                   help=f"self-test: the canary ({CANARY_BENCH}) does {CANARY_EXTRA:.0%} more work; the gate must fail")
    p.add_argument("--proof", action="store_true",
                   help="GPU proof: fresh baseline, three unchanged gate runs, one slowed; writes examples/gate_proof")
    p.add_argument("--budget-s", type=float, default=1800.0, help="stop (and report what ran) after this long")
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    a = p.parse_args(argv)
    if not backend.ON_GPU:
        print("python -m impl gate needs a CUDA GPU (it times benches); this machine has none", file=sys.stderr)
        return 2
    systems = a.systems or list(discover_systems())
    slug = gpu_slug()
    if a.proof:
        summary = proof(systems, slug=slug, k=a.k, budget_s=a.budget_s,
                        save_baseline=lambda: save_baseline_run(systems, a.k, a.budget_s / 2, slug=slug))
        print(f"wrote {write_result('examples', 'gate_proof', summary, overwrite=True)}")
        proved = (summary.get("complete") and summary["unchanged_passed"] == 3 and summary["slowed_caught"]
                  and not summary["slowed_false_alarms"])
        text, rc = json.dumps(summary, indent=2), 0 if proved else 1
        print(f"gate proof: unchanged {summary.get('unchanged_passed')}/{summary.get('unchanged_runs')} passed, slowed "
              f"caught: {bool(summary.get('slowed_caught'))}, false alarms: {summary.get('slowed_false_alarms')}")
    else:
        env = {CANARY_ENV: str(CANARY_EXTRA)} if a.slow_check else {}
        result = gate(systems, slug=slug, k=a.k, env=env, budget_s=a.budget_s)
        print(table(result))
        text, rc = json.dumps(result.as_dict(), indent=2), result.rc
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
