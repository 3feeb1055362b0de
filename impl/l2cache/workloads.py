"""l2cache's workloads as stored specs (``{"kind", "config"}``), so a later run rebuilds exactly what an earlier one
measured: the benches' and tests' fixed presets, the selection's candidates sized from the card, and the
weight-size sweep's ALBERT blocks.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from impl.l2cache.control import L2Limits
from impl.l2cache.nets import (CONV_PRESETS, MLP_PRESETS, ChainConfig, ChainMLP, ConvNetConfig, MLPConfig,
                               SharedConvNet, SharedMLP, chain_presets, hidden_for)
from impl.l2cache.ofa import OFA_PRESETS, OfaConfig, OfaServing


def spec_of(cfg: Any) -> dict:
    kind = {ChainConfig: "chain", MLPConfig: "mlp", ConvNetConfig: "conv", OfaConfig: "ofa"}[type(cfg)]
    return {"kind": kind, "config": asdict(cfg)}


def build(spec: dict, seed: int = 0) -> Any:
    cls = {"chain": (ChainConfig, ChainMLP), "mlp": (MLPConfig, SharedMLP), "conv": (ConvNetConfig, SharedConvNet),
           "ofa": (OfaConfig, OfaServing)}
    if spec.get("kind") not in cls:
        raise ValueError(f"unknown workload kind in spec {spec!r}")
    cfg_cls, wl_cls = cls[spec["kind"]]
    cfg = dict(spec["config"])
    if spec["kind"] == "ofa":
        cfg["subnets"] = tuple(cfg["subnets"])
    return wl_cls(cfg_cls(**cfg), seed=seed)


SMOKE_PRESETS: dict[str, Any] = {
    "mlp_tiny": MLPConfig("mlp_tiny", 32, 3, dtype="float32"),
    "conv_tiny": ConvNetConfig("conv_tiny", 8, 4, 2, dtype="float32"),
    "ofa_tiny": OfaConfig("ofa_tiny", resolution=32, model="mobilenetv3_small_050", num_classes=10, dtype="float32"),
    "ofa_tiny_noisy": OfaConfig("ofa_tiny_noisy", resolution=32, model="mobilenetv3_small_050", num_classes=10,
                                dtype="float32", noise_bytes=1 << 16),
}


def build_workload(name: str, seed: int = 0) -> Any:
    """A workload of a fixed preset (the benches' and tests' names)."""
    presets = {**MLP_PRESETS, **CONV_PRESETS, **OFA_PRESETS, **SMOKE_PRESETS}
    if name not in presets:
        raise KeyError(f"unknown workload {name!r}; one of {sorted(presets)}")
    return build(spec_of(presets[name]), seed)


def candidate_specs(limits: L2Limits, sms: int, smoke: bool) -> dict[str, dict]:
    """The selection's candidates, in the order they are measured (most promising first, in case time runs out)."""
    if smoke:
        chains = [ChainConfig("hybrid_tiny", 32, 2, own=1, dtype="float32"),
                  ChainConfig("stack_tiny", 32, 3, shared=False, noise_bytes=4096, dtype="float32")]
        return {c.name: spec_of(c) for c in (*chains, SMOKE_PRESETS["ofa_tiny_noisy"])}
    p = chain_presets(limits.max_persisting_bytes, limits.l2_bytes, sms)
    noise = 2 * limits.l2_bytes
    ofa = [OfaConfig("ofa_noisy", noise_bytes=noise), OfaConfig("ofa_noisy_r160", resolution=160, noise_bytes=noise)]
    order = [p["hybrid1"], p["mlp_big"], p["stack_noisy"], ofa[1], p["albert_noisy"], ofa[0], p["hybrid2"]]
    return {c.name: spec_of(c) for c in order}


def sweep_spec(frac: float, limits: L2Limits, smoke: bool) -> dict:
    if smoke:
        return spec_of(ChainConfig(f"albert_w{frac:g}", max(8, int(32 * frac)), 2, own=0, dtype="float32"))
    d = hidden_for(int(frac * limits.max_persisting_bytes))
    return spec_of(ChainConfig(f"albert_w{frac:g}", d, 12, own=0))
