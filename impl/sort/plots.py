"""The sort's report figures, from its stored benches and ``results/<gpu>/sort/passes.json``.

``PLOTS``: median time vs n of every variant and anchor (keys / key-value, float32 / int32); the per-pass share of
the copy bandwidth of the 10M float32 sort.
"""
from __future__ import annotations

from pathlib import Path

from impl.common.plotting import pyplot, save_figure

_STYLE = {"shared": "-o", "shared_direct": "--o", "global": "-s", "cupy": "-^", "torch": "-v",
          "numpy_quicksort": ":x", "numpy_stable": ":+"}


def _series(view, mode: str, dtype: str) -> dict[str, list[tuple[int, float]]]:
    """variant -> [(n, median seconds)] of the sort benches of one (mode, dtype); torch (always key+index) in kv."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name, e in view.benches.items():
        x = e.get("extra_info") or {}
        if not name.startswith("test_sort_") or "[" not in name or x.get("dtype") != dtype:
            continue
        if x.get("variant") not in _STYLE or x.get("mode") != mode:
            continue
        out.setdefault(x["variant"], []).append((int(x["n"]), float(e["stats"]["median"])))
    return {v: sorted(set(pts)) for v, pts in out.items()}


def plot_time_vs_n(view, out_dir: Path) -> list[Path]:
    """Median time vs n (log-log) of every variant and anchor, one panel per (keys/kv, dtype)."""
    panels = [(m, d) for m in ("keys", "kv") for d in ("float32", "int32")]
    data = {p: _series(view, *p) for p in panels}
    if not any(data.values()):
        return []
    plt = pyplot()

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (mode, dtype) in zip(axes.flat, panels):
        for variant, pts in sorted(data[(mode, dtype)].items()):
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], _STYLE[variant], label=variant)
        ax.set(xscale="log", yscale="log", title=f"{mode} · {dtype}", xlabel="keys", ylabel="median ms")
        ax.grid(True, which="both", alpha=0.3)
        if data[(mode, dtype)]:
            ax.legend(fontsize=8)
    fig.suptitle("sort: time vs n (bitonic variants and anchors)")
    path = out_dir / "sort_time_vs_n.png"
    return save_figure(fig, path, dpi=110)


def plot_passes(view, out_dir: Path) -> list[Path]:
    """Per-pass % of copy bandwidth of the 10M float32 sort (experiment ``passes``)."""
    rec = view.result("sort", "passes")
    if not rec or not rec["data"].get("keys"):
        return []
    plt = pyplot()

    rows = rec["data"]["keys"]["passes"]
    fig, ax = plt.subplots(figsize=(11, 4))
    colors = {"tile": "tab:blue", "coset": "tab:orange", "wide": "tab:orange", "register": "tab:green"}
    ax.bar(range(len(rows)), [r["pct_copy_bw"] for r in rows], color=[colors.get(r["kind"], "gray") for r in rows])
    ax.axhline(75, color="k", lw=0.8, ls="--")
    ax.set(xlabel="pass (blue: block sort, orange: merge)", ylabel="% of copy bandwidth",
           title=f"10M float32 keys: {len(rows)} passes, {rec['data']['keys']['total_ms']:.3f} ms summed")
    path = out_dir / "sort_passes.png"
    return save_figure(fig, path, dpi=110)


PLOTS = [plot_time_vs_n, plot_passes]
