"""seam's figures and tables, from the stored results (``results/<gpu>/seam/*.json``).

``PLOTS``: the family's accuracy against FLOPs and measured latency; the selector's sweep (the recipe draws the same
two figures into its out folder). ``TABLES``: the anchors per seed, the whole recipe's time, the selector's bound.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from impl.common.plotting import pyplot, save_figure

COSTS = (("flops", 1e-9, "GFLOPs per image (torch.utils.flop_counter)"),
         ("latency_b1_ms", 1.0, "latency at batch 1 (ms, device time)"),
         ("latency_b256_ms", 1.0, "latency at batch 256 (ms, device time)"))


def plot_accuracy_vs_cost(configs: dict[str, Any], interp: dict[str, Any] | None, anchors: dict[str, Any] | None,
                          path: Path) -> Path:
    """Test accuracy against each cost in ``COSTS`` that the rows carry: the family's anchors (stars) with the seed
    runs' mean and 95 % interval beside them, the anchors' line, every stitch (o interpolates, x does not)."""
    plt = pyplot()
    rows = configs["rows"]
    costs = [c for c in COSTS if all(c[0] in r and r[c[0]] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(costs), figsize=(6.2 * len(costs), 4.8), squeeze=False)
    verdict = (interp or {}).get("per_stitch", {})
    seeds = (anchors or {}).get("per_arch", {})
    for ax, (key, scale, label) in zip(axes[0], costs):
        for r in rows:
            if r["is_anchor"]:
                continue
            ok = verdict.get(r["name"], {}).get("interpolates", True)
            ax.scatter([r[key] * scale], [100 * r["acc_test"]], s=28, color="tab:blue" if ok else "tab:red",
                       marker="o" if ok else "x")
            ax.annotate(str(r.get("point", r["name"])), (r[key] * scale, 100 * r["acc_test"]), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
        family_anchors = sorted((r for r in rows if r["is_anchor"]), key=lambda r: r["flops"])
        ax.plot([r[key] * scale for r in family_anchors], [100 * r["acc_test"] for r in family_anchors], "k--", lw=1)
        for r in family_anchors:
            ax.scatter([r[key] * scale], [100 * r["acc_test"]], s=110, marker="*", color="black", zorder=3)
            ax.annotate(f"{r['name']} (family)", (r[key] * scale, 100 * r["acc_test"]), xytext=(4, -11),
                        textcoords="offset points", fontsize=7)
            t = (seeds.get(r["name"]) or {}).get("test_pct")
            if t and t.get("lo") is not None:
                ax.errorbar([r[key] * scale], [t["mean"]], yerr=[[t["mean"] - t["lo"]], [t["hi"] - t["mean"]]],
                            fmt="s", color="tab:gray", ms=4, capsize=4, zorder=2)
                ax.annotate(f"{r['name']}: {t['n']} seeds, 95 % CI", (r[key] * scale, t["lo"]), xytext=(4, -2),
                            textcoords="offset points", fontsize=6, color="tab:gray")
        if interp and key == "flops":
            tol = 100 * interp["rule"]["tol"]
            ax.plot([r[key] * scale for r in family_anchors], [100 * r["acc_test"] - tol for r in family_anchors],
                    "k:", lw=0.8, label=f"line − {tol:.2f} pp (tolerance)")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    if interp and interp.get("percent") is not None:
        cons = interp.get("interpolating_conservative")
        fig.suptitle(f"{interp['interpolating']}/{interp['stitches']} stitches interpolate ({interp['percent']:.1f} %"
                     + (f"; {cons} at each stitch's lower 95 % end" if cons is not None else "") + ")", fontsize=10)
    return save_figure(fig, path, dpi=120)[0]


def plot_selector_sweep(selector: dict[str, Any], path: Path) -> Path:
    """Cost served against the accuracy floor: the family's selector and the anchor-only baseline; refused floors
    and floors whose choice misses the floor on the test split marked."""
    plt = pyplot()
    rows = [r for r in selector["sweep"] if r["selected_cost"] is not None and r["baseline_cost"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    f = [100 * r["floor"] for r in rows]
    ax.step(f, [r["baseline_cost"] / 1e9 for r in rows], where="post", color="black",
            label="anchor-only baseline")
    ax.step(f, [r["selected_cost"] / 1e9 for r in rows], where="post", color="tab:blue", label="selector")
    miss = [r for r in rows if r.get("selected_meets_on_check") is False]
    if miss:
        ax.scatter([100 * r["floor"] for r in miss], [r["selected_cost"] / 1e9 for r in miss], marker="x",
                   color="tab:red", zorder=3, label="misses the floor on test")
    s = selector["summary"]
    ci = s.get("promise_ci95") or {}
    ax.set_title(f"promise kept on test: {s['percent_promise_kept'] or 0:.0f} % of {s['served']} served floors"
                 + (f" (95 % interval {ci['lo']:.0f}–{ci['hi']:.0f})" if ci else "")
                 + f"; mean saving {s['mean_saving_percent_where_stitch_qualifies'] or 0:.1f} %", fontsize=9)
    ax.set_xlabel("accuracy floor (%), promised from the validation split")
    ax.set_ylabel("GFLOPs of the served model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=130)[0]


def plot_family(view, out_dir: Path) -> list[Path]:
    """Accuracy against FLOPs and latency, with the anchors' seed intervals (results/<gpu>/seam/*.json)."""
    configs, interp, anchors = (view.result("seam", n) for n in ("configs", "interpolation", "anchors"))
    if configs is None:
        return []
    return [plot_accuracy_vs_cost(configs["data"], interp and interp["data"], anchors and anchors["data"],
                                  Path(out_dir) / "seam_acc_vs_flops.png")]


def plot_selector(view, out_dir: Path) -> list[Path]:
    """Served GFLOPs against the accuracy floor, selector vs anchor-only baseline."""
    selector = view.result("seam", "selector")
    if selector is None or "floors" not in selector["data"]:
        return []
    return [plot_selector_sweep(selector["data"], Path(out_dir) / "seam_selector.png")]


def seam_tables(view) -> list[str]:
    """The anchors per seed (mean and 95 % interval), the whole recipe's time, and the selector's bound."""
    anchors, training, configs = (view.result("seam", n) for n in ("anchors", "training", "configs"))
    lines: list[str] = []
    if anchors and isinstance(anchors.get("data"), dict) and anchors["data"].get("per_arch"):
        d = anchors["data"]
        lines += ["| anchor | seeds | test accuracy per seed (%) | mean (%) | 95 % interval | range (pp) |",
                  "|---|---|---|---|---|---|"]
        for name, p in d["per_arch"].items():
            t = p["test_pct"]
            ci = f"{t['lo']:.2f} – {t['hi']:.2f}" if t.get("lo") is not None else "–"
            lines.append(f"| {name} | {t['n']} | {', '.join(f'{100 * a:.2f}' for a in p['acc_test'])} | "
                         f"{t['mean']:.2f} | {ci} | {t['range']:.2f} |")
        lines.append("")
    if training and isinstance(training.get("data"), dict) and "anchors_s" in training["data"]:
        t = training["data"]
        lines.append(f"Whole recipe (every anchor seed, stitch init, family fine-tune, BatchNorm statistics, "
                     f"evaluation): **{t['recipe_total_s']:.0f} s** on {training.get('device')} (anchors "
                     f"{t['anchors_s']:.0f} s, family {t['family']['seconds']:.0f} s), "
                     f"{'complete' if t.get('complete') else 'unfinished'} run.")
        lines.append("")
    if configs and isinstance(configs.get("data"), dict) and configs["data"].get("rows"):
        anchors_rows = sorted((r for r in configs["data"]["rows"] if r["is_anchor"]), key=lambda r: r["flops"])
        if len(anchors_rows) == 2:
            bound = 100 * (1 - anchors_rows[0]["flops"] / anchors_rows[1]["flops"])
            light, heavy = (r["name"] for r in anchors_rows)
            lines.append(f"No stitch inside the anchors' FLOPs range can save more than 1 − F({light})/F({heavy}) = "
                         f"{bound:.1f} % against the heavier anchor.")
            lines.append("")
    return lines


PLOTS = [plot_family, plot_selector]
TABLES = [seam_tables]
