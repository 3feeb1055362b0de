"""Measurements per configuration and the interpolation rule.

* accuracy: top-1 on a split, ``mean(argmax(logits) == label)``, eval mode, bf16 autocast on a GPU; ``correctness``
  keeps the per-image verdicts (for the paired bootstrap in ``impl.seam.stats``);
* FLOPs: ``torch.utils.flop_counter`` for one image (2 per multiply-add of convolutions and matmuls; BatchNorm,
  ReLU and pooling are not counted), so ``flops(batch b) = b · flops``; ``plan_stitches`` counts every candidate of a
  family on the meta device (shapes only, no arithmetic) and keeps the stitches inside the anchors' FLOPs range;
* parameters: distinct parameters the configuration runs (stitch included);
* latency: ``impl.common.timing.time_fn`` in its queued view (CUDA events, L2 flushed per call; a spin kernel holds
  the stream while the host enqueues the forward, so batch 1 measures the GPU's work, not Python's launches);
* BatchNorm recalibration: reset the running statistics of the layers a configuration runs and re-estimate them as
  the plain average over ``calib_images`` training images (momentum None), then store them for that configuration.

Interpolation (anchors ``lo`` and ``hi`` ordered by FLOPs, F_lo < F_hi, test accuracies A_lo, A_hi): a stitch at
(F, A) interpolates iff
    F_lo ≤ F ≤ F_hi                                                     (inside the anchors' FLOPs range)
    A ≥ A_lo + (A_hi − A_lo)·(F − F_lo)/(F_hi − F_lo) − tol             (on or above the line joining them)
with ``tol`` in accuracy units (default 0.0025 = 0.25 percentage points, about one binomial standard error of a
94 % accuracy on 10,000 test images). The line condition implies A ≥ min(A_lo, A_hi) − tol. The capped variant
(``cap=True``) also needs A ≤ max(A_lo, A_hi) + tol and is reported beside. ``interpolation_summary`` gives the
fraction under the rule and, from per-image test correctness, two noise-aware readings, both from one paired
bootstrap over the test images (every accuracy, anchors included, recomputed on each resample):

* ``percent_conservative`` (what the claim reads): the rule judged per stitch at its conservative end — a stitch
  counts iff it interpolates and the 2.5 % quantile of its margin ``A − line(F) + tol`` over the resamples is ≥ 0
  (with ``cap``, also the 97.5 % quantile of ``A − max(A_lo, A_hi) − tol`` is ≤ 0). The unit of resampling is the
  test image: the stitches are every in-range stitch of the design, not a sample of stitches, so the noise to
  allow for is the finite test set's, stitch by stitch;
* ``percent_ci95``: the 95 % interval of the fraction itself, whose lower end needs every stitch to hold on
  97.5 % of the resamples at once (simultaneous over the stitches; reported beside).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from impl.common.timing import time_fn
from impl.seam.data import DataBundle, preprocess
from impl.seam.family import Config, SeamFamily, build_family
from impl.seam.models import AnchorConfig
from impl.seam.stats import bootstrap_accuracies, interval95, unpack_bits
from impl.seam.train import autocast


@torch.no_grad()
def correctness(forward: Callable[[torch.Tensor], torch.Tensor], split: Any, data: DataBundle, device: str,
                batch_size: int = 1000, channels_last: bool = True) -> np.ndarray:
    """Per-image ``argmax(forward(x)) == label`` over ``split`` in its order, as a bool array (N,)."""
    out = []
    for images, labels in split.batches(batch_size):
        x = preprocess(images, data.mean, data.std, None, channels_last)
        with autocast(device):
            out.append((forward(x).argmax(1) == labels).cpu())
    if not out:
        raise ValueError("accuracy of an empty split is undefined")
    return torch.cat(out).numpy()


def config_correctness(family: SeamFamily, cfg: Config | str, split: Any, data: DataBundle, device: str,
                       batch_size: int = 1000, channels_last: bool = True) -> np.ndarray:
    """``correctness`` of configuration ``cfg`` (its own BatchNorm statistics loaded if it has them)."""
    cfg = family.activate(cfg)
    family.eval()
    return correctness(lambda x: family(x, cfg), split, data, device, batch_size, channels_last)


def accuracy(family: SeamFamily, cfg: Config | str, split: Any, data: DataBundle, device: str,
             batch_size: int = 1000, channels_last: bool = True) -> float:
    """Top-1 accuracy of ``cfg`` on ``split`` (its own BatchNorm statistics loaded if it has them)."""
    return float(config_correctness(family, cfg, split, data, device, batch_size, channels_last).mean())


@torch.no_grad()
def calibrate_bn(family: SeamFamily, cfg: Config | str, split: Any, data: DataBundle, device: str,
                 calib_images: int = 2048, batch_size: int = 512, channels_last: bool = True) -> None:
    """Re-estimate ``cfg``'s BatchNorm running statistics on the first ``calib_images`` of ``split``; store them."""
    cfg = family.config(cfg)
    layers = family.bn_layers(cfg)
    saved = {q: m.momentum for q, m in layers.items()}
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all calibration batches
    family.train()
    seen = 0
    try:
        for images, _ in split.batches(batch_size):
            x = preprocess(images[: calib_images - seen], data.mean, data.std, None, channels_last)
            with autocast(device):
                family(x, cfg)
            seen += x.shape[0]
            if seen >= calib_images:
                break
    finally:
        for q, m in layers.items():
            m.momentum = saved[q]
        family.eval()
    if seen == 0:
        raise ValueError("BatchNorm calibration got no images")
    family.save_bn(cfg)


def count_flops(family: SeamFamily, cfg: Config | str, image_shape: tuple[int, int, int], device: str) -> int:
    """FLOPs of one forward of ``cfg`` on one image of ``image_shape`` (C, H, W)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *image_shape, device=device)
    family.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        family(x, cfg)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class StitchPlan:
    """Which candidate stitches a family keeps, and every candidate's FLOPs per image."""

    keep: list[str]
    flops: dict[str, int]
    anchors: tuple[str, str]
    rule: str


def plan_stitches(anchors: list[AnchorConfig], image_shape: tuple[int, int, int], granularity: str = "block",
                  directions: str = "fast_to_slow", inside_only: bool = True) -> StitchPlan:
    """Candidate stitches whose FLOPs lie inside ``[F(anchor 0), F(anchor 1)]`` (all with ``inside_only=False``),
    counted on the meta device; the anchors must be given cheaper first."""
    with torch.device("meta"):
        fam = build_family([AnchorConfig(**{**asdict(a), "weights": None}) for a in anchors], granularity,
                           directions=directions)
    flops = {c.name: count_flops(fam, c, image_shape, "meta") for c in fam.configs}
    lo, hi = fam.anchor_names
    if not flops[lo] < flops[hi]:
        raise ValueError(f"anchors must be given cheaper first: {lo} has {flops[lo]} FLOPs, {hi} has {flops[hi]}")
    keep = [c.name for c in fam.stitch_configs if not inside_only or flops[lo] <= flops[c.name] <= flops[hi]]
    rule = (f"{directions} stitches at {granularity} boundaries" + (f" with FLOPs inside [{lo}, {hi}]"
                                                                     if inside_only else ""))
    return StitchPlan(keep, flops, (lo, hi), rule)


def latency_ms(family: SeamFamily, cfg: Config | str, batch: int, image_shape: tuple[int, int, int], device: str,
               warmup: int = 5, reps: int = 30, channels_last: bool = True) -> float:
    """Median device time (ms) of one forward of ``cfg`` at ``batch`` (bf16 autocast on a GPU; queued timing)."""
    cfg = family.activate(cfg)
    family.eval()
    x = torch.randn(batch, *image_shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(device):  # not inference_mode: the shared L2-flush buffer must stay a normal tensor
        t = time_fn(lambda: family(x, cfg), warmup=warmup, reps=reps, queue_ahead=True)
    return t.median_ms


@dataclass(frozen=True)
class InterpolationRule:
    """See the module docstring; ``cap`` adds the upper accuracy bound (reported as a variant)."""

    tol: float = 0.0025
    cap: bool = False


def line_accuracy(flops: float, lo: dict, hi: dict) -> float:
    """Accuracy of the straight line through the anchors (FLOPs, acc) at ``flops``."""
    span = hi["flops"] - lo["flops"]
    if span <= 0:
        raise ValueError(f"anchors need distinct FLOPs to define a line, got {lo['flops']} and {hi['flops']}")
    return lo["acc"] + (hi["acc"] - lo["acc"]) * (flops - lo["flops"]) / span


def interpolates(point: dict, lo: dict, hi: dict, rule: InterpolationRule = InterpolationRule()) -> tuple[bool, str]:
    """Whether ``point`` ({"flops", "acc"}) interpolates between anchors ``lo`` and ``hi`` (F_lo < F_hi), and why."""
    if lo["flops"] > hi["flops"]:
        lo, hi = hi, lo
    if not lo["flops"] <= point["flops"] <= hi["flops"]:
        return False, "flops_outside_anchor_range"
    if point["acc"] < line_accuracy(point["flops"], lo, hi) - rule.tol:
        return False, "below_line"
    if rule.cap and point["acc"] > max(lo["acc"], hi["acc"]) + rule.tol:
        return False, "above_best_anchor"
    return True, "interpolates"


def interpolation_fraction(rows: list[dict], accs: dict[str, float], rule: InterpolationRule) -> float:
    """Fraction of the stitch rows that interpolate when row ``r`` has accuracy ``accs[r["name"]]``."""
    lo, hi = sorted(({"flops": r["flops"], "acc": accs[r["name"]]} for r in rows if r["is_anchor"]),
                    key=lambda a: a["flops"])
    stitches = [r for r in rows if not r["is_anchor"]]
    return sum(interpolates({"flops": r["flops"], "acc": accs[r["name"]]}, lo, hi, rule)[0]
               for r in stitches) / len(stitches)


def interpolation_summary(rows: list[dict], acc_key: str = "acc_test",
                          rule: InterpolationRule = InterpolationRule(), bits_key: str | None = "test_correct",
                          n_boot: int = 2000, seed: int = 0) -> dict:
    """Verdict per stitch and the fraction that interpolates, for the rule and its capped/uncapped variant; with
    per-image correctness under ``bits_key`` in every row, the 95 % paired-bootstrap interval of the percentage."""
    anchors = [r for r in rows if r["is_anchor"]]
    if len(anchors) != 2:
        raise ValueError(f"need exactly two anchor rows, got {len(anchors)}")
    lo, hi = sorted(({"flops": r["flops"], "acc": r[acc_key], "name": r["name"]} for r in anchors),
                    key=lambda a: a["flops"])
    variant = InterpolationRule(rule.tol, cap=not rule.cap)
    verdicts, n_ok, n_variant = {}, 0, 0
    stitches = [r for r in rows if not r["is_anchor"]]
    for r in stitches:
        p = {"flops": r["flops"], "acc": r[acc_key]}
        ok, why = interpolates(p, lo, hi, rule)
        ok_v, _ = interpolates(p, lo, hi, variant)
        n_ok += ok
        n_variant += ok_v
        verdicts[r["name"]] = {"interpolates": ok, "reason": why, "flops": r["flops"], "acc": r[acc_key],
                               "line_acc": line_accuracy(r["flops"], lo, hi)}
    n = len(stitches)
    in_range = n - sum(v["reason"] == "flops_outside_anchor_range" for v in verdicts.values())
    reasons: dict[str, int] = {}
    for v in verdicts.values():
        reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
    vname = "capped" if variant.cap else "uncapped"
    out = {"rule": asdict(rule), "acc_key": acc_key, "anchors": {"lo": lo, "hi": hi}, "stitches": n,
           "interpolating": n_ok, "fraction": n_ok / n if n else None, "percent": 100.0 * n_ok / n if n else None,
           f"percent_{vname}": 100.0 * n_variant / n if n else None, "reasons": reasons,
           "in_flops_range": in_range, "percent_of_in_flops_range": 100.0 * n_ok / in_range if in_range else None,
           "per_stitch": verdicts, "percent_ci95": None, "interpolating_conservative": None,
           "percent_conservative": None}
    if n and bits_key and all(bits_key in r for r in rows):
        bits = np.stack([unpack_bits(r[bits_key], r["n_test"]) for r in rows])
        boot = bootstrap_accuracies(bits, n_boot, seed)
        fracs = [interpolation_fraction(rows, {r["name"]: float(b[i]) for i, r in enumerate(rows)}, rule)
                 for b in boot]
        ci = interval95(100.0 * np.asarray(fracs))
        out["percent_ci95"] = {**ci, "n_boot": n_boot, "seed": seed}
        col = {r["name"]: i for i, r in enumerate(rows)}
        a_lo, a_hi = boot[:, col[lo["name"]]], boot[:, col[hi["name"]]]
        n_cons = 0
        for r in stitches:
            v, a = verdicts[r["name"]], boot[:, col[r["name"]]]
            w = (r["flops"] - lo["flops"]) / (hi["flops"] - lo["flops"])
            margin = interval95(a - (a_lo + w * (a_hi - a_lo)) + rule.tol)
            ok = v["interpolates"] and margin["lo"] >= 0
            if rule.cap:
                ok = ok and interval95(a - np.maximum(a_lo, a_hi) - rule.tol)["hi"] <= 0
            v["margin_pp_ci95"] = {k: 100.0 * x for k, x in margin.items()}
            v["interpolates_at_lower_end"] = bool(ok)
            n_cons += ok
        out["interpolating_conservative"] = n_cons
        out["percent_conservative"] = 100.0 * n_cons / n
    return out


def parameter_bytes(module_params: list[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in module_params)
