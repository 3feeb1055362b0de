"""The whole seam recipe on one GPU: ``python -m impl.seam.experiments [--quick] [--data DIR] [--out DIR]``.

1. load Fashion-MNIST (or an ImageFolder tree): train 55,000 / val 5,000 (held out, seeded) / test 10,000;
2. train ResNet34 and ResNet50 (small-image stems) alone: ``anchor_epochs`` each, SGD, bf16, channels_last;
3. initialise every stitch by least squares on 100 training images; measure these stitches (anchors' BN statistics);
4. fine-tune the whole family for ``family_epochs``, one configuration sampled per step (anchors included);
5. re-estimate BatchNorm statistics per configuration (2,048 training images), then per configuration: val and test
   accuracy, FLOPs, parameters, latency at batch 1 and 64;
6. interpolation fraction (rule in ``impl.seam.measure``), selector vs anchor-only baseline over a sweep of
   accuracy constraints (and one with a latency budget), a serving demo;
7. ``write_result("seam", ...)``: configs, interpolation, selector, training; the family checkpoint and the plots go
   to ``--out``.

Presets: ``full`` (default; 5 + 5 anchor epochs, 6 family epochs, sized to fit 5 minutes on an H100 with margin),
``quick`` (2 + 2, 2), ``smoke`` (CPU: channels / 4, 16x16 images, a few hundred images, a few steps; writes nothing to
results/). Every training phase also has a time budget (fractions of ``--budget-s``) that anneals the schedule by
time if the card is slower than planned; the results say whether it bound.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from impl import backend
from impl.seam.data import DataBundle, load_data, preprocess
from impl.seam.family import SeamFamily
from impl.seam.lstsq import init_stitches
from impl.seam.measure import InterpolationRule, accuracy, calibrate_bn, count_flops, interpolation_summary, \
    latency_ms
from impl.seam.models import AnchorConfig
from impl.seam.plots import plot_accuracy_vs_flops, plot_selector_sweep
from impl.seam.select import constraint_grid, summarize, sweep
from impl.seam.serve import SeamServer, build_family, save_checkpoint
from impl.seam.train import CollapseError, TrainConfig, finetune_family, train_anchor


@dataclass
class Recipe:
    """Every knob of one run."""

    archs: tuple[str, str] = ("resnet34", "resnet50")
    granularity: str = "block"
    stitch_bn: bool = False
    width_div: int = 1
    image_size: int | None = None        # None: the data's own (28 for Fashion-MNIST)
    val_size: int = 5000
    limits: tuple[int, int, int] | None = None
    anchor_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.4, warmup_frac=0.15))
    family_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=6, lr=0.05, warmup_frac=0.05,
                                                                          seed=1, grad_clip=2.0))
    lstsq_images: int = 100
    calib_images: int = 2048
    ablation_images: int = 2000          # test images for the lstsq-only and shared-BN accuracies
    eval_batch: int = 1000
    latency_batches: tuple[int, int] = (1, 64)
    latency_warmup: int = 5
    latency_reps: int = 30
    budget_s: float = 300.0
    anchor_budget_frac: float = 0.17     # of budget_s, per anchor
    family_budget_frac: float = 0.22
    tol: float = 0.0025
    seed: int = 0


def preset(name: str) -> Recipe:
    r = Recipe()
    if name == "quick":
        r.anchor_train.epochs, r.family_train.epochs, r.latency_reps = 2, 2, 10
    elif name == "smoke":
        r.width_div, r.image_size, r.limits = 4, 16, (256, 64, 64)
        r.anchor_train = TrainConfig(epochs=1, batch_size=32, lr=0.05, max_steps=2)
        r.family_train = TrainConfig(epochs=1, batch_size=32, lr=0.01, max_steps=3, seed=1, grad_clip=2.0)
        r.lstsq_images, r.calib_images, r.ablation_images, r.eval_batch = 8, 32, 32, 64
        r.latency_batches, r.latency_warmup, r.latency_reps = (1, 2), 0, 1
    elif name != "full":
        raise ValueError(f"unknown preset {name!r}: full, quick or smoke")
    return r


def log(msg: str) -> None:
    print(f"[seam {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def anchor_configs(recipe: Recipe, data: DataBundle, weights: dict[str, str | None]) -> list[AnchorConfig]:
    small = data.image_size <= 64
    return [AnchorConfig(arch=a, num_classes=data.num_classes, in_chans=data.channels, small_stem=small,
                         width_div=recipe.width_div, weights=weights.get(a)) for a in recipe.archs]


def first_images(split: Any, n: int, data: DataBundle, channels_last: bool) -> torch.Tensor:
    got, seen = [], 0
    for x, _ in split.batches(min(n, 1000)):
        got.append(x[: n - seen])
        seen += got[-1].shape[0]
        if seen >= n:
            break
    return preprocess(torch.cat(got), data.mean, data.std, None, channels_last)


def recalibrate_all(family: SeamFamily, data: DataBundle, recipe: Recipe, device: str, cl: bool) -> float:
    """Per-configuration BatchNorm statistics for every configuration; returns the seconds taken."""
    t0 = time.perf_counter()
    for cfg in family.configs:
        calibrate_bn(family, cfg, data.train, data, device, recipe.calib_images, channels_last=cl)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_configs(family: SeamFamily, data: DataBundle, recipe: Recipe, device: str, cl: bool) -> list[dict]:
    """Accuracy (val, test), FLOPs, params and latency for every configuration."""
    shape = (data.channels, data.image_size, data.image_size)
    rows = []
    for cfg in family.configs:
        row = {"name": cfg.name, "front": cfg.front, "back": cfg.back, "point": cfg.point,
               "stage": family.stage_of(cfg), "is_anchor": cfg.is_anchor,
               "acc_val": accuracy(family, cfg, data.val, data, device, recipe.eval_batch, cl),
               "acc_test": accuracy(family, cfg, data.test, data, device, recipe.eval_batch, cl),
               "flops": count_flops(family, cfg, shape, device), "params": family.num_params(cfg)}
        for b in recipe.latency_batches:
            row[f"latency_b{b}_ms"] = latency_ms(family, cfg, b, shape, device, recipe.latency_warmup,
                                                 recipe.latency_reps, cl)
        rows.append(row)
        log(f"{cfg.name:>18}: test {row['acc_test']:.4f} val {row['acc_val']:.4f} "
            f"{row['flops'] / 1e9:.3f} GFLOPs {row['params'] / 1e6:.2f} M params "
            + " ".join(f"b{b} {row[f'latency_b{b}_ms']:.3f} ms" for b in recipe.latency_batches))
    return rows


def check_anchors_survived(before: dict[str, float], rows: list[dict], num_classes: int) -> None:
    """Raise ``CollapseError`` if an anchor that was above twice chance before the family fine-tune (``before``: name
    -> val accuracy) is below it after (``rows``): the family collapsed and none of its numbers may be written."""
    floor = 2.0 / num_classes
    after = {r["name"]: r["acc_val"] for r in rows if r["is_anchor"]}
    fell = {n: (before[n], after[n]) for n in before if before[n] >= floor and after[n] < floor}
    if fell:
        raise CollapseError("family fine-tune collapsed: anchor val accuracy before -> after "
                            + ", ".join(f"{n} {a:.4f} -> {b:.4f}" for n, (a, b) in fell.items())
                            + f" (below 2x chance = {floor:.4f}); no results written")


def ablation_accuracy(family: SeamFamily, data: DataBundle, recipe: Recipe, device: str, cl: bool) -> dict:
    """Accuracy of each configuration on the first ``ablation_images`` test images with the BN statistics in the
    modules now (no per-configuration statistics)."""
    subset = data.test.head(recipe.ablation_images)
    saved, family.bn_states = family.bn_states, {}
    try:
        return {c.name: accuracy(family, c, subset, data, device, recipe.eval_batch, cl) for c in family.configs}
    finally:
        family.bn_states = saved


def selector_study(rows: list[dict], family: SeamFamily, data: DataBundle, device: str, lat_key: str) -> dict:
    """Sweep of accuracy constraints (and the same with a latency budget: the anchors' mean ``lat_key``)."""
    grid = constraint_grid(rows)
    sw = sweep(rows, grid)
    anchors = [r for r in rows if r["is_anchor"]]
    budget = sum(r[lat_key] for r in anchors) / len(anchors)
    sw_lat = sweep(rows, grid, max_latency_ms=budget, latency_key=lat_key)
    # serving demo: the constraint halfway between the anchors' validation accuracies
    mid = sum(r["acc_val"] for r in anchors) / 2
    server = SeamServer(family, rows, data.mean, data.std, data.channels, device)
    cfg = server.select(mid)
    images = torch.cat([x for x, _ in data.test.batches(1000)])
    labels = torch.cat([y for _, y in data.test.batches(1000)]).cpu().numpy()
    t0 = time.perf_counter()
    pred = server.serve(images, batch_size=1000)
    served_s = time.perf_counter() - t0
    return {"sweep": sw, "summary": summarize(sw), "constraints": grid,
            "latency_budget": {"latency_key": lat_key, "max_latency_ms": budget,
                               "sweep": sw_lat, "summary": summarize(sw_lat)},
            "demo": {"min_acc": mid, "selected": cfg.name, "test_accuracy": float((pred == labels).mean()),
                     "images": int(len(pred)), "seconds": served_s}}


def run(recipe: Recipe, data_dir: str | None, out: Path, write: bool, weights: dict[str, str | None]) -> dict:
    t_start = time.perf_counter()
    device = "cuda" if backend.ON_GPU else "cpu"
    cl = device == "cuda"
    torch.manual_seed(recipe.seed)
    data = load_data(data_dir, device, val_size=recipe.val_size, seed=recipe.seed, image_size=recipe.image_size,
                     limits=recipe.limits)
    log(f"data {data.kind} from {data.source}: train {len(data.train)} val {len(data.val)} test {len(data.test)}, "
        f"{data.channels}x{data.image_size}x{data.image_size}, {data.num_classes} classes, device {device}")
    anchors = anchor_configs(recipe, data, weights)
    family = build_family(anchors, recipe.granularity, recipe.stitch_bn).to(device)
    if cl:
        family = family.to(memory_format=torch.channels_last)
    log(f"family: {len(family.configs)} configurations ({len(family.stitch_configs)} stitches at points "
        f"{family.points}, granularity {recipe.granularity})")
    training: dict[str, Any] = {"anchors": {}}

    for a in anchors:
        tc = dataclasses.replace(recipe.anchor_train, time_budget_s=recipe.anchor_budget_frac * recipe.budget_s)
        st = train_anchor(family, a.name, data, tc, device, cl) if tc.epochs > 0 else {"seconds": 0.0, "steps": 0}
        st["acc_val"] = accuracy(family, a.name, data.val, data, device, recipe.eval_batch, cl)
        st["acc_test"] = accuracy(family, a.name, data.test, data, device, recipe.eval_batch, cl)
        training["anchors"][a.name] = st
        log(f"anchor {a.name}: {st['steps']} steps in {st['seconds']:.1f} s, val {st['acc_val']:.4f} "
            f"test {st['acc_test']:.4f}")

    t0 = time.perf_counter()
    lstsq_report = init_stitches(family, first_images(data.train, recipe.lstsq_images, data, cl))
    training["lstsq"] = {"seconds": time.perf_counter() - t0, "images": recipe.lstsq_images, "per_stitch": lstsq_report}
    log(f"least-squares init of {len(lstsq_report)} stitches in {training['lstsq']['seconds']:.1f} s")
    acc_lstsq = ablation_accuracy(family, data, recipe, device, cl)

    tc = dataclasses.replace(recipe.family_train, time_budget_s=recipe.family_budget_frac * recipe.budget_s)
    training["family"] = finetune_family(family, data, tc, device, cl)
    log(f"family fine-tune: {training['family']['steps']} steps in {training['family']['seconds']:.1f} s")
    acc_shared = ablation_accuracy(family, data, recipe, device, cl)

    training["bn_calibration_s"] = recalibrate_all(family, data, recipe, device, cl)
    training["training_s"] = (sum(a["seconds"] for a in training["anchors"].values()) + training["lstsq"]["seconds"]
                              + training["family"]["seconds"] + training["bn_calibration_s"])
    t0 = time.perf_counter()
    rows = measure_configs(family, data, recipe, device, cl)
    check_anchors_survived({n: a["acc_val"] for n, a in training["anchors"].items()}, rows, data.num_classes)
    for r in rows:
        r["acc_lstsq_only"] = None if r["is_anchor"] else acc_lstsq[r["name"]]
        r["acc_shared_bn"] = acc_shared[r["name"]]
    training["measure_s"] = time.perf_counter() - t0
    interp = interpolation_summary(rows, "acc_test", InterpolationRule(recipe.tol))
    interp_val = interpolation_summary(rows, "acc_val", InterpolationRule(recipe.tol))
    selector = selector_study(rows, family, data, device, f"latency_b{recipe.latency_batches[-1]}_ms")
    training["recipe_total_s"] = time.perf_counter() - t_start
    training["recipe"] = asdict(recipe)
    log(f"interpolation: {interp['interpolating']}/{interp['stitches']} = {interp['percent']:.2f} % "
        f"(uncapped {interp['percent_uncapped']:.2f} %), reasons {interp['reasons']}")
    log(f"selector: lighter-or-equal {selector['summary']['percent_lighter_or_equal']:.1f} %, strictly lighter "
        f"{selector['summary']['percent_strictly_lighter']:.1f} % of {selector['summary']['baseline_feasible']} "
        f"constraints; demo {selector['demo']}")
    configs = {"rows": rows, "image_shape": [data.channels, data.image_size, data.image_size],
               "anchors": [asdict(a) for a in anchors], "granularity": recipe.granularity,
               "data": {"kind": data.kind, "source": data.source, "train": len(data.train), "val": len(data.val),
                        "test": len(data.test)},
               "notes": "acc_* are fractions; flops per image (2 per MAC, conv+matmul only); latency in ms "
                        "(CUDA events, L2 flushed, bf16 autocast, channels_last); acc_lstsq_only and acc_shared_bn on "
                        f"the first {recipe.ablation_images} test images"}
    interp["on_val"] = {k: interp_val[k] for k in ("interpolating", "fraction", "percent", "reasons")}
    results = {"configs": configs, "interpolation": interp, "selector": selector, "training": training}

    out.mkdir(parents=True, exist_ok=True)
    meta = {"anchors": [asdict(a) for a in anchors], "granularity": recipe.granularity, "stitch_bn": recipe.stitch_bn,
            "data": {"mean": data.mean, "std": data.std, "channels": data.channels, "image_size": data.image_size,
                     "num_classes": data.num_classes, "kind": data.kind, "val_size": recipe.val_size,
                     "source": data.source},
            "table": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if write:
        from impl.common.results import write_result

        for name, data_ in results.items():
            log(f"wrote {write_result('seam', name, data_, overwrite=True)}")
    save_checkpoint(out / "checkpoint", family, meta)
    try:
        plot_accuracy_vs_flops(configs, interp, out / "seam_acc_vs_flops.png")
        plot_selector_sweep(selector, out / "seam_selector.png")
    except ImportError as e:  # the report draws the same plots from results/ where matplotlib exists
        log(f"plots skipped: {e}")
    log(f"done in {training['recipe_total_s']:.1f} s (training {training['training_s']:.1f} s); checkpoint, plots "
        f"and results.json in {out}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.seam.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2+2 anchor epochs, 2 family epochs")
    mode.add_argument("--smoke", action="store_true", help="tiny CPU run of every step; writes nothing to results/")
    mode.add_argument("--prepare", action="store_true", help="copy the Fashion-MNIST .gz files into "
                                                              ".carry/seam/fashion-mnist (to carry to a GPU machine)")
    p.add_argument("--data", default=None, help="Fashion-MNIST .gz dir or ImageFolder root (default $SEAM_DATA, "
                                                "/usr/share/datasets/fashion-mnist or .carry/seam/fashion-mnist)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "seam"), help="checkpoint/plot dir")
    p.add_argument("--granularity", choices=("block", "stage"), default=None)
    p.add_argument("--stitch-bn", action="store_true", help="BatchNorm after each stitch conv")
    p.add_argument("--anchor-epochs", type=float, default=None)
    p.add_argument("--family-epochs", type=float, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="time budget of the whole recipe (default 300)")
    p.add_argument("--weights-r34", default=None, help="local pretrained weights for resnet34 (ImageNet setting)")
    p.add_argument("--weights-r50", default=None, help="local pretrained weights for resnet50")
    a = p.parse_args(argv)
    if a.prepare:
        from impl.seam.data import prepare_carry

        log(f"Fashion-MNIST copied to {prepare_carry()}")
        return 0
    recipe = preset("smoke" if a.smoke else "quick" if a.quick else "full")
    if a.granularity:
        recipe.granularity = a.granularity
    recipe.stitch_bn = a.stitch_bn
    if a.anchor_epochs is not None:
        recipe.anchor_train.epochs = a.anchor_epochs
    if a.family_epochs is not None:
        recipe.family_train.epochs = a.family_epochs
    if a.image_size is not None:
        recipe.image_size = a.image_size
    if a.budget_s is not None:
        recipe.budget_s = a.budget_s
    write = not a.smoke
    if write and not backend.ON_GPU:
        log("no GPU: running without writing results/ (CPU numbers never go there)")
        write = False
    run(recipe, a.data, Path(a.out), write, {"resnet34": a.weights_r34, "resnet50": a.weights_r50})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
