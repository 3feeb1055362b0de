"""Test support for the sort: a fixture that makes the numba simulator's barriers cheap, and a bit-view helper."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from impl import backend


@pytest.fixture(autouse=True, scope="module")
def fast_simulator_threads():
    """The simulator runs one OS thread per CUDA thread and a manager that polls them at every ``syncthreads``; with
    the default 5 ms GIL switch interval each barrier waits for the poller's time slice. 50 µs makes the sort tests
    3x faster. Only under the simulator; restored after the module."""
    if not backend.SIMULATED:
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)


def host_bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of ``a`` (to compare arrays with NaNs and signed zeros exactly)."""
    return a.view(f"u{a.dtype.itemsize}")
