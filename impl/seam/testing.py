"""Helpers for seam's tests and benches: families with non-trivial random weights, and tiny synthetic data sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from impl.seam.data import DataBundle, TensorSplit
from impl.seam.family import SeamFamily, build_family
from impl.seam.models import AnchorConfig


@torch.no_grad()
def randomize_bn(module: nn.Module, seed: int) -> None:
    """Random affine parameters and running statistics, so eval-mode BatchNorm is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def make_family(width_div: int = 1, in_chans: int = 1, num_classes: int = 10, granularity: str = "block",
                stitch_bn: bool = False, seed: int = 0, small_stem: bool = True, directions: str = "both",
                stitches: list[str] | None = None) -> SeamFamily:
    """ResNet34 + ResNet50 family in eval mode with every residual branch active (no zero-init) and random BN."""
    torch.manual_seed(seed)
    anchors = [AnchorConfig(arch=a, num_classes=num_classes, in_chans=in_chans, small_stem=small_stem,
                            width_div=width_div, zero_init_last=False) for a in ("resnet34", "resnet50")]
    family = build_family(anchors, granularity, stitch_bn, directions, stitches)
    randomize_bn(family, seed)
    return family.eval()


def synthetic_bundle(n_train: int, n_val: int, n_test: int, size: int = 16, num_classes: int = 10,
                     seed: int = 0, device: str = "cpu") -> DataBundle:
    """Random uint8 images whose class shifts the mean brightness (learnable, not trivial), as a DataBundle."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> TensorSplit:
        y = rng.integers(0, num_classes, n)
        x = rng.integers(0, 160, (n, 1, size, size)) + (y * (95 // max(1, num_classes - 1)))[:, None, None, None]
        return TensorSplit(torch.from_numpy(x.astype(np.uint8)).to(device), torch.from_numpy(y).to(device))

    return DataBundle(train=split(n_train), val=split(n_val), test=split(n_test), num_classes=num_classes,
                      channels=1, image_size=size, mean=(0.45,), std=(0.25,), kind="synthetic", source="synthetic")


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Small CPU convolutions run faster on one thread, and far faster when the 2 cores are shared; restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
