"""The two anchors: timm ResNets (``resnet34``, ``resnet50``) cut into stem, a flat list of blocks, and a head.

timm's ResNet34/50 are torchvision's architectures (v1.5 bottleneck: stride in the 3x3 conv) with the same parameter
names; with ``zero_init_last=False`` they also start from torchvision's default initialisation (He-normal convs, unit
BatchNorm, no zeroed residual branch), so a torchvision state dict loads unchanged (checked in the tests).

A ResNet computes ``logits = head(block_n(... block_1(stem(x))))``. ``stem`` is conv1 -> bn1 -> act1 -> maxpool,
``head`` is global average pool -> fc. Both anchors have four stages of [3, 4, 6, 3] blocks; the blocks of one stage
share their output channels (ResNet34: 64/128/256/512, ResNet50: 256/512/1024/2048) and spatial size, which is what
makes a block boundary of one network joinable to the same boundary of the other.

For small images (Fashion-MNIST, 28x28) the stem is adapted: a 3x3 stride-1 first conv and no max-pool, so the four
stages run at 28, 14, 7 and 4 pixels. ImageNet-sized inputs keep timm's 7x7/2 stem and can load local pretrained
weights (``AnchorConfig.weights``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SHORT_NAMES = {"resnet18": "r18", "resnet34": "r34", "resnet50": "r50", "resnet101": "r101"}


@dataclass(frozen=True)
class AnchorConfig:
    """How one anchor network is built."""

    arch: str = "resnet34"          # a timm ResNet name
    num_classes: int = 10
    in_chans: int = 1               # 1 for grayscale Fashion-MNIST, 3 for RGB folders
    small_stem: bool = True         # 3x3 stride-1 conv1 and no max-pool (inputs of ~32 px)
    width_div: int = 1              # divide every channel count by this (cheap variants for tests / smoke runs)
    zero_init_last: bool = False    # True: timm's init, the last BN of each residual branch starts at 0
    weights: str | None = None      # local .safetensors / .pth with a timm or torchvision state dict

    @property
    def name(self) -> str:
        return SHORT_NAMES.get(self.arch, self.arch)


def build_anchor(cfg: AnchorConfig) -> nn.Module:
    """A timm ResNet per ``cfg`` (random init unless ``cfg.weights`` names a local file)."""
    import timm

    if cfg.width_div < 1 or 64 % cfg.width_div:
        raise ValueError(f"width_div must divide 64, got {cfg.width_div}")
    kw = {}
    if cfg.width_div > 1:
        kw = dict(channels=tuple(c // cfg.width_div for c in (64, 128, 256, 512)), stem_width=64 // cfg.width_div)
    net = timm.create_model(cfg.arch, pretrained=False, num_classes=cfg.num_classes, in_chans=cfg.in_chans,
                            zero_init_last=cfg.zero_init_last, **kw)
    if not hasattr(net, "layer4") or not hasattr(net, "forward_head"):
        raise ValueError(f"{cfg.arch!r} is not a timm ResNet (no layer1..layer4 / forward_head)")
    if cfg.weights:
        load_weights(net, cfg.weights)
    if cfg.small_stem:
        adapt_stem_small(net, cfg.in_chans)
    return net


def adapt_stem_small(net: nn.Module, in_chans: int) -> None:
    """Replace conv1 by a 3x3 stride-1 conv and drop the max-pool (in place)."""
    out = net.bn1.num_features
    conv = nn.Conv2d(in_chans, out, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    net.conv1 = conv
    net.maxpool = nn.Identity()


def load_weights(net: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a local state dict into ``net``; tensors whose shape differs (a new classifier) are skipped and listed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    kept = {k: v for k, v in state.items() if k in own and k not in skipped}
    missing = [k for k in own if k not in kept]
    net.load_state_dict(kept, strict=False)
    print(f"loaded {len(kept)} tensors from {path}; skipped (shape): {skipped or 'none'}; "
          f"left at init: {len(missing)}")
    return {"skipped": skipped, "missing": missing}


def stem_modules(net: nn.Module) -> list[nn.Module]:
    return [net.conv1, net.bn1, net.act1, net.maxpool]


def run_stem(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv1 -> bn1 -> act1 -> maxpool, exactly timm's ``forward_features`` prefix."""
    for m in stem_modules(net):
        x = m(x)
    return x


def blocks(net: nn.Module) -> list[nn.Module]:
    """All residual blocks in execution order (layer1[0], ..., layer4[-1])."""
    return [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]


def stage_layout(net: nn.Module) -> tuple[int, ...]:
    """Blocks per stage, e.g. (3, 4, 6, 3)."""
    return tuple(len(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4))


def block_stage(layout: tuple[int, ...], point: int) -> int:
    """Stage (1-based) of the block whose output is boundary ``point`` (the activation after ``point`` blocks)."""
    if not 1 <= point <= sum(layout):
        raise ValueError(f"boundary {point} is outside 1..{sum(layout)}")
    end = 0
    for s, n in enumerate(layout, 1):
        end += n
        if point <= end:
            return s
    raise AssertionError("unreachable")


def stage_channels(net: nn.Module) -> tuple[int, ...]:
    """Output channels of each stage (every block of a stage outputs this many)."""
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        last = layer[-1]
        bn = last.bn3 if hasattr(last, "bn3") else last.bn2
        out.append(bn.num_features)
    return tuple(out)


def head_modules(net: nn.Module) -> list[nn.Module]:
    return [net.global_pool, net.fc]


def run_head(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_head(x)
