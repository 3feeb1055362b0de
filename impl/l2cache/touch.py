"""Pull a range of device memory into L2 by reading it: the dynamic prefetcher's kernel.

``cudaMemPrefetchAsync`` moves managed memory between devices; it does not load ordinary device memory into L2. A
read does: every 32-byte sector a kernel loads passes through L2 and stays there (``.cg`` loads skip L1) until it is
evicted. So ``touch`` reads ``count`` int32 words from ``words[start:]`` with a grid-stride loop and writes the XOR
of what each program read to ``out[pid]``, which keeps the loads alive and lets tests check that every word was read
(XOR of all ``out`` == XOR of the range). Bytes read: 4·count (+ 4·programs written).

A small grid (``programs``) keeps most SMs free for the main stream's layer, which runs at the same time.
"""
from __future__ import annotations

import impl  # noqa: F401  (backend before triton)
import numpy as np
import torch
import triton
import triton.language as tl

from impl.backend import sized

BLOCK = 2048


@triton.jit(do_not_specialize=["start", "count", "ITERS"])
def touch_kernel(words_ptr, out_ptr,  # int32 words of the buffer; one int32 per program
                 start, count, ITERS,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for it in range(ITERS):
        offs = (it * nprog + pid) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(words_ptr + start + offs, mask=offs < count, other=0, cache_modifier=".cg")
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


def default_programs(count: int, block: int = BLOCK) -> int:
    # the interpreter pays ~0.1 s per program, so few programs there; one per SM at most on a GPU
    return max(1, min(triton.cdiv(count, block), sized(132, 4)))


def touch(words: torch.Tensor, start: int, count: int, out: torch.Tensor | None = None,
          programs: int | None = None) -> torch.Tensor:
    """Read ``words[start:start+count]`` (int32, 1-D, contiguous) through L2; return the per-program XORs."""
    if words.dtype != torch.int32 or words.ndim != 1 or not words.is_contiguous():
        raise TypeError(f"words must be a contiguous 1-D int32 tensor, got {words.dtype} {tuple(words.shape)}")
    if start < 0 or count < 0 or start + count > words.numel():
        raise ValueError(f"range [{start}, {start + count}) is outside the {words.numel()} words")
    programs = default_programs(count) if programs is None else programs
    if programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    if out is None:
        out = torch.empty(programs, dtype=torch.int32, device=words.device)
    if out.dtype != torch.int32 or out.numel() < programs:
        raise ValueError(f"out must be int32 with >= {programs} elements")
    if count == 0:
        out[:programs].zero_()
        return out
    iters = triton.cdiv(count, BLOCK * programs)
    touch_kernel[(programs,)](words, out, start, count, iters, BLOCK=BLOCK, num_warps=4)
    return out


def touch_reference(words, start: int, count: int) -> int:
    """XOR of the int32 words in the range (what XOR-reducing ``touch``'s output must give)."""
    from fixtures.oracle import to_numpy

    w = to_numpy(words)[start:start + count]
    return int(np.bitwise_xor.reduce(w)) if w.size else 0
