"""Intervals for comparisons that could be noise: a bench median's distribution-free interval, a ratio of two
medians, and the paired bootstrap of a difference between two systems scored on the same examples.

* ``median_interval(rounds, level)``: order statistics ``[x(k), x(n-k+1)]`` of the sorted rounds, with the largest
  ``k`` such that ``P(Binomial(n, 1/2) <= k - 1) <= (1 - level) / 2``; the median of the rounds' distribution lies
  inside with probability >= ``level`` whatever that distribution is. Too few rounds for ``level`` (n < 8 at 97.5%)
  give ``[min, max]`` and the smaller coverage they have.
* ``ratio_interval(num, den, level)``: ``[lo(num) / hi(den), hi(num) / lo(den)]`` from each median's interval at
  ``1 - (1 - level) / 2`` (Bonferroni: both hold together with probability >= ``level``).
* ``paired_bootstrap(a, b, stat, n, seed)``: ``stat(b) - stat(a)`` and its percentile-bootstrap interval, pairs
  resampled together (within each stratum when given strata), fixed seed: the same inputs give the same interval.

No randomness but the bootstrap's seeded generator: re-rendering a report from stored rounds is byte-identical.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Interval:
    """``point`` (the estimate) inside ``[lo, hi]``, which holds the true value with probability >= ``coverage``."""

    point: float
    lo: float
    hi: float
    coverage: float

    def scaled(self, factor: float) -> "Interval":
        lo, hi = sorted((self.lo * factor, self.hi * factor))
        return Interval(self.point * factor, lo, hi, self.coverage)

    def inverted(self, numerator: float = 1.0) -> "Interval":
        """``numerator / x`` of a positive quantity (a time into a rate): the ends swap."""
        return Interval(numerator / self.point, numerator / self.hi, numerator / self.lo, self.coverage)


def _binom_cdf_half(n: int, k: int) -> float:
    """P(Binomial(n, 1/2) <= k)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if k >= 0 else 0.0


def order_rank(n: int, level: float) -> tuple[int, float]:
    """``(k, coverage)``: ``[x(k), x(n-k+1)]`` of ``n`` sorted rounds holds the median with probability ``coverage``
    >= ``level`` (``k`` = 1 and a smaller coverage when ``n`` is too small for ``level``)."""
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"need n >= 1 and a level in (0, 1), got n={n}, level={level}")
    k = 1
    while k + 1 <= (n + 1) // 2 and _binom_cdf_half(n, k) <= (1 - level) / 2:
        k += 1
    return k, (1 - 2 * _binom_cdf_half(n, k - 1) if n > 1 else 0.0)


def median_interval(rounds: Sequence[float], level: float = 0.95) -> Interval:
    """Distribution-free interval of the median from ``rounds`` (order statistics; see the module docstring)."""
    xs = sorted(float(x) for x in rounds)
    if not xs:
        raise ValueError("median_interval needs at least one round")
    if any(not math.isfinite(x) for x in xs):
        raise ValueError(f"rounds must be finite, got {[x for x in xs if not math.isfinite(x)][:3]}")
    n = len(xs)
    k, coverage = order_rank(n, level)
    return Interval(statistics.median(xs), xs[k - 1], xs[n - k], coverage)


def quartile_top_rank(n: int) -> int:
    """The highest order statistic (1-based) that pytest-benchmark's stored ``q1`` of ``n`` rounds interpolates
    (its quartile methods 2 and 3); ``q1 <= x(k)`` is certain for every ``k`` at or above it, and by symmetry
    ``q3 >= x(n-k+1)``."""
    if n < 2:
        return 1
    if n % 2 == 0:
        half = n // 2
        return (half + 1) // 2 if half % 2 else half // 2 + 1
    quarter, rest = divmod(n, 4)
    return quarter + 1 if rest == 1 else quarter + 2


def summary_interval(median: float, n: int, q1: float | None, q3: float | None, lo: float, hi: float,
                     level: float = 0.95) -> Interval:
    """The median's interval from stored summary statistics when the rounds themselves were not kept: ``[q1, q3]``
    where it certainly contains the order-statistic interval at ``level``, else ``[min, max]``."""
    k, coverage = order_rank(max(n, 1), level)
    if q1 is not None and q3 is not None and n >= 2 and quartile_top_rank(n) <= k:
        return Interval(median, min(q1, median), max(q3, median), coverage)
    return Interval(median, lo, hi, 1 - 2 ** (1 - n) if n > 1 else 0.0)


def ratio_interval(num: Sequence[float], den: Sequence[float], level: float = 0.95) -> Interval:
    """``median(num) / median(den)`` and a distribution-free interval holding it with probability >= ``level``."""
    each = 1 - (1 - level) / 2
    a, b = median_interval(num, each), median_interval(den, each)
    if b.lo <= 0:
        raise ValueError(f"the denominator's rounds must be positive, got a lower end of {b.lo}")
    return Interval(a.point / b.point, a.lo / b.hi, a.hi / b.lo, max(0.0, a.coverage + b.coverage - 1))


def _as_strata(x: Sequence) -> list[list[float]]:
    items = list(x)
    if items and not isinstance(items[0], (int, float)) and hasattr(items[0], "__len__"):
        return [[float(v) for v in s] for s in items]  # strata
    return [[float(v) for v in items]]


def paired_bootstrap(a: Sequence, b: Sequence, stat: Callable | str = "mean", n: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """``stat(b) - stat(a)`` over paired scores and its ``level`` percentile-bootstrap interval.

    ``a`` and ``b``: equally long sequences of floats (pair ``i`` is ``a[i], b[i]``), or equally shaped sequences of
    such sequences (strata, e.g. tasks: pairs are resampled within each stratum, and the statistic is the mean over
    strata of the per-stratum statistic). ``stat``: ``"mean"``, ``"median"`` or a callable reducing a ``(reps, m)``
    float64 tensor along dim 1. ``n`` resamples from a generator seeded with ``seed``.

    Returns ``{"diff", "lo", "hi", "n", "level", "reps", "seed"}`` (``n`` = number of pairs). A lower end above 0
    says ``b`` beats ``a`` beyond the noise of this many examples; judge the end the claim's direction needs.
    """
    import torch

    sa, sb = _as_strata(a), _as_strata(b)
    if len(sa) != len(sb) or not sa or any(len(x) != len(y) or not x for x, y in zip(sa, sb)):
        raise ValueError(f"need equally many paired scores per stratum, got {[len(x) for x in sa]} and "
                         f"{[len(y) for y in sb]}")
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"need n >= 1 resamples and a level in (0, 1), got n={n}, level={level}")
    reduce = {"mean": lambda t: t.mean(1), "median": lambda t: t.median(1).values}.get(stat, stat) \
        if isinstance(stat, str) else stat
    if isinstance(stat, str) and stat not in ("mean", "median"):
        raise ValueError(f"stat must be 'mean', 'median' or a callable, not {stat!r}")
    g = torch.Generator().manual_seed(seed)
    xs = [torch.tensor(x, dtype=torch.float64) for x in sa]
    ys = [torch.tensor(y, dtype=torch.float64) for y in sb]
    if any(not torch.isfinite(t).all() for t in xs + ys):
        raise ValueError("paired_bootstrap: scores must be finite (a NaN or inf score would poison every resample)")
    boot = []
    for x, y in zip(xs, ys):
        idx = torch.randint(0, len(x), (n, len(x)), generator=g)
        boot.append(reduce(y[idx]) - reduce(x[idx]))
    diffs = torch.stack(boot).mean(0)
    lo, hi = torch.quantile(diffs, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    point = sum(float(reduce(y[None]) - reduce(x[None])) for x, y in zip(xs, ys)) / len(xs)
    return {"diff": point, "lo": lo, "hi": hi, "n": sum(len(x) for x in xs), "level": level, "reps": n, "seed": seed}
