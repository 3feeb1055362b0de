"""``python -m impl <command>``: the suite's main entry points.

  verify   run every correctness test and every bench (as tests, tiny sizes, without a GPU), then ``report``
  report   evaluate the claims ledger for each results/<gpu-slug>/ (and results/cpu/) into claims.json + REPORT.md,
           then say which systems' verdicts were measured on code that has changed since (``stale``)
  stale    per system of a card's stored verdicts: the commits measured at, and the commits since that touch the
           code they measured (impl.common.freshness)
  gpu      on a GPU machine, per system: its tune step (if it declares one), correctness, benches saved to
           results/<slug>/, experiments; report
  gate     on a GPU machine: every bench of the chosen systems against its own stored baseline (impl.common.gate)
  provenance  here: ``LAB_COMMIT=<sha> LAB_TREE=<tree>`` of a commit (default HEAD) for a device command's prefix;
           there (``--check``): exit 1, saying why, unless the files are LAB_COMMIT's (results/ left out)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import impl  # noqa: F401
from impl import backend
from impl.common import freshness, report, results
from impl.common.ledger import discover_systems
from impl.common.results import ROOT, gpu_slug


def run_pytest(args: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def cmd_report(slugs: list[str]) -> int:
    targets = slugs or [*report.slugs_with_results(), "cpu"]
    for slug in targets:
        s = report.render(slug)
        print(f"report {slug}: {s['claims']} claims — {s['pass']} pass, {s['fail']} fail, "
              f"{s['not measured']} not measured -> {s['dir']}/REPORT.md")
        for line in s["problems"]:
            print(f"  problem: {line}")
        if slug != "cpu":
            cmd_stale([slug], indent="  ")
    return 0


def cmd_stale(slugs: list[str], indent: str = "") -> int:
    for slug in slugs or report.slugs_with_results():
        found = freshness.of_slug(slug)
        changed = sum(1 for s in found if s.stale)
        print(f"{indent}{slug}: {changed} of {len(found)} (system, commit) groups of verdicts were measured on code "
              f"that has changed since (to re-measure them: a GPU run of HEAD)")
        for s in found:
            print(f"{indent}  {freshness.describe(s)}")
    return 0


def cmd_verify(extra: list[str]) -> int:
    t0 = time.time()
    print(f"backend: {backend.describe()}", flush=True)
    rc = run_pytest(["correctness", "benches", "-q", *extra])
    print(f"verification finished in {time.time() - t0:.0f} s with pytest exit code {rc}", flush=True)
    cmd_report([])
    if rc != 0:
        print("VERIFY FAILED: see the pytest output above", flush=True)
    return rc


def tune_step_args(system: str) -> list[str] | None:
    """Arguments of the system's tune step (``impl.<system>.tune.GPU_STEP_ARGS``), None if it has none: a tune module
    that declares them measures defaults the tests and benches of the same run read."""
    if not (ROOT / "impl" / system / "tune.py").exists():
        return None
    import importlib

    return getattr(importlib.import_module(f"impl.{system}.tune"), "GPU_STEP_ARGS", None)


def cmd_gpu(systems: list[str], save: str, experiment_args: list[str], skip_experiments: bool,
            skip_tune: bool = False) -> int:
    """Per system: its tune step (if it declares one: defaults measured first), correctness at GPU sizes, benches
    stored as run ``<save>`` (default: the system's name), the system's ``experiments`` module if it has one; then the
    report. Returns nonzero if any step failed."""
    if not backend.ON_GPU:
        print("python -m impl gpu needs a CUDA GPU; this machine has none", file=sys.stderr)
        return 2
    rc = 0
    for s in systems or [d for d in discover_systems()]:
        t0 = time.time()
        tests = sorted(str(p) for p in ROOT.glob(f"correctness/test_{s}*.py"))
        benches = sorted(str(p) for p in ROOT.glob(f"benches/bench_{s}*.py"))
        tune = None if skip_tune else tune_step_args(s)
        if tune is not None:
            cmd = [sys.executable, "-m", f"impl.{s}.tune", *tune]
            print("+", " ".join(cmd), flush=True)
            rc |= subprocess.call(cmd, cwd=ROOT)
        if tests:
            rc |= run_pytest([*tests, "-q", "-p", "no:cacheprovider"])
        if benches:
            rc |= run_pytest([*benches, "-q", "-p", "no:cacheprovider", f"--benchmark-save={save or s}",
                              "--benchmark-columns=median,iqr,rounds"])
        if not skip_experiments and (ROOT / "impl" / s / "experiments.py").exists():
            cmd = [sys.executable, "-m", f"impl.{s}.experiments", *experiment_args]
            print("+", " ".join(cmd), flush=True)
            rc |= subprocess.call(cmd, cwd=ROOT)
        print(f"== {s} done in {time.time() - t0:.0f} s (rc so far {rc})", flush=True)
    cmd_report([gpu_slug()])
    return rc


def cmd_provenance(commit: str, check: bool) -> int:
    """Print the variables that name ``commit`` on a copy of this tree, or (``check``) test a copy against them."""
    if check:
        problem = results.stated_tree_problem() if os.environ.get("LAB_COMMIT") else "LAB_COMMIT is not set"
        print(f"provenance: {problem}" if problem else
              f"provenance: the files here are {os.environ['LAB_COMMIT'][:12]}'s", file=sys.stderr)
        return 1 if problem else 0
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True,
                         text=True)
    tree = results.code_tree(sha.stdout.strip()) if sha.returncode == 0 else None
    if tree is None:
        print(f"provenance: {commit!r} is not a commit of this repository", file=sys.stderr)
        return 1
    print(f"LAB_COMMIT={sha.stdout.strip()} LAB_TREE={tree}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gate"]:  # its own parser (impl.common.gate), so `python -m impl gate -h` shows its options
        from impl.common import gate

        return gate.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m impl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="all correctness tests + benches as tests, then the report")
    v.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    r = sub.add_parser("report", help="render claims.json + REPORT.md")
    r.add_argument("slugs", nargs="*", help="results/<slug> folders (default: all, plus cpu)")
    st = sub.add_parser("stale", help="which stored verdicts predate changes to the code they measured")
    st.add_argument("slugs", nargs="*", help="results/<slug> folders (default: all with results)")
    g = sub.add_parser("gpu", help="GPU run: correctness, benches saved as a baseline, report")
    g.add_argument("systems", nargs="*", help="systems to run (default: all)")
    g.add_argument("--save", default="", help="name suffix for the stored benchmark run (default: the system)")
    g.add_argument("--no-experiments", action="store_true", help="skip the systems' experiments modules")
    g.add_argument("--quick", action="store_true", help="pass --quick to the experiments")
    g.add_argument("--no-tune", action="store_true", help="skip the systems' tune steps (use the stored tables)")
    sub.add_parser("gate", help="regression gate against the stored baselines (python -m impl gate -h)")
    pv = sub.add_parser("provenance", help="LAB_COMMIT and LAB_TREE of a commit, or --check a copy against them")
    pv.add_argument("commit", nargs="?", default="HEAD")
    pv.add_argument("--check", action="store_true", help="exit 1 unless the files here are LAB_COMMIT's")
    a = p.parse_args(argv)
    if a.cmd == "report":
        return cmd_report(a.slugs)
    if a.cmd == "verify":
        return cmd_verify(a.pytest_args)
    if a.cmd == "stale":
        return cmd_stale(a.slugs)
    if a.cmd == "provenance":
        return cmd_provenance(a.commit, a.check)
    return cmd_gpu(a.systems, a.save, ["--quick"] if a.quick else [], a.no_experiments, a.no_tune)


if __name__ == "__main__":
    sys.exit(main())
