"""Peak calibration: measure this card's ceilings once per GPU run, so benches report % of a measured peak.

- copy: device-to-device copy of 1 GiB, bytes read + written over time (GB/s);
- bf16 / fp8 GEMM: 8192³ through torch (cuBLAS), 2·M·N·K over time (TFLOP/s); fp8 via ``torch._scaled_mm``;
- h2d: 40 MB host-to-device from pinned and from pageable memory (GB/s).

Copy and GEMM are timed in ``time_fn``'s queued view, like the benches they anchor; H2D in the eager one (the host's
staging is part of a pageable copy).
"""
from __future__ import annotations

from typing import Any

from impl import backend
from impl.common.timing import time_fn

GEMM_N = 8192
COPY_BYTES = 1 << 30


def measure_copy_gbps() -> float:
    import torch

    src = torch.randint(0, 255, (COPY_BYTES,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), warmup=3, reps=20, queue_ahead=True).median_ms
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def measure_gemm_tflops(dtype: str) -> float | None:
    import torch

    n = GEMM_N
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    if dtype == "bf16":
        fn = lambda: a @ b  # noqa: E731
    elif dtype == "fp8":
        if torch.cuda.get_device_capability() < (8, 9):
            return None
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major B, as cuBLASLt fp8 wants
        one = torch.ones((), device="cuda")
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        raise ValueError(f"dtype must be bf16 or fp8, not {dtype!r}")
    ms = time_fn(fn, warmup=5, reps=20, flush=False, queue_ahead=True).median_ms
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_h2d_gbps(pinned: bool, nbytes: int = 40_000_000) -> float:
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.random_(0, 255)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms = time_fn(lambda: dev.copy_(host, non_blocking=pinned), warmup=3, reps=20, flush=False).median_ms
    return nbytes / (ms * 1e-3) / 1e9


def calibrate() -> dict[str, Any]:
    """All peaks of the current card; empty dict without a GPU."""
    if not backend.ON_GPU:
        return {}
    return {"copy_gbps": measure_copy_gbps(), "bf16_tflops": measure_gemm_tflops("bf16"),
            "fp8_tflops": measure_gemm_tflops("fp8"), "h2d_pinned_gbps": measure_h2d_gbps(True),
            "h2d_pageable_gbps": measure_h2d_gbps(False),
            "method": "copy 1 GiB d2d (read+write); GEMM 8192^3 via torch; H2D 40 MB; medians of 20 event-timed reps "
                      "(copy and GEMM queued, launch latency excluded; H2D eager)"}
