"""CPU references for the sort's order, independent of the order-key transform the kernels use.

    sort_reference(x)                    numpy.sort(x): NaNs last
    sort_reference(x, descending=True)   numpy.sort(x)[::-1]: NaNs first, then the values from largest
    argsort_reference(x)                 numpy.argsort(x, kind="stable")
    argsort_reference(x, descending)     NaNs first (index order), then values from largest, ties in index order
                                         (torch.sort(descending=True, stable=True)); −0.0 == +0.0 throughout
"""
from __future__ import annotations

import numpy as np


def sort_reference(x: np.ndarray, *, descending: bool = False) -> np.ndarray:
    out = np.sort(x, kind="stable")
    return out[::-1].copy() if descending else out


def argsort_reference(x: np.ndarray, *, descending: bool = False) -> np.ndarray:
    if not descending:
        return np.argsort(x, kind="stable")
    if x.dtype.kind in "iu":
        return np.argsort(~x, kind="stable")  # ~v = −v−1 reverses the order without overflowing at the minimum
    nan = np.isnan(x)
    rest = np.flatnonzero(~nan)
    return np.concatenate([np.flatnonzero(nan), rest[np.argsort(-x[rest], kind="stable")]]).astype(np.int64)


def is_permutation(p: np.ndarray, n: int) -> bool:
    return p.shape == (n,) and np.array_equal(np.sort(p), np.arange(n))
