"""Host-to-host sort: pinned staging, chunked copies overlapped with the tile passes on CUDA streams.

    out = sort(x) for a host numpy array x (or argsort(x)), through the device:
      for each chunk c (tile-aligned, alternating streams):  x[c] -> pinned[c] (host) ; pinned[c] -> dev[c] (async H2D)
                                                            ; first tile pass (block sort) on the blocks of c
      sync ; the wide and merge passes on one stream
      for each chunk c:  last tile pass on the blocks of c ; dev_out[c] -> pinned[c] (async D2H)
      for each chunk c in order: wait for it ; pinned[c] -> out[c] (host, while later chunks still copy)

Chunk c+1's H2D overlaps chunk c's block sort, and chunk c's D2H overlaps chunk c+1's last pass. With
``pinned=False`` the staging buffer is ordinary (pageable) memory, copies are synchronous and nothing overlaps: the
naive baseline of the pinned-vs-pageable comparison. Buffers and streams are made once per (n, dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import impl  # noqa: F401  (backend before numba)
import numpy as np
from numba import cuda

from impl.sort.bitonic import BitonicSorter, validate
from impl.sort.network import SortConfig


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
    """``pipe(x)`` sorts (or argsorts) a host array of n keys of ``dtype``; see the module doc for the schedule."""

    def __init__(self, n: int, dtype, *, argsort: bool = False, config: SortConfig | None = None,
                 pipeline: PipelineConfig = PipelineConfig()) -> None:
        self.sorter = BitonicSorter(n, dtype, argsort=argsort, config=config)
        if self.sorter.config.variant != "shared":
            raise ValueError("the host pipeline chunks the tile passes, so it needs the shared variant")
        self.n, self.pipeline = int(n), pipeline
        alloc = cuda.pinned_array if pipeline.pinned else np.empty
        size = max(self.n, 1)
        self.stage_in = alloc(size, dtype=self.sorter.fmt.dtype)
        same = self.sorter.out_dtype == self.sorter.fmt.dtype
        self.stage_out = self.stage_in if same else alloc(size, dtype=self.sorter.out_dtype)
        self.d_src = cuda.device_array(size, dtype=self.sorter.fmt.dtype)
        self.d_out = cuda.device_array(size, dtype=self.sorter.out_dtype)
        self.streams = [cuda.stream() for _ in range(pipeline.streams)] if pipeline.pinned else [0]

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """[lo, hi) ranges cut on tile boundaries (a tile pass's blocks never straddle two chunks)."""
        tile = self.sorter.plan.tile
        tiles = -(-self.n // tile)
        k = min(self.pipeline.chunks, tiles)
        cuts = [min(i * tiles // k * tile, self.n) for i in range(k + 1)] if k else []
        return list(zip(cuts, cuts[1:]))

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None, *, descending: bool = False) -> np.ndarray:
        validate(x)
        if not isinstance(x, np.ndarray) or x.shape[0] != self.n or x.dtype != self.sorter.fmt.dtype:
            raise ValueError(f"this pipeline sorts host arrays of {self.n} {self.sorter.fmt.dtype}, got "
                             f"{type(x).__name__} {getattr(x, 'shape', None)} {getattr(x, 'dtype', None)}")
        out = np.empty(self.n, dtype=self.sorter.out_dtype) if out is None else out
        if self.n == 0:
            return out
        sorter, launches = self.sorter, self.sorter.launches
        src, dout = sorter.views(self.d_src, self.d_out)
        enc = sorter.encode_params(descending)
        chunks = self.chunk_bounds()
        done = []
        for i, (lo, hi) in enumerate(chunks):
            s = self.streams[i % len(self.streams)]
            self.stage_in[lo:hi] = x[lo:hi]
            self.d_src[lo:hi].copy_to_device(self.stage_in[lo:hi], stream=s)
            self._tile_pass(launches[0], src, dout, enc, s, lo, hi)
            if len(launches) == 1:
                done.append(self._download(s, lo, hi))
        if len(launches) > 1:
            self._sync()
            for launch in launches[1:-1]:
                sorter.launch_one(launch, src, dout, enc, self.streams[0])
            self._sync()  # the last pass's chunks run on every stream
            for i, (lo, hi) in enumerate(chunks):
                s = self.streams[i % len(self.streams)]
                self._tile_pass(launches[-1], src, dout, enc, s, lo, hi)
                done.append(self._download(s, lo, hi))
        for (lo, hi), event in zip(chunks, done):
            if event is not None:
                event.synchronize()
            out[lo:hi] = self.stage_out[lo:hi]
        return out

    def _tile_pass(self, launch, src, dout, enc, stream, lo: int, hi: int) -> None:
        tile = self.sorter.plan.tile
        self.sorter.launch_one(launch, src, dout, enc, stream, first_block=lo // tile, blocks=-(-(hi - lo) // tile))

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
