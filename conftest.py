"""Suite-wide pytest set-up.

Imports ``impl`` first so the execution backend is decided before triton or numba load; registers the hypothesis
profiles; skips ``gpu``/``multi_gpu`` tests with the reason where the hardware is missing; points pytest-benchmark's
storage at ``results/<gpu-slug>/`` and disables timing on a machine without a GPU (benches then run once as tests);
provides the ``device_bench`` fixture every bench uses and the per-run ``peaks`` calibration. A system's own
fixtures live in ``fixtures/<system>.py``, loaded here as plugins (``pytest_plugins``).
"""
from __future__ import annotations

import json
import os
import sys

import impl  # noqa: F401  (decides TRITON_INTERPRET / NUMBA_ENABLE_CUDASIM before anything imports them)
import pytest
from hypothesis import HealthCheck, settings

from fixtures.strategies import hypothesis_profile_from_env
from impl import backend
from impl.common import results as res

pytest_plugins = ("fixtures.l2cache", "fixtures.seam")

_SLOW_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=15, print_blob=True,
                          suppress_health_check=_SLOW_HEALTH)
settings.register_profile("dev", deadline=None, max_examples=30, print_blob=True, suppress_health_check=_SLOW_HEALTH)
settings.register_profile("gpu", deadline=None, max_examples=100, print_blob=True, suppress_health_check=_SLOW_HEALTH)
settings.load_profile(hypothesis_profile_from_env())

_DEFAULT_STORAGE = "file://./.benchmarks"


def pytest_configure(config: pytest.Config) -> None:
    if backend.SIMULATED:
        # The numba simulator runs one OS thread per CUDA thread and polls them at every syncthreads; with the
        # default 5 ms GIL switch interval each barrier waits a time slice. 50 µs makes simulator tests ~3x faster.
        sys.setswitchinterval(5e-5)
    # Runs before pytest-benchmark's own (trylast) configure, which reads these options.
    opt = config.option
    if getattr(opt, "benchmark_storage", None) == _DEFAULT_STORAGE:
        opt.benchmark_storage = f"file://{res.results_dir()}"
    if not backend.ON_GPU and hasattr(opt, "benchmark_disable") and not getattr(opt, "benchmark_enable", False):
        opt.benchmark_disable = True  # no GPU: benches run once at tiny sizes, as tests, and store nothing


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"lab backend: {backend.describe()}", f"hypothesis profile: {settings.get_current_profile_name()}",
            f"benchmark storage: {getattr(config.option, 'benchmark_storage', None)}"]


def _gpu_count() -> int:
    if not backend.ON_GPU:
        return 0
    import torch

    return torch.cuda.device_count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    n = _gpu_count()
    for item in items:
        if "gpu" in item.keywords and not backend.ON_GPU:
            item.add_marker(pytest.mark.skip(reason=backend.NO_GPU_REASON))
        if "multi_gpu" in item.keywords and n < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs two CUDA GPUs; this machine has {n}"))


# ---- calibration and machine info ----------------------------------------------------------------------------

_PEAKS: dict | None = None


def measured_peaks() -> dict:
    """This card's peaks, measured once per pytest run on a GPU and stored as results/<slug>/calibration.json."""
    global _PEAKS
    if _PEAKS is None:
        from impl.common.calibrate import calibrate

        _PEAKS = calibrate()
        if _PEAKS:
            record = {"device": res.gpu_name(), "commit": res.git_commit(), "date": res.now_iso(), "peaks": _PEAKS}
            res.atomic_write_text(res.results_dir() / "calibration.json", json.dumps(record, indent=2) + "\n",
                                  overwrite=True)
    return _PEAKS


@pytest.fixture(scope="session")
def peaks() -> dict:
    return measured_peaks()


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info.update(res.machine_info())
    if backend.ON_GPU:
        machine_info["calibration"] = measured_peaks()


def pytest_benchmark_update_commit_info(config: pytest.Config, commit_info: dict) -> None:
    if os.environ.get("LAB_COMMIT"):  # a copy of the tree (the GPU machine): commit passed in, checked by LAB_TREE
        commit_info.update(id=os.environ["LAB_COMMIT"], dirty=res.stated_tree_problem() is not None,
                           project="gpu-systems-lab")


# ---- the bench fixture ----------------------------------------------------------------------------------------

@pytest.fixture
def device_bench(benchmark, request):
    """``device_bench(fn, bytes_moved=..., flops=..., ...)`` times ``fn()`` and records bytes/FLOPs/derived rates.

    On a GPU: ``impl.common.timing.time_fn`` in its queued view (the host enqueues each call while a spin kernel holds
    the stream, so the median is the device time of ``fn``'s work, not the launch latency of an idle GPU), ``rounds``
    calls after ``warmup``, the L2 flushed before each unless ``flush_l2=False``; the eager view of the same call
    (launch latency included, 5 calls) lands in ``extra_info["eager_median_s"]``; ``queue_ahead=False`` times the eager
    view instead, where the host's part is the subject (pageable copies). ``clock="host"`` times host work
    (numpy/pandas anchors) with pytest-benchmark's own loop and ``perf_counter``. Without a GPU, timing is disabled and
    ``fn`` runs once. ``info`` lands in ``extra_info`` (e.g. ``n=``, ``dtype=``, ``variant=``) for the report's tables
    and plots.

    ``bytes_moved`` is the workload's compulsory bytes (each input read once, each output written once: the same for
    every variant of one workload); ``traffic_bytes`` what this variant really moves beyond that, where it differs.
    Every round's time is stored (``extra_info["rounds_s"]``): the ledger's intervals and the gate's thresholds read
    them. A figure above 100% of the calibrated peak for its bytes fails the bench, saying whether the count or the
    calibration is the likelier culprit (the times are still stored; the ledger does not read its % of peak).
    """
    from impl.common.benchkit import (TIMING_EAGER, TIMING_QUEUED, derived_metrics, over_peak_message,
                                      record_rounds)
    from impl.common.timing import L2_FLUSH, time_fn

    def run(fn, *, bytes_moved: int, flops: int = 0, flops_dtype: str = "bf16", flush_l2: bool = True,
            rounds: int = 20, warmup: int = 3, setup=None, clock: str = "device", queue_ahead: bool = True,
            traffic_bytes: int = 0, **info):
        if clock not in ("device", "host"):
            raise ValueError(f"clock must be 'device' or 'host', not {clock!r}")
        if bytes_moved < 0 or traffic_bytes < 0 or flops < 0:
            raise ValueError(f"bytes_moved, traffic_bytes and flops must be >= 0, got {bytes_moved}, {traffic_bytes}, "
                             f"{flops}")
        benchmark.extra_info.update(bytes=int(bytes_moved), flops=int(flops), flops_dtype=flops_dtype,
                                    flush_l2=bool(flush_l2), clock=clock, **info)
        if flush_l2:
            benchmark.extra_info["l2_flush"] = L2_FLUSH
        if traffic_bytes:
            benchmark.extra_info["traffic_bytes"] = int(traffic_bytes)
        if backend.ON_GPU and clock == "device" and not benchmark.disabled:
            t = time_fn(fn, warmup=warmup, reps=rounds, flush=flush_l2, setup=setup, queue_ahead=queue_ahead)
            record_rounds(benchmark, [ms / 1e3 for ms in t.times_ms])
            if queue_ahead:
                eager = time_fn(fn, warmup=0, reps=5, flush=flush_l2, setup=setup)
                benchmark.extra_info.update(timing=TIMING_QUEUED, hold_ms=t.hold_ms,
                                            eager_median_s=eager.median_ms / 1e3)
            else:
                benchmark.extra_info.update(timing=TIMING_EAGER)
            result = t.result
        else:
            def before_round() -> None:  # returns nothing: pedantic would take a setup's return value as fn's args
                setup()

            result = benchmark.pedantic(fn, setup=before_round if setup is not None else None, rounds=rounds,
                                        warmup_rounds=warmup, iterations=1)
        if benchmark.stats is not None:
            benchmark.extra_info["rounds_s"] = [float(s) for s in benchmark.stats.stats.data]
            pk = measured_peaks()  # {} without a GPU
            metrics = derived_metrics(benchmark.stats.stats.median, bytes_moved, flops, pk, flops_dtype,
                                      traffic_bytes)
            benchmark.extra_info.update(metrics)
            over = over_peak_message(metrics, pk, flops_dtype, bytes_moved)
            if over:
                benchmark.extra_info["over_peak"] = over
                pytest.fail(f"{request.node.name}: {over}", pytrace=False)
        return result

    return run
