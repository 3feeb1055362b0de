"""Plots from the stored results: accuracy vs FLOPs of the family, and the selector's sweep against the baseline."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from impl.common.plotting import pyplot, save_figure


def plot_accuracy_vs_flops(configs: dict[str, Any], interp: dict[str, Any] | None, path: Path,
                           title: str = "") -> Path:
    """Test accuracy vs GFLOPs: anchors, the line joining them, stitches coloured by direction and verdict."""
    plt = pyplot()
    rows = configs["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    verdict = (interp or {}).get("per_stitch", {})
    directions = sorted({(r["front"], r["back"]) for r in rows if not r["is_anchor"]})
    colors = dict(zip(directions, ("tab:blue", "tab:orange", "tab:green", "tab:purple")))
    for d in directions:
        pts = [r for r in rows if not r["is_anchor"] and (r["front"], r["back"]) == d]
        for ok in (True, False):
            sel = [r for r in pts if verdict.get(r["name"], {}).get("interpolates", True) == ok]
            if sel:
                ax.scatter([r["flops"] / 1e9 for r in sel], [100 * r["acc_test"] for r in sel], s=28,
                           color=colors[d], marker="o" if ok else "x",
                           label=f"{d[0]}→{d[1]} stitch" + ("" if ok else " (does not interpolate)"))
        for r in pts:
            ax.annotate(str(r["point"]), (r["flops"] / 1e9, 100 * r["acc_test"]), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
    anchors = sorted((r for r in rows if r["is_anchor"]), key=lambda r: r["flops"])
    ax.plot([r["flops"] / 1e9 for r in anchors], [100 * r["acc_test"] for r in anchors], "k--", lw=1)
    for r in anchors:
        ax.scatter([r["flops"] / 1e9], [100 * r["acc_test"]], s=90, marker="*", color="black", zorder=3)
        ax.annotate(r["name"], (r["flops"] / 1e9, 100 * r["acc_test"]), xytext=(4, -10), textcoords="offset points")
    if interp:
        tol = 100 * interp["rule"]["tol"]
        ax.plot([r["flops"] / 1e9 for r in anchors], [100 * r["acc_test"] - tol for r in anchors], "k:", lw=0.8,
                label=f"line − {tol:.2f} pp (tolerance)")
        title = title or (f"{interp['interpolating']}/{interp['stitches']} stitches interpolate "
                          f"({interp['percent']:.1f} %)")
    ax.set_xlabel("GFLOPs per image (torch.utils.flop_counter)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi=130)[0]


def plot_selector_sweep(selector: dict[str, Any], path: Path) -> Path:
    """GFLOPs served vs accuracy constraint: the family's selector and the anchor-only baseline."""
    plt = pyplot()
    rows = [r for r in selector["sweep"] if r["selected_flops"] is not None and r["baseline_flops"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step([100 * r["min_acc"] for r in rows], [r["baseline_flops"] / 1e9 for r in rows], where="post",
            color="black", label="baseline (ResNet34 or ResNet50 only)")
    ax.step([100 * r["min_acc"] for r in rows], [r["selected_flops"] / 1e9 for r in rows], where="post",
            color="tab:blue", label="selector over the family")
    s = selector["summary"]
    ax.set_title(f"lighter or equal {s['percent_lighter_or_equal']:.0f} %, strictly lighter "
                 f"{s['percent_strictly_lighter']:.0f} % of {s['baseline_feasible']} constraints", fontsize=10)
    ax.set_xlabel("accuracy constraint on the validation split (%)")
    ax.set_ylabel("GFLOPs of the served model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=130)[0]
