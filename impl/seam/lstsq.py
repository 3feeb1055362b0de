"""Least-squares initialisation of the stitches (SN-Net): fit ``S`` so that ``S(front activation) ≈ back activation``.

For a stitch A -> B at boundary p, run both anchors on the same ~100 images and take their activations after p blocks,
``X_A`` (N, C_A, H, W) and ``X_B`` (N, C_B, H, W). Every pixel is one row: ``x = X_A`` as (N·H·W, C_A), ``y = X_B`` as
(N·H·W, C_B). Then

    [W; b] = argmin ‖ [x 1] [W; b] − y ‖_F        (minimum-norm solution, computed in float64)

and the stitch's 1x1 conv gets weight ``Wᵀ`` (C_B, C_A) and bias ``b``. The cut-off for rank is numpy.linalg.lstsq's:
singular values ``≤ eps · max(rows, C_A + 1) · s_max`` count as zero, so the result equals numpy's even when the
system is underdetermined (stage 4 at 4x4 pixels has 1,600 rows for 2,049 unknowns at 100 images).
"""
from __future__ import annotations

import time
from typing import Iterable

import torch

from impl.seam.family import Config, SeamFamily
from impl.seam.models import blocks, run_stem

METHODS = ("auto", "gelsd", "svd")


def solve_lstsq(x: torch.Tensor, y: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """W (K, N) and b (N,) in float64 minimising ‖x W + 1 bᵀ − y‖_F for x (M, K), y (M, N); minimum norm.

    ``gelsd`` is LAPACK's SVD solver (CPU only; what numpy uses); ``svd`` runs anywhere (QR, then an SVD of the small
    triangular factor); ``auto`` picks gelsd on the CPU and svd on a GPU.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x (M, K) and y (M, N) must share M rows, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("least squares needs at least one row")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("activations contain NaN or inf; cannot fit a stitch")
    a = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], dim=1)
    yd = y.double()
    if method == "auto":
        method = "gelsd" if a.device.type == "cpu" else "svd"
    if method == "gelsd":
        if a.device.type != "cpu":
            raise ValueError("gelsd runs on the CPU only; use method='svd' for GPU tensors")
        sol = torch.linalg.lstsq(a, yd, rcond=None, driver="gelsd").solution
    else:
        sol = _min_norm_svd(a, yd)
    return sol[:-1], sol[-1]


def _min_norm_svd(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pinv(a) @ y with numpy's cut-off, through a QR of the long side and an SVD of the square factor."""
    m, k = a.shape
    if m >= k:  # a = Q R, R = U S Vh  =>  pinv(a) = Vh^T S^-1 U^T Q^T
        q, r = torch.linalg.qr(a)
        u, s, vh = torch.linalg.svd(r)
        left, right = vh.mT, u.mT @ (q.mT @ y)
    else:  # a^T = Q R  =>  a = R^T Q^T, R^T = U S Vh  =>  pinv(a) = Q Vh^T S^-1 U^T
        q, r = torch.linalg.qr(a.mT)
        u, s, vh = torch.linalg.svd(r.mT)
        left, right = q @ vh.mT, u.mT @ y
    cutoff = torch.finfo(torch.float64).eps * max(m, k) * s.max()
    inv = torch.where(s > cutoff, 1.0 / s, torch.zeros_like(s))
    return left @ (inv[:, None] * right)


def pixels(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N·H·W, C): one row per pixel."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


@torch.no_grad()
def boundary_activations(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Activations after each block: element p-1 is the output of block p (float32, eval-mode BatchNorm)."""
    h = run_stem(net, x)
    out = []
    for blk in blocks(net):
        h = blk(h)
        out.append(h.float())
    return out


@torch.no_grad()
def init_stitches(family: SeamFamily, images: torch.Tensor, configs: Iterable[Config] | None = None,
                  method: str = "auto") -> dict[str, dict[str, float]]:
    """Fit every stitch (or those in ``configs``) by least squares on ``images`` (N, C, H, W, preprocessed).

    Returns per stitch the rows used, the relative residual ‖[x 1][W; b] − y‖/‖y‖ and the seconds taken.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    was_training = family.training
    family.eval()
    acts = {n: boundary_activations(family.nets[n], images) for n in family.anchor_names}
    report = {}
    for cfg in (family.stitch_configs if configs is None else configs):
        t0 = time.perf_counter()
        x, y = pixels(acts[cfg.front][cfg.point - 1]), pixels(acts[cfg.back][cfg.point - 1])
        w, b = solve_lstsq(x, y, method)
        fit = x.double() @ w + b
        rel = float(torch.linalg.norm(fit - y.double()) / torch.linalg.norm(y.double()).clamp_min(1e-30))
        stitch = family.stitches[cfg.name]
        stitch.set_affine(w.mT.float(), b.float(), fit.mean(0).float(), fit.var(0, unbiased=False).float())
        report[cfg.name] = {"rows": x.shape[0], "rel_residual": rel, "seconds": time.perf_counter() - t0}
    family.active = None
    family.train(was_training)
    return report
