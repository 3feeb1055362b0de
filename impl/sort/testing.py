"""Test support for the sort: a bit-view helper."""
from __future__ import annotations

import numpy as np


def host_bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of ``a`` (to compare arrays with NaNs and signed zeros exactly)."""
    return a.view(f"u{a.dtype.itemsize}")
