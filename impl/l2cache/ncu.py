"""Nsight Compute: the command lines that profile a driver process, and the parser of ncu's raw CSV page.

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
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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
