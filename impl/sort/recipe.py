"""The sort's GPU experiments beyond the pytest benches, as functions (``run`` does them all; the command line is
``experiments.py``): where the time goes, and what the knobs do.

passes     each pass of the 10M float32 sort (CUDA C++ passes) timed alone (L2 flushed): ms, GB/s, % of the copy
           peak, by kind; ``min_pct_copy_bw`` feeds the per-pass claim (the wider search is ``impl.sort.tune``)
numba_tune the numba sorter, one knob at a time around its default config (the CPU-runnable implementation; the
           CUDA C++ sorter's configurations are tuned by ``impl.sort.tune``, which writes ``tune`` and
           ``config_table``)
transfers  host<->device copies from pageable vs pinned memory at 4 / 40 / 400 MB
pipeline   host-to-host sort: chunks 1/2/4/8 pinned vs naive pageable; staged (pinned buffer, graph) chunks
           1/2/4/8/16/32, 4/8 without early merges, 8 on two compute lanes, 8 and 16 finished by the network's last
           stage instead of the merge, 8 with t14e5r5's passes; the staged copies alone (round trip, no pass: the
           floor of a staged sort) in 1 and 8 chunks; at 10M (and 100M without --quick)
ncu        Nsight Compute over one 10M float32 sort: DRAM bytes, occupancy, registers, bank conflicts per pass
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from typing import Any

import impl  # noqa: F401  (backend before numba)
import numpy as np
from numba import cuda

from impl import backend
from impl.common.log import logger
from impl.common.results import ROOT, write_result
from impl.common.timing import time_fn
from impl.sort.bitonic import BitonicSorter, SortGraph
from impl.sort.network import GPU_CONFIG, default_config, make_program
from impl.sort.pipeline import NAIVE, STAGED, HostSortPipeline, PipelineConfig

NCU_METRICS = ("gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,"
               "dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,"
               "sm__warps_active.avg.pct_of_peak_sustained_active,sm__maximum_warps_per_active_cycle_pct,"
               "launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,"
               "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,"
               "smsp__inst_executed.sum,sm__inst_executed_pipe_alu.sum,"
               "smsp__issue_active.avg.pct_of_peak_sustained_active,"
               "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,"
               "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,"
               "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active")
log = logger("sort")


def copy_gbps() -> float | None:
    from impl.common.calibrate import calibrate

    return (calibrate() or {}).get("copy_gbps") if backend.ON_GPU else None


def random_keys(n: int, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        return rng.standard_normal(n, dtype=np.float32)
    return rng.integers(-(2**31), 2**31 - 1, n, dtype=np.int32)


def warmup_for(reps: int) -> int:
    return 2 if reps > 2 else 0  # smoke runs (reps <= 2) only prove the code runs


def timed_sort(sorter, d_x, d_out, reps: int) -> tuple[float, str]:
    """Median ms of one whole sort, graph-replayed where possible (else direct launches), and which it was."""
    try:
        if isinstance(sorter, BitonicSorter):
            run, how = SortGraph(sorter, d_x, d_out), "graph"
        else:
            run, how = sorter.graph(d_x, d_out), "graph" if backend.ON_GPU else "replayed launches (emulation)"
    except Exception as e:  # simulator, or a capture problem on this machine
        run, how = (lambda: sorter(d_x, d_out)), f"direct ({type(e).__name__})"
    return time_fn(run, warmup=warmup_for(reps), reps=reps, queue_ahead=True).median_ms, how


def exp_passes(n: int, reps: int, peak: float | None) -> dict[str, Any]:
    """Every pass of the keys and kv sorts of n float32 keys (the CUDA C++ passes; numba's where they cannot run),
    each timed alone with the L2 flushed, in the queued view."""
    from impl.sort.bitonic import make_sorter
    from impl.sort.plan import EMU_CUDA_CONFIG

    out: dict[str, Any] = {"n": n}
    x = cuda.to_device(random_keys(n))
    config = None if backend.ON_GPU else EMU_CUDA_CONFIG  # CPU smoke: the emulated CUDA C++ passes
    for mode in ("keys", "kv"):
        sorter = make_sorter(n, np.float32, argsort=mode == "kv", config=config)
        d_out = cuda.device_array(n, dtype=sorter.out_dtype)
        sorter(x, d_out)  # compile; fill the workspace
        rows = []
        for i, (p, nbytes) in enumerate(zip(sorter.plan.passes, sorter.bytes_per_pass())):
            ms = time_fn(lambda i=i: sorter.launch_pass(i, x, d_out), warmup=warmup_for(reps), reps=reps,
                         queue_ahead=True).median_ms
            gbps = nbytes / ms / 1e6
            rows.append({"kind": p.kind, "steps": p.steps if isinstance(p.steps, int) else len(p.steps),
                         "bytes": nbytes, "ms": ms, "gbps": gbps, "pct_copy_bw": 100 * gbps / peak if peak else None})
        whole, how = timed_sort(sorter, x, d_out, reps)
        pcts = [r["pct_copy_bw"] for r in rows if r["pct_copy_bw"] is not None]
        out[mode] = {"passes": rows, "total_ms": sum(r["ms"] for r in rows), "whole_sort_ms": whole, "launch": how,
                     "implementation": type(sorter).__name__, "tile": sorter.tile,
                     "config": str(getattr(sorter, "config", None)),
                     "bytes_total": sum(sorter.bytes_per_pass()), "min_pct_copy_bw": min(pcts) if pcts else None,
                     "min_merge_pct_copy_bw": min((r["pct_copy_bw"] for r in rows[1:] if r["pct_copy_bw"]),
                                                  default=None)}
        log(f"passes {mode}: {len(rows)} passes, summed {out[mode]['total_ms']:.3f} ms, whole sort {whole:.3f} ms "
            f"({how})")
    return out


def tune_configs(quick: bool, smoke: bool = False) -> list[tuple[str, Any]]:
    base = default_config()
    knobs = [("default", base), ("wide=shared", replace(base, wide="shared"))]
    if smoke:
        return knobs
    knobs += [("fused_strides=5", replace(base, fused_strides=5)), ("global_threads=128", replace(base, global_threads=128)),
              ("items_per_thread=8", replace(base, items_per_thread=8))]
    if not quick:
        knobs += [("fused_strides=3", replace(base, fused_strides=3)),
                  ("fused_strides=6", replace(base, fused_strides=6)),
                  ("global_threads=512", replace(base, global_threads=512)),
                  ("shared_bytes=16384", replace(base, shared_bytes=16384)),
                  ("items_per_thread=32", replace(base, items_per_thread=32))]
    return knobs


def exp_tune(n: int, reps: int, quick: bool, smoke: bool = False) -> dict[str, Any]:
    x = cuda.to_device(random_keys(n))
    rows = []
    for label, cfg in tune_configs(quick, smoke):
        for mode in ("keys", "kv"):
            sorter = BitonicSorter(n, np.float32, argsort=mode == "kv", config=cfg)
            d_out = cuda.device_array(n, dtype=sorter.out_dtype)
            ms, how = timed_sort(sorter, x, d_out, reps)
            rounds = sum(len(make_program(p, sorter.plan.tile, cfg.log_e).rounds) for p in sorter.plan.passes)
            rows.append({"label": label, "mode": mode, "config": asdict(cfg), "ms": ms, "launch": how,
                         "passes": len(sorter.plan.passes), "rounds": rounds, "tile": sorter.plan.tile})
            log(f"tune {label:32s} {mode:4s}: {ms:.3f} ms, {len(sorter.plan.passes)} passes, {rounds} rounds")
    best = {m: min((r for r in rows if r["mode"] == m), key=lambda r: r["ms"])["label"] for m in ("keys", "kv")}
    return {"n": n, "rows": rows, "best": best}


def exp_transfers(sizes: list[int], reps: int) -> dict[str, Any]:
    rows = []
    for nbytes in sizes:
        n = nbytes // 4
        dev = cuda.device_array(n, np.float32)
        for memory in ("pageable", "pinned"):
            host = cuda.pinned_array(n, np.float32) if memory == "pinned" else np.empty(n, np.float32)
            host[:] = 1.0
            h2d = time_fn(lambda: dev.copy_to_device(host), warmup=warmup_for(reps), reps=reps, flush=False).median_ms
            d2h = time_fn(lambda: dev.copy_to_host(host), warmup=warmup_for(reps), reps=reps, flush=False).median_ms
            rows.append({"bytes": nbytes, "memory": memory, "h2d_ms": h2d, "d2h_ms": d2h,
                         "h2d_gbps": nbytes / h2d / 1e6, "d2h_gbps": nbytes / d2h / 1e6})
            log(f"transfers {nbytes / 1e6:7.1f} MB {memory:8s}: H2D {h2d:.3f} ms, D2H {d2h:.3f} ms")
    at = {r["memory"]: r["h2d_ms"] for r in rows if r["bytes"] == sizes[len(sizes) // 2]}
    return {"rows": rows, "h2d_pageable_over_pinned_mid": at["pageable"] / at["pinned"]}


def exp_pipeline(sizes: list[int], reps: int, chunks: tuple[int, ...] = (1, 2, 4, 8),
                 staged_chunks: tuple[int, ...] = (1, 2, 4, 8, 16), late_chunks: tuple[int, ...] = (4, 8),
                 two_lane_chunks: tuple[int, ...] = (8,), bitonic_chunks: tuple[int, ...] = (8, 16),
                 tree_chunks: tuple[int, ...] = (8, 16), staged_configs: tuple[str, ...] = (),
                 staged_reps: int = 20) -> dict[str, Any]:
    rows = []
    for n in sizes:
        x = random_keys(n, seed=n)
        expected = np.sort(x)
        out = np.empty_like(x)
        for label, pc in [("naive", NAIVE)] + [(f"pinned_chunks={c}", PipelineConfig(chunks=c)) for c in chunks]:
            pipe = HostSortPipeline(n, np.float32, pipeline=pc)
            ms = time_fn(lambda: pipe(x, out), warmup=warmup_for(reps), reps=reps, flush=False).median_ms
            # Exact comparison with numpy's sort (a float64 sum is no check: a permutation summed in another order
            # rounds differently, so a correct result can differ from the input's sum)
            if not np.array_equal(out, expected):
                bad = int(np.count_nonzero(out != expected))
                raise AssertionError(f"pipeline {label} at n={n}: {bad} keys differ from numpy.sort")
            rows.append({"n": n, "label": label, "ms": ms, "chunks": len(pipe.chunk_bounds()),
                         "keys_per_s": n / ms * 1e3})
            log(f"pipeline n={n:>11,} {label:18s}: {ms:.3f} ms")
        # keys already in the pinned buffer (the host-to-host target's figure), graph replays; "late": the schedule
        # whose passes wider than a region wait for every region, beside the default that merges regions on arrival;
        # "lanes=2": a second compute stream (a region's passes need not queue behind the merges before them);
        # "bitonic": the network's wide stages on the regions' keys instead of the merge of the two sorted halves;
        # "tree": every region a sorted run as it arrives, combined by a tree of merges;
        # a tune label: that config's passes (fewer, larger-tile passes: fewer launches after the last upload)
        from impl.sort.tune import KEY_CONFIGS

        staged = [(f"staged_chunks={c}", PipelineConfig(chunks=c), None) for c in staged_chunks]
        staged += [(f"staged_chunks={c},late", PipelineConfig(chunks=c, early=False), None) for c in late_chunks]
        staged += [(f"staged_chunks={c},lanes=2", PipelineConfig(chunks=c, lanes=2), None) for c in two_lane_chunks]
        staged += [(f"staged_chunks={c},bitonic", PipelineConfig(chunks=c, finish="bitonic"), None)
                   for c in bitonic_chunks]
        staged += [(f"staged_chunks={c},tree", PipelineConfig(chunks=c, finish="tree"), None) for c in tree_chunks]
        staged += [(f"staged_chunks={STAGED.chunks},{k}", STAGED, KEY_CONFIGS[k]) for k in staged_configs]
        for label, pc, config in staged:
            pipe = HostSortPipeline(n, np.float32, config=config, pipeline=pc)
            pipe.stage_in[:] = x
            pipe.sort_staged()  # launch by launch; captures the graph the timed calls replay
            ms = time_fn(lambda: pipe.sort_staged(), warmup=warmup_for(staged_reps), reps=staged_reps, flush=False,
                         setup=lambda: pipe.stage_in.__setitem__(slice(None), x)).median_ms
            if not np.array_equal(pipe.stage_out[:n], expected):
                raise AssertionError(f"staged pipeline {label} at n={n}: keys differ from numpy.sort")
            before, after = pipe.exposed()
            rows.append({"n": n, "label": label, "ms": ms, "chunks": len(pipe.chunk_bounds()), "early": pc.early,
                         "lanes": len(pipe.lanes), "finish": pipe.finish,
                         "config": str(getattr(pipe.sorter, "config", None)), "passes": pipe.passes,
                         "keys_per_s": n / ms * 1e3, "graph": pipe.graphed, "graph_error": pipe.graph_error,
                         "launches_before_last_upload": before, "launches_after_last_upload": after,
                         "reps": staged_reps})
            log(f"pipeline n={n:>11,} {label:26s}: {ms:.3f} ms (graph {pipe.graphed}, {len(pipe.chunk_bounds())} "
                f"regions, {pipe.finish} finish, launches before/after the last upload {before}/{after})")
        rows += [round_trip_row(n, x, c, staged_reps) for c in (1, STAGED.chunks)]
    return {"rows": rows}


def round_trip_row(n: int, x: np.ndarray, chunks: int, reps: int) -> dict[str, Any]:
    """The staged pipeline's copies alone (``round_trip_staged``, regions of ``chunks``): the floor of its sort."""
    pipe = HostSortPipeline(n, np.float32, pipeline=replace(STAGED, chunks=chunks))
    pipe.stage_in[:] = x
    pipe.round_trip_staged()  # captures the graph the timed calls replay
    ms = time_fn(lambda: pipe.round_trip_staged(), warmup=warmup_for(reps), reps=reps, flush=False,
                 setup=lambda: pipe.stage_in.__setitem__(slice(None), x)).median_ms
    if not np.array_equal(pipe.stage_out[:n], x):
        raise AssertionError(f"round trip of {n} keys in {chunks} chunk(s): the keys came back changed")
    label = f"round_trip_chunks={chunks}"
    log(f"pipeline n={n:>11,} {label:26s}: {ms:.3f} ms (copies only: the floor of a staged sort; graph "
        f"{pipe.round_trip_graphed})")
    return {"n": n, "label": label, "ms": ms, "chunks": len(pipe.chunk_bounds()), "round_trip": True,
            "graph": pipe.round_trip_graphed, "graph_error": pipe.graph_error, "reps": reps}


def ncu_target(n: int) -> None:
    """Process profiled by ncu: one warm-up sort (compiles; skipped by ncu), then the profiled one."""
    from impl.sort.bitonic import make_sorter

    sorter = make_sorter(n, np.float32)
    x, d_out = cuda.to_device(random_keys(n)), cuda.device_array(n, np.float32)
    sorter(x, d_out)
    cuda.synchronize()
    sorter(x, d_out)
    cuda.synchronize()
    print(f"NCU_PASSES={len(sorter.plan.passes)}", flush=True)


def exp_ncu(n: int) -> dict[str, Any] | None:
    """DRAM bytes, occupancy and bank conflicts per pass of one sort (``ncu_command`` spells the command)."""
    if shutil.which("ncu") is None:
        log("ncu: not found, skipped")
        return None
    cmd = ncu_command(n)
    passes = int(cmd[cmd.index("--launch-count") + 1])
    log(f"ncu: profiling {passes} passes of the {n:,}-key sort")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=os.environ.copy())
    if res.returncode != 0:
        log(f"ncu failed (rc {res.returncode}): {res.stderr[-500:]}")
        return {"error": res.stderr[-2000:], "returncode": res.returncode}
    return {"n": n, "kernels": parse_ncu_csv(res.stdout)}


def ncu_command(n: int) -> list[str]:
    """ncu over the second of two sorts of n float32 keys: every pass kernel of the default sorter."""
    from impl.sort.bitonic import uses_cuda_cpp
    from impl.sort.choose import config_for
    from impl.sort.plan import build_cuda_plan

    cpp = uses_cuda_cpp(None)
    passes = len(build_cuda_plan(n, "keys32", config_for(n, "keys32")).passes if cpp
                 else BitonicSorter(n, np.float32).plan.passes)
    kernels = "regex:sort_" if cpp else "regex:block_kernel|register_kernel"
    return ["ncu", "--csv", "--cache-control", "none", "--clock-control", "none", "--metrics", NCU_METRICS,
            "-k", kernels, "--launch-skip", str(passes), "--launch-count", str(passes),
            sys.executable, "-m", "impl.sort.experiments", "--ncu-target", str(n)]


def parse_ncu_csv(text: str) -> list[dict[str, Any]]:
    """One dict per profiled kernel launch: name plus every metric (numbers where they parse)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    kernels: dict[str, dict[str, Any]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        k = kernels.setdefault(row["ID"], {"id": int(row["ID"]), "kernel": row["Kernel Name"][:60]})
        value = row["Metric Value"].replace(",", "")
        try:
            k[row["Metric Name"]] = float(value)
        except ValueError:
            k[row["Metric Name"]] = value
    return sorted(kernels.values(), key=lambda k: k["id"])


def run(*, smoke: bool, quick: bool = False, no_ncu: bool = False, skip_tune: bool = False,
        ncu_only: bool = False) -> dict[str, Any]:
    """Every experiment in turn (``ncu_only``: the Nsight Compute profile alone), each recorded
    (``results/<gpu>/sort/<name>.json``) as soon as it ends so a later failure cannot lose it; ``smoke``: CPU sizes,
    nothing written. Returns {experiment: data}."""
    n = 300 if smoke else 10_000_000
    reps = 1 if smoke else 20
    peak = copy_gbps()
    t0 = time.time()
    results: dict[str, Any] = {}

    def keep(name: str, data: dict[str, Any] | None) -> None:
        results[name] = data
        if data is None:
            return
        if smoke:
            log(f"smoke: {name} ok (not written)")
            return
        data = {**data, "copy_gbps": peak, "default_config": asdict(GPU_CONFIG)}
        log(f"wrote {write_result('sort', name, data, overwrite=True).relative_to(ROOT)}")

    if ncu_only:
        keep("ncu", exp_ncu(n))
        log(f"done in {time.time() - t0:.0f} s")
        return results
    if not skip_tune:
        keep("passes", exp_passes(n, reps, peak))
        if not quick or smoke:  # --quick on a GPU: the CUDA C++ tune (impl.sort.tune) already ran
            keep("numba_tune", exp_tune(n, reps, quick=quick, smoke=smoke))
    keep("transfers", exp_transfers([4_000, 40_000] if smoke else [4_000_000, 40_000_000, 400_000_000],
                                    1 if smoke else 10))
    keep("pipeline", exp_pipeline([n] if smoke or quick else [n, 100_000_000], 1 if smoke else 5,
                                  chunks=(1, 4) if smoke else (1, 2, 4, 8),
                                  staged_chunks=(1, 4) if smoke else (1, 2, 4, 8, 16, 32),
                                  late_chunks=(4,) if smoke else (4, 8), two_lane_chunks=(4,) if smoke else (8,),
                                  bitonic_chunks=(4,) if smoke else (8, 16), tree_chunks=(4,) if smoke else (8, 16),
                                  staged_reps=1 if smoke else 20,
                                  staged_configs=() if smoke else ("t14e5r5",)))
    if not (smoke or quick or no_ncu):
        keep("ncu", exp_ncu(n))
    log(f"done in {time.time() - t0:.0f} s")
    return results
