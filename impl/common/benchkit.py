"""Derived bench metrics (GB/s, TFLOP/s and % of the card's measured peak from bytes, FLOPs and a median time), the
diagnosis of a figure above its peak, and the hand-over of our own per-round times to pytest-benchmark.

Byte and FLOP convention (every bench): ``bytes_moved`` is the workload's *compulsory* bytes — each input read
once, each output written once — the same count for every variant and anchor of one workload, so ``gbps`` is an
"effective" bandwidth comparable across them. Traffic a variant really moves beyond that (a sort's per-pass reads
and writes, a second pass over the input) goes in ``traffic_bytes`` and is shown as ``traffic_gbps`` beside it.
``flops`` counts the useful arithmetic of the workload (2·M·N·K for a GEMM), not work a variant wastes.
"""
from __future__ import annotations

from typing import Any

from impl import thirdparty

# flops_dtype -> (peak key, median key of older calibrations without peaks)
PEAK_KEYS = {"bf16": ("bf16_peak_tflops", "bf16_tflops"), "fp8": ("fp8_peak_tflops", "fp8_tflops")}
# extra_info["timing"] of a GPU bench (impl.common.timing's two views); a stored bench without it predates the queued
# view: its rounds began on an idle GPU, so the host's launch latency is inside its times
TIMING_QUEUED = "device events, queued (launch latency excluded)"
TIMING_EAGER = "device events, eager (launch latency included)"
# A figure this far above its peak is more likely a wrong byte/FLOP count than a calibration short of the true peak
COUNT_SUSPECT_PCT = 5.0


def peak_kernels(peaks: dict[str, Any], nbytes: int) -> dict[str, float]:
    """The calibration kernels (name -> GB/s) a kernel moving ``nbytes`` is held against: those that move at least
    half as many bytes (``bw_kernel_bytes``), or the largest where none does; empty without ``nbytes`` or kernel sizes
    (a calibration that predates them).

    Why half: the smaller a kernel, the more of its traffic L2 absorbs (its last writes are still there when the
    timer stops), so a kernel much smaller than a bench is no ceiling for it; but one larger than the bench is none
    either (an H100's 352 MB requantize read 101.2% of its 768 MiB triad). The calibration's sizes lie at most a
    factor 2 apart (``calibrate.bandwidth_kernel_bytes``), so a kernel within [nbytes / 2, nbytes] is always held
    against: no smaller kernel is more than twice as favoured by L2, and none larger than the bench sets the bar."""
    gbps, moved = peaks.get("bw_kernels") or {}, peaks.get("bw_kernel_bytes") or {}
    known = {name: v for name, v in gbps.items() if v and moved.get(name)}
    if nbytes <= 0 or not known:
        return {}
    fits = {name: v for name, v in known.items() if 2 * moved[name] >= nbytes}
    if not fits:
        top = max(moved[name] for name in known)
        fits = {name: v for name, v in known.items() if moved[name] == top}
    return fits


def bandwidth_peak(peaks: dict[str, Any], nbytes: int = 0) -> float | None:
    """The card's bandwidth ceiling in GB/s for a kernel moving ``nbytes``: the fastest calibration kernel that moves
    at least half as many (``peak_kernels``: a much smaller one keeps more of its traffic in L2, so it is no ceiling
    for a larger kernel). Without ``nbytes`` or kernel sizes: ``bw_peak_gbps`` (the fastest of all), or the copy
    median of a calibration that predates it."""
    fits = peak_kernels(peaks, nbytes)
    if fits:
        return max(fits.values())
    return peaks.get("bw_peak_gbps") or peaks.get("copy_gbps")


def flops_peak(peaks: dict[str, Any], flops_dtype: str) -> float | None:
    keys = PEAK_KEYS.get(flops_dtype)
    return (peaks.get(keys[0]) or peaks.get(keys[1])) if keys else None


def derived_metrics(seconds: float, bytes_moved: int, flops: int, peaks: dict[str, Any],
                    flops_dtype: str = "bf16", traffic_bytes: int = 0) -> dict[str, float]:
    """``gbps``, ``tflops``, ``traffic_gbps`` and ``pct_peak_*`` against ``peaks`` (from calibration) for one median
    time, the bandwidth against the peak for ``bytes_moved`` (``bandwidth_peak``); the peak used is stored beside
    (``peak_bw_gbps``, ``peak_tflops``)."""
    if seconds <= 0:
        return {}
    out: dict[str, float] = {}
    if bytes_moved:
        out["gbps"] = bytes_moved / seconds / 1e9
        peak = bandwidth_peak(peaks, bytes_moved)
        if peak:
            out["peak_bw_gbps"] = peak
            out["pct_peak_bw"] = 100 * out["gbps"] / peak
    if traffic_bytes:
        out["traffic_gbps"] = traffic_bytes / seconds / 1e9
    if flops:
        out["tflops"] = flops / seconds / 1e12
        peak = flops_peak(peaks, flops_dtype)
        if peak:
            out["peak_tflops"] = peak
            out["pct_peak_flops"] = 100 * out["tflops"] / peak
    return out


def over_peak_message(metrics: dict[str, float], peaks: dict[str, Any], flops_dtype: str = "bf16",
                      nbytes: int = 0) -> str | None:
    """Why a bench (moving ``nbytes``) reads above 100% of a calibrated peak, and which side is the likelier culprit;
    None when not."""
    problems = []
    pct = metrics.get("pct_peak_bw")
    if pct is not None and pct > 100:
        matched = peak_kernels(peaks, nbytes)
        kernels = matched or peaks.get("bw_kernels") or {"copy (median)": peaks.get("copy_gbps")}
        scope = f"those moving at least half its {nbytes / 1e6:.0f} MB, " if matched else ""
        what = scope + "GB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in kernels.items() if v)
        over = pct - 100
        culprit = ("the byte count is the likelier culprit: bytes_moved must be the compulsory bytes (each input read "
                   "once, each output written once; extra traffic goes in traffic_bytes)" if over > COUNT_SUSPECT_PCT
                   else "the calibration is the likelier culprit: within "
                   f"{COUNT_SUSPECT_PCT:g}% its kernels fall short of what this access pattern reaches (or the "
                   "clocks changed between calibration and bench); add the pattern to the calibration")
        problems.append(f"{metrics['gbps']:.0f} GB/s is {pct:.1f}% of the calibrated bandwidth peak "
                        f"{metrics['peak_bw_gbps']:.0f} GB/s ({over:.1f}% over; calibration kernels, {what}): "
                        f"{culprit}")
    pct = metrics.get("pct_peak_flops")
    if pct is not None and pct > 100:
        over = pct - 100
        culprit = (f"the FLOP count (or flops_dtype={flops_dtype!r}, whose peak it is held against) is the likelier "
                   "culprit" if over > COUNT_SUSPECT_PCT else
                   "the calibration is the likelier culprit: its GEMM shapes fall short of this one by a few percent")
        problems.append(f"{metrics['tflops']:.1f} TFLOP/s is {pct:.1f}% of the calibrated {flops_dtype} peak "
                        f"{metrics['peak_tflops']:.1f} TFLOP/s ({over:.1f}% over): {culprit}")
    return "; ".join(problems) or None


def record_rounds(benchmark: Any, seconds: list[float]) -> None:
    """Give pytest-benchmark per-round times measured by our own timer (its loop reads a host clock between rounds,
    which on a GPU needs a sync per read and so times an idle GPU's launch latency too). Once per fixture, like
    ``benchmark.pedantic``."""
    if not seconds or min(seconds) < 0:
        raise ValueError(f"need one or more non-negative round times, got {seconds!r}")
    thirdparty.hand_rounds_to_benchmark(benchmark, seconds)
