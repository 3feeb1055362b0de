"""Bench tables: build and probe sides of n rows each, generated on the device from a seed.

Cases (``Case.kind``):
  uniform  unique build keys; each probe row matches with probability ``match`` (a random build key) or else takes a
           key absent from the build side — the 1M x 1M target case (~50% of probes match, one build row each).
  zipf     primary-key / foreign-key skew: unique build keys, matching probe rows pick build keys by a bounded
           Zipf(s) law over a random ranking (s = 1: the top key gets ~1/ln(n) of the matches).
  m2m      many-to-many: n / dup distinct build keys, each on ~dup build rows; matches then fan out ~dup-fold.
Keys are spread over the whole int32 (int64) range by a bijection of their index, so they are neither dense nor
sorted; row ids are ``arange(n)`` as int32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Case:
    kind: str          # uniform | zipf | m2m
    n: int             # rows per side
    dtype: str = "int32"
    match: float = 0.5  # fraction of probe rows whose key is on the build side
    zipf_s: float = 1.0
    dup: int = 8       # m2m: build rows per distinct key

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "zipf", "m2m"):
            raise ValueError(f"unknown case kind {self.kind!r}")
        if self.dtype not in ("int32", "int64"):
            raise ValueError(f"dtype must be int32 or int64, got {self.dtype!r}")

    @property
    def label(self) -> str:
        n = self.n
        size = f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 1000 else str(n)
        return size if self.kind == "uniform" else f"{self.kind}-{size}"


def spread_keys(v: torch.Tensor, dtype: str) -> torch.Tensor:
    """An injective map of indices v in [0, 2^29) to keys spread over the dtype's range (negatives included)."""
    v = v.to(torch.int64)
    x = (v * 0x9E3779B1) & 0xFFFFFFFF  # odd multiplier: a bijection of 32-bit words (v * c < 2^61: no overflow)
    if dtype == "int32":
        return (x - (1 << 31)).to(torch.int32)
    return ((x << 30) ^ v) - (1 << 61)  # low 30 bits are v itself: injective


def _zipf_ranks(n: int, size: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Bounded Zipf: P(rank r) ∝ 1 / (r + 1)^s for r in [0, n)."""
    cdf = np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64) ** s)
    return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1]), n - 1)


def make_tables(case: Case, seed: int = 0, device: str | torch.device = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(build_keys, build_rows, probe_keys, probe_rows) for ``case`` on ``device``."""
    n = case.n
    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(2 * n, generator=g)  # first n: build key ids, the rest: ids absent from the build side
    distinct = n if case.kind != "m2m" else max(1, n // case.dup)
    key_ids = perm[:distinct]
    if case.kind == "m2m":
        build_ids = key_ids[torch.randint(distinct, (n,), generator=g)]
    else:
        build_ids = key_ids
    hit = torch.rand(n, generator=g) < case.match
    if case.kind == "zipf":
        ranks = torch.from_numpy(_zipf_ranks(distinct, n, case.zipf_s, np.random.default_rng(seed)))
    else:
        ranks = torch.randint(distinct, (n,), generator=g)
    miss_ids = perm[n:][torch.randint(n, (n,), generator=g)]
    probe_ids = torch.where(hit, key_ids[ranks], miss_ids)
    rows = torch.arange(n, dtype=torch.int32)
    bk, pk = spread_keys(build_ids, case.dtype), spread_keys(probe_ids, case.dtype)
    return bk.to(device), rows.to(device), pk.to(device), rows.clone().to(device)


def compulsory_bytes(n_build: int, n_probe: int, total: int, key_bytes: int, row_bytes: int) -> int:
    """Bytes any join must move: read both sides' keys and row ids, write the pairs."""
    return (n_build + n_probe) * (key_bytes + row_bytes) + 2 * total * row_bytes
