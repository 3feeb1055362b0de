"""Derived bench metrics (GB/s, TFLOP/s and % of the card's measured peak from bytes, FLOPs and a median time), and
the hand-over of our own per-round times to pytest-benchmark."""
from __future__ import annotations

from typing import Any

PEAK_KEYS = {"bf16": "bf16_tflops", "fp8": "fp8_tflops"}
# extra_info["timing"] of a GPU bench (impl.common.timing's two views); a stored bench without it predates the queued
# view: its rounds began on an idle GPU, so the host's launch latency is inside its times
TIMING_QUEUED = "device events, queued (launch latency excluded)"
TIMING_EAGER = "device events, eager (launch latency included)"


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


def record_rounds(benchmark: Any, seconds: list[float]) -> None:
    """Give pytest-benchmark per-round times measured by our own timer (its loop reads a host clock between rounds,
    which on a GPU needs a sync per read and so times an idle GPU's launch latency too). Once per fixture, like
    ``benchmark.pedantic``."""
    if not seconds or min(seconds) < 0:
        raise ValueError(f"need one or more non-negative round times, got {seconds!r}")
    if benchmark._mode:
        raise RuntimeError(f"the benchmark fixture was already used in {benchmark._mode} mode")
    benchmark._mode = "device_bench(...)"
    stats = benchmark._make_stats(1)
    for s in seconds:
        stats.update(s)
