"""Where kernels run, decided once, before triton or numba is imported.

With a CUDA GPU, kernels run on it. Without one, Triton kernels run under ``TRITON_INTERPRET=1`` and numba-cuda
kernels under ``NUMBA_ENABLE_CUDASIM=1``. Both variables are read by those libraries at import time, so this module
must be imported first: ``impl/__init__.py`` does it, so ``import impl`` (or any ``impl.*``) is enough.

``LAB_BACKEND=cpu`` forces the interpreters on a GPU machine; ``LAB_BACKEND=gpu`` fails loudly where there is no GPU.
"""
from __future__ import annotations

import ctypes
import os
import sys

from impl import thirdparty

_LIBS_READING_ENV = ("triton", "numba")


def detect_cuda_gpu() -> bool:
    """True when the CUDA driver loads and reports at least one device (no torch/cupy import needed)."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0:
            return False
        return lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def _decide() -> bool:
    wanted = os.environ.get("LAB_BACKEND", "auto").lower()
    if wanted not in ("auto", "cpu", "gpu"):
        raise ValueError(f"LAB_BACKEND must be auto, cpu or gpu, not {wanted!r}")
    found = detect_cuda_gpu() if wanted != "cpu" else False
    if wanted == "gpu" and not found:
        raise RuntimeError("LAB_BACKEND=gpu but no CUDA device is visible (driver missing or CUDA_VISIBLE_DEVICES empty)")
    return found


def _set_simulators(on_gpu: bool) -> None:
    if on_gpu:
        return  # real hardware; a user may still export TRITON_INTERPRET=1 by hand to debug
    wanted = {"TRITON_INTERPRET": "1", "NUMBA_ENABLE_CUDASIM": "1"}
    late = [m for m in _LIBS_READING_ENV if m in sys.modules]
    if late and any(os.environ.get(k) != v for k, v in wanted.items()):
        raise RuntimeError(
            f"{', '.join(late)} imported before impl.backend: the CPU interpreters cannot be switched on any more. "
            "Import impl (conftest.py does) before triton or numba."
        )
    os.environ.update(wanted)


def _patch_numpy_for_numba() -> None:
    # numba-cuda 0.30 uses np.row_stack, which numpy 2.5 removed (seen on the GPU machine).
    import numpy as np

    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack  # type: ignore[attr-defined]


ON_GPU: bool = _decide()
_set_simulators(ON_GPU)
_patch_numpy_for_numba()

INTERPRETED: bool = os.environ.get("TRITON_INTERPRET") == "1"
SIMULATED: bool = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIMULATED:
    thirdparty.patch_numba_simulator()
DEVICE: str = "cuda" if ON_GPU and not INTERPRETED else "cpu"
"""Where torch tensors for Triton kernels live: 'cuda' on a GPU, 'cpu' under the interpreter."""

NO_GPU_REASON = "needs a CUDA GPU: this machine has none (kernels run here under TRITON_INTERPRET / NUMBA_ENABLE_CUDASIM)"


def sized(gpu, cpu):
    """Pick a problem size by backend: the real size on a GPU, a tiny one under the interpreters."""
    return gpu if ON_GPU else cpu


def describe() -> str:
    if ON_GPU:
        return "CUDA GPU (kernels run natively)"
    return "CPU (Triton under TRITON_INTERPRET=1, numba-cuda under NUMBA_ENABLE_CUDASIM=1)"
