"""Decode steps replayed from captured CUDA graphs (one graph per padded batch size), as vLLM and gpt-fast do.

A decode step of a 32-layer model is ~500 small kernel launches; eagerly that costs milliseconds of host time, as
much as the weights take to stream at batch 1. A graph replays the whole step in one launch. Graphs need fixed
shapes and addresses, so every input lives in a static buffer sized for the largest bucket: a batch of B sequences
runs the graph of the smallest bucket ≥ B, the extra rows padded with token 0 at position 0, written to slot 0 of
the null page 0, with K/V length 0 (the Triton decode kernel writes zeros for them). The decode kernel's split-KV
grid follows from the bucket's batch and the block table's fixed width (``max_seq_len``), never from the lengths, so
one captured grid serves every replay. Block tables are copied only up to the widest live table: columns past a
row's length are never read. Graphs are captured lazily, on first use of a bucket, after two warm-up runs on a side
stream (which also compile the Triton kernels).
"""
from __future__ import annotations

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
        self.tokens = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
        self.q_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
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
        b, ps = len(seqs), self.cache.page_size
        bp = self.bucket(b)
        pad = bp - b
        pos = [start for _, start, _ in seqs]
        tables = [self.cache.block_tables[seq][: p // ps + 1] for (seq, _, _), p in zip(seqs, pos)]
        width = max(len(t) for t in tables)
        slots = [t[p // ps] * ps + p % ps for t, p in zip(tables, pos)]
        host = torch.tensor([last_tokens + [0] * pad, pos + [0] * pad, slots + [0] * pad], dtype=torch.int64)
        self.tokens[:bp].copy_(host[0], non_blocking=True)
        self.positions[:bp].copy_(host[1], non_blocking=True)
        self.slots[:bp].copy_(host[2], non_blocking=True)
        self.seq_lens[:bp].copy_(torch.tensor([p + 1 for p in pos] + [0] * pad, dtype=torch.int32))
        bt = torch.zeros(bp, width, dtype=torch.int32)
        for i, t in enumerate(tables):
            bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        self.block_tables[:bp, :width].copy_(bt)
        return bp

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
