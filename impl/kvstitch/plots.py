"""kvstitch's report figure (ROUGE-L and held-out loss vs decode-model size, a column per series) and its ROUGE
tables, from ``results/<gpu>/kvstitch/rouge_<series>.json``."""
from __future__ import annotations

from pathlib import Path

from impl.common.plotting import pyplot, save_figure
from impl.kvstitch.claims import SERIES


def plot_rouge_vs_size(view, out_dir: Path) -> list[Path]:
    """Per series (columns): ROUGE-L (top) and, where recorded, held-out news loss (bottom, lower is better) vs
    decode-model parameters for decode alone, hybrid (a), hybrid (b) and decode+LoRA alone; the prefill model alone
    and tuned with the same LoRA as stars at their size and as lines."""
    plt = pyplot()

    recs = {s: view.result("kvstitch", f"rouge_{s}") for s in SERIES}
    recs = {s: r["data"] for s, r in recs.items() if r and r["data"].get("prefill", {}).get("rougeL") is not None}
    if not recs:
        return []
    with_loss = any(d["prefill"].get("nll") is not None for d in recs.values())
    fig, axes = plt.subplots(2 if with_loss else 1, len(recs), figsize=(6 * len(recs), 8.4 if with_loss else 4.4),
                             squeeze=False)
    for col, (series, d) in enumerate(recs.items()):
        size = "params_non_embedding" if all("params_non_embedding" in x for x in d["decodes"]) else "params"
        decs = sorted(d["decodes"], key=lambda x: x[size])
        gaps = [((x.get("gaps") or {}).get("hybrid_b_minus_decode"), x.get("tag", "")) for x in decs]
        note = "".join(f"\n{tag}: hybrid b - decode alone {g['diff']:+.3f}, 95% CI [{g['lo']:+.3f}, {g['hi']:+.3f}], "
                       f"n={g['n']}" for g, tag in gaps if g)
        _panel(axes[0][col], d, decs, size, lambda x, k: x["rougeL"].get(k), lambda p: p.get("rougeL"),
               "ROUGE-L F1 (mean of news, wiki)", f"{series}: ROUGE-L vs decode-model size{note}")
        if with_loss:
            _panel(axes[1][col], d, decs, size, lambda x, k: (x.get("nll") or {}).get(k), lambda p: p.get("nll"),
                   "held-out news loss (nats/token, lower is better)", f"{series}: held-out loss vs decode-model size")
    return save_figure(fig, Path(out_dir) / "kvstitch_rouge_vs_size.png")


def _panel(ax, d: dict, decs: list[dict], size: str, value, anchor, ylabel: str, title: str) -> None:
    xs = [x[size] / 1e6 for x in decs]
    for system, style, label in (("decode_alone", "o-", "decode alone"), ("hybrid_a", "s--", "hybrid, stage a"),
                                 ("hybrid_b", "^-", "hybrid, stage b"), ("lora_alone", "v:", "decode + LoRA alone")):
        ys = [value(x, system) for x in decs]
        if all(y is not None for y in ys):
            ax.plot(xs, ys, style, label=label)
    psize = d["prefill"].get(size, d["prefill"]["params"]) / 1e6  # the prefill model at its own size, and as a line
    for rec, color, label in ((d["prefill"], "k", f"prefill alone ({psize:.0f}M)"),
                              (d.get("prefill_lora") or {}, "gray", "prefill + same LoRA (fair anchor)")):
        if anchor(rec) is not None:
            ax.plot([psize], [anchor(rec)], "*", color=color, ms=11, label=label)
            ax.axhline(anchor(rec), color=color, ls=":" if color == "k" else "-.", lw=0.8)
    what = "non-embedding parameters" if size == "params_non_embedding" else "parameters"
    ax.set(xlabel=f"decode model {what} (M)", ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)


def rouge_tables(view) -> list[str]:
    """Per series: ROUGE-1/2/L of every system on both tasks, and the gaps' paired-bootstrap 95% intervals."""
    lines: list[str] = []
    for series in SERIES:
        rec = view.result("kvstitch", f"rouge_{series}")
        if not rec or not rec["data"].get("table"):
            continue
        d = rec["data"]
        n = {t: len(r) for t, r in d.get("references", {}).items()}
        lines += [f"**{series}** ({rec.get('device', '?')}, commit {rec.get('commit', '?')}; examples: "
                  + ", ".join(f"{t} {k}" for t, k in n.items()) + ")", "",
                  "| system | params | " + " | ".join(f"{t} R-{k[5:]}" for t in n for k in ("rouge1", "rouge2",
                                                                                          "rougeL")) + " |",
                  "|---|---|" + "---|" * (3 * len(n))]
        loss = any(row.get("news_nll") is not None for row in d["table"])  # held-out loss, in newer records
        if loss:
            lines[-2] += " news loss (nats/token) |"
            lines[-1] += "---|"
        for row in d["table"]:
            cells = [_cell(row.get(f"{t}_{k}")) for t in n for k in ("rouge1", "rouge2", "rougeL")]
            cells += [_cell(row.get("news_nll"))] if loss else []
            lines.append(f"| {row['system']} | {row['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
        for dec in d["decodes"]:
            for key, g in (dec.get("gaps") or {}).items():
                lines.append(f"- {dec['tag']}: {key.replace('_', ' ')} = {g['diff']:+.4f} ROUGE-L "
                             f"(95% CI [{g['lo']:+.4f}, {g['hi']:+.4f}], n={g['n']})")
        lines.append("")
    return lines


def _cell(x) -> str:
    return "—" if x is None else f"{x:.3f}"


PLOTS = [plot_rouge_vs_size]
TABLES = [rouge_tables]
