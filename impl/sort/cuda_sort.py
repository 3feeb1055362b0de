"""The CUDA C++ bitonic sort, host side: plan (``impl.sort.plan``) -> kernels (``codegen``) -> launches (``runtimes``).

    sorter = CudaSorter(n, dtype, argsort=False)   # plan built, kernels compiled and loaded, workspace allocated
    sorter(d_src, d_out, descending=False)          # len(sorter.plan.passes) launches on the current stream
    replay = sorter.graph(d_src, d_out)             # the same passes captured once as a CUDA graph; replay()
                                                    # (region by region on several streams: ``schedule``)

d_src: n values of ``dtype`` on the device (never written unless it is d_out); d_out: n values (sort) or int64
indices (argsort), in the order of ``impl.sort.keys`` / ``impl.sort.reference``. Arrays: anything with
``__cuda_array_interface__`` for the CuPy runtime; numpy arrays (or numba simulator arrays) for the emulated one.
Slot modes: keys32 (keys-only of ≤ 32-bit dtypes), keys64 (int64), composite (argsort of ≤ 32-bit dtypes:
key << 31 | index in one 64-bit word, held as the bits of a double that orders like it: ``bitonic.cu``), pairs
(argsort of int64: uint64 key + uint32 index, compared lexicographically).
Without a ``config`` the sorter takes the one ``impl.sort.choose`` measured fastest for (mode, n) on this card.
"""
from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

import numpy as np

from impl.sort.codegen import KernelSpec, plan_kernels
from impl.sort.keys import key_format
from impl.sort import choose
from impl.sort.plan import MODES, CudaPlan, CudaSortConfig, block_range, build_cuda_plan, padded_bits, slot_bytes
from impl.sort.runtimes import CupyRuntime, EmulatedRuntime, cupy_unavailable_reason

MAX_N = (1 << 31) - 1  # positions are 32-bit and the composite slot holds a 31-bit index


@functools.cache
def cupy_runtime() -> CupyRuntime:
    return CupyRuntime()


@functools.cache
def emulated_runtime() -> EmulatedRuntime:
    return EmulatedRuntime()


def default_runtime():
    """CuPy on a GPU where it is installed, else the CPU emulation of the same source."""
    return cupy_runtime() if cupy_unavailable_reason() is None else emulated_runtime()


def slot_mode(fmt, argsort: bool) -> str:
    if argsort:
        return "pairs" if fmt.pairs else "composite"
    return "keys64" if fmt.nbits == 64 else "keys32"


class CudaSorter:
    """Sort (or argsort) ``n`` keys of ``dtype`` with the CUDA C++ passes, over and over, without allocating."""

    def __init__(self, n: int, dtype, *, argsort: bool = False, config: CudaSortConfig | None = None,
                 runtime=None, runs: int | None = None) -> None:
        self.n, self.fmt, self.argsort = int(n), key_format(dtype), bool(argsort)
        if not 0 <= self.n <= MAX_N:
            raise ValueError(f"n = {self.n} keys is outside the supported range 0..{MAX_N} (32-bit positions)")
        self.mode = slot_mode(self.fmt, self.argsort)
        self.config = config or choose.config_for(self.n, self.mode)
        # runs: the passes stop at sorted runs of 2^runs slots left encoded in ``keys`` (a merge finishes the sort)
        self.plan: CudaPlan = build_cuda_plan(self.n, self.mode, self.config, runs)
        self.runtime = runtime or default_runtime()
        self.specs: list[KernelSpec] = plan_kernels(self.plan, self.fmt.nbits)
        self.smems = [slot_bytes(p.t, self.mode) for p in self.plan.passes]  # per launch
        self.smem = max(self.smems)  # the kernels' dynamic shared memory attribute
        self.grids = self.plan.grids()
        self.fns = self.runtime.kernels(self.specs, self.smem) if self.n else {}
        self.keys = self.runtime.empty(self.n, np.uint32 if self.mode == "keys32" else np.uint64)
        self.vals = self.runtime.empty(self.n if self.mode == "pairs" else 1, np.uint32)

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype(np.int64) if self.argsort else self.fmt.dtype

    @property
    def elem_bytes(self) -> int:
        return MODES[self.mode]

    @property
    def tile(self) -> int:
        return self.plan.tile

    @property
    def threads(self) -> int:
        return self.plan.threads

    @property
    def workspace_bytes(self) -> int:
        return self.n * self.elem_bytes

    def bytes_per_pass(self) -> list[int]:
        """Global bytes each pass reads and writes: its real slots (``PassSpec.work_bound``), the encode pass reading
        the input and the decode pass writing the output."""
        key = self.elem_bytes
        return [(m := p.work_bound(self.n)) * (self.fmt.dtype.itemsize if p.encode else key)
                + m * (self.out_dtype.itemsize if p.decode else key) for p in self.plan.passes]

    def model(self) -> dict[str, Any]:
        """The bandwidth model a bench records: passes, tile, steps fused per pass, bytes per pass."""
        per = self.bytes_per_pass()
        return {"passes": len(per), "tile": self.tile, "threads": self.threads, "mode": self.mode,
                "steps_per_pass": [p.steps for p in self.plan.passes],
                "exchanges_per_pass": [p.exchanges for p in self.plan.passes],
                "bytes_per_pass": per, "traffic_bytes": sum(per), "config": asdict(self.config)}

    def span_bits(self, i: int) -> int:
        """Every block of pass ``i`` lies inside one aligned region of 2^span_bits slots (its highest pivot + 1)."""
        return max(self.plan.passes[i].pivots) + 1

    def block_bits(self, i: int) -> int:
        """log2 of the slots one block of pass ``i`` holds; block b of a pass local to aligned regions of 2^k slots
        belongs to region b >> (k - block_bits)."""
        return self.plan.passes[i].t

    def pass_blocks(self, i: int) -> int:
        return self.grids[i]

    def encode_args(self, descending: bool) -> tuple:
        return (np.int32(self.fmt.kind), np.int32(self.argsort),
                np.uint64(self.fmt.full if descending else 0))

    def launch_pass(self, i: int, src, out, *, descending: bool = False, stream=None, first_block: int = 0,
                    blocks: int | None = None) -> None:
        """Launch pass ``i`` on blocks first_block..first_block+blocks−1 (all active blocks by default)."""
        grid = self.grids[i] - first_block if blocks is None else min(blocks, self.grids[i] - first_block)
        if grid <= 0:
            return
        rt = self.runtime
        args = (rt.ptr(src), rt.ptr(self.keys), rt.ptr(self.vals), rt.ptr(out), np.int64(self.n),
                *self.encode_args(descending), np.uint32(first_block))
        rt.launch(self.fns[self.specs[i].name], grid, self.plan.pass_threads(i), self.smems[i], args, stream)

    def schedule(self) -> tuple[list[list[tuple[int, int, int]]], list[int]]:
        """(per region, its launches (pass, first block, blocks); the passes after them on all blocks).

        Regions: 2^overlap_bits aligned regions of the padded size, those holding keys (``overlap_bits`` 0: none).
        The leading passes local to a region (every block inside one region) run region by region; region r's
        launches cover exactly its blocks, so the regions together run each of those passes once."""
        count = len(self.plan.passes)
        k = padded_bits(self.n) - self.config.overlap_bits
        if not self.n or self.config.overlap_bits == 0 or k < self.span_bits(0):
            return [], list(range(count))
        local = next((i for i in range(count) if self.span_bits(i) > k), count)
        regions = []
        for r in range(-(-self.n // (1 << k))):
            launches = []
            for i in range(local):
                first, last = block_range(r << k, r + 1 << k, self.block_bits(i), self.grids[i])
                if last > first:
                    launches.append((i, first, last - first))
            regions.append(launches)
        return regions, list(range(local, count))

    def run_schedule(self, src, out, *, descending: bool = False, stream=None, lanes=None) -> None:
        """The passes in ``schedule`` order: on ``stream`` alone, or (``lanes``: one CuPy stream per region) region r
        on lanes[r], starting after region r-1's tile pass, the remaining passes on ``stream`` after every region."""
        regions, rest = self.schedule()
        if lanes is None:
            for launches in regions:
                for i, first, blocks in launches:
                    self.launch_pass(i, src, out, descending=descending, stream=stream, first_block=first,
                                     blocks=blocks)
        else:
            event = self.runtime.cupy.cuda.Event
            ready = event(disable_timing=True)
            ready.record(stream)
            finished = []
            for launches, lane in zip(regions, lanes):
                lane.wait_event(ready)
                for i, first, blocks in launches:
                    self.launch_pass(i, src, out, descending=descending, stream=lane, first_block=first,
                                     blocks=blocks)
                    if i == 0:  # the next region's tile pass starts once this one's is done
                        ready = event(disable_timing=True)
                        ready.record(lane)
                finished.append(event(disable_timing=True))
                finished[-1].record(lane)
            for e in finished:
                stream.wait_event(e)
        for i in rest:
            self.launch_pass(i, src, out, descending=descending, stream=stream)

    def __call__(self, src, out, *, descending: bool = False, stream=None, passes: slice = slice(None)):
        if self.n:
            for i in range(len(self.plan.passes))[passes]:
                self.launch_pass(i, src, out, descending=descending, stream=stream)
        return out

    def graph(self, src, out, *, descending: bool = False):
        """All passes captured once as a CUDA graph in ``schedule`` order (a stream per region, forked from and
        joined back to a private stream); the returned callable replays them on the current stream. Under the
        emulation (no graphs on a CPU) the callable runs the same schedule launch by launch."""
        if not isinstance(self.runtime, CupyRuntime):
            return _Replay(None, (self, src, out, descending))
        cupy = self.runtime.cupy
        self(src, out, descending=descending)  # kernels loaded and run once before capture
        cupy.cuda.Device().synchronize()
        stream = cupy.cuda.Stream(non_blocking=True)
        lanes = [cupy.cuda.Stream(non_blocking=True) for _ in self.schedule()[0]] or None
        with stream:
            stream.begin_capture()
            try:
                self.run_schedule(src, out, descending=descending, stream=stream, lanes=lanes)
            finally:
                g = stream.end_capture()
        return _Replay(g, (self, src, out, lanes))  # the graph holds raw pointers into these


class _Replay:
    """A captured sort: ``replay()`` launches the graph on the current stream (``replay(stream)`` on that one)."""

    def __init__(self, graph, keep) -> None:
        self._graph, self._keep = graph, keep

    def __call__(self, stream=None) -> None:
        if self._graph is None:
            sorter, src, out, descending = self._keep
            sorter.run_schedule(src, out, descending=descending, stream=stream)
        else:
            self._graph.launch(stream)
