"""The one timer every system uses.

GPU work is asynchronous: a host clock read without a sync measures launches, not work. So on a GPU the time of one
call is the interval between two CUDA events recorded on the current stream around it, after warm-up, with the L2
flushed before each call unless the cache is the subject (``flush_l2=False``). On the CPU (interpreters) the host clock
is used; those numbers only prove the code runs and are never stored as results.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from impl import backend

_FLUSH_BUFFER: Any = None


def l2_bytes() -> int:
    """L2 size of the current device in bytes (0 without a GPU)."""
    if not backend.ON_GPU:
        return 0
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)


def flush_l2() -> None:
    """Evict the L2 by writing a buffer of twice its size (a persisting carve-out survives this; see l2cache)."""
    global _FLUSH_BUFFER
    if not backend.ON_GPU:
        return
    import torch

    if _FLUSH_BUFFER is None:
        _FLUSH_BUFFER = torch.empty(max(2 * l2_bytes(), 1 << 20), dtype=torch.uint8, device="cuda")
    _FLUSH_BUFFER.zero_()


def synchronize() -> None:
    if backend.ON_GPU:
        import torch

        torch.cuda.synchronize()


class DeviceClock:
    """A monotonic clock in seconds that reads the GPU's own timeline.

    Each read records a CUDA event on the current stream, waits for it and returns its distance from a start event.
    The difference of two reads is the device time of the work enqueued between them (plus any idle gap the host
    caused, which is real latency). Resolution about 0.5 µs.
    """

    PRECISION_S = 1e-6

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._start = torch.cuda.Event(enable_timing=True)
        self._start.record()

    def __call__(self) -> float:
        ev = self._torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        return self._start.elapsed_time(ev) / 1e3


def host_clock() -> float:
    return time.perf_counter()


@dataclass
class Timing:
    """Per-call times in milliseconds, with the summary the benches and scripts report."""

    times_ms: list[float] = field(default_factory=list)
    device: str = "cpu"

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    reps: int = 20,
    flush: bool = True,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn()`` ``reps`` times after ``warmup`` calls; each call bracketed by CUDA events on a GPU.

    ``setup`` runs before each call, outside the timed region (for example to restore an input a sort overwrites).
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    if not backend.ON_GPU:
        return Timing([_host_time(fn, setup) for _ in range(reps)], device="cpu")
    import torch

    times = []
    for _ in range(reps):
        if setup:
            setup()
        if flush:
            flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return Timing(times, device=torch.cuda.get_device_name())


def _host_time(fn: Callable[[], Any], setup: Callable[[], Any] | None) -> float:
    if setup:
        setup()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
