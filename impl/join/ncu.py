"""Nsight Compute for the GPU joins: the command line that profiles ``python -m impl.join.ncu_driver``, the parser of
its CSV, and the attribution of every kernel to its join.

``ncu --cache-control none --clock-control none --csv --print-units base --metrics <METRICS>`` prints one row per
(kernel, metric); ``parse_ncu_csv`` turns them into kernels in launch order (bytes in B, times in ns).
``attribute`` gives each kernel to its join (own kernels by name; torch helper kernels such as ``fill_``/``cumsum``
to the join whose own kernel follows them) and ``summarize`` computes, per join, the duration-weighted achieved
occupancy (``sm__warps_active.avg.pct_of_peak_sustained_active``) and SM throughput of its own kernels, DRAM bytes
read + written, kernel time and the DRAM bandwidth that implies. ``SMOKE_CSV`` is a canned profile for CPU checks.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from impl.common.results import ROOT

CORE_METRICS = ("gpu__time_duration.sum", "sm__warps_active.avg.pct_of_peak_sustained_active", "dram__bytes_read.sum",
                "dram__bytes_write.sum", "sm__throughput.avg.pct_of_peak_sustained_elapsed")
EXTRA_METRICS = ("lts__t_sector_hit_rate.pct", "launch__registers_per_thread",
                 "sm__maximum_warps_per_active_cycle_pct")
OWN_KERNELS = {  # substring of the kernel name -> join (numba names are mangled but keep the function name)
    "hash_build_nb": "hash_numba", "hash_count_nb": "hash_numba", "hash_write_nb": "hash_numba",
    "join_build_": "hash_cuda", "join_count_": "hash_cuda", "join_write_": "hash_cuda", "join_fused_": "hash_cuda",
    "join_lbuild_": "hash_cuda", "join_lprobe_": "hash_cuda",
    "tc_partition_hist": "tc_triton", "tc_partition_scatter": "tc_triton", "tc_join_pass": "tc_triton"}
IMPL_OF_KEY = {"hash_numba": "hash-numba", "hash_cuda": "hash-cuda", "tc_triton": "tc-triton"}
NCU_TIMEOUT_S = 110
_SCALE = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "nsecond": 1, "usecond": 1e3, "msecond": 1e6,
          "second": 1e9}


def to_number(text: str) -> float | None:
    """'1,234,567' -> 1234567; '9,5' (decimal comma) -> 9.5; 'n/a' -> None."""
    t = text.strip().replace('"', "")
    if "," in t and "." in t or re.fullmatch(r"-?\d{1,3}(,\d{3})+", t):
        t = t.replace(",", "")
    else:
        t = t.replace(",", ".")
    try:
        return float(t)
    except ValueError:
        return None


def parse_ncu_csv(text: str) -> list[dict[str, Any]]:
    """Kernels in launch order: ``{"id", "name", "block", "grid", metric: value}`` (bytes in B, times in ns)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"') and "Metric Name" in line), None)
    if start is None:
        return []
    kernels: dict[int, dict[str, Any]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(line for line in lines[start:] if line.startswith('"')))):
        try:
            kid = int(row["ID"])
        except (KeyError, ValueError):
            continue
        k = kernels.setdefault(kid, {"id": kid, "name": row.get("Kernel Name", ""),
                                     "block": row.get("Block Size", ""), "grid": row.get("Grid Size", "")})
        value = to_number(row.get("Metric Value", ""))
        if value is not None:
            k[row["Metric Name"]] = value * _SCALE.get(row.get("Metric Unit", "").strip().lower(), 1)
    return [kernels[i] for i in sorted(kernels)]


def owner_of(name: str) -> str | None:
    return next((impl_ for key, impl_ in OWN_KERNELS.items() if key in name), None)


def attribute(kernels: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{join: {"own": [...], "helpers": [...]}}; a helper kernel belongs to the join of the next own kernel."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    pending: list[dict[str, Any]] = []
    for k in kernels:
        who = owner_of(k["name"])
        if who is None:
            pending.append(k)
            continue
        slot = out.setdefault(who, {"own": [], "helpers": []})
        slot["own"].append(k)
        slot["helpers"].extend(pending)
        pending = []
    return out


def _weighted(kernels: list[dict[str, Any]], metric: str) -> float | None:
    pts = [(k[metric], k.get("gpu__time_duration.sum", 0.0)) for k in kernels if metric in k]
    w = sum(t for _, t in pts)
    return sum(v * t for v, t in pts) / w if pts and w > 0 else None


def summarize(kernels: list[dict[str, Any]], copy_gbps: float | None = None) -> dict[str, Any]:
    """Per-join figures: occupancy and SM throughput of its own kernels (time-weighted), bytes and time of all."""
    out: dict[str, Any] = {}
    for who, parts in attribute(kernels).items():
        own, every = parts["own"], parts["own"] + parts["helpers"]
        ns = sum(k.get("gpu__time_duration.sum", 0.0) for k in every)
        dram = sum(k.get("dram__bytes_read.sum", 0.0) + k.get("dram__bytes_write.sum", 0.0) for k in every)
        s = {"occupancy_pct": _weighted(own, "sm__warps_active.avg.pct_of_peak_sustained_active"),
             "sm_throughput_pct": _weighted(own, "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
             "l2_hit_pct": _weighted(own, "lts__t_sector_hit_rate.pct"),
             "kernel_time_us": ns / 1e3, "dram_bytes": dram,
             "dram_gbps": dram / ns if ns else None,
             "kernels": [_short(k) for k in every]}
        if copy_gbps and s["dram_gbps"] is not None:
            s["pct_of_copy_peak"] = 100 * s["dram_gbps"] / copy_gbps
        out[who] = s
    return out


def _short(k: dict[str, Any]) -> dict[str, Any]:
    name = k["name"]
    own = next((key for key in OWN_KERNELS if key in name), None)
    return {"kernel": own or name[:80], "own": own is not None, "grid": k["grid"], "block": k["block"],
            **{m: k[m] for m in (*CORE_METRICS, *EXTRA_METRICS) if m in k}}


def ncu_command(ncu: str, metrics: tuple[str, ...], n: int, impls: list[str], log: str) -> list[str]:
    return [ncu, "--cache-control", "none", "--clock-control", "none", "--csv", "--print-units", "base",
            "--metrics", ",".join(metrics), "--log-file", log, sys.executable, "-m", "impl.join.ncu_driver",
            "--n", str(n), "--impls", ",".join(impls)]


def run_ncu(n: int, impls: list[str], timeout_s: float = NCU_TIMEOUT_S) -> dict[str, Any]:
    """Profile the driver; on an unknown-metric failure retry once with the core metrics only."""
    ncu = shutil.which("ncu")
    if ncu is None:
        raise RuntimeError("ncu (Nsight Compute) is not on PATH")
    deadline = time.monotonic() + timeout_s
    for metrics in (CORE_METRICS + EXTRA_METRICS, CORE_METRICS):
        with tempfile.TemporaryDirectory() as tmp:
            log = os.path.join(tmp, "ncu.csv")
            cmd = ncu_command(ncu, metrics, n, impls, log)
            print("+", " ".join(cmd), flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                      timeout=max(5.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"ncu did not finish within the {timeout_s:.0f} s budget") from e
            text = open(log).read() if os.path.exists(log) else ""
        kernels = parse_ncu_csv(text)
        if proc.returncode == 0 and kernels:
            return {"metrics": list(metrics), "command": " ".join(cmd), "kernels": kernels,
                    "driver_stdout": proc.stdout[-2000:]}
        print(f"ncu exited {proc.returncode} with {len(kernels)} kernels parsed; stderr tail:\n{proc.stderr[-1500:]}"
              f"\nlog tail:\n{text[-1500:]}", flush=True)
    raise RuntimeError("ncu produced no usable CSV (see the output above)")


_HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
           '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')
_FILL = '"vectorized_elementwise_kernel<4>(int)","1","7","(128, 1, 1)","(8192, 1, 1)"'
_BUILD = '"join_build_i32","1","7","(256, 1, 1)","(4096, 1, 1)"'
_TC = '"tc_join_pass","1","7","(128, 1, 1)","(15625, 1, 1)"'
_ROWS = [  # (id, kernel columns, metric, unit, value as ncu prints it)
    (0, _FILL, "gpu__time_duration.sum", "nsecond", "5,000"),
    (0, _FILL, "dram__bytes_write.sum", "byte", "16,777,216"),
    (1, _BUILD, "gpu__time_duration.sum", "nsecond", "10000"),
    (1, _BUILD, "sm__warps_active.avg.pct_of_peak_sustained_active", "%", "80"),
    (1, _BUILD, "dram__bytes_read.sum", "Mbyte", "4"),
    (2, _TC, "gpu__time_duration.sum", "usecond", "30"),
    (2, _TC, "sm__warps_active.avg.pct_of_peak_sustained_active", "%", "40"),
]
SMOKE_CSV = "\n".join(
    ["==PROF== Connected to process 1", _HEADER]
    + [f'"{i}","1","python","h",{k},"0","9.0","Command line profiler metrics","{m}","{u}","{v}"'
       for i, k, m, u, v in _ROWS]
    + ["==PROF== Disconnected from process 1", ""])
