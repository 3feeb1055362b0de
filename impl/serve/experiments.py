"""Decode throughput and time-to-first-token, FP8 vs bf16, on a random-weight Llama-3-8B-shaped model (H100).

``python -m impl.serve.experiments [--quick]`` on the GPU; ``--smoke`` on a CPU at toy size (writes nothing).

For each precision (bf16 first; then the same weights with the decoder's linears quantised to FP8 in place) and each
batch size B in 1, 8, 32, 128, with B random prompts of ``prompt_len`` tokens:

- ``decode_step_ms``: device time of one decode step of B sequences at context prompt_len + 1 (CUDA events around a
  replay of the captured graph, median of ``reps``); ``decode_tok_s`` = B / step time;
- ``ttft_ms``: device time of the prefill that yields the B first tokens (all B prompts arrive together);
- ``e2e_*``: the engine's own wall-clock ``generate`` of ``new_tokens`` tokens per request (host scheduling,
  sampling and graph replays included): decode tokens/s and mean TTFT;
- ``bw_pct``: weight bytes read per decode step (every matrix once; one embedding row) / step time, as % of the card's
  copy bandwidth (``impl.common.calibrate.measure_copy_gbps``, bytes read + written).

Decode runs as in serving: one captured CUDA graph per batch size, fused Triton kernels for norms/RoPE/SwiGLU,
Triton paged attention, and (FP8) the W8A16 Triton GEMM of ``fp8_gemv.py``; each record's ``engine`` says so.

Headline keys for the claims: ``fp8_decode_speedup_b1`` (bf16 step / FP8 step at B=1), ``fp8_weight_mem_ratio`` (FP8
decoder linears + scales over their bf16 bytes; ``..._total`` includes the bf16 embeddings and LM head), and
``bw_pct_b1.{bf16,fp8}``. Quality (perplexity, next-token agreement) needs real weights and is impl/fp8's experiment;
this record says where it is instead of measuring noise.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import impl  # noqa: F401
import torch

from impl import backend
from impl.common.timing import time_fn
from impl.serve import fp8_adapter
from impl.serve.engine import Engine, EngineConfig
from impl.serve.kv_cache import PagedStep, last_token_rows
from impl.serve.model import ModelArgs, Transformer
from impl.serve.sampling import SamplingParams
from impl.serve.weights import randomize_


@dataclass(frozen=True)
class ExperimentConfig:
    preset: str = "llama-3-8b"
    batches: tuple[int, ...] = (1, 8, 32, 128)
    prompt_len: int = 128
    new_tokens: int = 32
    page_size: int = 16
    dtype: str = "bfloat16"
    device: str = "cuda"
    attention: str = "auto"
    reps: int = 20
    prefill_reps: int = 5


FULL = ExperimentConfig()
QUICK = ExperimentConfig(batches=(1, 32), new_tokens=16, reps=10, prefill_reps=3)
SMOKE = ExperimentConfig(preset="tiny", batches=(1, 3), prompt_len=9, new_tokens=3, dtype="float32", device="cpu",
                         reps=1, prefill_reps=1)


def log(msg: str) -> None:
    print(f"[serve.experiments {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bytes_per_decode_step(model: Transformer) -> int:
    """Weight bytes a decode step reads: every parameter once, except the embedding table (one row per token)."""
    total = fp8_adapter.weight_bytes(model)
    if not model.args.tie_embeddings:
        emb = model.tok_embeddings
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return total


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def time_prefill_and_decode(engine: Engine, prompts: list[list[int]], cfg: ExperimentConfig) -> dict[str, float]:
    """Device times of one prefill of all prompts and one decode step of all of them (sequences stay resident)."""
    greedy = SamplingParams(max_new_tokens=cfg.new_tokens + 8, stop_token_ids=())
    ids = [engine.add_request(p, greedy) for p in prompts]
    engine.step()  # prefill + first decode step; compiles kernels and captures the graph of this batch size
    if len(engine.running) != len(ids):
        raise RuntimeError(f"only {len(engine.running)} of {len(ids)} requests are running: {engine.done}")
    model, cache = engine.model, engine.cache
    meta = cache.metadata([(i, 0, len(p)) for i, p in zip(ids, prompts)], engine.device)
    tokens = torch.tensor([t for p in prompts for t in p], device=engine.device)
    prefill_step = PagedStep(cache, engine.backend, meta, last_token_rows(meta))
    prefill = time_fn(lambda: model(tokens, prefill_step).argmax(-1), warmup=1, reps=cfg.prefill_reps)
    for r in engine.running:
        cache.reserve(r.id, r.length)  # room for the last sampled token, which the timed step writes
    if engine.graphs is not None:  # re-run the last decode step: same slot written, same context read
        seqs = [(r.id, r.length - 1, 1) for r in engine.running]
        bp = engine.graphs.load(seqs, [r.output[-1] for r in engine.running])
        decode = time_fn(lambda: engine.graphs.replay(bp), warmup=3, reps=cfg.reps)
    else:
        dmeta = cache.metadata([(r.id, r.length - 1, 1) for r in engine.running], engine.device)
        last = torch.tensor([r.output[-1] for r in engine.running], device=engine.device)
        step = PagedStep(cache, engine.backend, dmeta, None)
        decode = time_fn(lambda: model(last, step), warmup=1, reps=cfg.reps)
    for i in ids:
        engine.abort(i)
    engine.done.clear()
    return {"ttft_ms": prefill.median_ms, "decode_step_ms": decode.median_ms}


def end_to_end(engine: Engine, prompts: list[list[int]], cfg: ExperimentConfig) -> dict[str, float]:
    """The engine's wall-clock generate: every request decodes new_tokens tokens (no early stop)."""
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=cfg.new_tokens, stop_token_ids=()))
    wall = time.perf_counter() - t0
    bad = [o for o in outs if o.finish_reason != "length" or len(o.tokens) != cfg.new_tokens]
    if bad:
        raise RuntimeError(f"{len(bad)} requests did not run to length: first {bad[0]}")
    decode_s = sum(o.latency_s - o.ttft_s for o in outs) / len(outs)
    return {"e2e_wall_s": wall, "e2e_ttft_ms": 1e3 * sum(o.ttft_s for o in outs) / len(outs),
            "e2e_decode_tok_s": len(outs) * (cfg.new_tokens - 1) / decode_s if decode_s > 0 else None}


def run_precision(model: Transformer, label: str, cfg: ExperimentConfig, copy_gbps: float | None) -> dict[str, Any]:
    most = max(cfg.batches)
    pages = most * -(-(cfg.prompt_len + cfg.new_tokens + 16) // cfg.page_size) + 8
    engine = Engine(model, EngineConfig(page_size=cfg.page_size, num_pages=pages, max_batch=most,
                                        max_prefill_tokens=most * cfg.prompt_len, attention=cfg.attention,
                                        max_seq_len=cfg.prompt_len + cfg.new_tokens + 16))
    per_token_bytes = bytes_per_decode_step(model)
    out: dict[str, Any] = {"engine": engine.describe(), "weight_bytes": fp8_adapter.weight_bytes(model),
                           "linear_weight_bytes": fp8_adapter.weight_bytes(model, linears_only=True),
                           "bytes_per_decode_step": per_token_bytes, "batches": {}}
    for b in cfg.batches:
        prompts = random_prompts(b, cfg.prompt_len, model.args.vocab_size, seed=b)
        row = time_prefill_and_decode(engine, prompts, cfg)
        row["decode_tok_s"] = b / (row["decode_step_ms"] * 1e-3)
        gbps = per_token_bytes / (row["decode_step_ms"] * 1e-3) / 1e9
        row["weight_gbps"] = gbps
        row["bw_pct"] = 100 * gbps / copy_gbps if copy_gbps else None
        row.update(end_to_end(engine, prompts, cfg))
        out["batches"][str(b)] = row
        log(f"{label} B={b}: step {row['decode_step_ms']:.3f} ms ({row['decode_tok_s']:.0f} tok/s, "
            f"{gbps:.0f} GB/s weights), TTFT {row['ttft_ms']:.2f} ms, e2e {row['e2e_decode_tok_s'] or 0:.0f} tok/s")
    del engine
    gc.collect()  # the engine's cache and graphs go before the next precision allocates its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def quality_pointer() -> dict[str, str]:
    return {"status": "not measured here",
            "reason": "perplexity and next-token agreement of FP8 layouts vs bf16 need real weights: impl/fp8's "
                      "experiment measures them on SmolLM2-135M (results/<gpu>/fp8/); this model has random weights"}


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    from impl.common.calibrate import measure_copy_gbps

    args = ModelArgs.from_name(cfg.preset)
    dtype = getattr(torch, cfg.dtype)
    copy_gbps = measure_copy_gbps() if cfg.device == "cuda" else None
    log(f"{cfg.preset}: {args}; copy bandwidth {copy_gbps and round(copy_gbps)} GB/s")
    t0 = time.perf_counter()
    model = randomize_(Transformer(args, dtype=dtype, device=cfg.device).eval(), seed=0)
    log(f"random {cfg.dtype} weights in {time.perf_counter() - t0:.1f} s")
    results = {"bf16" if dtype == torch.bfloat16 else cfg.dtype: run_precision(model, "dense", cfg, copy_gbps)}
    dense_key = next(iter(results))
    t0 = time.perf_counter()
    fp8_adapter.quantize_model_(model)
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    log(f"quantised the decoder linears to FP8 in {time.perf_counter() - t0:.1f} s ({fp8_adapter.fp8_status()})")
    results["fp8"] = run_precision(model, "fp8", cfg, copy_gbps)
    dense, fp8 = results[dense_key], results["fp8"]
    b1 = str(min(cfg.batches))
    return {"config": asdict(cfg), "model_args": asdict(args), "copy_gbps": copy_gbps, "dense_key": dense_key,
            **results,
            "fp8_decode_speedup_b1": dense["batches"][b1]["decode_step_ms"] / fp8["batches"][b1]["decode_step_ms"],
            "fp8_e2e_speedup_b1": (fp8["batches"][b1]["e2e_decode_tok_s"] or 0)
            / max(dense["batches"][b1]["e2e_decode_tok_s"] or 1e-9, 1e-9),
            "fp8_weight_mem_ratio": fp8["linear_weight_bytes"] / dense["linear_weight_bytes"],
            "fp8_weight_mem_ratio_total": fp8["weight_bytes"] / dense["weight_bytes"],
            "bw_pct_b1": {"bf16": dense["batches"][b1]["bw_pct"], "fp8": fp8["batches"][b1]["bw_pct"]},
            "tokens_per_s": {k: {b: r["decode_tok_s"] for b, r in results[k]["batches"].items()} for k in results},
            "quality": quality_pointer()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.serve.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="batches 1 and 32 only, fewer repetitions")
    mode.add_argument("--smoke", action="store_true", help="toy model on the CPU; prints, writes nothing")
    a = p.parse_args(argv)
    if a.smoke:
        print(json.dumps(run(SMOKE), default=str))
        return 0
    if not backend.ON_GPU:
        print("the serve experiments need a CUDA GPU (use --smoke on a CPU)", file=sys.stderr)
        return 2
    from impl.common.results import write_result

    t0 = time.perf_counter()
    data = run(QUICK if a.quick else FULL)
    data["wall_s"] = time.perf_counter() - t0
    path = write_result("serve", "decode_fp8_vs_bf16", data, overwrite=True)
    log(f"wrote {path} in {data['wall_s']:.0f} s: FP8 speed-up at B=1 {data['fp8_decode_speedup_b1']:.2f}x, "
        f"weight memory ratio {data['fp8_weight_mem_ratio']:.3f}, bandwidth at B=1 {data['bw_pct_b1']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
