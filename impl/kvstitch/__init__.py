"""kvstitch: disaggregated prefill/decode across two different causal LMs, joined by learned KV "stitch" layers.

A prefill model P (L_p layers, H_p KV heads of size D_p) reads the prompt; a smaller decode model Q (L_q, H_q, D_q)
generates. Per decode layer j a stitch maps the un-rotated keys and the values of its paired prefill layers to
Q's KV layout, re-applies Q's RoPE and hands Q a cache it can decode from. Files, in reading order:

  rope.py      RoPE tables of any HF model, rotate / un-rotate
  models.py    loading (HF dir or GGUF), tiny random models for tests, KV extraction and cache building
  stitch.py    the stitch layers (pairing, identity / least-squares init, save/load)
  hybrid.py    greedy generation: model alone and prefill -> stitch -> decode (in one process)
  prune.py     Minitron-style depth/width pruning + distillation healing (makes the decode model)
  train.py     stage (a) KV regression warm-up, stage (b) end-to-end LoRA with the LM loss
  runtime.py   two-process runtime over torch.distributed (gloo / NCCL), KV sent layer by layer
  data.py      text tasks from gensim's test data; evaluate.py ROUGE + timing
  prepare.py   CPU-side conversion of models and text for the GPU machine
  experiments.py  the whole recipe; claims.py the ledger entries and plots
"""
