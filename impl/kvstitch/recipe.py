"""The kvstitch recipe as functions: per series, prune + heal decode models, stage (a), stage (b), ROUGE and
held-out loss for every system, then the two-process runtime's timings and the layer-by-layer KV transfer.

    rec = run_series("smollm2", recipe_config("smollm2", "smoke"), None, "cpu", True, workdir)   # CPU, seconds
    run_all("quick", ["smollm2", "gemma3"], assets="DIR")                                        # GPU, writes results

Modes (``recipe_config``): ``smoke`` (tiny random models, byte tokenizer, CPU seconds), ``check`` (the real models
at smoke sizes), ``quick`` (every decode size of ``config.DECODE_SIZES``, the shorter training), ``full`` (twice the
steps). ``DIR`` holds what ``prepare`` wrote: ``text/`` and ``smollm2.gguf`` / ``gemma3.gguf`` (or HF dirs
``smollm2/``, ``gemma3/``); a DIR of ``part_NN/`` folders (``prepare split``) is joined first. A series whose model
is absent is skipped with a message.

Records (``results/<gpu>/kvstitch/``, not written under ``smoke`` / ``check``): ``rouge_<series>.json`` (ROUGE-1/2/L
of prefill alone, decode alone, hybrid after stage a and b, decode+LoRA alone, per decode size, and the verdicts of
``summary.summarise``), ``runtime_<series>_{1gpu,2gpu}.json`` (TTFT, decode tokens/s, KV bytes per request, hybrid vs
prefill alone) and ``nccl_transfer_<series>.json`` (that series' KV sent layer by layer vs one message of the same
bytes).
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from impl.common.log import logger
from impl.kvstitch import data
from impl.kvstitch.config import (DECODE_SIZES, EvalConfig, HealConfig, PruneConfig, RecipeConfig, RuntimeConfig,
                                  StageAConfig, StageBConfig)
from impl.kvstitch.evaluate import continuation_nll, rouge_available, score_system
from impl.kvstitch.hybrid import generate_alone, generate_hybrid
from impl.kvstitch.models import TinySpec, count_params, load_model, load_tokenizer, tiny_model
from impl.kvstitch.prune import heal, prune
from impl.kvstitch.stitch import StitchBundle
from impl.kvstitch.summary import mean_rouge_l, summarise
from impl.kvstitch.train import continuation_loss, lora_lm, own_continuation_loss, stage_a, stage_b

SYSTEM = "kvstitch"
MODES = ("smoke", "check", "quick", "full")
log = logger(SYSTEM)


def recipe_config(series: str, mode: str) -> RecipeConfig:
    """Presets: ``smoke`` (CPU seconds), ``check`` (smoke sizes, real models), ``quick`` (both decode sizes, the
    shorter training), ``full`` (both sizes, twice the steps)."""
    if mode in ("smoke", "check"):
        return RecipeConfig(series=series, decode_sizes=[{"layers": 3, "mlp_keep": 0.5, "kv_groups": 1}],
                            heal=HealConfig(steps=3, batch=2, seq_len=32, log_every=1),
                            stage_a=StageAConfig(steps=3, batch=2, seq_len=32, log_every=1),
                            stage_b=StageBConfig(steps=3, batch=2, prompt_len=24, cont_len=8, lora_r=4, log_every=1),
                            eval=EvalConfig(prompt_len=96, new_tokens=6, max_news=3, max_wiki=2, batch=4,
                                            news_stride=40),
                            dtype="float32")
    steps = 1 if mode == "quick" else 2  # quick: ~6-7 min per series on an H100/H200 incl. runtimes; full: ~2x
    return RecipeConfig(series=series, decode_sizes=[dict(s) for s in DECODE_SIZES[series]],
                        heal=HealConfig(steps=300 * steps), stage_a=StageAConfig(steps=150 * steps),
                        stage_b=StageBConfig(steps=200 * steps), dtype="float32",
                        # news: 128-token prompts and a window every 48 tokens (disjoint references) give ~130
                        # examples from the 60 held-out articles instead of the 19 long enough for one 192+48 window
                        eval=EvalConfig(batch=64, news_prompt_len=128, news_stride=48, max_news=256))


def size_tag(size: dict) -> str:
    return "L{layers}_m{mlp}_g{g}".format(layers=size.get("layers"), mlp=size.get("mlp_keep", 1.0),
                                          g=size.get("kv_groups", "all"))


def load_series(series: str, assets: Path | None, smoke: bool, device: str, dtype: torch.dtype):
    """(prefill model, codec, splits) — tiny random model + byte codec under ``smoke``."""
    if smoke:
        spec = TinySpec(layers=4, hidden=48, heads=4, kv_heads=2, head_dim=12, intermediate=96, vocab=259,
                        arch="gemma3" if series == "gemma3" else "llama")
        splits = data.load_splits(assets / "text" if assets else None)
        return tiny_model(spec, seed=0, dtype=dtype).to(device), data.ByteCodec(), splits
    if assets is None:
        raise ValueError("--assets DIR is required outside --smoke (see `python -m impl.kvstitch.prepare`)")
    path = next((p for p in (assets / f"{series}.gguf", assets / series) if p.exists()), None)
    if path is None:
        raise FileNotFoundError(f"neither {assets / series}.gguf nor {assets / series}/ exists")
    log(f"loading {path}")
    return load_model(path, dtype, device), data.HFCodec(load_tokenizer(path)), data.load_splits(assets / "text")


def run_series(series: str, rc: RecipeConfig, assets: Path | None, device: str, smoke: bool, workdir: Path,
               checkpoint: Callable[[dict], None] | None = None) -> dict:
    """The whole recipe for one series; ``checkpoint(record)`` gets the record so far after each decode size (a run
    cut by a time limit keeps what it finished; the record says ``complete`` False until the last size)."""
    dtype = getattr(torch, rc.dtype)
    pm, codec, splits = load_series(series, assets, smoke, device, dtype)
    pm.save_pretrained(workdir / "prefill_model")  # the runtime's worker processes load it from here
    ev = rc.eval
    tasks = [data.news_task(codec, splits.news_eval, ev.news_prompt_len or ev.prompt_len, ev.new_tokens, ev.max_news,
                            ev.news_stride),
             data.wiki_task(codec, splits.wiki_eval, ev.prompt_len, ev.max_wiki)]
    log(f"{series}: tasks " + ", ".join(f"{t.name} {len(t.references)}" for t in tasks))
    stream = data.token_stream(codec, data.train_texts(splits))
    n = ev.new_tokens
    rec = {"series": series, "recipe": asdict(rc), "rouge_scored": rouge_available(),
           "references": {t.name: t.references for t in tasks},
           "prefill": {"params": count_params(pm), "params_non_embedding": count_params(pm, non_embedding=True),
                       "layers": pm.config.num_hidden_layers,
                       "scores": score_system(lambda ids: generate_alone(pm, ids, n), tasks, codec, ev.batch, device)},
           "decodes": []}
    news, b = tasks[0], ev.batch
    rec["prefill"]["nll"] = continuation_nll(lambda ids, p: own_continuation_loss(pm, ids, p), news, b, device)
    log(f"{series}: prefill alone ROUGE-L {mean_rouge_l(rec['prefill']['scores'])}, news loss {rec['prefill']['nll']}")
    sb = rc.stage_b
    p_chunks = data.random_chunks(stream, sb.batch, sb.prompt_len + sb.cont_len, sb.seed + 300)
    plora, pl = lora_lm(pm, p_chunks, sb, log)
    rec["prefill_lora"] = {"losses": {"first": pl["losses"][0], "last": pl["losses"][-1]},
                           "scores": score_system(lambda ids: generate_alone(plora, ids, n), tasks, codec, ev.batch,
                                                  device),
                           "nll": continuation_nll(lambda ids, p: own_continuation_loss(plora, ids, p), news, b,
                                                   device)}
    del plora
    for k, size in enumerate(rc.decode_sizes):
        rec["decodes"].append(run_decode_size(pm, size, rc, stream, tasks, codec, device, workdir / size_tag(size), k))
        rec["complete"] = len(rec["decodes"]) == len(rc.decode_sizes)
        if checkpoint is not None and not rec["complete"]:
            checkpoint(summarise(copy.deepcopy(rec)))  # a snapshot: rec keeps growing
    return summarise(rec)


def run_decode_size(pm, size: dict, rc: RecipeConfig, stream, tasks, codec, device: str, out: Path, k: int) -> dict:
    n, ev, tag = rc.eval.new_tokens, rc.eval, size_tag(size)
    chunks = data.random_chunks(stream, rc.heal.batch, rc.heal.seq_len, rc.heal.seed + k)
    spec = PruneConfig(**size)
    dm, plan = prune(pm, spec, [next(chunks) for _ in range(spec.calib_batches)])
    log(f"{tag}: pruned {count_params(pm):,} -> {count_params(dm):,} params, blocks {plan['blocks']}")
    heal_losses = heal(dm, pm, chunks, rc.heal, log)
    dm.save_pretrained(out / "decode_model")
    scores: dict[str, dict] = {}
    gen = lambda f: score_system(f, tasks, codec, ev.batch, device)  # noqa: E731
    nll = lambda f: continuation_nll(f, tasks[0], ev.batch, device)  # noqa: E731  (held-out news loss)
    scores["decode_alone"] = gen(lambda ids: generate_alone(dm, ids, n))
    losses = {"decode_alone": nll(lambda ids, p: own_continuation_loss(dm, ids, p))}
    bundle = StitchBundle(pm.config, dm.config, rc.stitch).to(device)
    a_chunks = data.random_chunks(stream, rc.stage_a.batch, rc.stage_a.seq_len, rc.stage_a.seed + 100 + k)
    a = stage_a(pm, dm, bundle, a_chunks, rc.stage_a, log)
    bundle.save(out / "stitch_a")
    scores["hybrid_a"] = gen(lambda ids: generate_hybrid(pm, dm, bundle, ids, n))
    losses["hybrid_a"] = nll(lambda ids, p: continuation_loss(pm, dm, bundle, ids, p))  # before stage b moves it
    sb = rc.stage_b
    b_chunks = data.random_chunks(stream, sb.batch, sb.prompt_len + sb.cont_len, sb.seed + 200 + k)
    lora, b = stage_b(pm, dm, bundle, b_chunks, sb, log)
    bundle.save(out / "stitch_b")
    lora.save_pretrained(out / "lora")
    scores["hybrid_b"] = gen(lambda ids: generate_hybrid(pm, lora, bundle, ids, n))
    scores["lora_alone"] = gen(lambda ids: generate_alone(lora, ids, n))
    losses["hybrid_b"] = nll(lambda ids, p: continuation_loss(pm, lora, bundle, ids, p))
    losses["lora_alone"] = nll(lambda ids, p: own_continuation_loss(lora, ids, p))
    line = {key: mean_rouge_l(v) for key, v in scores.items()}
    log(f"{tag}: ROUGE-L {line}; news loss {losses}")
    return {"tag": tag, "size": size, "params": count_params(dm),
            "params_non_embedding": count_params(dm, non_embedding=True), "layers": dm.config.num_hidden_layers,
            "plan_blocks": plan["blocks"], "scores": scores, "nll": losses, "dir": str(out),
            "losses": {"heal_first": heal_losses[0], "heal_last": heal_losses[-1],
                       "stage_a_first": a["losses"][0], "stage_a_last": a["losses"][-1],
                       "stage_b_first": b["losses"][0], "stage_b_last": b["losses"][-1],
                       "stage_a_init_residual_mean": _mean(a["init_residual"].values())}}


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


# ---- runtime -----------------------------------------------------------------------------------------------------

def run_runtime(prefill: Path, decode: Path, stitch: Path, vocab: int, ngpu: int, smoke: bool) -> dict:
    """Hybrid vs prefill alone through the two-process runtime; 2 GPUs: NCCL, 1 GPU: gloo (staged), CPU: gloo."""
    from impl.kvstitch.runtime import serve

    if ngpu >= 2:
        cfg = RuntimeConfig(backend="nccl", prefill_device="cuda:0", decode_device="cuda:1")
    elif ngpu == 1:
        cfg = RuntimeConfig(backend="gloo", prefill_device="cuda:0", decode_device="cuda:0")
    else:
        cfg = RuntimeConfig()
    b, t, n = (2, 16, 4) if smoke else (8, 512, 64)
    cfg = replace(cfg, new_tokens=n, dtype="float32" if smoke else "bfloat16", baseline=True, threads=1 if smoke else 4)
    g = torch.Generator().manual_seed(0)
    reqs = [torch.randint(0, vocab, (b, t), generator=g) for _ in range(2 if smoke else 4)]
    r0, _ = serve(str(prefill), str(decode), str(stitch), reqs, cfg)
    hy = [{k: v for k, v in r.items() if k != "generated"} for r in r0["requests"]]
    al = [{k: v for k, v in r.items() if k != "generated"} for r in r0["alone"]]
    med = lambda rows, key: sorted(r[key] for r in rows[1:] or rows)[len(rows[1:] or rows) // 2]  # noqa: E731
    return {"config": asdict(cfg), "batch": b, "prompt_tokens": t, "new_tokens": n, "side": r0["plan"],
            "kv_bytes_per_request": hy[0]["kv_bytes"],
            "hybrid": {"ttft_s": med(hy, "ttft_s"), "kv_ready_s": med(hy, "kv_ready_s"),
                       "decode_tokens_per_s": med(hy, "decode_tokens_per_s")},
            "prefill_alone": {"ttft_s": med(al, "ttft_s"), "decode_tokens_per_s": med(al, "decode_tokens_per_s")},
            "requests": hy, "alone": al}


def run_bandwidth(stitch: Path, ngpu: int, smoke: bool) -> dict:
    from impl.kvstitch.runtime import kv_shapes, measure_bandwidth, plan_transfer

    bundle = StitchBundle.load(stitch)
    dtype = torch.float32 if smoke else torch.bfloat16
    plan = plan_transfer(bundle, dtype)
    b, t = (2, 16) if smoke else (16, 2048)
    cfg = RuntimeConfig(backend="nccl", prefill_device="cuda:0", decode_device="cuda:1",
                        dtype=str(dtype).replace("torch.", "")) if ngpu >= 2 else RuntimeConfig()
    res = measure_bandwidth(kv_shapes(plan, b, t), cfg, reps=3 if smoke else 20, warmup=1 if smoke else 3)
    return {**res, "batch": b, "tokens": t, "side": plan.side}


# ---- all series ---------------------------------------------------------------------------------------------------

def write(name: str, data_: dict, smoke: bool) -> None:
    """Store a record as ``results/<gpu>/kvstitch/<name>.json``; under ``smoke`` only log it."""
    if smoke:
        log(f"(smoke) would write {name}: " + json.dumps(brief(data_))[:300])
        return
    from impl.common.results import write_result

    log(f"wrote {write_result(SYSTEM, name, data_, overwrite=True)}")


def brief(d: dict) -> dict:
    return {k: v for k, v in d.items() if k in ("series", "interpolation", "side", "hybrid", "prefill_alone",
                                                "pct_of_p2p", "single_gbps", "layered_gbps")}


def resolve_assets(path: str | None) -> Path | None:
    """The assets dir; ``part_NN/`` pieces (carried over several device calls) are joined into a temp dir first."""
    from impl.kvstitch.prepare import join

    if path is None or not Path(path).exists():
        return None
    p = Path(path)
    if any(p.glob("part_*/blob")):
        out = join(p, Path(tempfile.mkdtemp(prefix="kvstitch_assets_")))
        inner = [d for d in out.iterdir() if d.is_dir()]
        p = inner[0] if len(inner) == 1 else out
        log(f"joined {path}/part_* into {p}")
    return p


def has_model(assets: Path | None, series: str) -> bool:
    return assets is not None and ((assets / f"{series}.gguf").exists() or (assets / series).is_dir())


def run_all(mode: str, series: list[str], assets: str | None = None, workdir: str | None = None,
            skip_runtime: bool = False) -> dict:
    """The recipe for each series (module doc) in ``mode`` (``recipe_config``); returns the records by name. Under
    ``smoke`` and ``check`` nothing is written."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    smoke = mode == "smoke"
    tiny = mode in ("smoke", "check")  # smoke sizes: nothing written, runtime and bandwidth at toy shapes
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    ngpu = torch.cuda.device_count() if device == "cuda" else 0
    if not tiny and device != "cuda":
        raise RuntimeError(f"the {mode} recipe needs a CUDA GPU; use smoke or check on a CPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    assets_dir = resolve_assets(assets) if not smoke or assets else None
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="kvstitch_exp_") as tmp:
        work = Path(workdir or tmp)
        for name in series:
            if not smoke and not has_model(assets_dir, name):
                log(f"skipping {name}: no {name}.gguf or {name}/ under {assets_dir} (see impl.kvstitch.prepare)")
                continue
            t0 = time.time()
            rc = recipe_config(name, mode)
            rec = run_series(name, rc, assets_dir, device, smoke, work / name,
                             checkpoint=lambda r, s=name: write(f"rouge_{s}", {**r, "seconds": time.time() - t0},
                                                                 tiny))
            rec["seconds"] = time.time() - t0
            write(f"rouge_{name}", rec, tiny)
            out[f"rouge_{name}"] = rec
            if skip_runtime:
                continue
            first = Path(rec["decodes"][0]["dir"])
            prefill_dir = work / name / "prefill_model"
            vocab = rec_vocab(prefill_dir)
            for g in sorted({min(ngpu, 2), min(ngpu, 1)}, reverse=True):  # two GPUs (NCCL) and one GPU (gloo)
                rt = run_runtime(prefill_dir, first / "decode_model", first / "stitch_b", vocab, g, tiny)
                key = f"runtime_{name}_{g}gpu" if g else f"runtime_{name}_cpu"
                write(key, rt, tiny)
                out[key] = rt
            if ngpu >= 2 or tiny:  # each series' own KV layout: its layer count sets the message count and size
                bw = run_bandwidth(first / "stitch_b", ngpu, tiny)
                write(f"nccl_transfer_{name}", bw, tiny)
                out[f"bandwidth_{name}"] = bw
            log(f"{name} done in {time.time() - t0:.0f} s")
    return out


def rec_vocab(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]
