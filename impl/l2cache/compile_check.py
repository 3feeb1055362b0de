"""Compile l2cache's prefetching Triton kernels for the real target (sm_90) without a GPU:
``python -m impl.l2cache.compile_check``.

The interpreter cannot run inline PTX, so on a CPU the prefetch runs in its LOG mode (``prefetch.py``); this check
builds the BULK variants the GPU runs — ``triton.compile`` with a ``GPUTarget("cuda", 90, 32)``, compilation only,
nothing launches — and reports, per kernel, the cubin size, the registers per thread, whether the PTX holds
``cp.async.bulk.prefetch.L2.global`` and the SASS ``UBLKPF`` (the instruction ptxas made of it), and the width of
the weight loads (``LDG.E.128``: 16-byte vectors). TRITON_INTERPRET is switched off in this process before triton
loads (``impl.backend`` chose the interpreter for this machine); the CPU tests run it in a process of its own.
Prints one JSON object ``{kernel: {...}}``; exits 1 on failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import impl  # noqa: F401  (decides the backend; overridden below for compilation only)


def _cuobjdump() -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def sass_facts(cubin: bytes) -> dict[str, object]:
    """Registers per thread, bulk-prefetch and 128-bit load counts from the cubin's SASS (``{}`` without cuobjdump)."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, timeout=60).stdout
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    regs = re.search(r"REG:(\d+)", res)
    return {"registers": int(regs.group(1)) if regs else None, "sass_bulk_prefetch": sass.count("UBLKPF"),
            "ldg128": len(re.findall(r"LDG\.E\.128", sass)), "ldg_u16": len(re.findall(r"LDG\.E\.U16", sass))}


def compile_all() -> dict[str, dict[str, object]]:
    os.environ["TRITON_INTERPRET"] = "0"  # compile-only process (see the module doc); read when triton loads
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        raise RuntimeError("triton was imported in interpreter mode before this check switched it off")
    from impl.l2cache import linear, prefetch

    out: dict[str, dict[str, object]] = {}
    target = GPUTarget("cuda", 90, 32)
    for name, fn, signature, constexprs, attrs in linear.compile_specs() + prefetch.compile_specs():
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target)
        out[name] = {"cubin_bytes": len(compiled.asm["cubin"]),
                     "ptx_bulk_prefetch": compiled.asm["ptx"].count(prefetch.BULK_PREFETCH_PTX),
                     **sass_facts(compiled.asm["cubin"])}
    return out


def main() -> int:
    try:
        report: dict[str, object] = compile_all()
        ok = True
    except Exception:
        report, ok = {"error": traceback.format_exc()}, False
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
