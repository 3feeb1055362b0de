"""Launch-config sweep for the FP8 kernels: check every candidate, then time it, within a wall-clock budget.

    python -m impl.fp8.tune [--out DIR] [--budget-s 60] [--shapes 14336x4096 ...] [--no-store]

For each kernel (dequantize with tensor / channel / 128x128-block scales; requantize with dynamic tensor (amax
partials + quantize; and the delayed single-read variant), channel, 1x128 group and 128x128 block scales) and each
candidate ``quant.LaunchConfig``:
  1. check: fresh random input of an awkward shape (tiles cut by both edges), outputs poisoned; codes and scales
     must equal ``reference`` bit for bit (dequantize: the float32 product, exactly);
  2. time: ``impl.common.timing.time_fn`` (device events, queued, L2 flushed before each call, median) on the
     first shape of each shape class (``launch.shape_class``: "large" 14336x4096, "small" 4096x4096, "wide"
     4096x14336 of a Llama-3-8B layer), each kernel within an equal slice of 80% of the budget; then each class's
     winner and the default on the other shapes.
The candidates of a kernel, in this order: the active table's entries for the classes (the previous run's winners)
and the built-in default (``launch.GPU_CONFIGS``), always timed; then ``CANDIDATES`` while the kernel's slice lasts.
The fastest checked one per kernel and class forms the new ``launch.LaunchTable`` (the first shape's class also as
the entry for every shape, which tables without classes hold).
Bandwidth is compulsory bytes (inputs read once, outputs written once) over time, as % of this run's measured copy
bandwidth; per-tensor dynamic also against its two-read bound. Prints a table; writes ``DIR/tune.json`` (every
row, the winners, ``complete``) and ``DIR/launch_table.json``, and on a GPU both also as
``results/<card>/fp8/{tune,launch_table}.json``, which the kernels and benches of later processes use
(``impl.fp8.launch``). Stops starting new work when the budget is spent (the table then holds the kernels it
measured; the others keep their built-in defaults). On a CPU it runs at tiny size under the interpreter (proof that
it runs; its times mean nothing) and writes only under DIR.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from impl import backend
from impl.common.shapes import LLAMA3_8B
from impl.fp8 import launch, quant
from impl.fp8 import reference as R
from impl.fp8.formats import get_group
from impl.fp8.quant import LaunchConfig as C

GPU_SHAPES = LLAMA3_8B.kernel_matrices()
CPU_SHAPES = [(64, 256)]
# multiples of 16 (the big shapes' specialization) that no tile divides; requant-channel also on rows wider than
# 8192 (the "wide" class: a row's width picks its one-pass block and warps, ``quant._launch_rows``)
CHECK_SHAPES = {"*": [(272, 1040)], "requant-channel": [(272, 1040), (48, 8208)]}

# kernel key (impl.fp8.launch.KERNELS) -> candidates C(bm, bk, warps, stages, per_sm, evict), most likely winner
# first (the budget may stop a kernel's list early; its built-in default and the active table's entries are timed
# before these). First the last run's winners with the streamed data evict_first in L2 (evict 2: loads and stores,
# 1: loads): a stream that recycles its own lines does not evict (and write back) the dirty lines other work left
# in L2, as a kernel in a model finds them after the one before it.
# 1 x 128 groups: tiles of 64 groups over 4 warps (64 values a thread, 89 registers), 128 over 8, 32 over 4 or 2,
# a persistent grid. Rows read once and 128 x 128 blocks held whole with 64 values a thread (4096-wide rows: 2 warps,
# 84 registers; blocks: 8 warps, 100 registers): sm_90 SASS of 9 and 11 instructions an element against 12 and 15
# at 32 values a thread, where the issue slots are a requantize's limit (about 20 an element at the H200's copy
# bandwidth). Then one-pass 128 x 128 blocks held in registers (32 warps, 46 registers: one program of 32
# warps per SM that prefetches its next block), then the earlier runners-up. Every candidate is timed on each shape
# class's shape and a class keeps its fastest (requant-channel's evict 0 variant comes early: on 4096x14336 evict 2
# lost). Registers: ptxas for sm_90 with the arguments' divisibility by 16 that Triton's JIT specializes on
# (test_fp8_compile).
# requant-delayed: row-wide tiles first, persistent or one program a tile (each program max-es its amax into one
# float, so any grid hands on one value; on an H100 1 x 4096 tiles of 4 warps, 16 programs an SM, led the sweep).
CANDIDATES: dict[str, list[C]] = {
    "dequant-tensor": [C(4, 512, 4, 1, 0, 2), C(4, 512, 4, 1, 0, 1), C(8, 512, 4, 1, 0, 2), C(16, 512, 8, 1, 0, 2),
                       C(8, 1024, 4), C(16, 512, 8)],
    "dequant-channel": [C(16, 256, 4, 1, 0, 2), C(16, 256, 4, 1, 0, 1), C(8, 1024, 4, 1, 0, 2), C(8, 1024, 8, 1, 0, 2),
                        C(8, 1024, 4), C(8, 1024, 8)],
    "dequant-block": [C(8, 1024, 4, 1, 0, 2), C(8, 1024, 4, 1, 0, 1), C(16, 512, 8, 1, 0, 2), C(4, 1024, 4, 1, 0, 2),
                      C(4, 1024, 4), C(16, 512, 8)],
    "requant-tensor": [C(4, 512, 4, 1, 0, 2), C(4, 512, 4, 1, 0, 1), C(8, 512, 4, 1, 0, 2), C(8, 512, 4, 2, 8, 2),
                       C(8, 512, 4), C(16, 512, 8)],
    "amax": [C(4, 512, 4, 2, 16), C(8, 1024, 8, 2, 4), C(4, 2048, 8, 2, 4), C(8, 512, 4, 1, 8), C(4, 512, 4, 1, 16)],
    "requant-delayed": [C(1, 4096, 4, 2, 16), C(1, 4096, 4, 2, 4, 2), C(2, 2048, 8, 2, 16), C(8, 512, 4, 2, 8),
                        C(1, 4096, 4), C(1, 16384, 16), C(4, 512, 4, 2, 8, 2), C(2, 1024, 4, 2, 16, 2),
                        C(4, 512, 4, 1, 0, 2)],
    "requant-channel": [C(1, 16384, 16, 1, 0, 2), C(1, 16384, 16), C(1, 16384, 16, 1, 0, 1), C(1, 8192, 4, 1, 0, 2),
                        C(1, 8192, 4), C(1, 4096, 8),
                        C(2, 8192, 16, 1, 0, 2)],  # (1, 16384, 16): 4096x14336 75% of copy at evict 0, 53% at 2
    "requant-group": [C(8, 1024, 4, 1, 0, 2), C(8, 1024, 4, 1, 0, 1), C(16, 1024, 8, 1, 0, 2), C(4, 1024, 4, 1, 0, 2),
                      C(8, 1024, 4, 1, 8, 2), C(4, 1024, 2, 1, 0, 2), C(8, 1024, 4)],
    "requant-block": [C(128, 128, 32, 2, 2, 2), C(128, 128, 32, 2, 2), C(32, 128, 8, 1, 0, 2), C(32, 128, 8, 1, 0, 1),
                      C(128, 128, 8, 1, 0, 2), C(128, 128, 8),
                      C(128, 128, 16, 1, 0, 2), C(128, 128, 32, 1, 0, 2), C(64, 128, 8)],
}
CPU_CANDIDATES = 1  # under the interpreter: the first candidate of each kernel only


def _hi() -> torch.dtype:
    return torch.bfloat16 if backend.ON_GPU and not backend.INTERPRETED else torch.float32


def _scale_bytes(group: str, n: int, k: int) -> int:
    r, c = get_group(group).scale_shape(n, k)
    return 4 * r * c


def case(kernel: str, n: int, k: int, cfg: C, seed: int = 0) -> tuple[Callable[[], Any], int, int, Callable[[], None]]:
    """(fn, compulsory bytes, traffic bytes, check) for one kernel, shape and config; ``check`` raises on a wrong
    result (outputs poisoned first)."""
    dev, hi = backend.DEVICE, _hi()
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(n, k, device=dev, dtype=hi, generator=g) * 3
    esz = x.element_size()
    if kernel.startswith("dequant"):
        group = kernel.split("-")[1]
        q, s = quant.quantize(x, group)
        out = torch.empty(n, k, device=dev, dtype=hi)

        def fn():
            return quant.dequantize(q, s, group, out=out, cfg=cfg)

        def check():
            out.fill_(float("nan"))
            fn()
            want = R.dequantize_reference(q.cpu(), s.cpu(), group, "e4m3", hi)
            if not torch.equal(out.cpu().view(torch.int16 if esz == 2 else torch.int32),
                               want.view(torch.int16 if esz == 2 else torch.int32)):
                raise AssertionError(f"{kernel} {cfg}: dequantized values differ from the reference")

        nbytes = n * k + _scale_bytes(group, n, k) + n * k * esz
        return fn, nbytes, nbytes, check
    if kernel == "amax":
        x2 = x

        def fn():
            return quant.amax_partials(x2, cfg)

        def check():
            got = float(fn().max())
            want = float(x.float().abs().max())
            if got != want:
                raise AssertionError(f"amax {cfg}: {got} != {want}")

        return fn, n * k * esz, n * k * esz, check
    if kernel == "requant-delayed":
        _, _, state = quant.quantize_delayed(x, cfg=cfg)

        def fn():
            return quant.quantize_delayed(x, state, cfg=cfg)

        def check():
            q, s, _ = fn()
            rq, rs = R.quantize_reference(x, "tensor")  # x unchanged: the previous call's scale is its own
            if not (torch.equal(q.view(torch.uint8).cpu(), rq) and torch.equal(s.cpu(), rs)):
                raise AssertionError(f"{kernel} {cfg}: codes or scale differ from the reference")

        nbytes = n * k * esz + n * k + 4
        return fn, nbytes, nbytes, check
    group = kernel.split("-")[1]
    shape = get_group(group).scale_shape(n, k)
    out = torch.empty(n, k, device=dev, dtype=torch.uint8)
    s_out = torch.empty(shape, device=dev, dtype=torch.float32)

    def fn():
        return quant.quantize(x, group, out=out, scales_out=s_out, cfg=cfg)

    def check():
        out.fill_(0xFF)
        s_out.fill_(float("nan"))
        fn()
        rq, rs = R.quantize_reference(x, group)
        if not (torch.equal(out.cpu(), rq) and torch.equal(s_out.cpu(), rs)):
            raise AssertionError(f"{kernel} {cfg}: codes or scales differ from the reference")

    nbytes = n * k * esz + n * k + _scale_bytes(group, n, k)
    traffic = nbytes + (n * k * esz if group == "tensor" else 0)
    return fn, nbytes, traffic, check


def time_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median ms of ``fn``, the L2 flushed before each call."""
    from impl.common.timing import time_fn

    return time_fn(fn, warmup=2, reps=reps, queue_ahead=backend.ON_GPU).median_ms


def _default(kernel: str) -> C:
    return launch.builtin(kernel)


def class_shapes(shapes: list[tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The shape each class is tuned on: the first of ``shapes`` in that class (``launch.shape_class``), the first
    shape's class first (its winners are also the table's entry for every shape)."""
    reps: dict[str, tuple[int, int]] = {}
    for n, k in shapes:
        reps.setdefault(launch.shape_class(n, k), (n, k))
    return reps


def candidates(kernel: str, classes: list[str] | None = None) -> tuple[list[C], int]:
    """(configs, protected): the active table's entries of ``kernel`` for ``classes`` (the previous run's winners,
    re-timed first), the built-in default, then ``CANDIDATES``, each once; the first ``protected`` are timed even
    when the kernel's slice is spent (not past the whole budget)."""
    table = launch.active_table()
    previous = [c for c in (table.get(kernel, cls) for cls in (classes or [None])) if c is not None]
    protected = list(dict.fromkeys(previous + [_default(kernel)]))
    rest = [c for c in dict.fromkeys(CANDIDATES[kernel]) if c not in protected]
    if backend.INTERPRETED or not backend.ON_GPU:
        rest = rest[: CPU_CANDIDATES]
    return protected + rest, len(protected)


def _time(kernel: str, cfg: C, n: int, k: int, reps: int) -> tuple[float, int, int]:
    """(median ms, compulsory bytes, traffic bytes) of ``kernel`` with ``cfg`` on a fresh [n, k] input."""
    fn, nbytes, traffic, _ = case(kernel, n, k, cfg)
    return time_ms(fn, reps), nbytes, traffic


def sweep(shapes: list[tuple[int, int]], budget_s: float, kernels: list[str], copy_gbps: float | None, *,
          reps: int, log: Callable[..., Any] = print) -> dict[str, Any]:
    """Phase 1 (80% of the budget, an equal slice a kernel; time a kernel leaves is the next one's): each candidate
    checked, then timed on the shape of every class (``class_shapes``); the fastest per class wins. Then the class
    winners and the default on the other shapes."""
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    winners: dict[str, dict[str, Any]] = {}
    complete = True
    gpu = backend.ON_GPU and not backend.INTERPRETED
    reps_of = class_shapes(shapes)
    classes = list(reps_of)

    def over() -> bool:
        return time.perf_counter() - t0 > budget_s

    def row(kernel, cfg, n, k, ms, nbytes, traffic, role):
        gbps = nbytes / (ms * 1e-3) / 1e9 if ms else None
        r = {"kernel": kernel, "config": asdict(cfg), "n": n, "k": k, "class": launch.shape_class(n, k),
             "us": ms * 1e3 if ms else None, "gbps": gbps, "bytes": nbytes, "traffic_bytes": traffic, "role": role}
        if copy_gbps and gbps:
            r["pct_copy"] = 100 * gbps / copy_gbps
            r["pct_traffic_bound"] = 100 * gbps * traffic / nbytes / copy_gbps
        rows.append(r)
        return r

    best: dict[str, dict[str, C]] = {}  # kernel -> class -> the fastest config on the class's shape
    for i, kernel in enumerate(kernels):
        deadline = t0 + 0.8 * budget_s * (i + 1) / len(kernels)
        cands, protected = candidates(kernel, classes)
        fastest: dict[str, tuple[C, dict[str, Any]]] = {}
        default_us: dict[str, float] = {}
        for j, cfg in enumerate(cands):
            if (j >= protected and time.perf_counter() > deadline) or over():  # the protected stop at the budget
                complete = False
                log(f"{kernel}: slice spent, {len(cands) - j} candidates not run")
                break
            try:
                for cn, ck in CHECK_SHAPES.get(kernel, CHECK_SHAPES["*"]) if gpu else [(40, 200)]:
                    case(kernel, cn, ck, cfg, seed=int(time.time()) & 0xFFFF)[3]()
            except Exception as e:  # noqa: BLE001  (a candidate that fails its check is reported, never timed)
                rows.append({"kernel": kernel, "config": asdict(cfg), "error": f"{type(e).__name__}: {e}"})
                log(f"{kernel} {cfg}: CHECK FAILED {e}")
                continue
            role = "default" if cfg == _default(kernel) else "previous" if j < protected else "candidate"
            for cls, (n, k) in reps_of.items():
                r = row(kernel, cfg, n, k, *_time(kernel, cfg, n, k, reps), role)
                if role == "default":
                    default_us[cls] = r["us"]
                if cls not in fastest or r["us"] < fastest[cls][1]["us"]:
                    fastest[cls] = (cfg, r)
        if fastest:
            best[kernel] = {cls: cfg for cls, (cfg, _) in fastest.items()}
            per = {cls: {"config": asdict(cfg), "us": r["us"], "default_us": default_us.get(cls),
                         "shape": [r["n"], r["k"]]} for cls, (cfg, r) in fastest.items()}
            first = per[classes[0]]
            winners[kernel] = {**first, "class": classes[0], "classes": per}
    for n, k in shapes:  # phase 2: the class's winner and the default on the shapes no class was tuned on
        if (n, k) in reps_of.values():
            continue
        for kernel, per in best.items():
            cfg_best = per[launch.shape_class(n, k)]
            for cfg, role in ((cfg_best, "best"), (_default(kernel), "default")):
                if role == "default" and cfg == cfg_best:
                    continue
                if over():
                    complete = False
                    break
                row(kernel, cfg, n, k, *_time(kernel, cfg, n, k, reps), role)
    from impl.common.results import RUN_ID

    found = launch.LaunchTable({k: C(**w["config"]) for k, w in winners.items()}, origin="tune run",
                               selected_in_run=RUN_ID,
                               classes={k: {c: C(**v["config"]) for c, v in w["classes"].items()}
                                        for k, w in winners.items()})
    return {"rows": rows, "winners": winners, "table": found.to_data(), "complete": complete,
            "seconds": time.perf_counter() - t0, "copy_gbps": copy_gbps, "shapes": [list(s) for s in shapes],
            "class_shapes": {c: list(s) for c, s in reps_of.items()},
            "device": backend.describe(), "resident_errors": list(dict.fromkeys(quant.RESIDENT_ERRORS))}


def table(data: dict[str, Any]) -> str:
    lines = [f"{'kernel':16} {'config (bm,bk,warps,stages,per_sm,evict)':40} {'shape':12} {'class':6} {'us':>9} "
             f"{'% copy':>7} {'% bound':>7} role"]
    for r in data["rows"]:
        c = r["config"]
        cfg = f"({c['bm']},{c['bk']},{c['warps']},{c['stages']},{c['per_sm']},{c.get('evict', 0)})"
        if "error" in r:
            lines.append(f"{r['kernel']:16} {cfg:40} CHECK FAILED: {r['error'][:60]}")
            continue
        pct = f"{r['pct_copy']:7.1f}" if "pct_copy" in r else f"{'-':>7}"
        bound = f"{r['pct_traffic_bound']:7.1f}" if "pct_traffic_bound" in r else f"{'-':>7}"
        lines.append(f"{r['kernel']:16} {cfg:40} {r['n']}x{r['k']:<7} {r.get('class', '-'):6} {r['us']:9.1f} {pct} "
                     f"{bound} {r['role']}")
    lines.append("launch table (fastest checked config per kernel and shape class): " + "; ".join(
        f"{k}: " + ", ".join(f"{c} ({', '.join(str(v) for v in e['config'].values())})"
                             + (f" {e['default_us'] / e['us']:.2f}x default" if e.get("default_us") else "")
                             for c, e in w.get("classes", {w.get("class", "-"): w}).items())
        for k, w in data["winners"].items()))
    return "\n".join(lines)


def write_outputs(data: dict[str, Any], out_dir: Path | None, store: bool = True) -> list[Path]:
    """DIR/tune.json and DIR/launch_table.json (DIR = ``out_dir``, if given); on a GPU with ``store`` also
    results/<card>/fp8/ through ``write_result`` (the stored table the kernels of later processes take)."""
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, payload in (("tune", data), (launch.TABLE_RESULT, data["table"])):
        if store and backend.ON_GPU and not backend.INTERPRETED:
            import shutil

            from impl.common.results import write_result

            p = write_result("fp8", name, payload, overwrite=True)
            paths.append(p)
            if out_dir is not None:
                paths.append(Path(shutil.copyfile(p, out_dir / p.name)))
        else:
            record = {"device": backend.describe(), "data": payload}
            (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
            paths.append(out_dir / f"{name}.json")
    return paths


GPU_STEP_ARGS = ["--budget-s", "60"]
"""``python -m impl gpu fp8`` runs ``python -m impl.fp8.tune`` with these arguments before the tests and benches, so
they launch with the table measured in the same run."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.fp8.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for copies of tune.json and launch_table.json (a GPU run stores them under "
                        "results/<card>/fp8/ anyway)")
    p.add_argument("--budget-s", type=float, default=60)
    p.add_argument("--shapes", nargs="*", help="NxK shapes; the first one picks the winners")
    p.add_argument("--kernels", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-store", action="store_true",
                   help="write only under --out, not the card's stored table (tests; partial sweeps)")
    a = p.parse_args(argv)
    gpu = backend.ON_GPU and not backend.INTERPRETED
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes] if a.shapes else \
        (GPU_SHAPES if gpu else CPU_SHAPES)
    copy_gbps = None
    if gpu:
        from impl.common.calibrate import measure_copy_gbps

        copy_gbps = measure_copy_gbps()
    data = sweep(shapes, a.budget_s, a.kernels, copy_gbps, reps=a.reps if gpu else 1)
    if a.out is None and (a.no_store or not gpu):
        p.error("--out is needed where nothing is stored (no GPU, or --no-store)")
    paths = write_outputs(data, a.out, store=not a.no_store)
    print(table(data))
    if quant.RESIDENT_ERRORS:
        print("persistent grids NOT capped at the resident programs (compiled kernels not inspectable): "
              + "; ".join(dict.fromkeys(quant.RESIDENT_ERRORS)))
    print(f"wrote {', '.join(str(p) for p in paths)} ({len(data['rows'])} rows, {data['seconds']:.0f} s, "
          f"complete: {data['complete']}, copy {copy_gbps or float('nan'):.0f} GB/s)")
    return 0 if not any("error" in r for r in data["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
