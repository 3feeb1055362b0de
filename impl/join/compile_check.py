"""Compile every join kernel for the real target (sm_90) without a GPU: ``python -m impl.join.compile_check``.

The simulator and the Triton interpreter run plain Python, so they accept code that the numba-cuda and Triton
compilers reject (type unification, constexpr shapes, dtype promotion). This script, run in its own process by the
CPU tests, compiles the numba kernels to PTX (``cuda.compile_ptx``, cc 9.0) and the Triton kernels to an sm_90 cubin
(``triton.compile`` with a ``GPUTarget``) — compilation only, nothing launches.

It has to switch the two front ends back to the real compilers after ``impl.backend`` picked the interpreters for
this machine: NUMBA_ENABLE_CUDASIM and TRITON_INTERPRET are set to 0 in this process before numba / triton load, and
numba's query for the current device's compute capability is answered with (9, 0). That is safe only because this
process never runs a kernel; the test suite's own processes are untouched.
Prints one JSON object: ``{"numba": {kernel: n_ptx_chars}, "triton": {kernel: n_cubin_bytes}}``; exits 1 on failure.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import impl  # noqa: F401  (decides the backend; overridden below for compilation only)


def compile_numba() -> dict[str, int]:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"  # compile-only process (see the module doc)
    import numba
    from numba import cuda

    if cuda.__name__.endswith("simulator"):
        raise RuntimeError("numba.cuda is already the simulator in this process")
    from numba.cuda import dispatcher

    class _Sm90:  # device functions ask the current device for its compute capability; there is no device here
        compute_capability = (9, 0)

    dispatcher.get_current_device = lambda: _Sm90()
    from impl.join import hash_numba

    out: dict[str, int] = {}
    i64 = numba.int64
    arr = lambda t: numba.types.Array(t, 1, "C")  # noqa: E731
    ks = hash_numba._make_kernels(256, 8)
    for kt in (numba.int32, numba.int64):
        table = (arr(kt), i64, i64, i64, i64, i64)  # table words, buckets, slots, shift, epoch, wide
        for rt in (numba.int32, numba.int64):
            sigs = {
                "build": (arr(kt), *table, arr(i64)),
                "count": (arr(kt), *table, arr(numba.int32), arr(i64), arr(i64), arr(i64), arr(i64)),
                "write": (arr(kt), *table, arr(numba.int32), arr(i64), arr(i64), arr(rt), i64, arr(rt), i64,
                          arr(rt), arr(rt), i64),
            }
            lin = (arr(i64), i64, i64, i64, i64, i64)  # linear64: the table as int64 words, ..., wide
            sigs["lprobe"] = (arr(kt), *lin, arr(rt), i64, arr(rt), i64, arr(rt), arr(rt), i64, arr(i64))
            if rt == numba.int32:
                sigs["lbuild"] = (arr(kt), *lin, arr(i64))
            for name, sig in sigs.items():
                ptx, _ = cuda.compile_ptx(ks[name].py_func, sig, cc=(9, 0))
                out[f"{name}[{kt}-{rt}]"] = len(ptx)
    return out


def compile_triton() -> dict[str, int]:
    os.environ["TRITON_INTERPRET"] = "0"  # compile-only process (see the module doc); read when triton loads
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        raise RuntimeError("triton was imported in interpreter mode before this check switched it off")
    from impl.join import tc_triton

    out: dict[str, int] = {}
    target = GPUTarget("cuda", 90, 32)
    for name, fn, signature, constexprs in tc_triton.compile_specs():
        # Pointers as the launcher specializes them for the suite's (16-byte aligned) tensors: vector loads/stores.
        attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values()) if ty.startswith("*")}
        options = {"num_warps": 8} if name.startswith("tc_partition_scatter") else {}  # TCConfig.scatter_warps
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options=options)
        out[name] = len(compiled.asm["cubin"])
    return out


def main(argv: list[str]) -> int:
    which = argv or ["numba", "triton"]
    report: dict[str, object] = {}
    ok = True
    for part in which:
        try:
            report[part] = {"numba": compile_numba, "triton": compile_triton}[part]()
        except Exception:  # report every failure with its traceback, then fail
            ok = False
            report[part] = {"error": traceback.format_exc()}
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
