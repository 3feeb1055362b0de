"""Check and time the CUDA C++ sort's candidate configurations on the GPU, pass by pass, and pick the defaults.

    python3 -m impl.sort.tune --budget-s 60                      # one H200: ~25 s with the kernel cache carried
    python3 -m impl.sort.tune --dry-run --out /tmp/sort-tune       # a CPU: the same steps on the emulated kernels

Steps (each guarded by the wall-clock budget; a failing variant is reported and skipped, never aborts the rest):
  1. the card's copy bandwidth (1 GiB device-to-device, read + write, as impl.common.calibrate): the 100% of the
     per-pass column;
  2. kernels compiled or loaded (``.carry/sort-kernels``: cubins cached by source), the built-in defaults first;
  3. correctness: each variant on fresh random keys (float32 keys; argsort against torch.sort(stable=True); plus
     3_000_017 and 2^23 keys, int64 argsort and float16 on 100_003 keys against numpy), outputs poisoned first;
  4. timing: each candidate of ``GRID`` (keys and argsort at 10M, 100M, 1M) as one CUDA graph (the default also with
     direct launches), queued device events (``time_fn(queue_ahead=True)``), L2 flushed, median of ``--reps``;
     cupy.sort, cupy.argsort, torch.sort anchors in the same run;
  5. per pass: every pass of every timed variant alone (L2 flushed): pass bytes / time as % of the copy bandwidth;
  6. ``tune.json`` (every row) and ``config_table.json`` (per slot mode and n, the fastest variant that was correct
     before and after timing: ``impl.sort.choose`` reads it, so sorts, tests and benches without an explicit config
     use it; the stored table's entries are timed first, and one this run measured nothing for is kept) under
     results/<card>/sort/ (copies in ``--out``), and a short table on stdout. ``complete`` is true
     only when nothing was skipped; a killed run leaves ``tune.partial.json`` in ``--out`` and the stored table as
     it was.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from impl.common.tables import read_table
from impl.sort.choose import BUILTIN, TABLE_RESULT, SortTable, config_name, select, stored_table_path, use_table
from impl.sort.plan import EMU_CUDA_CONFIG, GPU_CUDA_CONFIG, CudaSortConfig

N_MAIN = 10_000_000
N_BIG = 100_000_000
N_SMALL = 1_000_000
KEY_CONFIGS: dict[str, CudaSortConfig] = {
    "t13e5r5": BUILTIN["keys32"],
    "t14e5r5": CudaSortConfig(tile_bits=14, items_bits=5),
    "t15e6r5": GPU_CUDA_CONFIG,
    "t13e4r5": CudaSortConfig(tile_bits=13, items_bits=4),
    "t12e5r5": CudaSortConfig(tile_bits=12, items_bits=5),
    "t13e5r5m4": CudaSortConfig(tile_bits=13, items_bits=5, merge_items_bits=4),  # t13e5's tile pass, t13e4's merges
    "t15e5r5": CudaSortConfig(tile_bits=15, items_bits=5),  # 1024 threads: 10M 0.619 ms vs t15e6r5 0.652
    "t13e5r5o2": CudaSortConfig(tile_bits=13, items_bits=5, overlap_bits=2),  # region streams: H100 10M 0.514 ms
    "t13e5r5o3": CudaSortConfig(tile_bits=13, items_bits=5, overlap_bits=3),  # against 0.562 on one stream
    # merges on 16384-key cosets: on an H100 at 979d4c1 10M in 0.527 ms against 0.536 (o3: 0.478 against 0.483)
    "t13e5r5M14": CudaSortConfig(tile_bits=13, items_bits=5, merge_tile_bits=14),
    "t13e5r5M14o3": CudaSortConfig(tile_bits=13, items_bits=5, merge_tile_bits=14, overlap_bits=3),
    # the tile pass stops at stage 7 or 6 (28 or 21 of its 91 steps: ALU time within its bytes' copy time), one
    # merge pass per stage up to 13 takes the rest: 6-7 more passes, none ALU-bound
    "t13e5r5s7o2": CudaSortConfig(tile_bits=13, items_bits=5, overlap_bits=2, tile_stages=7),
    "t13e5r5s6o2": CudaSortConfig(tile_bits=13, items_bits=5, overlap_bits=2, tile_stages=6),
    # stages 1..5 only: the tile pass's 15 steps all run on each thread's 32 registers (no exchange between them);
    # on an H100 at 24a9f84 every pass of 10M keys ran at >= 88.9% of copy, the sort in 0.594 ms against 0.498 (o2)
    "t13e5r5s5o2": CudaSortConfig(tile_bits=13, items_bits=5, overlap_bits=2, tile_stages=5),
    "t13e5r5s5o3": CudaSortConfig(tile_bits=13, items_bits=5, overlap_bits=3, tile_stages=5),
    # the tile pass takes the maximum of 3 (2) of every 6 compare-exchanges on the FMA pipe: ptxas for sm_90 gives its
    # 91 steps 2093 VIMNMX + 819 IMAD pairs instead of 2912 VIMNMX (64 registers either way), the ALU pipe's
    # instructions -25% where ncu had it at 85% of peak (f4 would load the FMA pipe more than the ALU's)
    "t13e5r5o2f3": CudaSortConfig(tile_bits=13, items_bits=5, overlap_bits=2, fma_max=3),
    "t13e5r5o3f3": CudaSortConfig(tile_bits=13, items_bits=5, overlap_bits=3, fma_max=3),
    "t13e5r5o2f2": CudaSortConfig(tile_bits=13, items_bits=5, overlap_bits=2, fma_max=2),
    "t13e5r5f3": CudaSortConfig(tile_bits=13, items_bits=5, fma_max=3),
    "t15e6r5f3": CudaSortConfig(fma_max=3),
}
ARG_CONFIGS: dict[str, CudaSortConfig] = {   # argsort (8-byte composite slots: tile and keys per thread halved)
    "t14e6r5": BUILTIN["composite"],
    "t13e5r5": CudaSortConfig(tile_bits=13, items_bits=5),
    "t14e5r5": CudaSortConfig(tile_bits=14, items_bits=5),
    "t13e5r4": CudaSortConfig(tile_bits=13, items_bits=5, run_bits=4),  # runs of 16 slots = 128 B: 23 passes at 10M
    "t13e5r3": CudaSortConfig(tile_bits=13, items_bits=5, run_bits=3),  # runs of 64 B: 22 passes at 10M
    "t14e5r4": CudaSortConfig(tile_bits=14, items_bits=5, run_bits=4),  # 8192-slot tiles, 128 B runs: 20 passes
    "t14e5r3": CudaSortConfig(tile_bits=14, items_bits=5, run_bits=3),  # 8192-slot tiles, 64 B runs: 19 passes
    "t14e5r3o2": CudaSortConfig(tile_bits=14, items_bits=5, run_bits=3, overlap_bits=2),  # H100: 1.241 vs 1.305 ms
    "t14e5r4o2": CudaSortConfig(tile_bits=14, items_bits=5, run_bits=4, overlap_bits=2),
    "t14e5r3o3": CudaSortConfig(tile_bits=14, items_bits=5, run_bits=3, overlap_bits=3),
    # 32 slots per merge thread: 13-step merges in 3 rounds instead of 4 (shared-memory traffic, which with the ALU
    # bounds an H200's argsort merges at ~73% of copy), 92 registers, 2 blocks per SM
    "t14e5r3m6o2": CudaSortConfig(tile_bits=14, items_bits=5, run_bits=3, merge_items_bits=6, overlap_bits=2),
    # merges on 16384-slot cosets (16 merge passes at 10M instead of 18), the tile pass on 8192; on an H100 at
    # 979d4c1 their 14-step passes took 65-81 µs against 53-60 µs for 13 steps on 8192 (1.39 ms vs 1.26 one stream)
    "t14e5r3M15": CudaSortConfig(tile_bits=14, items_bits=5, run_bits=3, merge_tile_bits=15),
    "t14e5r3M15m6": CudaSortConfig(tile_bits=14, items_bits=5, run_bits=3, merge_tile_bits=15, merge_items_bits=6),
    "t14e5r3M15o2": CudaSortConfig(tile_bits=14, items_bits=5, run_bits=3, merge_tile_bits=15, overlap_bits=2),
    "t14e5r3s7o2": CudaSortConfig(tile_bits=14, items_bits=5, run_bits=3, overlap_bits=2, tile_stages=7),
}
DRY_KEYS: dict[str, CudaSortConfig] = {"t13e5r5": EMU_CUDA_CONFIG, "t14e5r5": replace(EMU_CUDA_CONFIG, tile_bits=7),
                                       "t15e6r5": replace(EMU_CUDA_CONFIG, items_bits=3)}
DRY_ARGS: dict[str, CudaSortConfig] = {"t14e6r5": EMU_CUDA_CONFIG, "t13e5r5": replace(EMU_CUDA_CONFIG, tile_bits=7)}
# (n, keys configs, argsort configs) timed per size, the fastest on an H100 first (a budget cut drops the last);
# the table's entries come from these rows. Region streams (``o``) only at 10M: on an H100 they took 1M keys from
# 0.067 to 0.118 ms and moved 100M by ~1%
GRID = ((N_MAIN, ("t13e5r5o3", "t13e5r5M14o3", "t13e5r5o2", "t13e5r5o2f3", "t13e5r5o3f3", "t13e5r5o2f2", "t13e5r5s7o2",
                  "t13e5r5s6o2", "t13e5r5s5o2", "t13e5r5s5o3", "t13e5r5", "t13e5r5M14", "t14e5r5", "t15e6r5", "t13e4r5",
                  "t13e5r5m4"),
         ("t14e5r3o2", "t14e5r3m6o2", "t14e5r3o3", "t14e5r3s7o2", "t14e5r3M15o2", "t14e5r4o2", "t14e5r3", "t14e6r5",
          "t13e5r5", "t14e5r5", "t13e5r4", "t14e5r4", "t13e5r3", "t14e5r3M15", "t14e5r3M15m6")),
        (N_BIG, ("t15e6r5", "t15e6r5f3", "t15e5r5", "t13e5r5m4", "t14e5r5", "t13e5r5"), ("t14e6r5", "t14e5r5")),
        (N_SMALL, ("t13e5r5", "t13e5r5f3", "t12e5r5", "t14e5r5"), ("t14e6r5", "t13e5r5")))


@dataclass
class Variant:
    label: str
    n: int
    dtype: str
    argsort: bool
    config: CudaSortConfig
    launch: str = "graph"      # "graph" or "direct"
    timed: bool = True         # False: a correctness check only
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        from impl.sort.cuda_sort import slot_mode
        from impl.sort.keys import key_format

        return slot_mode(key_format(self.dtype), self.argsort)


def previous_table(dry: bool) -> tuple[SortTable | None, str]:
    """(the stored table this run replaces, the commit it was measured at), or (None, "") where there is none (a dry
    run never reads one): its entries are timed first (``variants``) and kept for every (mode, n) this run does not
    measure (``write_outputs``), so a run cut short by its budget cannot swap a measured winner for a candidate it
    timed alone."""
    path = None if dry else stored_table_path()
    if path is None or not path.exists():
        return None, ""
    try:
        record, origin = read_table(path, "sort config table")
        table = SortTable.from_data(record, origin=origin)
    except ValueError as e:
        print(f"[tune] the stored table is not used ({e})", flush=True)
        return None, ""
    return table, str(record.get("commit") or "")


def _table_variants(previous: SortTable | None, scale: dict[int, int]) -> list[Variant]:
    """A Variant for each entry of ``previous`` at a size ``GRID`` times (float32 keys-only and argsort slots)."""
    out = []
    for mode, argsort in (("keys32", False), ("composite", True)):
        for n, c in (previous.entries.get(mode, []) if previous else []):
            if n in scale:
                out.append(Variant(f"{'argsort' if argsort else 'keys'} {config_name(c)}", scale[n], "float32",
                                   argsort, c))
    return out


def variants(dry: bool, previous: SortTable | None = None) -> list[Variant]:
    """What one run checks and times, in priority order (the budget cuts from the end): the stored table's entries
    at 10M (``previous``), the built-in defaults at 10M, the stored table's other entries, then every candidate of
    ``GRID`` (10M, 100M, 1M), then correctness checks of other dtypes and sizes."""
    keys, args = (DRY_KEYS, DRY_ARGS) if dry else (KEY_CONFIGS, ARG_CONFIGS)
    scale = {N_MAIN: 700, N_BIG: 2500, N_SMALL: 300} if dry else {n: n for n, _, _ in GRID}
    n = scale[N_MAIN]
    k0, a0 = next(iter(keys)), next(iter(args))
    stored = _table_variants(previous, scale)
    out = [v for v in stored if v.n == n]
    out += [Variant(f"keys {k0}", n, "float32", False, keys[k0]),
            Variant(f"argsort {a0}", n, "float32", True, args[a0]),
            Variant(f"keys {k0}", n, "float32", False, keys[k0], launch="direct")]
    out += [v for v in stored if v.n != n]
    for size, kc, ac in GRID:
        out += [Variant(f"keys {k}", scale[size], "float32", False, keys[k]) for k in kc if k in keys]
        out += [Variant(f"argsort {a}", scale[size], "float32", True, args[a]) for a in ac if a in args]
    out = list({(v.label, v.n, v.launch): v for v in out}.values())
    out += [Variant(f"keys {k0}", 3 * n // 10 + 17, "float32", False, keys[k0], timed=False),
            Variant(f"keys {k0}", 1 << (n.bit_length() - 1), "int32", False, keys[k0], timed=False),
            Variant(f"argsort {a0}", n // 100 + 3, "int64", True, args[a0], timed=False),
            Variant(f"keys {a0}", n // 100 + 3, "int64", False, args[a0], timed=False),
            Variant(f"argsort {a0}", n // 100 + 3, "float16", True, args[a0], timed=False)]
    return out


def kernel_requests(dry: bool = False) -> list[tuple[int, str, int, CudaSortConfig]]:
    """(n, mode, raw bits, config) of every sorter a run builds (``compile_check --tune`` warms the cache)."""
    from impl.sort.keys import key_format

    return [(v.n, v.mode, key_format(v.dtype).nbits, v.config) for v in variants(dry)]


# ---- the two backends of one run: CuPy on the GPU, numpy + emulation on a CPU (dry run) -------------------------

class GpuSide:
    """Data, references and timing on the GPU (CuPy kernels, torch events)."""

    def __init__(self, reps: int) -> None:
        import cupy
        import torch

        from impl.sort.cuda_sort import cupy_runtime

        self.cupy, self.torch, self.reps = cupy, torch, reps
        self.runtime = cupy_runtime()
        self.device = torch.cuda.get_device_name()

    def keys(self, n: int, dtype: str, seed: int):
        if dtype in ("float32", "float16"):
            return self.cupy.random.default_rng(seed).standard_normal(n, dtype=self.cupy.float32).astype(dtype)
        info = np.iinfo(dtype)  # integers over the dtype's whole range: made on the host (numpy), then copied
        return self.cupy.asarray(np.random.default_rng(seed).integers(info.min, info.max, n, dtype=dtype,
                                                                      endpoint=True))

    def empty(self, n: int, dtype):
        out = self.cupy.empty(n, dtype=dtype)
        out.view(self.cupy.uint8).fill(0xFF)  # poison: every element must be written
        return out

    def reference(self, x, argsort: bool):
        if argsort:
            t = self.torch.as_tensor(x, device="cuda")
            return self.cupy.asarray(self.torch.sort(t, stable=True).indices)
        return self.cupy.sort(x)

    def same(self, got, ref) -> bool:
        a, b = got.view(f"u{got.itemsize}") if got.dtype.kind == "f" else got, ref
        b = b.view(f"u{b.itemsize}") if b.dtype.kind == "f" else b
        return bool((a == b).all())

    def time(self, fn: Callable[[], Any]) -> list[float]:
        from impl.common.timing import time_fn

        return time_fn(fn, warmup=3, reps=self.reps, queue_ahead=True).times_ms

    def copy_gbps(self) -> float:
        from impl.common.calibrate import measure_copy_gbps

        return measure_copy_gbps()

    def anchors(self, n: int) -> dict[str, list[float]]:
        x = self.keys(n, "float32", 99)
        t = self.torch.as_tensor(x, device="cuda")
        return {"cupy.sort": self.time(lambda: self.cupy.sort(x)),
                "cupy.argsort": self.time(lambda: self.cupy.argsort(x)),
                "torch.sort": self.time(lambda: self.torch.sort(t))}

    def sync(self) -> None:
        self.cupy.cuda.Device().synchronize()


class DrySide(GpuSide):
    """The same steps on a CPU: numpy data, the emulated kernels, numpy references, the host clock."""

    def __init__(self, reps: int) -> None:
        from impl.sort.cuda_sort import emulated_runtime

        self.reps = reps
        self.runtime = emulated_runtime()
        self.device = "cpu (dry run: emulated kernels)"

    def keys(self, n: int, dtype: str, seed: int):
        rng = np.random.default_rng(seed)
        if dtype in ("float32", "float16"):
            return rng.standard_normal(n, dtype=np.float32).astype(dtype)
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)

    def empty(self, n: int, dtype):
        out = np.empty(n, dtype=dtype)
        out.view(np.uint8).fill(0xFF)
        return out

    def reference(self, x, argsort: bool):
        return np.argsort(x, kind="stable") if argsort else np.sort(x)

    def time(self, fn: Callable[[], Any]) -> list[float]:
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def copy_gbps(self) -> float:
        x = np.ones(1 << 22, np.uint8)
        ms = min(self.time(lambda: x.copy()))
        return 2 * x.nbytes / (ms * 1e-3) / 1e9

    def anchors(self, n: int) -> dict[str, list[float]]:
        x = self.keys(n, "float32", 99)
        return {"numpy.sort": self.time(lambda: np.sort(x)),
                "numpy.argsort(stable)": self.time(lambda: np.argsort(x, kind="stable"))}

    def sync(self) -> None:
        pass


# ---- one variant --------------------------------------------------------------------------------------------------

def median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else math.nan


def run_variant(v: Variant, side, peak: float, per_pass: bool) -> dict[str, Any]:
    """Build, check, time (whole sort and each pass) one variant; the row of the table."""
    from impl.sort.cuda_sort import CudaSorter

    t0 = time.perf_counter()
    compile_before = side.runtime.compile_s
    sorter = CudaSorter(v.n, v.dtype, argsort=v.argsort, config=v.config, runtime=side.runtime)
    row: dict[str, Any] = {"label": v.label, "n": v.n, "dtype": v.dtype, "argsort": v.argsort, "launch": v.launch,
                           "config": asdict(v.config), "mode": sorter.mode, "tile": sorter.tile,
                           "threads": sorter.threads, "passes": len(sorter.plan.passes),
                           "steps_per_pass": [p.steps for p in sorter.plan.passes],
                           "exchanges_per_pass": [p.exchanges for p in sorter.plan.passes],
                           "kinds": [p.kind for p in sorter.plan.passes],
                           "compile_s": round(side.runtime.compile_s - compile_before, 2)}
    x = side.keys(v.n, v.dtype, seed=v.n + 7 * v.argsort)
    out = side.empty(v.n, sorter.out_dtype)
    sorter(x, out)
    side.sync()
    ok = side.same(out, side.reference(x, v.argsort))
    row["correct"] = ok
    if not ok:
        raise AssertionError(f"{v.label} n={v.n}: output differs from the reference")
    if v.timed:
        run = sorter.graph(x, out) if v.launch == "graph" else (lambda: sorter(x, out))
        times = side.time(run)
        ms = median(times)
        compulsory = v.n * (np.dtype(v.dtype).itemsize + sorter.out_dtype.itemsize)
        traffic = sum(sorter.bytes_per_pass())
        row.update(ms=ms, times_ms=times, compulsory_bytes=compulsory, traffic_bytes=traffic,
                   gbps_effective=compulsory / ms / 1e6, gbps_traffic=traffic / ms / 1e6,
                   pct_copy_traffic=100 * traffic / ms / 1e6 / peak)
        side.sync()
        ok = side.same(out, side.reference(x, v.argsort))  # the timed launches gave the right answer too
        row["correct_after_timing"] = ok
        if not ok:
            raise AssertionError(f"{v.label} n={v.n}: the timed ({v.launch}) sort gave a wrong answer")
        if per_pass:
            passes = []
            for i, (spec, nbytes) in enumerate(zip(sorter.plan.passes, sorter.bytes_per_pass())):
                pms = median(side.time(lambda i=i: sorter.launch_pass(i, x, out)))
                passes.append({"i": i, "kind": spec.kind, "steps": spec.steps, "exchanges": spec.exchanges,
                               "run": spec.run, "f": spec.f >= 0, "blocks": sorter.grids[i], "bytes": nbytes,
                               "ms": pms, "gbps": nbytes / pms / 1e6, "pct_copy": 100 * nbytes / pms / 1e6 / peak})
            row["per_pass"] = passes
            row["sum_pass_ms"] = sum(p["ms"] for p in passes)
            slow = min(passes, key=lambda p: p["pct_copy"])
            row["slowest_pass_pct"] = slow["pct_copy"]
            row["slowest_pass"] = f"{slow['i']}:{slow['kind']}"
            merges = [p["pct_copy"] for p in passes if p["kind"] == "coset"]
            row["slowest_merge_pass_pct"] = min(merges) if merges else None
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def fmt_row(r: dict[str, Any], cupy_ms: dict[str, float]) -> str:
    n = f"{r['n'] / 1e6:g}M" if r["n"] >= 1e6 else str(r["n"])
    if "error" in r or "skipped" in r:
        return f"{r['label']:<24} {n:>7} {r['launch']:<6}  {r.get('error') or r.get('skipped')}"[:160]
    if "ms" not in r:
        return f"{r['label']:<24} {n:>7} {'check':<6}  correct={r['correct']}"
    anchor = cupy_ms.get("cupy.argsort" if r["argsort"] else "cupy.sort")
    ratio = f"{r['ms'] / anchor:5.2f}" if anchor and r["n"] == r.get("anchor_n") else "    -"
    slow = f"{r['slowest_pass_pct']:5.1f}% ({r['slowest_pass']})" if "slowest_pass_pct" in r else "-"
    return (f"{r['label']:<24} {n:>7} {r['launch']:<6} {r['ms']:8.3f} {r['passes']:>4} {slow:<18} "
            f"{r['gbps_effective']:8.1f} {r['pct_copy_traffic']:6.1f}% {ratio}")


def write_outputs(report: dict[str, Any], out_dir: Path | None, dry: bool, previous: SortTable | None = None,
                  previous_commit: str = "") -> list[Path]:
    """tune.json (every row) and config_table.json (the fastest correct config per (mode, n): what sorts without an
    explicit config use, ``impl.sort.choose``; each (mode, n) of ``previous`` this run measured nothing for keeps its
    entry, named in ``chosen`` with the commit it was measured at). On a GPU both go to results/<card>/sort/ (and a
    copy to ``out_dir``); a dry run writes only to ``out_dir``."""
    table = select(report["rows"])
    measured = {(m, n) for m, rows in table.entries.items() for n, _ in rows}
    kept = {(m, n): c for m, rows in (previous.entries.items() if previous else ()) for n, c in rows
            if (m, n) not in measured}
    for (m, n), c in kept.items():
        table.entries.setdefault(m, []).append((n, c))
    for rows in table.entries.values():
        rows.sort(key=lambda r: r[0])
    data = {**table.to_data(), "commit": report["commit"], "device": report["device"],
            "complete": report["complete"], "source": "impl.sort.tune",
            "chosen": [{"mode": m, "n": n, "label": config_name(c)}
                       | ({"kept_from": previous_commit or "an earlier run"} if (m, n) in kept else {})
                       for m, rows in table.entries.items() for n, c in rows]}
    report["table"] = data["chosen"]
    paths = []
    if not dry:
        import shutil

        from impl.common.results import write_result

        for name, payload in (("tune", report), (TABLE_RESULT, data)):
            p = write_result("sort", name, payload, overwrite=True)
            paths.append(p)
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, out_dir / p.name)
        use_table(None)  # sorters made after this (same process) read the new table
    else:
        assert out_dir is not None
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, payload in (("tune", report), (TABLE_RESULT, data)):
            p = out_dir / f"{name}.json"
            tmp = p.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(payload, indent=1, default=float))
            os.replace(tmp, p)
            paths.append(p)
    return paths


GPU_STEP_ARGS = ["--budget-s", "60"]
"""``python -m impl gpu sort`` runs ``python -m impl.sort.tune`` with these arguments before the tests and benches, so
they use the table measured in the same run."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="also copy tune.json and config_table.json here (a dry run: only "
                                                "here; required)")
    ap.add_argument("--budget-s", type=float, default=60.0, help="wall-clock budget; stops early, still writes")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true", help="CPU: emulated kernels, tiny sizes, host clock")
    args = ap.parse_args(argv)
    if args.dry_run and not args.out:
        ap.error("--dry-run needs --out (a CPU run never writes under results/)")
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    out_dir = Path(args.out) if args.out else None
    side = DrySide(min(args.reps, 2)) if args.dry_run else GpuSide(args.reps)
    side.runtime.deadline = time.monotonic() + args.budget_s - 10  # kernels not compiled by then: variant skipped
    report: dict[str, Any] = {"device": side.device, "budget_s": args.budget_s, "dry_run": args.dry_run,
                              "commit": _commit(), "rows": [], "complete": False}
    partial = out_dir / "tune.partial.json" if out_dir else None

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        if partial is not None:  # what a killed run leaves behind
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(report, indent=1, default=float))

    peak = side.copy_gbps()
    report["copy_gbps"] = peak
    print(f"[tune] {side.device}: copy {peak:.0f} GB/s", flush=True)
    previous, previous_commit = previous_table(args.dry_run)
    todo = variants(args.dry_run, previous)
    main_n = todo[0].n
    skipped = 0
    for v in todo:
        left = deadline - time.perf_counter()
        if left < (3.0 if args.dry_run else 8.0):
            v.row = {"label": v.label, "n": v.n, "launch": v.launch, "skipped": "budget"}
            skipped += 1
        else:
            try:
                v.row = run_variant(v, side, peak, per_pass=v.timed and v.launch == "graph")
            except Exception as e:  # a failing variant is reported, the rest still run
                v.row = {"label": v.label, "n": v.n, "launch": v.launch, "argsort": v.argsort,
                         "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
                skipped += 1
        v.row["anchor_n"] = main_n
        report["rows"].append(v.row)
        print(f"[tune] {fmt_row(v.row, {})}", flush=True)
        save()
    if deadline - time.perf_counter() > 2.0:
        try:
            report["anchors"] = {k: {"ms": median(t), "times_ms": t} for k, t in side.anchors(main_n).items()}
        except Exception as e:
            report["anchors_error"] = f"{type(e).__name__}: {e}"
            skipped += 1
    else:
        skipped += 1
    report["complete"] = skipped == 0
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    paths = write_outputs(report, out_dir, args.dry_run, previous, previous_commit)
    if partial is not None and partial.exists():
        partial.unlink()
    anchors = {k: a["ms"] for k, a in report.get("anchors", {}).items()}
    print("\nvariant                        n launch       ms passes slowest pass       GB/s eff traffic  x cupy")
    for r in report["rows"]:
        print(fmt_row(r, anchors))
    for k, ms in anchors.items():
        print(f"{k:<24} {main_n / 1e6:g}M {ms:8.3f} ms")
    labels = [f"{c['mode']} {c['n']:,} -> {c['label']}" + (f" (kept from {c['kept_from']})" if "kept_from" in c else "")
              for c in report["table"]]
    print("table: " + ", ".join(labels))
    print(f"[tune] {'complete' if report['complete'] else 'INCOMPLETE'} in {report['elapsed_s']} s; wrote "
          + ", ".join(str(p) for p in paths), flush=True)
    return report


def _commit() -> str:
    try:
        from impl.common.results import git_commit

        return git_commit()
    except Exception:  # outside a git checkout
        return "unknown"


if __name__ == "__main__":
    main(sys.argv[1:])
