"""kvstitch: disaggregated prefill/decode across two different causal LMs, joined by learned KV "stitch" layers.

    from impl.kvstitch import StitchBundle, generate_hybrid
    bundle = StitchBundle(prefill_model.config, decode_model.config)      # then stage_a / stage_b train it
    tokens = generate_hybrid(prefill_model, decode_model, bundle, prompt_ids, n_new=32)   # [B, 32]

A prefill model P (L_p layers, H_p KV heads of size D_p) reads the prompt; a smaller decode model Q (L_q, H_q, D_q)
generates. Per decode layer j a stitch maps the un-rotated keys and the values of its paired prefill layers to
Q's KV layout, re-applies Q's RoPE and hands Q a cache it can decode from. Files, in reading order:

  config.py    one dataclass per topic, and the decode sizes each series is pruned to
  rope.py      RoPE tables of any HF model, rotate / un-rotate
  models.py    loading (HF dir or GGUF), the prefill models' shapes, tiny random models for tests, KV extraction and
               cache building
  stitch.py    the stitch layers (pairing, identity / least-squares init, save/load)
  hybrid.py    greedy generation: model alone and prefill -> stitch -> decode (in one process)
  prune.py     Minitron-style depth/width pruning + distillation healing (makes the decode model)
  train.py     stage (a) KV regression warm-up, stage (b) end-to-end LoRA with the LM loss
  runtime.py   two-process runtime over torch.distributed (gloo / NCCL), KV sent layer by layer
  data.py      text tasks from gensim's test data; evaluate.py ROUGE + timing
  prepare.py   CPU-side conversion of models and text for the GPU machine
  summary.py   a series' record -> its verdicts (interpolation, bootstrap gaps) and ROUGE table
  recipe.py    the whole recipe as functions; experiments.py its command line; rescore.py ROUGE of stored runs
  claims.py    the ledger entries and failing cases; plots.py their figure and tables
"""
from impl.kvstitch.config import (DECODE_SIZES, EvalConfig, HealConfig, PruneConfig, RecipeConfig, RuntimeConfig,
                                  StageAConfig, StageBConfig, StitchConfig)
from impl.kvstitch.hybrid import generate_alone, generate_hybrid, stitched_cache
from impl.kvstitch.models import load_model, load_tokenizer
from impl.kvstitch.recipe import recipe_config, run_all, run_series
from impl.kvstitch.runtime import serve
from impl.kvstitch.stitch import StitchBundle
from impl.kvstitch.train import stage_a, stage_b

__all__ = ["DECODE_SIZES", "EvalConfig", "HealConfig", "PruneConfig", "RecipeConfig", "RuntimeConfig",
           "StageAConfig", "StageBConfig", "StitchConfig", "generate_alone", "generate_hybrid", "stitched_cache",
           "load_model", "load_tokenizer", "recipe_config", "run_all", "run_series", "serve",
           "StitchBundle", "stage_a", "stage_b"]
