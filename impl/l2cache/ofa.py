"""A once-for-all-style MobileNetV3 supernet over timm's ``mobilenetv3_large_100``, serving alternating subnets.

One set of weights (timm's model, BatchNorm folded into the convolutions: w' = w·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε))
serves every subnet; a subnet is chosen by three elastic dimensions, as in once-for-all (Cai et al., 2020):

  depth   blocks kept per stage (the first d; the skipped trailing blocks are residual, so shapes still agree)
  width   the first k of each inverted-residual block's expanded channels, k = expand · mid rounded to 8
          (rows of the 1x1 expansion and the depthwise conv, columns of the SE reduce and the 1x1 projection)
  kernel  depthwise kernels centre-cropped to at most ``kernel`` (5x5 -> 3x3, padding k//2)

Slicing happens in the forward (views of the one weight arena, no copies kept), so the subnets share bytes: what a
persisting window or a prefetch of the arena can exploit when requests alternate between subnets. Input
[1, 3, R, R]; output logits [1, classes]. ``materialize_subnet`` builds the same subnet by surgery on a copy of the timm
module (unfolded BatchNorm, timm's own forward): the independent reference the tests compare with.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from impl import backend
from impl.l2cache.arena import Arena, ArenaBacked, Span
from impl.l2cache.policies import NO_HOOKS, LayerHooks

MODEL = "mobilenetv3_large_100"


@dataclass(frozen=True)
class SubnetConfig:
    name: str
    depth: int | None = None        # blocks kept per stage, at most (the first ones); None keeps all
    expand: float = 1.0             # fraction of expanded channels kept
    kernel: int | None = None       # cap on depthwise kernel size; None keeps the native size


SUBNETS = {s.name: s for s in (SubnetConfig("max"), SubnetConfig("mid", 3, 0.75, 3), SubnetConfig("min", 2, 0.5, 3))}


@dataclass
class Block:
    """One layer group of the folded network: its tensors' names in the arena and how to run it."""

    kind: str  # stem | ds | ir | conv | head
    names: list[str]
    stride: int = 1
    kernel: int = 1
    acts: tuple[str, ...] = ()
    skip: bool = False
    se: bool = False
    stage: int = -1


def create_timm_model(seed: int = 0, randomize_bn: bool = True, name: str = MODEL, num_classes: int = 1000
                      ) -> nn.Module:
    """A timm MobileNetV3 (default mobilenetv3_large_100) with random weights and BatchNorm statistics, eval mode."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    if randomize_bn:
        gen = torch.Generator().manual_seed(seed + 1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.data = 1 + 0.1 * torch.randn(n, generator=gen)
                m.bias.data = 0.1 * torch.randn(n, generator=gen)
                m.running_mean = 0.1 * torch.randn(n, generator=gen)
                m.running_var = 1 + 0.1 * torch.rand(n, generator=gen)
    return model


def _act(module: nn.Module | None) -> str:
    if module is None or isinstance(module, nn.Identity):
        return "identity"
    for cls, name in ((nn.ReLU, "relu"), (nn.Hardswish, "hardswish"), (nn.Hardsigmoid, "hardsigmoid")):
        if isinstance(module, cls):
            return name
    raise NotImplementedError(f"activation {type(module).__name__} is not supported by the folded forward")


def _apply(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return F.relu(x)
    if act == "hardswish":
        return F.hardswish(x)
    if act == "hardsigmoid":
        return F.hardsigmoid(x)
    return x


def _fold(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight.detach() * scale[:, None, None, None], bn.bias.detach() - bn.running_mean * scale


def keep_channels(mid: int, expand: float) -> int:
    """First-k width: expand·mid rounded to a multiple of 8, at least 8 and at most mid."""
    if not 0 < expand <= 1:
        raise ValueError(f"expand must be in (0, 1], got {expand}")
    return max(min(8, mid), min(mid, int(round(mid * expand / 8)) * 8))


def crop_size(native: int, cap: int | None) -> int:
    if cap is None or cap >= native:
        return native
    if cap < 1 or cap % 2 == 0:
        raise ValueError(f"kernel cap must be a positive odd size, got {cap}")
    return cap


class OfaSupernet:
    """The folded weights of one timm MobileNetV3 in an ``Arena`` and the slicing forward of any subnet."""

    def __init__(self, model: nn.Module, device: str = backend.DEVICE, dtype: torch.dtype = torch.float32) -> None:
        tensors: dict[str, torch.Tensor] = {}
        self.blocks: list[Block] = []

        def add(prefix: str, **ts: torch.Tensor) -> list[str]:
            names = [f"{prefix}.{k}" for k in ts]
            tensors.update({f"{prefix}.{k}": v for k, v in ts.items()})
            return names

        w, b = _fold(model.conv_stem, model.bn1)
        self.blocks.append(Block("stem", add("stem", w=w, b=b), stride=model.conv_stem.stride[0], kernel=3,
                                 acts=(_act(model.bn1.act),)))
        self.stage_sizes = [len(s) for s in model.blocks]
        for si, stage in enumerate(model.blocks):
            for bi, blk in enumerate(stage):
                self.blocks.append(self._fold_block(blk, f"s{si}b{bi}", si, add))
        head = {"w": model.conv_head.weight.detach(), "b": model.conv_head.bias.detach(),
                "fc_w": model.classifier.weight.detach(), "fc_b": model.classifier.bias.detach()}
        self.blocks.append(Block("head", add("head", **head), acts=(_act(model.act2),)))
        self.weights = Arena.from_tensors(tensors, device, dtype)
        self.dtype = dtype

    @staticmethod
    def _fold_block(blk: nn.Module, prefix: str, stage: int, add) -> Block:
        name = type(blk).__name__
        if getattr(blk, "conv_s2d", None) is not None:
            raise NotImplementedError(f"{prefix}: space-to-depth blocks are not supported")
        if name == "ConvBnAct":
            w, b = _fold(blk.conv, blk.bn1)
            return Block("conv", add(prefix, w=w, b=b), stride=blk.conv.stride[0], acts=(_act(blk.bn1.act),),
                         stage=stage)
        se = not isinstance(blk.se, nn.Identity)
        se_t = {}
        if se:
            if _act(blk.se.act1) != "relu" or _act(blk.se.gate) != "hardsigmoid":
                raise NotImplementedError(f"{prefix}: squeeze-excite must be ReLU + hard sigmoid")
            se_t = {"se_rw": blk.se.conv_reduce.weight.detach(), "se_rb": blk.se.conv_reduce.bias.detach(),
                    "se_ew": blk.se.conv_expand.weight.detach(), "se_eb": blk.se.conv_expand.bias.detach()}
        dw_w, dw_b = _fold(blk.conv_dw, blk.bn1 if name == "DepthwiseSeparableConv" else blk.bn2)
        if name == "DepthwiseSeparableConv":
            pw_w, pw_b = _fold(blk.conv_pw, blk.bn2)
            names = add(prefix, dw_w=dw_w, dw_b=dw_b, **se_t, pw_w=pw_w, pw_b=pw_b)
            return Block("ds", names, stride=blk.conv_dw.stride[0], kernel=blk.conv_dw.kernel_size[0],
                         acts=(_act(blk.bn1.act), _act(blk.bn2.act)), skip=blk.has_skip, se=se, stage=stage)
        if name != "InvertedResidual":
            raise NotImplementedError(f"{prefix}: block type {name} is not supported")
        pw_w, pw_b = _fold(blk.conv_pw, blk.bn1)
        pwl_w, pwl_b = _fold(blk.conv_pwl, blk.bn3)
        names = add(prefix, pw_w=pw_w, pw_b=pw_b, dw_w=dw_w, dw_b=dw_b, **se_t, pwl_w=pwl_w, pwl_b=pwl_b)
        return Block("ir", names, stride=blk.conv_dw.stride[0], kernel=blk.conv_dw.kernel_size[0],
                     acts=(_act(blk.bn1.act), _act(blk.bn2.act), _act(blk.bn3.act)), skip=blk.has_skip, se=se,
                     stage=stage)

    def executed(self, sub: SubnetConfig) -> list[Block]:
        """The blocks a subnet runs, in order (depth: the first min(n, depth) blocks of each stage)."""
        if sub.depth is not None and sub.depth < 1:
            raise ValueError(f"depth must be >= 1, got {sub.depth}")
        out, seen = [], {}
        for blk in self.blocks:
            if blk.stage >= 0:
                seen[blk.stage] = seen.get(blk.stage, 0) + 1
                if sub.depth is not None and seen[blk.stage] > sub.depth:
                    if not blk.skip:
                        raise ValueError(f"cannot skip a non-residual block of stage {blk.stage}")
                    continue
            out.append(blk)
        return out

    def layer_spans(self, sub: SubnetConfig) -> list[Span]:
        return [self.weights.span(b.names) for b in self.executed(sub)]

    def forward(self, x: torch.Tensor, sub: SubnetConfig, hooks: LayerHooks = NO_HOOKS) -> torch.Tensor:
        """Logits [B, 1000] of subnet ``sub`` for images x [B, 3, R, R]; ``hooks`` see every executed block."""
        for j, blk in enumerate(self.executed(sub)):
            hooks.before_layer(j)
            x = self._run(blk, x, sub)
        hooks.finish()
        return x

    def _run(self, blk: Block, x: torch.Tensor, sub: SubnetConfig) -> torch.Tensor:
        t = {n.split(".", 1)[1]: self.weights[n] for n in blk.names}
        if blk.kind in ("stem", "conv"):
            return _apply(F.conv2d(x, t["w"], t["b"], stride=blk.stride, padding=blk.kernel // 2), blk.acts[0])
        if blk.kind == "head":
            x = _apply(F.conv2d(x.mean((2, 3), keepdim=True), t["w"], t["b"]), blk.acts[0])
            return F.linear(x.flatten(1), t["fc_w"], t["fc_b"])
        shortcut = x
        if blk.kind == "ir":
            k = keep_channels(t["pw_w"].shape[0], sub.expand)
            x = _apply(F.conv2d(x, t["pw_w"][:k], t["pw_b"][:k]), blk.acts[0])
            act_dw, act_out = blk.acts[1], blk.acts[2]
        else:  # ds: depthwise first, no expansion to slice
            k = x.shape[1]
            act_dw, act_out = blk.acts[0], blk.acts[1]
        ks = crop_size(blk.kernel, sub.kernel)
        c = (blk.kernel - ks) // 2
        dw = t["dw_w"][:k, :, c:c + ks, c:c + ks]
        x = _apply(F.conv2d(x, dw, t["dw_b"][:k], stride=blk.stride, padding=ks // 2, groups=k), act_dw)
        if blk.se:
            s = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), t["se_rw"][:, :k], t["se_rb"]))
            x = x * F.hardsigmoid(F.conv2d(s, t["se_ew"][:k], t["se_eb"][:k]))
        if blk.kind == "ir":
            x = _apply(F.conv2d(x, t["pwl_w"][:, :k], t["pwl_b"]), act_out)
        else:
            x = _apply(F.conv2d(x, t["pw_w"], t["pw_b"]), act_out)
        return x + shortcut if blk.skip else x


# ---- the independent reference: module surgery on timm's model --------------------------------------------------

def _slice_conv(conv: nn.Conv2d, out: int | None = None, inp: int | None = None, crop: int | None = None,
                depthwise: bool = False) -> None:
    w = conv.weight.data
    if out is not None:
        w = w[:out]
    if inp is not None:
        w = w[:, :inp]
    if crop is not None and crop < w.shape[-1]:
        c = (w.shape[-1] - crop) // 2
        w = w[:, :, c:c + crop, c:c + crop]
        conv.kernel_size, conv.padding = (crop, crop), (crop // 2, crop // 2)
    conv.weight = nn.Parameter(w.clone())
    if conv.bias is not None and out is not None:
        conv.bias = nn.Parameter(conv.bias.data[:out].clone())
    conv.out_channels, conv.in_channels = w.shape[0], w.shape[1] * (w.shape[0] if depthwise else 1)
    if depthwise:
        conv.groups = w.shape[0]


def _slice_bn(bn: nn.BatchNorm2d, k: int) -> None:
    bn.weight = nn.Parameter(bn.weight.data[:k].clone())
    bn.bias = nn.Parameter(bn.bias.data[:k].clone())
    bn.running_mean = bn.running_mean[:k].clone()
    bn.running_var = bn.running_var[:k].clone()
    bn.num_features = k


def materialize_subnet(model: nn.Module, sub: SubnetConfig) -> nn.Module:
    """A standalone copy of timm's module cut down to ``sub`` (its own forward, unfolded BatchNorm)."""
    m = copy.deepcopy(model)
    for si in range(len(m.blocks)):
        m.blocks[si] = nn.Sequential(*list(m.blocks[si])[:sub.depth])
        for blk in m.blocks[si]:
            if type(blk).__name__ == "InvertedResidual":
                k = keep_channels(blk.conv_pw.out_channels, sub.expand)
                _slice_conv(blk.conv_pw, out=k)
                _slice_bn(blk.bn1, k)
                _slice_conv(blk.conv_dw, out=k, crop=crop_size(blk.conv_dw.kernel_size[0], sub.kernel), depthwise=True)
                _slice_bn(blk.bn2, k)
                if not isinstance(blk.se, nn.Identity):
                    _slice_conv(blk.se.conv_reduce, inp=k)
                    _slice_conv(blk.se.conv_expand, out=k)
                _slice_conv(blk.conv_pwl, inp=k)
            elif type(blk).__name__ == "DepthwiseSeparableConv":
                _slice_conv(blk.conv_dw, crop=crop_size(blk.conv_dw.kernel_size[0], sub.kernel), depthwise=True)
    return m


# ---- the serving workload ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OfaConfig:
    name: str = "ofa_alt"
    resolution: int = 224
    model: str = MODEL  # any timm MobileNetV3; CPU tests use a small one (the interpreter is slow)
    num_classes: int = 1000
    subnets: tuple[str, ...] = ("max", "mid")
    dtype: str = "float16"
    noise_bytes: int = 0  # bytes other work writes between requests (0: the GPU serves only this model)


OFA_PRESETS = {c.name: c for c in (OfaConfig(), OfaConfig("ofa_alt_noisy", noise_bytes=64 << 20))}


@dataclass
class OfaServing(ArenaBacked):
    """Batch-1 requests alternating between subnets of one supernet (request i runs subnet i mod len(subnets))."""

    sharing = "subnets"

    cfg: OfaConfig
    device: str = backend.DEVICE
    seed: int = 0
    model: nn.Module | None = None
    net: OfaSupernet = field(init=False)

    def __post_init__(self) -> None:
        dtype = {"float16": torch.float16, "float32": torch.float32}[self.cfg.dtype]
        if self.model is None:
            self.model = create_timm_model(self.seed, name=self.cfg.model, num_classes=self.cfg.num_classes)
        self.name = self.cfg.name
        self.net = OfaSupernet(self.model, self.device, dtype)
        self.weights = self.net.weights
        self.subnets = [SUBNETS[n] for n in self.cfg.subnets]
        self.kinds = len(self.subnets)
        gen = torch.Generator().manual_seed(self.seed + 7)
        r = self.cfg.resolution
        self.x = torch.randn((1, 3, r, r), generator=gen).to(device=self.device, dtype=dtype)
        self.noise = (torch.empty(self.cfg.noise_bytes // 4, dtype=torch.float32, device=self.device)
                      if self.cfg.noise_bytes else None)

    def activation_span(self) -> Span | None:
        return None  # torch allocates them; the runner finds the CUDA graph's pool instead

    def layer_spans(self, kind: int = 0) -> list[Span]:
        return self.net.layer_spans(self.subnets[kind])

    def forward(self, kind: int = 0, hooks: LayerHooks = NO_HOOKS) -> torch.Tensor:
        return self.net.forward(self.x, self.subnets[kind], hooks)

    def between_requests(self) -> None:
        if self.noise is not None:
            self.noise.fill_(1.0)  # other tenants' writes: they evict whatever is not persisting

    def info(self) -> dict:
        return {"kind": "ofa", "model": self.cfg.model, "num_classes": self.cfg.num_classes,
                "resolution": self.cfg.resolution, "subnets": list(self.cfg.subnets),
                "dtype": self.cfg.dtype, "weight_bytes": self.weight_bytes, "noise_bytes": self.cfg.noise_bytes,
                "blocks_per_subnet": [len(self.net.executed(s)) for s in self.subnets]}
