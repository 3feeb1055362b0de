"""Bench of the example Triton kernel: the regression gate's canary (memory-bound, ~0.9 ms at 64M on an H100)."""
import pytest
import torch

from fixtures.oracle import assert_close
from impl.backend import DEVICE, sized
from impl.examples.axpy_triton import axpy


@pytest.mark.parametrize("n", [sized(1 << 26, 1 << 10)])
def test_examples_axpy(device_bench, n):
    x = torch.randn(n, device=DEVICE)
    y = torch.randn(n, device=DEVICE)
    out = torch.empty_like(x)
    device_bench(lambda: axpy(2.0, x, y, out=out), bytes_moved=3 * 4 * n, flops=2 * n, flops_dtype="fp32",
                 n=n, dtype="float32", variant="triton")
    assert_close(out, 2.0 * x + y)
