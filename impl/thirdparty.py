"""Every use of a third-party library's private names, in one place, each checked by ``check_private_names``.

The suite leans on three internals no public API offers (versions pinned in constraints.txt; the GPU machine has its
own image). ``correctness/test_thirdparty.py`` calls ``check_private_names`` so a version that renamed one fails
loudly, naming the library, its version and the missing name, instead of breaking a bench or a simulator run later:

* pytest-benchmark: ``BenchmarkFixture._mode`` and ``_make_stats`` -- the only way to hand it round times measured by
  our own device timer (its public ``pedantic`` times with a host clock, which on a GPU measures launch latency);
* numba's CUDA simulator: ``kernelapi.FakeCUDAShared.array`` and its ``_allocations`` dict -- patched with a lock,
  because the simulator's check-then-insert gives racing threads of one block private "shared" arrays.
"""
from __future__ import annotations

import importlib
import sys
from importlib import metadata
from typing import Any

NUMBA_SIMULATOR = "numba.cuda.simulator.kernelapi"


def check_private_names() -> list[str]:
    """The private names this module uses that the installed libraries lack, as readable lines (empty: all there).
    Imports pytest-benchmark, and numba's simulator only where the simulator is on."""
    missing = []
    from pytest_benchmark.fixture import BenchmarkFixture

    for name in ("_make_stats",):
        if not hasattr(BenchmarkFixture, name):
            missing.append(f"pytest-benchmark {metadata.version('pytest-benchmark')}: BenchmarkFixture.{name}")
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        kernelapi = importlib.import_module(NUMBA_SIMULATOR)
        if not hasattr(getattr(kernelapi, "FakeCUDAShared", None), "array"):
            missing.append(f"numba-cuda {metadata.version('numba-cuda')}: {NUMBA_SIMULATOR}.FakeCUDAShared.array")
    return missing


# ---- pytest-benchmark -----------------------------------------------------------------------------------------

def hand_rounds_to_benchmark(benchmark: Any, seconds: list[float]) -> None:
    """Record ``seconds`` as the rounds of ``benchmark`` (a pytest-benchmark fixture not yet used)."""
    if getattr(benchmark, "_mode", None):
        raise RuntimeError(f"the benchmark fixture was already used in {benchmark._mode} mode")
    benchmark._mode = "device_bench(...)"
    stats = benchmark._make_stats(1)
    for s in seconds:
        stats.update(s)


# ---- numba's CUDA simulator -----------------------------------------------------------------------------------

def patch_numba_simulator() -> None:
    """Lock the simulator's shared-array lookup, now if it is loaded, else when it is first imported (lazily: a
    process that never loads numba pays nothing)."""
    if NUMBA_SIMULATOR in sys.modules:
        _lock_shared_array_lookup(sys.modules[NUMBA_SIMULATOR])
    elif not any(isinstance(f, _PatchSimulatorOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchSimulatorOnImport())


def _lock_shared_array_lookup(kernelapi) -> None:
    """numba's simulator gives a block's threads one shared array per source line through an unlocked
    check-then-insert on a dict: two threads that both miss can each allocate their own array, and the block then
    silently computes on two "shared" arrays (a race in the simulator, not in the kernel). Same keying, with a lock."""
    import threading

    original = kernelapi.FakeCUDAShared.array
    if getattr(original, "lab_thread_safe", False):
        return
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            return original(self, shape, dtype, alignment)  # dynamic shared memory needs no lookup
        caller = sys._getframe(1)
        where = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(where)
            if res is None:
                if isinstance(dtype, kernelapi.types.Type):
                    dtype = kernelapi.numpy_support.as_dtype(dtype)
                res = self._allocations[where] = kernelapi.np.empty(shape, dtype)
        return res

    array.lab_thread_safe = True  # type: ignore[attr-defined]
    kernelapi.FakeCUDAShared.array = array


class _PatchSimulatorOnImport:
    """Meta-path hook: when numba's simulator module is imported (if ever), lock its shared-array lookup. Lazy, so
    importing impl loads no numba, and a process that later switches the simulator off (PTX checks) gets the real
    numba.cuda."""

    TARGET = NUMBA_SIMULATOR

    def find_spec(self, name, path=None, target=None):
        if name != self.TARGET:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _lock_shared_array_lookup(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
