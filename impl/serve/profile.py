"""Where an engine step's time goes: torch.profiler around one step that prefills and one that only decodes.

``profile_steps(engine, prompts, params)`` queues ``prompts`` on an idle engine and profiles two of its steps:
``first`` (admits and prefills every prompt together, then decodes once) and ``decode`` (the step after: one decode
over the same batch). Per step: ``wall_s`` (host time of ``engine.step()``, the GPU drained before and after),
``kernel_s`` (sum of the kernels' device times), ``busy`` = kernel_s / wall_s, ``launches`` (kernel and graph
launches the host issued) and the kernels and host ops with the most time. A step with ``busy`` far below 1 is bound
by the host (Python, launches, synchronizations); near 1, by the GPU. The prefill's own cost is about ``first`` less
``decode``. On a CPU there are no kernels: ``kernel_s`` is 0 and the host ops carry the time.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any, Sequence

import torch

from impl.serve.engine import Engine
from impl.serve.sampling import SamplingParams

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
TOP = 12


def summarize_events(events: Sequence[Any], wall_s: float, top: int = TOP) -> dict[str, Any]:
    """Kernel time, launches and the top kernels / host ops of one profiled window (``prof.events()``)."""
    kernels: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    host: Counter[str] = Counter()
    launches = 0
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] += e.time_range.elapsed_us() * 1e-6
            calls[e.name] += 1
        else:
            host[e.name] += e.self_cpu_time_total * 1e-6
            launches += e.name in LAUNCHES
    kernel_s = sum(kernels.values())
    return {"wall_s": wall_s, "kernel_s": kernel_s, "busy": kernel_s / wall_s if wall_s > 0 else None,
            "launches": launches, "kernels": sum(calls.values()),
            "top_kernels": [{"name": n[:120], "calls": calls[n], "s": s} for n, s in kernels.most_common(top)],
            "top_host_ops": [{"name": n[:120], "self_s": s} for n, s in host.most_common(top)]}


def keep_cupti_alive() -> None:
    """Keep CUPTI set up between profiled windows (process-wide). CUPTI torn down after one window and set up again
    for the next breaks with captured CUDA graphs (an H200 run ended in ``free(): invalid pointer`` at exit after two
    profiled engine steps); torch applies this same setting itself only to graphs captured through inductor."""
    os.environ["DISABLE_CUPTI_LAZY_REINIT"] = "1"
    os.environ["TEARDOWN_CUPTI"] = "0"


def profile_step(engine: Engine) -> dict[str, Any]:
    """One ``engine.step()`` under torch.profiler, summarized."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    if cuda:
        keep_cupti_alive()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        if cuda:
            torch.cuda.synchronize(engine.device)
        t0 = time.perf_counter()
        engine.step()
        if cuda:
            torch.cuda.synchronize(engine.device)
        wall = time.perf_counter() - t0
    return summarize_events(prof.events(), wall)


def profile_steps(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    """``first`` (prefill of every prompt + one decode) and ``decode`` steps of ``engine`` (module doc)."""
    if engine.has_unfinished():
        raise ValueError("profile_steps needs an idle engine: its first step must be the prefill of these prompts")
    if params.max_new_tokens < 3:
        raise ValueError("profile_steps needs max_new_tokens >= 3 so that the decode step has the whole batch")
    ids = [engine.add_request(p, params) for p in prompts]
    first = profile_step(engine)
    decode = profile_step(engine)
    while engine.has_unfinished():
        engine.step()
    for i in ids:
        engine.done.pop(i, None)
    return {"prompts": len(prompts), "prompt_tokens": sum(len(p) for p in prompts), "first": first, "decode": decode}
