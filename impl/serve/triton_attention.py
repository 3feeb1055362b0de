"""Paged attention in Triton: decode (one query token per sequence) and causal prefill, both over the block table.

    out[t, h] = Σ_j softmax_j(s_j) · V[seq, j, h // G],   s_j = scale · q[t, h] · K[seq, j, h // G],   j ≤ pos(t)

Shapes: q, out [T, H, D]; K/V caches [num_pages, page_size, KVH, D] (one layer, "NHD"); ``block_tables`` [B, W]
int32; ``seq_lens`` [B] int32 = K/V length after this step; prefill also takes ``q_start`` [B+1] int32 (sequence b's
query rows are q_start[b]:q_start[b+1] and sit at the *last* positions of its K/V, so a prefill chunk may follow
cached tokens). G = H / KVH query heads share one K/V head.

Decode runs one program per (sequence, KV head) (several with split-KV, below) and handles the G query heads of that
group together, so each K/V page is read once per group; the key loop walks ``BLOCK_N`` token positions at a time,
looking each one's page up in the block table, so any page size works (including pages smaller than the block).
Softmax is the online (flash) form in float32. A row with ``seq_len`` 0 (a padded CUDA-graph row) writes zeros. FP8
pages are scaled back by k/v scales.

Split-KV (flash-decoding), for sequences longer than one chunk: a sequence of n keys is cut into chunks of
``L = max(min_chunk, ⌈n / MAX_CHUNKS⌉ rounded up to whole key blocks)`` positions (L depends on n alone); for each
chunk a program writes its base-2 running max m_c, sum l_c = Σ 2^(s_j - m_c) and unnormalised
acc_c = Σ 2^(s_j - m_c) V_j in float32, and ``paged_decode_combine_kernel`` merges them: M = max_c m_c,
w_c = 2^(m_c - M) (0 for empty chunks), out = Σ w_c acc_c / Σ w_c l_c (zeros when every chunk is empty). How many
programs share a (sequence, KV head)'s chunks comes from the batch, the KV heads, the block table's reach (width x page
size: fixed per CUDA-graph bucket) and the SM count (``decode_splits``), never from ``seq_lens``, so a captured graph
stays valid whatever the lengths are at replay; it decides only who computes a chunk, so the output bits do not
depend on the batch, the bucket or the table width.
"""
from __future__ import annotations

from dataclasses import dataclass

import impl  # noqa: F401  (backend before triton)
import torch
import triton
import triton.language as tl

from impl.common.timing import sm_count
from impl.serve.fused import early_trigger

LOG2E = 1.4426950408889634


@triton.jit
def _kv_rows(bt_row_ptr, pos, n_mask, page_size, PAGE_SHIFT: tl.constexpr):
    """Page (int64) and row within it of each key position ``pos`` [BLOCK_N], through the block table: shifts when
    the page size is a power of two (``PAGE_SHIFT`` >= 0), a division otherwise. Masked positions read page 0."""
    if PAGE_SHIFT >= 0:
        slot, row = pos >> PAGE_SHIFT, pos & ((1 << PAGE_SHIFT) - 1)
    else:
        slot, row = pos // page_size, pos % page_size
    page = tl.load(bt_row_ptr + slot, mask=n_mask, other=0)
    return page.to(tl.int64), row


@triton.jit
def _load_kv_block(cache_ptr, page, row, n_mask, offs_d, d_mask, kv_head, stride_p, stride_s, stride_h, kv_scale,
                   like):
    """Rows (``page``, ``row``) [BLOCK_N] of one K/V head, in ``like``'s dtype (FP8 pages scaled back by
    ``kv_scale``). Masked rows are not read (zeros)."""
    offs = page[:, None] * stride_p + row[:, None] * stride_s + kv_head * stride_h + offs_d[None, :]
    x = tl.load(cache_ptr + offs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    if x.dtype.is_fp8():
        x = (x.to(tl.float32) * kv_scale).to(like.dtype)
    return x


# group and page size are not specialised as ints (a compile per value class saves nothing here; a power-of-two page
# size comes in as PAGE_SHIFT instead, so that positions map to pages by shifts); strides are, so that Triton can prove
# 16-byte alignment and vectorise the K/V loads.
_RUNTIME_INTS = ["group", "page_size"]


@triton.jit
def _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, pos, q_pos, limit, offs_d, d_mask, kv_head,
                  stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, qk_scale_log2, k_scale, v_scale,
                  page_size, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  PAGE_SHIFT: tl.constexpr):
    """One online-softmax step of a query block over the keys at ``pos`` (only those < ``limit`` are read): MASKED
    hides keys at or past ``limit``, CAUSAL also those after each query's position ``q_pos`` (blocks wholly below a
    prefill query block's first position need neither). The running max is kept in scaled base-2 units, so the
    scale folds into one FMA per score: p = 2^(s·c − m), c = scale·log2(e) > 0."""
    n_mask = pos < limit
    page, row = _kv_rows(bt_row, pos, n_mask, page_size, PAGE_SHIFT)
    k = _load_kv_block(k_ptr, page, row, n_mask, offs_d, d_mask, kv_head, stride_kp, stride_ks, stride_kh,
                       k_scale, q)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        if CAUSAL:
            s = tl.where(n_mask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        else:
            s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)  # finite: every block holds a visible key for every query
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv_block(v_ptr, page, row, n_mask, offs_d, d_mask, kv_head, stride_vp, stride_vs, stride_vh,
                       v_scale, q)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_range(q, lo, hi, k_ptr, v_ptr, bt_row, offs_n, offs_d, d_mask, kv_head,
                  stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, qk_scale_log2, k_scale, v_scale,
                  page_size, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, PAGE_SHIFT: tl.constexpr):
    """Online softmax of the query group over key positions [lo, hi): base-2 running max m, sum l and unnormalised
    acc (m = -inf, l = 0, acc = 0 when the range is empty)."""
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, start + offs_n, hi, hi, offs_d,
                                      d_mask, kv_head, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs,
                                      stride_vh, qk_scale_log2, k_scale, v_scale, page_size, True, False,
                                      DOT_PRECISION, PAGE_SHIFT)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr,          # q/out [B, H, D]; caches [P, PS, KVH, D]
                        bt_ptr, seq_lens_ptr,                    # block tables [B, W], K/V lengths [B]
                        m_ptr, l_ptr, acc_ptr,                   # SPLIT: partials [B*H, C], [B*H, C], [B*H, C, D]
                        stride_qt, stride_qh, stride_ot, stride_oh,
                        stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_bt,
                        qk_scale_log2, k_scale, v_scale,         # scale·log2(e) (softmax in base 2), FP8 scales
                        group, page_size,                        # query heads per KV head, tokens per page
                        chunks, min_chunk,                       # SPLIT: C partial slots, shortest chunk
                        HEAD_DIM: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                        SPLIT: tl.constexpr, MAX_CHUNKS: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, TRIGGER: tl.constexpr, PAGE_SHIFT: tl.constexpr):
    if TRIGGER:  # the next kernel (o_proj, PDL) may launch and stream its weights now (fused.early_trigger)
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    offs_g, offs_d, offs_n = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
    g_mask, d_mask = offs_g < group, offs_d < HEAD_DIM
    heads = kv_head * group + offs_g
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    bt_row = bt_ptr + b * stride_bt
    if SPLIT:
        # chunk c of this sequence = positions [c·L, (c+1)·L) ∩ [0, seq_len), L from seq_len alone (so a sequence's
        # partials never depend on the batch, the grid or the slot count); program z handles chunks z, z + Z, ...
        chunk_len = tl.maximum(min_chunk, tl.cdiv(tl.cdiv(seq_len, MAX_CHUNKS), BLOCK_N) * BLOCK_N)
        rows = b * tl.num_programs(1) * group + heads  # [BLOCK_G] rows of [B*H, C]
        for c in range(tl.program_id(2), chunks, tl.num_programs(2)):
            lo = c * chunk_len
            hi = tl.minimum(lo + chunk_len, seq_len)
            m_i, l_i, acc = _attend_range(q, lo, hi, k_ptr, v_ptr, bt_row, offs_n, offs_d, d_mask, kv_head,
                                          stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                                          qk_scale_log2, k_scale, v_scale, page_size, BLOCK_G, BLOCK_D, BLOCK_N,
                                          DOT_PRECISION, PAGE_SHIFT)
            slot = rows * chunks + c
            tl.store(m_ptr + slot, m_i, mask=g_mask)
            tl.store(l_ptr + slot, l_i, mask=g_mask)
            tl.store(acc_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=g_mask[:, None] & d_mask[None, :])
    else:
        m_i, l_i, acc = _attend_range(q, 0, seq_len, k_ptr, v_ptr, bt_row, offs_n, offs_d, d_mask, kv_head,
                                      stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                                      qk_scale_log2, k_scale, v_scale, page_size, BLOCK_G, BLOCK_D, BLOCK_N,
                                      DOT_PRECISION, PAGE_SHIFT)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0 (padding): zeros, not 0/0
        tl.store(out_ptr + b * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def paged_decode_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr,  # partials [B*H, C], [B*H, C], [B*H, C, D]; [B, H, D]
                                heads, chunks, stride_ot, stride_oh,
                                HEAD_DIM: tl.constexpr, MAX_CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr,
                                TRIGGER: tl.constexpr):
    """out[b, h] = Σ_c 2^(m_c - M) acc_c / Σ_c 2^(m_c - M) l_c, M = max_c m_c; empty chunks (m_c = -inf) weigh 0 and
    a row whose chunks are all empty is zeros. One program per (sequence, query head). The reduction always spans
    MAX_CHUNKS slots (unused ones read as empty), so its order, and the result's bits, do not depend on C."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0) * heads + tl.program_id(1)
    offs_c, offs_d = tl.arange(0, MAX_CHUNKS), tl.arange(0, BLOCK_D)
    c_mask, d_mask = offs_c < chunks, offs_d < HEAD_DIM
    m = tl.load(m_ptr + row * chunks + offs_c, mask=c_mask, other=float("-inf"))
    l = tl.load(l_ptr + row * chunks + offs_c, mask=c_mask, other=0.0)
    acc = tl.load(acc_ptr + (row * chunks + offs_c)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=c_mask[:, None] & d_mask[None, :], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0))  # empty chunks: 2^-inf = 0, never -inf - -inf
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + tl.program_id(0) * stride_ot + tl.program_id(1) * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def paged_prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr,         # q/out [T, H, D]; caches [P, PS, KVH, D]
                         bt_ptr, q_start_ptr, seq_lens_ptr,     # block tables [B, W], row offsets [B+1], lengths [B]
                         stride_qt, stride_qh, stride_ot, stride_oh,
                         stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_bt,
                         qk_scale_log2, k_scale, v_scale,
                         group, page_size,
                         HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, PAGE_SHIFT: tl.constexpr):
    b = tl.program_id(0)
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest (last) query blocks start first
    head = tl.program_id(2)
    row0 = tl.load(q_start_ptr + b)
    q_len = tl.load(q_start_ptr + b + 1) - row0
    seq_len = tl.load(seq_lens_ptr + b)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_n = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
    m_mask, d_mask = offs_m < q_len, offs_d < HEAD_DIM
    q_first = seq_len - q_len + m_block * BLOCK_M  # the new tokens are the last q_len of the sequence
    q_pos = q_first + tl.arange(0, BLOCK_M)
    q = tl.load(q_ptr + (row0 + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    kv_head = head // group
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b * stride_bt
    # causal: keys up to the block's last query; a block past the end of this sequence's queries does no work.
    # Key blocks ending at or before q_first are visible to every query of the block: no masks there.
    end = tl.minimum(seq_len, q_first + BLOCK_M)
    end = tl.where(m_block * BLOCK_M < q_len, end, 0)
    free_end = tl.minimum((q_first + 1) // BLOCK_N * BLOCK_N, end)
    for start in range(0, free_end, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, start + offs_n, q_pos, seq_len,
                                      offs_d, d_mask, kv_head, stride_kp, stride_ks, stride_kh, stride_vp,
                                      stride_vs, stride_vh, qk_scale_log2, k_scale, v_scale, page_size,
                                      False, True, DOT_PRECISION, PAGE_SHIFT)
    for start in range(free_end, end, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, start + offs_n, q_pos, seq_len,
                                      offs_d, d_mask, kv_head, stride_kp, stride_ks, stride_kh, stride_vp,
                                      stride_vs, stride_vh, qk_scale_log2, k_scale, v_scale, page_size,
                                      True, True, DOT_PRECISION, PAGE_SHIFT)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (row0 + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# ---- thin wrappers ------------------------------------------------------------------------------------------------

def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor) -> tuple[int, int]:
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [T, H, D] and K/V caches [pages, page_size, KVH, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"head_dim {dim} vs cache {k_cache.shape[3]}, or {heads} heads not a multiple of {kv_heads}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the K/V caches need a contiguous last dimension")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32 or block_tables.ndim != 2:
        raise TypeError("block_tables must be a 2-D int32 tensor and seq_lens int32")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables need a contiguous last dimension")
    if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise TypeError(f"K/V cache dtype {k_cache.dtype} must be q's dtype {q.dtype} or float8_e4m3fn")
    return heads // kv_heads, dim


def page_shift(page_size: int) -> int:
    """log2(page_size) for a power of two (the kernels then shift and mask), -1 otherwise (they divide)."""
    return page_size.bit_length() - 1 if page_size > 0 and page_size & (page_size - 1) == 0 else -1


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs stay fp32 (no TF32 rounding) for exactness


@dataclass(frozen=True)
class SplitRule:
    """Split-KV decode. Chunks: a sequence of n keys is cut into chunks of L = max(``min_chunk``, n / MAX_CHUNKS
    rounded up to whole key blocks) positions; the partial slots per row are C = min(MAX_CHUNKS, ⌈max_len /
    min_chunk⌉) (max_len = block-table width x page size); C = 1 runs the one-pass kernel. Programs: Z per (sequence,
    KV head), enough for ``waves`` per SM when sequences x KV heads leave SMs idle, 1 once they fill them, at most C;
    program z handles chunks z, z + Z, ... Z changes only who computes a chunk, never the chunk, so outputs are the
    same bits at every batch size, bucket and table width (a lone sequence equals itself in a batch)."""

    waves: int = 2
    min_chunk: int = 256

    def __post_init__(self) -> None:
        if self.waves < 1 or self.min_chunk < 16 or self.min_chunk & (self.min_chunk - 1):
            raise ValueError(f"SplitRule needs waves >= 1 and min_chunk a power of two >= 16: {self}")


SPLIT_RULE = SplitRule()
MAX_CHUNKS = 64  # partial slots per (sequence, query head) at most; the combine reduces over exactly this many


def decode_chunks(max_len: int, rule: SplitRule = SPLIT_RULE) -> int:
    """Partial slots C per (sequence, head) for sequences of at most ``max_len`` keys (1: no split)."""
    return max(1, min(MAX_CHUNKS, -(-max_len // rule.min_chunk)))


def decode_splits(batch: int, kv_heads: int, max_len: int, sm_count: int, rule: SplitRule = SPLIT_RULE) -> int:
    """Programs Z per (sequence, KV head) of a decode launch (1 ≤ Z ≤ C); from shapes only (fixed per CUDA-graph
    bucket: the grid is the same at capture and replay)."""
    programs = batch * kv_heads
    if programs >= sm_count:
        return 1
    return max(1, min(-(-rule.waves * sm_count // programs), decode_chunks(max_len, rule)))


def split_partials(rows: int, chunks: int, dim: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Float32 m, l [rows * chunks] and acc [rows * chunks * dim] for a split decode; every element is written by
    the split kernel. Allocated per call: inside graph capture they come from the graph's pool (fixed addresses)."""
    m = torch.empty(rows * chunks, dtype=torch.float32, device=device)
    return m, torch.empty_like(m), torch.empty(rows * chunks * dim, dtype=torch.float32, device=device)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, *, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                 out: torch.Tensor | None = None, block_n: int = 64, splits: int | None = None,
                 rule: SplitRule = SPLIT_RULE) -> torch.Tensor:
    """Decode attention: q [B, H, D] (one new token per sequence, already written to the cache) → [B, H, D].
    ``rule``: the split-KV chunks; ``splits``: programs per (sequence, KV head), None = ``decode_splits`` (shapes
    only, graph-safe). The result does not depend on ``splits``."""
    group, dim = _check(q, k_cache, v_cache, block_tables, seq_lens)
    batch, heads = q.shape[0], q.shape[1]
    if seq_lens.shape != (batch,) or block_tables.shape[0] != batch:
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} and block_tables {tuple(block_tables.shape)} need "
                         f"{batch} rows")
    if rule.min_chunk % block_n:
        raise ValueError(f"min_chunk {rule.min_chunk} must be a multiple of block_n {block_n}")
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    kv_heads = heads // group
    max_len = block_tables.shape[1] * k_cache.shape[1]
    chunks = decode_chunks(max_len, rule)
    if splits is None:
        splits = decode_splits(batch, kv_heads, max_len, sm_count(q.device.index), rule)
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    splits = min(splits, chunks)
    split = chunks > 1
    m, l, acc = split_partials(batch * heads, chunks, dim, q.device) if split else (out, out, out)  # else unused
    trigger = early_trigger(q)
    block_d = max(16, triton.next_power_of_2(dim))
    paged_decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, out, block_tables, seq_lens, m, l, acc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0),
        scale * LOG2E, k_scale, v_scale, group, k_cache.shape[1], chunks, rule.min_chunk,
        HEAD_DIM=dim, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d, BLOCK_N=block_n, SPLIT=split, MAX_CHUNKS=MAX_CHUNKS, DOT_PRECISION=_dot_precision(q.dtype),
        TRIGGER=trigger and not split, PAGE_SHIFT=page_shift(k_cache.shape[1]), num_warps=4)
    if split:
        paged_decode_combine_kernel[(batch, heads)](
            m, l, acc, out, heads, chunks, out.stride(0), out.stride(1),
            HEAD_DIM=dim, MAX_CHUNKS=MAX_CHUNKS, BLOCK_D=block_d, TRIGGER=trigger, num_warps=4)
    return out


@dataclass(frozen=True)
class PrefillTiles:
    """The prefill kernel's launch: query rows and key positions per program step, warps, pipeline stages. Default:
    the fastest in total of six shapes ``flashinfer_check`` timed on the H200 (4475ff2, 8B heads, bf16, pages of 16):
    128 x 128, 8 warps, 3 stages, 156.4 / 430.9 µs at 4 x 1024 / 1 x 4096 tokens (2 stages: 162.7 / 472.6;
    128 x 64, 8 warps, 2 stages: 158.0 / 472.5; 64 x 64, 4 warps, 3 stages: 152.4 / 465.7)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"PrefillTiles.{name} must be a power of two >= 16, got {v}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"PrefillTiles needs num_warps and num_stages >= 1: {self}")


PREFILL_TILES = PrefillTiles()


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  q_start: torch.Tensor, seq_lens: torch.Tensor, max_q_len: int, *, scale: float,
                  k_scale: float = 1.0, v_scale: float = 1.0, out: torch.Tensor | None = None,
                  tiles: PrefillTiles = PREFILL_TILES) -> torch.Tensor:
    """Causal attention of T new query rows (any number per sequence, after its cached tokens) → [T, H, D]."""
    group, dim = _check(q, k_cache, v_cache, block_tables, seq_lens)
    batch, heads = seq_lens.shape[0], q.shape[1]
    if q_start.dtype != torch.int32 or q_start.shape != (batch + 1,) or block_tables.shape[0] != batch:
        raise ValueError(f"q_start must be int32 [{batch + 1}] and block_tables [{batch}, W]")
    out = torch.empty_like(q) if out is None else out
    if batch == 0 or max_q_len == 0:
        return out
    grid = (batch, triton.cdiv(max_q_len, tiles.block_m), heads)
    paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, q_start, seq_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0),
        scale * LOG2E, k_scale, v_scale, group, k_cache.shape[1],
        HEAD_DIM=dim, BLOCK_M=tiles.block_m,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_N=tiles.block_n, DOT_PRECISION=_dot_precision(q.dtype),
        PAGE_SHIFT=page_shift(k_cache.shape[1]), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out
