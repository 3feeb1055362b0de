"""Compile the CUDA C++ sort's kernels for sm_90 with nvcc and report ptxas's resource use; no GPU needed.

    python -m impl.sort.compile_check                      # the design point's kernels for 10M keys, every mode
    python -m impl.sort.compile_check --n 10000000 --n 100000001 --tile-bits 14 --items-bits 5
    python -m impl.sort.compile_check --tune               # every kernel impl.sort.tune can launch (cache warm-up)
    python -m impl.sort.compile_check --session            # ... and every one the benches, GPU tests and the
                                                           # configs the tune table can choose can launch

One row per kernel: name, pass kind, threads, registers, spill bytes, stack, shared memory (dynamic: from the
config), compile seconds. The cubins land in the kernel cache (``impl.sort.runtimes.kernel_cache``), so running this
before a GPU session (and carrying ``.carry/sort-kernels``) spares the GPU machine the compile time.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from impl.sort.codegen import KernelSpec, plan_kernels
from impl.sort.plan import GPU_CUDA_CONFIG, CudaSortConfig, build_cuda_plan, padded_bits
from impl.sort.runtimes import compile_all

MODE_RAWS = {"keys32": 32, "composite": 32, "keys64": 64, "pairs": 64}
MODE_WIDTHS = {"keys32": (16, 32), "composite": (16, 32), "keys64": (64,), "pairs": (64,)}  # input bits per mode


def parse_ptxas(text: str, name: str) -> dict:
    """Registers, spills and stack of kernel ``name`` in an ``nvcc -Xptxas -v`` report."""
    block = text[text.find(f"Compiling entry function '{name}'"):]
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, block)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def compile_report(specs: list[KernelSpec], cache: Path | None = None, arch: str = "90",
                   jobs: int | None = None) -> list[dict]:
    """Compile ``specs`` (in parallel; cached by source) and return one resource row per distinct kernel."""
    t0 = time.perf_counter()
    done = compile_all(specs, arch, jobs=jobs, cache=cache)
    rows = []
    for s in {s.name: s for s in specs}.values():
        rows.append({"name": s.name, "mode": s.mode, "kind": s.spec.kind, "threads": s.threads,
                     "min_blocks": s.min_blocks, "steps": s.spec.steps, "exchanges": s.spec.exchanges, **parse_ptxas(done[s.name][1], s.name)})
    rows and rows[0].update(compile_s_total=round(time.perf_counter() - t0, 1))
    return rows


SESSION_SIZES = (100_003, 1_000_000, 3_000_017, 10_000_000, 10_000_001, 100_000_000)  # tests, benches, tune


def session_configs() -> dict[str, dict[CudaSortConfig, int]]:
    """Per slot mode, every config a GPU session can pick, with the smallest n it can serve: the built-in default and
    each tune candidate (the table the tune step writes chooses among them). A candidate measured only at the
    largest tune size serves only sizes above the next smaller one (the table's lookup rule); the others any n."""
    from impl.sort.choose import BUILTIN
    from impl.sort.tune import ARG_CONFIGS, GRID, KEY_CONFIGS

    out: dict[str, dict[CudaSortConfig, int]] = {mode: {c: 0} for mode, c in BUILTIN.items()}
    sizes = sorted(n for n, _, _ in GRID)
    floor = sizes[-2] + 1 if len(sizes) > 1 else 0
    for n, keys, args in sorted(GRID):
        for mode, labels, table in (("keys32", keys, KEY_CONFIGS), ("composite", args, ARG_CONFIGS)):
            for label in labels:
                c = table[label]
                out[mode][c] = min(out[mode].get(c, floor), 0 if n < sizes[-1] else floor)
    return out


def session_kernels(max_logn: int = 27) -> list[KernelSpec]:
    """Every kernel a GPU session of this suite can launch: every config of ``session_configs`` at any n it can serve
    up to 2^max_logn (one plan per padded size) and the sizes tests and benches use, in every input width of its
    mode, plus everything ``impl.sort.tune`` runs."""
    specs: list[KernelSpec] = []
    sizes = [1 << logn for logn in range(max_logn + 1)] + list(SESSION_SIZES)
    for mode, configs in session_configs().items():
        for config, least in configs.items():
            for n in sizes:
                if n < least and padded_bits(n) < padded_bits(least):
                    continue
                for raw in MODE_WIDTHS[mode]:
                    specs += plan_kernels(build_cuda_plan(n, mode, config), raw)
    return list(dict.fromkeys(specs + tune_kernels()))


def compile_module(specs: list[KernelSpec], arch: str = "90") -> list[dict]:
    """All of ``specs`` as one module through one ``nvcc -cubin -Xptxas -v`` (faster than one per kernel; nothing
    cached): one resource row per kernel."""
    import subprocess
    import tempfile

    from impl.sort.codegen import module_source
    from impl.sort.runtimes import NVCC_FLAGS, nvcc_path

    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH (nor /usr/local/cuda/bin)")
    uniq = list({s.name: s for s in specs}.values())
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / "sort.cu"
        cu.write_text(module_source(uniq))
        res = subprocess.run([nvcc, f"-arch=sm_{arch}", *NVCC_FLAGS, "-o", str(Path(d) / "sort.cubin"), str(cu)],
                             capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{res.stderr[-4000:]}")
    return [{"name": s.name, "mode": s.mode, "kind": s.spec.kind, "threads": s.threads, "min_blocks": s.min_blocks,
             **parse_ptxas(res.stderr, s.name)} for s in uniq]


def tune_kernels() -> list[KernelSpec]:
    """Every kernel ``python -m impl.sort.tune`` can launch (its configurations, sizes and modes)."""
    from impl.sort.tune import kernel_requests

    specs: list[KernelSpec] = []
    for n, mode, raw, config in kernel_requests():
        specs += plan_kernels(build_cuda_plan(n, mode, config), raw)
    return list(dict.fromkeys(specs))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="sizes (default 10M)")
    ap.add_argument("--mode", action="append", choices=sorted(MODE_RAWS), help="slot modes (default all)")
    ap.add_argument("--tile-bits", type=int, default=GPU_CUDA_CONFIG.tile_bits)
    ap.add_argument("--items-bits", type=int, default=GPU_CUDA_CONFIG.items_bits)
    ap.add_argument("--run-bits", type=int, default=GPU_CUDA_CONFIG.run_bits)
    ap.add_argument("--staged", action="store_true", help="one tile pass per stage instead of fused passes")
    ap.add_argument("--tune", action="store_true", help="every kernel of impl.sort.tune instead")
    ap.add_argument("--session", action="store_true", help="every kernel a GPU session can launch (cache warm-up)")
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--arch", default="90")
    args = ap.parse_args(argv)
    if args.session:
        specs = session_kernels()
    elif args.tune:
        specs = tune_kernels()
    else:
        config = CudaSortConfig(args.tile_bits, args.items_bits, args.run_bits, not args.staged)
        specs = [k for n in (args.n or [10_000_000]) for m in (args.mode or list(MODE_RAWS))
                 for k in plan_kernels(build_cuda_plan(n, m, config), MODE_RAWS[m])]
    rows = compile_report(specs, arch=args.arch, jobs=args.jobs)
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


if __name__ == "__main__":
    main()
