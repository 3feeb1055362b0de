"""Compile the W8A16 kernel for sm_90a on any machine and read what the GPU would run: no GPU needed.

    python -m impl.serve.ptx_check [--m 1] [--config '{"block_n": 16, "block_k": 512, "splits": 4}'] [--pdl]
    (a config's own "m" key overrides --m for it)

Triton compiles ``fp8_gemv.gemv_kernel`` to PTX for Hopper with the argument properties of a serving call (16-byte
aligned pointers, sizes divisible by 16, M == 1 specialised), then ``ptxas`` (Triton's own) assembles it. Printed as
JSON: registers per thread, spill bytes, shared memory, and counts of the instructions the design relies on: 16-byte
global loads (``ld.global.v4``: 16 FP8 weights per load), tensor-core ops, the split-K atomics and PDL's
``griddepcontrol``. Runs in a fresh process: it switches the Triton interpreter off before the kernel module is
imported (on a machine without a GPU, ``impl.backend`` switches it on).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PATTERNS = {"ld_global_v4": r"ld\.global(\.\w+)*\.v4\.b32", "ld_global_cg": r"ld\.global\.cg", "atom": r"\batom\.",
            "mma": r"\bmma\.sync", "wgmma": r"\bwgmma\.mma_async", "griddepcontrol": r"griddepcontrol\.",
            "bar_sync": r"\bbar\.sync", "cp_async": r"\bcp\.async\.(?:ca|cg)", "tma": r"cp\.async\.bulk(?!\.prefetch)",
            "prefetch_l2": r"cp\.async\.bulk\.prefetch\.L2",
            "cvt_e4m3": r"\bcvt\.rn\.f16x2\.e4m3x2", "mul_bf16x2": r"\bmul\.rn\.bf16x2"}


def compile_ptx(cfg_dict: dict[str, Any], m: int, pdl: bool = False, swiglu: bool = False) -> tuple[str, dict]:
    """(PTX, metadata) of gemv_kernel for sm_90a, compiled as a call with M rows and this config would be."""
    import impl  # noqa: F401  (may switch the interpreter on: switched off below for the kernel's own module)

    if "impl.serve.fp8_gemv" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from impl.serve.fp8_gemv import GemvConfig, gemv_kernel, prefetch_chunks

    if not isinstance(gemv_kernel, JITFunction):
        raise RuntimeError("run ptx_check in a fresh process: impl.serve.fp8_gemv was imported with the interpreter")

    cfg = GemvConfig.from_dict(cfg_dict)
    ints = ["M", "N", "K", "k_per_split", "num_splits", "stride_xm", "stride_wn", "stride_ym", "pf_bytes"]
    x_t = "fp8e4nv" if cfg.a8 else "bf16"
    sig = {"x_ptr": f"*{x_t}", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16", "sx_ptr": "*fp32",
           "ws_ptr": "*fp32", "cnt_ptr": "*i32", **{k: "i32" for k in ints}}
    split = cfg.splits > 1
    consts = dict(PER_TENSOR=False, SWIGLU=swiglu, SPLIT=split, DOT=cfg.dot, A8=cfg.a8, FP8_DOT=True,
                  DOT_PRECISION="tf32", USE_PDL=pdl, BLOCK_M=cfg.rows_per_tile(m), BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k, BITS=cfg.bits, PREFETCH=cfg.prefetch > 0, CHUNKS=prefetch_chunks(cfg))
    if m == 1:
        consts["M"] = 1
    if not split:
        consts["num_splits"] = 1
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    aligned = ["x_ptr", "w_ptr", "s_ptr", "y_ptr", "sx_ptr", "ws_ptr", "cnt_ptr", "N", "K", "k_per_split",
               "stride_xm", "stride_wn", "stride_ym"] + (["M"] if m % 16 == 0 else [])
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned if sig[a] != "constexpr"}
    src = ASTSource(fn=gemv_kernel, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return kernel.asm["ptx"], {"shared_bytes": kernel.metadata.shared}


def ptxas_info(ptx: str) -> dict[str, Any]:
    """Registers and spill bytes from ``ptxas -v`` (Triton's bundled ptxas, else the one on PATH)."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    exe = str(bundled) if bundled.exists() else "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([exe, "-arch=sm_90a", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr.strip()[:500]}")
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spill)}


def inspect(cfg_dict: dict[str, Any], m: int, pdl: bool = False, swiglu: bool = False) -> dict[str, Any]:
    ptx, meta = compile_ptx(cfg_dict, m, pdl, swiglu)
    counts = {k: len(re.findall(p, ptx)) for k, p in PATTERNS.items()}
    order = {"prefetch_before_wait": first_before(ptx, PATTERNS["prefetch_l2"], r"griddepcontrol\.wait"),
             "prefetch_before_loads": first_before(ptx, PATTERNS["prefetch_l2"], r"\bcp\.async\.cg|ld\.global")}
    return {"config": cfg_dict, "m": m, "pdl": pdl, "swiglu": swiglu, **meta, **ptxas_info(ptx), **counts, **order}


def first_before(ptx: str, a: str, b: str) -> bool | None:
    """Whether the first match of ``a`` comes before the first of ``b`` in the PTX (None if either is missing)."""
    ma, mb = re.search(a, ptx), re.search(b, ptx)
    return None if ma is None or mb is None else ma.start() < mb.start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.serve.ptx_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--config", action="append", default=None, help="GemvConfig fields as JSON (repeatable)")
    p.add_argument("--pdl", action="store_true")
    p.add_argument("--swiglu", action="store_true")
    a = p.parse_args(argv)
    for c in a.config or ["{}"]:
        cfg = json.loads(c)
        m = cfg.pop("m", a.m)
        print(json.dumps(inspect(cfg, m, a.pdl, a.swiglu)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
