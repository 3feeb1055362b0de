"""Host-to-host sort: pinned staging, chunked copies overlapped with the first and last passes on CUDA streams.

    out = sort(x) for a host numpy array x (or argsort(x)), through the device:
      for each chunk c (tile-aligned, alternating streams):  x[c] -> pinned[c] (host) ; pinned[c] -> dev[c] (async H2D)
                                                            ; first pass (block sort) on the blocks of c
      sync ; the merge passes on one stream
      for each chunk c:  last pass (contiguous tiles) on the blocks of c ; dev_out[c] -> pinned[c] (async D2H)
      for each chunk c in order: wait for it ; pinned[c] -> out[c] (host, while later chunks still copy)

Chunk c+1's H2D overlaps chunk c's block sort, and chunk c's D2H overlaps chunk c+1's last pass. ``sort_staged()``
sorts keys already held in the pinned buffer ``stage_in`` into ``stage_out`` (no host copies: the figure the
host-to-host target is about); ``pipe(x)`` adds the copies from and to ordinary numpy arrays. With
``pinned=False`` the staging buffer is ordinary (pageable) memory, copies are synchronous and nothing overlaps: the
naive baseline of the pinned-vs-pageable comparison. Buffers and streams are made once per (n, dtype).

The passes are the CUDA C++ ones (``impl.sort.cuda_sort``) or numba's, as ``config`` selects (``impl.sort.bitonic``);
both sorters expose ``launch_pass(i, src, out, descending=, stream=, first_block=, blocks=)``.
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
    chunks: int = 4        # pieces of the input, each copied and block-sorted on its own stream
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
        last = self.sorter.plan.passes[-1]
        if getattr(last, "contiguous", True) is False:
            raise ValueError("the host pipeline runs the last pass per chunk, so it must work on contiguous tiles")
        self.n, self.pipeline = int(n), pipeline
        alloc = cuda.pinned_array if pipeline.pinned else np.empty
        size = max(self.n, 1)
        self.stage_in = alloc(size, dtype=self.fmt.dtype)
        same = self.sorter.out_dtype == self.fmt.dtype
        self.stage_out = self.stage_in if same else alloc(size, dtype=self.sorter.out_dtype)
        self.d_src = cuda.device_array(size, dtype=self.fmt.dtype)
        self.d_out = cuda.device_array(size, dtype=self.sorter.out_dtype)
        self.streams = [cuda.stream() for _ in range(pipeline.streams)] if pipeline.pinned else [0]

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """[lo, hi) ranges cut on tile boundaries (a tile pass's blocks never straddle two chunks)."""
        tile = self.sorter.tile
        tiles = -(-self.n // tile)
        k = min(self.pipeline.chunks, tiles)
        cuts = [min(i * tiles // k * tile, self.n) for i in range(k + 1)] if k else []
        return list(zip(cuts, cuts[1:]))

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
        """Enqueue the whole schedule; ((lo, hi), event or None) per chunk, in order, for the download waits."""
        sorter = self.sorter
        chunks = self.chunk_bounds()
        done = []
        for i, (lo, hi) in enumerate(chunks):
            s = self.streams[i % len(self.streams)]
            if x is not None:
                self.stage_in[lo:hi] = x[lo:hi]
            self.d_src[lo:hi].copy_to_device(self.stage_in[lo:hi], stream=s)
            self._chunk_pass(0, s, lo, hi, descending)
            if self.passes == 1:
                done.append(((lo, hi), self._download(s, lo, hi)))
        if self.passes > 1:
            self._sync()
            for i in range(1, self.passes - 1):
                sorter.launch_pass(i, self.d_src, self.d_out, descending=descending, stream=self.streams[0])
            self._sync()  # the last pass's chunks run on every stream
            for i, (lo, hi) in enumerate(chunks):
                s = self.streams[i % len(self.streams)]
                self._chunk_pass(self.passes - 1, s, lo, hi, descending)
                done.append(((lo, hi), self._download(s, lo, hi)))
        return done

    def _chunk_pass(self, i: int, stream, lo: int, hi: int, descending: bool) -> None:
        tile = self.sorter.tile
        self.sorter.launch_pass(i, self.d_src, self.d_out, descending=descending, stream=stream,
                                first_block=lo // tile, blocks=-(-(hi - lo) // tile))

    def _download(self, stream, lo: int, hi: int):
        self.d_out[lo:hi].copy_to_host(self.stage_out[lo:hi], stream=stream)
        if not self.pipeline.pinned:
            return None  # pageable copies are synchronous
        event = cuda.event()
        event.record(stream)
        return event

    def _sync(self) -> None:
        for s in self.streams:
            if s != 0:
                s.synchronize()
        if not self.pipeline.pinned:
            cuda.synchronize()
