"""fp8's report figures, from its stored benches and ``results/<gpu>/fp8/quality.json``.

``PLOTS``: FP8 / bf16 GEMM speed-up vs M; each dequantize / requantize kernel's share of the copy bandwidth; the
perplexity change of every quality variant with its 95 % interval.
"""
from __future__ import annotations

from pathlib import Path

from impl.common.plotting import pyplot, save_figure
from impl.fp8.claims import BW_TARGET, MODELS, copy_bench, stream_bench


def _gemm_speedups(view) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """{N=K: {variant: [(M, bf16 time / variant time)]}} from the stored GEMM benches."""
    out: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for name, b in view.benches.items():
        if not name.startswith("test_fp8_gemm[bf16-"):
            continue
        info = b.get("extra_info") or {}
        for variant in ("fp8", "fp8-linear"):
            other = view.bench(name.replace("[bf16-", f"[{variant}-"))
            if other:
                ratio = b["stats"]["median"] / other["stats"]["median"]
                out.setdefault(int(info.get("n", 0)), {}).setdefault(variant, []).append((int(info.get("m", 0)), ratio))
    return out


def plot_speedup_vs_m(view, out_dir: Path) -> list[Path]:
    data = _gemm_speedups(view)
    if not data:
        return []
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for nk in sorted(data):
        for variant, pts in sorted(data[nk].items()):
            pts.sort()
            ax.plot([m for m, _ in pts], [r for _, r in pts], marker="o",
                    label=f"{variant} / bf16, N=K={nk}", linestyle="-" if variant == "fp8" else "--")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.6, color="tab:red", lw=0.8, ls=":", label="target 1.6x")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="M (tokens in the batch)", ylabel="speed-up over bf16 (median time ratio)",
           title=f"FP8 vs bf16 GEMM on {view.slug}")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir / "fp8_speedup_vs_m.png")


def _pct_of(view, bench: str) -> float | None:
    """A stored bench's % of the bandwidth peak; None where not stored."""
    b = view.bench(bench)
    return (b.get("extra_info") or {}).get("pct_peak_bw") if b else None


def plot_kernel_bandwidth(view, out_dir: Path) -> list[Path]:
    """Each kernel x scales x shape as % of copy bandwidth (compulsory bytes); the copy bound at 100%; for kernels
    that must read more than once (per-tensor dynamic), their own bound (100 x bytes / traffic) marked on the bar;
    the card's own copy of the same bytes (grey tick) and the no-arithmetic stream of the kernel's read/write mix
    (magenta tick: ``claims.stream_bench``) where stored."""
    rows = []
    for name, b in view.benches.items():
        info = b.get("extra_info") or {}
        kernel_case = name.startswith(("test_fp8_dequant[", "test_fp8_requant")) and name == b.get("name")
        if kernel_case and "pct_peak_bw" in info:
            kernel = name.split("[")[0].replace("test_fp8_", "")
            bound = 100.0 * info.get("bytes", 1) / info.get("traffic_bytes", info.get("bytes", 1))
            rows.append((kernel, name.split("[")[1].rstrip("]"), info["pct_peak_bw"], bound))
    if not rows:
        return []
    plt = pyplot()

    rows.sort()
    colors = {"dequant": "tab:blue", "requant": "tab:orange", "requant_delayed": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 0.26 * len(rows) + 1.4))
    labels = [f"{k} {c}" for k, c, *_ in rows]
    ax.barh(labels, [p for _, _, p, _ in rows], color=[colors.get(k, "grey") for k, *_ in rows])
    for i, (_, _, _, bound) in enumerate(rows):
        if bound < 99.9:
            ax.plot([bound, bound], [i - 0.4, i + 0.4], color="k", lw=2,
                    label="two-read bound" if bound == min(r[3] for r in rows) and i == min(
                        j for j, r in enumerate(rows) if r[3] < 99.9) else None)
    for color, what, bench_of in (("tab:grey", "the card's copy of the same bytes", copy_bench),
                                  ("m", "a stream of the same read/write mix", stream_bench)):
        label = what
        for i, (kernel, case, _, _) in enumerate(rows):
            pct = _pct_of(view, bench_of(f"test_fp8_{kernel}[{case}]"))
            if pct is not None:
                ax.plot([pct, pct], [i - 0.4, i + 0.4], color=color, lw=2, label=label)
                label = None
    ax.axvline(100, color="k", lw=1, label="copy bound")
    ax.axvline(BW_TARGET, color="tab:red", ls=":", lw=0.8, label=f"target {BW_TARGET:g}%")
    ax.set_xlabel("% of measured copy bandwidth (compulsory bytes read + written)")
    ax.set_title(f"FP8 dequantize / requantize kernels on {view.slug}")
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(axis="y", labelsize=6)
    return save_figure(fig, out_dir / "fp8_kernel_bandwidth.png")


def plot_perplexity(view, out_dir: Path) -> list[Path]:
    """Perplexity change per variant with its 95% interval, one panel per model; +-0.5% and +-1% marked, and where
    the record has it, the change of the activations' rounding alone (dense weights: W8A8's floor) as grey bars."""
    rec = view.result("fp8", "quality")
    if not rec or not isinstance(rec.get("data"), dict):
        return []
    models = {m: d for m, d in rec["data"].get("models", {}).items() if d.get("variants")}
    if not models:
        return []
    plt = pyplot()

    most = max(len(d["variants"]) + len(d.get("activations_only") or {}) for d in models.values())
    fig, axes = plt.subplots(1, len(models), figsize=(max(6.0, 0.2 * most) * len(models), 6.0), squeeze=False)
    for ax, (m, d) in zip(axes[0], models.items()):
        acts = d.get("activations_only") or {}
        names = [f"activations only, {g}" for g in acts] + list(d["variants"])
        v = [{**r, "mode": "acts"} for r in acts.values()] + [d["variants"][n] for n in d["variants"]]
        y = [r["delta_pct"] for r in v]
        err = [[r["delta_pct"] - r["ci95"][0] for r in v], [r["ci95"][1] - r["delta_pct"] for r in v]]
        for i, r in enumerate(v):
            ax.errorbar([i], [y[i]], yerr=[[err[0][i]], [err[1][i]]], capsize=3,
                        fmt="s" if r.get("rounding") == "gptq" else "o",  # squares: GPTQ-rounded codes
                        color={"w8a16": "tab:blue", "acts": "tab:grey"}.get(r["mode"], "tab:orange"))
        for t, c in ((0.5, "tab:blue"), (1.0, "tab:orange")):
            ax.axhspan(-t, t, color=c, alpha=0.08)
            ax.axhline(t, color=c, ls=":", lw=0.8, label=f"|delta| <= {t:g}% ({'W8A16' if t == 0.5 else 'W8A8'})")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("perplexity change vs unquantized (%, 95% CI)")
        ax.set_title(f"{MODELS.get(m, m)}: base ppl {d['base']['ppl']:.2f}, {d['base']['tokens']} tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_dir / "fp8_perplexity.png")


PLOTS = [plot_speedup_vs_m, plot_kernel_bandwidth, plot_perplexity]
