"""One checker for the results of ``cuda.bindings`` calls, runtime (``cudaError_t``) and driver (``CUresult``) alike.

    (value,) = check_cuda(runtime.cudaDeviceGetLimit(limit), "cudaDeviceGetLimit")   # raises CudaError on failure

A call returns its error code first, then its outputs; ``check_cuda`` raises naming the call, the error's name and
CUDA's description of it, or returns the outputs (a tuple, empty for calls without outputs).
"""
from __future__ import annotations

from typing import Any


class CudaError(RuntimeError):
    """A CUDA runtime or driver call failed."""


def check_cuda(result: Any, call: str, error: type[Exception] = CudaError) -> tuple:
    """Raise ``error`` naming ``call`` unless the first element of a cuda.bindings result is success (``cudaSuccess``
    / ``CUDA_SUCCESS``, both 0); return the remaining elements."""
    result = result if isinstance(result, tuple) else (result,)
    err = result[0]
    if int(err) != 0:
        raise error(f"{call} failed: {getattr(err, 'name', err)} ({describe(err)})")
    return result[1:]


def describe(err: Any) -> str:
    """CUDA's words for an error code; the driver's need the driver library, so without one: 'no description'."""
    from cuda.bindings import driver, runtime

    try:
        if isinstance(err, driver.CUresult):
            _, text = driver.cuGetErrorString(err)
        else:
            _, text = runtime.cudaGetErrorString(err)
    except Exception:  # noqa: BLE001 - no driver library on this machine: the name alone must do
        return "no description"
    return text.decode() if isinstance(text, bytes) else str(text)
