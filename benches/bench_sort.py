"""Benches of the bitonic sort and its anchors, side by side in one run.

bitonic   variants: ``shared`` (the CUDA C++ passes of impl.sort.cuda_sort: tile sort + fused coset merge passes in
          shared memory, one CUDA graph), ``shared_direct`` (the same kernels, one CuPy launch per pass) — both with
          the config ``impl.sort.choose`` picks for the mode and n (the card's measured table, else the built-in one),
          ``global`` (ablation, numba: one global pass per network step, graph-replayed); modes ``keys`` (sort) and
          ``kv`` (argsort: key + index); float32/int32; 1M/10M/100M.
anchors   cupy.sort / cupy.argsort (CUB radix), torch.sort, numpy.sort quicksort/stable (host clock, 1M and 10M).
copies    40 MB host-to-device from pageable vs pinned memory; host-to-host sort of 10M float32 keys: from the
          pipeline's pinned buffer (``pinned_buffer``), from an ordinary numpy array through the pinned, chunked,
          overlapped pipeline (``pipelined``), and the naive pageable one (``naive``).
Bytes: ``bytes_moved`` is the workload's compulsory traffic, the same for every variant and anchor of a workload
(keys: read n keys + write n keys; kv: read n keys + write n int64 indices); what a variant's passes really move is
``traffic_bytes``. extra_info carries the bandwidth model: passes, tile, steps fused per pass, bytes per pass, and
the time the pass traffic would take at the calibrated copy bandwidth (``model_ms_at_copy_peak``).
On a CPU the CUDA C++ variants run their source under the g++ emulation (tiny sizes, nothing stored).
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from fixtures.oracle import assert_close
from impl.backend import DEVICE, ON_GPU, sized
from impl.sort.bitonic import BitonicSorter, SortGraph
from impl.sort.network import default_config
from impl.sort.pipeline import NAIVE, STAGED, HostSortPipeline, PipelineConfig
from impl.sort import choose
from impl.sort.plan import EMU_CUDA_CONFIG
from impl.sort.runtimes import EmulatedRuntime, cupy_unavailable_reason

SIZES = sized([1_000_000, 10_000_000, 100_000_000], [100, 300])
HOST_SIZES = sized([1_000_000, 10_000_000], [300])
E2E_N = sized(10_000_000, 600)
H2D_BYTES = sized(40_000_000, 40_000)
DTYPES = ["float32", "int32"]
CUDA_CONFIG = sized(None, EMU_CUDA_CONFIG)  # None: the config impl.sort.choose's table picks per (mode, n)
_INPUTS: dict[tuple[int, str], tuple] = {}


def rounds_for(n: int) -> int:
    return 5 if n >= 50_000_000 else 20


def cuda_source_reason() -> str | None:
    """Why the CUDA C++ variants cannot run here (GPU without CuPy, or a CPU without g++), or None."""
    if ON_GPU:
        return cupy_unavailable_reason()
    return EmulatedRuntime.unavailable_reason()


def make_input(n: int, dtype: str):
    """(torch tensor, device array the sorters take) of n random keys, made once per (n, dtype)."""
    import torch

    if (n, dtype) not in _INPUTS:
        g = torch.Generator(device=DEVICE).manual_seed(n)
        if dtype == "float32":
            t = torch.randn(n, generator=g, device=DEVICE)
        else:
            t = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, device=DEVICE, dtype=torch.int32)
        if len(_INPUTS) >= 2:
            _INPUTS.clear()  # keep device memory bounded at 100M
        _INPUTS[(n, dtype)] = (t, cuda.as_cuda_array(t) if ON_GPU else cuda.to_device(t.numpy()))
    return _INPUTS[(n, dtype)]


def check_sorted(t, d_out, mode: str) -> None:
    """Compare with torch.sort of the same keys (on the device on a GPU)."""
    import torch

    got = torch.as_tensor(d_out, device="cuda") if ON_GPU else torch.from_numpy(d_out.copy_to_host())
    ref = torch.sort(t).values
    assert_close(t[got] if mode == "kv" else got, ref, rtol=0, atol=0)


def compulsory_bytes(n: int, mode: str, key_bytes: int = 4) -> int:
    """The workload's bytes: read n keys, write n keys (keys) or n int64 indices (kv)."""
    return n * (key_bytes + (8 if mode == "kv" else key_bytes))


def record_rate(benchmark, n: int) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["keys_per_s"] = n / benchmark.stats.stats.median


def config_source(mode: str) -> str:
    """Where the CUDA C++ sorter's config came from: the measured table (which one) or the built-in default."""
    return "explicit (CPU emulation)" if CUDA_CONFIG is not None else choose.active_table().source_for(mode)


def model_info(per_pass: list[int], peaks: dict) -> dict:
    """The bandwidth model of a variant: its pass traffic at the calibrated copy bandwidth."""
    info = {"passes": len(per_pass), "bytes_per_pass": sum(per_pass) / max(len(per_pass), 1),
            "traffic_bytes": sum(per_pass)}
    copy = (peaks or {}).get("copy_gbps")
    if copy:
        info["model_ms_at_copy_peak"] = sum(per_pass) / copy / 1e6
    return info


@pytest.mark.parametrize("n", SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["keys", "kv"])
@pytest.mark.parametrize("variant", ["shared", "shared_direct", "global"])
def test_sort_bitonic(device_bench, benchmark, peaks, variant, mode, dtype, n):
    t, d_x = make_input(n, dtype)
    if variant == "global":
        sorter = BitonicSorter(n, dtype, argsort=mode == "kv", config=default_config("global"))
        d_out = cuda.device_array(n, dtype=sorter.out_dtype)
        launch, reason = numba_call(sorter, d_x, d_out)
        extra = {"tile": 0, "steps_per_pass": [len(p.steps) for p in sorter.plan.passes]}
    else:
        reason = cuda_source_reason()
        if reason:
            pytest.skip(reason)
        from impl.sort.cuda_sort import CudaSorter

        sorter = CudaSorter(n, dtype, argsort=mode == "kv", config=CUDA_CONFIG)
        d_out = cuda.device_array(n, dtype=sorter.out_dtype)
        launch = sorter.graph(d_x, d_out) if variant == "shared" else (lambda: sorter(d_x, d_out))
        reason = None if variant == "shared" else "direct launches asked for"
        extra = {"tile": sorter.tile, "threads": sorter.threads, "slot_mode": sorter.mode,
                 "steps_per_pass": [p.steps for p in sorter.plan.passes],
                 "exchanges_per_pass": [p.exchanges for p in sorter.plan.passes],
                 "config": choose.config_name(sorter.config), "config_source": config_source(sorter.mode)}
    device_bench(launch, bytes_moved=compulsory_bytes(n, mode), rounds=rounds_for(n), warmup=2, n=n, dtype=dtype,
                 mode=mode, variant=variant, launch="graph" if reason is None else "direct", graph_error=reason,
                 **model_info(sorter.bytes_per_pass(), peaks), **extra)
    record_rate(benchmark, n)
    check_sorted(t, d_out, mode)


def numba_call(sorter, d_x, d_out):
    """A no-argument sort call of the numba sorter: its captured graph where possible, else direct launches."""
    try:
        return SortGraph(sorter, d_x, d_out), None
    except Exception as e:  # no GPU (simulator) or a capture problem: still measure, and say so
        return (lambda: sorter(d_x, d_out)), f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("n", SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["keys", "kv"])
def test_sort_cupy(device_bench, benchmark, mode, dtype, n):
    cupy = pytest.importorskip("cupy", reason="cupy is not installed here (GPU machine only): no CUB anchor")
    t, _ = make_input(n, dtype)
    x = cupy.asarray(t)
    fn = (lambda: cupy.sort(x)) if mode == "keys" else (lambda: cupy.argsort(x))
    device_bench(fn, bytes_moved=compulsory_bytes(n, mode), rounds=rounds_for(n), n=n, dtype=dtype, mode=mode,
                 variant="cupy")
    record_rate(benchmark, n)


@pytest.mark.parametrize("n", SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sort_torch(device_bench, benchmark, dtype, n):
    import torch

    t, _ = make_input(n, dtype)
    device_bench(lambda: torch.sort(t), bytes_moved=compulsory_bytes(n, "kv"), rounds=rounds_for(n), n=n,
                 dtype=dtype, mode="kv", variant="torch", traffic_bytes=n * (4 + 4 + 8))
    record_rate(benchmark, n)


@pytest.mark.parametrize("n", HOST_SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["quicksort", "stable"])
def test_sort_numpy(device_bench, benchmark, kind, dtype, n):
    t, _ = make_input(n, dtype)
    x = t.cpu().numpy()
    slow = kind == "stable" and n >= 10_000_000
    device_bench(lambda: np.sort(x, kind=kind), bytes_moved=compulsory_bytes(n, "keys"), clock="host",
                 flush_l2=False, rounds=3 if slow else 5 if n >= 10_000_000 else 20, warmup=1, n=n, dtype=dtype,
                 mode="keys", variant=f"numpy_{kind}")
    record_rate(benchmark, n)


@pytest.mark.parametrize("memory", ["pageable", "pinned"])
def test_sort_h2d(device_bench, memory):
    n = H2D_BYTES // 4
    host = cuda.pinned_array(n, np.float32) if memory == "pinned" else np.empty(n, np.float32)
    host[:] = 1.0
    dev = cuda.device_array(n, np.float32)
    # eager view: a pageable copy's host staging is the subject, and a held stream lets it start early
    device_bench(lambda: dev.copy_to_device(host), bytes_moved=H2D_BYTES, flush_l2=False, queue_ahead=False, n=n,
                 variant=memory)
    assert float(dev[n - 1]) == 1.0


@pytest.mark.parametrize("pipeline", ["pinned_buffer", "pipelined", "naive"])
def test_sort_end_to_end(device_bench, benchmark, pipeline):
    """Host keys in, sorted host keys out: copies, every pass, and (except ``pinned_buffer``) the host staging."""
    n = E2E_N
    reason = cuda_source_reason()
    config = CUDA_CONFIG if reason is None else None  # the numba passes where the CUDA C++ ones cannot run
    t, _ = make_input(n, "float32")
    x = t.cpu().numpy()
    pc = {"naive": NAIVE, "pinned_buffer": STAGED}.get(pipeline, PipelineConfig())
    pipe = HostSortPipeline(n, np.float32, config=config, pipeline=pc)
    out = np.empty_like(x)
    if pipeline == "pinned_buffer":
        def run():
            pipe.stage_in[:] = x  # outside the timed call: the keys are already held in the pinned buffer
        run()
        pipe.sort_staged()  # launch by launch once, then captured: the timed calls replay the graph
        fn, setup = pipe.sort_staged, run
    else:
        fn, setup = (lambda: pipe(x, out)), None
    device_bench(fn, bytes_moved=compulsory_bytes(n, "keys"), clock="host", flush_l2=False, rounds=10, setup=setup,
                 n=n, dtype="float32", mode="keys", variant=f"e2e_{pipeline}", chunks=len(pipe.chunk_bounds()),
                 passes=pipe.passes, implementation=type(pipe.sorter).__name__, fallback_reason=reason,
                 graph=pipe.graphed, graph_error=pipe.graph_error, early=pc.early, finish=pipe.finish,
                 lanes=len(pipe.lanes), launches_after_last_upload=pipe.exposed()[1])
    record_rate(benchmark, n)
    got = pipe.stage_out[:n] if pipeline == "pinned_buffer" else out
    assert np.array_equal(got, np.sort(x))
