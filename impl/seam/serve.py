"""Serving: load a trained family, pick the cheapest configuration that can promise a floor, classify images with it.

    server = SeamServer.from_checkpoint("/tmp/seam/checkpoint")   # family.safetensors, bn_states.safetensors, meta.json
    cfg = server.select(min_acc=0.92)                              # chosen on the validation split (impl.seam.select)
    labels = server.serve(images)                                  # (N, H, W) or (N, C, H, W), uint8 or float in [0, 1]

``serve`` refuses what the family was not trained on, naming the problem: another image size or channel count
(grayscale is repeated for an RGB family; colour into a grayscale family is refused), a dtype other than uint8 or
floating point, NaN or infinite pixels, floats outside [0, 1]. Non-native byte order is converted. A checkpoint is read
with safetensors (tensors only, no code) and checked against its ``meta.json``: a missing file, a shape or key that
does not match the family the meta describes, or a table naming an unknown configuration is refused.

CLI: ``python -m impl.seam.serve --ckpt DIR --min-acc 0.92 [--rank-by flops|latency_b1_ms|latency_b256_ms]
[--max-latency-ms 3] [--confidence 0.99] [--data DIR] [--limit N]`` selects, then serves the test split of ``--data``
and prints the choice, its accuracy and throughput; bad input exits with status 2 and one line saying why.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from impl.seam.data import preprocess
from impl.seam.family import Config, SeamFamily, build_family
from impl.seam.models import AnchorConfig
from impl.seam.select import FloorError, Promise, select
from impl.seam.train import autocast

CHECKPOINT_FILES = ("meta.json", "family.safetensors", "bn_states.safetensors")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing a file or does not match its own meta.json."""


def save_checkpoint(out: str | Path, family: SeamFamily, meta: dict[str, Any]) -> Path:
    """Write the family's weights, its per-configuration BatchNorm statistics and ``meta`` (json) under ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in family.state_dict().items()}
    save_file(weights, str(out / "family.safetensors"))
    save_file({k: v.contiguous().cpu() for k, v in family.bn_state_dict().items()}, str(out / "bn_states.safetensors"))
    meta = {**meta, "granularity": family.granularity, "directions": family.directions,
            "stitches": [c.name for c in family.stitch_configs]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder, checked for the keys a family needs."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a seam checkpoint folder (it does not exist or is a file)")
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete seam checkpoint: missing {', '.join(missing)}")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'meta.json'} is not valid JSON ({e})") from e
    need = {"anchors": list, "granularity": str, "data": dict, "table": list}
    bad = [k for k, t in need.items() if not isinstance(meta.get(k) if isinstance(meta, dict) else None, t)]
    if bad:
        raise CheckpointError(f"{path / 'meta.json'} lacks {', '.join(bad)} (or has the wrong type)")
    for k in ("mean", "std", "channels", "image_size"):
        if k not in meta["data"]:
            raise CheckpointError(f"{path / 'meta.json'}: data has no {k!r}")
    return meta


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[SeamFamily, dict[str, Any]]:
    """The family and meta saved by ``save_checkpoint``; ``CheckpointError`` when they do not fit together."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    try:
        anchors = [AnchorConfig(**{**a, "weights": None}) for a in meta["anchors"]]
        family = build_family(anchors, meta["granularity"], bool(meta.get("stitch_bn", False)),
                              meta.get("directions", "both"), meta.get("stitches"))
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'meta.json'} does not describe a family this code can build: {e}") from e
    try:
        weights = load_file(str(path / "family.safetensors"))
        bn = load_file(str(path / "bn_states.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors files ({e})") from e
    try:
        family.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path / 'family.safetensors'} does not match the family in meta.json: "
                              f"{' '.join(str(e).split())[:400]}") from e
    try:
        family.load_bn_state_dict(bn)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / 'bn_states.safetensors'} names something outside the family: {e}") from e
    family.to(device).eval()
    family.bn_states = {c: {k: v.to(device) for k, v in st.items()} for c, st in family.bn_states.items()}
    return family, meta


def as_images(images: Any, channels: int, image_size: int | None) -> torch.Tensor:
    """``images`` as a (N, C, H, W) tensor after the checks in the module docstring (input left untouched)."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        arr = np.asarray(images)
        if arr.dtype.kind not in "uif" or arr.dtype.hasobject:
            raise TypeError(f"images must be uint8 or floating point, got {arr.dtype}")
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype != np.uint8 and arr.dtype.kind != "f":
            raise TypeError(f"images must be uint8 or floating point, got {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    c, h, w = x.shape[1:]
    if c not in (channels, 1):
        raise ValueError(f"images have {c} channels; this family takes {channels}"
                         + (" (or 1, repeated)" if channels > 1 else ""))
    if image_size is not None and (h, w) != (image_size, image_size):
        raise ValueError(f"images are {h}x{w}; this family was trained and measured on {image_size}x{image_size} "
                         "(resize them first)")
    if x.is_floating_point() and x.numel():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"images contain {int((~torch.isfinite(x)).sum())} NaN or infinite pixel values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"floating-point images must lie in [0, 1] (uint8 for 0..255), got [{lo:g}, {hi:g}]")
    return x


class SeamServer:
    """Serve one configuration of a family, chosen by ``select`` from a table of measured configurations."""

    def __init__(self, family: SeamFamily, table: list[dict[str, Any]], mean: tuple[float, ...],
                 std: tuple[float, ...], channels: int, device: str, channels_last: bool = True,
                 image_size: int | None = None, promise: Promise = Promise()) -> None:
        self.family, self.table, self.device = family.eval(), table, device
        self.mean, self.std, self.channels, self.channels_last = tuple(mean), tuple(std), channels, channels_last
        self.image_size, self.promise = image_size, promise
        self.config: Config | None = None
        for r in table:
            try:
                family.config(r["name"])
            except (KeyError, TypeError) as e:
                raise CheckpointError(f"table row {r.get('name') if isinstance(r, dict) else r!r} is not a "
                                      f"configuration of this family") from e

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", promise: Promise | None = None) -> "SeamServer":
        family, meta = load_checkpoint(path, device)
        d = meta["data"]
        p = promise or Promise(**meta.get("promise", {}))
        return cls(family, meta["table"], d["mean"], d["std"], d["channels"], device, image_size=d["image_size"],
                   promise=p)

    def select(self, min_acc: float, max_latency_ms: float | None = None, rank_by: str = "flops",
               latency_key: str = "latency_b1_ms") -> Config:
        """Choose (and load) the cheapest configuration that can promise ``min_acc`` (``FloorError`` if none)."""
        row = select(self.table, min_acc, promise=self.promise, max_latency_ms=max_latency_ms, rank_by=rank_by,
                     latency_key=latency_key)
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
        x = as_images(images, self.channels, self.image_size)
        self.family.activate(self.config)
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = preprocess(x[i: i + batch_size].to(self.device), self.mean, self.std, self.channels,
                            self.channels_last)
            with autocast(self.device):
                out.append(self.family(xb, self.config).argmax(1).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m impl.seam.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir written by impl.seam.experiments (--out/checkpoint)")
    p.add_argument("--min-acc", type=float, required=True, help="accuracy floor, a fraction in [0, 1]")
    p.add_argument("--max-latency-ms", type=float, default=None, help="optional latency budget (ms)")
    p.add_argument("--latency-key", default="latency_b1_ms", help="which measured latency the budget applies to")
    p.add_argument("--rank-by", default="flops", help="flops, latency_b1_ms or latency_b256_ms")
    p.add_argument("--confidence", type=float, default=None, help="one-sided confidence of the promise "
                                                                   "(default: the checkpoint's)")
    p.add_argument("--data", default=None, help="data dir (Fashion-MNIST .gz or ImageFolder); serves its test split")
    p.add_argument("--limit", type=int, default=None, help="serve only the first N test images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        return run_cli(a)
    except (FloorError, CheckpointError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_cli(a: argparse.Namespace) -> int:
    from impl.seam.data import load_data

    from impl.seam.select import check_budget, check_floor

    check_floor(a.min_acc)
    check_budget(a.max_latency_ms)
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {a.limit}")
    server = SeamServer.from_checkpoint(a.ckpt, a.device)
    if a.confidence is not None:
        server.promise = Promise(a.confidence, server.promise.n_eval)
    cfg = server.select(a.min_acc, a.max_latency_ms, a.rank_by, a.latency_key)
    row = next(r for r in server.table if r["name"] == cfg.name)
    print(f"selected {cfg.name}: {row['flops'] / 1e9:.3f} GFLOPs, val acc {row['acc_val']:.4f}, "
          f"test acc {row.get('acc_test', float('nan')):.4f}")
    meta_data = read_meta(a.ckpt)["data"]
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
