"""The selector: the cheapest configuration that can promise an accuracy floor (optionally within a latency budget).

Rows are dicts with at least ``name``, ``is_anchor``, the ranking key (``flops`` or a latency such as
``latency_b1_ms``), the accuracy measured on the validation split held out of training (``acc_val``) and the number
of images it was measured on (``n_val``). A row *promises* ``promise_bound(acc_val, n_val, confidence, n_eval)``
(``impl.seam.stats``): a one-sided lower confidence bound on the accuracy it will show on ``n_eval`` fresh images
(on its true accuracy when ``n_eval`` is None; the raw validation accuracy when ``confidence`` is None). Then

    select(rows, floor) = argmin_{r : promise(r) ≥ floor, latency(r) ≤ budget} (r[rank_by], −promise(r), r.name)

and a floor no row can promise is refused with ``FloorError`` naming the best promise; a floor that is not a number
in [0, 1], a latency budget that is not a positive number, or a malformed row is refused the same way. The anchor-only
baseline is ``select`` over the two anchor rows.

The sweep (``floor_grid``, ``sweep``, ``summarize``): floors evenly spaced between the two anchors' promises; at each,
the selector's choice and the baseline's, whether the choice meets the floor on another split (the test split, never
used to choose), and its saving ``1 − cost(choice)/cost(baseline)`` where a stitch cheaper than the baseline's anchor
qualifies. ``promise_interval`` bootstraps the kept-promise percentage over the test images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from impl.seam.stats import bootstrap_accuracies, interval95, promise_bound, unpack_bits


class FloorError(ValueError):
    """A floor (or budget) the selector refuses: malformed, or above what every configuration can promise."""


@dataclass(frozen=True)
class Promise:
    """How a row's validation accuracy becomes a promise (module docstring)."""

    confidence: float | None = 0.99
    n_eval: int | None = None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_floor(min_acc: Any) -> float:
    """``min_acc`` as a float, or ``FloorError`` unless it is a finite number in [0, 1]."""
    if not _is_number(min_acc) or not math.isfinite(float(min_acc)) or not 0.0 <= float(min_acc) <= 1.0:
        raise FloorError(f"an accuracy floor must be a number in [0, 1] (a fraction: 0.93 for 93 %), got {min_acc!r}")
    return float(min_acc)


def check_budget(max_latency_ms: Any) -> float | None:
    """``max_latency_ms`` as a float (or None), or ``FloorError`` unless it is a finite positive number."""
    if max_latency_ms is None:
        return None
    if not _is_number(max_latency_ms) or not math.isfinite(float(max_latency_ms)) or float(max_latency_ms) <= 0:
        raise FloorError(f"a latency budget must be a positive number of milliseconds, got {max_latency_ms!r}")
    return float(max_latency_ms)


def promised(row: dict[str, Any], promise: Promise = Promise(), acc_key: str = "acc_val",
             count_key: str = "n_val") -> float | None:
    """The accuracy ``row`` can promise, or None when it has no finite accuracy."""
    acc = row.get(acc_key)
    if acc is None or not _is_number(acc) or not math.isfinite(acc):
        return None
    if promise.confidence is None:
        return float(acc)
    n = row.get(count_key)
    if not _is_number(n) or n < 1:
        raise FloorError(f"row {row.get('name')!r} has no image count {count_key!r}: its accuracy cannot be bounded "
                         "(pass Promise(confidence=None) to rank by the raw accuracy)")
    return promise_bound(float(acc), int(n), promise.confidence, promise.n_eval)


def select(rows: Iterable[dict[str, Any]], min_acc: float, *, promise: Promise = Promise(),
           max_latency_ms: float | None = None, rank_by: str = "flops", acc_key: str = "acc_val",
           count_key: str = "n_val", latency_key: str = "latency_b1_ms") -> dict[str, Any]:
    """The cheapest row (by ``rank_by``) promising ``min_acc`` within the budget; ``FloorError`` if there is none."""
    floor, budget = check_floor(min_acc), check_budget(max_latency_ms)
    rows = list(rows)
    if not rows:
        raise FloorError("no configurations to choose from")
    scored = []
    for r in rows:
        cost = r.get(rank_by)
        if not _is_number(cost) or not math.isfinite(cost):
            raise FloorError(f"row {r.get('name')!r} has no finite {rank_by!r} to rank by")
        scored.append((r, promised(r, promise, acc_key, count_key)))
    feasible = [(r, p) for r, p in scored if p is not None and p >= floor
                and (budget is None or (_is_number(r.get(latency_key)) and r[latency_key] <= budget))]
    if not feasible:
        best = max(((r, p) for r, p in scored if p is not None), key=lambda rp: rp[1], default=None)
        how = "its raw" if promise.confidence is None else f"the {promise.confidence:.0%} lower bound of the"
        raise FloorError(f"no configuration can promise accuracy >= {floor:.4f}"
                         + (f" within {budget} ms ({latency_key})" if budget is not None else "")
                         + ("" if best is None else f"; the best promise is {best[1]:.4f} ({best[0]['name']}: "
                            f"{how} {acc_key} {best[0][acc_key]:.4f})"))
    return min(feasible, key=lambda rp: (rp[0][rank_by], -rp[1], rp[0]["name"]))[0]


def floor_grid(rows: list[dict[str, Any]], n: int = 41, promise: Promise = Promise(), acc_key: str = "acc_val",
               count_key: str = "n_val") -> list[float]:
    """``n`` floors evenly spaced from the lower to the higher of the two anchors' promises (both included)."""
    anchors = [promised(r, promise, acc_key, count_key) for r in rows if r["is_anchor"]]
    if len(anchors) != 2 or None in anchors:
        raise ValueError(f"need two anchor rows with finite {acc_key}, got {anchors}")
    lo, hi = sorted(anchors)
    return sorted({min(max(float(f), lo), hi) for f in np.linspace(lo, hi, n)})


def sweep(rows: list[dict[str, Any]], floors: list[float], *, promise: Promise = Promise(), rank_by: str = "flops",
          max_latency_ms: float | None = None, acc_key: str = "acc_val", count_key: str = "n_val",
          latency_key: str = "latency_b1_ms", check_key: str | None = "acc_test") -> list[dict[str, Any]]:
    """Selector vs anchor-only baseline at each floor; ``check_key``: does the choice meet the floor there?"""
    kw = dict(promise=promise, max_latency_ms=max_latency_ms, rank_by=rank_by, acc_key=acc_key,
              count_key=count_key, latency_key=latency_key)
    anchors = [r for r in rows if r["is_anchor"]]
    out = []
    for f in floors:
        s, b, refusal = _try_select(rows, f, kw), _try_select(anchors, f, kw), None
        if s is None:
            try:
                select(rows, f, **kw)
            except FloorError as e:
                refusal = str(e)
        cheaper = s is not None and b is not None and s[rank_by] < b[rank_by]
        row = {"floor": f, "selected": s and s["name"], "selected_cost": s and s[rank_by],
               "selected_is_stitch": None if s is None else not s["is_anchor"],
               "baseline": b and b["name"], "baseline_cost": b and b[rank_by],
               "stitch_qualifies": cheaper,
               "saving": (1.0 - s[rank_by] / b[rank_by]) if s is not None and b is not None else None,
               "refusal": refusal}
        if check_key:
            row["selected_meets_on_check"] = None if s is None else bool(s[check_key] >= f)
            row["baseline_meets_on_check"] = None if b is None else bool(b[check_key] >= f)
        out.append(row)
    return out


def _try_select(rows: list[dict[str, Any]], floor: float, kw: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return select(rows, floor, **kw)
    except FloorError:
        return None


def summarize(sweep_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and means over the sweep: the promise kept on the check split, and the savings."""
    served = [r for r in sweep_rows if r["selected"] is not None]
    qual = [r for r in served if r["stitch_qualifies"]]
    checked = [r for r in served if r.get("selected_meets_on_check") is not None]
    base = [r for r in sweep_rows if r.get("baseline_meets_on_check") is not None]

    def pct(rows: list[dict[str, Any]], key: str) -> float | None:
        return 100.0 * sum(bool(r[key]) for r in rows) / len(rows) if rows else None

    def mean(vals: list[float]) -> float | None:
        return 100.0 * float(np.mean(vals)) if vals else None

    savings = [r["saving"] for r in qual]
    return {"floors": len(sweep_rows), "served": len(served), "refused": len(sweep_rows) - len(served),
            "percent_promise_kept": pct(checked, "selected_meets_on_check"),
            "percent_baseline_promise_kept": pct(base, "baseline_meets_on_check"),
            "floors_where_stitch_qualifies": len(qual),
            "mean_saving_percent_where_stitch_qualifies": mean(savings),
            "max_saving_percent": 100.0 * max(savings) if savings else None,
            "mean_saving_percent_all_served": mean([r["saving"] for r in served if r["saving"] is not None])}


def promise_interval(rows: list[dict[str, Any]], sweep_rows: list[dict[str, Any]], bits_key: str = "test_correct",
                     count_key: str = "n_test", n_boot: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """95 % paired-bootstrap interval of the kept-promise percentage (the choices fixed, the test images resampled)."""
    served = [r for r in sweep_rows if r["selected"] is not None]
    if not served or not all(bits_key in r for r in rows):
        return None
    names = sorted({r["selected"] for r in served})
    by_name = {r["name"]: r for r in rows}
    bits = np.stack([unpack_bits(by_name[n][bits_key], by_name[n][count_key]) for n in names])
    boot = bootstrap_accuracies(bits, n_boot, seed)                     # (n_boot, len(names))
    col = {n: i for i, n in enumerate(names)}
    idx = np.array([col[r["selected"]] for r in served])
    floors = np.array([r["floor"] for r in served])
    kept = 100.0 * (boot[:, idx] >= floors[None, :]).mean(axis=1)
    return {**interval95(kept), "n_boot": n_boot, "seed": seed}

