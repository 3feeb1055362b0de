"""Anchor ablation: ResNet34 / ResNet50 trained alone under variants of the anchor recipe, one run per (variant,
arch, seed), to find what orders the anchors (the heavier network more accurate beyond the seed spread).

    python -m impl.seam.ablate [--variant NAME:key=value,key=value ...] [--archs resnet50 ...] [--seeds N]
                               [--data DIR] [--out DIR] [--smoke]

A variant overrides fields of the full preset's ``anchor_train`` (``train.TrainConfig``: ``lr``, ``weight_decay``,
``label_smoothing``, ``epochs``, ...) and of every arch's ``AnchorStart`` (``zero_init_last``, ``grad_clip``: ``none``
turns it off); ``base`` overrides nothing (each arch keeps its own start). Each run is the recipe's own anchor step
(``experiments.train_one_anchor``: seed 1000 x seed + the arch's index, the same time budget share), scored on the
validation and test splits. Written to ``OUT/ablation.json`` and, on a GPU, ``results/<gpu>/seam/ablation.json``;
a diagnostic: no claim reads it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impl import backend
from impl.common.log import logger
from impl.seam.data import load_data
from impl.seam.experiments import AnchorStart, Recipe, anchor_configs, preset, train_one_anchor
from impl.seam.train import TrainConfig

DEFAULT_VARIANTS = ("base", "wd5e-5:weight_decay=5e-5", "lr0.1:lr=0.1", "ls0:label_smoothing=0",
                    "unit-noclip:zero_init_last=false,grad_clip=none")
START_FIELDS = {f.name for f in dataclasses.fields(AnchorStart)}
KNOWN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} | START_FIELDS

log = logger("seam.ablate")


@dataclass(frozen=True)
class Variant:
    """A named set of overrides: ``train`` for ``TrainConfig`` fields and ``grad_clip``, ``zero_init_last`` for every
    arch's ``AnchorStart``."""

    name: str
    train: tuple[tuple[str, Any], ...] = ()
    zero_init_last: bool | None = None


def _value(key: str, text: str) -> Any:
    low = text.strip().lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text) if key in ("batch_size", "seed", "max_steps") else float(text)
    except ValueError:
        raise ValueError(f"variant value {key}={text!r} is not a number, true/false or none") from None


def parse_variant(text: str) -> Variant:
    """``NAME[:key=value,...]`` -> Variant; unknown keys are refused with the known ones named."""
    name, _, body = text.partition(":")
    if not name.strip():
        raise ValueError(f"variant {text!r} has no name (NAME:key=value,...)")
    train, zero = [], None
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"variant {name!r}: {item!r} is not key=value")
        if key == "zero_init_last":
            zero = _value(key, raw)
            if not isinstance(zero, bool):
                raise ValueError(f"variant {name!r}: zero_init_last must be true or false, got {raw!r}")
        elif key in KNOWN_KEYS:
            train.append((key, _value(key, raw)))
        else:
            raise ValueError(f"variant {name!r}: unknown key {key!r}; known: " + ", ".join(sorted(KNOWN_KEYS)))
    return Variant(name.strip(), tuple(train), zero)


def apply_variant(recipe: Recipe, v: Variant) -> Recipe:
    """A copy of ``recipe`` with ``v``'s overrides (the input is not modified)."""
    train = {k: x for k, x in v.train if k not in START_FIELDS}
    start = {k: x for k, x in v.train if k in START_FIELDS}
    if v.zero_init_last is not None:
        start["zero_init_last"] = v.zero_init_last
    starts = {a: dataclasses.replace(recipe.anchor_starts.get(a, AnchorStart()), **start) for a in recipe.archs}
    return dataclasses.replace(recipe, anchor_train=dataclasses.replace(recipe.anchor_train, **train),
                               anchor_starts=starts)


def run_one(recipe: Recipe, data, arch: str, seed: int, device: str, cl: bool) -> dict[str, Any]:
    """One anchor trained and scored by the recipe's own anchor step (``experiments.train_one_anchor``)."""
    i = recipe.archs.index(arch)
    _, st = train_one_anchor(recipe, data, anchor_configs(recipe, data, {})[i], i, seed, device, cl)
    return {"arch": arch, "seed": seed, "steps": st["steps"], "seconds": st["seconds"],
            "budget_bound": bool(st.get("budget_bound")), "planned_by_budget": bool(st.get("planned_by_budget")),
            "acc_val": st["acc_val"], "acc_test": st["acc_test"], "final_loss": (st.get("loss_curve") or [None])[-1]}


def ablate(recipe: Recipe, data, variants: list[Variant], archs: list[str], seeds: int, device: str,
           cl: bool, on_row=lambda rows: None) -> list[dict[str, Any]]:
    """Every (variant, seed, arch) run in that order; ``on_row(rows)`` after each (partial results survive a cut)."""
    rows = []
    for v in variants:
        r = apply_variant(recipe, v)
        for seed in range(seeds):
            for arch in archs:
                row = {"variant": v.name, "overrides": dict(v.train) | (
                    {} if v.zero_init_last is None else {"zero_init_last": v.zero_init_last}),
                    **run_one(r, data, arch, seed, device, cl)}
                log(f"{v.name:14s} {arch} seed {seed}: val {row['acc_val']:.4f} test {row['acc_test']:.4f} "
                    f"({row['steps']} steps, {row['seconds']:.1f} s)")
                rows.append(row)
                on_row(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.seam.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=None, help="NAME[:key=value,...] (repeatable)")
    p.add_argument("--archs", nargs="+", default=None, help="default: both anchors of the recipe")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default="/tmp/seam_ablation")
    p.add_argument("--smoke", action="store_true", help="the smoke preset (CPU-sized); writes only under --out")
    a = p.parse_args(argv)
    recipe = preset("smoke" if a.smoke else "full")
    try:
        variants = [parse_variant(t) for t in (a.variant or DEFAULT_VARIANTS)]
    except ValueError as e:
        p.error(str(e))
    archs = a.archs or list(recipe.archs)
    unknown = [x for x in archs if x not in recipe.archs]
    if unknown or a.seeds < 1:
        p.error(f"--archs must be among {recipe.archs} (got {unknown}) and --seeds >= 1 (got {a.seeds})")
    device = "cuda" if backend.ON_GPU else "cpu"
    data = load_data(a.data, device, val_size=recipe.val_size, seed=recipe.split_seed, image_size=recipe.image_size,
                     limits=recipe.limits)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict[str, Any]], complete: bool = False) -> dict[str, Any]:
        record = {"rows": rows, "anchor_train": dataclasses.asdict(recipe.anchor_train),
                  "anchor_starts": {a: dataclasses.asdict(st) for a, st in recipe.anchor_starts.items()},
                  "complete": complete}
        (out / "ablation.json").write_text(json.dumps(record, indent=1))
        return record

    record = save(ablate(recipe, data, variants, archs, a.seeds, device, device == "cuda", save), complete=True)
    if backend.ON_GPU and not a.smoke:
        from impl.common.results import write_result

        log(f"wrote {write_result('seam', 'ablation', record, overwrite=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
