"""The GPU evidence for l2cache in two runs, from the command line: a selection run, then a verdict run in a fresh
process (the runs themselves: ``recipe.py``).

    python -m impl.l2cache.experiments --select  --out DIR --budget-s 150   # candidates × policies, sweep; selection
    python -m impl.l2cache.experiments --verdict --out DIR --budget-s 150   # re-measure what was selected; ncu
    python -m impl.l2cache.experiments                                       # both (the verdict in a new process)
    python -m impl.l2cache.experiments --smoke                               # CPU: both runs at tiny sizes, fake L2

Selection (``selection.json``: candidates × policies, the picks, the weight-size sweep) and verdict (``verdict.json``,
``ncu.json``: the picked pairs re-measured, the chooser, ncu) are described in ``recipe.py``; the claims read only the
verdict's figures. Exit code: 0 when the run put the device's L2 state back, 1 when it did not, 2 without a GPU or a
readable selection.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import impl  # noqa: F401  (backend before triton)
from impl import backend
from impl.l2cache.ncu import ncu_driver
from impl.l2cache.recipe import (SELECT, VERDICT, SelectionUnreadable, default_selection_path, make_controller,
                                 read_record, select, smoke, verdict, with_budget)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.l2cache.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--select", action="store_true", help="the selection run")
    mode.add_argument("--verdict", action="store_true", help="the verdict run (reads the selection)")
    mode.add_argument("--smoke", action="store_true", help="CPU: both runs, tiny sizes, fake driver")
    mode.add_argument("--ncu-driver", metavar="SPEC_JSON", help="internal: the process ncu profiles")
    p.add_argument("--quick", action="store_true", help="accepted for `python -m impl gpu --quick`: same runs")
    p.add_argument("--out", type=Path, help="write the records here instead of results/<gpu>/l2cache/")
    p.add_argument("--budget-s", type=float, help="wall-clock budget of the run (default 150 each)")
    p.add_argument("--selection", type=Path, help="the selection record the verdict reads")
    p.add_argument("--policies", default="default,persist_weights", help="with --ncu-driver")
    p.add_argument("--requests", type=int, default=3, help="profiled requests per policy (with --ncu-driver)")
    a = p.parse_args(argv)
    if a.ncu_driver:
        spec = json.loads(Path(a.ncu_driver).read_text())
        print(json.dumps({"profiled": ncu_driver(spec, a.policies.split(","), a.requests, make_controller(False))}))
        return 0
    if a.smoke:
        sel, ver = smoke(a.out)
        return 0 if sel["restored"] and ver["restored"] else 1
    if not backend.ON_GPU:
        print("the experiments need a CUDA GPU; run with --smoke on a CPU", file=sys.stderr)
        return 2
    controller = make_controller(False)
    if a.select or not a.verdict:
        sel = select(with_budget(SELECT, a.budget_s), controller, a.out, smoke=False)
        if a.select:
            return 0 if sel["restored"] else 1
    path = a.selection or default_selection_path(a.out)
    if not a.verdict:  # both: the verdict in a fresh process, as the protocol demands
        cmd = [sys.executable, "-m", "impl.l2cache.experiments", "--verdict", "--selection", str(path)]
        cmd += (["--out", str(a.out)] if a.out else []) + (["--budget-s", str(a.budget_s)] if a.budget_s else [])
        return subprocess.run(cmd).returncode
    try:
        rec = read_record(path)
    except SelectionUnreadable as e:
        print(e, file=sys.stderr)
        return 2
    ver, _ = verdict(with_budget(VERDICT, a.budget_s), controller, rec["data"], a.out, smoke=False,
                     selection_record=rec)
    return 0 if ver["restored"] else 1


if __name__ == "__main__":
    sys.exit(main())
