"""The oracle's poisoning catches the bug it exists for: an output element the kernel never writes.

Each test injects that bug (a "kernel" that skips its last element) into ``check_kernel`` for a dtype where the two
poison patterns once coincided (unsigned ints: all-ones bits is their max; e5m2: both bytes were NaN) and for the
common ones, and requires a failure; the same kernel without the bug must pass.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.oracle import POISON_PATTERNS, check_kernel, poison_, to_numpy


def _copy_kernel(src, *, skip_last: bool):
    def run(out):
        n = len(out) - 1 if skip_last else len(out)
        out[:n] = src[:n]
    return run


NUMPY_DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64, np.int32, np.int64, np.float16, np.float32, np.float64]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_unwritten_element_is_caught_numpy(dtype):
    src = np.arange(1, 9).astype(dtype)
    check_kernel(_copy_kernel(src, skip_last=False), np.empty_like(src), src)
    with pytest.raises(AssertionError):
        check_kernel(_copy_kernel(src, skip_last=True), np.empty_like(src), src)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.uint8, torch.int32],
                         ids=str)
def test_unwritten_element_is_caught_torch(dtype):
    src = torch.arange(1, 9, dtype=torch.float32).to(dtype)
    check_kernel(_copy_kernel(src, skip_last=False), torch.empty_like(src), src, check_dtype=False)
    with pytest.raises(AssertionError):
        check_kernel(_copy_kernel(src, skip_last=True), torch.empty_like(src), src, check_dtype=False)


def _raw_bytes(x) -> bytes:
    raw = x.view(torch.uint8) if isinstance(x, torch.Tensor) else x.view(np.uint8)
    return to_numpy(raw).tobytes()


@pytest.mark.parametrize("dtype", NUMPY_DTYPES + [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8,
                                                  torch.bfloat16], ids=str)
def test_poison_patterns_differ_bitwise(dtype):
    make = (lambda: torch.empty(4, dtype=dtype)) if isinstance(dtype, torch.dtype) else (lambda: np.empty(4, dtype))
    first, second = (_raw_bytes(poison_(make(), p)) for p in POISON_PATTERNS)
    assert first != second
