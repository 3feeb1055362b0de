"""The measured table a system's kernels launch with when the caller names no config (sort's configs per size,
serve's GEMM path per (projection, M), fp8's launch parameters per kernel).

Where it comes from, once per process: the path in the system's environment variable, else this card's stored
table ``results/<card>/<system>/<name>.json`` (written by the system's tune), else the system's built-in table.
``use`` replaces it (None: load again as above, as a fresh process would).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


def read_table(path: str | Path, what: str) -> tuple[Any, str]:
    """The JSON held in ``path`` and its origin as a table names it ("measured table <file> @<commit>"); a
    ValueError naming ``what`` and the file when it cannot be read."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the {what} {p}: {e}") from e
    commit = data.get("commit") if isinstance(data, dict) else None
    return data, f"measured table {p.name}" + (f" @{commit}" if commit else "")


def on_gpu() -> bool:
    from impl import backend

    return backend.ON_GPU


class ActiveTable(Generic[T]):
    """The process-wide table of one system (module doc). ``load(path)`` reads a stored table, ``builtin()`` makes
    the default one, ``on_card()`` says whether this machine has a card whose stored table applies."""

    def __init__(self, system: str, name: str, env: str, load: Callable[[str | Path], T], builtin: Callable[[], T],
                 on_card: Callable[[], bool] = on_gpu) -> None:
        self.system, self.name, self.env = system, name, env
        self.load, self.builtin, self.on_card = load, builtin, on_card
        self._table: T | None = None

    def stored_path(self) -> Path | None:
        """``results/<card>/<system>/<name>.json`` for the card in use (None without one)."""
        if not self.on_card():
            return None
        from impl.common.results import results_dir

        return results_dir() / self.system / f"{self.name}.json"

    def get(self) -> T:
        if self._table is None:
            env, stored = os.environ.get(self.env), self.stored_path()
            if env:
                self._table = self.load(env)
            elif stored is not None and stored.exists():
                self._table = self.load(stored)
            else:
                self._table = self.builtin()
        return self._table

    def use(self, table: T | None) -> None:
        self._table = table
