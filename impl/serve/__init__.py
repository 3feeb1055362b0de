"""serve: a small LLM serving system — Llama decoder, paged KV cache, paged attention, continuous-batching engine.

    from impl.serve import Engine, SamplingParams, load_model
    engine = Engine(load_model(model_dir, device="cuda"), tokenizer=AutoTokenizer.from_pretrained(model_dir))
    outs = engine.generate(["What is 2+2?"], SamplingParams(max_new_tokens=32))   # [Completion], prompt order

Files, in reading order: ``model.py`` (ModelArgs presets, RMSNorm, RoPE, GQA attention, SwiGLU), ``fused.py``
(Triton kernels fusing norm + residual, RoPE + KV store, SiLU·up for GPU decode), ``weights.py``
(HF safetensors loading, random weights), ``fp8_adapter.py`` (the one door to impl/fp8; SmolLM2 checkpoints),
``kv_cache.py`` (pages, block tables, free list, step metadata), ``triton_attention.py`` (paged decode/prefill
kernels), ``attention.py`` (backends: flashinfer, Triton, torch SDPA, and the float64 reference), ``sampling.py``,
``engine.py`` (``Engine.generate``), ``cuda_graphs.py`` (graph-captured decode), ``__main__.py`` (CLI),
``server.py`` (OpenAI-style /v1/completions); ``fp8_gemv.py`` (the W8A16 decode GEMV), ``fused_quant.py`` (the
norm and SiLU·up quantising their outputs per token for W8A8 linears), ``choose.py`` (the measured
GEMM table per projection and batch size; batch-invariant serving), ``tune.py`` (measures that table),
``ptx_check.py`` (the kernel compiled for Hopper without a GPU), ``experiments.py`` (decode/TTFT per batch, FP8 vs
bf16), ``loadtest.py`` + ``loadclient.py`` (the endpoint under load), ``flashinfer_setup.py`` +
``flashinfer_check.py`` (flashinfer carried, installed and timed beside Triton), ``claims.py``; ``reference.py``
(contiguous-KV decoding, the engine's oracle). Toy models and fragmented caches for tests and benches live in
``fixtures/serve.py``.
"""
from impl.common.exports import lazy_exports

# lazy: ``python -m impl.serve.ptx_check`` must switch Triton's interpreter off before the kernel module loads
__all__, __getattr__ = lazy_exports(__name__, {
    "engine": ("Completion", "Engine", "EngineConfig"), "sampling": ("SamplingParams",),
    "model": ("ModelArgs", "Transformer"), "weights": ("load_model", "randomize_"),
    "kv_cache": ("CacheConfig", "PagedKVCache"), "attention": ("select_backend",),
    "fp8_adapter": ("quantize_model_",), "server": ("make_server",)})
