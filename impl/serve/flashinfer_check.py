"""flashinfer's paged decode and prefill beside the Triton kernels, on the same KV cache: checked, then timed.

    python3 -m impl.serve.flashinfer_check --out DIR [--site /tmp/fisite] [--budget-s 240]

1. availability: ``import flashinfer`` (after ``site.addsitedir(--site)``, where ``flashinfer_setup install`` put the
   wheels); a failure is recorded with the step and the exact error, and the run still times Triton;
2. correctness, per backend: a decode step and a prefill (with a chunk after cached tokens) on a fragmented paged cache
   (unused rows NaN), 8B head shapes (32 query / 8 KV heads of 128), bf16, against the float64 reference
   (``attention.paged_attention_reference``); a backend that fails is not timed;
3. timing: the device time of one layer's attention (queued, L2 flushed, median), flashinfer's ``plan`` outside the
   timed call (serving plans once per step for all layers; ``plan_us`` records its host time), at decode B x context
   1 x 4096, 32 x 1024, 128 x 1024 and prefill 4 x 1024, 1 x 4096 (the bench's cases);
   plus, for the record, the Triton decode with other split-KV chunk lengths and key blocks
   (``DECODE_SPLIT_CANDIDATES``, each checked first) beside the default ``SplitRule`` (its chunk slots and programs
   per head recorded per case);
4. choice: ``attention.choose_phases`` on the decode 32 x 1024 and prefill 4 x 1024 times, as ``auto`` decides at
   engine start (decode stays graph-safe).

Writes ``DIR/attention_backends.json`` (and ``results/<card>/serve/`` through ``write_result``); prints a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import site
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import impl  # noqa: F401
import torch

from impl import backend
from impl.common.log import logger
from impl.common.shapes import LLAMA3_8B
from impl.serve.triton_attention import PrefillTiles

HEADS, KV_HEADS, HEAD_DIM = LLAMA3_8B.n_heads, LLAMA3_8B.n_kv_heads, LLAMA3_8B.head_dim
DECODE = [(1, 4096), (32, 1024), (128, 1024)]
PREFILL = [(4, 1024), (1, 4096)]
PAGE = 16  # tokens per KV page of every cache built here
REFERENCE_CASES = {"decode": "32x1024", "prefill": "4x1024"}  # the cases choose_phases judges (B x length)
# (B, context, min_chunk, block_n): split-KV decodes with other chunk lengths, timed beside the default rule
# (min_chunk 256, block_n 64); a min_chunk of at least the context runs the one-pass kernel
DECODE_SPLIT_CANDIDATES = [(1, 4096, 128, 64), (1, 4096, 64, 64), (1, 4096, 128, 32), (1, 4096, 512, 64),
                           (32, 1024, 1024, 64), (32, 1024, 128, 64), (128, 1024, 1024, 64)]
PREFILL_TILE_CANDIDATES = [PrefillTiles(128, 128, 8, 2), PrefillTiles(128, 64, 8, 2), PrefillTiles(128, 64, 8, 3),
                           PrefillTiles(64, 64, 4, 3), PrefillTiles(128, 128, 8, 4)]


log = logger("serve.flashinfer_check")


def flashinfer_status(site_dir: str | None) -> dict[str, Any]:
    if site_dir:
        site.addsitedir(site_dir)  # runs the CuTe DSL's .pth too
    try:
        import flashinfer
    except Exception as e:
        return {"available": False, "step": "import flashinfer", "error": f"{type(e).__name__}: {e}"}
    return {"available": True, "version": getattr(flashinfer, "__version__", "?"),
            "path": str(Path(flashinfer.__file__).parent)}


def inputs(batch: int, length: int, q_len: int, seed: int, dtype: torch.dtype) -> tuple[Any, Any, torch.Tensor]:
    from impl.serve.model import ModelArgs
    from fixtures.serve import fill_sequences, fragmented_cache, step_metadata

    args = ModelArgs(dim=HEADS * HEAD_DIM, n_layers=1, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                     ffn_dim=8, vocab_size=8)
    lengths = [length] * batch
    cache = fragmented_cache(args, lengths, PAGE, seed=seed, dtype=dtype, device="cuda")
    fill_sequences(cache, lengths, 0, seed=seed)
    meta = step_metadata(cache, lengths, [q_len] * batch, "cuda")
    q = torch.randn(batch * q_len, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)
    return cache, meta, q


def check(be: Any, dtype: torch.dtype, phases: tuple[str, ...] = ("decode", "prefill")) -> dict[str, Any]:
    """Decode (3 x 200) and prefill (2 x 96 new after 37 cached) against float64, within 3e-2 (bf16); ``phases``
    picks which."""
    from impl.serve.attention import paged_attention_reference
    from impl.serve.model import ModelArgs
    from fixtures.serve import fill_sequences, fragmented_cache

    out = {}
    for phase, lengths, q_lens in (("decode", [200, 17, 333], [1, 1, 1]), ("prefill", [133, 96], [96, 96])):
        if phase not in phases:
            continue
        args = ModelArgs(dim=HEADS * HEAD_DIM, n_layers=1, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                         ffn_dim=8, vocab_size=8)
        cache = fragmented_cache(args, lengths, PAGE, seed=7, dtype=dtype, device="cuda")
        fill_sequences(cache, lengths, 0, seed=7)
        meta = cache.metadata([(b, n - q, q) for b, (n, q) in enumerate(zip(lengths, q_lens))], "cuda")
        q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(8)).to("cuda", dtype)
        scale = HEAD_DIM ** -0.5
        got = be.attend(q, cache.k[0], cache.v[0], meta, scale=scale).double().cpu()
        ref = paged_attention_reference(q, cache.k[0], cache.v[0], meta, scale=scale)
        err = (got - ref).abs()
        bound = 3e-2 + 3e-2 * ref.abs()
        out[phase] = {"ok": bool(torch.isfinite(got).all() and (err <= bound).all()),
                      "max_abs_err": float(err.nan_to_num(float("inf")).max())}
    return out


def time_case(be: Any, batch: int, length: int, q_len: int, dtype: torch.dtype, reps: int) -> dict[str, float]:
    from impl.common.timing import time_fn

    cache, meta, q = inputs(batch, length, q_len, seed=batch, dtype=dtype)
    fn = lambda: be.attend(q, cache.k[0], cache.v[0], meta, scale=HEAD_DIM ** -0.5)  # noqa: E731
    t0 = time.perf_counter()
    fn()  # plans (flashinfer) and compiles
    first_s = time.perf_counter() - t0
    plan_us = None
    if hasattr(be, "_plan"):
        t0 = time.perf_counter()
        be._plan(q, cache.k[0], meta, HEAD_DIM ** -0.5)
        torch.cuda.synchronize()
        plan_us = 1e6 * (time.perf_counter() - t0)
    t = time_fn(fn, warmup=2, reps=reps, queue_ahead=True)
    kv_bytes = 2 * batch * length * KV_HEADS * HEAD_DIM * cache.k.element_size()
    return {"median_us": 1e3 * t.median_ms, "rounds_us": [1e3 * v for v in t.times_ms], "first_call_s": first_s,
            "plan_us": plan_us, "kv_gbps": kv_bytes / (t.median_ms * 1e-3) / 1e9}


def run(site_dir: str | None, budget_s: float, reps: int) -> dict[str, Any]:
    from impl.serve.attention import choose_phases, make_backend

    t_start = time.perf_counter()
    dtype = torch.bfloat16
    status = flashinfer_status(site_dir)
    log(f"flashinfer: {status}")
    backends: dict[str, Any] = {"triton": make_backend("triton")}
    if status["available"]:
        try:
            backends["flashinfer"] = make_backend("flashinfer")
        except Exception as e:
            status.update(available=False, step="make the flashinfer wrappers", error=f"{type(e).__name__}: {e}")
    checks, timings = {}, {}
    for name, be in list(backends.items()):
        try:
            checks[name] = check(be, dtype)
        except Exception as e:
            checks[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            traceback.print_exc()
        if not all(v.get("ok") for v in checks[name].values() if isinstance(v, dict)) or "error" in checks[name]:
            log(f"{name} failed its check: {checks[name]}")
            if name == "flashinfer":
                status.update(step="check against float64", error=json.dumps(checks[name])[:400])
            del backends[name]
    for name, be in backends.items():
        timings[name] = {"decode": {}, "prefill": {}}
        for phase, cases in (("decode", DECODE), ("prefill", PREFILL)):
            for b, n in cases:
                if time.perf_counter() - t_start > budget_s:
                    timings[name][phase][f"{b}x{n}"] = {"skipped": "budget"}
                    continue
                try:
                    timings[name][phase][f"{b}x{n}"] = time_case(be, b, n, 1 if phase == "decode" else n, dtype, reps)
                except Exception as e:
                    timings[name][phase][f"{b}x{n}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                log(f"{name} {phase} {b}x{n}: {timings[name][phase][f'{b}x{n}']}")
    if "triton" in backends:  # other launch settings beside the defaults, for the record (the defaults are judged)
        from impl.common.timing import sm_count
        from impl.serve.attention import TritonPagedAttention
        from impl.serve.triton_attention import SplitRule, decode_chunks, decode_splits

        for b, n in DECODE:  # the default rule's chunk slots and programs per head
            r = timings["triton"]["decode"].get(f"{b}x{n}", {})
            r["chunks"] = decode_chunks(-(-n // PAGE) * PAGE)
            r["programs_per_head"] = decode_splits(b, KV_HEADS, -(-n // PAGE) * PAGE, sm_count())
        candidates = [(f"triton_prefill_tiles_{t.block_m}x{t.block_n}w{t.num_warps}s{t.num_stages}", "prefill", b, n,
                       TritonPagedAttention(prefill_tiles=t)) for t in PREFILL_TILE_CANDIDATES for b, n in PREFILL]
        candidates += [(f"triton_decode_chunk{c}_n{bn}", "decode", b, n,
                        TritonPagedAttention(split_rule=SplitRule(min_chunk=c), decode_block_n=bn))
                       for b, n, c, bn in DECODE_SPLIT_CANDIDATES]
        checked: dict[str, dict[str, Any]] = {}  # one float64 check per candidate setting, in its own phase
        for key, phase, b, n, be in candidates:
            cell = timings.setdefault(key, {phase: {}})[phase]
            if time.perf_counter() - t_start > budget_s:
                continue
            try:  # a candidate that fails its float64 check or does not fit (shared memory) is recorded, not fatal
                ok = checked[key] if key in checked else checked.setdefault(key, check(be, dtype, (phase,))[phase])
                cell[f"{b}x{n}"] = (time_case(be, b, n, 1 if phase == "decode" else n, dtype, reps) if ok["ok"]
                                    else {"error": f"failed the float64 check: {ok}"})
            except Exception as e:
                cell[f"{b}x{n}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    choice, ratios = None, {}
    keys = REFERENCE_CASES
    per_phase = {n: {p: timings[n][p].get(keys[p], {}).get("median_us") for p in keys} for n in backends}
    usable = {n: t for n, t in per_phase.items() if all(v is not None for v in t.values())}
    if usable:
        chosen, why = choose_phases(usable, {n: backends[n] for n in usable})
        choice = {"backend": chosen.name, "reason": why}
    if "flashinfer" in usable and "triton" in usable:
        ratios = {p: usable["triton"][p] / usable["flashinfer"][p] for p in keys}
    measured = "flashinfer" in usable
    return {"flashinfer": status, "flashinfer_status": "measured" if measured else "not measured",
            "flashinfer_reason": None if measured else f"{status.get('step', 'timing')}: "
                                                          f"{status.get('error', 'no timing for the reference cases')}",
            "checks": checks, "timings": timings, "reference_cases": keys, "auto_choice": choice,
            "triton_over_flashinfer": ratios, "complete": measured and all(  # the backends' cases (not candidates)
                "median_us" in r for n in backends for ph in timings[n].values() for r in ph.values()),
            "wall_s": time.perf_counter() - t_start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.serve.flashinfer_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--site", default=None, help="where flashinfer_setup installed the wheels (e.g. /tmp/fisite)")
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    if not backend.ON_GPU:
        print("the attention comparison needs a CUDA GPU", file=sys.stderr)
        return 2
    from impl.common.results import write_result

    data = run(a.site, a.budget_s, a.reps)
    path = write_result("serve", "attention_backends", data, overwrite=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, out / path.name)
    for name, t in data["timings"].items():
        for phase, cases in t.items():
            print(f"{name:10} {phase:7} " + "  ".join(f"{c}: {r.get('median_us', float('nan')):.1f} us"
                                                   for c, r in cases.items()))
    print(f"flashinfer: {data['flashinfer_status']} ({data['flashinfer_reason'] or data['flashinfer'].get('version')})")
    print(f"auto: {data['auto_choice']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
