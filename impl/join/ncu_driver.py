"""The process Nsight Compute profiles: ``python -m impl.join.ncu_driver [--n N] [--impls a,b] [--config JSON]``.

Builds one uniform n x n int32 case (unique build keys, ~50% probe hits) on the host, copies it to the device (copies
launch no kernels), then runs each named join exactly once, so every kernel ncu sees belongs to one join, in order.
``--config '{"hash-cuda": {"scheme": "split"}}'`` gives a join its config overrides (the fields of its config
dataclass; without one the CUDA hash join runs the stored tune's choice, as the benches do); ``--repeat 2`` joins
twice with one operator (the second join reuses the table, as a bench's rounds do).
"""
from __future__ import annotations

import argparse
import json
import sys

import impl  # noqa: F401
from impl import backend
from impl.common.timing import synchronize
from impl.join import IMPLS, make_operator
from impl.join.data import Case, make_tables
from impl.join.tune import stored_hash_config


def run(n: int, impls: list[str], config: dict[str, dict] | None = None, repeat: int = 1) -> dict[str, int]:
    """Run each join ``repeat`` times (one operator: later joins reuse its table, as a bench's rounds do) on the
    uniform n x n case; returns pairs per join."""
    bk, br, pk, pr = make_tables(Case("uniform", n), seed=0, device=backend.DEVICE)
    pairs = {}
    for name in impls:
        overrides = (config or {}).get(name)
        if overrides is None:
            stored = stored_hash_config(n) if name == "hash-cuda" else None
            overrides = stored[0] if stored else {}
        op = make_operator(name, **overrides)
        for _ in range(repeat):
            res = op(bk, pk, br, pr)
            synchronize()
        pairs[name] = len(res)
        print(f"ncu_driver: {name} joined {n} x {n} -> {len(res)} pairs", flush=True)
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--impls", default="hash-numba,hash-cuda,tc-triton")
    ap.add_argument("--config", default="{}", help="JSON object: join name -> config overrides")
    ap.add_argument("--repeat", type=int, default=1, help="joins per operator (profile a later one: --launch-skip)")
    a = ap.parse_args(argv)
    impls = [s for s in a.impls.split(",") if s]
    bad = [s for s in impls if s not in IMPLS]
    if bad:
        ap.error(f"unknown joins {bad}; choose from {IMPLS}")
    try:
        config = json.loads(a.config)
    except ValueError as e:
        ap.error(f"--config is not JSON: {e}")
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        ap.error('--config must map join names to objects, e.g. {"hash-cuda": {"scheme": "split"}}')
    unknown = sorted(set(config) - set(impls))
    if unknown:
        ap.error(f"--config names joins not run: {unknown}")
    if a.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {a.repeat}")
    run(a.n, impls, config, a.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
