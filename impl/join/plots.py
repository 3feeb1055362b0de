"""The join's report figures and tables, from its stored benches and ``results/<gpu>/join/ncu.json``.

``PLOTS``: end-to-end time vs rows per side, the 1M x 1M phase split, and occupancy / SM throughput per kernel (ncu).
``TABLES``: rows/s and % of the compulsory-bytes bound per scaling point; the tensor-core join by phase.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from impl.common.plotting import pyplot, save_figure

IMPL_ORDER = ("hash-cuda", "hash-numba", "tc-triton", "sortmerge-torch", "pandas", "duckdb", "polars")
PHASES = ("build", "probe", "materialize")


def _join_benches(view: Any) -> list[dict[str, Any]]:
    seen, out = set(), []
    for e in view.benches.values():
        if e["name"].startswith("test_join_") and e["fullname"] not in seen and e.get("stats"):
            seen.add(e["fullname"])
            out.append(e)
    return out


def _scaling_points(view: Any) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """{(impl, dtype): {rows per side: bench entry}} of the end-to-end uniform benches."""
    series: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for e in _join_benches(view):
        x = e.get("extra_info") or {}
        if x.get("kind") == "uniform" and x.get("phase") == "total" and x.get("impl") in IMPL_ORDER:
            series.setdefault((x["impl"], x.get("dtype", "int32")), {})[int(x["n"])] = e
    return series


def plot_time_vs_rows(view: Any, out_dir: Path) -> list[Path]:
    """End-to-end time vs rows per side (uniform case, log-log): hash, tensor-core, sort-merge and host anchors;
    int32 keys solid, int64 dashed."""
    series = _scaling_points(view)
    if not series:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {name: f"C{i}" for i, name in enumerate(IMPL_ORDER)}
    for (name, dtype), pts in sorted(series.items(), key=lambda kv: (IMPL_ORDER.index(kv[0][0]), kv[0][1])):
        xs = sorted(pts)
        ax.plot(xs, [pts[x]["stats"]["median"] * 1e6 for x in xs], marker="o", color=colors[name],
                linestyle="-" if dtype == "int32" else "--", label=f"{name} ({dtype})")
    ax.set(xscale="log", yscale="log", xlabel="rows per side (build = probe)", ylabel="median time (µs)",
           title=f"Inner join, unique build keys, ~50% probe hits ({view.slug})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    path = out_dir / "join_time_vs_rows.png"
    return save_figure(fig, path)


def scaling_table(view: Any) -> list[str]:
    """Rows/s and % of the compulsory-bytes bound (the calibrated copy bandwidth) per scaling point."""
    series = _scaling_points(view)
    if not series:
        return []
    lines = ["**Join scaling** (uniform keys, end to end; % of bound = compulsory bytes / time vs copy bandwidth)", "",
             "| join | keys | rows per side | median | rows/s (both sides) | % of bound | launches | host syncs |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, dtype), pts in sorted(series.items(), key=lambda kv: (IMPL_ORDER.index(kv[0][0]), kv[0][1])):
        for n in sorted(pts):
            e = pts[n]
            x, med = e.get("extra_info") or {}, e["stats"]["median"]
            pct = x.get("pct_peak_bw")
            lines.append(f"| {name} | {dtype} | {n:,} | {med * 1e6:,.1f} µs | {2 * n / med:.3g} | "
                         f"{'-' if pct is None else f'{pct:.1f}%'} | {x.get('launches', '-')} | "
                         f"{x.get('host_syncs', '-')} |")
    return lines + [""]


def plot_phases_1m(view: Any, out_dir: Path) -> list[Path]:
    """Build / probe / materialize split of each GPU join at 1M x 1M (each phase benched on its own)."""
    split: dict[str, dict[str, float]] = {}
    for e in _join_benches(view):
        x = e.get("extra_info") or {}
        if x.get("case") == "1M" and x.get("phase") in PHASES:
            split.setdefault(x["impl"], {})[x["phase"]] = e["stats"]["median"] * 1e6
    names = [n for n in IMPL_ORDER if n in split]
    if not names:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    left = [0.0] * len(names)
    for phase in PHASES:
        vals = [split[n].get(phase, 0.0) for n in names]
        ax.barh(names, vals, left=left, label=phase)
        left = [a + b for a, b in zip(left, vals)]
    ax.set(xlabel="median time per phase, stacked (µs)", title="1M x 1M: time by phase (each phase benched alone)")
    ax.legend()
    path = out_dir / "join_phases_1m.png"
    return save_figure(fig, path)


def plot_ncu(view: Any, out_dir: Path) -> list[Path]:
    """Achieved occupancy and SM throughput of every profiled join kernel (Nsight Compute)."""
    rec = view.result("join", "ncu")
    if not rec:
        return []
    rows = [(f"{who}:{k['kernel']}", k.get("sm__warps_active.avg.pct_of_peak_sustained_active", 0.0),
             k.get("sm__throughput.avg.pct_of_peak_sustained_elapsed", 0.0))
            for who, d in rec["data"].items() if isinstance(d, dict) and "kernels" in d
            for k in d["kernels"] if k.get("own")]
    if not rows:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [r[1] for r in rows], height=0.4, label="achieved occupancy %")
    ax.barh([i + 0.2 for i in y], [r[2] for r in rows], height=0.4, label="SM throughput % of peak")
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=7)
    ax.set(xlim=(0, 100), xlabel="%", title="Join kernels at 1M x 1M (ncu)")
    ax.legend(fontsize=7)
    path = out_dir / "join_ncu.png"
    return save_figure(fig, path)


def tc_table(view: Any) -> list[str]:
    """The tensor-core join at 1M x 1M by phase: time, tl.dot FLOPs issued, FLOPs per useful comparison (one that
    found a pair), achieved TFLOP/s, launches and host syncs."""
    rows = {}
    for e in _join_benches(view):
        x = e.get("extra_info") or {}
        if x.get("impl") == "tc-triton" and x.get("case") == "1M":
            rows[x.get("phase")] = e
    if not rows:
        return []
    lines = ["**Tensor-core join, 1M x 1M by phase** (FLOPs: tl.dot work issued; useful comparison: one that found a "
             "pair, worth 2·KBITS FLOPs)", "",
             "| phase | median | FLOPs issued | FLOPs / useful comparison | TFLOP/s | launches | host syncs |",
             "|---|---|---|---|---|---|---|"]
    for phase in ("partition", "probe", "materialize", "total"):
        if phase not in rows:
            continue
        x, med = rows[phase].get("extra_info") or {}, rows[phase]["stats"]["median"]
        flops = x.get("flops") or 0
        per = x.get("flops_per_useful_comparison")
        lines.append(f"| {phase} | {med * 1e6:,.1f} µs | {flops / 1e9:.2f} G | "
                     f"{'-' if not flops or per is None else f'{per:,.0f}'} | "
                     f"{'-' if not flops else f'{flops / med / 1e12:.1f}'} | {x.get('launches', '-')} | "
                     f"{x.get('host_syncs', '-')} |")
    return lines + [""]


PLOTS = [plot_time_vs_rows, plot_phases_1m, plot_ncu]
TABLES = [scaling_table, tc_table]
