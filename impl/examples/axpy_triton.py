"""y = a·x + y' in Triton: the smallest kernel that exercises the interpreter in CI and the bench gate on a GPU.

Shapes: x, y are 1-D of n elements, float32/float16; out is a new tensor of x's dtype (inputs are never modified).
Bytes moved: 3·n·itemsize (read x and y, write out). FLOPs: 2·n.
"""
from __future__ import annotations

import impl  # noqa: F401  (backend before triton)
import torch
import triton
import triton.language as tl


@triton.jit
def axpy_kernel(x_ptr, y_ptr, out_ptr,  # pointers to the 1-D vectors
                a,                      # scalar multiplier
                n,                      # number of elements
                BLOCK: tl.constexpr):   # elements per program
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n  # the last block may run past the end
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, (a * x.to(tl.float32) + y.to(tl.float32)).to(x.dtype), mask=mask)


def axpy(a: float, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """Return a·x + y (computed in float32, rounded to x's dtype)."""
    if x.ndim != 1 or y.shape != x.shape:
        raise ValueError(f"x and y must be 1-D of equal length, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype or x.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"x and y must share dtype float32 or float16, got {x.dtype} and {y.dtype}")
    if not (x.is_contiguous() and y.is_contiguous()):
        raise ValueError("x and y must be contiguous")
    out = torch.empty_like(x) if out is None else out
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    n = x.numel()
    if n:
        axpy_kernel[(triton.cdiv(n, block),)](x, y, out, float(a), n, BLOCK=block)
    return out


def axpy_reference(a: float, x, y):
    """float64 reference on the CPU."""
    import numpy as np

    return a * np.asarray(x, dtype=np.float64) + np.asarray(y, dtype=np.float64)
