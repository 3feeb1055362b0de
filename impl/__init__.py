"""The GPU systems lab: one package per system, plus the shared harness in ``impl.common``.

Importing ``impl`` first decides the execution backend (see ``impl.backend``) before triton or numba load.
"""
from impl import backend as backend  # noqa: F401  (must run before triton/numba imports)
