"""Smoothing for W8A8 (SmoothQuant, Xiao et al., 2023): move the activations' outlier channels into the weights,
folded into the layers that produce those activations, so a checkpoint carries it with no new operation.

A linear y = x Wᵀ (x [T, K], W [N, K]) is unchanged by any positive s [K]:  y = (x / s) (W diag(s))ᵀ.
Per-token FP8 rounding gives all K elements of a token one scale, set by its largest |x_k|; a few channels whose
inputs run hundreds of times larger than the rest push the others toward e4m3's subnormals, where the relative
error grows. With

    s_k = a_k^α / w_k^(1−α),   a_k = max_t |x_tk| over calibration tokens,   w_k = max over n and G of |W_nk|

the channels' input ranges and the weights' meet in between (α = 0.5 is the paper's default), over the group G of
linears that read the same x, which share one s. e4m3 weights have relative precision, so they pay little for the
range they take on. Where one of a_k, w_k is 0 (a channel never active, or read by no weight) s_k = 1.

Sites, per decoder block (``find_sites``), and the fold that carries 1/s (``fold``):

    attention input norm (γ)  ->  q, k, v     γ' = γ / s    (Gemma's norms scale by 1 + γ: 1 + γ' = (1 + γ) / s)
    MLP input norm            ->  gate, up    same          (Gemma-3: pre_feedforward_layernorm)
    up_proj's output rows     ->  down        W_up' = diag(1 / s) W_up   (act(gate x) ⊙ (up x) is linear in up x)

and every consumer's W' = W diag(s). o_proj's input (the attention output) is left as it is: carrying 1/s there
needs v_proj's rows, one s per group of heads sharing a kv head. The folded model computes the same function up to
the rounding of the folded tensors to their dtype (``correctness/test_fp8_smooth``).

e4m3 has relative precision, so smoothing helps only where it keeps small channels out of the subnormals; what is
left of per-token rounding is the format's own 3-bit mantissa, which no per-channel scaling changes. SmolLM2 on the
CPU: per-token activations alone cost +0.97% perplexity with or without smoothing (``impl.fp8.experiments``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from impl.fp8.gptq import InputHooks

# the norm classes whose fold is tested (tiny and real models); any other is refused by name
PLAIN_NORMS = ("LlamaRMSNorm",)  # y = x̂ γ
PLUS_ONE_NORMS = ("Gemma3RMSNorm",)  # y = x̂ (1 + γ)
KINDS = ("norm", "norm1p", "rows")


@dataclass(frozen=True)
class Site:
    """One s: ``producer`` (a module name like ``layers.3.input_layernorm``) makes the input that ``consumers``
    (linears) read; ``kind`` says how 1/s folds into the producer's weight: "norm" (γ / s), "norm1p" (Gemma:
    (1 + γ) / s − 1) or "rows" (a linear's output rows / s)."""

    producer: str
    kind: str
    consumers: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"site kind must be one of {KINDS}, got {self.kind!r}")


def norm_kind(norm: nn.Module) -> str:
    """"norm" or "norm1p" for an RMSNorm class this module knows; ValueError naming any other."""
    name = type(norm).__name__
    if name in PLAIN_NORMS:
        return "norm"
    if name in PLUS_ONE_NORMS:
        return "norm1p"
    raise ValueError(f"{name}: not a norm smoothing can fold into (known: {', '.join(PLAIN_NORMS + PLUS_ONE_NORMS)})")


def find_sites(blocks: nn.ModuleList) -> list[Site]:
    """The three sites (module doc) of every decoder block of an HF Llama- or Gemma-style model, named as
    ``quality.block_linears`` names linears (``layers.<i>.<path>``)."""
    sites = []
    for i, block in enumerate(blocks):
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        mlp_norm = "pre_feedforward_layernorm" if hasattr(block, "pre_feedforward_layernorm") \
            else "post_attention_layernorm"
        needed = {"self_attn": attn, "mlp": mlp, "input_layernorm": getattr(block, "input_layernorm", None),
                  mlp_norm: getattr(block, mlp_norm, None)}
        missing = [k for k, v in needed.items() if v is None]
        if missing:
            raise ValueError(f"decoder block {i} ({type(block).__name__}) has no {', '.join(missing)}: "
                             "smoothing knows Llama- and Gemma-style blocks")
        p = f"layers.{i}"
        sites += [Site(f"{p}.input_layernorm", norm_kind(block.input_layernorm),
                       tuple(f"{p}.self_attn.{n}_proj" for n in "qkv")),
                  Site(f"{p}.{mlp_norm}", norm_kind(getattr(block, mlp_norm)),
                       (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")),
                  Site(f"{p}.mlp.up_proj", "rows", (f"{p}.mlp.down_proj",))]
    return sites


def prefixed(sites: list[Site], factors: dict[str, torch.Tensor],
             prefix: str) -> tuple[list[Site], dict[str, torch.Tensor]]:
    """The sites and factors with every name led by ``prefix`` (``model.`` for a checkpoint's tensor names)."""
    return ([Site(prefix + s.producer, s.kind, tuple(prefix + c for c in s.consumers)) for s in sites],
            {prefix + k: v for k, v in factors.items()})


def weight_amax(sites: list[Site], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{producer: w [K] float32}: the largest |W_nk| over the site's consumers' rows, per input channel k."""
    return {site.producer: torch.stack([weights[c].detach().to("cpu", torch.float32).abs().amax(0)
                                        for c in site.consumers]).amax(0) for site in sites}


def smoothing_factors(sites: list[Site], amax: dict[str, torch.Tensor], wmax: dict[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """{producer: s [K] float32} (module doc) from each site's input channel amax ``amax[producer]`` [K] and its
    consumers' weight column amax ``wmax[producer]`` [K] (``weight_amax``)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    out = {}
    for site in sites:
        a = amax[site.producer].detach().to("cpu", torch.float32)
        w = wmax[site.producer].detach().to("cpu", torch.float32)
        if a.shape != w.shape or not torch.isfinite(a).all() or not torch.isfinite(w).all():
            raise ValueError(f"{site.producer}: input amax {tuple(a.shape)} and weight columns {tuple(w.shape)} must "
                             "be finite and of one length")
        s = a.pow(alpha) / w.pow(1 - alpha)
        out[site.producer] = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return out


def fold_ops(sites: list[Site], factors: dict[str, torch.Tensor]) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """{parameter name: [(op, s), ...]}: what ``fold`` applies to each tensor (op "cols", "rows", "norm", "norm1p");
    up_proj takes two, its columns (MLP norm site) and its rows (down site)."""
    ops: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for site in sites:
        s = factors[site.producer]
        ops.setdefault(f"{site.producer}.weight", []).append((site.kind, s))
        if site.kind == "rows":
            ops.setdefault(f"{site.producer}.bias", []).append(("rows", s))
        for c in site.consumers:
            ops.setdefault(f"{c}.weight", []).append(("cols", s))
    return ops


def fold(t: torch.Tensor, ops: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """``t`` with ``ops`` applied in float32 (float64 for a float64 t), returned in t's dtype: cols W diag(s); rows
    diag(1/s) W (or b / s); norm γ / s; norm1p (1 + γ) / s − 1."""
    work = torch.promote_types(t.dtype, torch.float32)
    x = t.detach().to(work)
    for op, s in ops:
        s = s.to(x.device, work)
        if op == "cols":
            x = x * s
        elif op == "rows":
            x = x / (s[:, None] if x.ndim == 2 else s)
        elif op == "norm":
            x = x / s
        elif op == "norm1p":
            x = (1 + x) / s - 1
        else:
            raise ValueError(f"unknown fold op {op!r}")
    return x.to(t.dtype)


def block_parameters(blocks: nn.ModuleList) -> dict[str, nn.Parameter]:
    """Every parameter of the decoder blocks, named ``layers.<i>.<path>``."""
    return {f"layers.{i}.{n}": p for i, b in enumerate(blocks) for n, p in b.named_parameters()}


@contextlib.contextmanager
def smoothed(blocks: nn.ModuleList, sites: list[Site], factors: dict[str, torch.Tensor]):
    """Context: the decoder blocks with the smoothing folded into their weights in place (``fold``), every
    touched tensor restored bit for bit on exit."""
    params = block_parameters(blocks)
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, ops in fold_ops(sites, factors).items():
                p = params.get(name)
                if p is None:
                    if name.endswith(".bias"):
                        continue  # a producer linear without bias
                    raise ValueError(f"{name}: no such parameter in the decoder blocks")
                saved.append((p, p.detach().clone()))
                p.copy_(fold(p, ops))
        yield
    finally:
        with torch.no_grad():
            for p, old in reversed(saved):
                p.copy_(old)


class InputAmax(InputHooks):
    """max |x_k| per input channel of each site's input (a forward pre-hook on its first consumer, while active)."""

    def __init__(self, linears: dict[str, nn.Linear], sites: list[Site]) -> None:
        super().__init__({site.producer: linears[site.consumers[0]] for site in sites})
        self.amax: dict[str, torch.Tensor] = {}

    def _hook(self, producer: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            a = x.reshape(-1, x.shape[-1]).abs().amax(0).to("cpu", torch.float32)
            self.amax[producer] = torch.maximum(self.amax[producer], a) if producer in self.amax else a
        return hook


def smoothed_moments(moments: dict[str, torch.Tensor], sites: list[Site],
                     factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPTQ's input moments of the smoothed model from the unsmoothed ones: x' = x / s gives
    H' = diag(1/s) H diag(1/s) for every consumer; the other linears' H unchanged."""
    out = dict(moments)
    for site in sites:
        inv = 1.0 / factors[site.producer].to(torch.float64)
        for c in site.consumers:
            if c in moments:
                out[c] = moments[c] * inv[:, None] * inv[None, :]
    return out
