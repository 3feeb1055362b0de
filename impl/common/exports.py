"""Lazy exports for a system's ``__init__.py``: names resolved from their submodules on first use.

    __all__, __getattr__ = lazy_exports(__name__, {"chooser": ("serve_best",), "control": ("L2Controller",)})

For a package whose submodules must decide what loads first (a compile-only check that switches Triton's interpreter
off before triton is imported, a worker process): importing the package itself then imports nothing else, while
``from impl.<system> import serve_best`` works as with eager imports (PEP 562).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, names: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package``: each name of ``names[module]`` is read from
    ``package.module`` when first asked for."""
    where = {name: module for module, exported in names.items() for name in exported}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return list(where), __getattr__
