"""serve's claims (FP8 vs bf16 serving on a random-weight Llama-3-8B-shaped model) and its plots.

All numbers come from ``results/<gpu>/serve/decode_fp8_vs_bf16.json`` written by ``python -m impl.serve.experiments``.
"""
from __future__ import annotations

from pathlib import Path

from impl.common.ledger import Claim, ResultValue, ResultsView
from impl.common.plotting import pyplot, save_figure

RESULT = "decode_fp8_vs_bf16"

CLAIMS = [
    Claim(id="serve.fp8_decode_speedup_b1", system="serve",
          statement="FP8 linears decode Llama-3-8B-shaped batch-1 steps >= 1.5x faster than bf16 (device time of a "
                    "CUDA-graph decode step; vLLM reports up to 1.6x)",
          unit="x", comparison=">=", target=1.5, seed_value=1.6,
          measure=ResultValue("serve", RESULT, "fp8_decode_speedup_b1")),
    Claim(id="serve.fp8_weight_mem_ratio", system="serve",
          statement="FP8 decoder linears (e4m3 + per-channel fp32 scales) take half the memory of bf16 ones",
          unit="ratio", comparison="<=", target=0.51, seed_value=0.5,
          measure=ResultValue("serve", RESULT, "fp8_weight_mem_ratio")),
    Claim(id="serve.bw_pct_b1", system="serve",
          statement="A batch-1 FP8 decode step reads its weights at >= 60% of the card's copy bandwidth "
                    "(weight bytes per token / time per token)",
          unit="% of copy peak", comparison=">=", target=60.0,
          measure=ResultValue("serve", RESULT, "bw_pct_b1.fp8")),
]


def plot_tokens_per_s(view: ResultsView, out_dir: Path) -> list[Path]:
    """Decode tokens/s vs batch size, bf16 and FP8, log-log, from the stored experiment."""
    rec = view.result("serve", RESULT)
    if rec is None:
        return []
    plt = pyplot()

    data = rec["data"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, series in sorted(data["tokens_per_s"].items()):
        batches = sorted(series, key=int)
        ax.plot([int(b) for b in batches], [series[b] for b in batches], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="batch size (sequences)", ylabel="decode tokens/s",
           title=f"{data['config']['preset']} (random weights), {rec['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = Path(out_dir) / "serve_tokens_per_s.png"
    return save_figure(fig, path)


PLOTS = [plot_tokens_per_s]
