"""Load test of the OpenAI-style endpoint: a bounded client on 127.0.0.1, continuous batching vs one at a time.

    python3 -m impl.serve.loadtest --model smollm2 [--concurrency 64 --requests 512 --max-tokens 32 --budget-s 240]
    python -m impl.serve.loadtest --smoke          (tiny random FP8 model on the CPU; prints, writes nothing)

The model (SmolLM2-135M-Instruct in FP8, made here from its bf16 checkpoint by impl.fp8's quantizer in the
``vllm-channel`` layout; or the tiny random model) serves with every linear batch-invariant
(``choose.make_batch_invariant``): a request's greedy tokens then do not depend on the batch it shares. Prompts are
token ids of mixed lengths (log-uniform in [--min-prompt, --max-prompt], fixed seed). Two servers run in turn on the
same model and the same load: ``continuous`` (``max_batch`` = --max-batch: requests join and leave the running
batch; waiting requests are prefilled together every --admit-every decode steps) and ``one_at_a_time``
(``max_batch`` = 1: each request alone). Each first serves a warm-up load (kernels compiled, CUDA graphs captured
for every batch size), then the measured one: --requests requests, at most --concurrency in flight, each
``{"prompt": ids, "max_tokens": N, "temperature": 0}``, from a client in its own process (``loadclient.py``);
every request has a client timeout and new requests stop at the budget (the record then says ``complete: false``).

Per mode: requests/s and completion tokens/s over the wall time, client latency p50/p99, and TTFT p50/p99 as the
engine measures it (arrival to first sampled token, from its completions). ``batching_gain`` = continuous requests/s
over one-at-a-time requests/s; ``greedy_identical`` = the fraction of requests whose tokens are the same in both
modes (one at a time is each prompt alone). Each mode also records the engine's steps over the measured load (prefill
and decode steps, tokens, seconds in each), the engine thread's seconds in steps / in between / idle, and
``engine_alone`` the same prompts through ``Engine.generate`` with no server or client, so the endpoint's own overhead
shows beside the engine's, with one prefill step and one decode step profiled (kernel time against host time,
``impl.serve.profile``). Written to ``results/<card>/serve/endpoint_<model>.json`` on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

import impl  # noqa: F401
import torch

from impl import backend
from impl.common.log import logger
from impl.serve.engine import Engine, EngineConfig
from impl.serve.loadclient import drive_in_process, percentile
from impl.serve.profile import profile_steps
from impl.serve.sampling import SamplingParams


@dataclass(frozen=True)
class LoadConfig:
    model: str = "smollm2"
    concurrency: int = 64
    requests: int = 512
    max_tokens: int = 32
    min_prompt: int = 8
    max_prompt: int = 256
    max_batch: int = 64
    page_size: int = 16
    warmup_requests: int = 128
    timeout_s: float = 120.0
    budget_s: float = 240.0
    seed: int = 0
    admit_every: int = 8


OPTIONS = ("concurrency", "requests", "max_tokens", "min_prompt", "max_prompt", "max_batch", "budget_s",
           "admit_every")  # LoadConfig fields the command line may set
SMOKE = LoadConfig(model="tiny", concurrency=6, requests=12, max_tokens=4, min_prompt=2, max_prompt=20, max_batch=6,
                   page_size=4, warmup_requests=2, timeout_s=120.0, budget_s=600.0)


log = logger("serve.loadtest", to_stderr=True)


def make_prompts(cfg: LoadConfig, vocab: int, n: int, seed: int) -> list[list[int]]:
    """n prompts of token ids, lengths log-uniform in [min_prompt, max_prompt], ids uniform in [0, vocab)."""
    rng = random.Random(seed)
    lo, hi = math.log(cfg.min_prompt), math.log(cfg.max_prompt)
    return [[rng.randrange(vocab) for _ in range(int(round(math.exp(rng.uniform(lo, hi)))))] for _ in range(n)]


def load_model(cfg: LoadConfig) -> tuple[Any, str]:
    """(model with FP8 decoder linears, made batch-invariant; its name)."""
    from impl.serve import choose, fp8_adapter

    if cfg.model == "tiny":
        from fixtures.serve import tiny_model

        model = fp8_adapter.quantize_model_(tiny_model())
    elif cfg.model == "smollm2":
        from impl.serve.weights import load_model as load_dir

        model = load_dir(fp8_adapter.smollm2_fp8_dir("vllm-channel"), dtype=torch.bfloat16, device="cuda")
    else:
        raise ValueError(f"unknown model {cfg.model!r}: smollm2 or tiny")
    choose.make_batch_invariant(model)
    return model, cfg.model


class CompletionLog(dict):
    """The engine's ``done`` dict, also keeping every completion put in it (the server pops them)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def __setitem__(self, key: Any, value: Any) -> None:
        self.seen.append(value)
        super().__setitem__(key, value)


@contextmanager
def serving(engine: Engine, name: str) -> Iterator[tuple[str, Any]]:
    """The endpoint on 127.0.0.1 (a free port) for the duration; its URL and its engine loop."""
    from impl.serve.server import make_server

    server = make_server(engine, name, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, name="loadtest-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.loop
    finally:
        server.shutdown()
        server.server_close()
        server.loop.close()
        thread.join(timeout=10)


def summarize(results: list[dict[str, Any] | None], wall: float, ttfts: list[float]) -> dict[str, Any]:
    ok = [r for r in results if r is not None and r.get("status") == 200]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(len(r["tokens"]) for r in ok)
    return {"sent": sum(r is not None for r in results), "ok": len(ok), "wall_s": wall,
            "errors": [r["error"] for r in results if r is not None and r.get("status") != 200][:5],
            "requests_per_s": len(ok) / wall if wall > 0 else None, "tokens_per_s": tokens / wall if wall > 0 else None,
            "completion_tokens": tokens, "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
            "latency_mean_s": statistics.fmean(lat) if lat else None,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99), "latencies_s": lat,
            "sent_s": [r["sent_s"] for r in ok], "ttfts_s": ttfts}


def make_engine(model: Any, cfg: LoadConfig, max_batch: int) -> Engine:
    max_len = cfg.max_prompt + cfg.max_tokens + 8
    return Engine(model, EngineConfig(page_size=cfg.page_size, max_batch=max_batch, max_seq_len=max_len,
                                      num_pages=max_batch * -(-max_len // cfg.page_size) + 8, seed=cfg.seed,
                                      admit_every=cfg.admit_every))


def run_engine_alone(model: Any, cfg: LoadConfig, prompts: list[list[int]]) -> dict[str, Any]:
    """The same prompts through ``Engine.generate`` with no server or client (all queued at once): the engine's own
    tokens/s and its time in prefill and decode steps, to tell the endpoint's overhead from the engine's; then
    ``profile``: one step prefilling the first ``max_batch`` prompts and one decode step, profiled
    (``impl.serve.profile``: kernel time against host time)."""
    engine = make_engine(model, cfg, cfg.max_batch)
    params = SamplingParams(max_new_tokens=cfg.max_tokens)
    engine.capture_graphs()  # as the server does before its first request
    engine.generate(prompts[: cfg.concurrency], params)  # warm-up: kernels
    before = dict(engine.stats)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    steps = since(engine.stats, before)
    tokens = sum(len(o.tokens) for o in outs)
    log(f"engine alone: {len(outs)} requests, {tokens} tokens in {wall:.2f} s ({tokens / wall:.0f} tok/s); "
        f"prefill {steps['prefill_steps']} steps {steps['prefill_s']:.2f} s, decode {steps['decode_steps']} steps "
        f"{steps['decode_s']:.2f} s")
    try:
        profile = profile_steps(engine, prompts[: cfg.max_batch],
                                SamplingParams(max_new_tokens=max(3, cfg.max_tokens), stop_token_ids=()))
    except Exception as e:  # noqa: BLE001  (the profiler (CUPTI) failing costs the profile, not the measured load)
        log(f"step profile failed: {type(e).__name__}: {e}")
        profile = {"error": f"{type(e).__name__}: {e}"}
    for name in ("first", "decode"):
        if name in profile:
            d = profile[name]
            log(f"profiled {name} step: {d['wall_s'] * 1e3:.2f} ms, kernels {d['kernel_s'] * 1e3:.2f} ms "
                f"({d['kernels']} kernels, {d['launches']} launches)")
    return {"wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else None,
            "steps": steps, "errors": [o.error for o in outs if o.error][:5], "profile": profile}


def since(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Counters accumulated since the ``before`` snapshot."""
    return {k: v - before[k] for k, v in now.items()}


def thread_seconds(now: dict[str, float], before: dict[str, float], wall: float) -> dict[str, float]:
    """The engine thread's seconds in steps and in between over the measured load; idle = the client's wall time
    less both (the thread's own idle count also holds the client process's start)."""
    d = since(now, before)
    return {"step": d["step"], "other": d["other"], "idle": max(0.0, wall - d["step"] - d["other"])}


def run_mode(model: Any, name: str, cfg: LoadConfig, max_batch: int, prompts: list[list[int]],
             deadline: float) -> tuple[dict[str, Any], list[dict[str, Any] | None]]:
    """Warm-up load, then the measured load, on a fresh engine with ``max_batch``."""
    engine = make_engine(model, cfg, max_batch)
    with serving(engine, name) as (url, loop):
        warm = make_prompts(cfg, model.args.vocab_size, cfg.warmup_requests, cfg.seed + 1)
        t0 = time.perf_counter()
        drive_in_process(url, warm, cfg.concurrency, min(cfg.max_tokens, 8), cfg.timeout_s,
                         max(0.0, deadline - time.perf_counter()))
        log(f"max_batch={max_batch}: warm-up of {len(warm)} requests in {time.perf_counter() - t0:.1f} s")
        engine.done = CompletionLog()  # the measured completions from here on (the engine thread is idle now)
        before, loop_before = dict(engine.stats), dict(loop.seconds)
        results, wall = drive_in_process(url, prompts, cfg.concurrency, cfg.max_tokens, cfg.timeout_s,
                                         max(0.0, deadline - time.perf_counter()))
        ttfts = [c.ttft_s for c in engine.done.seen if c.ttft_s is not None]
        summary = summarize(results, wall, ttfts)
        steps = since(engine.stats, before)
        summary.update(max_batch=max_batch, engine=engine.describe(), decode_steps=steps["decode_steps"],
                       steps=steps, engine_thread_s=thread_seconds(loop.seconds, loop_before, wall))
    log(f"max_batch={max_batch}: {summary['ok']}/{len(prompts)} ok in {wall:.1f} s, "
        f"{summary['requests_per_s'] or 0:.1f} req/s, {summary['tokens_per_s'] or 0:.0f} tok/s, "
        f"p50 {summary['latency_p50_s'] or 0:.3f} s, p99 {summary['latency_p99_s'] or 0:.3f} s")
    return summary, results


def run(cfg: LoadConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    deadline = t_start + cfg.budget_s
    model, name = load_model(cfg)
    log(f"{name} loaded and made batch-invariant in {time.perf_counter() - t_start:.1f} s")
    prompts = make_prompts(cfg, model.args.vocab_size, cfg.requests, cfg.seed)
    modes: dict[str, Any] = {}
    outs: dict[str, list] = {}
    # one-at-a-time first: its budget share is capped at half, so the continuous run always gets its turn
    half = t_start + cfg.budget_s / 2 + (time.perf_counter() - t_start) / 2
    modes["one_at_a_time"], outs["one_at_a_time"] = run_mode(model, name, cfg, 1, prompts, half)
    modes["continuous"], outs["continuous"] = run_mode(model, name, cfg, cfg.max_batch, prompts, deadline)
    both = [(a, b) for a, b in zip(outs["continuous"], outs["one_at_a_time"])
            if a is not None and b is not None and a.get("status") == 200 and b.get("status") == 200]
    same = sum(a["tokens"] == b["tokens"] for a, b in both)
    c, s = modes["continuous"], modes["one_at_a_time"]
    complete = c["ok"] == s["ok"] == cfg.requests
    if deadline - time.perf_counter() > 20:
        modes["engine_alone"] = run_engine_alone(model, cfg, prompts)
    return {"config": asdict(cfg), "model": name, "modes": modes,
            "prompt_lengths": [len(p) for p in prompts],
            "batching_gain": (c["requests_per_s"] / s["requests_per_s"]) if s["requests_per_s"] else None,
            "tokens_per_s": c["tokens_per_s"], "requests_per_s": c["requests_per_s"],
            "compared": len(both), "greedy_identical": same / len(both) if both else None,
            "first_mismatch": next((i for i, (a, b) in enumerate(both) if a["tokens"] != b["tokens"]), None),
            "complete": complete, "wall_s": time.perf_counter() - t_start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.serve.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=LoadConfig.model, choices=["smollm2", "tiny"])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU at toy load; prints, writes nothing")
    for field in OPTIONS:
        p.add_argument("--" + field.replace("_", "-"), type=type(getattr(LoadConfig, field)), default=None)
    a = p.parse_args(argv)
    cfg = SMOKE if a.smoke else LoadConfig(model=a.model)
    cfg = replace(cfg, **{f: getattr(a, f) for f in OPTIONS if getattr(a, f)})
    if not a.smoke and not backend.ON_GPU:
        print("the endpoint load test needs a CUDA GPU (use --smoke on a CPU)", file=sys.stderr)
        return 2
    data = run(cfg)
    if a.smoke:
        print(json.dumps(data, default=str))
        return 0
    from impl.common.results import write_result

    path = write_result("serve", f"endpoint_{cfg.model}", data, overwrite=True)
    log(f"wrote {path}: {data['requests_per_s'] or 0:.1f} req/s, {data['tokens_per_s'] or 0:.0f} tok/s, batching "
        f"gain {data['batching_gain'] or 0:.2f}x, greedy identical {data['greedy_identical']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
