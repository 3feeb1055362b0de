"""The sort's GPU experiments (``recipe.py`` holds them; each result in results/<gpu>/sort/<name>.json).

    python -m impl.sort.experiments            on the GPU: every experiment
    python -m impl.sort.experiments --quick    passes, transfers, pipeline at 10M only; no numba_tune, no ncu
    python -m impl.sort.experiments --smoke    CPU (simulator), tiny sizes, prints only, writes nothing
    python -m impl.sort.experiments --ncu-only on the GPU: only the Nsight Compute profile

Exit code: 0 done; 2 no GPU without ``--smoke`` (the reason on stderr).
"""
from __future__ import annotations

import argparse
import sys

import impl  # noqa: F401  (backend before numba)
from impl import backend
from impl.sort.recipe import ncu_target, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="no numba_tune, no ncu, pipeline at 10M only")
    ap.add_argument("--smoke", action="store_true", help="CPU-sized run that writes nothing (CI)")
    ap.add_argument("--no-ncu", action="store_true", help="skip the Nsight Compute profile")
    ap.add_argument("--ncu-only", action="store_true", help="only the Nsight Compute profile")
    ap.add_argument("--skip-tune", action="store_true", help="skip the passes and tune experiments (stored already)")
    ap.add_argument("--ncu-target", type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ncu_target:
        ncu_target(args.ncu_target)
        return 0
    if not backend.ON_GPU and not args.smoke:
        print(f"the experiments need a GPU ({backend.NO_GPU_REASON}); use --smoke on a CPU", file=sys.stderr)
        return 2
    if args.ncu_only and (args.smoke or not backend.ON_GPU):
        print("--ncu-only profiles the GPU kernels with Nsight Compute: it needs a GPU", file=sys.stderr)
        return 2
    run(smoke=args.smoke or not backend.ON_GPU, quick=args.quick, no_ncu=args.no_ncu, skip_tune=args.skip_tune,
        ncu_only=args.ncu_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
