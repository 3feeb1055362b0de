"""Host-to-host sort: pinned staging, copies in aligned regions overlapped with every pass local to a region.

    out = sort(x) for a host numpy array x (or argsort(x)), through the device. The input is cut into aligned regions
    of 2^k slots (k: the smallest with at most ``chunks`` regions, at least one tile). A pass whose blocks all lie
    inside such regions (its highest pivot < k: the tile pass and every merge pass of stages <= k, and the final passes
    of the last stage) runs region by region; the passes between them need the whole array:
      for each region c (streams alternate):  x[c] -> pinned[c] (host) ; pinned[c] -> dev[c] (async H2D)
                                              ; the leading local passes on the blocks of c ; event ready[c]
      main stream waits for every ready[c] ; the global passes ; event merged
      for each region c:  its stream waits for merged ; the trailing local passes on c ; dev_out[c] -> pinned[c] (D2H)
      for each region c in order: wait for its download ; pinned[c] -> out[c] (host, while later regions still copy)

Region c+1's H2D overlaps region c's local passes (for 10M keys and 4 chunks: stages 1..22 of 24), and region c's D2H
overlaps region c+1's trailing passes; the host only waits for the downloads. ``sort_staged()`` sorts keys already
held in the pinned buffer ``stage_in`` into ``stage_out`` (no host copies: the figure the host-to-host target is
about); ``pipe(x)`` adds the copies from and to ordinary numpy arrays. With ``pinned=False`` the staging buffer is
ordinary (pageable) memory, copies are synchronous and nothing overlaps: the naive baseline of the pinned-vs-pageable
comparison. Buffers and streams are made once per (n, dtype).

The passes are the CUDA C++ ones (``impl.sort.cuda_sort``) or numba's, as ``config`` selects (``impl.sort.bitonic``);
both sorters expose ``launch_pass(i, src, out, descending=, stream=, first_block=, blocks=)``, ``span_bits(i)``,
``block_bits(i)`` and ``pass_blocks(i)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import impl  # noqa: F401  (backend before numba)
import numpy as np
from numba import cuda

from impl.sort.bitonic import BitonicSorter, make_sorter, validate
from impl.sort.keys import key_format


@dataclass(frozen=True)
class PipelineConfig:
    chunks: int = 4        # at most this many aligned regions, each copied and locally sorted on its own stream
    streams: int = 2       # CUDA streams the chunks alternate between
    pinned: bool = True    # page-locked staging (async copies); False: pageable, synchronous, no overlap

    def __post_init__(self) -> None:
        if self.chunks < 1 or self.streams < 1:
            raise ValueError(f"chunks and streams must be >= 1, got {self.chunks} and {self.streams}")


NAIVE = PipelineConfig(chunks=1, streams=1, pinned=False)


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
        self.streams = [cuda.stream() for _ in range(pipeline.streams)] if pipeline.pinned else [0]

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

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None, *, descending: bool = False) -> np.ndarray:
        """Sort host array ``x`` into ``out`` (a new array by default), staging through the pinned buffers."""
        validate(x)
        if not isinstance(x, np.ndarray) or x.shape[0] != self.n or x.dtype.newbyteorder("=") != self.fmt.dtype:
            raise ValueError(f"this pipeline sorts host arrays of {self.n} {self.fmt.dtype}, got "
                             f"{type(x).__name__} {getattr(x, 'shape', None)} {getattr(x, 'dtype', None)}")
        out = np.empty(self.n, dtype=self.sorter.out_dtype) if out is None else out
        if self.n == 0:
            return out
        done = self._run(descending, x)
        for (lo, hi), event in done:
            if event is not None:
                event.synchronize()
            out[lo:hi] = self.stage_out[lo:hi]
        return out

    def sort_staged(self, *, descending: bool = False) -> np.ndarray:
        """Sort the n keys held in ``stage_in`` into ``stage_out`` (the same buffer for keys-only) and return it."""
        if self.n:
            for _, event in self._run(descending, None):
                if event is not None:
                    event.synchronize()
            if not self.pipeline.pinned:
                cuda.synchronize()
        return self.stage_out[: self.n]

    def _run(self, descending: bool, x: np.ndarray | None) -> list:
        """Enqueue the whole schedule; ((lo, hi), event or None) per region, in order, for the download waits."""
        lead, middle, trail = self.schedule()
        regions = self.chunk_bounds()
        stream_of = [self.streams[c % len(self.streams)] for c in range(len(regions))]
        done = []
        ready = []
        for c, (lo, hi) in enumerate(regions):
            s = stream_of[c]
            if x is not None:
                self.stage_in[lo:hi] = x[lo:hi]
            self.d_src[lo:hi].copy_to_device(self.stage_in[lo:hi], stream=s)
            for i in lead:
                self._region_pass(i, s, lo, descending)
            if middle or trail:
                ready.append(self._event(s))
            else:
                done.append(((lo, hi), self._download(s, lo, hi)))
        if not (middle or trail):
            return done
        main = self.streams[0]
        for event in ready:
            event.wait(main)
        for i in middle:
            self.sorter.launch_pass(i, self.d_src, self.d_out, descending=descending, stream=main)
        merged = self._event(main)
        for c, (lo, hi) in enumerate(regions):
            s = stream_of[c]
            merged.wait(s)
            for i in trail:
                self._region_pass(i, s, lo, descending)
            done.append(((lo, hi), self._download(s, lo, hi)))
        return done

    def _region_pass(self, i: int, stream, lo: int, descending: bool) -> None:
        """Pass ``i`` on the blocks of the region starting at ``lo`` (the pass is local to regions of 2^k slots)."""
        shift = self.sorter.block_bits(i)
        first = lo >> shift
        last = min(first + (1 << (self.region_bits - shift)), self.sorter.pass_blocks(i))
        if last > first:
            self.sorter.launch_pass(i, self.d_src, self.d_out, descending=descending, stream=stream,
                                    first_block=first, blocks=last - first)

    @staticmethod
    def _event(stream):
        event = cuda.event()
        event.record(stream)
        return event

    def _download(self, stream, lo: int, hi: int):
        self.d_out[lo:hi].copy_to_host(self.stage_out[lo:hi], stream=stream)
        if not self.pipeline.pinned:
            return None  # pageable copies are synchronous
        event = cuda.event()
        event.record(stream)
        return event
