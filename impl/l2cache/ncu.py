"""Nsight Compute: the command lines that profile a driver process, the parser of ncu's raw CSV page, and the
profile of one (workload, policy) pair against the default: the driver process and the DRAM drop per request.

The cache is the subject, so ncu runs with ``--cache-control none`` (no flush between passes or workloads) and
``--clock-control none``; ``--graph-profiling graph`` measures one whole CUDA-graph replay (one request) as a single
result, so the metrics are per request; ``--profile-from-start off`` profiles only between the driver's
``cudaProfilerStart``/``Stop`` calls, which bracket the requests to measure (warm-up and set-up are not profiled).
Metrics: DRAM bytes read and written, L2 sector hit rate. The CSV (``--page raw --print-units base``) has a header
row, a units row, then one row per result.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from impl import backend
from impl.common.log import logger

log = logger("l2cache")

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_sector_hit_rate.pct")
SHORT = {"dram__bytes_read.sum": "dram_read_bytes", "dram__bytes_write.sum": "dram_write_bytes",
         "lts__t_sector_hit_rate.pct": "l2_hit_pct"}
UNIT_SCALE = {"byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12, "kibyte": 2**10,
              "mibyte": 2**20, "gibyte": 2**30, "%": 1.0, "": 1.0}


def ncu_binary() -> str | None:
    return shutil.which("ncu")


def profile_command(report: Path, driver_args: list[str], ncu: str = "ncu", python: str = sys.executable) -> list[str]:
    """``ncu ... -o report python -m impl.l2cache.experiments <driver_args>``."""
    return [ncu, "--cache-control", "none", "--clock-control", "none", "--graph-profiling", "graph",
            "--profile-from-start", "off", "--metrics", ",".join(METRICS), "--force-overwrite", "-o", str(report),
            python, "-m", "impl.l2cache.experiments", *driver_args]


def import_command(report: Path, ncu: str = "ncu") -> list[str]:
    return [ncu, "--import", str(report), "--csv", "--page", "raw", "--print-units", "base"]


def _number(text: str) -> float:
    return float(text.replace(",", "").strip())


def parse_raw_csv(text: str) -> list[dict[str, float]]:
    """One dict per profiled result: the short metric names -> values in bytes or percent.

    Finds the header row (the one naming the metrics), skips the units row, scales units other than the base ones,
    and raises ``ValueError`` naming what is missing when a metric column or any result row is absent."""
    rows = list(csv.reader(io.StringIO(text)))
    header_at = next((i for i, r in enumerate(rows) if METRICS[0] in r), None)
    if header_at is None:
        raise ValueError(f"no ncu CSV header with {METRICS[0]!r} in the output ({len(rows)} lines)")
    header = rows[header_at]
    missing = [m for m in METRICS if m not in header]
    if missing:
        raise ValueError(f"ncu CSV lacks the metric column(s) {missing}")
    cols = {m: header.index(m) for m in METRICS}
    body = rows[header_at + 1:]
    units: dict[str, float] = {m: 1.0 for m in METRICS}
    if body and all(_is_unit(body[0][c]) for c in cols.values()):
        units = {m: UNIT_SCALE[body[0][c].strip().lower()] for m, c in cols.items()}
        body = body[1:]
    out = []
    for r in body:
        if len(r) < len(header) or not r[cols[METRICS[0]]].strip():
            continue
        out.append({SHORT[m]: _number(r[c]) * units[m] for m, c in cols.items()})
    if not out:
        raise ValueError("the ncu CSV has a header but no result rows (nothing was profiled?)")
    return out


def _is_unit(cell: str) -> bool:
    return cell.strip().lower() in UNIT_SCALE and not cell.strip().replace(".", "").isdigit()


def run_profile(driver_args: list[str], timeout_s: float, cwd: Path) -> tuple[list[dict[str, float]], str]:
    """Profile one driver process and return (rows, log tail). Raises ``RuntimeError`` with the log on failure."""
    ncu = ncu_binary()
    if ncu is None:
        raise RuntimeError("ncu is not on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "l2cache"
        prof = subprocess.run(profile_command(report, driver_args, ncu), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout_s)
        log = (prof.stdout + prof.stderr)[-4000:]
        rep = report.with_suffix(".ncu-rep")
        if prof.returncode != 0 or not rep.exists():
            raise RuntimeError(f"ncu exited {prof.returncode}; log tail:\n{log}")
        imp = subprocess.run(import_command(rep, ncu), capture_output=True, text=True, timeout=120)
        if imp.returncode != 0:
            raise RuntimeError(f"ncu --import exited {imp.returncode}: {imp.stderr[-2000:]}")
        return parse_raw_csv(imp.stdout), log


# ---- one (workload, policy) pair against the default ------------------------------------------------------------

def ncu_driver(spec: dict, policy_names: list[str], requests: int, controller: Any,
               warmup: int = 10) -> list[tuple[str, int]]:
    """Serve each policy in turn and bracket ``requests`` requests with the profiler; returns (policy, kind) of
    each profiled request in order (the order ncu's result rows come in)."""
    import torch

    from impl.l2cache.policies import get_policy
    from impl.l2cache.serving import PolicyRunner
    from impl.l2cache.workloads import build

    wl = build(spec)
    profiled = []
    on_gpu = backend.ON_GPU and backend.DEVICE == "cuda"
    for name in policy_names:
        with PolicyRunner(wl, get_policy(name), controller) as runner:
            for i in range(warmup):
                wl.between_requests()
                runner.request(i % wl.kinds)
            for i in range(requests):
                wl.between_requests()
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.profiler.start()
                runner.request(i % wl.kinds)
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.profiler.stop()
                profiled.append((name, i % wl.kinds))
    return profiled


def dram_drop(rows: dict[str, list[dict]], policy: str) -> dict:
    """DRAM bytes read per request, default vs ``policy``: the drop of the means, and its conservative end over the
    profiled requests (the smallest default request against the largest policy request)."""
    d = [r["dram_read_bytes"] for r in rows["default"]]
    p = [r["dram_read_bytes"] for r in rows[policy]]
    mean_d, mean_p = sum(d) / len(d), sum(p) / len(p)
    return {"default_dram_read_bytes": mean_d, "policy_dram_read_bytes": mean_p,
            "dram_read_drop_pct": 100.0 * (mean_d - mean_p) / mean_d if mean_d else None,
            "dram_read_drop_lo_pct": 100.0 * (min(d) - max(p)) / mean_d if mean_d else None,
            "default_l2_hit_pct": sum(r["l2_hit_pct"] for r in rows["default"]) / len(d),
            "policy_l2_hit_pct": sum(r["l2_hit_pct"] for r in rows[policy]) / len(p)}


def profile_pair(target: dict, requests: int, deadline: float) -> dict:
    """ncu of default and the target's policy on its workload, in a driver process of its own."""
    left = deadline - time.time()
    base = {"workload": target["workload"], "policy": target["policy"], "requests": requests}
    if ncu_binary() is None:
        return {**base, "error": "ncu is not on PATH"}
    if left < 20:
        return {**base, "skipped": "GPU time budget spent"}
    root = Path(__file__).resolve().parents[2]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(target["spec"], f)
    policies = ["default", target["policy"]]
    t0 = time.time()
    try:
        args = ["--ncu-driver", f.name, "--policies", ",".join(policies), "--requests", str(requests)]
        rows, _ = run_profile(args, timeout_s=left, cwd=root)
        if len(rows) != len(policies) * requests:
            raise ValueError(f"expected {len(policies) * requests} ncu results, got {len(rows)}")
        per = {p: rows[i * requests:(i + 1) * requests] for i, p in enumerate(policies)}
        out = {**base, "rows": per, **dram_drop(per, target["policy"])}
        log(f"ncu {target['workload']}: DRAM read {out['default_dram_read_bytes'] / 1e6:.1f} -> "
            f"{out['policy_dram_read_bytes'] / 1e6:.1f} MB/request, L2 hit {out['default_l2_hit_pct']:.1f} -> "
            f"{out['policy_l2_hit_pct']:.1f}% [{time.time() - t0:.1f} s]")
        return out
    except Exception as e:  # recorded, never fatal: the latency results stand without it
        log(f"ncu {target['workload']}: FAILED: {str(e)[:300]}")
        return {**base, "error": str(e)[-3000:]}
    finally:
        os.unlink(f.name)
