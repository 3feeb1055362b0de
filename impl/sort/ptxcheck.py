"""Compile every sort kernel for sm_90 with numba's real CUDA compiler and report ptxas resource use — no GPU needed.

The simulator runs the kernels' Python, not their numba typing or code generation; this check catches what only the
real compiler sees (type unification, unsupported operations) and shows registers, spills and shared memory per
variant, which decide occupancy on an sm_90 card. numba must be imported *without* the simulator, before ``impl`` turns
it on, so the check runs in a fresh interpreter: ``run_in_subprocess()`` (used by the tests) or, on a GPU machine,
``python -m impl.sort.ptxcheck``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# numba.cuda loads its real target first; impl's guard against late imports then sees the simulator variables it
# expects; they are dropped again before anything compiles (numba re-reads its config from the environment).
_BOOTSTRAP = ("import os; os.environ.pop('NUMBA_ENABLE_CUDASIM', None); import numba.cuda; "
              "os.environ.update(NUMBA_ENABLE_CUDASIM='1', TRITON_INTERPRET='1'); import impl; "
              "os.environ.pop('NUMBA_ENABLE_CUDASIM'); os.environ.pop('TRITON_INTERPRET'); "
              "from impl.sort.ptxcheck import main; main()")


def variants(config) -> list[dict]:
    """(kernel kind, key container, mode, launch threads) for every kernel a sort with ``config`` can launch, and
    the host pipeline's merge finish."""
    from impl.sort.network import replace

    out = []
    for mode, key_dtype, elem_bytes in (("keys", np.uint32, 4), ("keys", np.uint64, 8), ("composite", np.uint64, 8),
                                        ("pairs", np.uint64, 12)):
        bits = np.uint64 if (mode == "pairs" or (mode == "keys" and key_dtype == np.uint64)) else np.uint32
        tile = config.tile(elem_bytes)
        out.append(dict(kind="block", mode=mode, key=np.dtype(key_dtype).name, bits=np.dtype(bits).name,
                        tile=tile, log_e=config.log_e, threads=tile >> config.log_e))
        for f in sorted({1, config.fused_strides, replace(config, variant="global").fused_strides}):
            out.append(dict(kind="register", mode=mode, key=np.dtype(key_dtype).name, bits=np.dtype(bits).name,
                            f=f, threads=config.global_threads))
    from impl.sort.merge import GPU_MERGE  # the pipeline's merge finish: keys-only, every output width

    for key, outs in (("uint32", ("uint16", "uint32")), ("uint64", ("uint64",))):
        out.append(dict(kind="partition", mode="keys", key=key, bits="int64", threads=GPU_MERGE.probes))
        for o in outs:
            out.append(dict(kind="merge", mode="keys", key=key, bits=o, threads=GPU_MERGE.threads,
                            items=GPU_MERGE.items))
        out.append(dict(kind="merge", mode="keys", key=key, bits=key, threads=GPU_MERGE.threads,
                        items=GPU_MERGE.items, decode=False))  # a tree level's merge: keys stay encoded
    return out


def compile_variant(v: dict) -> dict:
    """PTX of one variant through numba, then ``ptxas -v`` for sm_90: registers, spills, stack, shared bytes."""
    from numba import cuda

    from impl.sort import kernels as K

    if v["kind"] in ("merge", "partition"):
        ptx = merge_ptx(v)
    else:
        if v["kind"] == "block":
            fn = K.make_block_kernel(v["tile"], v["log_e"], v["key"], v["mode"])[1]
        else:
            fn = K.make_register_kernel(v["f"], v["key"], v["mode"], v["threads"])[1]
        sig = K.kernel_signature(v["kind"], np.dtype(v["bits"]), np.dtype(v["key"]), v["mode"])
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0), launch_bounds=v["threads"])
    return {**v, **ptxas_stats(ptx), "local_ops": len(re.findall(r"\b(?:ld|st)\.local", ptx))}


def merge_ptx(v: dict) -> str:
    """PTX of the merge finish's partition or merge kernel (``impl.sort.merge``) for one key / output width."""
    import numba
    from numba import cuda

    from impl.sort import merge as M

    arr = lambda name: numba.types.Array(numba.from_dtype(np.dtype(name)), 1, "C")  # noqa: E731
    i64, u64 = numba.types.int64, numba.types.uint64
    if v["kind"] == "partition":
        sig = (arr(v["key"]), i64, arr(v["key"]), i64, i64, arr("int64"))
        return cuda.compile_ptx(M.partition_kernel(M.GPU_MERGE.probes).py_func, sig, cc=(9, 0))[0]
    decode = v.get("decode", True)
    out = v["bits"] if decode else v["key"]
    kernel = M.merge_kernel(np.dtype(v["key"]), np.dtype(out), v["threads"], v["items"], decode)
    enc = numba.types.Tuple((i64, u64, u64, u64, u64, i64))
    sig = (arr(v["key"]), i64, arr(v["key"]), i64, arr("int64"), arr(out), enc, i64)
    return cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0), launch_bounds=v["threads"])[0]


def ptxas_stats(ptx: str) -> dict:
    """Registers, spill bytes, stack frame and shared memory that ptxas reports for one PTX module."""
    if shutil.which("ptxas") is None:
        return {"ptxas": "absent"}
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(["ptxas", "-arch=sm_90", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr[-2000:]}")
    text = res.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "smem": num(r"(\d+) bytes smem")}


def main(argv: list[str] | None = None) -> list[dict]:
    """Compile the GPU configuration's kernels (or ``--config tiny``), print one JSON line per variant."""
    from impl.sort.network import CPU_CONFIG, GPU_CONFIG

    argv = sys.argv[1:] if argv is None else argv
    config = CPU_CONFIG if "--cpu-config" in argv else GPU_CONFIG
    rows = [compile_variant(v) for v in variants(config)]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def run_in_subprocess(args: tuple[str, ...] = (), timeout: float = 600) -> list[dict]:
    """Run ``main`` in a fresh interpreter that loads numba's real CUDA target (works without a GPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", _BOOTSTRAP, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"kernel compilation failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


if __name__ == "__main__":
    main()
