"""The selector: the lightest configuration that meets an accuracy constraint (and optionally a latency budget).

Rows are dicts with at least ``name``, ``flops``, ``is_anchor`` and the accuracy key (``acc_val``: measured on the
validation split held out of training). For a constraint ``min_acc`` (and ``max_latency_ms``)

    select(rows) = argmin_{r : r.acc ≥ min_acc, r.latency ≤ max_latency_ms} (r.flops, −r.acc, r.name)

or None when no row qualifies. The anchor-only baseline is ``select`` over the two anchor rows. Because the family's
rows include the anchors, the selection is never heavier than the baseline's on the data it was chosen on; it is
strictly lighter whenever a stitch lighter than the baseline's anchor meets the constraint.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np


def select(rows: Iterable[dict[str, Any]], min_acc: float, max_latency_ms: float | None = None,
           acc_key: str = "acc_val", latency_key: str = "latency_b1_ms") -> dict[str, Any] | None:
    """The lightest row with ``acc ≥ min_acc`` (and ``latency ≤ max_latency_ms``); ties: higher accuracy, name."""
    feasible = []
    for r in rows:
        acc = r[acc_key]
        if acc is None or not np.isfinite(acc) or acc < min_acc:
            continue
        if max_latency_ms is not None:
            lat = r.get(latency_key)
            if lat is None or not np.isfinite(lat) or lat > max_latency_ms:
                continue
        feasible.append(r)
    if not feasible:
        return None
    return min(feasible, key=lambda r: (r["flops"], -r[acc_key], r["name"]))


def constraint_grid(rows: list[dict[str, Any]], n: int = 41, acc_key: str = "acc_val") -> list[float]:
    """Accuracy constraints the anchor baseline can meet: n evenly spaced from the lowest accuracy of any row to the
    best anchor's (rounded to 6 digits, never above the best anchor's), plus every row accuracy in that range, exact
    (the points where a choice changes; rounded, 0.1171875 became 0.117188, which no row meets)."""
    best_anchor = max(r[acc_key] for r in rows if r["is_anchor"])
    lowest = min(r[acc_key] for r in rows)
    grid = {min(g, best_anchor) for g in np.linspace(lowest, best_anchor, n).round(6).tolist()}
    grid |= {r[acc_key] for r in rows if lowest <= r[acc_key] <= best_anchor}
    return sorted(grid)


def sweep(rows: list[dict[str, Any]], constraints: list[float], max_latency_ms: float | None = None,
          acc_key: str = "acc_val", latency_key: str = "latency_b1_ms",
          check_key: str | None = "acc_test") -> list[dict[str, Any]]:
    """Selector vs anchor-only baseline at each constraint; ``check_key`` also reports whether each choice meets the
    constraint on another split (the test split: does the choice generalise?)."""
    anchors = [r for r in rows if r["is_anchor"]]
    out = []
    for c in constraints:
        s = select(rows, c, max_latency_ms, acc_key, latency_key)
        b = select(anchors, c, max_latency_ms, acc_key, latency_key)
        between = [r for r in rows if not r["is_anchor"] and b is not None and r["flops"] < b["flops"]
                   and r[acc_key] >= c and (max_latency_ms is None or r[latency_key] <= max_latency_ms)]
        row = {"min_acc": c, "selected": s and s["name"], "selected_flops": s and s["flops"],
               "baseline": b and b["name"], "baseline_flops": b and b["flops"],
               "lighter_or_equal": None if s is None or b is None else s["flops"] <= b["flops"],
               "strictly_lighter": None if s is None or b is None else s["flops"] < b["flops"],
               "stitch_lighter_than_baseline_exists": bool(between)}
        if check_key:
            row["selected_meets_on_check"] = None if s is None else s[check_key] >= c
            row["baseline_meets_on_check"] = None if b is None else b[check_key] >= c
        out.append(row)
    return out


def summarize(sweep_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fractions over the constraints the baseline can meet."""
    valid = [r for r in sweep_rows if r["lighter_or_equal"] is not None]
    between = [r for r in valid if r["stitch_lighter_than_baseline_exists"]]
    saving = [1 - r["selected_flops"] / r["baseline_flops"] for r in valid]

    def frac(rows: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    out = {"constraints": len(sweep_rows), "baseline_feasible": len(valid),
           "fraction_lighter_or_equal": frac(valid, "lighter_or_equal"),
           "fraction_strictly_lighter": frac(valid, "strictly_lighter"),
           "constraints_with_lighter_stitch": len(between),
           "fraction_strictly_lighter_where_stitch_between": frac(between, "strictly_lighter"),
           "mean_flops_saving": float(np.mean(saving)) if saving else None,
           "max_flops_saving": float(np.max(saving)) if saving else None,
           "selected_meets_on_test": frac(valid, "selected_meets_on_check"),
           "baseline_meets_on_test": frac(valid, "baseline_meets_on_check")}
    for k in ("fraction_lighter_or_equal", "fraction_strictly_lighter",
              "fraction_strictly_lighter_where_stitch_between"):
        out[k.replace("fraction", "percent")] = None if out[k] is None else 100.0 * out[k]
    return out
