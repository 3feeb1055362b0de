"""The process Nsight Compute profiles: ``python -m impl.join.ncu_driver [--n N] [--impls a,b]``.

Builds one uniform n x n int32 case (unique build keys, ~50% probe hits) on the host, copies it to the device (copies
launch no kernels), then runs each named join exactly once, so every kernel ncu sees belongs to one join, in order.
"""
from __future__ import annotations

import argparse
import sys

import impl  # noqa: F401
from impl import backend
from impl.common.timing import synchronize
from impl.join import IMPLS, make_operator
from impl.join.data import Case, make_tables


def run(n: int, impls: list[str], config: dict[str, dict] | None = None) -> dict[str, int]:
    """Run each join once on the uniform n x n case; returns pairs per join."""
    bk, br, pk, pr = make_tables(Case("uniform", n), seed=0, device=backend.DEVICE)
    pairs = {}
    for name in impls:
        op = make_operator(name, **(config or {}).get(name, {}))
        res = op(bk, pk, br, pr)
        synchronize()
        pairs[name] = len(res)
        print(f"ncu_driver: {name} joined {n} x {n} -> {len(res)} pairs", flush=True)
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--impls", default="hash-numba,hash-cuda,tc-triton")
    a = ap.parse_args(argv)
    impls = [s for s in a.impls.split(",") if s]
    bad = [s for s in impls if s not in IMPLS]
    if bad:
        ap.error(f"unknown joins {bad}; choose from {IMPLS}")
    run(a.n, impls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
