"""Paged KV cache: fixed-size pages, a free list, per-sequence block tables, and the metadata of one forward step.

Storage per layer is ``[num_pages + 1, page_size, n_kv_heads, head_dim]`` for K and for V (flashinfer's "NHD" layout).
Page 0 is a null page that is never handed out: padded rows of a CUDA-graph batch write there and block tables are
padded with it. Token ``p`` of a sequence lives in page ``block_table[p // page_size]`` at row ``p % page_size``, i.e.
at flat slot ``page · page_size + p % page_size``.

FP8 KV (``kv_dtype=torch.float8_e4m3fn``) stores K/s_k and V/s_v saturated to ±448 with static per-cache scales
(vLLM's default scale is 1.0); readers multiply back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from impl.fp8.formats import E4M3
from impl.serve.model import ModelArgs

if TYPE_CHECKING:
    from impl.serve.attention import AttentionBackend

FP8_MAX = E4M3.max  # the largest finite e4m3 value: FP8 K/V saturate to ±FP8_MAX


class OutOfPages(RuntimeError):
    """The cache has fewer free pages than a sequence needs (raised before anything is allocated)."""


@dataclass(frozen=True)
class CacheConfig:
    """``num_pages`` usable pages of ``page_size`` tokens; ``kv_dtype`` None = the model dtype."""

    num_pages: int
    page_size: int = 16
    kv_dtype: torch.dtype | None = None
    k_scale: float = 1.0
    v_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.num_pages < 1 or self.page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {self.num_pages}, {self.page_size}")
        if not (self.k_scale > 0 and self.v_scale > 0):
            raise ValueError(f"KV scales must be positive and finite, got {self.k_scale}, {self.v_scale}")


class PageAllocator:
    """A free list of page ids 1..num_pages (0 is the null page). ``alloc`` is all-or-nothing."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages, 0, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"out of KV pages: need {n}, {len(self._free)} of {self.num_pages} free")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise ValueError(f"page {p} freed twice or never allocated")
            self._used.remove(p)
            self._free.append(p)


@dataclass
class AttentionMetadata:
    """Where each sequence of a step sits in the flat token vector and in the cache.

    Device tensors: ``q_start`` [B+1] int32 (sequence b's new tokens are rows q_start[b]:q_start[b+1]), ``seq_lens``
    [B] int32 (K/V length after this step), ``block_tables`` [B, max_blocks] int32 (0-padded), ``slot_mapping`` [T]
    int64, ``positions`` [T] int64. Host copies (``q_lens``, ``seq_lens_host``) serve backends that loop on the host.
    """

    q_start: Tensor
    seq_lens: Tensor
    block_tables: Tensor
    slot_mapping: Tensor
    positions: Tensor
    page_size: int
    q_lens: list[int] = field(default_factory=list)
    seq_lens_host: list[int] = field(default_factory=list)
    block_tables_host: list[list[int]] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens)

    @property
    def max_q_len(self) -> int:
        return max(self.q_lens, default=0)


class PagedKVCache:
    """K/V pages for every layer plus each sequence's block table; ``reserve`` grows a sequence page by page."""

    def __init__(self, args: ModelArgs, cfg: CacheConfig, *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.args, self.cfg, self.dtype = args, cfg, dtype
        self.store_dtype = cfg.kv_dtype or dtype
        if self.store_dtype not in (dtype, torch.float8_e4m3fn):
            raise ValueError(f"kv_dtype must be the model dtype {dtype} or torch.float8_e4m3fn, not {cfg.kv_dtype}")
        shape = (args.n_layers, cfg.num_pages + 1, cfg.page_size, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=self.store_dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.store_dtype, device=device)
        self.allocator = PageAllocator(cfg.num_pages)
        self.block_tables: dict[int, list[int]] = {}

    @property
    def page_size(self) -> int:
        return self.cfg.page_size

    @property
    def is_fp8(self) -> bool:
        return self.store_dtype == torch.float8_e4m3fn

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def reserve(self, seq: int, n_tokens: int) -> None:
        """Make room for ``n_tokens`` tokens of ``seq`` (allocating only the missing pages; all or nothing)."""
        table = self.block_tables.setdefault(seq, [])
        need = self.pages_for(n_tokens) - len(table)
        if need > 0:
            table.extend(self.allocator.alloc(need))

    def release(self, seq: int) -> None:
        self.allocator.free(self.block_tables.pop(seq, []))

    def write(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> None:
        """Store k, v [T, n_kv_heads, head_dim] at flat slots [T] of ``layer``."""
        kf = self.k[layer].view(-1, self.args.n_kv_heads, self.args.head_dim)
        vf = self.v[layer].view(-1, self.args.n_kv_heads, self.args.head_dim)
        if self.is_fp8:  # saturate, then copy bytes (index_copy_ has no float8 kernel on the CPU)
            k = (k.float() / self.cfg.k_scale).clamp(-FP8_MAX, FP8_MAX).to(self.store_dtype).view(torch.uint8)
            v = (v.float() / self.cfg.v_scale).clamp(-FP8_MAX, FP8_MAX).to(self.store_dtype).view(torch.uint8)
            kf, vf = kf.view(torch.uint8), vf.view(torch.uint8)
        kf.index_copy_(0, slots, k.to(kf.dtype))
        vf.index_copy_(0, slots, v.to(vf.dtype))

    def metadata(self, seqs: list[tuple[int, int, int]], device: torch.device | str) -> AttentionMetadata:
        """Metadata for a step over ``seqs`` = [(seq id, first new position, number of new tokens)], in row order.

        The sequences' pages must already be reserved for ``start + n`` tokens.
        """
        ps = self.page_size
        positions, slots, q_start, seq_lens, tables = [], [], [0], [], []
        for seq, start, n in seqs:
            table = self.block_tables[seq]
            if self.pages_for(start + n) > len(table):
                raise RuntimeError(f"sequence {seq} has {len(table)} pages, needs {self.pages_for(start + n)}")
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // ps] * ps + p % ps for p in pos)
            q_start.append(q_start[-1] + n)
            seq_lens.append(start + n)
            tables.append(table[: self.pages_for(start + n)])
        width = max((len(t) for t in tables), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in tables]
        as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        return AttentionMetadata(
            q_start=as_i32(q_start), seq_lens=as_i32(seq_lens), block_tables=as_i32(padded).view(len(seqs), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device), page_size=ps,
            q_lens=[n for _, _, n in seqs], seq_lens_host=seq_lens, block_tables_host=tables)


@dataclass
class PagedStep:
    """The ``StepContext`` of a paged forward: store this step's K/V, then attend through ``backend``."""

    cache: PagedKVCache
    backend: "AttentionBackend"
    meta: AttentionMetadata
    logits_index: Tensor | None = None

    @property
    def positions(self) -> Tensor:
        return self.meta.positions

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.cache
        c.write(layer, k, v, self.meta.slot_mapping)
        return self.backend.attend(q, c.k[layer], c.v[layer], self.meta, scale=q.shape[-1] ** -0.5,
                                   k_scale=c.cfg.k_scale, v_scale=c.cfg.v_scale)

    def rope_attend(self, layer: int, qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``attend`` from the fused projection qkv [T, (H+2·KVH)·D]: one kernel applies RoPE and stores K/V
        straight into the cache (through scratch rows when the cache is FP8), then the backend attends."""
        from impl.serve.fused import rope_split

        c, a = self.cache, self.cache.args
        t = qkv.shape[0]
        q = torch.empty(t, a.n_heads, a.head_dim, dtype=qkv.dtype, device=qkv.device)
        if c.is_fp8:
            k = torch.empty(t, a.n_kv_heads, a.head_dim, dtype=qkv.dtype, device=qkv.device)
            v = torch.empty_like(k)
            rows = torch.arange(t, device=qkv.device)
            rope_split(qkv, cos, sin, a.n_heads, a.n_kv_heads, q, k, v, rows)
            c.write(layer, k, v, self.meta.slot_mapping)
        else:
            flat = (-1, a.n_kv_heads, a.head_dim)
            rope_split(qkv, cos, sin, a.n_heads, a.n_kv_heads, q, c.k[layer].view(flat), c.v[layer].view(flat),
                       self.meta.slot_mapping)
        return self.backend.attend(q, c.k[layer], c.v[layer], self.meta, scale=a.head_dim ** -0.5,
                                   k_scale=c.cfg.k_scale, v_scale=c.cfg.v_scale)


def last_token_rows(meta: AttentionMetadata) -> Tensor:
    """Row of each sequence's last new token in the flat [T] vector (whose logits sample the next token)."""
    return (meta.q_start[1:] - 1).long()
