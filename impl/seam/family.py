"""A stitchable family: two anchors plus 1x1-conv stitches that join the front of one to the back of the other.

Configuration ``(front=A, back=B, point=p)`` computes, for an image batch x of shape (N, C, H, W),

    logits = head_B(block_B[n](... block_B[p+1](S(block_A[p](... block_A[1](stem_A(x))))))),   (N, classes)

with ``S(h) = W h + b`` at every pixel (a 1x1 conv, ``C_A(p) -> C_B(p)`` channels, optionally followed by BatchNorm).
``p`` counts blocks: the activation after ``p`` blocks has the same spatial size in both anchors because they share
their stage layout ([3, 4, 6, 3]). Anchors are the configurations ``A -> A`` with ``p = 0`` and no stitch.

Candidate points: every block boundary strictly inside the network (``granularity="block"``: p = 1..n-1, so each
part holds at least one block) or only the ends of stages 1-3 (``"stage"``: p = 3, 7, 13). A stitch at p = 0 or
p = n would swap only a stem or a classifier and is not part of the family. Directions: ``"fast_to_slow"`` (SN-Net's
choice: the front from the first, cheaper anchor, the back from the second) or ``"both"``. The family may hold a
subset of the candidates (``stitches``): the recipe keeps those whose FLOPs lie inside the anchors' range
(``measure.plan_stitches``), so every member can sit between the anchors.

Each configuration may carry its own BatchNorm statistics (``bn_states``): the blocks behind a stitch see other
activations than the anchor's own, so after family training the running statistics are re-estimated per
configuration (``measure.calibrate_bn``) and loaded before that configuration runs (``activate``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from impl.seam.models import AnchorConfig, block_stage, blocks, build_anchor, head_modules, run_head, run_stem, \
    stage_channels, stage_layout, stem_modules

GRANULARITIES = ("block", "stage")
DIRECTIONS = ("fast_to_slow", "both")


@dataclass(frozen=True, order=True)
class Config:
    """One member of the family: ``front``'s stem and first ``point`` blocks, a stitch, then ``back``'s rest."""

    front: str
    back: str
    point: int = 0

    @property
    def is_anchor(self) -> bool:
        return self.point == 0

    @property
    def name(self) -> str:
        return self.front if self.is_anchor else f"{self.front}_to_{self.back}_p{self.point:02d}"


def stitch_points(layout: tuple[int, ...], granularity: str = "block") -> list[int]:
    """Block boundaries where a stitch may join two networks of stage layout ``layout``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    n = sum(layout)
    if granularity == "block":
        return list(range(1, n))
    ends = [sum(layout[: s + 1]) for s in range(len(layout))]
    return ends[:-1]


class Stitch(nn.Module):
    """``y = W x + b`` per pixel: (N, C_in, H, W) -> (N, C_out, H, W); with ``use_bn`` a BatchNorm follows."""

    def __init__(self, c_in: int, c_out: int, use_bn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(c_out) if use_bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor, out_mean: torch.Tensor | None = None,
                   out_var: torch.Tensor | None = None) -> None:
        """Set W (C_out, C_in) and b (C_out,). A BatchNorm, if any, is set to pass ``W x + b`` through unchanged on
        data with per-channel output mean ``out_mean`` and variance ``out_var`` (defaults 0 and 1)."""
        c_out, c_in = self.conv.out_channels, self.conv.in_channels
        if tuple(weight.shape) != (c_out, c_in) or tuple(bias.shape) != (c_out,):
            raise ValueError(f"stitch {c_in}->{c_out} needs weight ({c_out}, {c_in}) and bias ({c_out},), got "
                             f"{tuple(weight.shape)} and {tuple(bias.shape)}")
        self.conv.weight.copy_(weight.reshape(c_out, c_in, 1, 1))
        self.conv.bias.copy_(bias)
        if self.bn is not None:
            dev = self.conv.weight.device
            mean = torch.zeros(c_out, device=dev) if out_mean is None else out_mean
            var = torch.ones(c_out, device=dev) if out_var is None else out_var
            self.bn.running_mean.copy_(mean)
            self.bn.running_var.copy_(var)
            self.bn.weight.copy_(torch.sqrt(var.float() + self.bn.eps))
            self.bn.bias.copy_(mean)

    def set_identity(self) -> None:
        c = self.conv.in_channels
        if self.conv.out_channels != c:
            raise ValueError(f"an identity stitch needs C_in == C_out, got {c} -> {self.conv.out_channels}")
        dev = self.conv.weight.device
        self.set_affine(torch.eye(c, device=dev), torch.zeros(c, device=dev))


def candidate_stitches(names: tuple[str, str], points: list[int], directions: str = "both") -> list[Config]:
    """Stitch configurations at ``points``: front ``names[0]`` -> back ``names[1]`` first, then the reverse."""
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, not {directions!r}")
    pairs = [(names[0], names[1])] + ([(names[1], names[0])] if directions == "both" else [])
    return [Config(a, b, p) for a, b in pairs for p in points]


class SeamFamily(nn.Module):
    """Two anchors (by name, cheaper first) and stitches between them; ``forward(x, config)`` runs one configuration.

    ``stitches`` (names or configs) keeps a subset of the candidates, in candidate order; None keeps them all.
    """

    def __init__(self, nets: Mapping[str, nn.Module], *, granularity: str = "block", stitch_bn: bool = False,
                 directions: str = "both", stitches: Iterable[Config | str] | None = None) -> None:
        super().__init__()
        if len(nets) != 2:
            raise ValueError(f"a family has exactly two anchors, got {len(nets)}: {list(nets)}")
        names = tuple(nets)
        layouts = {n: stage_layout(net) for n, net in nets.items()}
        if len(set(layouts.values())) != 1:
            raise ValueError(f"anchors must share their stage layout to be stitched block by block, got {layouts}")
        self.nets = nn.ModuleDict(nets)
        self.anchor_names = names
        self.layout = layouts[names[0]]
        self.granularity = granularity
        self.directions = directions
        self.points = stitch_points(self.layout, granularity)
        candidates = candidate_stitches(names, self.points, directions)
        if stitches is not None:
            wanted = {s if isinstance(s, str) else s.name for s in stitches}
            unknown = wanted - {c.name for c in candidates}
            if unknown:
                raise ValueError(f"{sorted(unknown)} are not candidate stitches of this family "
                                 f"(granularity {granularity!r}, directions {directions!r})")
            candidates = [c for c in candidates if c.name in wanted]
        self.configs: list[Config] = [Config(n, n) for n in names] + candidates
        self._by_name = {c.name: c for c in self.configs}
        chans = {n: stage_channels(net) for n, net in nets.items()}
        self.stitches = nn.ModuleDict({
            c.name: Stitch(chans[c.front][self.stage_of(c) - 1], chans[c.back][self.stage_of(c) - 1], stitch_bn)
            for c in self.configs if not c.is_anchor})
        self._blocks = {n: blocks(net) for n, net in nets.items()}
        self.bn_states: dict[str, dict[str, torch.Tensor]] = {}
        self.active: str | None = None

    # ---- configurations -----------------------------------------------------------------------------------------

    def config(self, cfg: Config | str) -> Config:
        if isinstance(cfg, Config):
            if cfg.name not in self._by_name:
                raise KeyError(f"{cfg} is not a configuration of this family")
            return cfg
        if cfg not in self._by_name:
            raise KeyError(f"unknown configuration {cfg!r}; this family has {len(self.configs)}: "
                           f"{', '.join(c.name for c in self.configs[:4])}, ...")
        return self._by_name[cfg]

    @property
    def stitch_configs(self) -> list[Config]:
        return [c for c in self.configs if not c.is_anchor]

    def stage_of(self, cfg: Config) -> int:
        """Stage whose activation the stitch maps (0 for an anchor)."""
        return 0 if cfg.is_anchor else block_stage(self.layout, cfg.point)

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, cfg: Config | str) -> torch.Tensor:
        """Logits (N, classes) of configuration ``cfg`` for images x (N, C, H, W)."""
        cfg = self.config(cfg)
        if cfg.is_anchor:
            return self.nets[cfg.front](x)  # timm's own forward: the stitched path must reproduce it
        h = run_stem(self.nets[cfg.front], x)
        for blk in self._blocks[cfg.front][: cfg.point]:
            h = blk(h)
        h = self.stitches[cfg.name](h)
        for blk in self._blocks[cfg.back][cfg.point:]:
            h = blk(h)
        return run_head(self.nets[cfg.back], h)

    def path_modules(self, cfg: Config | str) -> list[nn.Module]:
        """The modules a configuration runs, in order."""
        cfg = self.config(cfg)
        if cfg.is_anchor:
            return [self.nets[cfg.front]]
        return [*stem_modules(self.nets[cfg.front]), *self._blocks[cfg.front][: cfg.point], self.stitches[cfg.name],
                *self._blocks[cfg.back][cfg.point:], *head_modules(self.nets[cfg.back])]

    def num_params(self, cfg: Config | str) -> int:
        seen: dict[int, int] = {}
        for m in self.path_modules(cfg):
            for p in m.parameters():
                seen[id(p)] = p.numel()
        return sum(seen.values())

    def parameters_of(self, cfg: Config | str) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for m in self.path_modules(cfg):
            for p in m.parameters():
                seen[id(p)] = p
        return list(seen.values())

    # ---- per-configuration BatchNorm statistics ---------------------------------------------------------------

    def bn_layers(self, cfg: Config | str) -> dict[str, nn.modules.batchnorm._BatchNorm]:
        """BatchNorm modules a configuration runs, by qualified name."""
        names = {id(m): n for n, m in self.named_modules()}
        out = {}
        for top in self.path_modules(cfg):
            for m in top.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    out[names[id(m)]] = m
        return out

    @torch.no_grad()
    def save_bn(self, cfg: Config | str) -> None:
        """Store the current running statistics of ``cfg``'s BatchNorms as that configuration's own."""
        cfg = self.config(cfg)
        state = {}
        for q, m in self.bn_layers(cfg).items():
            state[f"{q}.running_mean"] = m.running_mean.detach().clone()
            state[f"{q}.running_var"] = m.running_var.detach().clone()
        self.bn_states[cfg.name] = state
        self.active = cfg.name

    @torch.no_grad()
    def activate(self, cfg: Config | str) -> Config:
        """Load ``cfg``'s own BatchNorm statistics (if it has any) into the shared modules; returns the config."""
        cfg = self.config(cfg)
        if self.active == cfg.name or cfg.name not in self.bn_states:
            return cfg
        layers = self.bn_layers(cfg)
        for key, value in self.bn_states[cfg.name].items():
            q, buf = key.rsplit(".", 1)
            getattr(layers[q], buf).copy_(value)
        self.active = cfg.name
        return cfg

    def bn_state_dict(self) -> dict[str, torch.Tensor]:
        """All stored per-configuration statistics as one flat dict ``{"<config>/<module>.<buffer>": tensor}``."""
        return {f"{c}/{k}": v for c, st in self.bn_states.items() for k, v in st.items()}

    def load_bn_state_dict(self, flat: Mapping[str, torch.Tensor]) -> None:
        states: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            c, k = key.split("/", 1)
            self.config(c)
            states.setdefault(c, {})[k] = value
        self.bn_states = states
        self.active = None


def build_family(anchors: list[AnchorConfig], granularity: str = "block", stitch_bn: bool = False,
                 directions: str = "both", stitches: Iterable[Config | str] | None = None) -> SeamFamily:
    """Both anchors (by short name, e.g. r34 and r50, cheaper first) and the stitches between them."""
    if len({a.name for a in anchors}) != len(anchors):
        raise ValueError(f"anchor names must differ, got {[a.name for a in anchors]}")
    return SeamFamily({a.name: build_anchor(a) for a in anchors}, granularity=granularity, stitch_bn=stitch_bn,
                      directions=directions, stitches=stitches)
