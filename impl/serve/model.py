"""A Llama-architecture decoder in the gpt-fast style: one ``ModelArgs`` with presets, flat modules, no cache inside.

    h   = x + Wo · attn(RoPE(Wq·n1(x)), RoPE(Wk·n1(x)), Wv·n1(x))      n1, n2 = RMSNorm
    out = h + W2 · (silu(W1·n2(h)) ⊙ W3·n2(h))                         (SwiGLU; W1 = gate, W3 = up)

Attention is grouped-query (``n_heads`` query heads share ``n_kv_heads`` K/V heads). The model owns no KV cache: every
forward gets a ``StepContext`` that knows the tokens' positions and how to store this step's K/V and attend over the
sequence (paged cache + a backend in ``attention.py``; a contiguous cache in ``reference.py``). Tokens of all sequences
in a step are flattened into one ``[T]`` vector (prefill chunks and decode tokens alike). QKV and gate/up projections
are fused (``wqkv``, ``w13``) so a decode step reads each weight matrix in one GEMM; their linears come from a factory
so that ``fp8_adapter`` can swap in FP8 linears. With ``fused=True`` (the default on a GPU) RMSNorm + residual add,
RoPE + the KV-cache write, and SiLU·up each run as one Triton kernel (``fused.py``), rounding as the torch ops do;
each block hands its output and the residual stream to the next norm, which adds them in the same kernel, and an FP8
down projection that takes ``swiglu=True`` computes SiLU·up while it loads its input (no separate kernel). Where the
FP8 linear after a norm quantises its input per token (``takes_fp8_rows``), the norm writes e4m3 rows instead of
bf16 ones (``fused_quant.py``: the same codes, without a quantisation kernel of their own).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impl.common.shapes import LLAMA3_8B, DecoderShape


@dataclass(frozen=True)
class ModelArgs:
    """Shapes and constants of a Llama decoder (by default Llama-3-8B's sizes). ``head_dim`` 0 means
    ``dim // n_heads``."""

    dim: int = LLAMA3_8B.dim
    n_layers: int = LLAMA3_8B.n_layers
    n_heads: int = LLAMA3_8B.n_heads
    n_kv_heads: int = LLAMA3_8B.n_kv_heads
    head_dim: int = 0
    ffn_dim: int = LLAMA3_8B.ffn_dim
    vocab_size: int = LLAMA3_8B.vocab_size
    norm_eps: float = 1e-5
    rope_theta: float = LLAMA3_8B.rope_theta
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @classmethod
    def from_shape(cls, shape: DecoderShape, **rest: Any) -> "ModelArgs":
        """The sizes of ``shape`` (``impl.common.shapes``); ``rest`` sets the other fields."""
        return cls(dim=shape.dim, n_layers=shape.n_layers, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                   head_dim=shape.head_dim, ffn_dim=shape.ffn_dim, vocab_size=shape.vocab_size,
                   rope_theta=shape.rope_theta, **rest)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelArgs":
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """From a Hugging Face ``config.json`` of a Llama model (transformers 4 ``rope_scaling``/``rope_theta`` or
        transformers 5 ``rope_parameters``)."""
        if cfg.get("model_type") not in ("llama", None):
            raise ValueError(f"unknown model layout: model_type={cfg.get('model_type')!r}, this decoder serves 'llama'")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ValueError(f"unsupported model layout: {key}=true (this decoder has no biases)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; SwiGLU needs 'silu'")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        kind = rope.get("rope_type", rope.get("type", "default"))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                   n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                   head_dim=cfg.get("head_dim") or 0, ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                   norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=theta,
                   rope_scaling=None if kind == "default" else rope,
                   max_seq_len=int(cfg.get("max_position_embeddings", 8192)),
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), eos_token_ids=eos_ids)


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
PRESETS: dict[str, ModelArgs] = {
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                              rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True, eos_token_ids=(2,)),
    "llama-3-8b": ModelArgs.from_shape(LLAMA3_8B, max_seq_len=8192, eos_token_ids=(128001, 128009)),
    "llama-3.1-8b": ModelArgs.from_shape(LLAMA3_8B, rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
                                         eos_token_ids=(128001, 128008, 128009)),
    # test-sized models: odd head counts and GQA groups, a llama3-scaled RoPE, a vocabulary that is not a power of 2
    "tiny": ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, vocab_size=97, rope_theta=10000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                      max_seq_len=256),
    "tiny-8b-shaped": ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=512, vocab_size=512,
                                rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, max_seq_len=1024),
}


# ---- RoPE --------------------------------------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2 (float32, as HF computes it), then the model's scaling:

    - ``linear``: inv_freq / factor;
    - ``llama3``: wavelengths 2π/f shorter than L/high_freq_factor keep f, longer than L/low_freq_factor get f/factor,
      and in between s·f + (1−s)·f/factor with s = (L/λ − low)/(high − low), L = original_max_position_embeddings.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        old = float(scaling["original_max_position_embeddings"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old / low, inv / factor, inv)
        is_mid = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(is_mid, mid, out)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [T, head_dim] for positions [T] (angles in float32; halves repeated, HF's layout)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, head_dim] rotated by position: x·cos + rotate_half(x)·sin, rotate_half(a, b) = (−b, a)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---- modules -----------------------------------------------------------------------------------------------------

class StepContext(Protocol):
    """What one forward step needs from the cache side (see ``kv_cache.PagedStep`` and ``reference``)."""

    positions: Tensor       # [T] int64, position of each token in its sequence
    logits_index: Tensor | None  # rows of [T] whose logits are returned (last token of each sequence); None = all

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store k, v [T, n_kv_heads, head_dim] for this step, return softmax(q·Kᵀ/√d)·V as [T, n_heads, head_dim]."""
        ...


class DenseLinear(nn.Module):
    """y = x · Wᵀ with W [out, in] in the model dtype (no bias). Weights start uninitialised (loaded or randomised).

    ``gemv_config`` (a ``fp8_gemv.GemvConfig``, set by ``choose.make_batch_invariant``): the product runs through
    serving's GEMV kernel with that one configuration for every number of rows (batch-invariant) instead of cuBLAS,
    on CUDA tensors (and on the CPU when ``use_kernel`` is True)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.gemv_config: Any = None
        self.use_kernel: bool | None = None

    def forward(self, x: Tensor) -> Tensor:
        x = dense(x)
        kernel = self.use_kernel if self.use_kernel is not None else x.is_cuda
        if self.gemv_config is None or not kernel:
            return F.linear(x, self.weight)
        from impl.serve.fp8_gemv import gemv

        one = torch.ones(1, dtype=torch.float32, device=x.device)
        y = gemv(x.reshape(-1, self.in_features), self.weight, one, self.gemv_config)
        return y.reshape(*x.shape[:-1], self.out_features)


LinearFactory = Callable[[int, int], nn.Module]


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), the statistic in float32 (HF's order of casts, for token-exact parity)."""

    fused = False

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: Tensor, fp8: bool = False) -> Any:
        """norm(x); ``fp8`` (fused only): as per-token e4m3 rows (``fused_quant.Fp8Rows``) for a W8A8 linear."""
        if self.fused or fp8:
            return self.add_forward(x, None, fp8)[0]
        x = dense(x)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def add_forward(self, x: Tensor, residual: Tensor | None, fp8: bool = False) -> tuple[Any, Tensor | None]:
        """(norm(residual + x), residual + x): the residual stream's update and the next sublayer's input (no
        residual: (norm(x), None)); ``fp8`` as in ``forward``."""
        if self.fused and fp8:
            from impl.serve.fused_quant import rmsnorm_quant

            return rmsnorm_quant(x, self.weight, self.eps, residual)
        if self.fused:
            from impl.serve.fused import rmsnorm

            return rmsnorm(x, self.weight, self.eps, residual)
        if fp8:
            raise ValueError("FP8 norm outputs come from the fused kernels only (set_fused(True))")
        x = dense(x)
        h = x if residual is None else residual + x
        return self.forward(h), (None if residual is None else h)


class Attention(nn.Module):
    fused = False

    def __init__(self, args: ModelArgs, layer: int, make_linear: LinearFactory) -> None:
        super().__init__()
        self.args, self.layer = args, layer
        self.wqkv = make_linear(args.dim, args.qkv_dim)
        self.wo = make_linear(args.n_heads * args.head_dim, args.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: StepContext) -> Any:
        """The attention sublayer's output [T, dim] (``ScaledRows`` when fused and o_proj defers its scales: the norm
        after it applies them)."""
        a = self.args
        rope_fused = self.fused and hasattr(ctx, "rope_attend")  # RoPE and the cache write in one kernel
        qkv = call_linear(self.wqkv, x, defer=rope_fused)
        if rope_fused:
            out = ctx.rope_attend(self.layer, qkv, cos, sin)
        else:
            q_end, k_end = a.n_heads * a.head_dim, (a.n_heads + a.n_kv_heads) * a.head_dim
            q = qkv[:, :q_end].view(-1, a.n_heads, a.head_dim)
            k = qkv[:, q_end:k_end].view(-1, a.n_kv_heads, a.head_dim)
            v = qkv[:, k_end:].reshape(-1, a.n_kv_heads, a.head_dim)
            out = ctx.attend(self.layer, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return call_linear(self.wo, out.reshape(x.shape[0], -1), defer=self.fused)


class FeedForward(nn.Module):
    fused = False

    def __init__(self, args: ModelArgs, make_linear: LinearFactory) -> None:
        super().__init__()
        self.ffn_dim = args.ffn_dim
        self.w13 = make_linear(args.dim, 2 * args.ffn_dim)
        self.w2 = make_linear(args.ffn_dim, args.dim)

    def forward(self, x: Tensor) -> Any:
        """The MLP's output [T, dim] (``ScaledRows`` when fused and the down projection defers its scales)."""
        gu = call_linear(self.w13, x, defer=self.fused)
        if getattr(self.w2, "takes_swiglu", False):  # the down projection computes silu(gate) · up as it loads
            return call_linear(self.w2, gu, defer=self.fused, swiglu=True)
        if self.fused:
            from impl.serve.fused import silu_mul

            return call_linear(self.w2, silu_mul(gu), defer=True)
        gate, up = gu.split(self.ffn_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


def call_linear(linear: nn.Module, x: Any, *, defer: bool, **kw: Any) -> Any:
    """linear(x, **kw); with ``defer`` (the consumer is a fused kernel that applies scales as it loads) the result is
    ``fused.ScaledRows`` where the linear's path for these rows leaves its scales to the consumer (FP8 ``deferred``)."""
    defers = getattr(linear, "defers_scale", None)
    if defer and defers is not None and defers(x.shape[0], x.device):
        return linear(x, defer=True, **kw)
    return linear(x, **kw)


def dense(x: Any) -> Any:
    """x as a tensor (``fused.ScaledRows`` made dense; anything else unchanged)."""
    from impl.serve.fused import ScaledRows

    return x.dense() if isinstance(x, ScaledRows) else x


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, make_linear: LinearFactory, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, dtype, device)
        self.attention = Attention(args, layer, make_linear)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype, device)
        self.feed_forward = FeedForward(args, make_linear)

    def forward(self, x: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor,
                ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(this block's output, residual stream before it): the caller adds the two in the next norm, so each
        residual add shares a kernel with the RMSNorm after it. ``residual`` None: x is the embedding itself."""
        fp8 = self.attention_norm.fused and takes_fp8_rows(self.attention.wqkv, x)
        if residual is None:
            normed, residual = self.attention_norm(x, fp8), x
        else:
            normed, residual = self.attention_norm.add_forward(x, residual, fp8)
        out = self.attention(normed, cos, sin, ctx)
        fp8 = self.ffn_norm.fused and takes_fp8_rows(self.feed_forward.w13, out)
        normed, residual = self.ffn_norm.add_forward(out, residual, fp8)
        return self.feed_forward(normed), residual


def takes_fp8_rows(linear: nn.Module, x: Tensor) -> bool:
    """Whether ``linear`` takes x's rows as per-token e4m3 (an FP8 linear whose path for that many rows quantises
    them first): the fused norm before it then quantises its output instead of storing it."""
    want = getattr(linear, "takes_fp8_rows", None)
    return want is not None and want(x.shape[0], x.device)


class Transformer(nn.Module):
    """tokens [T] → logits [B, vocab] (float32) for the rows ``ctx.logits_index`` (all T rows when it is None)."""

    def __init__(self, args: ModelArgs, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 make_linear: LinearFactory | None = None, fused: bool | None = None) -> None:
        super().__init__()
        self.args, self.dtype = args, dtype
        make_linear = make_linear or (lambda i, o: DenseLinear(i, o, dtype, device))
        self.tok_embeddings = nn.Parameter(torch.empty(args.vocab_size, args.dim, dtype=dtype, device=device),
                                           requires_grad=False)
        self.layers = nn.ModuleList(TransformerBlock(args, i, make_linear, dtype, device) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype, device)
        self.output = DenseLinear(args.dim, args.vocab_size, dtype, device)  # the LM head stays in the model dtype
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings
        self.register_buffer("inv_freq", rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling).to(device),
                             persistent=False)
        self.set_fused(torch.device(device).type == "cuda" if fused is None else fused)

    def set_fused(self, on: bool) -> "Transformer":
        """Use the fused Triton kernels (``fused.py``) for norms, RoPE + cache writes and SwiGLU, or torch ops."""
        self.fused = on
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, FeedForward)):
                m.fused = on
        return self

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.device

    def forward(self, tokens: Tensor, ctx: StepContext) -> Tensor:
        x = F.embedding(tokens, self.tok_embeddings)
        cos, sin = rope_cos_sin(ctx.positions, self.inv_freq, self.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, ctx)
        x = self.norm(x) if residual is None else self.norm.add_forward(x, residual)[0]
        if ctx.logits_index is not None:
            x = x[ctx.logits_index]
        return self.output(x).float()
