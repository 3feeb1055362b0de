"""Statistics the recipe reports: seed intervals, the selector's accuracy promise, paired bootstrap over test images.

* ``mean_ci95(xs)``: mean and the two-sided 95 % Student-t interval ``mean ± t(0.975, n−1) · s / √n`` over seeds;
* ``promise_bound(acc, n, n_eval, confidence)``: a one-sided lower bound on the accuracy a model measured at ``acc``
  on ``n`` images will show on a fresh set of ``n_eval`` images,

      acc − z · sqrt(p̃ (1 − p̃) (1/n + 1/n_eval)),   z = Φ⁻¹(confidence),   p̃ = (acc·n + z²/2) / (n + z²)

  (the Agresti–Coull centre keeps the spread positive at acc = 0 or 1; with ``n_eval=None`` the second term drops and
  the bound is on the true accuracy; a bound below 0 is reported as 0);
* ``bootstrap_accuracies(correct, n_boot, seed)``: the accuracy of every model on ``n_boot`` resamples (with
  replacement) of one test set, the same resample for every model (paired), from per-image correctness bits.

Per-image correctness travels in results as ``pack_bits`` strings (base64 of ``numpy.packbits``), so the bootstrap can
be recomputed from stored data.
"""
from __future__ import annotations

import base64
import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

# two-sided 95 % quantiles t(0.975, df) for df = 1..30
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)


def t975(df: int) -> float:
    """Student-t 97.5 % quantile with ``df`` degrees of freedom (the normal 1.96 beyond 30, within 4 %)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least one degree of freedom, got {df}")
    return _T975[df - 1] if df <= len(_T975) else NormalDist().inv_cdf(0.975)


def mean_ci95(xs: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation, range (max − min) and the 95 % t interval of the mean of ``xs``."""
    x = np.asarray(xs, dtype=np.float64)
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"need finite values, got {list(xs)}")
    mean = float(x.mean())
    if x.size == 1:
        return {"n": 1, "mean": mean, "std": None, "range": 0.0, "lo": None, "hi": None}
    sd = float(x.std(ddof=1))
    half = t975(x.size - 1) * sd / math.sqrt(x.size)
    return {"n": int(x.size), "mean": mean, "std": sd, "range": float(x.max() - x.min()),
            "lo": mean - half, "hi": mean + half}


def z_of(confidence: float) -> float:
    """One-sided standard-normal quantile Φ⁻¹(confidence)."""
    if not (isinstance(confidence, (int, float)) and math.isfinite(confidence) and 0.5 <= confidence < 1.0):
        raise ValueError(f"confidence must be a number in [0.5, 1), got {confidence!r}")
    return NormalDist().inv_cdf(confidence)


def promise_bound(acc: float, n: int, confidence: float, n_eval: int | None = None) -> float:
    """Lower bound on accuracy (module docstring): what a model measured at ``acc`` on ``n`` images can promise."""
    if not (0.0 <= acc <= 1.0) or n < 1:
        raise ValueError(f"need an accuracy in [0, 1] measured on n >= 1 images, got acc={acc}, n={n}")
    z = z_of(confidence)
    p = (acc * n + z * z / 2) / (n + z * z)
    var = p * (1 - p) * (1.0 / n + (1.0 / n_eval if n_eval else 0.0))
    return max(0.0, acc - z * math.sqrt(var))


def pack_bits(correct: np.ndarray) -> str:
    """Boolean vector -> base64 text (8 images per byte)."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    """Inverse of ``pack_bits`` for a vector of ``n`` images."""
    raw = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8)
    if raw.size != (n + 7) // 8:
        raise ValueError(f"packed correctness holds {raw.size} bytes, {n} images need {(n + 7) // 8}")
    return np.unpackbits(raw)[:n].astype(bool)


def bootstrap_accuracies(correct: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot, k) accuracies of k models whose per-image correctness is ``correct`` (k, n), on paired resamples."""
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 2 or c.shape[1] == 0:
        raise ValueError(f"correctness must be (models, images) with images > 0, got shape {c.shape}")
    n = c.shape[1]
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, c.shape[0]))
    cf = c.T.astype(np.float32)                               # (n, k)
    for start in range(0, n_boot, 250):                       # 250 resamples at a time: bounded memory
        b = min(250, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = (np.arange(b)[:, None] * n + idx).ravel()
        counts = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float32)
        out[start: start + b] = counts @ cf / n
    return out


def interval95(samples: np.ndarray) -> dict[str, float]:
    """2.5 % and 97.5 % quantiles of bootstrap samples."""
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [0.025, 0.975])
    return {"lo": float(lo), "hi": float(hi)}
