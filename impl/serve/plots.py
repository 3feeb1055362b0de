"""serve's report figures, from its stored records (``results/<gpu>/serve/``).

``PLOTS``: decode tokens/s vs batch size, bf16 and FP8 (``decode_fp8_vs_bf16.json``); the endpoint's latency and
time-to-first-token distributions, continuous batching vs one at a time (``endpoint_smollm2.json``).
"""
from __future__ import annotations

from pathlib import Path

from impl.common.ledger import ResultsView
from impl.common.plotting import record_figure, save_figure
from impl.serve.claims import ENDPOINT, RESULT

def plot_tokens_per_s(view: ResultsView, out_dir: Path) -> list[Path]:
    """Decode tokens/s vs batch size, bf16 and FP8, log-log, with FP8's speed-up per batch; from the experiment."""
    found = record_figure(view, "serve", RESULT, figsize=(6, 4))
    if found is None:
        return []
    rec, fig, ax = found
    data = rec["data"]
    for label, series in sorted(data["tokens_per_s"].items()):
        batches = sorted(series, key=int)
        ax.plot([int(b) for b in batches], [series[b] for b in batches], marker="o", label=label)
    for b, sp in (data.get("fp8_decode_speedup") or {}).items():
        y = data["tokens_per_s"].get("fp8", {}).get(b)
        if y:
            ax.annotate(f"{sp:.2f}x", (int(b), y), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="batch size (sequences)", ylabel="decode tokens/s",
           title=f"{data['config']['preset']} (random weights), {rec['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, Path(out_dir) / "serve_tokens_per_s.png")


def plot_latency(view: ResultsView, out_dir: Path) -> list[Path]:
    """Endpoint latency and TTFT distributions (CDFs), continuous batching vs one at a time, from the load test."""
    found = record_figure(view, "serve", ENDPOINT, nrows=1, ncols=2, figsize=(9, 3.6))
    if found is None:
        return []
    rec, fig, axes = found
    data = rec["data"]
    for ax, key, title in ((axes[0], "latencies_s", "request latency (client)"),
                           (axes[1], "ttfts_s", "time to first token (engine)")):
        for mode, m in sorted(data["modes"].items()):
            v = sorted(m.get(key) or [])
            if v:
                ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=f"{mode} (p50 {v[len(v) // 2]:.3f} s)")
        ax.set(xscale="log", xlabel="seconds", ylabel="fraction of requests", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['model']} endpoint, {data['config']['concurrency']} concurrent, {rec['device']}: "
                 f"{data.get('requests_per_s') or 0:.1f} req/s, {data.get('tokens_per_s') or 0:.0f} tok/s",
                 fontsize=9)
    return save_figure(fig, Path(out_dir) / "serve_latency.png")


PLOTS = [plot_tokens_per_s, plot_latency]
