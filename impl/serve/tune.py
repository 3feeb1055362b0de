"""Measure which GEMM serves each FP8 projection at each batch size; store the table serving loads (``choose.py``).

    python3 -m impl.serve.tune --out DIR [--budget-s 150] [--ms 1,8,32,64,128,256]    (GPU)
    python -m impl.serve.tune --smoke --out DIR                                       (CPU, toy sizes)

For each projection of one decoder layer (``wqkv``, ``wo``, ``w13``, ``w2`` of ``--preset``; ``w2`` as the model
calls it, on gu = [gate | up] with SwiGLU fused or run first) and each M:

1. candidates: W8A16 configurations of ``fp8_gemv`` (CUDA-core tiles at M = 1, tensor-core tiles with deep cp.async
   pipelines from M = 1 on, each with Triton's e4m3 decoder and with the bit decoder (``bits``), the bit decoder's
   tiles up to M = 8 also with an L2 bulk prefetch of their first codes (``prefetch``), split-K
   counts, FP8-activation tensor-core tiles for large M, and the rule's ``default_config``), impl.fp8's W8A8 path
   (``inner``: per-token activation quantisation + row-wise ``torch._scaled_mm``), the ``deferred`` W8A8 path
   (``fp8_gemv.unit_scaled_mm``: the per-tensor GEMM with unit scales, timed without its consumer, the fused kernel
   after it, which applies the scales as it loads) and bf16 cuBLAS as the anchor; W8A8 paths
   are timed as the model runs them: ``wqkv`` and ``w13`` take the FP8 rows their RMSNorm makes (``fused_quant``;
   no quantisation of their own), ``w2`` quantises in its SwiGLU kernel, ``wo`` runs impl.fp8's quantiser;
2. every W8A16 kernel is compiled first, in parallel worker processes that fill Triton's disk cache;
3. check: each candidate on fresh random x against float64 x · (s ⊙ q)ᵀ (W8A16 outputs poisoned with NaN first),
   within its stated bound (``error_bound``); a failing or crashing candidate is reported and dropped;
4. time: device time of the call queued behind a held stream (``time_fn(queue_ahead=True)``), L2 flushed before
   each call, median of ``--reps``;
5. choose: the fastest checked FP8 candidate per (projection, M) goes into the ``GemmTable``.

Then a batch-1 decode step (CUDA graph) of the random-weight model: bf16, then FP8 with the rule, the measured table,
and the measured table with programmatic dependent launch (PDL), as measured and with its batch-1 W8A16 kernels
asking L2 for their first codes (``PREFETCH_MIB``) before they wait for the kernel ahead (so the weights stream while
the norms, RoPE and attention run), and the prefetch without PDL; a variant's logits must equal the plain step's bit
for bit, and the table takes the fastest step among those that do. Writes ``DIR/gemm_table.json``
(what serving loads: copy it to ``results/<card>/serve/``) and ``DIR/tune.json`` (every timing and check), and prints
a short table. Within ``--budget-s``: the decode comparison keeps ``--decode-reserve-s`` for itself; (projection, M)
pairs that do not fit are skipped (the rule serves them) and said so; anything that fails is recorded and skipped.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import impl  # noqa: F401
import torch

from impl import backend
from impl.common.log import logger
from impl.common.timing import time_fn
from impl.serve import fp8_adapter
from impl.serve.choose import GemmChoice, GemmTable
from impl.serve.fp8_gemv import DecodeFp8Linear, GemvConfig, default_config, gemv, new_counters, unit_scaled_mm
from impl.serve.fused import ScaledRows
from impl.serve.model import DenseLinear, ModelArgs
from impl.serve.records import fastest_read_us

PRIORITY = (1, 128, 256, 8, 32, 64)  # batch 1 (the decode claim) first, then the large-batch claims
SHARED_LIMIT = 220 << 10  # per block on sm_90 (227 KiB), less Triton's own scratch
MARGIN = 0.005  # a decode-step variant must be this much faster than the plain table to replace it (rounds: ~0.3%)
MMA_MAX_M = 8  # mma tiles above one 8-row tile lost 2-5x to the Triton tiles on an H100 (M 32, 64: L2 re-reads)
MMA_SHAPES = ((4, 8), (8, 8), (16, 8), (8, 4), (4, 16), (8, 16))  # (warps splitting K, 16-byte loads in flight a lane)
# one token: (warps a block, 512-byte row pieces in flight a warp, rows a warp, two register sets); H100 tune of the
# 8-row tiles: fewer loads in flight were faster (unroll 4 over 8 and 16), so the row kernel is tried at 2-8; there
# (H100, c0cfb1f) its best, r2-w8u2, took w2 in 28.5 us against the Triton tiles' 29.6 and wo in 12.05 against 11.98.
# With two register sets (pipe) a warp's next loads are in flight while it computes, not only between bursts.
MMA_ROW_SHAPES = ((8, 4, 1, False), (8, 8, 1, False), (16, 4, 1, False), (4, 8, 1, False), (8, 2, 2, False),
                  (8, 4, 2, False), (4, 4, 2, False), (8, 2, 1, True), (8, 4, 1, True), (16, 2, 1, True),
                  (8, 2, 2, True), (4, 4, 2, True))
# one token, sweep kernel: (warps a block, pieces in flight a warp, rows a block, two register sets): a block's warps
# read its rows' bytes in address order, so the grid has one read window a block, not one a warp
MMA_SWEEP_SHAPES = ((8, 4, 8, False), (8, 2, 8, True), (8, 4, 16, False), (16, 2, 16, True), (4, 4, 4, False))
# one token, W8A8 row kernel: (warps a block, pieces in flight a warp, rows a warp, two register sets): a lane's 16
# codes a piece go to two e4m3 mma steps as loaded, where the bf16 row kernel decodes them (8 ops per 4) for four
MMA_ROW_A8_SHAPES = ((8, 2, 2, False), (8, 4, 1, False), (8, 2, 1, True), (8, 4, 2, False))
PREFETCH_MIB = (16, 32)  # L2 prefetch sizes tried: per kernel (the first), and in the decode step with PDL (both)


@dataclass(frozen=True)
class TuneConfig:
    preset: str = "llama-3-8b"
    ms: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
    reps: int = 20
    warmup: int = 3
    budget_s: float = 150.0
    decode_reserve_s: float = 60.0
    workers: int = 12
    device: str = "cuda"
    dtype: str = "bfloat16"
    decode_step: bool = True
    smoke: bool = False


SMOKE = TuneConfig(preset="tiny", ms=(1, 8), reps=1, warmup=0, budget_s=900.0, decode_reserve_s=0.0,
                   workers=0, device="cpu", dtype="float32", smoke=True)


log = logger("serve.tune")


def projections(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear of one decoder layer."""
    return {"wqkv": (args.qkv_dim, args.dim), "wo": (args.dim, args.n_heads * args.head_dim),
            "w13": (2 * args.ffn_dim, args.dim), "w2": (args.dim, args.ffn_dim)}


# ---- candidates ------------------------------------------------------------------------------------------------

def _with_splits(base: list[GemvConfig], k: int, splits: tuple[int, ...]) -> list[GemvConfig]:
    out = []
    for cfg in base:
        chunks = -(-k // cfg.block_k)
        out += [replace(cfg, splits=s) for s in splits if s == 1 or s <= chunks // 2]
    return out


def candidate_configs(m: int, n: int, k: int, smoke: bool = False) -> list[GemvConfig]:
    """W8A16 (and FP8-activation) configurations worth timing for M rows of an [N, K] projection."""
    if smoke:  # one of each kind, split and not
        base = [GemvConfig(block_n=16, block_k=32, splits=2), GemvConfig(dot=True, block_n=16, block_k=32),
                GemvConfig(dot=True, bits=True, block_n=16, block_k=32, splits=2),
                GemvConfig(dot=True, bits=True, block_n=16, block_k=32, splits=2, prefetch=PREFETCH_MIB[0])]
        if m >= 8:
            base.append(GemvConfig(dot=True, a8=True, block_n=16, block_k=32))
        return base
    if m <= 8:  # CUDA-core tiles (batch 1 only) and tensor-core tiles with deep cp.async pipelines, both decoders
        fma = [GemvConfig(block_n=bn, block_k=bk, num_warps=w) for bn, bk, w in ((8, 512, 4), (16, 512, 8))]
        dot = [GemvConfig(dot=True, bits=b, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
               for bn, bk, w, st in ((32, 256, 4, 4), (64, 256, 8, 3), (64, 128, 4, 4), (128, 128, 8, 3),
                                     (64, 512, 8, 3))
               for b in (True, False)]
        prefetched = [replace(c, prefetch=PREFETCH_MIB[0]) for c in dot if c.bits]  # codes asked of L2 first
        # ncu at batch 1 (H200): 256-448 programs of 4 warps fill 0.3-0.6 of a wave and DRAM runs at 30-55%, and
        # more programs or deeper pipelines per program did not help; so also persistent programs (1 or 2 per SM),
        # each one pipeline over several tiles
        persistent = [GemvConfig(dot=True, bits=True, block_n=bn, block_k=bk, num_warps=w, num_stages=st, persistent=p)
                      for bn, bk, w, st in ((16, 256, 4, 4), (32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4),
                                            (64, 256, 8, 3))
                      for p in (1, 2)]
        cfgs = _with_splits((fma if m == 1 else []) + dot + prefetched, k, (1, 2, 4)) + persistent
    else:
        tiles = ((32, 128, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3))
        dot = [GemvConfig(dot=True, bits=b, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
               for bn, bk, w, st in tiles for b in (True, False)]
        # FP8-activation tiles: wide N tiles (more weight bytes per activation byte re-read from L2), deeper
        # pipelines, and up to 8 K splits (the N = 4096 projections have 16-64 N tiles for 132 SMs)
        a8 = [GemvConfig(dot=True, a8=True, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
              for bn, bk, w, st in ((64, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3),
                                    (128, 128, 8, 4), (64, 256, 4, 3))]
        cfgs = _with_splits(dot, k, (1, 2, 4) if m <= 64 else (1, 2)) + _with_splits(a8, k, (1, 2, 4, 8))
        if m > 128:  # two or four M tiles of the same weights (the second read mostly from L2)
            cfgs += [replace(c, block_m=bm) for c in dot[1:3] + a8[:2] for bm in (64, 128)]
    if m <= MMA_MAX_M and k % 16 == 0:  # the CUDA C++ tensor-core kernels: loads straight into registers, first
        rows = ([GemvConfig(mma=True, num_warps=w, unroll=u, row_run=r, pipe=p) for w, u, r, p in MMA_ROW_SHAPES]
                + [GemvConfig(mma=True, num_warps=w, unroll=u, sweep=r, pipe=p) for w, u, r, p in MMA_SWEEP_SHAPES]
                + [GemvConfig(mma=True, a8=True, num_warps=w, unroll=u, row_run=r, pipe=p)
                   for w, u, r, p in MMA_ROW_A8_SHAPES]
                if m == 1 else [])
        cfgs = rows + [GemvConfig(mma=True, num_warps=w, unroll=u) for w, u in MMA_SHAPES] + cfgs
    cfgs.append(default_config(m, n, k))
    fits = [c for c in dict.fromkeys(cfgs) if c.shared_bytes(m) <= SHARED_LIMIT]  # unique, in order
    return fits


# ---- numerics ----------------------------------------------------------------------------------------------------

def error_bound(kind: str, ref: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """Allowed |y - ref| per element, float64. ``a`` = |x| · |W|ᵀ (W the exact dequantised weight).

    w8a16 / bf16: x and W exact in the kernel's inputs, float32 sums (<= K 2^-24 a, taken as K 2^-22 a) and the
    output rounded to bf16 (2^-8 |ref|, taken as 2^-7 |ref|); inner / a8 / deferred add e4m3 activations (2^-4 a,
    taken as 1.05 · 2^-4 a): the bound impl.fp8's linear states for its W8A8 path, with margins for second-order
    terms; deferred rounds once more, before its scales (2^-8 of |ref| + 2^-4 a)."""
    bound = 2.0 ** -7 * ref.abs() + k * 2.0 ** -22 * a + 1e-30
    if kind in ("inner", "a8", "deferred"):
        bound = bound + 1.05 * 2.0 ** -4 * a
    if kind == "deferred":
        bound = bound + 2.0 ** -8 * (ref.abs() + 2.0 ** -4 * a)
    return bound


def reference(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x · (s ⊙ w)ᵀ, |x| · |s ⊙ w|ᵀ) in float64 on x's device."""
    wd = w.double() if s is None else w.double() * s.double().reshape(-1, 1)
    xd = x.double()
    return xd @ wd.T, xd.abs() @ wd.abs().T


# ---- one projection at one M -------------------------------------------------------------------------------------

@dataclass
class Subject:
    """A projection's weights: the bf16 original and its FP8 linear (codes, per-channel scales)."""

    name: str
    n: int
    k: int
    dense: DenseLinear
    fp8: DecodeFp8Linear
    swiglu: bool = False  # served as the model calls it: input gu = [gate | up] [M, 2K], product of silu_mul(gu)
    normed: bool = False  # its input comes from an RMSNorm, which hands W8A8 paths per-token FP8 rows at no cost


NORMED = ("wqkv", "w13")  # the projections an RMSNorm feeds (``model.TransformerBlock``)


def make_subject(name: str, n: int, k: int, dtype: torch.dtype, device: str, seed: int,
                 swiglu: bool = False) -> Subject:
    dense = DenseLinear(k, n, dtype, device)
    dense.weight.data.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(seed))
    fp8 = fp8_adapter.quantize_linear(dense)
    return Subject(name, n, k, dense, fp8, swiglu, normed=name in NORMED)


def runners(sub: Subject, x: torch.Tensor, configs: list[GemvConfig],
            out: torch.Tensor) -> list[tuple[str, str, GemvConfig | None, Callable[[], torch.Tensor]]]:
    """(name, kind, config, fn) for every candidate; W8A16 ones write into ``out`` (poisoned by the caller). Each
    candidate runs as serving runs it: with ``sub.swiglu`` x is gu and every candidate computes W · silu_mul(gu) (the
    bf16 anchor runs ``fused.silu_mul`` first; W8A8 paths take ``silu_mul_quant``'s FP8 rows; the W8A16 kernel fuses
    SwiGLU or runs it first, per config); with ``sub.normed`` the W8A8 paths (``inner`` row-wise, a8 tiles) take x
    already quantised per token, as the fused RMSNorm hands it over (quantised here once, outside the timing). The
    deferred path returns ``ScaledRows`` (checked through their ``dense()``)."""
    from impl.serve.fused import silu_mul
    from impl.serve.fused_quant import quantize_rows, silu_mul_quant

    lin = sub.fp8.inner
    q, s = lin.weight, lin.weight_scale
    cnt = new_counters(x.device)
    act = silu_mul if sub.swiglu else (lambda v: v)
    rowwise = lin.quantizes_per_token
    pre = quantize_rows(x) if sub.normed and not sub.swiglu else None

    def fp8_rows():  # W8A8 input as the model makes it: the SwiGLU kernel's, the norm's (free), or quantize_rows
        return silu_mul_quant(x) if sub.swiglu else pre if pre is not None else quantize_rows(x)

    def inner() -> torch.Tensor:
        if rowwise:
            r = fp8_rows()
            return lin.forward_fp8_rows(r.codes, r.scales)
        return lin(act(x))

    def deferred() -> ScaledRows:
        return unit_scaled_mm(fp8_rows(), q, sub.fp8.col_scale)

    rows = [("bf16", "bf16", None, lambda: sub.dense(act(x))), ("inner", "inner", None, inner)]
    if sub.fp8.can_defer and (rowwise or not x.is_cuda):  # a GPU with row-wise _scaled_mm has the per-tensor one
        rows.append(("deferred", "deferred", None, deferred))
    for cfg in configs:
        xin = pre if cfg.a8 and pre is not None else x
        rows.append((cfg.name, "a8" if cfg.a8 else "w8a16", cfg,
                     lambda cfg=cfg, xin=xin: gemv(xin, q, s, cfg, out=out, counters=cnt, swiglu=sub.swiglu)))
    return rows


def measure_pair(sub: Subject, m: int, cfg: TuneConfig, seed: int) -> dict[str, Any]:
    """Check and time every candidate for M rows of one projection."""
    dev = sub.dense.weight.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(m, 2 * sub.k if sub.swiglu else sub.k, generator=gen, device=dev).to(sub.dense.weight.dtype)
    q, s = sub.fp8.inner.weight, sub.fp8.inner.weight_scale
    if sub.swiglu:
        from impl.serve.fused import silu_mul

        x_in = silu_mul(x)  # the kernel's fused prologue rounds like this kernel, bit for bit
    else:
        x_in = x
    ref8, a8 = reference(x_in, q, s)
    ref16, a16 = reference(x_in, sub.dense.weight)
    out = torch.empty(m, sub.n, dtype=x.dtype, device=dev)
    w_bytes = fp8_adapter.weight_bytes(sub.fp8)
    rows = []
    for name, kind, gcfg, fn in runners(sub, x, candidate_configs(m, sub.n, sub.k, cfg.smoke), out):
        row: dict[str, Any] = {"candidate": name, "kind": kind, "config": gcfg.to_dict() if gcfg else None}
        try:
            out.fill_(float("nan"))
            y = fn()
            y = y.dense() if isinstance(y, ScaledRows) else y
            ref, a = (ref16, a16) if kind == "bf16" else (ref8, a8)
            err = (y.double() - ref).abs()
            ratio = float((err / error_bound(kind, ref, a, sub.k)).max()) if err.numel() else 0.0
            row["check"] = {"ok": bool(ratio <= 1.0) and bool(torch.isfinite(y).all()), "worst_of_bound": ratio}
            if not row["check"]["ok"]:
                rows.append(row)
                continue
            t = time_fn(fn, warmup=cfg.warmup, reps=cfg.reps, flush=True, queue_ahead=backend.ON_GPU)
            row["median_us"] = 1e3 * t.median_ms
            row["rounds_us"] = [1e3 * v for v in t.times_ms]
            bytes_w = fp8_adapter.weight_bytes(sub.dense) if kind == "bf16" else w_bytes
            row["weight_gbps"] = bytes_w / (t.median_ms * 1e-3) / 1e9
        except Exception as e:  # a candidate that does not compile or run is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    if m == 1:
        rows += read_anchors(q, cfg)
    return {"projection": sub.name, "n": sub.n, "k": sub.k, "m": m, "swiglu": sub.swiglu, "weight_bytes": w_bytes,
            "candidates": rows}


def read_anchors(q: torch.Tensor, cfg: TuneConfig) -> list[dict[str, Any]]:
    """The card's streaming reads of the same bytes, timed as the candidates are (L2 flushed, queued): ``torch.sum``
    over the codes viewed as float32 (``read_anchor``; the values are arbitrary bit patterns, only the read is the
    subject) and ``impl.common.stream_read``'s kernel (``stream_anchor``: 16-byte loads in flight over a grid-stride
    sweep). A batch-1 GEMV cannot beat reading its codes once; the faster read is the ceiling. On an H100 (tune of
    44df534) torch.sum read a 4096x4096 code matrix in 14.0 us and a 4096x14336 one in 27.3 us, the stream kernel in
    9.2 and 22.6 us, the best GEMVs took 11.9 and 28.2: a reduction is not the card's best read."""
    from impl.common.stream_read import stream_read

    flat = q.reshape(-1).view(torch.uint8)
    words = flat[: flat.numel() // 4 * 4].view(torch.float32)
    pieces = flat[: flat.numel() // 16 * 16]
    slots: dict[str, torch.Tensor] = {}  # the stream kernel's output, made by its first (untimed, warm-up) call

    def stream() -> None:
        slots["out"] = stream_read(pieces, slots.get("out"))

    rows = []
    for name, fn, nbytes in (("read_anchor", lambda: words.sum(), words.numel() * 4),
                             ("stream_anchor", stream, pieces.numel())):
        try:
            t = time_fn(fn, warmup=cfg.warmup, reps=cfg.reps, flush=True, queue_ahead=backend.ON_GPU)
            rows.append({"candidate": name, "kind": "anchor", "config": None, "median_us": 1e3 * t.median_ms,
                         "rounds_us": [1e3 * v for v in t.times_ms],
                         "weight_gbps": nbytes / (t.median_ms * 1e-3) / 1e9})
        except Exception as e:  # an anchor that cannot run is reported, not fatal
            rows.append({"candidate": name, "kind": "anchor", "config": None,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return rows


def best_fp8(pair: dict[str, Any]) -> dict[str, Any] | None:
    ok = [r for r in pair["candidates"] if r["kind"] not in ("bf16", "anchor") and "median_us" in r]
    return min(ok, key=lambda r: r["median_us"]) if ok else None


def choice_of(row: dict[str, Any]) -> GemmChoice:
    if row["kind"] in ("inner", "deferred"):
        return GemmChoice(row["kind"], None, "measured")
    return GemmChoice("w8a16", GemvConfig.from_dict(row["config"]), "measured")


# ---- compile in parallel -----------------------------------------------------------------------------------------

def _compile_one(job: tuple[dict, int, int, int, bool]) -> tuple[str, float, str | None]:
    """Worker: compile one (config, M, SwiGLU input or not) by running it once at the real shapes (fills Triton's
    disk cache)."""
    cfg_d, m, n, k, swiglu = job
    cfg = GemvConfig.from_dict(cfg_d)
    t0 = time.perf_counter()
    try:
        x = torch.randn(m, 2 * k if swiglu else k, device="cuda", dtype=torch.bfloat16)
        w = torch.zeros(n, k, device="cuda", dtype=torch.uint8).view(torch.float8_e4m3fn)
        gemv(x, w, torch.ones(n, device="cuda"), cfg, swiglu=swiglu)
        torch.cuda.synchronize()
        return cfg.name, time.perf_counter() - t0, None
    except Exception as e:
        return cfg.name, time.perf_counter() - t0, f"{type(e).__name__}: {str(e)[:200]}"


def precompile(jobs: list[tuple[dict, int, int, int, bool]], workers: int, deadline: float) -> dict[str, Any]:
    """Compile every distinct (config, M) kernel in ``workers`` processes (0: skip; kernels compile on first use)."""
    if workers <= 0 or not jobs:
        return {"workers": 0, "jobs": len(jobs)}
    t0, errors, done = time.perf_counter(), {}, 0
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    futures = [pool.submit(_compile_one, j) for j in jobs]
    try:
        for fut in as_completed(futures, timeout=max(1.0, deadline - time.perf_counter())):
            try:
                name, _, err = fut.result()
            except Exception as e:  # a worker that died: that kernel compiles in the main process when timed
                name, err = "?", f"{type(e).__name__}: {e}"
            done += 1
            if err:
                errors[name] = err
    except FuturesTimeout:
        errors["deadline"] = f"{len(jobs) - done} kernels not compiled in parallel in time (they compile when timed)"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return {"workers": workers, "jobs": len(jobs), "done": done, "errors": errors, "s": time.perf_counter() - t0}


# ---- the decode step ---------------------------------------------------------------------------------------------

def decode_step_comparison(cfg: TuneConfig, table: GemmTable) -> dict[str, Any]:
    """Batch-1 decode step (CUDA graph on a GPU) of the random-weight model: bf16, then FP8 per GEMM table."""
    from impl.serve.choose import set_model_table
    from impl.serve.experiments import ExperimentConfig, step_timings
    from impl.serve.model import Transformer
    from impl.serve.weights import randomize_

    exp = ExperimentConfig(preset=cfg.preset, batches=(1,), dtype=cfg.dtype, device=cfg.device,
                           reps=max(cfg.reps, 5) if not cfg.smoke else 1, prefill_reps=1,
                           prompt_len=128 if not cfg.smoke else 9, new_tokens=4)
    args = ModelArgs.from_name(cfg.preset)
    model = randomize_(Transformer(args, dtype=getattr(torch, cfg.dtype), device=cfg.device).eval(), seed=0)
    out: dict[str, Any] = {"bf16": step_timings(model, exp, 1)}
    log(f"decode step bf16: {out['bf16']['decode_step_ms']:.3f} ms")
    fp8_adapter.quantize_model_(model)
    variants = [("fp8_rule", GemmTable()), ("fp8_table", replace(table, pdl=False)),
                ("fp8_table_pdl", replace(table, pdl=True))]
    variants += [(f"fp8_table_pdl_f{mib}", replace(prefetch_batch1(table, mib), pdl=True)) for mib in PREFETCH_MIB]
    variants.append((f"fp8_table_f{PREFETCH_MIB[0]}", replace(prefetch_batch1(table, PREFETCH_MIB[0]), pdl=False)))
    logits: dict[str, torch.Tensor] = {}
    for name, tab in variants:
        if cfg.smoke and "pdl" in name:
            continue  # PDL exists only on the GPU
        set_model_table(model, tab)
        try:
            row = step_timings(model, exp, 1, keep_logits=True)
            logits[name] = row.pop("logits")
            out[name] = row
            log(f"decode step {name}: {row['decode_step_ms']:.3f} ms "
                f"({out['bf16']['decode_step_ms'] / row['decode_step_ms']:.2f}x bf16)")
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"decode step {name} failed: {out[name]['error']}")
    out.update(pick_variant(out, logits))
    for name, _ in variants:
        if "decode_step_ms" in out.get(name, {}):
            out[f"speedup_{name}"] = out["bf16"]["decode_step_ms"] / out[name]["decode_step_ms"]
    out["variant_tables"] = {name: tab.to_data() for name, tab in variants if name.startswith("fp8_table")}
    return out


def pick_variant(steps: dict[str, Any], logits: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Which measured-table step serves: the fastest of ``fp8_table`` and its PDL / prefetch variants whose logits
    equal ``fp8_table``'s bit for bit (PDL and prefetch change when things run, never what is computed) and that
    beat it by more than ``MARGIN`` (a tie keeps the plain launch)."""
    if "fp8_table" not in logits:
        return {}
    equal = {name: torch.equal(logits["fp8_table"], lg) for name, lg in logits.items()
             if name.startswith("fp8_table_")}
    plain = steps["fp8_table"]["decode_step_ms"]
    ok = [name for name, same in equal.items() if same and steps[name]["decode_step_ms"] < (1 - MARGIN) * plain]
    best = min(ok, key=lambda name: steps[name]["decode_step_ms"]) if ok else "fp8_table"
    return {"bitwise_equal": equal, "pdl_bitwise_equal": all(equal.values()) if equal else None,
            "decode_choice": best, "pdl_chosen": "pdl" in best}


def prefetch_batch1(table: GemmTable, mib: int) -> GemmTable:
    """``table`` with the W8A16 entries that serve one row (each projection's smallest measured M) asking L2 for
    ``mib`` MiB of their first codes before they wait for the previous kernel (``GemvConfig.prefetch``)."""
    entries = {}
    for key, rows in table.entries.items():
        first, choice = rows[0]
        if choice.config is not None and not choice.config.mma:  # (the mma kernels start their loads at once)
            choice = replace(choice, config=replace(choice.config, prefetch=mib))
        entries[key] = [(first, choice)] + list(rows[1:])
    return replace(table, entries=entries)


def chosen_table(table: GemmTable, decode: dict[str, Any]) -> GemmTable:
    """The table the decode-step comparison chose (``decode_choice``): its entries and PDL flag, else ``table``."""
    choice = decode.get("decode_choice")
    data = (decode.get("variant_tables") or {}).get(choice)
    if not data:
        return replace(table, pdl=False)
    chosen = GemmTable.from_data(data)
    return replace(table, entries=chosen.entries, pdl=chosen.pdl)


# ---- the run -----------------------------------------------------------------------------------------------------

def run(cfg: TuneConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    deadline = t_start + cfg.budget_s - cfg.decode_reserve_s
    run_id = uuid.uuid4().hex[:12]
    args = ModelArgs.from_name(cfg.preset)
    dtype = getattr(torch, cfg.dtype)
    shapes = projections(args)
    ms = [m for m in PRIORITY if m in cfg.ms] + [m for m in cfg.ms if m not in PRIORITY]
    copy_gbps = None
    if backend.ON_GPU:
        from impl.common.calibrate import measure_copy_gbps

        copy_gbps = measure_copy_gbps()
    log(f"{cfg.preset}: {shapes}, M {ms}, copy bandwidth {copy_gbps and round(copy_gbps)} GB/s, run {run_id}")
    jobs = {}
    for m in ms:
        n, k = shapes["wo"]
        for c in candidate_configs(m, n, k, cfg.smoke):
            jobs[(c, m, False)] = (c.to_dict(), m, n, k, False)
            if not c.dot:  # w2's CUDA-core tiles fuse SwiGLU: a kernel of its own
                jobs[(c, m, True)] = (c.to_dict(), m, n, k, True)
    comp = precompile(list(jobs.values()), cfg.workers if backend.ON_GPU else 0,
                      t_start + 0.5 * (cfg.budget_s - cfg.decode_reserve_s))
    log(f"compiled {comp.get('done', 0)}/{comp['jobs']} kernels in parallel ({len(comp.get('errors', {}))} errors)")
    subjects = {name: make_subject(name, n, k, dtype, cfg.device, seed=i, swiglu=name == "w2")
                for i, (name, (n, k)) in enumerate(shapes.items())}
    pairs, skipped = [], []
    table = GemmTable(origin=f"measured table (tune run {run_id})", selected_in_run=run_id)
    for m in ms:
        for name, sub in subjects.items():
            if time.perf_counter() > deadline:
                skipped.append({"projection": name, "m": m, "reason": "budget"})
                continue
            try:
                pair = measure_pair(sub, m, cfg, seed=1000 + m)
            except Exception as e:
                skipped.append({"projection": name, "m": m, "reason": f"{type(e).__name__}: {e}"})
                traceback.print_exc()
                continue
            best = best_fp8(pair)
            pair["best"] = best["candidate"] if best else None
            pairs.append(pair)
            if best:
                table.entries.setdefault((sub.n, sub.k), []).append((m, choice_of(best)))
    for lst in table.entries.values():
        lst.sort(key=lambda r: r[0])
    if skipped:
        log(f"skipped {len(skipped)} (projection, M) pairs: {skipped[:4]}...")
    del subjects
    if backend.ON_GPU:
        torch.cuda.empty_cache()
    decode: dict[str, Any] = {}
    if cfg.decode_step:
        try:
            decode = decode_step_comparison(cfg, table)
            table = chosen_table(table, decode)
        except Exception as e:
            decode = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
    elapsed = time.perf_counter() - t_start
    return {"run_id": run_id, "config": asdict(cfg), "copy_gbps": copy_gbps, "shapes": shapes, "compile": comp,
            "pairs": pairs, "skipped": skipped, "decode_step": decode, "elapsed_s": elapsed,
            "complete": not skipped and "error" not in decode,
            "table": table.to_data()}


def summary_lines(data: dict[str, Any]) -> list[str]:
    cp = data.get("copy_gbps")
    lines = [f"{'proj':5} {'M':>4} {'best FP8':28} {'us':>8} {'%copy':>6} {'bf16 us':>8} {'x bf16':>6} "
             f"{'inner us':>8} {'defer us':>8} {'rule us':>8} {'read us':>8}"]
    for p in data["pairs"]:
        by = {r["candidate"]: r for r in p["candidates"]}
        best = by.get(p["best"]) if p.get("best") else None
        bf16 = by.get("bf16", {}).get("median_us")
        inner = by.get("inner", {}).get("median_us")
        defer = by.get("deferred", {}).get("median_us")
        rule = by.get(default_config(p["m"], p["n"], p["k"]).name, {}).get("median_us")
        us = best["median_us"] if best else None
        pct = (100 * best["weight_gbps"] / cp) if (best and cp) else None
        fmt = lambda v, f=".1f": "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"{p['projection']:5} {p['m']:>4} {str(p['best']):28} {fmt(us):>8} {fmt(pct, '.0f'):>6} "
                     f"{fmt(bf16):>8} {fmt(bf16 / us if (bf16 and us) else None, '.2f'):>6} {fmt(inner):>8} "
                     f"{fmt(defer):>8} {fmt(rule):>8} {fmt(fastest_read_us(p)):>8}")
    d = data.get("decode_step") or {}
    names = ["bf16", "fp8_rule", "fp8_table", "fp8_table_pdl"] + [f"fp8_table_pdl_f{v}" for v in PREFETCH_MIB]
    for name in names + [f"fp8_table_f{PREFETCH_MIB[0]}"]:
        if "decode_step_ms" in d.get(name, {}):
            sp = d.get(f"speedup_{name}")
            lines.append(f"decode step B=1 {name:20} {d[name]['decode_step_ms']:.3f} ms"
                         + (f"  {sp:.2f}x bf16" if sp else ""))
    if d.get("bitwise_equal"):
        lines.append(f"logits bitwise equal to fp8_table: {d['bitwise_equal']}; chosen {d.get('decode_choice')}, "
                     f"table pdl: {data['table']['pdl']}")
    lines.append(f"complete: {data['complete']}, {data['elapsed_s']:.0f} s, skipped {len(data['skipped'])}")
    return lines


def write_outputs(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """DIR/tune.json and DIR/gemm_table.json; on a GPU also results/<card>/serve/ through ``write_result``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = data["table"]
    paths = []
    if backend.ON_GPU:
        import shutil

        from impl.common.results import write_result

        for name, payload in (("tune", data), ("gemm_table", table)):
            p = write_result("serve", name, payload, overwrite=True)
            shutil.copyfile(p, out_dir / p.name)
            paths.append(out_dir / p.name)
    else:
        for name, payload in (("tune", data), ("gemm_table", table)):
            p = out_dir / f"{name}.json"
            p.write_text(json.dumps({"device": "cpu", "data": payload}, indent=1, default=str) + "\n")
            paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.serve.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for tune.json and gemm_table.json")
    p.add_argument("--budget-s", type=float, default=TuneConfig.budget_s)
    p.add_argument("--decode-reserve-s", type=float, default=TuneConfig.decode_reserve_s)
    p.add_argument("--ms", default=None, help="comma-separated M values (default 1,8,32,64,128,256)")
    p.add_argument("--preset", default=TuneConfig.preset)
    p.add_argument("--reps", type=int, default=TuneConfig.reps)
    p.add_argument("--workers", type=int, default=min(TuneConfig.workers, max(1, (os.cpu_count() or 2) - 2)))
    p.add_argument("--no-decode-step", action="store_true")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (interpreter)")
    a = p.parse_args(argv)
    if a.smoke:
        cfg = SMOKE
    elif not backend.ON_GPU:
        print("the tune run needs a CUDA GPU (use --smoke on a CPU)", file=sys.stderr)
        return 2
    else:
        cfg = TuneConfig(preset=a.preset, budget_s=a.budget_s, decode_reserve_s=a.decode_reserve_s, reps=a.reps,
                         workers=a.workers)
    if a.ms:
        cfg = replace(cfg, ms=tuple(int(v) for v in a.ms.split(",")))
    if a.no_decode_step:
        cfg = replace(cfg, decode_step=False)
    data = run(cfg)
    paths = write_outputs(data, Path(a.out))
    print("\n".join(summary_lines(data)))
    log("wrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
