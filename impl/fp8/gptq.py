"""GPTQ rounding for FP8 weights: the checkpoint's codes and scales, with each column's rounding error carried into
the columns not yet rounded, weighted by what the layer's inputs look like (Frantar et al., 2022, "GPTQ").

For W [N, K] and the group's amax scales S (the very scales round-to-nearest stores, so the checkpoint format and
every loader are unchanged), with H = Σ_t x_t x_tᵀ / T over T calibration rows x_t [K] of the layer's input, plus
λ·I (λ = ``damp`` · mean diag H), and U the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U):

    for k = 0 .. K-1:   q_k = encode(W[:, k] / S[:, k])                 (nearest e4m3, saturating at ±448)
                        e_k = (W[:, k] − S[:, k] · decode(q_k)) / U[k, k]
                        W[:, j] −= e_k · U[k, j]   for j > k

which lowers the layer's output error ‖X (W − Ŵ)ᵀ‖² greedily, column by column. With ``act_order`` the columns
go in order of decreasing H[k, k] (the inputs with the most energy first, while the most columns are left to absorb
their error; the paper's "act-order"), W, S and H permuted alike and the codes put back in W's order; the scales are
fixed before, so the group of each code is unchanged. Columns go in blocks of ``block``:
inside a block the updates are applied at once to the block's columns, and the block's errors reach the later
columns in one matrix product (the paper's lazy batching; the same result up to rounding). With H = I (inputs
uncorrelated) U is diagonal, nothing is carried, and the codes are round-to-nearest's. Inputs never active in the
calibration (H[k, k] = 0) get H[k, k] = 1 and keep their weights.

Grid placements (``placements`` = J > 1): FP8's grid is relative, so the scales S times f = 2^(j/J), j = 0..J-1,
give J roundings of one weight with the same error statistics but different codes (f = 1 is amax's own; f > 1 never
saturates). GPTQ runs at each, and every band of rows that shares one row of scales (one row per channel scale, 128
per 128x128 block, the whole weight per tensor scale) keeps the placement with the least output error
Σ_{n in band} d_n H d_nᵀ, d = W − Ŵ (a tie keeps the earlier f). A band's rows are rounded independently of the
other rows, so the choice is exact for the objective GPTQ lowers, and the checkpoint stays the layout's own: codes
and one scale per group. SmolLM2 on the CPU (channel W8A16, 8192 calibration / 32768 evaluation tokens, paired
intervals against J = 1 over the same windows): J = 1 +0.98% [+0.80, +1.17]; J = 4 +0.81% (-0.17 [-0.42, +0.06]);
J = 8 +0.67% (-0.30 [-0.59, -0.04]); J = 16 +0.56% [+0.41, +0.72] (-0.42 [-0.69, -0.15]); J = 16 with the 7
placements that put a row's amax exactly on a grid point added +0.72% (-0.25 [-0.51, -0.01]) -- the candidates
beyond the even grid bought nothing. With 128x128 blocks (bands of 128 rows): +1.22% [+1.02, +1.43] at J = 1, +0.83%
[+0.63, +1.04] at J = 16 (-0.38 [-0.68, -0.08]); per tensor (one band): +0.84% and +0.94% (+0.10 [-0.16, +0.35]):
the search pays where rows choose for themselves, one choice for a whole weight moved nothing measurable. Why it
pays: the output error of a row is dominated by a few large weights on high-energy inputs, and where those land on
the grid moves with f (the global placement alone spreads the change from +0.59 to +1.32%, ``quality``'s grid
spread).

Which inputs (``inputs``): "rounded" measures each layer's H on the model whose decoder linears are all rounded to
nearest in the weight's scale group, so a layer is fitted to the inputs it will meet once the layers before it are
quantized (the paper quantizes layer after layer on the quantized model's own activations for the same reason);
"dense" (the default) measures them on the unquantized model. SmolLM2 on the CPU (W8A16, 16384 calibration and
16384 evaluation tokens, 95% intervals about +-0.3): channel scales, round to nearest +1.08%, GPTQ on dense inputs
+0.77%, on rounded inputs +0.54%; tensor +1.22%, +0.62%, +0.72%; 128x128 blocks +1.53%, +1.09%, +0.97% -- no
clear winner within the intervals, so both can be measured
(``python -m impl.fp8.experiments --gptq-inputs``, ``python -m impl.fp8.quantize --gptq-inputs``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from impl.fp8.formats import E4M3, ScaleGroup, expand_scales, get_group
from impl.fp8.reference import decode_reference, encode_reference, quantize_reference


# calibration tokens for the input moments; SmolLM2 on the CPU, channel W8A16: +0.85% ppl at 32k tokens, +0.76% at
# 64k, against +1.79% for round to nearest on the same windows; on one set of windows (the 32768 tokens after the
# first 131072), calibrated on the text's first 16384 tokens +0.30% [+0.11, +0.52], on its first 65536 +0.32%
# [+0.12, +0.54]: more calibration text does not lower the change within its interval
CALIB_TOKENS = 32768


INPUTS = ("dense", "rounded")
Placed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # one placement's codes [N, K], scales [R, C], band errors [R]
PLACEMENTS = 16  # the recipe's grid placements (the CLIs' default; module doc); GptqConfig() alone is plain GPTQ
CPU_PASS_BYTES = 2 << 30  # memory one column loop may take on the CPU (``placements_per_pass``)


@dataclass(frozen=True)
class GptqConfig:
    """Dampening of H (a fraction of its mean diagonal), the columns handled per block, the column order, and which
    model's inputs H is measured on (module doc)."""

    # SmolLM2 on the CPU, channel W8A16, 16384 calibration / 32768 evaluation tokens: damp 0.001, 0.01, 0.1, 0.3, 0.9
    # change perplexity +0.71, +0.58, +0.53, +0.58, +0.57% (intervals about +-0.18): flat from 0.01 on
    damp: float = 0.01
    block: int = 128
    act_order: bool = True  # columns by decreasing H[k, k]; False: W's own order
    inputs: str = "dense"  # "dense": the unquantized model; "rounded": its decoder linears rounded to nearest
    placements: int = 1  # GPTQ at each of this many grid placements, each band of rows keeping its best (module doc)

    def __post_init__(self) -> None:
        if not (0 < self.damp < 1) or self.block < 1 or self.placements < 1:
            raise ValueError(f"GptqConfig needs 0 < damp < 1, block >= 1 and placements >= 1: {self}")
        if self.inputs not in INPUTS:
            raise ValueError(f"GptqConfig.inputs must be one of {INPUTS}, got {self.inputs!r}")


def upper_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """U with (H + λI)⁻¹ = Uᵀ U (upper triangular, float64), dead inputs given H[k, k] = 1 first; H [K, K] or a
    batch [B, K, K] (λ per matrix)."""
    h = h.detach().to(torch.float64).clone()
    if h.ndim not in (2, 3) or h.shape[-1] != h.shape[-2] or not torch.isfinite(h).all():
        raise ValueError(f"H must be a finite square matrix, got {tuple(h.shape)}")
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean(-1, keepdim=True)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, group: str | ScaleGroup = "channel", cfg: GptqConfig = GptqConfig(),
                  scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, K] on w's device, scales float32 [R, C] on the CPU) of w [N, K] by GPTQ with input moments
    h [K, K] (module doc); ``scales`` fixes the group scales (default: amax / FMAX, round-to-nearest's)."""
    return gptq_quantize_many([(w, h, group, scales)], cfg)[0]


def gptq_quantize_many(items: list[tuple[torch.Tensor, torch.Tensor, str | ScaleGroup, torch.Tensor | None]],
                       cfg: GptqConfig = GptqConfig()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``gptq_quantize`` of many (w, h, group, scales), the weights of the same shape and device run as one batch
    [B, N, K] (one H each): one pass over the K columns for all of them instead of one per weight (the column loop
    is launch-bound on a GPU); each weight's codes are those it gets alone. With ``cfg.placements`` > 1 the batch
    runs at every placement (``placed_scales``), as many per column loop as memory allows (``placements_per_pass``),
    and each band keeps its best (``keep_better``; module doc)."""
    prepared = []
    for w, h, group, scales in items:
        if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"w must be [N, K] and h [K, K], got {tuple(w.shape)} and {tuple(h.shape)}")
        group = get_group(group)
        if scales is None:
            _, scales = quantize_reference(w, group, E4M3)
        else:
            scales = scales.detach().to("cpu", torch.float32).reshape(group.scale_shape(*w.shape))
        prepared.append((w, h, group, scales))
    batches: dict[tuple[int, int, torch.device], list[int]] = {}
    for i, (w, *_) in enumerate(prepared):
        batches.setdefault((*w.shape, w.device), []).append(i)
    best: list[Placed] = [None] * len(items)  # type: ignore[list-item]
    factors = placement_factors(cfg.placements)
    for (n, k, dev), idx in batches.items():
        per_pass = placements_per_pass(len(idx), n, k, dev, len(factors))
        for p0 in range(0, len(factors), per_pass):
            fs = factors[p0:p0 + per_pass]
            for i, runs in zip(idx, _gptq_batch([prepared[i] for i in idx], cfg, fs)):
                w, h, group, _ = prepared[i]
                for codes, placed in runs:  # in factor order: a tie keeps the earlier placement
                    err = band_errors(w, h, group, codes, placed) if cfg.placements > 1 else None
                    best[i] = (codes, placed, err) if best[i] is None else keep_better(best[i], (codes, placed, err),
                                                                                      group)
    return [(codes, scales) for codes, scales, _ in best]


def placements_per_pass(b: int, n: int, k: int, device: torch.device, count: int) -> int:
    """How many of ``count`` placements one column loop carries for a batch of b weights [n, K]: all of them where
    their ~21 bytes per weight element and placement (float64 work and scales, float32 inverse scales, the codes)
    fit a third of the free device memory (2 GiB on the CPU), else as many as fit, at least one."""
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 3
    else:
        budget = CPU_PASS_BYTES
    return max(1, min(count, budget // max(1, 21 * b * n * k)))


def placement_factors(count: int) -> tuple[float, ...]:
    """The FP8 grid's placements over one binade, 2^(j / count) for j = 0 .. count - 1 (the scales times each; a
    factor of 2 only moves the exponent), amax's own (1.0) first; (1.0,) for count <= 1."""
    return tuple(2.0 ** (j / count) for j in range(count)) if count > 1 else (1.0,)


def placed_scales(scales: torch.Tensor, f: float) -> torch.Tensor:
    """float32 ``scales`` times the placement factor f (the product in float64, one rounding to float32)."""
    return scales if f == 1.0 else (scales.to(torch.float64) * f).to(torch.float32)


def band_size(group: ScaleGroup, n: int) -> int:
    """Rows of an [n, K] weight that share one row of scales: one (channel), ``group.gn`` (blocks), n (tensor)."""
    return n if group.gn == 0 else group.gn


def band_errors(w: torch.Tensor, h: torch.Tensor, group: ScaleGroup, codes: torch.Tensor,
                scales: torch.Tensor) -> torch.Tensor:
    """Output error Σ_{n in band} d_n H d_nᵀ (float64) per band of rows sharing one row of scales [R]: d = W − Ŵ,
    Ŵ the weight the codes and scales decode to (bands: ``band_size``)."""
    n, k = w.shape
    rows, band = group.scale_shape(n, k)[0], band_size(group, n)
    d = w.detach().to(torch.float64) - (decode_reference(codes, E4M3)
                                        * expand_scales(scales.to(torch.float64), group, n, k).to(w.device))
    per_row = ((d @ h.to(w.device, torch.float64)) * d).sum(1)
    return nn.functional.pad(per_row, (0, rows * band - n)).reshape(rows, band).sum(1).cpu()


def keep_better(old: Placed, new: Placed, group: ScaleGroup) -> Placed:
    """Per band, the (codes, scales, band error) of the placement with the smaller output error; a tie keeps ``old``."""
    take = new[2] < old[2]  # [R]
    n = old[0].shape[0]
    rows = take.repeat_interleave(band_size(group, n))[:n].to(old[0].device)
    return (torch.where(rows[:, None], new[0], old[0]), torch.where(take[:, None], new[1], old[1]),
            torch.where(take, new[2], old[2]))


def _gptq_batch(items: list[tuple[torch.Tensor, torch.Tensor, ScaleGroup, torch.Tensor]], cfg: GptqConfig,
                factors: tuple[float, ...] = (1.0,)) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """GPTQ codes of weights of one shape [N, K] and device at each placement factor (scales times f), one column
    loop for all: per weight, its placements stacked as J·N rows that share its H (GPTQ rounds each row on its own,
    so a row's codes are those it gets alone); returns per weight, per factor, the codes [N, K] and the placed
    scales they were rounded at."""
    (n, k), dev, b, rows = items[0][0].shape, items[0][0].device, len(items), len(factors) * items[0][0].shape[0]
    work = torch.empty(b, rows, k, dtype=torch.float64, device=dev)
    s = torch.empty(b, rows, k, dtype=torch.float64, device=dev)
    inv_s = torch.empty(b, rows, k, dtype=torch.float32, device=dev)  # float32, as the reference quantizer divides
    hs = torch.empty(b, k, k, dtype=torch.float64)
    perms, placed = [], [[placed_scales(sc, f) for f in factors] for _, _, _, sc in items]
    for i, (w, h, group, _) in enumerate(items):
        h = h.detach().to("cpu", torch.float64)  # permuted here, factored on the weight's device
        perm = torch.argsort(h.diagonal(), descending=True, stable=True) if cfg.act_order else torch.arange(k)
        hs[i] = h[perm][:, perm]
        pd = perm.to(dev)
        perms.append(pd)
        wp = w.detach().to(torch.float64)[:, pd]
        for j, sc in enumerate(placed[i]):
            r = slice(j * n, (j + 1) * n)
            work[i, r] = wp
            s[i, r] = expand_scales(sc.to(torch.float64), group, n, k).to(dev)[:, pd]
            inv_s[i, r] = expand_scales(1.0 / sc, group, n, k).to(dev)[:, pd]
    u = upper_inverse_factor(hs.to(dev), cfg.damp)
    codes = torch.empty(b, rows, k, dtype=torch.uint8, device=dev)
    for b0 in range(0, k, cfg.block):
        b1 = min(b0 + cfg.block, k)
        block, ub = work[:, :, b0:b1], u[:, b0:b1, b0:b1]
        err = torch.empty(b, rows, b1 - b0, dtype=torch.float64, device=dev)
        for j in range(b1 - b0):
            c = encode_reference(block[:, :, j].to(torch.float32) * inv_s[:, :, b0 + j], E4M3)
            codes[:, :, b0 + j] = c
            err[:, :, j] = (block[:, :, j] - decode_reference(c, E4M3) * s[:, :, b0 + j]) / ub[:, j, j, None]
            block[:, :, j + 1:] -= err[:, :, j, None] * ub[:, None, j, j + 1:]
        work[:, :, b1:] -= err @ u[:, b0:b1, b1:]
    out = [codes[i][:, torch.argsort(perms[i])] for i in range(b)]
    return [[(c[j * n:(j + 1) * n], placed[i][j]) for j in range(len(factors))] for i, c in enumerate(out)]


class InputHooks:
    """Context: a forward pre-hook ``self._hook(name)`` on each module of ``named`` while active, all removed on exit;
    subclasses gather statistics of the modules' inputs."""

    def __init__(self, named: dict[str, nn.Module]) -> None:
        self.named = named
        self._handles: list = []

    def __enter__(self):
        for name, mod in self.named.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        raise NotImplementedError


class InputMoments(InputHooks):
    """Σ x xᵀ and the row count of the input of each ``nn.Linear`` in ``named`` (forward pre-hooks while active).

    Linears that read the same tensor object (q/k/v, gate/up) share one product per forward call: the last input is
    held, so its memory cannot pass to a new tensor of the same shape while the product is kept (an address is no
    identity: a caching allocator hands a freed block to the next tensor of its size)."""

    def __init__(self, named: dict[str, nn.Linear]) -> None:
        super().__init__(named)
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._last: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (input, its version, x^T x)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._last = None

    def _hook(self, name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            x2 = x.detach().reshape(-1, x.shape[-1])
            if self._last is not None and self._last[0] is x and self._last[1] == x._version:
                xtx = self._last[2]
            else:
                xf = x2.to(torch.float32)
                xtx = (xf.t() @ xf).to("cpu", torch.float64)
                self._last = (x, x._version, xtx)
            self.sums[name] = self.sums[name] + xtx if name in self.sums else xtx.clone()
            self.rows[name] = self.rows.get(name, 0) + x2.shape[0]
        return hook

    def hessian(self, name: str) -> torch.Tensor:
        """H = Σ x xᵀ / T of ``name``'s input (float64, CPU)."""
        if not self.rows.get(name):
            raise ValueError(f"no calibration input reached {name}")
        return self.sums[name] / self.rows[name]
