"""The join's ledger entries (issue 4) and its plots.

How the comparisons were chosen:
  * ``join.hash_1m_us``: the issue's target, build + probe + materialize of the CUDA C++ hash join (``cuda-total``:
    exact-size output, one host sync for the size) <= 60 µs; seed 90.65 µs.
  * ``join.triton_1m_ms``: the seed's tensor-core join took 13.78 ms; ours must land within 10x of the hash join's
    60 µs target, i.e. <= 0.6 ms (the ratio claim below checks the same thing against the measured hash join).
  * ``join.tc_vs_hash_ratio``: tensor-core / hash time at 1M x 1M <= 10 (seed 150).
  * Occupancies (achieved, ``sm__warps_active.avg.pct_of_peak_sustained_active``, kernel-time-weighted over the join's
    own kernels, from Nsight Compute): occupancy is a diagnostic, not a goal, so each claim only asks for at least
    the seed's figure — the hash join's >= 74.14% (the seed's hash kernel), the tensor-core join's >= 18.67% (the
    seed's, whose low occupancy was its explanation of the 150x). A fail is then informative, not a regression.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from impl.common.ledger import BenchRatio, BenchStat, Claim, ResultValue
from impl.common.plotting import pyplot, save_figure

HASH_1M = "test_join_hash[cuda-total-1M]"
TC_1M = "test_join_tc[total-1M]"

CLAIMS = [
    Claim(id="join.hash_1m_us", system="join",
          statement="CUDA C++ hash join of 1M x 1M int32 rows (unique build keys, ~50% probe hits), build + probe + "
                    "exact-size materialize",
          unit="µs", comparison="<=", target=60.0, measure=BenchStat(HASH_1M, scale=1e6), seed_value=90.65),
    Claim(id="join.triton_1m_ms", system="join",
          statement="Tensor-core (Triton tl.dot) join of the same 1M x 1M tables, end to end",
          unit="ms", comparison="<=", target=0.6, measure=BenchStat(TC_1M, scale=1e3), seed_value=13.78),
    Claim(id="join.tc_vs_hash_ratio", system="join",
          statement="Tensor-core join time / CUDA hash join time at 1M x 1M",
          unit="x", comparison="<=", target=10.0, measure=BenchRatio(TC_1M, HASH_1M), seed_value=150.0),
    Claim(id="join.hash_occupancy", system="join",
          statement="Achieved occupancy of the CUDA C++ hash join's kernels at 1M x 1M (ncu, time-weighted), at "
                    "least the seed's",
          unit="%", comparison=">=", target=74.14, measure=ResultValue("join", "ncu", "hash_cuda.occupancy_pct"),
          seed_value=74.14),
    Claim(id="join.tc_occupancy", system="join",
          statement="Achieved occupancy of the tensor-core join's kernels at 1M x 1M (ncu, time-weighted), at least "
                    "the seed's",
          unit="%", comparison=">=", target=18.67, measure=ResultValue("join", "ncu", "tc_triton.occupancy_pct"),
          seed_value=18.67),
]

IMPL_ORDER = ("hash-cuda", "hash-numba", "tc-triton", "sortmerge-torch", "pandas", "duckdb", "polars")
PHASES = ("build", "probe", "materialize")


def _join_benches(view: Any) -> list[dict[str, Any]]:
    seen, out = set(), []
    for e in view.benches.values():
        if e["name"].startswith("test_join_") and e["fullname"] not in seen and e.get("stats"):
            seen.add(e["fullname"])
            out.append(e)
    return out


def plot_time_vs_rows(view: Any, out_dir: Path) -> list[Path]:
    """End-to-end time vs rows per side (uniform case, log-log), one line per implementation."""
    series: dict[str, dict[int, float]] = {}
    for e in _join_benches(view):
        x = e.get("extra_info") or {}
        if x.get("kind") == "uniform" and x.get("phase") == "total" and x.get("impl") in IMPL_ORDER:
            series.setdefault(x["impl"], {})[int(x["n"])] = e["stats"]["median"] * 1e6
    if not series:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in IMPL_ORDER:
        if name in series:
            pts = sorted(series[name].items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="rows per side (build = probe)", ylabel="median time (µs)",
           title=f"Inner join, unique build keys, ~50% probe hits ({view.slug})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = out_dir / "join_time_vs_rows.png"
    return save_figure(fig, path)


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


PLOTS = [plot_time_vs_rows, plot_phases_1m, plot_ncu]
