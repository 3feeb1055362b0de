"""Models: loading (HF dir or GGUF file), tiny random models for tests, KV extraction and decode-cache building.

A KV cache here is a list over layers of ``(K, V)``, each ``[B, H_kv, T, D]``; keys carry the model's RoPE, as in
HF caches. ``KVLayout`` is what a model expects of it: per layer KV heads and head dim, plus the dtype.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from impl.kvstitch.rope import text_config

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class KVLayout:
    """Per-layer KV head count and head dim of one model, and the dtype its cache holds."""

    kv_heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return len(self.kv_heads)

    def bytes_per_token(self, layers: list[int] | None = None) -> int:
        """Bytes of K and V for one token over ``layers`` (default all)."""
        idx = range(self.num_layers) if layers is None else layers
        return sum(2 * self.kv_heads[i] * self.head_dims[i] for i in idx) * torch.finfo(self.dtype).bits // 8


def kv_layout(model_or_config, dtype: torch.dtype | None = None) -> KVLayout:
    """The KV layout of a model (or config plus ``dtype``): heads = ``num_key_value_heads``, dim = ``head_dim``."""
    cfg = text_config(getattr(model_or_config, "config", model_or_config))
    if dtype is None:
        dtype = next(model_or_config.parameters()).dtype
    n = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return KVLayout((int(heads),) * n, (int(dim),) * n, dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (``model.model.layers``), unwrapping a peft model."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(m, "model", m)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(m).__name__} has no model.layers: not a decoder-only HF causal LM")
    return layers


def cache_kwarg(model: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older): the forward argument of the KV cache."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"


def empty_cache(config=None):
    """A ``DynamicCache``; with ``config`` its layers follow the model (sliding windows), without it all are full."""
    from transformers import DynamicCache

    return DynamicCache(config=config) if config is not None else DynamicCache()


def kv_of(cache) -> KV:
    """``[(K, V)]`` of an HF cache, one pair per layer."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def build_cache(config, kv: KV):
    """A decode cache for the model of ``config`` filled with ``kv`` (checked against its layout first)."""
    cfg = text_config(config)
    if len(kv) != cfg.num_hidden_layers:
        raise ValueError(f"decode model has {cfg.num_hidden_layers} layers but the KV has {len(kv)}")
    cache = empty_cache(config)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def forward(model: nn.Module, ids: torch.Tensor, cache, **kw):
    """One forward of ``ids`` ``[B, T]`` that appends to ``cache``; returns the model output (logits ``[B, T, V]``)."""
    return model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}, **kw)


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor) -> tuple[KV, torch.Tensor]:
    """Run the prompt ``ids`` ``[B, T]``; return its full KV (every layer keeps all T tokens, sliding or not) and the
    last position's logits ``[B, V]``."""
    cache = empty_cache()
    out = forward(model, ids, cache, logits_to_keep=1)  # only the last position's logits are ever needed
    return kv_of(cache), out.logits[:, -1]


# ---- loading -------------------------------------------------------------------------------------------------

def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
               attn: str | None = None) -> nn.Module:
    """An HF causal LM from a model dir (safetensors) or a ``.gguf`` file (needs the ``gguf`` package), in eval mode.
    ``attn`` picks the attention implementation (``eager`` for bit-reproducible CPU tests; default: transformers')."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    kw = {"attn_implementation": attn} if attn else {}
    if path.suffix == ".gguf":
        m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **kw)
        m.hf_quantizer = None  # dequantised on load: the weights are plain tensors now
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
    elif path.is_dir():
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    else:
        raise FileNotFoundError(f"{path} is neither a model directory nor a .gguf file")
    return m.to(device).eval()


def load_tokenizer(path: str | Path):
    """The tokenizer of a model dir or ``.gguf`` file, checked by ``check_tokenizer`` (GGUF: against its metadata)."""
    from transformers import AutoTokenizer

    path = Path(path)
    gguf = path.suffix == ".gguf"
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if gguf else AutoTokenizer.from_pretrained(path)
    check_tokenizer(tok, gguf_add_bos(path) if gguf else None, str(path))
    return tok


COMMON_WORDS = ("of", "and", "in", "world", "people")


def check_tokenizer(tok, add_bos: bool | None, source: str) -> None:
    """Refuse a tokenizer that lost its BPE merges or its BOS on the way from the checkpoint. transformers 5.17 built
    Gemma-3's GGUF tokenizer that way (' the' as ' t' + 'he', no <bos>) and the model then generated garbage.

    Merges: a sentence of common words, each a single token in the vocabulary (with its space marker), must take at
    most one token per word. BOS: when the checkpoint says to add one (``add_bos``), encoding must start with it.
    """
    vocab = tok.get_vocab()
    if any(all(mark + w in vocab for w in COMMON_WORDS) for mark in ("\u2581", "\u0120")):  # SentencePiece / GPT-2
        ids = tok(" " + " ".join(COMMON_WORDS), add_special_tokens=False).input_ids
        if len(ids) > len(COMMON_WORDS):
            pieces = tok.convert_ids_to_tokens(ids)
            raise ValueError(f"tokenizer of {source} splits common words into pieces ({pieces}) although its "
                             f"vocabulary holds each as one token: its merges were lost when it was built "
                             "(upgrade transformers; 5.17 does this to Gemma-3 GGUF files)")
    if add_bos and tok.bos_token_id is not None and tok("x").input_ids[:1] != [tok.bos_token_id]:
        raise ValueError(f"{source} asks for a BOS token ({tok.bos_token!r}) before every text but its tokenizer "
                         "does not add one (upgrade transformers; 5.17 does this to Gemma-3 GGUF files)")


def gguf_add_bos(path: Path) -> bool | None:
    """``tokenizer.ggml.add_bos_token`` of a GGUF file (None when absent or the ``gguf`` package is missing)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.parts[field.data[0]][0])


def count_params(model: nn.Module, *, non_embedding: bool = False) -> int:
    """Parameters of a model (tied weights once); ``non_embedding`` leaves out the input embedding."""
    seen, total = set(), 0
    emb = model.get_input_embeddings().weight if non_embedding else None
    for p in model.parameters():
        if id(p) in seen or p is emb:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


# ---- the prefill models' shapes (speed benches build random weights of them) -------------------------------------

def real_config(series: str):
    """The transformers config of a series' prefill model, shapes only (no weights read): ``smollm2`` is
    SmolLM2-135M (30 blocks, 9 query / 3 KV heads of 64), ``gemma3`` Gemma-3-270M (18 blocks, every sixth global,
    4 query / 1 KV head of 256)."""
    if series == "smollm2":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=49152, hidden_size=576, head_dim=64, max_position_embeddings=8192,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e5}, tie_word_embeddings=True,
                           num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    if series == "gemma3":
        from transformers import Gemma3TextConfig

        types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
        return Gemma3TextConfig(vocab_size=262144, hidden_size=640, head_dim=256, num_attention_heads=4,
                                num_key_value_heads=1, query_pre_attn_scalar=256, sliding_window=512,
                                max_position_embeddings=32768, num_hidden_layers=18, intermediate_size=2048,
                                layer_types=types,
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                 "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    raise ValueError(f"series must be 'smollm2' or 'gemma3', not {series!r}")


# ---- tiny random models (tests, smoke runs, speed benches) ------------------------------------------------------

@dataclass(frozen=True)
class TinySpec:
    """Shape of a random model: ``arch`` is ``llama`` or ``gemma3`` (sliding + full layers, q/k-norm, own head dim)."""

    layers: int = 2
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    intermediate: int = 64
    vocab: int = 96
    arch: str = "llama"
    rope_theta: float = 10000.0
    max_positions: int = 4096


def tiny_config(spec: TinySpec):
    """A transformers config for ``spec`` (eager attention so CPU numerics do not depend on SDPA kernels)."""
    if spec.heads % spec.kv_heads:
        raise ValueError(f"heads ({spec.heads}) must be a multiple of kv_heads ({spec.kv_heads})")
    common = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                  num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                  head_dim=spec.head_dim, max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if spec.arch == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta})
    elif spec.arch == "gemma3":
        from transformers import Gemma3TextConfig

        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(spec.layers)]
        cfg = Gemma3TextConfig(**common, layer_types=types, sliding_window=64, query_pre_attn_scalar=spec.head_dim,
                               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    else:
        raise ValueError(f"arch must be 'llama' or 'gemma3', not {spec.arch!r}")
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(spec: TinySpec, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised causal LM of ``spec`` (weights scaled up so random logits are not near-ties)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(spec))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    return m.to(dtype).eval()
