"""serve's claims (FP8 vs bf16 serving on a random-weight Llama-3-8B-shaped model, the endpoint under load, attention
beside flashinfer); their figures are in ``plots.py``.

Sources (``results/<gpu>/serve/``): ``decode_fp8_vs_bf16.json`` (``python -m impl.serve.experiments``),
``endpoint_smollm2.json`` (``python -m impl.serve.loadtest``), ``attention_backends.json``
(``python -m impl.serve.flashinfer_check``). Timing ratios are judged at the conservative end of their 95% bootstrap
interval (``fp8_decode_speedup_lo``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from impl.common.ledger import (Beside, Case, Claim, Measured, NotMeasured, ResultsView, ResultValue,
                                record_stamp)
from impl.serve.records import fastest_read_us

RESULT = "decode_fp8_vs_bf16"
TUNE = "tune"
PROJECTIONS = ("wqkv", "wo", "w13", "w2")
ENDPOINT = "endpoint_smollm2"
ATTENTION = "attention_backends"


def read_ceiling(view: ResultsView) -> str:
    """What the batch-1 step's linears could reach, one kernel per projection, if each ran as fast as the card's
    fastest streaming read of its own code bytes (the tune run's anchors, ``read_anchor`` and ``stream_anchor``, L2
    flushed, queued): their weight bytes over layers x the sum of the four reads, as % of the copy peak. Empty where
    the tune record lacks the anchors or is not the run whose table the decode record used (one run's figures only)."""
    tune, decode = view.result("serve", TUNE), view.result("serve", RESULT)
    if tune is None or decode is None:
        return ""
    d, t = decode["data"], tune["data"]
    used = ((d.get("gemm_table") or {}).get("data") or {}).get("selected_in_run")
    if not used or used != t.get("run_id"):
        return ""
    reads = {p.get("projection"): us for p in t.get("pairs", []) if p.get("m") == 1
             and (us := fastest_read_us(p)) is not None}
    try:
        layers, nbytes, copy = d["model_args"]["n_layers"], d["fp8"]["linear_weight_bytes"], d["copy_gbps"]
    except (KeyError, TypeError):
        return ""
    if set(reads) != set(PROJECTIONS) or not copy:
        return ""
    step_us = layers * sum(reads.values())
    pct = 100 * nbytes / (step_us * 1e-6) / (copy * 1e9)
    parts = " + ".join(f"{name} {reads[name]:.2f}" for name in PROJECTIONS)
    return (f"; the linears' read ceiling: {nbytes / 1e9:.2f} GB in {layers} x ({parts}) us = {step_us / 1e3:.3f} ms, "
            f"{pct:.1f}% of copy (serve/tune.json's fastest read anchors, run {used}, "
            f"{record_stamp(tune)})")


@dataclass(frozen=True)
class AttentionMeasure:
    """A number of ``attention_backends.json`` that exists only when flashinfer was measured: otherwise not measured,
    with the step that failed and its error as the reason (or that the comparison never ran)."""

    key: str

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        rec = view.result("serve", ATTENTION)
        if rec is None:
            return NotMeasured(f"flashinfer not measured: no results/{view.slug}/serve/{ATTENTION}.json (its wheels "
                               "were not brought to the GPU machine: `python -m impl.serve.flashinfer_setup plan`)")
        data = rec["data"]
        if data.get("flashinfer_status") != "measured":
            return NotMeasured(f"flashinfer not measured: {data.get('flashinfer_reason')}")
        return ResultValue("serve", ATTENTION, self.key)(view)

    def describe(self) -> str:
        return f"`{self.key}` in results/<gpu>/serve/{ATTENTION}.json (when flashinfer was measured)"


@dataclass(frozen=True)
class EndpointMeasure:
    """A number of ``endpoint_smollm2.json``; without that file: not measured, saying what the run needs."""

    key: str

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        if view.result("serve", ENDPOINT) is None:
            return NotMeasured(f"endpoint load test not run on this card: no results/{view.slug}/serve/{ENDPOINT}.json "
                               "(it needs SmolLM2-135M's GGUF, 93 MB, and the gguf wheel carried to the GPU machine "
                               "in two pieces, then `python -m impl.serve.loadtest --model smollm2`; no device time "
                               "was spent on it yet)")
        return ResultValue("serve", ENDPOINT, self.key)(view)

    def describe(self) -> str:
        return f"`{self.key}` in results/<gpu>/serve/{ENDPOINT}.json"


def _speedup(batch: int, target: float, statement: str, cid: str) -> Claim:
    return Claim(id=cid, system="serve", statement=statement, unit="x", comparison=">=", target=target,
                 measure=ResultValue("serve", RESULT, f"fp8_decode_speedup_lo.{batch}"))


CLAIMS = [
    Claim(id="serve.fp8_decode_speedup_b1", system="serve",
          statement="FP8 linears decode Llama-3-8B-shaped batch-1 steps >= 1.75x faster than bf16 (device time of a "
                    "CUDA-graph decode step, lower end of a 95% bootstrap interval; vLLM reports up to 1.6x)",
          unit="x", comparison=">=", target=1.75, seed_value=1.6,
          measure=ResultValue("serve", RESULT, "fp8_decode_speedup_lo.1")),
    Claim(id="serve.fp8_weight_mem_ratio", system="serve",
          statement="FP8 decoder linears (e4m3 + per-channel fp32 scales) take half the memory of bf16 ones",
          unit="ratio", comparison="<=", target=0.51, seed_value=0.5,
          measure=ResultValue("serve", RESULT, "fp8_weight_mem_ratio")),
    Claim(id="serve.bw_pct_b1", system="serve",
          statement="A batch-1 FP8 decode step reads its weights at >= 85% of the card's copy bandwidth "
                    "(weight bytes per token / time per token)",
          unit="% of copy peak", comparison=">=", target=85.0,
          measure=Beside(ResultValue("serve", RESULT, "bw_pct_b1.fp8"), read_ceiling,
                         "the linears' read ceiling (serve/tune.json's read anchors)")),
    _speedup(128, 1.3, "FP8 serving decodes a batch of 128 Llama-3-8B-shaped sequences >= 1.3x faster than bf16 "
                       "(CUDA-graph decode step, GEMM path per projection from the measured table; lower end of a "
                       "95% bootstrap interval)", "serve.fp8_decode_speedup_b128"),
    _speedup(256, 1.3, "FP8 serving decodes a batch of 256 Llama-3-8B-shaped sequences >= 1.3x faster than bf16 "
                       "(as at batch 128)", "serve.fp8_decode_speedup_b256"),
    Claim(id="serve.fp8_faster_every_batch", system="serve",
          statement="FP8 decode steps are faster than bf16 at every batch size measured (1 to 256; the smallest "
                    "lower end of the speed-up intervals)",
          unit="x", comparison=">", target=1.0,
          measure=ResultValue("serve", RESULT, "fp8_min_speedup_lo")),
    Claim(id="serve.endpoint_batching_gain", system="serve",
          statement="Continuous batching serves >= 4x the requests/s of one-at-a-time serving on the same load "
                    "(FP8 SmolLM2-135M behind the OpenAI-style endpoint, 64 concurrent clients, 512 requests of mixed "
                    "prompt lengths)",
          unit="x", comparison=">=", target=4.0, measure=EndpointMeasure("batching_gain")),
    Claim(id="serve.endpoint_tokens_per_s", system="serve",
          statement="The endpoint generates >= 5000 tokens/s under that load (completion tokens over wall time)",
          unit="tokens/s", comparison=">=", target=5000.0, measure=EndpointMeasure("tokens_per_s")),
    Claim(id="serve.endpoint_greedy_identical", system="serve",
          statement="Under that load every request's greedy tokens equal those of the same prompt served alone "
                    "(batch-invariant kernels)",
          unit="fraction", comparison=">=", target=1.0,
          measure=EndpointMeasure("greedy_identical")),
    Claim(id="serve.attention_decode_vs_flashinfer", system="serve",
          statement="Triton paged decode attention takes <= 1.5x flashinfer's device time on the same KV cache "
                    "(32 sequences of 1024 tokens, 32/8 heads of 128, bf16)",
          unit="x", comparison="<=", target=1.5, measure=AttentionMeasure("triton_over_flashinfer.decode")),
    Claim(id="serve.attention_prefill_vs_flashinfer", system="serve",
          statement="Triton paged prefill attention takes <= 1.5x flashinfer's device time on the same KV cache "
                    "(4 prompts of 1024 tokens, 32/8 heads of 128, bf16)",
          unit="x", comparison="<=", target=1.5, measure=AttentionMeasure("triton_over_flashinfer.prefill")),
]


def _decode_record(speedup_lo: dict[str, float], bw_fp8: float | None = 90.0, ratio: float = 0.5) -> dict[str, Any]:
    return {"fp8_decode_speedup_lo": speedup_lo, "fp8_min_speedup_lo": min(speedup_lo.values()),
            "bw_pct_b1": {"bf16": 77.0, "fp8": bw_fp8}, "fp8_weight_mem_ratio": ratio, "complete": True}


GOOD_SPEEDUPS = {"1": 1.8, "8": 1.5, "32": 1.4, "64": 1.35, "128": 1.35, "256": 1.35}
GOOD_ENDPOINT = {"batching_gain": 8.0, "tokens_per_s": 9000.0, "greedy_identical": 1.0, "complete": True}
GOOD_ATTENTION = {"flashinfer_status": "measured", "triton_over_flashinfer": {"decode": 1.2, "prefill": 1.2},
                  "complete": True}


def passing_results() -> dict[str, dict[str, Any]]:
    """Stored results on which every claim passes: the baseline each failing case changes in one number."""
    return {f"serve/{RESULT}": _decode_record(GOOD_SPEEDUPS), f"serve/{ENDPOINT}": GOOD_ENDPOINT,
            f"serve/{ATTENTION}": GOOD_ATTENTION}


def failing_results() -> dict[str, dict[str, dict[str, Any]]]:
    """Claim id -> stored results (``"serve/<name>": data``) on which that claim's verdict must be "fail"."""
    def decode(**kw: Any) -> dict[str, Any]:
        return {f"serve/{RESULT}": _decode_record(**{"speedup_lo": GOOD_SPEEDUPS, **kw})}

    def endpoint(**kw: Any) -> dict[str, Any]:
        return {f"serve/{ENDPOINT}": {**GOOD_ENDPOINT, **kw}}

    def attention(decode: float, prefill: float) -> dict[str, Any]:
        return {f"serve/{ATTENTION}": {**GOOD_ATTENTION,
                                       "triton_over_flashinfer": {"decode": decode, "prefill": prefill}}}

    return {
        "serve.fp8_decode_speedup_b1": decode(speedup_lo={**GOOD_SPEEDUPS, "1": 1.74}),
        "serve.fp8_weight_mem_ratio": decode(ratio=0.52),
        "serve.bw_pct_b1": decode(bw_fp8=84.9),
        "serve.fp8_decode_speedup_b128": decode(speedup_lo={**GOOD_SPEEDUPS, "128": 1.29}),
        "serve.fp8_decode_speedup_b256": decode(speedup_lo={**GOOD_SPEEDUPS, "256": 1.29}),
        "serve.fp8_faster_every_batch": decode(speedup_lo={**GOOD_SPEEDUPS, "32": 1.0}),
        "serve.endpoint_batching_gain": endpoint(batching_gain=3.9),
        "serve.endpoint_tokens_per_s": endpoint(tokens_per_s=4999.0),
        "serve.endpoint_greedy_identical": endpoint(greedy_identical=511 / 512),
        "serve.attention_decode_vs_flashinfer": attention(1.6, 1.2),
        "serve.attention_prefill_vs_flashinfer": attention(1.2, 1.6),
    }


FAILING_CASES = {cid: Case(results=r) for cid, r in failing_results().items()}
