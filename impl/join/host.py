"""Host-CPU joins: pandas (also the tests' oracle), DuckDB and polars — the CPU anchors of the benches.

Each takes host numpy arrays (keys, row ids: 1-D int32/int64, either byte order) and returns
``(build_rows, probe_rows)`` numpy arrays of the matching pairs. DuckDB and polars are installed on CPU machines but
not on the GPU machine: their functions raise ``RuntimeError`` with ``unavailable_reason(name)`` there, and the
benches skip with that reason.
"""
from __future__ import annotations

import importlib
from typing import Callable

import numpy as np
import pandas as pd

from impl.join.common import sort_pairs

HOST_JOINS = ("pandas", "duckdb", "polars")


def unavailable_reason(name: str) -> str | None:
    if name == "pandas":
        return None
    try:
        importlib.import_module(name)
    except ImportError as e:
        return f"{name} is not installed here ({e}); the GPU machine lacks it unless its wheel is carried over"
    return None


def _column(name: str, a, n: int | None = None) -> np.ndarray:
    """A 1-D int32/int64 numpy column in native byte order (big-endian input is converted, not misread)."""
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype.kind != "i" or a.dtype.itemsize not in (4, 8):
        raise TypeError(f"{name} must be int32 or int64, got {a.dtype}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name} has {len(a)} entries but its keys have {n}")
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _frames(bk, pk, br, pr) -> tuple[pd.DataFrame, pd.DataFrame]:
    bk, pk = _column("build keys", bk), _column("probe keys", pk)
    br = np.arange(len(bk), dtype=np.int64) if br is None else _column("build rows", br, len(bk))
    pr = np.arange(len(pk), dtype=np.int64) if pr is None else _column("probe rows", pr, len(pk))
    return pd.DataFrame({"k": bk, "b": br}), pd.DataFrame({"k": pk, "p": pr})


def pandas_join(bk, pk, br=None, pr=None) -> tuple[np.ndarray, np.ndarray]:
    b, p = _frames(bk, pk, br, pr)
    m = b.merge(p, on="k", how="inner", sort=False)
    return m["b"].to_numpy(), m["p"].to_numpy()


_DUCK = None


def duckdb_join(bk, pk, br=None, pr=None) -> tuple[np.ndarray, np.ndarray]:
    global _DUCK
    reason = unavailable_reason("duckdb")
    if reason:
        raise RuntimeError(reason)
    import duckdb

    if _DUCK is None:
        _DUCK = duckdb.connect()
    b, p = _frames(bk, pk, br, pr)
    _DUCK.register("join_b", b)
    _DUCK.register("join_p", p)
    try:
        out = _DUCK.execute("SELECT join_b.b, join_p.p FROM join_b JOIN join_p ON join_b.k = join_p.k").fetchnumpy()
    finally:
        _DUCK.unregister("join_b")
        _DUCK.unregister("join_p")
    return np.asarray(out["b"]), np.asarray(out["p"])


def polars_join(bk, pk, br=None, pr=None) -> tuple[np.ndarray, np.ndarray]:
    reason = unavailable_reason("polars")
    if reason:
        raise RuntimeError(reason)
    import polars as pl

    b, p = _frames(bk, pk, br, pr)
    m = pl.from_pandas(b).join(pl.from_pandas(p), on="k", how="inner")
    return m["b"].to_numpy(), m["p"].to_numpy()


JOINS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "pandas": pandas_join, "duckdb": duckdb_join, "polars": polars_join}


def reference_pairs(bk, pk, br=None, pr=None) -> np.ndarray:
    """The oracle: ``pandas.merge`` pairs as a sorted ``(total, 2)`` int64 array (a multiset of pairs)."""
    b, p = pandas_join(bk, pk, br, pr)
    return sort_pairs(b, p)
