"""Peak calibration: measure this card's ceilings once per GPU run, so benches report % of a measured peak.

Descriptive figures (medians of event-timed reps, as before):
- ``copy_gbps``: device-to-device copy of 1 GiB, bytes read + written over time;
- ``bf16_tflops`` / ``fp8_tflops``: 8192³ GEMM through torch (cuBLAS; fp8 via ``torch._scaled_mm``), 2·M·N·K / time;
- ``h2d_pinned_gbps`` / ``h2d_pageable_gbps``: 40 MB host-to-device from pinned / pageable memory.

Peaks, the denominators of every ``pct_peak_*`` (a true ceiling, so that no honest bench reads above 100%):
- ``bw_peak_gbps``: the best of several memory-bound kernels — copies of 1 GiB and 256 MiB, a read-only reduction
  (1 GiB summed), and a triad ``z = x + 2y`` (3 × 256 MiB, and 3 × 128, 64, 32 and 16 MiB: a bench kernel's
  scale, whose last writes are still in L2 when the timer stops, as a bench's are) — each at its *fastest* round;
  ``bw_kernels`` holds each one's GB/s and ``bw_kernel_bytes`` what it moves per call (48 MiB to 2 GiB, sizes at
  most a factor 2 apart). A bench is held against the fastest kernel that moves at least half its bytes
  (``benchkit.bandwidth_peak``): the smaller a kernel, the larger the share of its traffic that L2 absorbs (on an
  H100 the 3 × 32 MiB triad read 3322 GB/s where the 3 × 256 MiB one read 3144), so a 96 MiB kernel is no ceiling
  for a 350 MB one, while every bench meets a kernel of its own scale;
- ``bf16_peak_tflops`` / ``fp8_peak_tflops``: the best of three GEMM shapes (8192³, 4096×8192×8192,
  8192×4096×4096), fastest round; bf16 with B both row-major and as a transposed (N, K) weight, fp8 with operands
  spanning e4m3's range as a per-tensor quantizer leaves them (the layouts and data the benches multiply), each
  timed as the benches time theirs: the L2 flushed before every round (timed back to back, the 4096x8192x8192 bf16
  peak read 701-799 TFLOP/s on an H200 where the flushed bench read 802-814), and after the card has idled
  ``REST_S`` (a GEMM held back to back runs into the board's power limit: the shapes timed late in a flushed
  calibration read 1-6% below a bench of the same shape timed between lighter benches).
A bench's median of the same kernel lies below its calibration's fastest round unless the card's clocks changed
between the two. ``bw_kernels`` / ``*_gemm_shapes`` keep each kernel's figure, for the diagnosis of a bench above 100%.

Copy and GEMM are timed in ``time_fn``'s queued view, like the benches they anchor; H2D in the eager one (the host's
staging is part of a pageable copy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from impl import backend
from impl.common.timing import synchronize, time_fn

REST_S = 1.0  # idle before each peak GEMM's rounds, on a GPU: its power and clocks recover
METHOD = ("copy 1 GiB d2d (read+write); GEMM 8192^3 via torch; H2D 40 MB; medians of 20 event-timed reps (copy and "
          "GEMM queued, launch latency excluded; H2D eager). Peaks: fastest round of the best of copy 1 GiB / 256 MiB, "
          "read-only sum 1 GiB, triad 3 x 256 / 128 / 64 / 32 / 16 MiB (bandwidth; a bench is held against the "
          "best that moves at least half its bytes) and of GEMM 8192^3, 4096x8192x8192, 8192x4096x4096 (bf16: B "
          "row-major and transposed weight; fp8: operands scaled to e4m3's range), L2 flushed between rounds, each "
          f"GEMM after {REST_S:g} s idle")


@dataclass(frozen=True)
class Sizes:
    """What the calibration runs: copy sizes (bytes), the triad's array size, GEMM shapes (M, N, K), H2D bytes."""

    copy_bytes: int = 1 << 30
    small_bytes: int = 1 << 28
    bench_bytes: int = 1 << 26  # a triad's array at a bench kernel's scale (3 x 64 MiB, and half that)
    gemm: tuple[int, int, int] = (8192, 8192, 8192)
    gemm_shapes: tuple[tuple[int, int, int], ...] = ((8192, 8192, 8192), (4096, 8192, 8192), (8192, 4096, 4096))
    h2d_bytes: int = 40_000_000


FULL = Sizes()
TINY = Sizes(copy_bytes=1 << 16, small_bytes=1 << 14, bench_bytes=1 << 12, gemm=(64, 64, 64),
             gemm_shapes=((64, 64, 64), (32, 64, 64)),
             h2d_bytes=1 << 14)  # runs anywhere (CPU tests of the code path); its figures mean nothing


def _device() -> str:
    return "cuda" if backend.ON_GPU else "cpu"


def _rate(work: float, fn: Callable[[], Any], *, best: bool = False, flush: bool = True) -> float:
    """``work`` per second of ``fn`` (queued view): the median round, or the fastest with ``best``."""
    t = time_fn(fn, warmup=3, reps=20, flush=flush, queue_ahead=backend.ON_GPU)
    ms = min(t.times_ms) if best else t.median_ms
    return work / (max(ms, 1e-9) * 1e-3)


def measure_copy_gbps(nbytes: int = FULL.copy_bytes, *, best: bool = False) -> float:
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=_device())
    dst = torch.empty_like(src)
    return _rate(2 * nbytes, lambda: dst.copy_(src), best=best) / 1e9


def bandwidth_kernel_bytes(sizes: Sizes = FULL) -> dict[str, int]:
    """Bytes each memory-bound calibration kernel moves per call (read + written), by name: the footprint a bench is
    matched against (``benchkit.bandwidth_peak``)."""
    big, small, bench = sizes.copy_bytes, sizes.small_bytes, sizes.bench_bytes
    return {"copy_1gib": 2 * big, "copy_256mib": 2 * small, "read_sum_1gib": big, "triad_3x256mib": 3 * small,
            "triad_3x128mib": 3 * (2 * bench), "triad_3x64mib": 3 * bench, "triad_3x32mib": 3 * (bench // 2),
            "triad_3x16mib": 3 * (bench // 4)}


def measure_bandwidth_kernels(sizes: Sizes = FULL) -> dict[str, float]:
    """GB/s at the fastest round of each memory-bound calibration kernel (``bandwidth_kernel_bytes`` per call)."""
    import torch

    moved = bandwidth_kernel_bytes(sizes)
    big, small = sizes.copy_bytes, sizes.small_bytes
    out = {"copy_1gib": measure_copy_gbps(big, best=True), "copy_256mib": measure_copy_gbps(small, best=True)}
    x = torch.rand(big // 4, device=_device())
    acc = torch.empty((), device=_device())
    out["read_sum_1gib"] = _rate(moved["read_sum_1gib"], lambda: torch.sum(x, dim=0, out=acc), best=True) / 1e9
    del x
    for name in [k for k in moved if k.startswith("triad_")]:
        n = moved[name] // 12
        a, b, c = (torch.rand(n, device=_device()) for _ in range(3))
        out[name] = _rate(moved[name], lambda: torch.add(a, b, alpha=2.0, out=c), best=True) / 1e9
    return out


LAYOUTS = ("nn", "nt")  # B stored (K, N) row-major, or as an (N, K) weight used transposed (every linear layer)


def _gemm_fn(dtype: str, m: int, n: int, k: int, layout: str = "nn") -> Callable[[], Any] | None:
    """One GEMM of (M, K) x (K, N). fp8 operands span the e4m3 range the way a per-tensor quantizer leaves them
    (amax scaled to e4m3's largest finite value), the data the FP8 benches multiply; its B is column-major in either
    layout, as ``torch._scaled_mm`` requires, so ``layout`` only changes bf16."""
    import torch

    if dtype not in ("bf16", "fp8"):
        raise ValueError(f"dtype must be bf16 or fp8, not {dtype!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    a = torch.randn(m, k, device=_device(), dtype=torch.bfloat16)
    w = torch.randn(n, k, device=_device(), dtype=torch.bfloat16)
    if dtype == "bf16":
        b = w.t() if layout == "nt" else w.t().contiguous()
        return lambda: a @ b
    if not backend.ON_GPU or torch.cuda.get_device_capability() < (8, 9):
        return None
    top = torch.finfo(torch.float8_e4m3fn).max
    a8, w8 = ((t * (top / t.abs().amax().float())).to(torch.float8_e4m3fn) for t in (a, w))
    b8 = w8.t()  # column-major (K, N)
    one = torch.ones((), device="cuda")
    return lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def measure_gemm_tflops(dtype: str, shape: tuple[int, int, int] = FULL.gemm, *, best: bool = False,
                        layout: str = "nn") -> float | None:
    fn = _gemm_fn(dtype, *shape, layout=layout)
    if fn is None:
        return None
    m, n, k = shape
    if best:
        rest()
    # a peak is timed like the benches it bounds: L2 flushed between rounds (the card's power headroom recovers
    # in the gap); the descriptive figure back to back
    return _rate(2 * m * n * k, fn, best=best, flush=best) / 1e12


def rest(seconds: float = REST_S) -> None:
    """Let the GPU idle ``seconds`` after its queue drains (nothing on the CPU)."""
    if backend.ON_GPU:
        synchronize()
        time.sleep(seconds)


def measure_h2d_gbps(pinned: bool, nbytes: int = FULL.h2d_bytes) -> float:
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.random_(0, 255)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms = time_fn(lambda: dev.copy_(host, non_blocking=pinned), warmup=3, reps=20, flush=False).median_ms
    return nbytes / (ms * 1e-3) / 1e9


def measure_peaks(sizes: Sizes = FULL) -> dict[str, Any]:
    """Every figure of the module docstring on this machine's device (H2D only with a GPU)."""
    bw = measure_bandwidth_kernels(sizes)
    peaks: dict[str, Any] = {"copy_gbps": measure_copy_gbps(sizes.copy_bytes),
                             "bf16_tflops": measure_gemm_tflops("bf16", sizes.gemm),
                             "fp8_tflops": measure_gemm_tflops("fp8", sizes.gemm)}
    if backend.ON_GPU:
        peaks.update(h2d_pinned_gbps=measure_h2d_gbps(True, sizes.h2d_bytes),
                     h2d_pageable_gbps=measure_h2d_gbps(False, sizes.h2d_bytes))
    peaks.update(bw_kernels=bw, bw_kernel_bytes=bandwidth_kernel_bytes(sizes), bw_peak_gbps=max(bw.values()))
    for dtype in ("bf16", "fp8"):
        layouts = LAYOUTS if dtype == "bf16" else ("nt",)
        shapes = {"x".join(map(str, s)) + (f"-{lay}" if len(layouts) > 1 else ""):
                  measure_gemm_tflops(dtype, s, best=True, layout=lay) for s in sizes.gemm_shapes for lay in layouts}
        if all(v is not None for v in shapes.values()):
            peaks[f"{dtype}_gemm_shapes"] = shapes
            peaks[f"{dtype}_peak_tflops"] = max(shapes.values())
    peaks["method"] = METHOD
    return peaks


def calibrate() -> dict[str, Any]:
    """All peaks of the current card; empty dict without a GPU."""
    return measure_peaks(FULL) if backend.ON_GPU else {}
