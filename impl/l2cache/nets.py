"""Weight-shared networks built from the Triton kernels: an ALBERT-style MLP, a conv net reusing one block, and
chains that mix a shared block with per-layer weights.

SharedMLP:      h₀ = x [B, d];  h_{l+1} = ReLU(h_l · Wᵀ + b) for l < L, with ONE W [d, d] and b [d] for all layers.
SharedConvNet:  h₀ = x [B, C, S, S];  h_{l+1} = ReLU(conv3x3(h_l, W, pad 1) + b + h_l), ONE W [C, C, k, k].
ChainMLP:       batch 1, GEMV layers in a schedule of a shared W and per-layer U_l (``ChainConfig``).

At batch 1 each layer streams all of W once, so a request reads W·L bytes while the model holds W bytes: the reuse
that an L2 policy can exploit. The fixed presets size W at ~16 MB (fits a 32.77 MB persisting carve-out and a
50 MiB L2), ~32 MB (about that carve-out) and ~64 MB (fits neither: under LRU every layer re-reads W from DRAM; a
persisting window keeps carve-out/W of it); ``chain_presets`` sizes the chains from the card at hand. Weights live in one ``Arena`` (one window covers them), activations in
another (ping-pong buffers plus the split-K workspace), so both have a span a policy can target. Both nets follow
the ``Workload`` interface of ``serving.py``; they serve one request kind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from impl import backend
from impl.l2cache.arena import Arena, ArenaBacked, Span
from impl.l2cache.conv import conv2d, conv2d_reference, pick_split_k
from impl.l2cache.linear import linear, linear_reference
from impl.l2cache.policies import NO_HOOKS, LayerHooks

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class MLPConfig:
    name: str
    hidden: int
    layers: int
    batch: int = 1
    dtype: str = "float16"

    @property
    def weight_bytes(self) -> int:
        return (self.hidden * self.hidden + self.hidden) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class ConvNetConfig:
    name: str
    channels: int
    size: int
    layers: int
    kernel: int = 3
    batch: int = 1
    dtype: str = "float16"

    @property
    def weight_bytes(self) -> int:
        c, k = self.channels, self.kernel
        return (c * c * k * k + c) * np.dtype(self.dtype).itemsize


MLP_PRESETS = {c.name: c for c in (MLPConfig("mlp_16mb", 2880, 24), MLPConfig("mlp_32mb", 4096, 16),
                                   MLPConfig("mlp_64mb", 5760, 12))}
CONV_PRESETS = {c.name: c for c in (ConvNetConfig("conv_16mb", 960, 8, 16), ConvNetConfig("conv_64mb", 1920, 8, 6))}


def mlp_for_bytes(nbytes: int, layers: int = 12, dtype: str = "float16") -> MLPConfig:
    """An MLP whose W holds about ``nbytes`` (hidden rounded to a multiple of 64), for weight-size sweeps."""
    d = max(64, int(round(math.sqrt(nbytes / np.dtype(dtype).itemsize) / 64)) * 64)
    return MLPConfig(f"mlp_{nbytes // 2**20}mib", d, layers, dtype=dtype)


def _randn(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


class SharedBlockNet(ArenaBacked):
    """One weight block reused by all ``cfg.layers`` layers: every layer's weights are the same span, one request
    kind, nothing to do between requests."""

    kinds = 1
    sharing = "layers"

    def layer_spans(self, kind: int = 0) -> list[Span]:
        return [self.weights.span()] * self.cfg.layers

    def between_requests(self) -> None:
        pass


class SharedMLP(SharedBlockNet):
    """ALBERT-style MLP: one weight matrix applied L times (see the module doc)."""

    in_kernel_prefetch = True

    def __init__(self, cfg: MLPConfig, device: str = backend.DEVICE, seed: int = 0) -> None:
        self.cfg, self.name = cfg, cfg.name
        dt, d = TORCH_DTYPES[cfg.dtype], cfg.hidden
        gen = torch.Generator().manual_seed(seed)
        # He initialisation keeps the ReLU activations' scale roughly constant over the layers
        self.weights = Arena.from_tensors({"w": _randn((d, d), math.sqrt(2.0 / d), gen),
                                           "b": _randn((d,), 0.01, gen)}, device, dt)
        self.acts = Arena({"x": ((cfg.batch, d), dt), "h0": ((cfg.batch, d), dt), "h1": ((cfg.batch, d), dt)}, device)
        self.acts["x"].copy_(_randn((cfg.batch, d), 1.0, gen).to(dt))

    def forward(self, kind: int = 0, hooks: LayerHooks = NO_HOOKS) -> torch.Tensor:
        src = self.acts["x"]
        for i in range(self.cfg.layers):
            hooks.before_layer(i)
            dst = self.acts["h0" if i % 2 == 0 else "h1"]
            linear(src, self.weights["w"], self.weights["b"], relu=True, out=dst, prefetch=hooks.kernel_prefetch(i))
            src = dst
        hooks.finish()
        return src

    def reference(self) -> np.ndarray:
        h = self.acts["x"]
        for _ in range(self.cfg.layers):
            h = linear_reference(h, self.weights["w"], self.weights["b"], relu=True)
        return h

    def bytes_per_request(self) -> int:
        c = self.cfg
        return c.layers * (self.weight_bytes + 2 * c.batch * c.hidden * np.dtype(c.dtype).itemsize)

    def flops_per_request(self) -> int:
        return 2 * self.cfg.layers * self.cfg.batch * self.cfg.hidden ** 2

    def info(self) -> dict:
        return {"kind": "mlp", "hidden": self.cfg.hidden, "layers": self.cfg.layers, "dtype": self.cfg.dtype,
                "weight_bytes": self.weight_bytes}


class SharedConvNet(SharedBlockNet):
    """A conv net reusing one residual 3x3 block L times (see the module doc)."""

    def __init__(self, cfg: ConvNetConfig, device: str = backend.DEVICE, seed: int = 0) -> None:
        self.cfg, self.name = cfg, cfg.name
        dt, c, k, s = TORCH_DTYPES[cfg.dtype], cfg.channels, cfg.kernel, cfg.size
        gen = torch.Generator().manual_seed(seed)
        fan_in = c * k * k
        # small weights: the residual path carries the signal, the block adds a bounded correction
        self.weights = Arena.from_tensors({"w": _randn((c, c, k, k), 0.5 / math.sqrt(fan_in), gen),
                                           "b": _randn((c,), 0.01, gen)}, device, dt)
        m = cfg.batch * s * s
        self.split_k = pick_split_k(m, c, fan_in) if backend.ON_GPU else min(2, max(1, fan_in // 128))
        shape = (cfg.batch, c, s, s)
        self.acts = Arena({"x": (shape, dt), "h0": (shape, dt), "h1": (shape, dt),
                           "ws": ((self.split_k * m * c,), torch.float32)}, device)
        self.acts["x"].copy_(_randn(shape, 1.0, gen).to(dt))

    def forward(self, kind: int = 0, hooks: LayerHooks = NO_HOOKS) -> torch.Tensor:
        src, pad = self.acts["x"], self.cfg.kernel // 2
        for i in range(self.cfg.layers):
            hooks.before_layer(i)
            dst = self.acts["h0" if i % 2 == 0 else "h1"]
            conv2d(src, self.weights["w"], self.weights["b"], padding=pad, residual=src, relu=True, out=dst,
                   split_k=self.split_k, workspace=self.acts["ws"])
            src = dst
        hooks.finish()
        return src

    def reference(self) -> np.ndarray:
        h, pad = self.acts["x"], self.cfg.kernel // 2
        for _ in range(self.cfg.layers):
            h = conv2d_reference(h, self.weights["w"], self.weights["b"], padding=pad, residual=h, relu=True)
        return h

    def bytes_per_request(self) -> int:
        c = self.cfg
        act = c.batch * c.channels * c.size * c.size * np.dtype(c.dtype).itemsize
        return c.layers * (self.weight_bytes + 3 * act)

    def flops_per_request(self) -> int:
        c = self.cfg
        return 2 * c.layers * c.batch * c.size * c.size * c.channels ** 2 * c.kernel ** 2

    def info(self) -> dict:
        c = self.cfg
        return {"kind": "conv", "channels": c.channels, "size": c.size, "layers": c.layers, "kernel": c.kernel,
                "dtype": c.dtype, "weight_bytes": self.weight_bytes, "split_k": self.split_k}


# ---- chains with their own weights per layer ------------------------------------------------------------------

@dataclass(frozen=True)
class ChainConfig:
    """A batch-1 chain of GEMV layers h ← ReLU(M·h + c) over width ``hidden``, the matrices M in this order:

      shared, own = k   layer l applies the one shared W, then its own U_l1 … U_lk: W, U_01, W, U_11, …
                        (k = 0: ALBERT, W alone L times)
      not shared        layer l applies its own U_l1 … U_lk only; nothing is re-read within a request, the next
                        request re-reads it all

    ``noise_bytes``: bytes written between requests (other tenants' traffic; it evicts what does not persist)."""

    name: str
    hidden: int
    layers: int
    own: int = 1
    shared: bool = True
    noise_bytes: int = 0
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.layers < 1 or self.own < 0 or (self.own == 0 and not self.shared):
            raise ValueError(f"{self.name}: needs hidden >= 1, layers >= 1 and at least one matrix per layer")

    @property
    def matrix_bytes(self) -> int:
        return (self.hidden * self.hidden + self.hidden) * np.dtype(self.dtype).itemsize


def hidden_for(nbytes: int, dtype: str = "float16", multiple: int = 64, most: int | None = None) -> int:
    """The largest width d (a multiple of ``multiple``, at most ``most``) whose d×d matrix holds <= ``nbytes``."""
    d = int(math.sqrt(nbytes / np.dtype(dtype).itemsize)) // multiple * multiple
    d = min(d, most) if most else d
    if d < multiple:
        raise ValueError(f"{nbytes} B is too small for a {multiple}-wide matrix")
    return d


class ChainMLP(ArenaBacked):
    """The chain of ``ChainConfig`` (see there): weights in one arena, ping-pong activations in another."""

    kinds = 1
    in_kernel_prefetch = True

    def __init__(self, cfg: ChainConfig, device: str = backend.DEVICE, seed: int = 0) -> None:
        self.cfg, self.name = cfg, cfg.name
        self.sharing = "layers" if cfg.shared else "requests"
        dt, d = TORCH_DTYPES[cfg.dtype], cfg.hidden
        gen = torch.Generator(device=device).manual_seed(seed)
        own = [(f"u{l}_{j}", f"c{l}_{j}") for l in range(cfg.layers) for j in range(cfg.own)]
        names = ([("w", "b")] if cfg.shared else []) + own
        # He initialisation, drawn on the device (hundreds of MB of weights): ReLU activations keep their scale
        self.weights = Arena({n: s for m, c in names for n, s in ((m, ((d, d), dt)), (c, ((d,), dt)))}, device)
        for m, c in names:
            self.weights[m].copy_(torch.randn((d, d), generator=gen, device=device) * math.sqrt(2.0 / d))
            self.weights[c].copy_(torch.randn((d,), generator=gen, device=device) * 0.01)
        per_layer = ([("w", "b")] if cfg.shared else []) + [(f"u{{l}}_{j}", f"c{{l}}_{j}") for j in range(cfg.own)]
        self.schedule = [(m.format(l=l), c.format(l=l)) for l in range(cfg.layers) for m, c in per_layer]
        self.acts = Arena({"x": ((1, d), dt), "h0": ((1, d), dt), "h1": ((1, d), dt)}, device)
        self.acts["x"].copy_(torch.randn((1, d), generator=gen, device=device).to(dt))
        self.noise = torch.empty(cfg.noise_bytes // 4, dtype=torch.float32, device=device) if cfg.noise_bytes else None

    def persist_span(self) -> Span:
        return self.weights.span(["w", "b"]) if self.cfg.shared else self.weights.span()

    def layer_spans(self, kind: int = 0) -> list[Span]:
        return [self.weights.span([m, c]) for m, c in self.schedule]

    def forward(self, kind: int = 0, hooks: LayerHooks = NO_HOOKS) -> torch.Tensor:
        src = self.acts["x"]
        for i, (m, c) in enumerate(self.schedule):
            hooks.before_layer(i)
            dst = self.acts["h0" if i % 2 == 0 else "h1"]
            linear(src, self.weights[m], self.weights[c], relu=True, out=dst, prefetch=hooks.kernel_prefetch(i))
            src = dst
        hooks.finish()
        return src

    def reference(self) -> np.ndarray:
        h = self.acts["x"]
        for m, c in self.schedule:
            h = linear_reference(h, self.weights[m], self.weights[c], relu=True)
        return h

    def between_requests(self) -> None:
        if self.noise is not None:
            self.noise.fill_(1.0)  # other tenants' writes: they evict whatever is not persisting

    def bytes_per_request(self) -> int:
        return len(self.schedule) * (self.cfg.matrix_bytes + 2 * self.cfg.hidden * np.dtype(self.cfg.dtype).itemsize)

    def flops_per_request(self) -> int:
        return 2 * len(self.schedule) * self.cfg.hidden ** 2

    def info(self) -> dict:
        c = self.cfg
        return {"kind": "chain", "hidden": c.hidden, "layers": c.layers, "own": c.own, "shared": c.shared,
                "noise_bytes": c.noise_bytes, "dtype": c.dtype, "weight_bytes": self.weight_bytes,
                "persist_bytes": self.persist_span().nbytes, "kernels_per_request": len(self.schedule),
                "sharing": self.sharing}


def chain_presets(max_persisting: int, l2_bytes: int, sms: int = 132) -> dict[str, ChainConfig]:
    """Chains sized from the card: W about 0.9 of the largest carve-out (it fits; a persisting window keeps all of
    it), width capped so one GEMV's programs (8 rows each) all fit on the SMs at once (4 per SM), noise twice L2.

      albert_noisy  ALBERT block W applied 4 times; noise between requests evicts W under the default policy
      hybrid1       W then one own matrix per layer, 6 layers: each layer streams W + U (> L2), evicting W
      hybrid2       W then two own matrices per layer, 4 layers
      stack_noisy   12 layers of own matrices, 0.9 carve-out in all; noise between requests (nothing shared within
                    a request: the prefetch candidates' workload)
      mlp_big       ALBERT W of 1.7 carve-outs applied 12 times (fits neither the carve-out nor L2)
    """
    most = 8 * 4 * sms
    d = hidden_for(int(0.9 * max_persisting), most=most)
    big = hidden_for(int(1.7 * max_persisting))
    small = hidden_for(int(0.9 * max_persisting / 12), most=most)
    noise = 2 * l2_bytes
    return {c.name: c for c in (
        ChainConfig("albert_noisy", d, 4, own=0, noise_bytes=noise),
        ChainConfig("hybrid1", d, 6, own=1),
        ChainConfig("hybrid2", d, 4, own=2),
        ChainConfig("stack_noisy", small, 12, shared=False, noise_bytes=noise),
        ChainConfig("mlp_big", big, 12, own=0))}
