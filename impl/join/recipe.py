"""The GPU joins profiled and swept, as functions (the command line: ``experiments.py``).

``profile(n, impls)`` runs Nsight Compute over each join once on the uniform n x n int32 case (``ncu.py``) and
returns the per-join figures stored as ``join/ncu``; ``sweep(n)`` times the tensor-core join over a few
tilings/encodings and the hash joins over load factors and rows per thread (``join/sweep``); ``smoke()`` checks every
step but ncu itself on the CPU: the driver at a tiny size, the parser on a canned CSV, a two-point sweep.
"""
from __future__ import annotations

import json
import time
from typing import Any

import impl  # noqa: F401
from impl import backend
from impl.join.ncu import SMOKE_CSV, parse_ncu_csv, run_ncu, summarize


def copy_peak() -> float | None:
    """This card's calibrated copy bandwidth (GB/s) from ``results/<gpu>/calibration.json``; None without one."""
    from impl.common.results import results_dir

    path = results_dir() / "calibration.json"
    return json.loads(path.read_text())["peaks"].get("copy_gbps") if path.exists() else None


def profile(n: int, impls: list[str]) -> dict[str, Any]:
    """The ``join/ncu`` record's data: per join, occupancy, SM throughput, DRAM bytes and kernel time under ncu."""
    t0 = time.monotonic()
    prof = run_ncu(n, impls)
    return {"n_build": n, "n_probe": n, "case": "uniform int32, unique build keys, ~50% probe hits",
            "metrics": prof["metrics"], "command": prof["command"], **summarize(prof["kernels"], copy_peak()),
            "ncu_wall_s": time.monotonic() - t0}


TC_SWEEP = ({}, {"bucket_rows": 16}, {"pre_encode": False}, {"block_n": 16}, {"sub_tiles": 2, "num_warps": 2},
            {"enc": "fp16"}, {"sub_tiles": 8, "num_warps": 8})
HASH_SWEEP = ({}, {"load_factor": 0.25}, {"load_factor": 0.75}, {"items": 1}, {"items": 2}, {"items": 8},
              {"threads": 128}, {"threads": 512})


def sweep(n: int, tc_configs=TC_SWEEP, hash_configs=HASH_SWEEP, hash_impls=("hash-cuda",),
          reps: int = 10) -> list[dict[str, Any]]:
    """Median end-to-end time (ms, the suite's timer) of each join configuration on the uniform n x n case."""
    from impl.common.timing import time_fn
    from impl.join import make_operator
    from impl.join.data import Case, make_tables

    bk, br, pk, pr = make_tables(Case("uniform", n), seed=0, device=backend.DEVICE)
    runs = [("tc-triton", c) for c in tc_configs] + [(h, c) for h in hash_impls for c in hash_configs]
    out = []
    for name, cfg in runs:
        op = make_operator(name, **cfg)
        pairs = len(op(bk, pk, br, pr))
        ms = time_fn(lambda op=op: op(bk, pk, br, pr), warmup=2, reps=reps).median_ms
        out.append({"impl": name, "config": cfg, "median_ms": ms, "pairs": pairs})
        print(f"sweep {name} {cfg}: {ms * 1e3:.1f} µs", flush=True)
    return out


def smoke() -> dict[str, Any]:
    """CPU check of every step except ncu itself: the driver at a tiny size, then the parser on a canned CSV."""
    from impl.join import ncu_driver

    pairs = ncu_driver.run(backend.sized(gpu=4096, cpu=96), ["hash-numba", "tc-triton"],
                           config={"hash-numba": {"threads": 32}, "tc-triton": {"bucket_rows": 8}})
    summary = summarize(parse_ncu_csv(SMOKE_CSV), copy_gbps=3000.0)
    points = sweep(64, tc_configs=({}, {"bucket_rows": 4}), hash_configs=({"threads": 32, "items": 8},),
                   hash_impls=("hash-numba",), reps=1)
    return {"pairs": pairs, "summary": summary, "sweep": points}
