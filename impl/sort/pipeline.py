"""Host-to-host sort: pinned staging, copies in aligned regions overlapped with every pass local to a region.

    out = sort(x) for a host numpy array x (or argsort(x)), through the device. The input is cut into aligned regions
    of 2^k slots (k: the smallest with at most ``chunks`` regions, at least one tile). A pass whose blocks all lie
    inside such regions (its highest pivot < k: the tile pass and every merge pass of stages <= k, and the final passes
    of the last stage) runs region by region; the passes between them need the whole array. Three streams, one per
    role, so that copies in one direction queue behind each other and never behind a kernel:
      copy-in stream:  for each region c: (x[c] -> pinned[c] on the host) ; pinned[c] -> dev[c] ; event arrived[c]
      compute stream:  for each region c: wait arrived[c] ; the leading local passes on the blocks of c
                       ; the global passes ; for each region c: the trailing local passes on c ; event sorted[c]
      copy-out stream: for each region c: wait sorted[c] ; dev_out[c] -> pinned[c] ; event done[c]
      host:            for each region c in order: wait done[c] ; (pinned[c] -> out[c])

Region c+1's upload overlaps region c's local passes (for 10M keys and 4 chunks: stages 1..22 of 24), and region c's
download overlaps region c+1's trailing passes. ``sort_staged()`` sorts keys already held in the pinned buffer
``stage_in`` into ``stage_out`` (no host copies: the figure the host-to-host target is about); on a GPU its second
and later calls replay the whole schedule as one CUDA graph (one launch instead of one host call per copy, pass and
event: about 55 for 10M keys, each 20-40 µs of host time, which otherwise leaves the copy engines waiting for the
host). ``pipe(x)`` adds the copies from and to ordinary numpy arrays, region by region, launched one by one so that
the host copies overlap the device's work. With ``pinned=False`` the staging buffer is ordinary (pageable) memory,
copies are synchronous and nothing overlaps: the naive baseline of the pinned-vs-pageable comparison. Buffers,
streams and graphs are made once per (n, dtype).

The passes are the CUDA C++ ones (``impl.sort.cuda_sort``) or numba's, as ``config`` selects (``impl.sort.bitonic``);
both sorters expose ``launch_pass(i, src, out, descending=, stream=, first_block=, blocks=)``, ``span_bits(i)``,
``block_bits(i)`` and ``pass_blocks(i)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import impl  # noqa: F401  (backend before numba)
import numpy as np
from numba import config as numba_config
from numba import cuda

from impl.sort.bitonic import BitonicSorter, StreamGraph, make_sorter, validate
from impl.sort.keys import key_format


@dataclass(frozen=True)
class PipelineConfig:
    chunks: int = 4        # at most this many aligned regions, each copied and locally sorted on its own
    streams: int = 3       # distinct streams for the roles copy-in, compute, copy-out (1: all in order on one)
    pinned: bool = True    # page-locked staging (async copies); False: pageable, synchronous, no overlap
    graph: bool = True     # sort_staged replays the schedule as one CUDA graph where a GPU allows it

    def __post_init__(self) -> None:
        if self.chunks < 1 or not 1 <= self.streams <= 3:
            raise ValueError(f"chunks must be >= 1 and streams 1..3, got {self.chunks} and {self.streams}")


NAIVE = PipelineConfig(chunks=1, streams=1, pinned=False, graph=False)


class HostSortPipeline:
    """``pipe(x)`` sorts (or argsorts) a host array of n keys of ``dtype``; see the module doc for the schedule.

    x may be in either byte order (the staging copy converts it); ``dtype`` itself must be native."""

    def __init__(self, n: int, dtype, *, argsort: bool = False, config=None,
                 pipeline: PipelineConfig = PipelineConfig()) -> None:
        self.fmt = key_format(dtype)
        self.sorter = make_sorter(n, self.fmt.dtype, argsort=argsort, config=config)
        if isinstance(self.sorter, BitonicSorter) and self.sorter.config.variant != "shared":
            raise ValueError("the host pipeline chunks the tile passes, so it needs the shared variant")
        self.passes = len(self.sorter.plan.passes)
        self.n, self.pipeline = int(n), pipeline
        alloc = cuda.pinned_array if pipeline.pinned else np.empty
        size = max(self.n, 1)
        self.stage_in = alloc(size, dtype=self.fmt.dtype)
        same = self.sorter.out_dtype == self.fmt.dtype
        self.stage_out = self.stage_in if same else alloc(size, dtype=self.sorter.out_dtype)
        self.d_src = cuda.device_array(size, dtype=self.fmt.dtype)
        self.d_out = cuda.device_array(size, dtype=self.sorter.out_dtype)
        if pipeline.pinned:
            made = [cuda.stream() for _ in range(pipeline.streams)]
            self.roles = tuple(made[min(r, len(made) - 1)] for r in range(3))
        else:
            self.roles = (0, 0, 0)
        self._graphs: dict[bool, StreamGraph] = {}
        self.graph_error: str | None = None  # why sort_staged launches one by one on a GPU, if capture failed

    @property
    def region_bits(self) -> int:
        """k: regions of 2^k slots, the fewest bits giving at most ``chunks`` regions, never less than pass 0's span."""
        per = -(-self.n // self.pipeline.chunks) if self.n else 1
        return max(self.sorter.span_bits(0), (per - 1).bit_length())

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """[lo, hi) of each region (aligned to 2^region_bits, so to tiles; the last one may be partial)."""
        size = 1 << self.region_bits
        return [(lo, min(lo + size, self.n)) for lo in range(0, self.n, size)]

    def schedule(self) -> tuple[range, range, range]:
        """(leading local passes, global passes, trailing local passes): the passes run per region before all regions
        are on the device, those run on the whole array, and those run per region before each region's download."""
        k, count = self.region_bits, self.passes
        local = [self.sorter.span_bits(i) <= k for i in range(count)]
        a = next((i for i, ok in enumerate(local) if not ok), count)
        b = max((i + 1 for i, ok in enumerate(local) if not ok), default=count)
        return range(0, a), range(a, b), range(b, count)

    @property
    def graphed(self) -> bool:
        """Whether ``sort_staged`` replays a captured graph (after its first call) rather than launching one by one."""
        return bool(self._graphs)

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None, *, descending: bool = False) -> np.ndarray:
        """Sort host array ``x`` into ``out`` (a new array by default), staging through the pinned buffers."""
        validate(x)
        if not isinstance(x, np.ndarray) or x.shape[0] != self.n or x.dtype.newbyteorder("=") != self.fmt.dtype:
            raise ValueError(f"this pipeline sorts host arrays of {self.n} {self.fmt.dtype}, got "
                             f"{type(x).__name__} {getattr(x, 'shape', None)} {getattr(x, 'dtype', None)}")
        out = np.empty(self.n, dtype=self.sorter.out_dtype) if out is None else out
        if self.n == 0:
            return out
        for (lo, hi), event in self._enqueue(descending, x):
            if event is not None:
                event.synchronize()
            out[lo:hi] = self.stage_out[lo:hi]
        return out

    def sort_staged(self, *, descending: bool = False) -> np.ndarray:
        """Sort the n keys held in ``stage_in`` into ``stage_out`` (the same buffer for keys-only) and return it.

        The first call per direction launches the schedule one by one (loading every kernel) and then captures it
        as a graph, which later calls replay; where capture is not possible, ``graph_error`` says why."""
        if not self.n:
            return self.stage_out[:0]
        graph = self._graphs.get(descending)
        if graph is not None:
            graph(self.roles[0])
            self.roles[0].synchronize()
            return self.stage_out[: self.n]
        for _, event in self._enqueue(descending, None):
            if event is not None:
                event.synchronize()
        if not self.pipeline.pinned:
            cuda.synchronize()
        elif self.pipeline.graph and self.graph_error is None and not numba_config.ENABLE_CUDASIM:
            self._capture(descending)
        return self.stage_out[: self.n]

    def _capture(self, descending: bool) -> None:
        """Capture the schedule from the copy-in stream (the other roles forked from it and joined back)."""
        origin = self.roles[0]
        others = [s for s in dict.fromkeys(self.roles[1:]) if s is not origin]

        def enqueue() -> None:
            fork = _record(origin)
            for s in others:
                fork.wait(s)
            self._enqueue(descending, None)
            for s in others:
                _record(s).wait(origin)

        cuda.synchronize()
        try:
            self._graphs[descending] = StreamGraph(origin, enqueue, relaxed=True,
                                                   keep=(self.sorter, self.d_src, self.d_out, self.stage_in,
                                                         self.stage_out))
        except Exception as e:  # e.g. a driver without stream capture: stay on the launch-by-launch schedule
            self.graph_error = f"{type(e).__name__}: {e}"
        cuda.synchronize()

    def _enqueue(self, descending: bool, x: np.ndarray | None) -> list:
        """Enqueue the whole schedule on the three role streams; ((lo, hi), download event or None) per region."""
        copy_in, compute, copy_out = self.roles
        pinned = self.pipeline.pinned
        lead, middle, trail = self.schedule()
        regions = self.chunk_bounds()
        sorted_ = []
        for lo, hi in regions:
            if x is not None:
                self.stage_in[lo:hi] = x[lo:hi]
            self._upload(lo, hi, copy_in)
            if pinned:
                _record(copy_in).wait(compute)
            for i in lead:
                self._region_pass(i, compute, lo, descending)
            if not (middle or trail):
                sorted_.append(_record(compute) if pinned else None)
        for i in middle:
            self.sorter.launch_pass(i, self.d_src, self.d_out, descending=descending, stream=compute)
        done = []
        for c, (lo, hi) in enumerate(regions):
            if middle or trail:
                for i in trail:
                    self._region_pass(i, compute, lo, descending)
                sorted_.append(_record(compute) if pinned else None)
            if sorted_[c] is not None:
                sorted_[c].wait(copy_out)
            self._download(lo, hi, copy_out)
            done.append(((lo, hi), _record(copy_out) if pinned else None))  # pageable copies are synchronous
        return done

    def _upload(self, lo: int, hi: int, stream) -> None:
        self.d_src[lo:hi].copy_to_device(self.stage_in[lo:hi], stream=stream)

    def _download(self, lo: int, hi: int, stream) -> None:
        self.d_out[lo:hi].copy_to_host(self.stage_out[lo:hi], stream=stream)

    def _region_pass(self, i: int, stream, lo: int, descending: bool) -> None:
        """Pass ``i`` on the blocks of the region starting at ``lo`` (the pass is local to regions of 2^k slots)."""
        shift = self.sorter.block_bits(i)
        first = lo >> shift
        last = min(first + (1 << (self.region_bits - shift)), self.sorter.pass_blocks(i))
        if last > first:
            self.sorter.launch_pass(i, self.d_src, self.d_out, descending=descending, stream=stream,
                                    first_block=first, blocks=last - first)


def _record(stream):
    event = cuda.event() if numba_config.ENABLE_CUDASIM else cuda.event(timing=False)  # the simulator takes no flag
    event.record(stream)
    return event
