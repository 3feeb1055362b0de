"""l2cache's ledger entries and plots (from ``results/<gpu>/l2cache/{policies,sweep,ncu}.json``)."""
from __future__ import annotations

from pathlib import Path

from impl.common.ledger import Claim, ResultValue
from impl.common.plotting import pyplot, save_figure

CLAIMS = [
    Claim(id="l2cache.best_gain_pct", system="l2cache",
          statement="On at least one weight-shared workload, the best L2 policy cuts batch-1 latency by >= 8.27% "
                    "against the default policy (carve-out 0, no window) on the H100",
          unit="%", comparison=">=", target=8.27, measure=ResultValue("l2cache", "policies", "best.gain_pct"),
          seed_value=8.27, seed_unit="%"),
    Claim(id="l2cache.prefetch_gain_pct", system="l2cache",
          statement="Dynamic prefetch alone (a side stream reads the next layer's weights into L2 during the current "
                    "layer) lowers batch-1 latency on its best workload",
          unit="%", comparison=">", target=0.0, measure=ResultValue("l2cache", "policies", "prefetch_best.gain_pct")),
    Claim(id="l2cache.dram_read_drop", system="l2cache",
          statement="ncu DRAM bytes read per request fall with the best policy on the best workload "
                    "(--cache-control none)",
          unit="%", comparison=">", target=0.0, measure=ResultValue("l2cache", "ncu", "best.dram_read_drop_pct")),
]


def plot_gain_vs_weights(view, out_dir: Path) -> list[Path]:
    """Latency gain of persist_weights vs weight bytes / max carve-out: the MLP sweep and every workload."""
    sweep, pol = view.result("l2cache", "sweep"), view.result("l2cache", "policies")
    if sweep is None and pol is None:
        return []
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if sweep is not None and sweep["data"]["points"]:
        pts = sweep["data"]["points"]
        ax.plot([p["weight_over_carveout"] for p in pts], [p["gain_pct"] for p in pts], "o-",
                label="shared MLP sweep (persist_weights)")
    if pol is not None:
        for policy, marker in (("persist_weights", "s"), ("prefetch", "^"), ("stream_activations", "v")):
            rows = [r for r in pol["data"]["table"] if r["policy"] == policy and r["applicable"]]
            ax.scatter([r["weight_over_carveout"] for r in rows], [r["gain_pct"] for r in rows], marker=marker,
                       label=f"workloads: {policy}")
            if policy == "persist_weights":
                for r in rows:
                    ax.annotate(r["workload"], (r["weight_over_carveout"], r["gain_pct"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(8.27, color="red", lw=0.8, ls="--", label="seed gain 8.27%")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("weight bytes / max persisting carve-out")
    ax.set_ylabel("batch-1 latency gain vs default (%)")
    ax.set_title(f"L2 policies on {view.slug}")
    ax.legend(fontsize=7)
    path = out_dir / "l2cache_gain_vs_weights.png"
    return save_figure(fig, path)


def plot_policy_table(view, out_dir: Path) -> list[Path]:
    """Gain of every policy on every workload (bars), the table's picture."""
    pol = view.result("l2cache", "policies")
    if pol is None or not pol["data"]["table"]:
        return []
    plt = pyplot()

    rows = pol["data"]["table"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows) if p != "default"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(workloads)), 4))
    width = 0.8 / max(len(policies), 1)
    for j, p in enumerate(policies):
        vals = [next((r["gain_pct"] if r["applicable"] else 0.0 for r in rows
                      if r["workload"] == w and r["policy"] == p), 0.0) for w in workloads]
        ax.bar([i + j * width for i in range(len(workloads))], vals, width, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads, rotation=20, fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("latency gain vs default (%)")
    ax.set_title("batch-1 latency gain per workload and policy")
    ax.legend(fontsize=7)
    path = out_dir / "l2cache_policy_table.png"
    return save_figure(fig, path)


PLOTS = [plot_gain_vs_weights, plot_policy_table]
