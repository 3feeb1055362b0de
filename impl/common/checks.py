"""Argument checks shared by the systems' public entry points."""
from __future__ import annotations

import numpy as np
import torch


def require_tensor(x: object, what: str) -> torch.Tensor:
    """``x`` if it is a torch.Tensor; otherwise a TypeError saying what was passed and how to pass it (a numpy array
    in non-native byte order, e.g. '>f4', must be converted to native order first: torch refuses it)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        how = "torch.from_numpy(a)" if x.dtype.isnative else \
            "torch.from_numpy(a.astype(a.dtype.newbyteorder('='))) (it is in non-native byte order)"
        raise TypeError(f"{what} must be a torch.Tensor, got a numpy.ndarray of {x.dtype.str}: pass {how}")
    raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__}")
