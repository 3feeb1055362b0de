"""Serving: load a trained family, pick the lightest configuration meeting a constraint, classify images with it.

    server = SeamServer.from_checkpoint("/tmp/seam")       # family.safetensors, bn_states.safetensors, meta.json
    cfg = server.select(min_acc=0.92, max_latency_ms=None)  # chosen on the validation split's accuracies
    labels = server.serve(images)                           # uint8/float (N, H, W) or (N, C, H, W) -> int64 (N,)

CLI: ``python -m impl.seam.serve --ckpt DIR --min-acc 0.92 [--max-latency-ms 3] [--data DIR] [--limit N]`` selects,
then serves the test split of ``--data`` and prints the choice, its accuracy and throughput.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from impl.seam.data import preprocess
from impl.seam.family import Config, SeamFamily
from impl.seam.models import AnchorConfig, build_anchor
from impl.seam.select import select
from impl.seam.train import autocast


def build_family(anchors: list[AnchorConfig], granularity: str = "block", stitch_bn: bool = False) -> SeamFamily:
    """Both anchors (by short name, e.g. r34 and r50) and every stitch between them."""
    if len({a.name for a in anchors}) != len(anchors):
        raise ValueError(f"anchor names must differ, got {[a.name for a in anchors]}")
    return SeamFamily({a.name: build_anchor(a) for a in anchors}, granularity=granularity, stitch_bn=stitch_bn)


def save_checkpoint(out: str | Path, family: SeamFamily, meta: dict[str, Any]) -> Path:
    """Write the family's weights, its per-configuration BatchNorm statistics and ``meta`` (json) under ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in family.state_dict().items()}
    save_file(weights, str(out / "family.safetensors"))
    save_file({k: v.contiguous().cpu() for k, v in family.bn_state_dict().items()}, str(out / "bn_states.safetensors"))
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[SeamFamily, dict[str, Any]]:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not a seam checkpoint (no meta.json)")
    meta = json.loads((path / "meta.json").read_text())
    anchors = [AnchorConfig(**{**a, "weights": None}) for a in meta["anchors"]]
    family = build_family(anchors, meta["granularity"], meta["stitch_bn"])
    family.load_state_dict(load_file(str(path / "family.safetensors")))
    family.load_bn_state_dict(load_file(str(path / "bn_states.safetensors")))
    family.to(device).eval()
    family.bn_states = {c: {k: v.to(device) for k, v in st.items()} for c, st in family.bn_states.items()}
    return family, meta


class SeamServer:
    """Serve one configuration of a family, chosen by ``select`` from a table of measured configurations."""

    def __init__(self, family: SeamFamily, table: list[dict[str, Any]], mean: tuple[float, ...],
                 std: tuple[float, ...], channels: int, device: str, channels_last: bool = True) -> None:
        self.family, self.table, self.device = family.eval(), table, device
        self.mean, self.std, self.channels, self.channels_last = tuple(mean), tuple(std), channels, channels_last
        self.config: Config | None = None
        for r in table:
            family.config(r["name"])  # every row must name a configuration of this family

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> "SeamServer":
        family, meta = load_checkpoint(path, device)
        d = meta["data"]
        return cls(family, meta["table"], d["mean"], d["std"], d["channels"], device)

    def select(self, min_acc: float, max_latency_ms: float | None = None, acc_key: str = "acc_val",
               latency_key: str = "latency_b1_ms") -> Config:
        """Choose (and load) the lightest configuration with ``acc_key ≥ min_acc`` (and latency ≤ budget)."""
        row = select(self.table, min_acc, max_latency_ms, acc_key, latency_key)
        if row is None:
            best = max(r[acc_key] for r in self.table)
            raise ValueError(f"no configuration reaches {acc_key} >= {min_acc:.4f}"
                             + (f" within {max_latency_ms} ms" if max_latency_ms is not None else "")
                             + f"; the best has {best:.4f}")
        self.config = self.family.activate(row["name"])
        return self.config

    def use(self, cfg: Config | str) -> Config:
        self.config = self.family.activate(cfg)
        return self.config

    @torch.no_grad()
    def serve(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Class index (int64, shape (N,)) of each image; uint8 pixels are scaled by 1/255, floats taken as [0, 1]."""
        if self.config is None:
            raise RuntimeError("call select(min_acc) (or use(config)) before serve()")
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
        self.family.activate(self.config)
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = preprocess(x[i: i + batch_size].to(self.device), self.mean, self.std, self.channels,
                            self.channels_last)
            with autocast(self.device):
                out.append(self.family(xb, self.config).argmax(1).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.seam.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir written by impl.seam.experiments --out")
    p.add_argument("--min-acc", type=float, required=True, help="accuracy constraint on the validation split (0-1)")
    p.add_argument("--max-latency-ms", type=float, default=None, help="optional batch-1 latency budget")
    p.add_argument("--data", default=None, help="data dir (Fashion-MNIST .gz or ImageFolder); serves its test split")
    p.add_argument("--limit", type=int, default=None, help="serve only the first N test images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    from impl.seam.data import load_data

    server = SeamServer.from_checkpoint(a.ckpt, a.device)
    cfg = server.select(a.min_acc, a.max_latency_ms)
    row = next(r for r in server.table if r["name"] == cfg.name)
    print(f"selected {cfg.name}: {row['flops'] / 1e9:.3f} GFLOPs, val acc {row['acc_val']:.4f}, "
          f"test acc {row.get('acc_test', float('nan')):.4f}")
    meta_data = json.loads((Path(a.ckpt) / "meta.json").read_text())["data"]
    data = load_data(a.data, a.device, val_size=meta_data.get("val_size", 5000),
                     image_size=meta_data["image_size"], limits=(1, 1, a.limit))
    images = torch.cat([x for x, _ in data.test.batches(1024)])
    labels = torch.cat([y for _, y in data.test.batches(1024)]).cpu().numpy()
    t0 = time.perf_counter()
    pred = server.serve(images)
    dt = time.perf_counter() - t0
    print(f"served {len(pred)} images in {dt:.3f} s ({len(pred) / max(dt, 1e-9):.0f} img/s); "
          f"accuracy {float((pred == labels).mean()):.4f}")
    print(json.dumps({"config": asdict(cfg), "n": len(pred), "accuracy": float((pred == labels).mean())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
