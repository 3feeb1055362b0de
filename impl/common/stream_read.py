"""The card's streaming read of a buffer, as an anchor for kernels whose floor is reading their operands once.

    stream_read(buf) = XOR of buf's 32-bit words       buf: any contiguous CUDA tensor, a multiple of 16 bytes

A bandwidth claim about a kernel that must read B bytes is only as strong as the best read of those B bytes the card
does in the same run. ``torch.sum`` is one such read, but a reduction is not built for it; this kernel
(``stream_read.cu``) is: every thread keeps several 16-byte loads in flight over a grid-stride sweep of the whole
buffer, so the grid reads one contiguous window at a time, and returns an order-independent XOR (checked against
``stream_read_twin`` on the CPU, the same words in numpy). Time it with ``impl.common.timing`` as the kernel it anchors
(L2 flushed, queued), its output zeroed outside the timed call (``zero=False``, ``setup=out.zero_``). On an H100 a
probe kernel with this loop read 16.8 MB in 9.3 us and 58.7 MB in 22.7 us where ``torch.sum`` took 14.4 and 27.4.
CI compiles the source with nvcc and NVRTC; on a CPU the twin computes the result.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("stream_read.cu")
KERNEL = "stream_read_xor"
THREADS = 256
BLOCKS_PER_SM = 8  # 2048 threads an SM (all of its warp slots), each with UNROLL loads in flight
UNROLL = 4


def compile_options(unroll: int = UNROLL) -> tuple[str, ...]:
    return ("-std=c++17", f"-DSTREAM_UNROLL={unroll}")


@functools.cache
def _kernel(unroll: int = UNROLL):
    import cupy

    return cupy.RawModule(code=SOURCE.read_text(), options=compile_options(unroll)).get_function(KERNEL)


def check_buffer(buf: torch.Tensor) -> None:
    if not buf.is_contiguous():
        raise ValueError("stream_read reads a contiguous buffer; got a strided view")
    nbytes = buf.numel() * buf.element_size()
    if nbytes % 16 or buf.data_ptr() % 16:
        raise ValueError(f"stream_read loads 16 bytes at a time: the buffer must be 16-byte aligned and a multiple of "
                         f"16 bytes long, got {nbytes} bytes at an address {buf.data_ptr() % 16} past alignment")


def stream_read(buf: torch.Tensor, out: torch.Tensor | None = None, zero: bool = True) -> torch.Tensor:
    """Launch the read of ``buf`` on torch's current stream; returns ``out`` (int32 [1], zeroed here unless ``zero``
    is False: a timed call zeroes it in its untimed setup), which holds the XOR of buf's 32-bit words once the kernel
    has run. On a CPU tensor: the twin's value."""
    check_buffer(buf)
    from impl.common.timing import sm_count

    if not buf.is_cuda:
        return torch.tensor([stream_read_twin(buf, sm_count() * BLOCKS_PER_SM)], dtype=torch.int32)
    from impl.common.rawkernel import launch

    if out is None:
        out = torch.zeros(1, dtype=torch.int32, device=buf.device)
    elif zero:
        out.zero_()
    n16 = buf.numel() * buf.element_size() // 16
    if n16:
        launch(_kernel(), sm_count() * BLOCKS_PER_SM, THREADS, (buf.data_ptr(), np.int64(n16), out.data_ptr()))
    return out


def stream_read_twin(buf: torch.Tensor, blocks: int, threads: int = THREADS, unroll: int = UNROLL) -> int:
    """The kernel's loop in numpy for a grid of ``blocks`` x ``threads`` (S threads): thread t's step j reads the
    pieces i + u S (u < unroll) that lie below n16, i = t + j unroll S, while i < n16; the result is the XOR of the
    words of every piece read (a piece read twice would cancel, one never read would be missing). Returned as the
    signed int32 value the kernel's output holds."""
    check_buffer(buf)
    if blocks < 1 or threads < 1 or unroll < 1:
        raise ValueError(f"blocks, threads and unroll must be >= 1, got {blocks}, {threads}, {unroll}")
    pieces = buf.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().view(np.uint32).reshape(-1, 4)
    n16, stride = pieces.shape[0], blocks * threads
    i = np.arange(stride, dtype=np.int64)
    read: list[np.ndarray] = []
    while True:
        live = i < n16
        if not live.any():
            break
        for u in range(unroll):
            at = i[live] + u * stride
            read.append(at[at < n16])
        i = i + unroll * stride
    idx = np.concatenate(read) if read else np.zeros(0, dtype=np.int64)
    x = int(np.bitwise_xor.reduce(pieces[idx].reshape(-1))) if idx.size else 0
    return x - (1 << 32) if x >= 1 << 31 else x
