"""Nsight Compute profile of the GPU joins: ``python -m impl.join.experiments [--quick] [--sweep] [--smoke]``.

Profiles ``python -m impl.join.ncu_driver`` (each join once on the uniform 1M x 1M int32 case) under ncu and stores,
per join, the time-weighted achieved occupancy and SM throughput of its own kernels, DRAM bytes and kernel time
(``recipe.profile``, ``ncu.py``) with ``write_result("join", "ncu", ...)``.

``--quick`` profiles only the two joins the claims name (hash-cuda, tc-triton). ``--sweep`` (optional, ~1 min more)
also times the tensor-core join over a few tilings/encodings and the hash joins over load factors and rows per
thread, stored as ``join/sweep``. ``--smoke`` (CPU CI) runs the driver and a two-point sweep in-process at a tiny size
under the interpreters and parses a synthetic CSV; it writes nothing. Budget: <= 2 min without ``--sweep``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import impl  # noqa: F401
from impl import backend
from impl.join.ncu import IMPL_OF_KEY
from impl.join.recipe import profile, smoke, sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="profile only hash-cuda and tc-triton")
    ap.add_argument("--sweep", action="store_true", help="also time join configurations (stored as join/sweep)")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny driver run + parser check; writes nothing")
    ap.add_argument("--n", type=int, default=1_000_000)
    a = ap.parse_args(argv)
    if a.smoke:
        out = smoke()
        print(json.dumps(out, indent=1, default=str)[:3000])
        return 0
    if not backend.ON_GPU:
        print(f"experiments need a GPU and ncu ({backend.NO_GPU_REASON}); use --smoke here", file=sys.stderr)
        return 2
    from impl.common.results import write_result
    from impl.join.hash_cuda import unavailable_reason

    impls = ["hash-cuda", "tc-triton"] if a.quick else ["hash-numba", "hash-cuda", "tc-triton"]
    if unavailable_reason():
        print(f"skipping hash-cuda: {unavailable_reason()}", flush=True)
        impls.remove("hash-cuda")
    t0 = time.monotonic()
    data = profile(a.n, impls)
    path = write_result("join", "ncu", data, overwrite=True)
    for who in IMPL_OF_KEY:
        if who in data:
            d = data[who]
            print(f"{who}: occupancy {d['occupancy_pct']}% · SM throughput {d['sm_throughput_pct']}% · "
                  f"DRAM {d['dram_bytes'] / 1e6:.1f} MB in {d['kernel_time_us']:.1f} µs of kernels", flush=True)
    print(f"wrote {path} in {time.monotonic() - t0:.0f} s", flush=True)
    if a.sweep:
        hash_impls = tuple(i for i in ("hash-cuda", "hash-numba") if i in impls)
        points = sweep(a.n, hash_impls=hash_impls)
        path = write_result("join", "sweep", {"n_build": a.n, "n_probe": a.n, "points": points}, overwrite=True)
        print(f"wrote {path} in {time.monotonic() - t0:.0f} s total", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
