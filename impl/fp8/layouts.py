"""FP8 checkpoint layouts and the model spec a checkpoint is validated against.

Layouts (``config.json`` -> ``quantization_config``; tensors beside each quantized ``<linear>.weight``):

  vllm-tensor     {"quant_method": "fp8", "activation_scheme": "dynamic"|"static"}
                  weight_scale float32 shape [] (one per tensor); static: input_scale float32 []
  vllm-channel    same config; weight_scale float32 [N, 1] (one per output channel)
  vllm-block      same config + "weight_block_size": [128, 128]; weight_scale_inv float32 [ceil(N/128), ceil(K/128)]
  deepseek-block  DeepSeek-V3's: the vllm-block config + "fmt": "e4m3"; weight_scale_inv as above
  ct-tensor       {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0":
  ct-channel       {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "symmetric": true,
  ct-block         "dynamic": false, "strategy": "tensor"|"channel"|"block", "block_structure": [128, 128]},
                   "input_activations": {...}}}, "ignore": ["lm_head"]}
                  weight_scale [1] | [N, 1] | [ceil(N/128), ceil(K/128)] (float32 written; bf16/fp16 accepted)

In every layout W = decode(weight) * scale (``weight_scale_inv`` is a multiplier despite its name). Weights are
float8_e4m3fn; ``"fmt": "e5m2"`` (vLLM/DeepSeek configs) selects float8_e5m2. Everything else in the checkpoint
(embeddings, norms, an untied lm_head) stays in its original dtype.

The model spec covers Llama-family decoders (``model_type`` llama or mistral): embed_tokens, per layer two RMSNorms,
q/k/v/o projections (GQA) and gate/up/down, the final norm, lm_head unless tied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from impl.fp8.formats import BLOCK128, CHANNEL, TENSOR, ScaleGroup, get_format


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor (or config key) and the problem."""


@dataclass(frozen=True)
class Layout:
    """One published FP8 layout: where its scales live and how its config reads."""

    name: str
    family: str  # "vllm", "deepseek" or "ct" (compressed-tensors)
    group: ScaleGroup
    scale_name: str

    def stored_scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        """The scale tensor's shape as written in the checkpoint."""
        if self.group == TENSOR:
            return (1,) if self.family == "ct" else ()
        return self.group.scale_shape(n, k)

    def quantization_config(self, fmt: str = "e4m3", ignore: list[str] | None = None,
                            activation_scheme: str = "dynamic") -> dict[str, Any]:
        ignore = list(ignore or [])
        if self.family in ("vllm", "deepseek"):
            cfg: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": activation_scheme}
            if self.group != TENSOR and self.group != CHANNEL:
                cfg["weight_block_size"] = [self.group.gn, self.group.gk]
            if self.family == "deepseek" or fmt != "e4m3":
                cfg["fmt"] = get_format(fmt).name
            if ignore:
                cfg["ignored_layers"] = ignore
            return cfg
        if fmt != "e4m3":
            raise ValueError("compressed-tensors float-quantized weights are e4m3 only")
        strategy = {TENSOR: "tensor", CHANNEL: "channel"}.get(self.group, "block")
        weights: dict[str, Any] = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                                   "strategy": strategy, "group_size": None, "block_structure": None}
        if strategy == "block":
            weights["block_structure"] = [self.group.gn, self.group.gk]
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "group",
                    "group_size": 128}
        else:
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}
        if activation_scheme == "static":
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                              "output_activations": None, "format": "float-quantized"}},
                "ignore": ignore, "kv_cache_scheme": None}


LAYOUTS: dict[str, Layout] = {
    "vllm-tensor": Layout("vllm-tensor", "vllm", TENSOR, "weight_scale"),
    "vllm-channel": Layout("vllm-channel", "vllm", CHANNEL, "weight_scale"),
    "vllm-block": Layout("vllm-block", "vllm", BLOCK128, "weight_scale_inv"),
    "deepseek-block": Layout("deepseek-block", "deepseek", BLOCK128, "weight_scale_inv"),
    "ct-tensor": Layout("ct-tensor", "ct", TENSOR, "weight_scale"),
    "ct-channel": Layout("ct-channel", "ct", CHANNEL, "weight_scale"),
    "ct-block": Layout("ct-block", "ct", BLOCK128, "weight_scale"),
}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


@dataclass(frozen=True)
class QuantScheme:
    """What a checkpoint's quantization_config says: the layout (None: unquantized), format, activation scheme."""

    layout: Layout | None
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"  # "static": every quantized linear carries an input_scale
    ignore: tuple[str, ...] = ()
    vllm_scales_from_tensors: bool = False  # vLLM fp8 without block size: tensor vs channel decided by shapes


def _names(q: dict[str, Any], key: str) -> tuple[str, ...]:
    """A list of module names (or null) at ``quantization_config[key]``."""
    v = q.get(key)
    if v is None:
        return ()
    if not (isinstance(v, list) and all(isinstance(n, str) for n in v)):
        raise CheckpointError(f"quantization_config.{key}: expected a list of module names, got {_kind(v)} "
                              f"{v!r:.40}")
    return tuple(v)


def _block_size(value: Any, key: str) -> ScaleGroup:
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise CheckpointError(f"quantization_config.{key}: expected two integers [rows, cols], got {value!r:.40}")
    try:
        return ScaleGroup(int(value[0]), int(value[1]))
    except ValueError as e:
        raise CheckpointError(f"quantization_config.{key}: {e}") from None


def parse_quantization_config(config: dict[str, Any]) -> QuantScheme:
    """The ``QuantScheme`` of a config.json dict; ``CheckpointError`` for an unknown or malformed layout."""
    q = config.get("quantization_config")
    if q is None:
        return QuantScheme(None)
    if not isinstance(q, dict):
        raise CheckpointError(f"quantization_config must be an object, got {type(q).__name__}")
    method = q.get("quant_method")
    if method == "fp8":
        return _parse_fp8(q)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(q)
    raise CheckpointError(f"quantization_config.quant_method: unknown layout {method!r} (supported: 'fp8' as "
                          "written by vLLM/DeepSeek, 'compressed-tensors')")


def _parse_fp8(q: dict[str, Any]) -> QuantScheme:
    act = q.get("activation_scheme", "dynamic")
    if act not in ("static", "dynamic"):
        raise CheckpointError(f"quantization_config.activation_scheme: expected 'static' or 'dynamic', got {act!r}")
    fmt = q.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise CheckpointError(f"quantization_config.fmt: expected 'e4m3' or 'e5m2', got {fmt!r}")
    key = "ignored_layers" if q.get("ignored_layers") is not None else "modules_to_not_convert"
    ignore = _names(q, key)
    if q.get("weight_block_size") is not None:
        group = _block_size(q["weight_block_size"], "weight_block_size")
        base = LAYOUTS["deepseek-block" if "fmt" in q else "vllm-block"]
        return QuantScheme(Layout(base.name, base.family, group, "weight_scale_inv"), fmt, act, ignore)
    return QuantScheme(LAYOUTS["vllm-tensor"], fmt, act, ignore, vllm_scales_from_tensors=True)


def _parse_compressed_tensors(q: dict[str, Any]) -> QuantScheme:
    if q.get("format", "float-quantized") != "float-quantized":
        raise CheckpointError(f"quantization_config.format: only 'float-quantized' FP8 is supported, got "
                              f"{q.get('format')!r:.40}")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"quantization_config.config_groups: expected a non-empty object of groups, got "
                              f"{_kind(groups) if groups != {} else 'an empty object'}")
    ignore = _names(q, "ignore")
    schemes = []
    for gname, g in groups.items():
        where = f"quantization_config.config_groups.{gname}"
        if not isinstance(g, dict):
            raise CheckpointError(f"{where}: expected an object with 'weights', got {_kind(g)}")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise CheckpointError(f"{where}.weights: expected an object, got {_kind(w)}")
        where = f"{where}.weights"
        if w.get("num_bits") != 8 or w.get("type") != "float":
            raise CheckpointError(f"{where}: expected 8-bit float weights, got num_bits={w.get('num_bits')!r} "
                                  f"type={w.get('type')!r}")
        if w.get("symmetric", True) is not True:
            raise CheckpointError(f"{where}.symmetric: asymmetric FP8 is not supported")
        strategy = w.get("strategy")
        if strategy == "tensor":
            layout = LAYOUTS["ct-tensor"]
        elif strategy == "channel":
            layout = LAYOUTS["ct-channel"]
        elif strategy == "block":
            group = _block_size(w.get("block_structure"), f"config_groups.{gname}.weights.block_structure")
            layout = Layout("ct-block", "ct", group, "weight_scale")
        else:
            raise CheckpointError(f"{where}.strategy: unknown layout {strategy!r:.40} (tensor, channel or block)")
        acts = g.get("input_activations")
        if acts is not None and not isinstance(acts, dict):
            raise CheckpointError(f"quantization_config.config_groups.{gname}.input_activations: expected an object "
                                  f"or null, got {_kind(acts)}")
        act = "static" if acts and acts.get("dynamic") is False else "dynamic"
        schemes.append(QuantScheme(layout, "e4m3", act, ignore))
    if len(set(schemes)) > 1:
        raise CheckpointError("quantization_config.config_groups: groups with different schemes are not supported")
    return schemes[0]


# ---- config.json sizes --------------------------------------------------------------------------------------------

def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", type(None): "null"}.get(
        type(v), f"a {type(v).__name__}")


def config_int(config: dict[str, Any], key: str, default: int | None = None, lo: int = 1) -> int:
    """``config[key]`` as an int >= lo (``default`` when absent or null, if given); CheckpointError naming the key.
    Only JSON integers count: "80", 80.0 and true are refused."""
    v = config.get(key)
    if v is None:
        if default is not None:
            return default
        raise CheckpointError(f"{key}: {'missing' if key not in config else 'null'}, expected an integer >= {lo}")
    if isinstance(v, bool) or not isinstance(v, int):
        raise CheckpointError(f"{key}: expected an integer >= {lo}, got {_kind(v)} {v!r:.40}")
    if v < lo:
        raise CheckpointError(f"{key}: {v}, expected an integer >= {lo}")
    return v


@dataclass(frozen=True)
class LlamaDims:
    """The sizes of a Llama-family config.json, checked (every one an int >= 1, KV heads dividing the heads)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool

    def n_params(self) -> int:
        """Parameters the config describes (biases aside): embeddings, an untied head, norms and projections."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * self.intermediate
        return self.vocab * h * (1 if self.tied else 2) + h + self.layers * layer

    def describe(self) -> str:
        return (f"hidden_size={self.hidden}, intermediate_size={self.intermediate}, num_attention_heads={self.heads}, "
                f"num_key_value_heads={self.kv_heads}, head_dim={self.head_dim}, num_hidden_layers={self.layers}, "
                f"vocab_size={self.vocab}")


def llama_dims(config: dict[str, Any]) -> LlamaDims:
    """The checked sizes of a config dict (``head_dim`` absent or null: hidden_size // num_attention_heads)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"expected a JSON object, got {_kind(config)}")
    h, inter = config_int(config, "hidden_size"), config_int(config, "intermediate_size")
    heads, layers = config_int(config, "num_attention_heads"), config_int(config, "num_hidden_layers")
    kv = config_int(config, "num_key_value_heads", default=heads)
    vocab = config_int(config, "vocab_size")
    if heads % kv:
        raise CheckpointError(f"num_key_value_heads: {kv} does not divide num_attention_heads ({heads})")
    if config.get("head_dim") is None and h // heads < 1:
        raise CheckpointError(f"head_dim: absent, and hidden_size // num_attention_heads = {h} // {heads} is 0")
    hd = config_int(config, "head_dim", default=h // heads)
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise CheckpointError(f"tie_word_embeddings: expected true or false, got {_kind(tied)} {tied!r:.40}")
    return LlamaDims(h, inter, heads, kv, hd, layers, vocab, tied)


def check_model_type(config: dict[str, Any]) -> None:
    mt = config.get("model_type") if isinstance(config, dict) else None
    if mt not in ("llama", "mistral"):
        raise CheckpointError(f"model_type: {mt!r} is not a supported Llama-family model (llama, mistral)")


# ---- the model spec -------------------------------------------------------------------------------------------

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


@dataclass
class ModelSpec:
    """Every tensor a Llama-family checkpoint must hold, with its shape; ``linears`` are [out, in] projections."""

    config: dict[str, Any]
    dense: dict[str, tuple[int, ...]] = field(default_factory=dict)
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # module name -> (N, K)
    biases: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelSpec":
        check_model_type(config)
        d = llama_dims(config)
        h, inter, heads, kv, hd, layers, vocab = d.hidden, d.intermediate, d.heads, d.kv_heads, d.head_dim, \
            d.layers, d.vocab
        spec = cls(config)
        spec.dense["model.embed_tokens.weight"] = (vocab, h)
        spec.dense["model.norm.weight"] = (h,)
        if not d.tied:
            spec.dense["lm_head.weight"] = (vocab, h)
        shapes = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h),
                  "self_attn.v_proj": (kv * hd, h), "self_attn.o_proj": (h, heads * hd),
                  "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
        for i in range(layers):
            p = f"model.layers.{i}"
            spec.dense[f"{p}.input_layernorm.weight"] = (h,)
            spec.dense[f"{p}.post_attention_layernorm.weight"] = (h,)
            for proj in PROJECTIONS:
                spec.linears[f"{p}.{proj}"] = shapes[proj]
            if config.get("attention_bias"):
                for proj in PROJECTIONS[:4]:
                    spec.biases[f"{p}.{proj}.bias"] = (shapes[proj][0],)
            if config.get("mlp_bias"):
                for proj in PROJECTIONS[4:]:
                    spec.biases[f"{p}.{proj}.bias"] = (shapes[proj][0],)
        return spec

    def is_ignored(self, module: str, ignore: tuple[str, ...] | list[str]) -> bool:
        """True when a module is listed in ``ignore`` (exact name, a trailing name, or a ``re:`` pattern)."""
        import re

        for pat in ignore:
            if pat.startswith("re:") and re.fullmatch(pat[3:], module):
                return True
            if module == pat or module.endswith("." + pat):
                return True
        return False

    def n_params(self) -> int:
        return sum(math.prod(s) for s in (*self.dense.values(), *self.linears.values(), *self.biases.values()))
