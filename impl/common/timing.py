"""The one timer every system uses.

GPU work is asynchronous: a host clock read without a sync measures launches, not work. So on a GPU the time of one
call is the interval between two CUDA events recorded on the current stream around it, after warm-up, with the L2
flushed before each call unless the cache is the subject (``flush_l2=False``). On the CPU (interpreters) the host clock
is used; those numbers only prove the code runs and are never stored as results.

Two views of one call (``queue_ahead``):
* eager (False): the GPU is idle when the start event is recorded, so the interval also holds the host's time to
  launch the call (Python, driver: 10-50 µs a launch) -- the latency a caller of the eager function sees;
* queued (True): a spin kernel (``torch.cuda._sleep``) keeps the stream busy for twice the host's measured enqueue
  time of one call before the start event, so the whole call is queued before the GPU reaches it and the interval is
  the device time of its work (plus any gap ``fn`` forces itself, e.g. a sync inside it) -- how kernels are compared
  (triton's ``do_bench`` and nvbench measure the same way). The benches use this view and record the eager one beside.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from impl import backend

_FLUSH_BUFFER: Any = None
_FLUSH_SINK: Any = None
L2_FLUSH = "read"  # how flush_l2 evicts (recorded beside every bench that flushes)


def l2_bytes() -> int:
    """L2 size of the current device in bytes (0 without a GPU)."""
    if not backend.ON_GPU:
        return 0
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)


_SM_COUNT: dict[int, int] = {}
H100_SMS = 132  # off a GPU: the count of the cards this project measures (H100/H200), so grid rules run the same


def sm_count(device_index: int | None = None) -> int:
    """Streaming multiprocessors of a CUDA device (the current one by default); ``H100_SMS`` without a GPU."""
    if not backend.ON_GPU:
        return H100_SMS
    import torch

    idx = torch.cuda.current_device() if device_index is None else device_index
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = int(torch.cuda.get_device_properties(idx).multi_processor_count)
    return _SM_COUNT[idx]


def flush_l2() -> None:
    """Evict the L2 by reading a buffer of twice its size, which leaves it full of clean lines (a persisting carve-out
    survives this; see l2cache). Writing the buffer instead (``zero_``, as triton's ``do_bench`` does) leaves the L2
    full of dirty lines that the next, timed call writes back to DRAM as it evicts them: on the H200 that write-back
    charged a 14336x4096 FP8 amax 6.8 of its 39.2 µs and a dequantize 2.4 of 47.5 µs (the FP8 tune of fe3a9dd timed
    both flushes: results/h200/logs/fp8_tune_2026-12-03z.log), traffic that is the flush's, not the kernel's. Lines
    the previous call left dirty are written back here, outside the timed region."""
    global _FLUSH_BUFFER, _FLUSH_SINK
    if not backend.ON_GPU:
        return
    import torch

    if _FLUSH_BUFFER is None:
        _FLUSH_BUFFER = torch.ones(max(2 * l2_bytes(), 1 << 20) // 4, dtype=torch.float32, device="cuda")
        _FLUSH_SINK = torch.empty((), dtype=torch.float32, device="cuda")
    torch.sum(_FLUSH_BUFFER, dim=0, out=_FLUSH_SINK)


def synchronize() -> None:
    if backend.ON_GPU:
        import torch

        torch.cuda.synchronize()


_CYCLES_PER_MS: float | None = None


def _sleep_cycles_per_ms() -> float:
    """``torch.cuda._sleep`` spins for a count of GPU clock cycles; measure once how many make a millisecond."""
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:
        import torch

        torch.cuda._sleep(1000)  # the first call loads the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(4_000_000)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS = 4_000_000 / max(start.elapsed_time(end), 1e-3)
    return _CYCLES_PER_MS


def hold_stream(ms: float) -> None:
    """Keep the current stream busy for about ``ms`` milliseconds (at most 100) so the host enqueues what follows
    before the GPU reaches it."""
    import torch

    torch.cuda._sleep(int(min(max(ms, 0.0), 100.0) * _sleep_cycles_per_ms()))


@dataclass
class Timing:
    """Per-call times in milliseconds, with the summary the benches and scripts report; ``result`` is what the last
    call returned (the benches check it)."""

    times_ms: list[float] = field(default_factory=list)
    device: str = "cpu"
    result: Any = None
    hold_ms: float = 0.0  # queued view: how long the stream was held before each start event

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
    queue_ahead: bool = False,
) -> Timing:
    """Time ``fn()`` ``reps`` times after ``warmup`` calls; each call bracketed by CUDA events on a GPU.

    ``setup`` runs before each call, outside the timed region (for example to restore an input a sort overwrites).
    ``queue_ahead``: the queued view (module docstring) instead of the eager one.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    enqueue_s = 0.0
    for _ in range(warmup):
        if setup:
            setup()
        synchronize()
        t0 = time.perf_counter()
        fn()
        enqueue_s = time.perf_counter() - t0  # host time to enqueue one call (all of it, if fn syncs)
    if not backend.ON_GPU:
        times, result = [], None
        for _ in range(reps):
            ms, result = _host_time(fn, setup)
            times.append(ms)
        return Timing(times, device="cpu", result=result)
    import torch

    hold_ms = min((2e3 * enqueue_s if warmup else 1.0) + 0.05, 100.0) if queue_ahead else 0.0  # hold_stream's cap
    times, result = [], None
    for _ in range(reps):
        if setup:
            setup()
        if flush:
            flush_l2()
        if queue_ahead:
            hold_stream(hold_ms)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return Timing(times, device=torch.cuda.get_device_name(), result=result, hold_ms=hold_ms)


def _host_time(fn: Callable[[], Any], setup: Callable[[], Any] | None) -> tuple[float, Any]:
    if setup:
        setup()
    t0 = time.perf_counter()
    result = fn()
    return (time.perf_counter() - t0) * 1e3, result
