"""Measurements per configuration and the interpolation rule.

* accuracy: top-1 on a split, ``mean(argmax(logits) == label)``, eval mode, bf16 autocast on a GPU;
* FLOPs: ``torch.utils.flop_counter`` for one image (2 per multiply-add of convolutions and matmuls; BatchNorm,
  ReLU and pooling are not counted), so ``flops(batch b) = b · flops``;
* parameters: distinct parameters the configuration runs (stitch included);
* latency: ``impl.common.timing.time_fn`` (CUDA events, L2 flushed per call) of one forward at batch 1 and 64;
* BatchNorm recalibration: reset the running statistics of the layers a configuration runs and re-estimate them as
  the plain average over ``calib_images`` training images (momentum None), then store them for that configuration.

Interpolation (anchors ``lo`` and ``hi`` ordered by FLOPs, F_lo < F_hi, test accuracies A_lo, A_hi): a stitch at
(F, A) interpolates iff
    F_lo ≤ F ≤ F_hi                                                     (inside the anchors' FLOPs range)
    A ≥ A_lo + (A_hi − A_lo)·(F − F_lo)/(F_hi − F_lo) − tol             (on or above the line joining them)
    A ≤ max(A_lo, A_hi) + tol                                           (inside the anchors' accuracy range)
with ``tol`` in accuracy units (default 0.0025 = 0.25 percentage points, about one binomial standard error of a
93 % accuracy on 10,000 test images). The line condition implies A ≥ min(A_lo, A_hi) − tol.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from impl.common.timing import time_fn
from impl.seam.data import DataBundle, preprocess
from impl.seam.family import Config, SeamFamily
from impl.seam.train import autocast


@torch.no_grad()
def accuracy(family: SeamFamily, cfg: Config | str, split: Any, data: DataBundle, device: str,
             batch_size: int = 1000, channels_last: bool = True) -> float:
    """Top-1 accuracy of ``cfg`` on ``split`` (its own BatchNorm statistics loaded if it has them)."""
    cfg = family.activate(cfg)
    family.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for images, labels in split.batches(batch_size):
        x = preprocess(images, data.mean, data.std, None, channels_last)
        with autocast(device):
            pred = family(x, cfg).argmax(1)
        correct += (pred == labels).sum()
        n += labels.numel()
    if n == 0:
        raise ValueError("accuracy of an empty split is undefined")
    return int(correct) / n


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


def latency_ms(family: SeamFamily, cfg: Config | str, batch: int, image_shape: tuple[int, int, int], device: str,
               warmup: int = 5, reps: int = 30, channels_last: bool = True) -> float:
    """Median device time (ms) of one forward of ``cfg`` at ``batch`` (bf16 autocast on a GPU)."""
    cfg = family.activate(cfg)
    family.eval()
    x = torch.randn(batch, *image_shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(device):  # not inference_mode: the shared L2-flush buffer must stay a normal tensor
        t = time_fn(lambda: family(x, cfg), warmup=warmup, reps=reps)
    return t.median_ms


@dataclass(frozen=True)
class InterpolationRule:
    """See the module docstring; ``cap`` drops the upper accuracy bound when False (reported as a variant)."""

    tol: float = 0.0025
    cap: bool = True


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


def interpolation_summary(rows: list[dict], acc_key: str = "acc_test",
                          rule: InterpolationRule = InterpolationRule()) -> dict:
    """Verdict per stitch and the fraction that interpolates, for the rule and for its uncapped variant."""
    anchors = [r for r in rows if r["is_anchor"]]
    if len(anchors) != 2:
        raise ValueError(f"need exactly two anchor rows, got {len(anchors)}")
    lo, hi = sorted(({"flops": r["flops"], "acc": r[acc_key], "name": r["name"]} for r in anchors),
                    key=lambda a: a["flops"])
    uncapped = InterpolationRule(rule.tol, cap=False)
    verdicts, n_ok, n_ok_uncapped = {}, 0, 0
    stitches = [r for r in rows if not r["is_anchor"]]
    for r in stitches:
        p = {"flops": r["flops"], "acc": r[acc_key]}
        ok, why = interpolates(p, lo, hi, rule)
        ok_u, _ = interpolates(p, lo, hi, uncapped)
        n_ok += ok
        n_ok_uncapped += ok_u
        verdicts[r["name"]] = {"interpolates": ok, "reason": why, "flops": r["flops"], "acc": r[acc_key],
                               "line_acc": line_accuracy(r["flops"], lo, hi)}
    n = len(stitches)
    in_range = n - sum(v["reason"] == "flops_outside_anchor_range" for v in verdicts.values())
    reasons = {}
    for v in verdicts.values():
        reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
    return {"rule": asdict(rule), "acc_key": acc_key, "anchors": {"lo": lo, "hi": hi}, "stitches": n,
            "interpolating": n_ok, "fraction": n_ok / n if n else None, "percent": 100.0 * n_ok / n if n else None,
            "fraction_uncapped": n_ok_uncapped / n if n else None,
            "percent_uncapped": 100.0 * n_ok_uncapped / n if n else None, "reasons": reasons,
            "in_flops_range": in_range, "percent_of_in_flops_range": 100.0 * n_ok / in_range if in_range else None,
            "per_stitch": verdicts}


def parameter_bytes(module_params: list[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in module_params)
