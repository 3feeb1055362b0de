"""The FP8 kernels compile for the GPU (sm_90) at their default launch configs, without spilling, on any machine with
Triton's NVIDIA backend: the interpreter runs the kernels' logic, this catches what only the GPU compiler rejects.

The compile runs in a fresh process without TRITON_INTERPRET (``impl`` stubbed so that the backend switch is not
set), with the arguments' divisibility by 16 that the JIT specializes on for the benchmark shapes (without it loads
and stores are scalar and register counts double); registers and local memory come from ``cuobjdump
--dump-resource-usage`` of the cubins.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = r'''
import importlib.util, json, os, subprocess, sys, tempfile, types
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
sys.modules["impl"] = types.ModuleType("impl")
spec = importlib.util.spec_from_file_location("fp8kernels", sys.argv[1])
K = importlib.util.module_from_spec(spec)
spec.loader.exec_module(K)
cfgs = json.loads(sys.argv[2])
F = {"FMT": 0, "FMAX": 448.0, "MIN_SCALE": 2.0 ** -120, "EMULATE": False}
P = {"N": "i32", "K": "i32"}
jobs = []
for gn, gk in ((0, 0), (1, 0), (128, 128)):
    c = cfgs["dequant-block" if gn == 128 else "dequant-channel" if gn == 1 else "dequant-tensor"]
    jobs.append(("dequant", K.dequant_kernel, {"q_ptr": "*u8", "s_ptr": "*fp32", "out_ptr": "*bf16", **P,
        "stride_q": "i32", "stride_s": "i32", "stride_o": "i32"},
        {"GN": gn, "GK": gk, "FMT": 0, "EMULATE": False, "BM": c["bm"], "BK": c["bk"],
         "PREFETCH": c["per_sm"] > 0 and c["stages"] > 1, "EVICT": c["evict"]}, c["warps"]))
QS = {"x_ptr": "*bf16", "s_ptr": "*fp32", "q_ptr": "*u8", "so_ptr": "*fp32", "next_ptr": "*fp32", "clear_ptr": "*fp32",
      **P, "stride_x": "i32", "stride_s": "i32", "stride_q": "i32", "n_parts": "i32"}
for key, gn, gk, fp, nx in (("quant-static", 1, 0, False, False), ("quant-static", 128, 128, False, False),
                            ("requant-tensor", 0, 0, True, False), ("requant-delayed", 0, 0, True, True)):
    c = cfgs[key]
    jobs.append((key, K.quant_static_kernel, QS, {"GN": gn, "GK": gk, "FROM_PARTS": fp, "NEXT_AMAX": nx,
        "PARTS": 1 if nx else 1024, **F, "BM": c["bm"], "BK": c["bk"], "PREFETCH": c["per_sm"] > 0 and c["stages"] > 1,
        "EVICT": c["evict"], "REVERSE": fp and not nx}, c["warps"]))
c = cfgs["amax"]
jobs.append(("amax", K.amax_partials_kernel, {"x_ptr": "*bf16", "part_ptr": "*fp32", **P, "stride_x": "i32"},
             {"BM": c["bm"], "BK": c["bk"], "PREFETCH": c["per_sm"] > 0 and c["stages"] > 1, "EVICT": c["evict"]},
             c["warps"]))
c = cfgs["requant-channel"]
for one, bk in ((True, c["bk"]), (False, 2048)):
    jobs.append(("requant-channel", K.quant_rows_kernel, {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", **P,
        "stride_x": "i32", "stride_q": "i32"}, {**F, "BM": c["bm"], "BK": bk, "ONE_PASS": one, "EVICT": c["evict"]},
        c["warps"]))
TS = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", **P, "stride_x": "i32", "stride_q": "i32", "stride_s": "i32"}
c = cfgs["requant-group"]
jobs.append(("requant-group", K.quant_groups_kernel, TS, {**F, "R": c["bm"] * max(c["bk"], 128) // 128, "GW": 128,
             "CW": 32, "EVICT": c["evict"]}, c["warps"]))
c = cfgs["requant-block"]
jobs.append(("requant-block", K.quant_blocks_kernel, TS, {"GN": 128, **F, "BM": min(c["bm"], 128), "BK": 128,
             "PREFETCH": c["bm"] >= 128 and c["per_sm"] > 0 and c["stages"] > 1, "EVICT": c["evict"]}, c["warps"]))
out = []
for key, fn, sig, consts, warps in jobs:
    # pointers and integer arguments divisible by 16, as Triton's JIT specializes them for the benchmark shapes
    # (aligned buffers, N, K and strides multiples of 16): vector loads and stores, the registers the GPU sees
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in sig if a != "n_parts"}
    src = triton.compiler.ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts,
                                    attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    use = subprocess.run([sys.argv[3], "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    fields = dict(kv.split(":") for kv in next(l for l in use.splitlines() if "REG:" in l).split() if ":" in kv
                  and kv.split(":")[1].isdigit())
    out.append({"kernel": key, "name": fn.__name__, "consts": {k: v for k, v in consts.items() if k in
                ("GN", "GK", "BM", "BK", "R", "ONE_PASS", "FROM_PARTS", "NEXT_AMAX", "PREFETCH", "EVICT", "REVERSE")},
                "warps": warps,
                "regs": int(fields["REG"]), "local": int(fields["LOCAL"]), "stack": int(fields["STACK"])})
print(json.dumps(out))
'''


def _tools():
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as e:
        return None, f"Triton's NVIDIA backend is missing ({e})"
    nv = Path(sys.modules["triton"].__file__).parent / "backends" / "nvidia" / "bin"
    cuobjdump = shutil.which("cuobjdump") or (str(nv / "cuobjdump") if (nv / "cuobjdump").exists() else None)
    if cuobjdump is None:
        return None, "no cuobjdump (neither on PATH nor shipped with Triton)"
    return cuobjdump, None


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spilling():
    from dataclasses import asdict

    from impl.fp8.quant import GPU_CONFIGS

    cuobjdump, why = _tools()
    if why:
        pytest.skip(why)
    cfgs = {k: asdict(v) for k, v in GPU_CONFIGS.items()}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "impl" / "fp8" / "kernels.py"), json.dumps(cfgs),
                        cuobjdump], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 12
    spilled = [x for x in rows if x["local"] or x["stack"]]
    assert not spilled, f"default configs that spill: {spilled}"
    assert max(x["regs"] for x in rows) <= 160, sorted((x["regs"], x["kernel"]) for x in rows)  # delayed: ~140
