"""Benches of the bitonic sort (issue 3) and its anchors, side by side in one run.

bitonic   variants: ``shared`` (shared-memory tiles + register passes for wide strides, one CUDA graph), ``shared_direct`` (same
          kernels, one numba launch per pass: shows the launch cost), ``global`` (ablation: one global pass per
          step, graph-replayed); modes ``keys`` (sort) and ``kv`` (argsort: key + index); float32/int32; 1M/10M/100M.
anchors   cupy.sort / cupy.argsort (CUB radix), torch.sort, numpy.sort quicksort/stable (host clock, 1M and 10M).
copies    40 MB host-to-device from pageable vs pinned memory; end-to-end host-to-host sort of 10M float32 keys
          through the pinned, chunked, overlapped pipeline vs the naive pageable one.
extra_info: n, dtype, mode, variant, passes, bytes_per_pass (mean over passes), keys_per_s; the harness adds gbps and
pct_peak_bw (bytes moved over all passes / measured copy bandwidth).
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from fixtures.oracle import assert_close
from impl.backend import DEVICE, ON_GPU, sized
from impl.sort.bitonic import BitonicSorter, SortGraph
from impl.sort.network import default_config
from impl.sort.pipeline import NAIVE, HostSortPipeline, PipelineConfig

SIZES = sized([1_000_000, 10_000_000, 100_000_000], [100, 300])
HOST_SIZES = sized([1_000_000, 10_000_000], [300])
E2E_N = sized(10_000_000, 600)
H2D_BYTES = sized(40_000_000, 40_000)
DTYPES = ["float32", "int32"]
_INPUTS: dict[tuple[int, str], tuple] = {}


def rounds_for(n: int) -> int:
    return 5 if n >= 50_000_000 else 20


def make_input(n: int, dtype: str):
    """(torch tensor, numba device view) of n random keys, made on the device once per (n, dtype)."""
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


def record_rate(benchmark, n: int) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["keys_per_s"] = n / benchmark.stats.stats.median


@pytest.mark.parametrize("n", SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["keys", "kv"])
@pytest.mark.parametrize("variant", ["shared", "shared_direct", "global"])
def test_sort_bitonic(device_bench, benchmark, variant, mode, dtype, n):
    t, d_x = make_input(n, dtype)
    sorter = BitonicSorter(n, dtype, argsort=mode == "kv", config=default_config(variant.split("_")[0]))
    d_out = cuda.device_array(n, dtype=sorter.out_dtype)
    launch, reason = sorter_call(sorter, d_x, d_out, graph=variant != "shared_direct")
    per_pass = sorter.bytes_per_pass()
    device_bench(launch, bytes_moved=sum(per_pass), rounds=rounds_for(n), warmup=2, n=n, dtype=dtype, mode=mode,
                 variant=variant, passes=len(per_pass), bytes_per_pass=sum(per_pass) / len(per_pass),
                 tile=sorter.plan.tile, launch="graph" if reason is None else "direct", graph_error=reason)
    record_rate(benchmark, n)
    check_sorted(t, d_out, mode)


def sorter_call(sorter, d_x, d_out, *, graph: bool):
    """A no-argument sort call: the captured graph when asked and possible, else direct launches (and why)."""
    if graph:
        try:
            g = SortGraph(sorter, d_x, d_out)
            return g, None
        except Exception as e:  # no GPU (simulator) or a capture problem: still measure, and say so
            reason = f"{type(e).__name__}: {e}"
    else:
        reason = "direct launches asked for"
    return (lambda: sorter(d_x, d_out)), reason


@pytest.mark.parametrize("n", SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["keys", "kv"])
def test_sort_cupy(device_bench, benchmark, mode, dtype, n):
    cupy = pytest.importorskip("cupy", reason="cupy is not installed here (GPU machine only): no CUB anchor")
    t, _ = make_input(n, dtype)
    x = cupy.asarray(t)
    fn = (lambda: cupy.sort(x)) if mode == "keys" else (lambda: cupy.argsort(x))
    out_bytes = 4 if mode == "keys" else 8
    device_bench(fn, bytes_moved=n * (4 + out_bytes), rounds=rounds_for(n), n=n, dtype=dtype, mode=mode,
                 variant="cupy")
    record_rate(benchmark, n)


@pytest.mark.parametrize("n", SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sort_torch(device_bench, benchmark, dtype, n):
    import torch

    t, _ = make_input(n, dtype)
    device_bench(lambda: torch.sort(t), bytes_moved=n * (4 + 4 + 8), rounds=rounds_for(n), n=n, dtype=dtype,
                 mode="kv", variant="torch")
    record_rate(benchmark, n)


@pytest.mark.parametrize("n", HOST_SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["quicksort", "stable"])
def test_sort_numpy(device_bench, benchmark, kind, dtype, n):
    t, _ = make_input(n, dtype)
    x = t.cpu().numpy()
    slow = kind == "stable" and n >= 10_000_000
    device_bench(lambda: np.sort(x, kind=kind), bytes_moved=2 * n * 4, clock="host", flush_l2=False,
                 rounds=3 if slow else 5 if n >= 10_000_000 else 20, warmup=1, n=n, dtype=dtype, mode="keys",
                 variant=f"numpy_{kind}")
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


@pytest.mark.parametrize("pipeline", ["pipelined", "naive"])
def test_sort_end_to_end(device_bench, benchmark, pipeline):
    """Host array in, sorted host array out: copies, every pass, and the host-side staging copies."""
    n = E2E_N
    t, _ = make_input(n, "float32")
    x = t.cpu().numpy()
    pipe = HostSortPipeline(n, np.float32, pipeline=PipelineConfig() if pipeline == "pipelined" else NAIVE)
    out = np.empty_like(x)
    device_bench(lambda: pipe(x, out), bytes_moved=2 * n * 4, clock="host", flush_l2=False, rounds=10, n=n,
                 dtype="float32", mode="keys", variant=f"e2e_{pipeline}", chunks=len(pipe.chunk_bounds()))
    record_rate(benchmark, n)
    assert np.array_equal(out, np.sort(x))
