"""The latency gain of a policy over the default, with a bootstrap interval over rounds and requests.

gain % = 100 · (1 − median(policy) / median(default)), each median over every request of every round (pooled).

The runs come in rounds: in round r the default and the policy were each served for n requests, back to back, in
alternating order (``chooser.compare_policies``). The interval is a two-level (hierarchical) bootstrap: draw R rounds
with replacement — the same round indices for both arms, since round r of the default and of the policy are a
pair and what drifts between rounds (clocks, other tenants) moves both — then, inside every drawn round, draw its n
requests with replacement, and compute the gain of the pooled draw; the interval is the percentile interval of
``n_boot`` such gains (fixed seed: the same data give the same interval). With one round only the requests are
resampled, which ignores drift: the experiments use several rounds. Claims judge the conservative end.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def gain_pct(default_ms: float, policy_ms: float) -> float:
    return 100.0 * (default_ms - policy_ms) / default_ms


@dataclass(frozen=True)
class GainInterval:
    """A gain (percent) and its bootstrap interval [lo, hi] at ``level``, from ``rounds`` × ``requests`` per arm."""

    gain_pct: float
    lo_pct: float
    hi_pct: float
    level: float
    rounds: int
    requests: int
    n_boot: int

    def as_dict(self) -> dict:
        return asdict(self)


def _rounds_array(rounds: Sequence[Sequence[float]], what: str) -> np.ndarray:
    if not rounds or any(len(r) == 0 for r in rounds):
        raise ValueError(f"{what}: needs at least one round with at least one request, got {[len(r) for r in rounds]}")
    n = {len(r) for r in rounds}
    if len(n) != 1:
        raise ValueError(f"{what}: every round must hold the same number of requests, got {sorted(n)}")
    a = np.asarray(rounds, dtype=np.float64)
    if not np.isfinite(a).all() or (a <= 0).any():
        raise ValueError(f"{what}: request times must be finite and > 0")
    return a


def gain_interval(default_rounds: Sequence[Sequence[float]], policy_rounds: Sequence[Sequence[float]], *,
                  level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> GainInterval:
    """The pooled-median gain of the policy over the default and its hierarchical bootstrap interval (module doc).
    ``*_rounds[r]`` are the request times (any unit, the same for both) of round r; both arms have R rounds."""
    d, p = _rounds_array(default_rounds, "default"), _rounds_array(policy_rounds, "policy")
    if len(d) != len(p):
        raise ValueError(f"the arms must have the same rounds (paired), got {len(d)} and {len(p)}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must be in (0, 1) and n_boot >= 1, got {level}, {n_boot}")
    rng = np.random.default_rng(seed)
    R = len(d)
    pick = rng.integers(0, R, size=(n_boot, R))  # the same rounds for both arms

    def pooled_medians(x: np.ndarray) -> np.ndarray:
        n = x.shape[1]
        idx = rng.integers(0, n, size=(n_boot, R, n))
        draws = x[pick[:, :, None], idx]
        return np.median(draws.reshape(n_boot, R * n), axis=1)

    gains = 100.0 * (1.0 - pooled_medians(p) / pooled_medians(d))
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(gains, [alpha, 1.0 - alpha])
    point = gain_pct(float(np.median(d)), float(np.median(p)))
    return GainInterval(point, float(lo), float(hi), level, R, d.shape[1], n_boot)
