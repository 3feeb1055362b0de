"""l2cache's report figures and tables, from ``results/<gpu>/l2cache/{selection,verdict,ncu}.json``.

``PLOTS``: persist_weights' gain vs weight bytes over the carve-out; every policy's gain per selection workload with
the verdict's re-measured pairs. ``TABLES``: the verdict's pairs beside their selection figures, the chooser, ncu,
then the selection table.
"""
from __future__ import annotations

from pathlib import Path

from impl.common.plotting import pyplot, save_figure
from impl.l2cache.claims import SEED_GAIN_PCT


def _err(g: dict) -> tuple[float, float]:
    return g["gain_pct"] - g["lo_pct"], g["hi_pct"] - g["gain_pct"]


def plot_gain_vs_weights(view, out_dir: Path) -> list[Path]:
    """persist_weights' gain (95% interval) vs weight bytes / max carve-out: the ALBERT sweep, and every selection
    workload's best persisting policy."""
    sel = view.result("l2cache", "selection")
    if sel is None:
        return []
    data = sel["data"]
    carve = data["limits"]["max_persisting_bytes"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    pts = [p for p in (data.get("sweep") or {}).get("points", []) if p.get("gain")]
    if pts:
        ax.errorbar([p["weight_over_carveout"] for p in pts], [p["gain"]["gain_pct"] for p in pts],
                    yerr=list(zip(*[_err(p["gain"]) for p in pts])), fmt="o-", capsize=3,
                    label="ALBERT block, 12 layers (persist_weights)")
    for policy, marker in (("persist_weights", "s"), ("persist_prefetch", "D")):
        rows = [r for r in data["table"] if r["policy"] == policy and r["gain_pct"] is not None and not r["excluded"]]
        if rows:
            ax.errorbar([r["persist_bytes"] / carve for r in rows], [r["gain_pct"] for r in rows],
                        yerr=[[r["gain_pct"] - r["lo_pct"] for r in rows], [r["hi_pct"] - r["gain_pct"] for r in rows]],
                        fmt=marker, capsize=3, label=f"selection workloads: {policy}")
            for r in rows:
                ax.annotate(r["workload"], (r["persist_bytes"] / carve, r["gain_pct"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(SEED_GAIN_PCT, color="red", lw=0.8, ls="--", label=f"seed gain {SEED_GAIN_PCT}%")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("persisted bytes (the window) / max persisting carve-out")
    ax.set_ylabel("batch-1 latency gain vs default (%), 95% CI")
    ax.set_title(f"L2 persistence on {view.slug} (selection run)")
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir / "l2cache_gain_vs_weights.png")


def plot_policy_table(view, out_dir: Path) -> list[Path]:
    """Every policy's gain on every selection workload (bars, 95% intervals), and the verdict's re-measured pairs."""
    sel = view.result("l2cache", "selection")
    if sel is None or not sel["data"]["table"]:
        return []
    rows = [r for r in sel["data"]["table"] if r["policy"] != "default"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.5 * len(workloads)), 4.4))
    width = 0.8 / max(len(policies), 1)
    for j, p in enumerate(policies):
        xs, ys, lo, hi = [], [], [], []
        for i, w in enumerate(workloads):
            r = next((r for r in rows if r["workload"] == w and r["policy"] == p), None)
            if r is None or r["excluded"] or r["gain_pct"] is None:
                continue
            xs.append(i + j * width)
            ys.append(r["gain_pct"])
            lo.append(r["gain_pct"] - r["lo_pct"])
            hi.append(r["hi_pct"] - r["gain_pct"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=p)
    ver = view.result("l2cache", "verdict")
    for key, r in ((ver or {}).get("data", {}).get("results") or {}).items():
        if r.get("gain") and r["workload"] in workloads:
            i = workloads.index(r["workload"]) + (policies.index(r["policy"]) if r["policy"] in policies else 0) * width
            lo_, hi_ = _err(r["gain"])
            ax.errorbar([i], [r["gain"]["gain_pct"]], yerr=[[lo_], [hi_]], fmt="k*", ms=9, capsize=4)
    ax.plot([], [], "k*", label="verdict run (re-measured)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads, rotation=20, fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(SEED_GAIN_PCT, color="red", lw=0.8, ls="--")
    ax.set_ylabel("latency gain vs default (%), 95% CI")
    ax.set_title("batch-1 latency gain per workload and policy")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, out_dir / "l2cache_policy_table.png")


PLOTS = [plot_gain_vs_weights, plot_policy_table]


def _ci(g: dict | None) -> str:
    return f"{g['gain_pct']:+.2f} [{g['lo_pct']:+.2f}, {g['hi_pct']:+.2f}]" if g else "—"


def run_tables(view) -> list[str]:
    """The verdict's re-measured pairs next to their selection figures, the chooser, ncu; then the selection table."""
    lines: list[str] = []
    ver, sel = view.result("l2cache", "verdict"), view.result("l2cache", "selection")
    if ver is not None:
        d = ver["data"]
        lines += [f"**verdict run** {d.get('verdict_run')} of selection run {d.get('selected_in_run')} "
                  f"({ver.get('device', '?')}, commit {ver.get('commit', '?')}; restored: {d.get('restored')})", "",
                  "| pick | workload | policy | selection gain % [95% CI] | verdict gain % [95% CI] "
                  "| rounds × requests | bit-identical |", "|---|---|---|---|---|---|---|"]
        for key, r in (d.get("results") or {}).items():
            if not r.get("workload"):
                lines.append(f"| {key} | — | — | — | {r.get('skipped', 'not measured')} | — | — |")
                continue
            g, sg = r.get("gain"), r.get("selection_gain")
            sg = sg if sg and sg.get("lo_pct") is not None else None
            size = f"{g['rounds']} × {g['requests']}" if g else "—"
            lines.append(f"| {key} | {r['workload']} | {r['policy']} | {_ci(sg)} | {_ci(g)} | {size} | "
                         f"{'yes' if r.get('bit_identical') else 'NO'} |")
        for c in d.get("chooser") or []:
            lines.append(f"- chooser on {c['workload']}: chose {c['chosen']}, offline best {c['offline_best']}"
                         f" ({'match' if c['matches'] else 'MISMATCH'})")
        lines.append("")
    ncu = view.result("l2cache", "ncu")
    for key, p in ((ncu or {}).get("data", {}).get("profiles") or {}).items():
        if p.get("default_dram_read_bytes") is None:
            lines.append(f"- ncu {key}: {p.get('error') or p.get('skipped')}")
            continue
        lines.append(f"- ncu {key} ({p['workload']} / {p['policy']}, {p['requests']} requests each): DRAM read "
                     f"{p['default_dram_read_bytes'] / 1e6:.1f} -> {p['policy_dram_read_bytes'] / 1e6:.1f} MB per "
                     f"request ({p['dram_read_drop_pct']:+.1f}%, worst pair {p['dram_read_drop_lo_pct']:+.1f}%), "
                     f"L2 hit {p['default_l2_hit_pct']:.1f} -> {p['policy_l2_hit_pct']:.1f}%")
    if sel is not None and sel["data"].get("table_md"):
        lines += ["", f"**selection run** {sel['data'].get('run_id')} ({sel.get('device', '?')}, commit "
                  f"{sel.get('commit', '?')})", "", *sel["data"]["table_md"].splitlines(), ""]
    return lines


TABLES = [run_tables]
