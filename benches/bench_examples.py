"""Bench of the example Triton kernel: the regression gate's canary (memory-bound, ~0.19 ms at 64M on an H200).

``LAB_GATE_SLOW_CANARY=f`` (set only by the gate's self-test, ``python -m impl gate --slow-check``) makes the timed
call recompute the first fraction ``f`` of the output once more: the same answer from ``1 + f`` times the work, the
slowdown the gate must catch.
"""
import os

import pytest
import torch

from fixtures.oracle import assert_close
from impl.backend import DEVICE, sized
from impl.examples.axpy_triton import axpy

SLOW_CANARY = float(os.environ.get("LAB_GATE_SLOW_CANARY", "0"))


def axpy_with_extra_work(a: float, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, extra: float) -> torch.Tensor:
    """``out = a·x + y``, then the first ``extra`` fraction of it once more (idempotent: the result is unchanged)."""
    axpy(a, x, y, out=out)
    k = int(extra * x.numel())
    if k:
        axpy(a, x[:k], y[:k], out=out[:k])
    return out


@pytest.mark.parametrize("n", [sized(1 << 26, 1 << 10)])
def test_examples_axpy(device_bench, n):
    x = torch.randn(n, device=DEVICE)
    y = torch.randn(n, device=DEVICE)
    out = torch.full_like(x, float("nan"))
    info = {"slow_canary": SLOW_CANARY} if SLOW_CANARY else {}
    device_bench(lambda: axpy_with_extra_work(2.0, x, y, out, SLOW_CANARY), bytes_moved=3 * 4 * n, flops=2 * n,
                 flops_dtype="fp32", n=n, dtype="float32", variant="triton", **info)
    assert_close(out, 2.0 * x + y)
