"""Derived bench metrics: GB/s, TFLOP/s and % of the card's measured peak from bytes, FLOPs and a median time."""
from __future__ import annotations

from typing import Any

PEAK_KEYS = {"bf16": "bf16_tflops", "fp8": "fp8_tflops"}


def derived_metrics(seconds: float, bytes_moved: int, flops: int, peaks: dict[str, Any],
                    flops_dtype: str = "bf16") -> dict[str, float]:
    """``gbps``, ``tflops`` and their ``pct_peak_*`` against ``peaks`` (from calibration) for one median time."""
    if seconds <= 0:
        return {}
    out: dict[str, float] = {}
    if bytes_moved:
        out["gbps"] = bytes_moved / seconds / 1e9
        if peaks.get("copy_gbps"):
            out["pct_peak_bw"] = 100 * out["gbps"] / peaks["copy_gbps"]
    if flops:
        out["tflops"] = flops / seconds / 1e12
        peak = peaks.get(PEAK_KEYS.get(flops_dtype, ""))
        if peak:
            out["pct_peak_flops"] = 100 * out["tflops"] / peak
    return out
