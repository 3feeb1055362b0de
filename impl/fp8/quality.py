"""Quality of FP8 linears in a real model: perplexity and greedy agreement against the unquantized model.

A *variant* is (scale group, mode, kept blocks or linears, rounding, smoothing): every ``nn.Linear`` of the decoder
blocks becomes an ``Fp8Linear`` over the weight quantized with dynamic amax scales of the group (per tensor, per output
channel, 128x128 blocks), in mode ``w8a16`` (weight-only; activations stay in the compute dtype) or ``w8a8``
(activations quantized to e4m3 on every call, per token, or per 1x128 slice of a token for block weights, as vLLM runs
block-scaled checkpoints and as the ct-block layout's config declares; ``act_group`` in each record), except the
linears of the blocks listed in ``keep`` and the linears listed in ``keep_linears``, which stay dense (named in the
checkpoint's ignore list: ``ignore_list``). Embeddings, norms and the LM head are never quantized
(vLLM's default). The swap happens in memory on a model loaded once; with ``nearest`` rounding the codes and scales
are those the quantizer writes into a checkpoint (``check_layouts`` proves it per layout, bit for bit); ``gptq`` chooses
each code with GPTQ (``impl.fp8.gptq``; with ``GptqConfig.placements`` > 1 also each band's grid placement, the scales
times 2^(j/J)) from the linears' input moments over the calibration tokens (the ones before the evaluation text, as
for sensitivity), measured on the base model or on the model rounded to nearest in the variant's group
(``GptqConfig.inputs``).

Metric, per variant, over non-overlapping windows w = 1..W of the evaluation text (paired with the base model):
    d_w   = mean NLL of window w (variant) - mean NLL of window w (base)
    Delta = 100 (exp(mean_w d_w) - 1)          % change of perplexity (every window has the same token count)
with a 95% percentile bootstrap interval over windows (resampled with replacement, paired, fixed seed), and
|Delta|'s conservative end ``abs_hi`` = max(|lo|, |hi|): the claims judge that. Greedy agreement: the share of
positions where the variant's argmax next token equals the base model's.

Activations alone (``activations_only``): the weights left dense, every decoder linear's input rounded to e4m3 per
token and per 1x128 slice -- the part of a W8A8 change that no weight rounding can remove -- and per token after
each smoothing the variants use.

Smoothing (``Variant.smooth``, ``...-smooth``): SmoothQuant's factors (``impl.fp8.smooth``), from each site's input
channel amax over the calibration tokens, folded into the model's norms, up_proj rows and weights before the weights
are rounded; GPTQ's moments are transformed alike (``smooth.smoothed_moments``). The migration strength alpha is
fixed by the caller, or chosen per scale group on the calibration tokens (``Smoothing.choose``): of no smoothing and
the alphas of ``ALPHA_GRID``, the one whose W8A8 model (rounded to nearest) has the least perplexity there -- never
on the evaluation text. Each variant records the alpha it ran with (``smooth_alpha``; None: no smoothing won).

Grid placement (``Variant.grid``, ``...-grid<f>``; in memory only, no checkpoint recipe): the scales multiplied by f in
(1, 2). FP8's grid is relative, so this keeps every statistic of the rounding error (f = 2 only moves the exponent:
the same codes' values) and changes which way each weight rounds -- another draw of the same recipe. The spread of
the perplexity change over f = 2^(j/J) says how much of a figure is that draw rather than the recipe (SmolLM2 on
an H100, bf16, 196416 tokens, four placements: channel W8A16 GPTQ +0.59 to +1.32%, block +1.03 to +1.23%;
results/h100-80gb-hbm3/fp8/quality_grid.json); ``grid_spread`` in each model's record.

Sensitivity (which blocks or linears dominate the error), always over calibration windows that come *before* the
evaluation text, never from it, as the mean KL(base || variant) of the next-token distributions
(``BaseDistributions``). Blocks: each block alone quantized (W8A16, channel scales); a ``top<k>`` policy keeps the k
most sensitive blocks dense. Linears: each decoder linear alone quantized as the variant runs it -- weight rounded to
nearest in the variant's group, and in W8A8 its input rounded per token (per 1x128 slice for block weights), after
the variant's smoothing if it has one -- over the first ``LINEAR_CALIB_TOKENS`` calibration tokens; a ``lin<k>``
policy keeps the k most sensitive linears dense (``linear_sensitivity`` in the record, per group, mode and
smoothing), as llm-compressor's and vLLM's ignore lists keep single layers in bf16. SmolLM2 on the CPU (float32,
1536 calibration tokens, channel W8A8 rounded to nearest): the per-linear KLs add up to nearly the all-linear one;
the 5 / 10 / 20 / 40 most sensitive of 210 linears carry 20 / 27 / 36 / 51% of their sum (the last block's MLP
16%, then block 0's MLP; input rounding alone ranks alike), the rest is a long flat tail; on 2048 later tokens,
keeping the top 14 dense cuts the all-linear KL by 32%, the first and last blocks (also 14 linears) by 19%, the top
32 by 42%.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from impl import backend
from impl.fp8 import smooth
from impl.fp8.formats import GROUP128, TOKEN, ScaleGroup, activation_name, get_group
from impl.fp8.gptq import GptqConfig, placed_scales, placement_factors
from impl.fp8.hf import perplexity
from impl.fp8.linear import Fp8Linear, Fp8Weight, quantize_activations
from impl.fp8.scales import SCALE_CHOICES, choose_scales

GROUPS = ("tensor", "channel", "block")
POLICY_FORMS = ("all (nothing kept dense), first-last (the first and last blocks), top<k> (the k most sensitive "
                "blocks), lin<k> (the k most sensitive linears)")
MODES = ("w8a16", "w8a8")
ROUNDINGS = ("nearest", "gptq")
BOOTSTRAP = 2000
SEED = 0


@dataclass(frozen=True)
class Variant:
    """One quantized configuration of a model: scale group, mode, decoder blocks kept dense."""

    group: str
    mode: str
    keep: tuple[int, ...] = ()
    policy: str = "all"  # how ``keep`` / ``keep_linears`` were chosen (``parse_policy``)
    rounding: str = "nearest"  # of the weights to e4m3: "nearest" or "gptq" (impl.fp8.gptq)
    scales: str = "amax"  # per group: "amax" / FMAX, or "mse" (impl.fp8.scales: least squared rounding error)
    smooth: bool = False  # SmoothQuant's factors folded in before rounding (impl.fp8.smooth; alpha: the run's)
    grid: float = 1.0  # the scales multiplied by this, in [1, 2): another placement of the FP8 grid (module doc)
    keep_linears: tuple[str, ...] = ()  # decoder linears kept dense, by qualified name ("layers.3.mlp.down_proj")

    def __post_init__(self) -> None:
        kind, _ = parse_policy(self.policy)
        if self.keep_linears and kind != "lin":
            raise ValueError(f"keep_linears come from a lin<k> policy, not {self.policy!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.scales not in SCALE_CHOICES:
            raise ValueError(f"scales must be one of {SCALE_CHOICES}, got {self.scales!r}")
        if not 1.0 <= self.grid < 2.0:
            raise ValueError(f"grid must lie in [1, 2) (a factor 2 only moves the exponent), got {self.grid!r}")

    @property
    def name(self) -> str:
        return (f"{self.group}-{self.mode}" + ("" if self.rounding == "nearest" else f"-{self.rounding}")
                + ("" if self.scales == "amax" else f"-{self.scales}")
                + ("-smooth" if self.smooth else "")
                + ("" if self.grid == 1.0 else f"-grid{self.grid:.4f}")
                + ("" if self.policy == "all" else f"-keep-{self.policy}"))


def parse_policy(policy: str) -> tuple[str, int]:
    """(kind, k) of a keep policy: ("all", 0), ("first-last", 2), ("top", k) or ("lin", k) with k >= 1; a
    ValueError naming ``POLICY_FORMS`` for anything else."""
    if policy in ("all", "first-last"):
        return policy, 0 if policy == "all" else 2
    m = re.fullmatch(r"(top|lin)([1-9][0-9]*)", policy) if isinstance(policy, str) else None
    if m is None:
        raise ValueError(f"unknown keep policy {policy!r}: one of {POLICY_FORMS}")
    return m[1], int(m[2])


LINEAR_CALIB_TOKENS = 8192  # of the calibration tokens, the first ones ranking the linears (one forward per linear)
ACTIVATION_GROUPS = {"token": TOKEN, "1x128": GROUP128}  # the activation roundings a W8A8 variant can take
ALPHA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # smoothing strengths Smoothing.choose tries
CHOSEN_BY = "least W8A8 (nearest) perplexity on the calibration tokens, of none and ALPHA_GRID"


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: not a decoder-only HF causal LM")
    return layers


def block_linears(model: nn.Module) -> list[tuple[int, str, nn.Module, str, nn.Linear]]:
    """(block index, qualified name, parent module, attribute, linear) of every nn.Linear inside the decoder blocks."""
    out = []
    for i, block in enumerate(decoder_blocks(model)):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                owner, _, attr = name.rpartition(".")
                out.append((i, f"layers.{i}.{name}", block.get_submodule(owner) if owner else block, attr, mod))
    return out


def grid_scales(w: torch.Tensor, group: str | ScaleGroup, scales: str = "amax", grid: float = 1.0) -> torch.Tensor:
    """float32 scales [R, C] (CPU) of ``w``: ``impl.fp8.scales``' choice times ``grid`` (``Variant.grid``)."""
    s = choose_scales(w, group, "e4m3", scales)
    return placed_scales(s, grid)


def quantize_weight_like_checkpoint(w: torch.Tensor, group: str, scales: str = "amax", grid: float = 1.0) -> Fp8Weight:
    """e4m3 codes and float32 scales of ``w`` as ``impl.fp8.quantize`` writes them: the Triton kernel on a GPU, its
    bit-exact CPU reference elsewhere (the interpreter would take minutes for a whole model); ``scales="mse"``: the
    scales ``impl.fp8.scales`` chooses, the codes the reference quantizer's with them; ``grid``: those scales times
    it (``grid_scales``; in memory only)."""
    from impl.fp8 import quant
    from impl.fp8.reference import quantize_reference

    g = get_group(group)
    if scales != "amax" or grid != 1.0:
        codes, s = quantize_reference(w, g, "e4m3", scales=grid_scales(w, g, scales, grid))
    elif w.is_cuda and not backend.INTERPRETED:
        q, s = quant.quantize(w, g, "e4m3")
        return Fp8Weight(q, s, g)
    else:
        codes, s = quantize_reference(w, g, "e4m3")
    return Fp8Weight(codes.view(torch.float8_e4m3fn).to(w.device), s.to(w.device), g)


def quantize_weights_gptq(weights: dict[str, torch.Tensor], group: str, moments: dict[str, torch.Tensor],
                          scales: str = "amax", cfg: GptqConfig = GptqConfig(),
                          grid: float = 1.0) -> dict[str, Fp8Weight]:
    """``quantize_weight_like_checkpoint``'s format and scales for each named weight, codes rounded by GPTQ
    (settings ``cfg``) with its input moments ``moments[name]``; all in one batched call (``gptq_quantize_many``)."""
    from impl.fp8.gptq import gptq_quantize_many

    names = list(weights)
    got = gptq_quantize_many([(weights[n], moments[n], group, grid_scales(weights[n], group, scales, grid))
                              for n in names], cfg)
    return {n: Fp8Weight(codes.view(torch.float8_e4m3fn), s.to(weights[n].device), get_group(group))
            for n, (codes, s) in zip(names, got)}


@contextlib.contextmanager
def replaced(model: nn.Module, make: Callable[[int, str, nn.Linear], nn.Module | None]):
    """Context: each decoder linear of ``model`` replaced by ``make(block index, qualified name, linear)`` (None keeps
    it), every one restored on exit."""
    saved: list[tuple[nn.Module, str, nn.Linear]] = []
    try:
        for i, name, parent, attr, lin in block_linears(model):
            new = make(i, name, lin)
            if new is not None:
                saved.append((parent, attr, lin))
                setattr(parent, attr, new)
        yield
    finally:
        for parent, attr, lin in reversed(saved):
            setattr(parent, attr, lin)


class Swapped:
    """Context: the decoder linears of ``model`` replaced by Fp8Linears of ``variant`` (``replaced``), all but those
    it keeps dense (its blocks ``keep`` and linears ``keep_linears``); with ``blocks`` or ``linears`` (qualified
    names) given, only the ones among those.

    ``cache`` (a dict kept by the caller) keeps each linear's quantized weight per (group, rounding, scales,
    smoothing, grid), and on the CPU its dequantized copy, so the variants of one group quantize once. GPTQ rounding
    needs ``moments``: each linear's input second moment H by qualified name (``input_moments``), and rounds with the
    settings ``gptq``."""

    def __init__(self, model: nn.Module, variant: Variant, blocks: tuple[int, ...] | None = None,
                 cache: dict | None = None, moments: dict[str, torch.Tensor] | None = None,
                 gptq: GptqConfig = GptqConfig(), linears: tuple[str, ...] | None = None) -> None:
        self.model, self.variant, self.blocks, self.linears = model, variant, blocks, linears
        self.cache = {} if cache is None else cache
        self.moments, self.gptq = moments, gptq
        if variant.rounding == "gptq" and moments is None:
            raise ValueError(f"{variant.name}: GPTQ rounding needs the layers' input moments")
        self.paths: dict[str, int] = {}
        self._swap: contextlib.AbstractContextManager | None = None

    def _swapped(self, i: int, name: str) -> bool:
        v = self.variant
        return (i not in v.keep and name not in v.keep_linears and (self.blocks is None or i in self.blocks)
                and (self.linears is None or name in self.linears))

    def _key(self, name: str) -> tuple:
        v = self.variant
        return (v.group, v.rounding, v.scales, v.smooth, v.grid, name)

    def _quantize_gptq(self) -> None:
        """Every swapped linear's GPTQ weight not yet in the cache, in one batch."""
        todo = {name: lin for i, name, _, _, lin in block_linears(self.model)
                if self._swapped(i, name) and self._key(name) not in self.cache}
        if todo:
            got = quantize_weights_gptq({n: lin.weight.data for n, lin in todo.items()}, self.variant.group,
                                        self.moments, self.variant.scales, self.gptq, self.variant.grid)
            for n, w in got.items():
                self.cache[self._key(n)] = [w, None]

    def _layer(self, i: int, name: str, lin: nn.Linear) -> Fp8Linear | None:
        v = self.variant
        if not self._swapped(i, name):
            return None
        key = self._key(name)
        if key not in self.cache:
            self.cache[key] = [quantize_weight_like_checkpoint(lin.weight.data, v.group, v.scales, v.grid), None]
        w, dense = self.cache[key]
        if lin.bias is not None:
            w.bias = lin.bias.data
        layer = Fp8Linear(w, compute_dtype=lin.weight.dtype, mode=v.mode)
        if layer.path.endswith("-torch"):  # the CPU paths keep W dequantized: share it between modes
            if dense is None:
                self.cache[key][1] = dense = layer.dequantized_weight()
            layer._dense = dense
        self.paths[layer.path] = self.paths.get(layer.path, 0) + 1
        return layer

    def __enter__(self) -> "Swapped":
        if self.variant.rounding == "gptq":
            self._quantize_gptq()
        self._swap = replaced(self.model, self._layer)
        self._swap.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.__exit__(*exc)


class RoundedInput(nn.Module):
    """``linear`` with its input rounded to e4m3 (dynamic scales of ``group``) and dequantized first; the weight is
    the linear's own, dense."""

    def __init__(self, linear: nn.Linear, group: ScaleGroup) -> None:
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        native = x.is_cuda and not backend.INTERPRETED
        xq = quantize_activations(x2, self.group, self.linear.weight.dtype, reference=not native)
        return self.linear(xq.reshape(x.shape).to(x.dtype))


@torch.no_grad()
def activations_only(model: nn.Module, ids: torch.Tensor, base: dict[str, Any], *, window: int, batch: int,
                     bos: int | None, ref_argmax: list[torch.Tensor] | None = None,
                     smoothing: Smoothing | None = None, alphas: tuple[float, ...] = ()) -> dict[str, Any]:
    """{group name: perplexity change} with dense weights and every decoder linear's input rounded to e4m3 in
    ``ACTIVATION_GROUPS``' groups (module doc), and per token after ``smoothing`` with each of ``alphas``
    ("token-smooth<alpha>"); paired with ``base`` as the variants are."""
    runs = [(name, group, 0.0) for name, group in ACTIVATION_GROUPS.items()]
    runs += [(f"token-smooth{a:g}", TOKEN, a) for a in sorted({a for a in alphas if a is not None})]
    out: dict[str, Any] = {}
    for name, group, alpha in runs:
        with smoothing.folded(model, alpha) if alpha else contextlib.nullcontext():
            with replaced(model, lambda i, n, lin: RoundedInput(lin, group)):
                r = perplexity(model, ids, window=window, batch=batch, reference_argmax=ref_argmax, bos=bos)
        r.update(bootstrap_delta(base["window_nll"], r["window_nll"]))
        out[name] = {k: r[k] for k in ("ppl", "delta_pct", "ci95", "abs_hi", "top1_agreement")}
    return out


@dataclass
class Smoothing:
    """A model's smoothing sites and their inputs' channel amax over calibration tokens (``impl.fp8.smooth``); the
    factors s for any alpha follow from them and the weights."""

    sites: list[smooth.Site]
    amax: dict[str, torch.Tensor]  # of the inputs, per site
    wmax: dict[str, torch.Tensor]  # of the consumers' weight columns, per site (``smooth.weight_amax``)
    calib_tokens: int
    _factors: dict[float, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def measure(cls, model: nn.Module, calib: torch.Tensor, *, window: int, bos: int | None) -> "Smoothing":
        sites = smooth.find_sites(decoder_blocks(model))
        linears = {name: lin for _, name, _, _, lin in block_linears(model)}
        with smooth.InputAmax(linears, sites) as rec:
            for row in calibration_windows(model, calib, window, bos):
                model(input_ids=row[None])
        wmax = smooth.weight_amax(sites, {name: lin.weight for name, lin in linears.items()})
        return cls(sites, rec.amax, wmax, int(calib.numel()))

    def factors(self, alpha: float) -> dict[str, torch.Tensor]:
        if alpha not in self._factors:
            self._factors[alpha] = smooth.smoothing_factors(self.sites, self.amax, self.wmax, alpha)
        return self._factors[alpha]

    def folded(self, model: nn.Module, alpha: float) -> contextlib.AbstractContextManager:
        """Context: ``model`` with alpha's smoothing folded in (``smooth.smoothed``)."""
        return smooth.smoothed(decoder_blocks(model), self.sites, self.factors(alpha))

    def moments(self, moments: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        return smooth.smoothed_moments(moments, self.sites, self.factors(alpha))

    @torch.no_grad()
    def choose(self, model: nn.Module, calib: torch.Tensor, group: str, *, window: int, batch: int,
               bos: int | None, grid: tuple[float, ...] = ALPHA_GRID) -> tuple[float | None, dict[str, float]]:
        """(alpha, {"none" or alpha: perplexity}): of no smoothing (None) and ``grid``, the one whose W8A8 model in
        ``group`` (rounded to nearest) has the least perplexity over the calibration tokens ``calib``."""
        ppl: dict[float | None, float] = {}
        for a in (None, *grid):
            with self.folded(model, a) if a is not None else contextlib.nullcontext():
                with Swapped(model, Variant(group, "w8a8")):
                    ppl[a] = perplexity(model, calib, window=window, batch=batch, bos=bos)["ppl"]
        best = min(ppl, key=lambda a: ppl[a])
        return best, {("none" if a is None else f"{a:g}"): v for a, v in ppl.items()}

    def record(self) -> dict[str, Any]:
        return {"calib_tokens": self.calib_tokens,
                "sites": {k: sum(s.kind == k for s in self.sites) for k in smooth.KINDS},
                "smoothed_linears": sum(len(s.consumers) for s in self.sites)}


def bootstrap_delta(base_nll: list[float], var_nll: list[float], *, n: int = BOOTSTRAP,
                    seed: int = SEED) -> dict[str, float]:
    """Delta % of perplexity and its 95% paired percentile bootstrap interval over windows (module doc): the
    interval of the mean per-window NLL difference (``impl.common.stats.paired_bootstrap``) mapped through
    100 (exp(.) - 1), which is increasing, so the ends stay the ends."""
    from impl.common.stats import paired_bootstrap

    if len(base_nll) != len(var_nll) or not base_nll:
        raise ValueError(f"need the same non-zero number of windows, got {len(base_nll)} and {len(var_nll)}")
    r = paired_bootstrap(base_nll, var_nll, "mean", n=n, seed=seed, level=0.95)
    lo, hi = 100 * math.expm1(r["lo"]), 100 * math.expm1(r["hi"])
    return {"delta_pct": 100 * math.expm1(r["diff"]), "ci95": [lo, hi], "abs_hi": max(abs(lo), abs(hi)),
            "windows": r["n"], "bootstrap": n, "seed": seed}


def calibration_windows(model: nn.Module, calib: torch.Tensor, window: int, bos: int | None) -> torch.Tensor:
    """``calib`` (1-D token ids) as rows of ``window`` tokens on the model's device, each led by ``bos`` if given;
    a tail shorter than a window is dropped."""
    device = next(model.parameters()).device
    chunks = calib[: (calib.numel() // window) * window].reshape(-1, window).to(device)
    if bos is not None:
        chunks = torch.cat([torch.full_like(chunks[:, :1], bos), chunks], dim=1)
    return chunks


class BaseDistributions:
    """The base model's next-token distributions p over fixed windows, kept to measure another model's

        KL(base || model) = mean_t sum_v p_tv (log p_tv - log q_tv) = mean_t (h_t - sum_v p_tv log q_tv)

    over positions t and vocabulary v, with h_t = sum_v p_tv log p_tv computed once; ``batch`` windows per forward
    (None: all at once)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, chunks: torch.Tensor, batch: int | None = None) -> None:
        self.rows = chunks.split(batch or chunks.shape[0])
        self.p: list[torch.Tensor] = []
        self.h: list[torch.Tensor] = []
        for rows in self.rows:
            lp = torch.log_softmax(model(input_ids=rows).logits.float(), dim=-1)
            p = lp.exp()
            self.p.append(p)
            self.h.append((p * lp).sum(-1))
        self.positions = chunks.numel()

    @torch.no_grad()
    def kl(self, model: nn.Module) -> float:
        total = 0.0
        for rows, p, h in zip(self.rows, self.p, self.h):
            lq = torch.log_softmax(model(input_ids=rows).logits.float(), dim=-1)
            total += float((h - (p * lq).sum(-1)).sum())
        return total / self.positions


@torch.no_grad()
def block_sensitivity(model: nn.Module, calib: torch.Tensor, group: str, *, window: int, bos: int | None,
                      log: Callable[..., Any] = print) -> list[float]:
    """Mean KL(base || block i alone quantized, W8A16) per next-token position over ``calib``, for each block."""
    base = BaseDistributions(model, calibration_windows(model, calib, window, bos))
    out = []
    for i in range(len(decoder_blocks(model))):
        with Swapped(model, Variant(group, "w8a16"), blocks=(i,)):
            out.append(base.kl(model))
        log(f"  sensitivity block {i}: KL {out[-1]:.2e}")
    return out


@torch.no_grad()
def linear_sensitivity(model: nn.Module, calib: torch.Tensor, group: str, mode: str, *, window: int, batch: int,
                       bos: int | None, log: Callable[..., Any] = print) -> dict[str, float]:
    """{qualified name: mean KL(base || that linear alone quantized)} per next-token position over ``calib``, for
    every decoder linear: its weight rounded to nearest in ``group`` (amax scales) and, in W8A8, its input rounded
    to e4m3 as ``mode`` runs it (per token, or per 1x128 slice for block weights). ``model`` as given: a smoothing
    folded in is measured with it."""
    base = BaseDistributions(model, calibration_windows(model, calib, window, bos), batch)
    cache: dict = {}
    out = {}
    for _, name, _, _, _ in block_linears(model):
        with Swapped(model, Variant(group, mode), cache=cache, linears=(name,)):
            out[name] = base.kl(model)
    top = sorted(out, key=lambda n: -out[n])[:3]
    log(f"  sensitivity of {len(out)} linears ({group}, {mode}): largest KL " +
        ", ".join(f"{n} {out[n]:.2e}" for n in top))
    return out


@torch.no_grad()
def input_moments(model: nn.Module, calib: torch.Tensor, *, window: int, bos: int | None,
                  through: str | None = None) -> dict[str, torch.Tensor]:
    """H = mean x xᵀ of every decoder linear's input over the calibration windows (float64, CPU), by qualified name:
    on the base model, or ``through`` a scale group: on the model whose decoder linears are all rounded to nearest
    in that group (W8A16), the inputs each linear meets once those before it are quantized (``GptqConfig.inputs``)."""
    from impl.fp8.gptq import InputMoments

    chunks = calibration_windows(model, calib, window, bos)
    places = [(name, parent, attr) for _, name, parent, attr, _ in block_linears(model)]
    with Swapped(model, Variant(through, "w8a16")) if through else contextlib.nullcontext():
        with InputMoments({name: getattr(parent, attr) for name, parent, attr in places}) as mom:
            for row in chunks:
                model(input_ids=row[None])
    return {name: mom.hessian(name) for name in mom.named}


def group_moments(model: nn.Module, calib: torch.Tensor, groups: tuple[str, ...], *, window: int, bos: int | None,
                  cfg: GptqConfig = GptqConfig()) -> dict[str, dict[str, torch.Tensor]]:
    """{scale group: ``input_moments``} for GPTQ in each group: through that group's rounded model where
    ``cfg.inputs`` is "rounded", else the base model's (measured once, shared)."""
    if cfg.inputs == "dense":
        dense = input_moments(model, calib, window=window, bos=bos)
        return {g: dense for g in groups}
    return {g: input_moments(model, calib, window=window, bos=bos, through=g) for g in groups}


def group_of(layout) -> str:
    """The variant group holding a layout's codes: its scale group's name ("tensor", "channel"), else "block"."""
    return layout.group.name if layout.group.name in GROUPS else "block"


@torch.no_grad()
def layer_errors(model: nn.Module, ids: torch.Tensor, variant: Variant) -> dict[str, float]:
    """Relative output error ||y_fp8 - y|| / ||y|| of every quantized linear on the same inputs (one forward of the
    base model; each linear's input is fed to its FP8 twin)."""
    errs: dict[str, float] = {}
    hooks = []
    for i, name, _, _, lin in block_linears(model):
        if i in variant.keep or name in variant.keep_linears:
            continue
        w = quantize_weight_like_checkpoint(lin.weight.data, variant.group)
        twin = Fp8Linear(w, compute_dtype=lin.weight.dtype, mode=variant.mode)

        def hook(mod, inp, out, twin=twin, name=name):
            ref = out.float()
            errs[name] = float((twin(inp[0]).float() - ref).norm() / ref.norm().clamp_min(1e-30))

        hooks.append(lin.register_forward_hook(hook))
    try:
        model(input_ids=ids[None].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return errs


def evaluate_variants(model: nn.Module, ids: torch.Tensor, calib: torch.Tensor, variants: list[Variant], *,
                      window: int, batch: int, bos: int | None, sensitivity_group: str | None = "channel",
                      deadline: float = math.inf, moments: dict[str, dict[str, torch.Tensor]] | None = None,
                      gptq: GptqConfig = GptqConfig(), smooth_alpha: float | None = None,
                      log: Callable[..., Any] = print) -> dict[str, Any]:
    """Base model first, then each variant (``top<k>`` policies resolved from the blocks' sensitivity on ``calib``,
    ``lin<k>`` ones from the linears' as each variant's group, mode and smoothing run them; GPTQ variants from
    ``moments``, {scale group: the layers' input moments on ``calib``} as ``group_moments`` makes
    them with ``gptq``, whose settings the record keeps; smoothed variants with ``smooth_alpha``, or where it is
    None with the alpha ``Smoothing.choose`` picks per group on ``calib``). Variants with another grid placement
    run last, once the record is complete without them (the time budget may leave some out: ``grid_skipped``), and
    give ``grid_spread``: per recipe, the least and greatest change over its placements."""
    t0 = time.perf_counter()
    base = perplexity(model, ids, window=window, batch=batch, keep_argmax=True, bos=bos)
    ref_argmax = base.pop("argmax")
    log(f"base: ppl {base['ppl']:.4f} over {base['tokens']} tokens ({time.perf_counter() - t0:.0f} s)")
    out: dict[str, Any] = {"base": base, "variants": {}, "complete": False}
    smoothing, alphas = None, {}
    smooth_groups = sorted({v.group for v in variants if v.smooth}, key=GROUPS.index)
    if smooth_groups:
        t = time.perf_counter()
        smoothing = Smoothing.measure(model, calib, window=window, bos=bos)
        out["smooth"] = {**smoothing.record(), "alpha": {}, "chosen_by": "given" if smooth_alpha is not None else
                         CHOSEN_BY, "calib_ppl": {}}
        for g in smooth_groups:
            if smooth_alpha is None:
                alphas[g], out["smooth"]["calib_ppl"][g] = smoothing.choose(model, calib, g, window=window,
                                                                            batch=batch, bos=bos)
            else:
                alphas[g] = smooth_alpha
            out["smooth"]["alpha"][g] = alphas[g]
        log(f"smoothing: alpha {alphas} ({out['smooth']['chosen_by']}; {time.perf_counter() - t:.0f} s)")
    if any(v.mode == "w8a8" for v in variants):
        out["activations_only"] = activations_only(model, ids, base, window=window, batch=batch, bos=bos,
                                                   ref_argmax=ref_argmax, smoothing=smoothing,
                                                   alphas=tuple(alphas.values()))
        log("activations alone (dense weights): " + ", ".join(
            f"{g} {r['delta_pct']:+.2f}% [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]"
            for g, r in out["activations_only"].items()))
    ranking: list[int] = []
    if sensitivity_group and any(parse_policy(v.policy)[0] == "top" for v in variants):
        kl = block_sensitivity(model, calib, sensitivity_group, window=window, bos=bos, log=log)
        ranking = sorted(range(len(kl)), key=lambda i: -kl[i])
        out["sensitivity"] = {"group": sensitivity_group, "mode": "w8a16", "kl": kl, "ranking": ranking,
                              "calib_tokens": int(calib.numel())}
    lin_rankings: dict[tuple[str, str, float | None], list[str]] = {}
    lin_keys = {(v.group, v.mode, alphas.get(v.group) if v.smooth else None) for v in variants
                if parse_policy(v.policy)[0] == "lin"}
    if lin_keys:
        cal = calib[:LINEAR_CALIB_TOKENS]
        out["linear_sensitivity"] = {}
        for g, m, a in sorted(lin_keys, key=lambda k: (GROUPS.index(k[0]), MODES.index(k[1]), k[2] or 0.0)):
            t = time.perf_counter()
            with smoothing.folded(model, a) if a is not None else contextlib.nullcontext():
                kl = linear_sensitivity(model, cal, g, m, window=window, batch=batch, bos=bos, log=log)
            lin_rankings[(g, m, a)] = sorted(kl, key=lambda n: -kl[n])
            out["linear_sensitivity"][f"{g}-{m}" + ("" if a is None else f"-smooth{a:g}")] = {
                "group": g, "mode": m, "rounding": "nearest", "smooth_alpha": a, "kl": kl,
                "ranking": lin_rankings[(g, m, a)], "calib_tokens": int(cal.numel()),
                "seconds": time.perf_counter() - t}
    gptq_groups = {v.group for v in variants if v.rounding == "gptq"}
    if gptq_groups:
        missing = sorted(gptq_groups - set(moments or {}))
        if missing:
            raise ValueError(f"GPTQ variants need the layers' input moments on calib for groups {missing} "
                             "(group_moments)")
        out["gptq"] = {**asdict(gptq), "calib_tokens": int(calib.numel())}
    n_blocks = len(decoder_blocks(model))
    cache: dict = {}
    smoothed_h: dict[float, dict[str, torch.Tensor]] = {}  # the group's GPTQ moments, transformed per alpha
    ordered = sorted(variants, key=lambda v: (v.grid != 1.0, GROUPS.index(v.group)))  # a group's share its weights
    for i, v in enumerate(ordered):
        if time.perf_counter() > deadline:
            log(f"time budget reached: {v.name} and later variants not evaluated")
            if v.grid == 1.0:
                return out
            out["grid_skipped"] = [w.name for w in ordered[i:]]  # placements only measure the spread: complete
            break
        alpha = alphas.get(v.group) if v.smooth else None
        v = resolve_keep(v, ranking, n_blocks, lin_rankings.get((v.group, v.mode, alpha), []))
        t = time.perf_counter()
        if cache and next(iter(cache))[0] != v.group:
            cache.clear()  # one group's weights at a time
            smoothed_h.clear()
        h = (moments or {}).get(v.group) if v.rounding == "gptq" else None
        if h is not None and alpha is not None:
            if alpha not in smoothed_h:
                smoothed_h[alpha] = smoothing.moments(h, alpha)
            h = smoothed_h[alpha]
        with smoothing.folded(model, alpha) if alpha is not None else contextlib.nullcontext():
            with Swapped(model, v, cache=cache, moments=h, gptq=gptq) as sw:
                r = perplexity(model, ids, window=window, batch=batch, reference_argmax=ref_argmax, bos=bos)
                if v.mode == "w8a8" and v.rounding == "gptq":  # the recipe picks among these on calibration tokens
                    r["calib_ppl"] = perplexity(model, calib, window=window, batch=batch, bos=bos)["ppl"]
        r.update(bootstrap_delta(base["window_nll"], r["window_nll"]))
        r.update(group=v.group, mode=v.mode, keep=list(v.keep), keep_linears=list(v.keep_linears), policy=v.policy,
                 rounding=v.rounding, scales=v.scales, smooth=v.smooth, smooth_alpha=alpha, grid=v.grid,
                 act_group=activation_name(get_group(v.group), v.mode), paths=sw.paths, ignore=ignore_list(v),
                 seconds=time.perf_counter() - t)
        out["variants"][v.name] = r
        log(f"{v.name}: ppl {r['ppl']:.4f}, delta {r['delta_pct']:+.2f}% [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}], "
            f"agreement {100 * r['top1_agreement']:.1f}%, paths {sw.paths} ({r['seconds']:.0f} s)")
    out["complete"] = True
    if any(v.grid != 1.0 for v in variants):
        out["grid_spread"] = grid_spread(out["variants"])
        for name, sp in out["grid_spread"].items():
            log(f"{name} over {sp['placements']} grid placements: {sp['min_delta_pct']:+.2f} to "
                f"{sp['max_delta_pct']:+.2f}% (as written: {sp['delta_pct']:+.2f}%)")
    return out


RECIPE_FIELDS = ("group", "mode", "rounding", "scales", "smooth", "policy")  # what makes two variant rows one recipe


def recipe_key(row: dict[str, Any]) -> tuple:
    """The recipe a variant row ran (its ``RECIPE_FIELDS``), whatever grid placement it ran at."""
    return tuple(row[k] for k in RECIPE_FIELDS)


def grid_spread(variants: dict[str, Any]) -> dict[str, Any]:
    """Per recipe that also ran at other grid placements: its own change and the least and greatest over all of
    them (its own included), with the placements counted."""
    out: dict[str, Any] = {}
    for name, r in variants.items():
        if r.get("grid", 1.0) != 1.0:
            continue
        runs = [r] + [o for o in variants.values() if o.get("grid", 1.0) != 1.0 and recipe_key(o) == recipe_key(r)]
        if len(runs) > 1:
            deltas = [o["delta_pct"] for o in runs]
            out[name] = {"delta_pct": r["delta_pct"], "min_delta_pct": min(deltas), "max_delta_pct": max(deltas),
                         "placements": len(runs), "grids": [o.get("grid", 1.0) for o in runs]}
    return out


RECIPE_CANDIDATES = {"w8a16": ("w8a16-gptq",), "w8a8": ("w8a8-gptq", "w8a8-gptq-smooth")}


def recipe_of(group: str, mode: str, variants: dict[str, Any]) -> dict[str, Any] | None:
    """The project's recipe for every decoder linear in ``mode`` and scale ``group``: of the GPTQ-rounded variants
    in ``RECIPE_CANDIDATES`` that ran, the one with the least perplexity on the calibration tokens (W8A8: smoothed
    or not; never judged on the evaluation text), as {"via": its name, "calib_ppl": {name: ppl}}; None if none
    ran."""
    ran = {f"{group}-{k}": variants[f"{group}-{k}"] for k in RECIPE_CANDIDATES[mode] if f"{group}-{k}" in variants}
    if not ran:
        return None
    ppl = {name: r.get("calib_ppl") for name, r in ran.items()}
    if len(ran) > 1 and any(v is None for v in ppl.values()):
        raise ValueError(f"{group} {mode}: the recipe's candidates need their calibration perplexity, got {ppl}")
    via = min(ran, key=lambda n: ppl[n] or 0.0)
    return {"via": via, "calib_ppl": ppl}


def ignore_list(v: Variant) -> list[str]:
    """The modules a checkpoint of this variant leaves unquantized, as ``quantization_config`` records them
    (``impl.fp8.quantize --ignore``; vLLM's ``ignored_layers`` / compressed-tensors' ``ignore``): the kept blocks as
    one ``re:`` pattern, the kept linears by full module name."""
    kept = "|".join(str(i) for i in v.keep)
    return (["lm_head"] + ([f"re:model\\.layers\\.({kept})\\..*"] if v.keep else [])
            + [f"model.{name}" for name in v.keep_linears])


def resolve_keep(v: Variant, ranking: list[int], n_blocks: int, linear_ranking: list[str] | None = None) -> Variant:
    """What a policy keeps dense: nothing, the first and last blocks, the k most sensitive blocks (``ranking``,
    most sensitive first), or the k most sensitive linears (``linear_ranking``, qualified names, most sensitive
    first; kept listed by block, then name)."""
    kind, k = parse_policy(v.policy)
    if kind == "all":
        return v
    if kind == "first-last":
        return replace(v, keep=(0, n_blocks - 1))
    if kind == "top":
        if not ranking:
            raise ValueError(f"{v.name}: policy {v.policy} needs the block sensitivity ranking")
        return replace(v, keep=tuple(sorted(ranking[:k])))
    if not linear_ranking:
        raise ValueError(f"{v.name}: policy {v.policy} needs the linear sensitivity ranking of its group and mode")
    return replace(v, keep_linears=tuple(sorted(linear_ranking[:k], key=lambda n: (int(n.split(".")[1]), n))))


def variants_for(policies: list[str], groups: tuple[str, ...] = GROUPS, modes: tuple[str, ...] = MODES,
                 gptq_policies: tuple[str, ...] = (), mse_policies: tuple[str, ...] = (),
                 smooth_policies: tuple[str, ...] = (), grids: tuple[float, ...] = ()) -> list[Variant]:
    """Round-to-nearest variants for every policy, GPTQ-rounded ones for ``gptq_policies``; with amax scales, and
    for ``mse_policies`` also with MSE-chosen scales (rounded both ways where the policy is in both lists); and for
    ``smooth_policies`` smoothed W8A8 variants (amax scales, rounded both ways likewise); and the GPTQ variants of
    ``gptq_policies`` (amax scales, unsmoothed) again at each grid placement of ``grids`` (``Variant.grid``)."""
    out = []
    for sc, allowed in (("amax", None), ("mse", set(mse_policies))):
        for r, ps in (("nearest", policies), ("gptq", gptq_policies)):
            out += [Variant(g, m, (), p, r, sc) for p in ps if allowed is None or p in allowed
                    for g in groups for m in modes]
    if "w8a8" in modes:
        for r, ps in (("nearest", policies), ("gptq", gptq_policies)):
            out += [Variant(g, "w8a8", (), p, r, smooth=True) for p in ps if p in smooth_policies for g in groups]
    out += [Variant(g, m, (), p, "gptq", grid=f) for f in grids if f != 1.0 for p in gptq_policies for g in groups
            for m in modes]
    return out


def grid_placements(count: int) -> tuple[float, ...]:
    """The grid factors 2^(j / count), j = 1 .. count - 1 (``Variant.grid``): evenly spaced in log2 over one
    binade; () for count <= 1 (``gptq.placement_factors`` without amax's own 1.0)."""
    return placement_factors(count)[1:]
