"""Decode steps replayed from captured CUDA graphs (one graph per padded batch size), as vLLM and gpt-fast do.

A decode step of a 32-layer model is ~500 small kernel launches; eagerly that costs milliseconds of host time, as
much as the weights take to stream at batch 1. A graph replays the whole step in one launch. Graphs need fixed
shapes and addresses, so every input lives in a static buffer sized for the largest bucket: a batch of B sequences
runs the graph of the smallest bucket ≥ B, the extra rows padded with token 0 at position 0, written to slot 0 of
the null page 0, with K/V length 0 (the Triton decode kernel writes zeros for them). The decode kernel's split-KV
grid follows from the bucket's batch and the block table's fixed width (``max_seq_len``), never from the lengths, so
one captured grid serves every replay. A step's inputs are packed on the host (``pack_decode_inputs``: numpy, into
two pinned buffers laid out like the static ones) and reach the GPU in three asynchronous copies, so the host never
waits for the GPU before a replay. Graphs are captured lazily, on first use of a bucket, after two warm-up runs on a
side stream (which also compile the Triton kernels), or all at once by ``capture_all`` (a server does that before
its first request, so no request waits for a capture).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from impl.serve.kv_cache import AttentionMetadata, PagedKVCache, PagedStep
from impl.serve.model import Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: PagedKVCache, backend, max_batch: int, max_seq_len: int) -> None:
        if not backend.graph_safe:
            raise ValueError(f"attention backend {backend.name!r} cannot run inside a CUDA graph")
        self.model, self.cache, self.backend = model, cache, backend
        self.sizes = sorted({b for b in BUCKETS if b < max_batch} | {max_batch})
        n, dev = self.sizes[-1], model.device
        self.width = cache.pages_for(max_seq_len)
        pin = dev.type == "cuda"
        # ids rows: token, position, KV slot; lens_tables: seq_lens [n] then block tables [n, width], flat
        self.ids = torch.zeros(3, n, dtype=torch.int64, device=dev)
        self.lens_tables = torch.zeros(n + n * self.width, dtype=torch.int32, device=dev)
        self.host_ids = torch.zeros(3, n, dtype=torch.int64, pin_memory=pin)
        self.host_lens_tables = torch.zeros(n + n * self.width, dtype=torch.int32, pin_memory=pin)
        self.tokens, self.positions, self.slots = self.ids[0], self.ids[1], self.ids[2]
        self.seq_lens = self.lens_tables[:n]
        self.block_tables = self.lens_tables[n:].view(n, self.width)
        self.q_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.copied = torch.cuda.Event() if dev.type == "cuda" else None  # host buffers free again once it fires
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = None

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def bucket(self, batch: int) -> int:
        return next(b for b in self.sizes if b >= batch)

    def _meta(self, bp: int) -> AttentionMetadata:
        return AttentionMetadata(q_start=self.q_start[:bp + 1], seq_lens=self.seq_lens[:bp],
                                 block_tables=self.block_tables[:bp], slot_mapping=self.slots[:bp],
                                 positions=self.positions[:bp], page_size=self.cache.page_size, q_lens=[1] * bp)

    def _forward(self, bp: int) -> Tensor:
        return self.model(self.tokens[:bp], PagedStep(self.cache, self.backend, self._meta(bp), None))

    def _capture(self, bp: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(bp)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(bp)
        self.pool = graph.pool()
        return graph, out

    def load(self, seqs: list[tuple[int, int, int]], last_tokens: list[int]) -> int:
        """Copy one decode step's inputs into the static buffers; returns the bucket size."""
        n, bp = self.sizes[-1], self.bucket(len(seqs))
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copies have read the pinned buffers
        pack_decode_inputs(seqs, last_tokens, self.cache.block_tables, self.cache.page_size, bp,
                           self.host_ids.numpy(), self.host_lens_tables.numpy(), n, self.width)
        self.ids.copy_(self.host_ids, non_blocking=True)
        self.seq_lens[:bp].copy_(self.host_lens_tables[:bp], non_blocking=True)
        self.lens_tables[n:n + bp * self.width].copy_(self.host_lens_tables[n:n + bp * self.width],
                                                      non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return bp

    def capture_all(self) -> int:
        """Capture every bucket not yet captured, between steps; returns how many. The static inputs are zeroed
        first, so the capture's warm-up forwards run padding rows only (they write slot 0 of the null page)."""
        new = [bp for bp in self.sizes if bp not in self.graphs]
        if new:
            self.ids.zero_()
            self.lens_tables.zero_()
        for bp in new:
            self.graphs[bp] = self._capture(bp)
        return len(new)

    def replay(self, bp: int) -> Tensor:
        if bp not in self.graphs:
            self.graphs[bp] = self._capture(bp)
        graph, out = self.graphs[bp]
        graph.replay()
        return out

    def run(self, seqs: list[tuple[int, int, int]], last_tokens: list[int]) -> Tensor:
        """Logits [len(seqs), vocab] of one decode step; ``seqs`` = [(seq id, position of its token, 1)]."""
        bp = self.load(seqs, last_tokens)
        return self.replay(bp)[: len(seqs)]


def pack_decode_inputs(seqs: list[tuple[int, int, int]], last_tokens: list[int], tables: dict[int, list[int]],
                       page_size: int, rows: int, ids: np.ndarray, lens_tables: np.ndarray, n: int,
                       width: int) -> None:
    """Write one decode step's inputs, padded to ``rows`` rows, into host arrays shaped like the static buffers.

    seqs [B] = (sequence id, position p of its one new token, 1); last_tokens [B]; tables: block table per sequence.
    ids int64 [3, n]: row i < B holds (last_tokens[i], p, KV slot of p = table[p // page_size] * page_size +
    p % page_size); lens_tables int32 [n + n * width]: seq_lens [n] = p + 1, then block tables [n, width] (the
    pages holding positions 0..p, zeros after). Rows B..rows-1 (the bucket's padding) are all zero: token 0 at
    position 0, slot 0 of the null page, length 0. Rows past ``rows`` are left as they are (no graph of this
    bucket reads them).
    """
    b = len(seqs)
    if not b <= rows <= n or len(last_tokens) != b:
        raise ValueError(f"{b} sequences and {len(last_tokens)} tokens for a bucket of {rows} rows (static {n})")
    pos = [start for _, start, _ in seqs]
    live = [tables[seq][: p // page_size + 1] for (seq, _, _), p in zip(seqs, pos)]
    if any(len(t) > width or len(t) <= p // page_size for t, p in zip(live, pos)):
        raise ValueError(f"a block table is wider than {width} pages or lacks the page of its position")
    ids[:, :rows] = 0
    ids[0, :b] = last_tokens
    ids[1, :b] = pos
    ids[2, :b] = [t[p // page_size] * page_size + p % page_size for t, p in zip(live, pos)]
    lens_tables[:rows] = 0
    lens_tables[:b] = [p + 1 for p in pos]
    block = lens_tables[n:n + rows * width].reshape(rows, width)
    block[:] = 0
    for i, t in enumerate(live):
        block[i, :len(t)] = t
