"""Decode throughput and time-to-first-token, FP8 vs bf16, on a random-weight Llama-3-8B-shaped model.

``python -m impl.serve.experiments [--quick] [--gemm-table PATH] [--budget-s S]`` on the GPU; ``--smoke`` on a CPU at
toy size (writes nothing).

For each precision (bf16 first; then the same weights with the decoder's linears quantised to FP8 in place, each
projection served per batch size by the GEMM table: ``--gemm-table``, else the stored one of this card, else the
rule, see ``choose.py``) and each batch size B in 1, 8, 32, 64, 128, 256, with B random prompts of ``prompt_len``
tokens:

- ``decode_step_ms``: device time of one decode step of B sequences at context prompt_len + 1 (CUDA events around a
  replay of the captured graph, median of ``reps``; ``decode_rounds_ms`` keeps every round); ``decode_tok_s`` = B /
  step time;
- ``ttft_ms``: device time of the prefill that yields the B first tokens (all B prompts arrive together);
- ``e2e_*``: the engine's own wall-clock ``generate`` of ``new_tokens`` tokens per request (host scheduling,
  sampling and graph replays included): decode tokens/s and mean TTFT;
- bandwidth: ``weight_gbps`` = weight bytes read per step (every matrix once; one embedding row per token) / step
  time and ``bw_pct`` its % of the card's copy bandwidth (``impl.common.calibrate.measure_copy_gbps``, bytes read +
  written); ``kv_bytes`` the K/V a step reads, ``total_bw_pct`` weights + K/V;
- ``kernels``: device microseconds per step by kernel group (GEMV, attention, norms, cuBLAS, ...) and the largest
  kernels with their grids, from a torch.profiler trace of three graph replays (``profile_step``);
- ``step_tflops``: 2 · B · (multiply-adds of every linear and the LM head) + attention (4 · B · layers · heads ·
  head_dim · context) per step time.

Headline keys for the claims: ``fp8_decode_speedup.{B}`` (bf16 step / FP8 step) with ``fp8_decode_speedup_lo.{B}``,
the lower end of a 95% bootstrap interval of that ratio of medians (rounds resampled independently, fixed seed);
``fp8_min_speedup_lo`` over all batches; ``bw_pct_b1.{bf16,fp8}``; ``fp8_weight_mem_ratio`` (FP8 decoder linears +
scales over their bf16 bytes). ``selected_in_run`` (the tune run that chose the table) and ``run_id`` (this run) say
that the table's choices are re-measured here, not the tune run's best-of-many. Quality (perplexity, next-token
agreement) needs real weights and is impl/fp8's experiment; this record says where it is.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

import impl  # noqa: F401
import torch

from impl import backend
from impl.common.log import logger
from impl.common.timing import time_fn
from impl.serve import choose, fp8_adapter
from impl.serve.engine import Engine, EngineConfig
from impl.serve.kv_cache import PagedStep, last_token_rows
from impl.serve.model import ModelArgs, Transformer
from impl.serve.sampling import SamplingParams
from impl.serve.weights import randomize_


@dataclass(frozen=True)
class ExperimentConfig:
    preset: str = "llama-3-8b"
    batches: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
    prompt_len: int = 128
    new_tokens: int = 32
    page_size: int = 16
    dtype: str = "bfloat16"
    device: str = "cuda"
    attention: str = "auto"
    reps: int = 20
    prefill_reps: int = 5
    budget_s: float = 0.0  # 0: no limit; else batches that would start after it are skipped (record incomplete)
    profile: bool = True  # device time per kernel group of the timed decode step (``profile_step``)


FULL = ExperimentConfig()
QUICK = ExperimentConfig(batches=(1, 32, 128), new_tokens=16, reps=10, prefill_reps=3)
SMOKE = ExperimentConfig(preset="tiny", batches=(1, 3), prompt_len=9, new_tokens=3, dtype="float32", device="cpu",
                         reps=2, prefill_reps=1)


log = logger("serve.experiments")


def bytes_per_decode_step(model: Transformer) -> int:
    """Weight bytes a decode step reads: every parameter once, except the embedding table (one row per token)."""
    total = fp8_adapter.weight_bytes(model)
    if not model.args.tie_embeddings:
        emb = model.tok_embeddings
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return total


def flops_per_decode_step(args: ModelArgs, batch: int, context: int) -> int:
    """2 · multiply-adds: every linear and the LM head per token, plus attention's q·K and p·V over the context."""
    per_layer = args.dim * args.qkv_dim + args.n_heads * args.head_dim * args.dim + 3 * args.dim * args.ffn_dim
    linear = args.n_layers * per_layer + args.dim * args.vocab_size
    attention = 2 * args.n_layers * args.n_heads * args.head_dim * context
    return 2 * batch * (linear + attention)


def kv_bytes_per_decode_step(args: ModelArgs, batch: int, context: int, item: int) -> int:
    return 2 * batch * context * args.n_layers * args.n_kv_heads * args.head_dim * item


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def ratio_interval(num: list[float], den: list[float], n: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of median(num) / median(den), each side's rounds resampled independently (fixed seed)."""
    rng = random.Random(seed)
    stats = sorted(statistics.median(rng.choices(num, k=len(num))) / statistics.median(rng.choices(den, k=len(den)))
                   for _ in range(n))
    lo = stats[int((1 - level) / 2 * n)]
    hi = stats[min(n - 1, int((1 + level) / 2 * n))]
    return lo, hi


def make_engine(model: Transformer, cfg: ExperimentConfig, most: int) -> Engine:
    pages = most * -(-(cfg.prompt_len + cfg.new_tokens + 16) // cfg.page_size) + 8
    return Engine(model, EngineConfig(page_size=cfg.page_size, num_pages=pages, max_batch=most,
                                      max_prefill_tokens=most * cfg.prompt_len, attention=cfg.attention,
                                      max_seq_len=cfg.prompt_len + cfg.new_tokens + 16))


def time_prefill_and_decode(engine: Engine, prompts: list[list[int]], cfg: ExperimentConfig,
                            keep_logits: bool = False) -> dict[str, Any]:
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
        step_fn = lambda: engine.graphs.replay(bp)  # noqa: E731
    else:
        dmeta = cache.metadata([(r.id, r.length - 1, 1) for r in engine.running], engine.device)
        last = torch.tensor([r.output[-1] for r in engine.running], device=engine.device)
        step = PagedStep(cache, engine.backend, dmeta, None)
        step_fn = lambda: model(last, step)  # noqa: E731
    decode = time_fn(step_fn, warmup=3 if engine.graphs is not None else 1, reps=cfg.reps)
    out: dict[str, Any] = {"ttft_ms": prefill.median_ms, "decode_step_ms": decode.median_ms,
                           "decode_rounds_ms": decode.times_ms}
    if cfg.profile and engine.device.type == "cuda":
        out["kernels"] = profile_step(step_fn)
    if keep_logits:
        out["logits"] = step_fn()[: len(prompts)].float().cpu().clone()
    for i in ids:
        engine.abort(i)
    engine.done.clear()
    return out


KERNEL_GROUPS = (("gemv", ("gemv_kernel",)), ("attention", ("paged_decode", "paged_prefill")),
                 ("norm", ("rmsnorm",)), ("rope_cache", ("rope",)), ("silu_mul", ("silu_mul",)),
                 ("quant", ("quant",)), ("cublas", ("gemm", "nvjet", "cutlass", "sm90_xmma", "splitk")))


def kernel_group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")


def group_kernels(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Chrome-trace kernel events (``name``, ``dur`` in us, ``args.grid``) of ``steps`` decode steps -> device us per
    step by group and by (name, grid), the largest first."""
    groups: dict[str, float] = {}
    by_kernel: dict[str, list[float]] = {}
    for e in events:
        grid = (e.get("args") or {}).get("grid")
        key = f"{e['name'][:60]} grid={grid}"
        groups[kernel_group(e["name"])] = groups.get(kernel_group(e["name"]), 0.0) + e["dur"] / steps
        by_kernel.setdefault(key, []).append(e["dur"])
    top = sorted(((k, sum(v) / steps, len(v) // steps) for k, v in by_kernel.items()), key=lambda r: -r[1])
    return {"steps": steps, "group_us": {g: round(v, 2) for g, v in sorted(groups.items(), key=lambda r: -r[1])},
            "sum_us": round(sum(groups.values()), 2),
            "top": [{"kernel": k, "us_per_step": round(us, 2), "calls_per_step": n} for k, us, n in top[:16]]}


def profile_step(step_fn, steps: int = 3) -> dict[str, Any]:
    """Device time per kernel of ``steps`` decode steps (graph replays: CUPTI records each kernel of the graph), from
    torch.profiler's trace; grouped by ``kernel_group``. Errors are recorded, never raised (the timings stand)."""
    import json as _json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    try:
        step_fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step_fn()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/trace.json"
            prof.export_chrome_trace(path)
            with open(path) as f:
                trace = _json.load(f)
        events = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
        if not events:
            return {"error": "the profiler recorded no kernels"}
        return group_kernels(events, steps)
    except Exception as e:  # profiling is a diagnosis: it never costs the measurement
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def step_timings(model: Transformer, cfg: ExperimentConfig, batch: int, keep_logits: bool = False) -> dict[str, Any]:
    """``time_prefill_and_decode`` for one batch size on a fresh engine (its cache and graphs freed after)."""
    engine = make_engine(model, cfg, batch)
    try:
        prompts = random_prompts(batch, cfg.prompt_len, model.args.vocab_size, seed=batch)
        return time_prefill_and_decode(engine, prompts, cfg, keep_logits)
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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


def run_precision(model: Transformer, label: str, cfg: ExperimentConfig, copy_gbps: float | None,
                  deadline: float | None) -> dict[str, Any]:
    engine = make_engine(model, cfg, max(cfg.batches))
    per_token_bytes = bytes_per_decode_step(model)
    item = 1 if engine.cache.is_fp8 else model.dtype.itemsize
    out: dict[str, Any] = {"engine": engine.describe(), "weight_bytes": fp8_adapter.weight_bytes(model),
                           "linear_weight_bytes": fp8_adapter.weight_bytes(model, linears_only=True),
                           "bytes_per_decode_step": per_token_bytes, "batches": {}, "skipped": []}
    for b in cfg.batches:
        if deadline is not None and time.perf_counter() > deadline:
            out["skipped"].append(b)
            log(f"{label} B={b}: skipped (budget)")
            continue
        prompts = random_prompts(b, cfg.prompt_len, model.args.vocab_size, seed=b)
        row = time_prefill_and_decode(engine, prompts, cfg)
        step_s = row["decode_step_ms"] * 1e-3
        context = cfg.prompt_len + 1
        kv = kv_bytes_per_decode_step(model.args, b, context, item)
        row.update(decode_tok_s=b / step_s, weight_gbps=per_token_bytes / step_s / 1e9, kv_bytes=kv,
                   step_flops=flops_per_decode_step(model.args, b, context))
        row["step_tflops"] = row["step_flops"] / step_s / 1e12
        row["bw_pct"] = 100 * row["weight_gbps"] / copy_gbps if copy_gbps else None
        row["total_bw_pct"] = 100 * (per_token_bytes + kv) / step_s / 1e9 / copy_gbps if copy_gbps else None
        row.update(end_to_end(engine, prompts, cfg))
        out["batches"][str(b)] = row
        if "kernels" in row:
            k = row["kernels"]
            log(f"{label} B={b} kernels/step: " + (k.get("error") or ", ".join(
                f"{g} {us:.0f}" for g, us in k["group_us"].items()) + f" us (sum {k['sum_us']:.0f})"))
        log(f"{label} B={b}: step {row['decode_step_ms']:.3f} ms ({row['decode_tok_s']:.0f} tok/s, "
            f"{row['weight_gbps']:.0f} GB/s weights, {row['step_tflops']:.1f} TFLOP/s), TTFT {row['ttft_ms']:.2f} ms, "
            f"e2e {row['e2e_decode_tok_s'] or 0:.0f} tok/s")
    del engine
    gc.collect()  # the engine's cache and graphs go before the next precision allocates its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def quality_pointer() -> dict[str, str]:
    return {"status": "not measured here",
            "reason": "perplexity and next-token agreement of FP8 layouts vs bf16 need real weights: impl/fp8's "
                      "experiment measures them on SmolLM2-135M (results/<gpu>/fp8/); this model has random weights"}


def headline(dense: dict[str, Any], fp8: dict[str, Any], batches: list[str]) -> dict[str, Any]:
    """Speed-ups per batch with bootstrap intervals, their minimum, and batch-1 bandwidth."""
    sp, lo, hi = {}, {}, {}
    for b in batches:
        d, f = dense["batches"][b], fp8["batches"][b]
        sp[b] = d["decode_step_ms"] / f["decode_step_ms"]
        lo[b], hi[b] = ratio_interval(d["decode_rounds_ms"], f["decode_rounds_ms"])
    b1 = min(batches, key=int) if batches else None
    return {"fp8_decode_speedup": sp, "fp8_decode_speedup_lo": lo, "fp8_decode_speedup_hi": hi,
            "fp8_min_speedup_lo": min(lo.values()) if lo else None,
            "fp8_decode_speedup_b1": sp.get("1"), "fp8_decode_speedup_b1_lo": lo.get("1"),
            "bw_pct_b1": {"bf16": dense["batches"][b1]["bw_pct"] if b1 else None,
                          "fp8": fp8["batches"][b1]["bw_pct"] if b1 else None}}


def run(cfg: ExperimentConfig, table: choose.GemmTable | None = None) -> dict[str, Any]:
    from impl.common.calibrate import measure_copy_gbps

    t_start = time.perf_counter()
    deadline = t_start + cfg.budget_s if cfg.budget_s else None
    args = ModelArgs.from_name(cfg.preset)
    dtype = getattr(torch, cfg.dtype)
    copy_gbps = measure_copy_gbps() if cfg.device == "cuda" else None
    log(f"{cfg.preset}: {args}; copy bandwidth {copy_gbps and round(copy_gbps)} GB/s")
    t0 = time.perf_counter()
    model = randomize_(Transformer(args, dtype=dtype, device=cfg.device).eval(), seed=0)
    log(f"random {cfg.dtype} weights in {time.perf_counter() - t0:.1f} s")
    half = None if deadline is None else t_start + cfg.budget_s / 2
    results = {"bf16" if dtype == torch.bfloat16 else cfg.dtype: run_precision(model, "dense", cfg, copy_gbps, half)}
    dense_key = next(iter(results))
    if table is not None:
        choose.use_table(table)
    table = choose.active_table()
    t0 = time.perf_counter()
    fp8_adapter.quantize_model_(model)
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    log(f"quantised the decoder linears to FP8 in {time.perf_counter() - t0:.1f} s ({table.describe()})")
    results["fp8"] = run_precision(model, "fp8", cfg, copy_gbps, deadline)
    dense, fp8 = results[dense_key], results["fp8"]
    both = [b for b in map(str, cfg.batches) if b in dense["batches"] and b in fp8["batches"]]
    return {"config": asdict(cfg), "model_args": asdict(args), "copy_gbps": copy_gbps, "dense_key": dense_key,
            **results, **headline(dense, fp8, both),
            "gemm_table": {"describe": table.describe(), "data": table.to_data()},
            "selected_in_run": table.selected_in_run, "run_id": uuid.uuid4().hex[:12],
            "fp8_e2e_speedup_b1": ((fp8["batches"].get("1") or {}).get("e2e_decode_tok_s") or 0)
            / max((dense["batches"].get("1") or {}).get("e2e_decode_tok_s") or 1e-9, 1e-9),
            "fp8_weight_mem_ratio": fp8["linear_weight_bytes"] / dense["linear_weight_bytes"],
            "fp8_weight_mem_ratio_total": fp8["weight_bytes"] / dense["weight_bytes"],
            "tokens_per_s": {k: {b: r["decode_tok_s"] for b, r in results[k]["batches"].items()} for k in results},
            "ttft_ms": {k: {b: r["ttft_ms"] for b, r in results[k]["batches"].items()} for k in results},
            "complete": len(both) == len(cfg.batches),
            "wall_s": time.perf_counter() - t_start, "quality": quality_pointer()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.serve.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="batches 1, 32 and 128 only, fewer repetitions")
    mode.add_argument("--smoke", action="store_true", help="toy model on the CPU; prints, writes nothing")
    p.add_argument("--gemm-table", default=None, help="a tune run's gemm_table.json (default: this card's stored one)")
    p.add_argument("--budget-s", type=float, default=0.0, help="skip batch sizes that would start after this")
    a = p.parse_args(argv)
    table = choose.GemmTable.load(a.gemm_table) if a.gemm_table else None
    if a.smoke:
        print(json.dumps(run(SMOKE, table), default=str))
        return 0
    if not backend.ON_GPU:
        print("the serve experiments need a CUDA GPU (use --smoke on a CPU)", file=sys.stderr)
        return 2
    from impl.common.results import write_result

    data = run(replace(QUICK if a.quick else FULL, budget_s=a.budget_s), table)
    path = write_result("serve", "decode_fp8_vs_bf16", data, overwrite=True)
    log(f"wrote {path} in {data['wall_s']:.0f} s: FP8 speed-up per batch "
        + ", ".join(f"B={b} {v:.2f}x (lo {data['fp8_decode_speedup_lo'][b]:.2f})"
                    for b, v in data["fp8_decode_speedup"].items())
        + f"; bandwidth at B=1 {data['bw_pct_b1']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
