"""Launching CUDA C++ kernels (CuPy ``RawModule`` functions) on the stream torch is using.

    launch(fn, grid, block, (x.data_ptr(), np.int32(n), np.int64(stride), ...))

A pointer travels as a Python int (CuPy passes it as 8 bytes, a ``T*`` parameter's by-value bytes); an ``int``
parameter needs ``np.int32``, a ``long long`` ``np.int64``. The launch goes onto ``torch.cuda.current_stream()``, so
it orders with torch's work and is recorded when that stream is being captured into a CUDA graph (the module must be
loaded before capture: run the call once first).

``pdl=True`` launches through the driver's ``cuLaunchKernelEx`` with programmatic stream serialization (programmatic
dependent launch): the kernel may start while the previous kernel on the stream finishes, so it must itself wait
(``griddepcontrol.wait``) before it reads what that kernel wrote or writes what it reads.
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch


def launch(fn, grid: int | tuple[int, ...], block: int | tuple[int, ...], args: tuple, shared_mem: int = 0,
           pdl: bool = False) -> None:
    grid = grid if isinstance(grid, tuple) else (grid,)
    block = block if isinstance(block, tuple) else (block,)
    stream = torch.cuda.current_stream().cuda_stream
    if pdl:
        _launch_pdl(fn, grid, block, args, shared_mem, stream)
        return
    import cupy

    if stream == 0:  # torch's and cupy's default stream are the same legacy stream
        fn(grid, block, args, shared_mem=shared_mem)
    else:
        with cupy.cuda.ExternalStream(stream):
            fn(grid, block, args, shared_mem=shared_mem)


def _as_ctype(a) -> ctypes._SimpleCData:
    """One kernel argument as the C value the driver copies: np.int32 -> int, np.int64 -> long long, np.float32 ->
    float, a Python int (a device pointer) -> void*."""
    if isinstance(a, np.int32):
        return ctypes.c_int32(int(a))
    if isinstance(a, np.int64):
        return ctypes.c_int64(int(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    if isinstance(a, int) and not isinstance(a, bool):
        return ctypes.c_void_p(a)
    raise TypeError(f"kernel argument {a!r} ({type(a).__name__}): pass pointers as int, scalars as np.int32/int64/"
                    "float32")


def _launch_pdl(fn, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int, stream: int) -> None:
    from cuda.bindings import driver

    from impl.common.cudacheck import check_cuda

    dims = lambda d: (tuple(d) + (1, 1))[:3]  # noqa: E731
    cfg = driver.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = dims(grid)
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = dims(block)
    cfg.sharedMemBytes = shared_mem
    cfg.hStream = driver.CUstream(stream)
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    cfg.attrs = [attr]
    cfg.numAttrs = 1
    values = [_as_ctype(a) for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    func = getattr(fn, "kernel", fn).ptr  # CuPy's RawModule function (its CUfunction handle)
    check_cuda(driver.cuLaunchKernelEx(cfg, driver.CUfunction(func), ctypes.addressof(params), 0), "cuLaunchKernelEx")
