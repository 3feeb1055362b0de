"""Launching CUDA C++ kernels (CuPy ``RawModule`` functions) on the stream torch is using.

    launch(fn, grid, block, (x.data_ptr(), np.int32(n), ...))

A pointer travels as a Python int (CuPy passes it as 8 bytes, a ``T*`` parameter's by-value bytes); an ``int``
parameter needs ``np.int32``. The launch goes onto ``torch.cuda.current_stream()``, so it orders with torch's work
and is recorded when that stream is being captured into a CUDA graph (the module must be loaded before capture:
run the call once first).
"""
from __future__ import annotations

import torch


def launch(fn, grid: int | tuple[int, ...], block: int | tuple[int, ...], args: tuple, shared_mem: int = 0) -> None:
    import cupy

    grid = grid if isinstance(grid, tuple) else (grid,)
    block = block if isinstance(block, tuple) else (block,)
    stream = torch.cuda.current_stream().cuda_stream
    if stream == 0:  # torch's and cupy's default stream are the same legacy stream
        fn(grid, block, args, shared_mem=shared_mem)
    else:
        with cupy.cuda.ExternalStream(stream):
            fn(grid, block, args, shared_mem=shared_mem)
