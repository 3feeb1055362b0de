"""Readers of the records serve's tune run stores (``results/<gpu>/serve/tune.json``), shared by the run that writes
them and the claims that judge them."""
from __future__ import annotations

from typing import Any


def fastest_read_us(pair: dict[str, Any]) -> float | None:
    """The faster of a batch-1 tune pair's streaming reads of its code bytes (its ``anchor`` rows), None without."""
    reads = [r["median_us"] for r in pair.get("candidates", []) if r.get("kind") == "anchor" and "median_us" in r]
    return min(reads) if reads else None
