"""The whole seam recipe on one GPU: ``python -m impl.seam.experiments [--quick|--smoke-gpu|--smoke] [--out DIR]``.

1. load Fashion-MNIST (or any ImageFolder tree): train 50,000 / val 10,000 (held out of training, seeded) / test
   10,000 (never used to choose anything);
2. for every seed: train ResNet34 and ResNet50 alone (small-image stems, one-cycle SGD, bf16, channels_last) and
   measure them; the anchors' order: mean test accuracy per network over the seeds with 95 % t intervals, and the
   margin ``mean(heavy) − mean(light) − max(seed range)``;
3. the family from each network's best-validation seed: the candidate stitches (Fast-to-Slow at every block
   boundary) whose FLOPs lie inside the anchors' range (``measure.plan_stitches``); least-squares init on 100
   training images;
4. fine-tune the whole family, one configuration sampled per step, distilling from a frozen copy of the anchor with
   the higher validation accuracy;
5. per configuration: BatchNorm statistics re-estimated (2,048 training images), val and test accuracy (per-image
   test correctness kept), FLOPs, parameters, latency at batch 1 and 256 (queued device time);
6. interpolation (rule in ``impl.seam.measure``) with its paired-bootstrap interval; the selector (``impl.seam.select``)
   over floors between the anchors' promises, ranked by FLOPs and by each latency, with the test check and its
   interval; a refused floor; serving from the saved checkpoint;
7. results: ``anchors``, ``configs``, ``interpolation``, ``selector``, ``training`` written after every phase with
   ``complete: false`` and the same ``run_id``, rewritten with ``complete: true`` at the end (``results/<gpu>/seam/``
   on a GPU, copied under ``--out``); the plots and ``results.json`` under ``--out``; the checkpoint under
   ``--checkpoint``.

Presets: ``full`` (3 seeds x 20 anchor epochs, 15 family epochs; about 6 minutes on an H200, every phase capped so
that the whole process stays under 7 minutes), ``quick`` (3 seeds x 4, 4), ``smoke-gpu`` (real sizes, 1 seed, 1 + 1
epochs, ~1 minute, writes only under --out), ``smoke`` (CPU-sized: channels / 2, 12x12 images, a few steps; writes
only under --out). Every training run warms up first (compilation, cuDNN autotuning, allocation; outside its time
budget) and then follows its one-cycle schedule by step; its time budget (a fraction of ``--budget-s``) cuts the
planned steps up front if the warm-up's step time says they would not fit, and stops the run if it overruns anyway;
the results say which happened (``planned_by_budget``, ``budget_bound``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fixtures.oracle import poison_
from impl import backend
from impl.common.log import logger
from impl.seam.data import DataBundle, load_data, preprocess
from impl.seam.family import SeamFamily
from impl.seam.lstsq import init_stitches, solve_lstsq
from impl.seam.measure import InterpolationRule, calibrate_bn, config_correctness, correctness, count_flops, \
    interpolation_summary, latency_ms, plan_stitches
from impl.seam.models import AnchorConfig, build_anchor
from impl.seam.plots import plot_accuracy_vs_cost, plot_selector_sweep
from impl.seam.select import FloorError, Promise, floor_grid, promise_interval, select, summarize, sweep
from impl.seam.serve import SeamServer, save_checkpoint
from impl.seam.stats import mean_ci95, pack_bits
from impl.seam.train import CollapseError, TrainConfig, autocast, finetune_family, train_anchor

RESULT_NAMES = ("anchors", "configs", "interpolation", "selector", "training")


@dataclass(frozen=True)
class AnchorStart:
    """How one anchor architecture starts and is guarded while it trains alone."""

    zero_init_last: bool = True          # the last BatchNorm of every residual branch starts at 0 (Goyal et al. 2017)
    grad_clip: float | None = None       # max global gradient norm per anchor step (None: no clipping)


# Measured on the H200 (results/h200/seam): ResNet34 with unit init, unclipped, jumped in loss (~0.9 to 2.4-4.3) as
# the one-cycle rate rose and one seed of three ended 1.7 pp low; zero-init + clip 5 made all three stable (94.19-94.40
# % test). ResNet50 lost ~0.8 pp under zero-init + clip (93.33-93.73 %, val 94.26-94.42 %) against unit init
# unclipped (94.18-94.53 %, val 94.67-94.93 %, four runs): each takes the start its validation accuracy favours.
ANCHOR_STARTS = {"resnet34": AnchorStart(zero_init_last=True, grad_clip=5.0),
                 "resnet50": AnchorStart(zero_init_last=False, grad_clip=None)}


@dataclass
class Recipe:
    """Every knob of one run."""

    archs: tuple[str, str] = ("resnet34", "resnet50")   # cheaper first
    seeds: tuple[int, ...] = (0, 1, 2)                   # anchor seeds; the family takes each arch's best-val one
    granularity: str = "block"
    directions: str = "fast_to_slow"
    inside_only: bool = True                             # keep only stitches inside the anchors' FLOPs range
    stitch_bn: bool = False
    width_div: int = 1
    image_size: int | None = None                        # None: the data's own (28 for Fashion-MNIST)
    val_size: int = 10000
    limits: tuple[int | None, int | None, int | None] | None = None
    anchor_starts: dict[str, AnchorStart] = field(default_factory=lambda: dict(ANCHOR_STARTS))  # others: AnchorStart()
    anchor_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, lr=0.2, pct_start=0.3))
    family_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=15, lr=0.05, pct_start=0.15, seed=1, grad_clip=2.0, distill_alpha=0.5, distill_temperature=2.0))
    lstsq_images: int = 100
    calib_images: int = 2048
    ablation_images: int = 2000                          # test images for the lstsq-only and shared-BN accuracies
    eval_batch: int = 1000
    latency_batches: tuple[int, int] = (1, 256)
    latency_warmup: int = 5
    latency_reps: int = 25
    floors: int = 41
    confidence: float = 0.99                             # of the selector's promise (impl.seam.select)
    n_boot: int = 2000
    tol: float = 0.0025
    budget_s: float = 400.0
    # of budget_s, per run: about 1.2 x an H200's steady-state time at the full preset (r34 32.5-36.5 s, r50
    # 54-57 s, family 38-43 s), so the caps cut nothing there (at 0.094 two r34 seeds were cut to 1881 and 1770 of
    # 1940 steps, the shorter one the low seed of the three) and, if all of them bound, the process ends in ~430 s
    anchor_budget_frac: tuple[float, float] = (0.115, 0.165)
    family_budget_frac: float = 0.125
    split_seed: int = 0


def anchor_start(recipe: Recipe, arch: str) -> AnchorStart:
    return recipe.anchor_starts.get(arch, AnchorStart())


def anchor_train_config(recipe: Recipe, arch: str, seed: int) -> TrainConfig:
    """The anchor phase's ``TrainConfig`` for one run: the recipe's, with this arch's clip, seed and time budget."""
    i = recipe.archs.index(arch)
    return dataclasses.replace(recipe.anchor_train, seed=seed, grad_clip=anchor_start(recipe, arch).grad_clip,
                               time_budget_s=recipe.anchor_budget_frac[i] * recipe.budget_s)


def preset(name: str) -> Recipe:
    r = Recipe()
    if name == "quick":
        r.anchor_train.epochs, r.family_train.epochs, r.latency_reps, r.budget_s = 4, 4, 10, 240.0
    elif name == "smoke-gpu":
        r.seeds, r.anchor_train.epochs, r.family_train.epochs = (0,), 1, 1
        r.limits, r.latency_reps, r.floors, r.n_boot, r.budget_s = (None, 2000, 2000), 5, 21, 200, 80.0
        r.anchor_budget_frac, r.family_budget_frac = (0.1, 0.15), 0.12
    elif name == "smoke":
        r.width_div, r.image_size, r.limits, r.val_size = 2, 12, (64, 32, 32), 32
        r.anchor_train = TrainConfig(epochs=1, batch_size=16, lr=0.05, max_steps=1)
        r.family_train = TrainConfig(epochs=1, batch_size=16, lr=0.01, max_steps=3, seed=1, grad_clip=2.0,
                                     distill_alpha=0.5)
        r.lstsq_images, r.calib_images, r.ablation_images, r.eval_batch = 8, 16, 16, 32
        r.latency_batches, r.latency_warmup, r.latency_reps = (1, 2), 0, 1
        r.floors, r.n_boot, r.budget_s = 11, 50, 600.0
    elif name != "full":
        raise ValueError(f"unknown preset {name!r}: full, quick, smoke-gpu or smoke")
    return r


log = logger("seam")


class Recorder:
    """The run's results: ``results.json`` under ``out`` after every phase and, when ``write``, the result records
    (``write_result``) copied under ``out/results/<slug>/seam/``; ``complete`` stays false until ``finish``."""

    def __init__(self, out: Path, write: bool) -> None:
        from impl.common.results import now_iso

        self.out, self.write, self.run_id = out, write, now_iso()
        self.sections: dict[str, dict[str, Any]] = {}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: dict[str, Any], complete: bool = False) -> None:
        if name not in RESULT_NAMES:
            raise ValueError(f"unknown result {name!r}")
        self.sections[name] = {**data, "run_id": self.run_id, "complete": complete}
        self.flush([name])

    def finish(self) -> None:
        for name in self.sections:
            self.sections[name]["complete"] = True
        self.flush(list(self.sections))

    def flush(self, names: list[str]) -> None:
        from impl.common.results import atomic_write_text, gpu_slug, write_result

        atomic_write_text(self.out / "results.json", json.dumps(self.sections, indent=2, default=str) + "\n",
                          overwrite=True)
        if not self.write:
            return
        for name in names:
            path = write_result("seam", name, self.sections[name], overwrite=True)
            dest = self.out / "results" / gpu_slug() / "seam" / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)


def anchor_configs(recipe: Recipe, data: DataBundle, weights: dict[str, str | None]) -> list[AnchorConfig]:
    small = data.image_size <= 64
    return [AnchorConfig(arch=a, num_classes=data.num_classes, in_chans=data.channels, small_stem=small,
                         width_div=recipe.width_div, zero_init_last=anchor_start(recipe, a).zero_init_last,
                         weights=weights.get(a))
            for a in recipe.archs]


def first_images(split: Any, n: int, data: DataBundle, channels_last: bool) -> torch.Tensor:
    got, seen = [], 0
    for x, _ in split.batches(min(n, 1000)):
        got.append(x[: n - seen])
        seen += got[-1].shape[0]
        if seen >= n:
            break
    return preprocess(torch.cat(got), data.mean, data.std, None, channels_last)


def gpu_self_check(device: str) -> dict[str, Any]:
    """Before any training, on the device: the least-squares solver against numpy (float64), and one stitched
    forward against the same network on the CPU in float32 (TF32 off), from fresh random data."""
    rng = np.random.default_rng(int(time.time()))
    x, y = np.maximum(rng.standard_normal((3000, 129)), 0), rng.standard_normal((3000, 64))
    w, b = solve_lstsq(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
    ref = np.linalg.lstsq(np.concatenate([x, np.ones((len(x), 1))], 1), y, rcond=None)[0]
    got = np.concatenate([w.cpu().numpy(), b.cpu().numpy()[None]], 0)
    lstsq_err = float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))
    fam = SeamFamily({a: build_anchor(AnchorConfig(arch=arch, width_div=4)) for a, arch in
                      (("r34", "resnet34"), ("r50", "resnet50"))}, directions="fast_to_slow").eval()
    img = torch.randn(4, 1, 28, 28)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            want = fam(img, "r34_to_r50_p08")
            out = poison_(torch.empty_like(want, device=device))  # NaN: the forward must overwrite every entry
            out.copy_(fam.to(device)(img.to(device), "r34_to_r50_p08"))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    fwd_err = float((out.cpu() - want).abs().max() / want.abs().max().clamp_min(1e-6))
    ok = lstsq_err < 1e-6 and fwd_err < 1e-3 and bool(torch.isfinite(out).all())
    res = {"lstsq_rel_err": lstsq_err, "forward_rel_err": fwd_err, "ok": ok}
    log(f"self-check on {device}: {res}")
    if not ok:
        raise RuntimeError(f"device self-check failed: {res}")
    return res


# ---- phases ----------------------------------------------------------------------------------------------------

def best_val_index(acc_val: list[float]) -> int:
    """Index of the run with the highest validation accuracy; a tie goes to the earlier run."""
    if not acc_val:
        raise ValueError("no runs to choose from")
    return max(range(len(acc_val)), key=lambda i: (acc_val[i], -i))


def train_one_anchor(recipe: Recipe, data: DataBundle, a: AnchorConfig, index: int, seed: int, device: str,
                     cl: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Anchor ``a`` (the recipe's ``index``-th) built with torch seed 1000 x seed + index, trained alone and put in
    eval mode; its training stats with ``acc_val``, ``acc_test`` and ``seed`` added."""
    torch.manual_seed(1000 * seed + index)
    net = build_anchor(a).to(device)
    if cl:
        net = net.to(memory_format=torch.channels_last)
    tc = anchor_train_config(recipe, a.arch, seed)
    st = train_anchor(net, data, tc, device, cl, desc=f"{a.name} seed {seed}") if tc.epochs > 0 else \
        {"seconds": 0.0, "steps": 0, "budget_bound": False}
    net.eval()
    st["acc_val"] = float(correctness(net, data.val, data, device, recipe.eval_batch, cl).mean())
    st["acc_test"] = float(correctness(net, data.test, data, device, recipe.eval_batch, cl).mean())
    st["seed"] = seed
    return net, st


def train_anchor_seeds(recipe: Recipe, data: DataBundle, anchors: list[AnchorConfig], device: str, cl: bool,
                       rec: Recorder, flops: dict[str, int]) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """Every arch for every seed; returns, per arch, the network of the seed with the best validation accuracy (the
    family's anchors; ties go to the earlier seed) and the ``anchors`` record."""
    runs: dict[str, list[dict[str, Any]]] = {a.name: [] for a in anchors}
    kept: dict[str, torch.nn.Module] = {}
    for seed in recipe.seeds:
        for i, a in enumerate(anchors):
            net, st = train_one_anchor(recipe, data, a, i, seed, device, cl)
            runs[a.name].append(st)
            warm = st.get("warmup") or {}
            log(f"{a.name} seed {seed}: {st['steps']}/{st.get('requested_steps', st['steps'])} steps in "
                f"{st['seconds']:.1f} s (warm-up {warm.get('seconds', 0.0):.1f} s outside the budget), val "
                f"{st['acc_val']:.4f} test {st['acc_test']:.4f}"
                + (" (steps cut to the time budget)" if st.get("planned_by_budget") else "")
                + (" (stopped by the time budget)" if st.get("budget_bound") else ""))
            if best_val_index([r["acc_val"] for r in runs[a.name]]) == len(runs[a.name]) - 1:
                kept[a.name] = net
            del net
        rec.put("anchors", anchor_summary(runs, flops))
    return kept, anchor_summary(runs, flops)


def _pp(x: float) -> float:
    """x percentage points at 1e-9 pp (-0.0 as 0.0)."""
    return round(x, 9) + 0.0


def anchor_summary(runs: dict[str, list[dict[str, Any]]], flops: dict[str, int]) -> dict[str, Any]:
    """Per network: test/val accuracy per seed and the 95 % t interval of the mean (percent); the order margin."""
    per: dict[str, Any] = {}
    for name, rs in runs.items():
        test = [100.0 * r["acc_test"] for r in rs]
        per[name] = {"seeds": [r["seed"] for r in rs], "acc_test": [r["acc_test"] for r in rs],
                     "acc_val": [r["acc_val"] for r in rs], "test_pct": mean_ci95(test) if test else None,
                     "flops": flops.get(name), "seconds": [r["seconds"] for r in rs],
                     "steps": [r["steps"] for r in rs], "requested_steps": [r.get("requested_steps") for r in rs],
                     "planned_by_budget": [bool(r.get("planned_by_budget")) for r in rs],
                     "budget_bound": [bool(r.get("budget_bound")) for r in rs],
                     "warmup_s": [(r.get("warmup") or {}).get("seconds", 0.0) for r in rs],
                     "loss_curves": [r.get("loss_curve", []) for r in rs]}
    for p in per.values():  # the family's anchors: per network the seed with the best validation accuracy
        p["family_seed"] = p["seeds"][best_val_index(p["acc_val"])] if p["seeds"] else None
    light, heavy = sorted(per, key=lambda n: flops[n])
    order = None
    if per[light]["test_pct"] and per[heavy]["test_pct"]:
        a, b = per[light]["test_pct"], per[heavy]["test_pct"]
        # accuracies are image counts over the test set: rounded far below one image's share (1e-9 pp), so an exact
        # tie reads 0, not the float residue of subtracting percentages (-1.4e-14)
        gap, spread = _pp(b["mean"] - a["mean"]), _pp(max(a["range"], b["range"]))
        order = {"light": light, "heavy": heavy, "seeds": min(a["n"], b["n"]), "gap_pp": gap,
                 "spread_pp": spread, "margin_pp": _pp(gap - spread),
                 "intervals_disjoint": None if a["hi"] is None else b["lo"] > a["hi"]}
    return {"per_arch": per, "order": order,
            "rule": "margin = mean test accuracy of the heavier network minus the lighter's, minus the larger of the "
                    "two seed ranges (max - min over seeds), in percentage points"}


def build_trained_family(recipe: Recipe, nets: dict[str, torch.nn.Module], keep: list[str], device: str,
                         cl: bool) -> SeamFamily:
    family = SeamFamily(nets, granularity=recipe.granularity, stitch_bn=recipe.stitch_bn,
                        directions=recipe.directions, stitches=keep).to(device)
    return family.to(memory_format=torch.channels_last) if cl else family


def recalibrate_all(family: SeamFamily, data: DataBundle, recipe: Recipe, device: str, cl: bool) -> float:
    """Per-configuration BatchNorm statistics for every configuration; returns the seconds taken."""
    t0 = time.perf_counter()
    for cfg in family.configs:
        calibrate_bn(family, cfg, data.train, data, device, recipe.calib_images, channels_last=cl)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_configs(family: SeamFamily, data: DataBundle, recipe: Recipe, device: str, cl: bool) -> list[dict]:
    """Accuracy (val, test with per-image bits), FLOPs, params and latency for every configuration."""
    shape = (data.channels, data.image_size, data.image_size)
    rows = []
    for cfg in family.configs:
        val = config_correctness(family, cfg, data.val, data, device, recipe.eval_batch, cl)
        test = config_correctness(family, cfg, data.test, data, device, recipe.eval_batch, cl)
        row = {"name": cfg.name, "front": cfg.front, "back": cfg.back, "point": cfg.point,
               "stage": family.stage_of(cfg), "is_anchor": cfg.is_anchor,
               "acc_val": float(val.mean()), "n_val": int(val.size), "acc_test": float(test.mean()),
               "n_test": int(test.size), "test_correct": pack_bits(test),
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
        return {c.name: float(config_correctness(family, c, subset, data, device, recipe.eval_batch, cl).mean())
                for c in family.configs}
    finally:
        family.bn_states = saved


def selector_study(rows: list[dict], recipe: Recipe, n_test: int, lat_keys: list[str]) -> dict:
    """The sweep of floors ranked by FLOPs (the claims) and by each latency, and a refused floor."""
    promise = Promise(recipe.confidence, n_eval=n_test)
    floors = floor_grid(rows, recipe.floors, promise)
    sw = sweep(rows, floors, promise=promise, rank_by="flops")
    summary = summarize(sw)
    summary["promise_ci95"] = promise_interval(rows, sw, n_boot=recipe.n_boot)
    by_latency = {}
    for key in lat_keys:
        s = sweep(rows, floors, promise=promise, rank_by=key)
        by_latency[key] = {"summary": summarize(s), "sweep": s}
    too_high = min(1.0, max(r["acc_val"] for r in rows) + 1e-4)
    try:
        select(rows, too_high, promise=promise)
        sweep_refusal = None
    except FloorError as e:
        sweep_refusal = str(e)
    return {"promise": asdict(promise), "floors": floors, "sweep": sw, "summary": summary,
            "by_latency": by_latency, "refusal_example": {"floor": too_high, "message": sweep_refusal}}


def serve_check(ckpt: Path, family: SeamFamily, rows: list[dict], data: DataBundle, device: str, floor: float,
                cl: bool) -> dict:
    """Reload the checkpoint, select at ``floor``, serve the test split: same predictions as the live family."""
    server = SeamServer.from_checkpoint(ckpt, device)
    cfg = server.select(floor)
    images = torch.cat([x for x, _ in data.test.batches(1000)])
    labels = torch.cat([y for _, y in data.test.batches(1000)]).cpu().numpy()
    t0 = time.perf_counter()
    pred = server.serve(images, batch_size=1000)
    seconds = time.perf_counter() - t0
    live = family.activate(cfg.name)
    with torch.no_grad():
        want = []
        for i in range(0, images.shape[0], 1000):
            x = preprocess(images[i: i + 1000], data.mean, data.std, data.channels, cl)
            with autocast(device):
                want.append(family(x, live).argmax(1).cpu())
    agree = float((torch.cat(want).numpy() == pred).mean()) if len(pred) else 1.0
    row = next(r for r in rows if r["name"] == cfg.name)
    return {"floor": floor, "selected": cfg.name, "served_accuracy": float((pred == labels).mean()),
            "table_acc_test": row["acc_test"], "agreement_with_live_family": agree, "images": int(len(pred)),
            "seconds": seconds}


def run(recipe: Recipe, data_dir: str | None, out: Path, write: bool, weights: dict[str, str | None],
        ckpt: Path | None = None, channels_last: bool | None = None) -> dict:
    """The recipe (module docstring); ``channels_last`` defaults to on for a GPU, off for the CPU."""
    t_start = time.perf_counter()
    device = "cuda" if backend.ON_GPU else "cpu"
    cl = device == "cuda" if channels_last is None else channels_last
    ckpt = ckpt or out / "checkpoint"
    check = gpu_self_check(device) if device == "cuda" else None
    data = load_data(data_dir, device, val_size=recipe.val_size, seed=recipe.split_seed,
                     image_size=recipe.image_size, limits=recipe.limits)
    log(f"data {data.kind} from {data.source}: train {len(data.train)} val {len(data.val)} test {len(data.test)}, "
        f"{data.channels}x{data.image_size}x{data.image_size}, {data.num_classes} classes, device {device}")
    anchors = anchor_configs(recipe, data, weights)
    shape = (data.channels, data.image_size, data.image_size)
    plan = plan_stitches(anchors, shape, recipe.granularity, recipe.directions, recipe.inside_only)
    log(f"family: {len(plan.keep)} stitches ({plan.rule}): {plan.keep}")
    rec = Recorder(out, write)
    timing: dict[str, Any] = {"self_check": check}

    nets, anchor_rec = train_anchor_seeds(recipe, data, anchors, device, cl, rec, plan.flops)
    timing["anchors_s"] = sum(sum(a["seconds"]) for a in anchor_rec["per_arch"].values())
    if anchor_rec["order"]:
        o = anchor_rec["order"]
        log(f"anchors over {o['seeds']} seeds: {o['heavy']} - {o['light']} = {o['gap_pp']:+.3f} pp, seed spread "
            f"{o['spread_pp']:.3f} pp, margin {o['margin_pp']:+.3f} pp")

    family = build_trained_family(recipe, nets, plan.keep, device, cl)
    t0 = time.perf_counter()
    lstsq_report = init_stitches(family, first_images(data.train, recipe.lstsq_images, data, cl))
    timing["lstsq"] = {"seconds": time.perf_counter() - t0, "images": recipe.lstsq_images, "per_stitch": lstsq_report}
    acc_lstsq = ablation_accuracy(family, data, recipe, device, cl)
    per = anchor_rec["per_arch"]
    before = {n: per[n]["acc_val"][per[n]["seeds"].index(per[n]["family_seed"])] for n in family.anchor_names}
    log("family from the best-validation seed of each anchor: "
        + ", ".join(f"{n} seed {per[n]['family_seed']} (val {before[n]:.4f})" for n in family.anchor_names))
    teacher_name = max(before, key=before.get)
    teacher = copy.deepcopy(family.nets[teacher_name]).eval().requires_grad_(False)
    tc = dataclasses.replace(recipe.family_train, time_budget_s=recipe.family_budget_frac * recipe.budget_s)
    timing["family"] = finetune_family(family, data, tc, device, cl, teacher if tc.distill_alpha else None)
    timing["family"]["teacher"] = teacher_name if tc.distill_alpha else None
    del teacher
    log(f"family fine-tune: {timing['family']['steps']} steps in {timing['family']['seconds']:.1f} s"
        + (f", distilling from {teacher_name}" if tc.distill_alpha else ""))
    acc_shared = ablation_accuracy(family, data, recipe, device, cl)
    timing["bn_calibration_s"] = recalibrate_all(family, data, recipe, device, cl)

    t0 = time.perf_counter()
    rows = measure_configs(family, data, recipe, device, cl)
    check_anchors_survived(before, rows, data.num_classes)
    for r in rows:
        r["acc_lstsq_only"] = None if r["is_anchor"] else acc_lstsq[r["name"]]
        r["acc_shared_bn"] = acc_shared[r["name"]]
    timing["measure_s"] = time.perf_counter() - t0
    configs = {"rows": rows, "image_shape": list(shape), "anchors": [asdict(a) for a in anchors],
               "granularity": recipe.granularity, "directions": recipe.directions, "stitch_plan": asdict(plan),
               "data": {"kind": data.kind, "source": data.source, "train": len(data.train), "val": len(data.val),
                        "test": len(data.test)},
               "notes": "acc_* are fractions; test_correct is the per-image test correctness (impl.seam.stats."
                        "pack_bits); flops per image (2 per MAC, conv+matmul only); latency in ms (queued device time, "
                        "L2 flushed, bf16 autocast, channels_last); acc_lstsq_only and acc_shared_bn on the first "
                        f"{recipe.ablation_images} test images"}
    rec.put("configs", configs)
    interp = interpolation_summary(rows, "acc_test", InterpolationRule(recipe.tol), n_boot=recipe.n_boot)
    interp["on_val"] = {k: v for k, v in interpolation_summary(rows, "acc_val", InterpolationRule(recipe.tol),
                                                                bits_key=None).items()
                        if k in ("interpolating", "fraction", "percent", "reasons")}
    rec.put("interpolation", interp)
    lat_keys = [f"latency_b{b}_ms" for b in recipe.latency_batches]
    selector = selector_study(rows, recipe, len(data.test), lat_keys)
    rec.put("selector", selector)

    meta = {"anchors": [asdict(a) for a in anchors], "stitch_bn": recipe.stitch_bn,
            "data": {"mean": data.mean, "std": data.std, "channels": data.channels, "image_size": data.image_size,
                     "num_classes": data.num_classes, "kind": data.kind, "val_size": recipe.val_size,
                     "source": data.source},
            "promise": {"confidence": recipe.confidence, "n_eval": None},
            "table": [{k: v for k, v in r.items() if k != "test_correct"} for r in rows]}
    save_checkpoint(ckpt, family, meta)
    floors = selector["floors"]
    selector["serve_check"] = serve_check(ckpt, family, rows, data, device, floors[len(floors) // 2], cl)
    log(f"serving from {ckpt}: {selector['serve_check']}")
    timing["recipe_total_s"] = time.perf_counter() - t_start
    timing["training_s"] = (timing["anchors_s"] + timing["lstsq"]["seconds"] + timing["family"]["seconds"]
                            + timing["bn_calibration_s"])
    timing["recipe"] = asdict(recipe)
    timing["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rec.put("selector", selector)
    rec.put("training", timing)
    rec.finish()
    s = selector["summary"]
    log(f"interpolation: {interp['interpolating']}/{interp['stitches']} = {interp['percent']:.2f} % at the point "
        f"estimate, {interp['interpolating_conservative']} at each stitch's lower end = "
        f"{interp['percent_conservative']:.2f} % (the claim); fraction's joint 95 % interval "
        f"{interp['percent_ci95']}, reasons {interp['reasons']}")
    for name, v in interp["per_stitch"].items():
        m = v.get("margin_pp_ci95") or {}
        log(f"  {name}: acc {100 * v['acc']:.2f} % line {100 * v['line_acc']:.2f} %, margin above line - tol "
            f"[{m.get('lo', float('nan')):+.2f}, {m.get('hi', float('nan')):+.2f}] pp, "
            f"{'counts' if v.get('interpolates_at_lower_end') else 'fails (' + v['reason'] + ')'}")
    log(f"selector over {s['floors']} floors: served {s['served']}, promise kept {s['percent_promise_kept']} % "
        f"(interval {s['promise_ci95']}), mean FLOPs saving where a stitch qualifies "
        f"{s['mean_saving_percent_where_stitch_qualifies']} % over {s['floors_where_stitch_qualifies']} floors")
    try:
        plot_accuracy_vs_cost(configs, interp, anchor_rec, out / "seam_acc_vs_flops.png")
        plot_selector_sweep(selector, out / "seam_selector.png")
    except ImportError as e:  # the report draws the same plots from results/ where matplotlib exists
        log(f"plots skipped: {e}")
    log(f"done in {timing['recipe_total_s']:.1f} s (training {timing['training_s']:.1f} s); results.json and plots "
        f"in {out}, checkpoint in {ckpt}")
    print_table(rec.sections)
    return rec.sections


def print_table(sections: dict[str, dict[str, Any]]) -> None:
    """The short summary the GPU call ends with."""
    a = sections.get("anchors", {})
    for name, p in (a.get("per_arch") or {}).items():
        t = p["test_pct"]
        print(f"  {name}: test {t['mean']:.2f} % over {t['n']} seeds"
              + (f" [{t['lo']:.2f}, {t['hi']:.2f}]" if t["lo"] is not None else "") + f", range {t['range']:.2f} pp")
    o = a.get("order")
    if o:
        print(f"  order margin {o['margin_pp']:+.3f} pp (gap {o['gap_pp']:+.3f}, spread {o['spread_pp']:.3f})")
    i = sections.get("interpolation")
    if i:
        print(f"  interpolating {i['interpolating']}/{i['stitches']} = {i['percent']:.1f} % (point), "
              f"{i['interpolating_conservative']}/{i['stitches']} = {i['percent_conservative']:.1f} % at each "
              f"stitch's lower end (claim); joint 95 % interval {i['percent_ci95']}")
    s = (sections.get("selector") or {}).get("summary")
    if s:
        print(f"  promise kept {s['percent_promise_kept']} % of {s['served']} served floors "
              f"(interval {s['promise_ci95']}); saving {s['mean_saving_percent_where_stitch_qualifies']} %")
    t = sections.get("training")
    if t:
        print(f"  whole recipe {t['recipe_total_s']:.1f} s (anchors {t['anchors_s']:.1f} s, family "
              f"{t['family']['seconds']:.1f} s)")


def rescore(slug: str, root: Path | None = None) -> Path:
    """Recompute ``interpolation`` from a stored run's ``configs`` (its per-image test correctness) with this
    checkout's rule. The record keeps the GPU run's device, commit, date and run id and gains ``rescored``: the commit
    and date of the code that recomputed it."""
    from impl.common.results import RESULTS, atomic_write_text, git_commit, now_iso

    commit = git_commit()
    if commit == "unknown" or commit.endswith("+dirty"):
        raise SystemExit(f"rescore from committed code: this checkout is at {commit!r} (commit impl/ first)")
    folder = (root or RESULTS) / slug / "seam"
    configs = json.loads((folder / "configs.json").read_text())["data"]
    path = folder / "interpolation.json"
    rec = json.loads(path.read_text())
    old = rec["data"]
    boot = old.get("percent_ci95") or {}
    new = interpolation_summary(configs["rows"], "acc_test", InterpolationRule(**old["rule"]),
                                n_boot=boot.get("n_boot", 2000), seed=boot.get("seed", 0))
    rec["data"] = {**old, **new}
    rec["rescored"] = {"commit": commit, "date": now_iso(), "of_commit": rec.get("commit")}
    atomic_write_text(path, json.dumps(rec, indent=2, sort_keys=True) + "\n", overwrite=True)
    log(f"rescored {path}: {new['interpolating_conservative']}/{new['stitches']} at each stitch's lower end")
    return path


def check_args(a: argparse.Namespace) -> str | None:
    """Why the numeric options cannot run (before any training), or None."""
    import math

    from impl.seam.stats import z_of

    if a.confidence is not None:
        try:
            z_of(a.confidence)
        except ValueError as e:
            return f"--confidence: {e}"
    for name, positive in (("anchor_epochs", False), ("family_epochs", False), ("budget_s", True),
                           ("image_size", True)):
        v = getattr(a, name)
        if v is not None and (not math.isfinite(v) or v < 0 or (positive and v == 0)):
            kind = "positive" if positive else "non-negative"
            return f"--{name.replace('_', '-')} must be a finite {kind} number, got {v}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.seam.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 seeds x 4 anchor epochs, 4 family epochs")
    mode.add_argument("--smoke-gpu", action="store_true", help="real sizes, 1 seed, 1+1 epochs: proves every step "
                                                               "runs on the GPU; writes only under --out")
    mode.add_argument("--smoke", action="store_true", help="tiny CPU-sized run of every step; writes only under --out")
    mode.add_argument("--prepare", action="store_true", help="copy the Fashion-MNIST .gz files into "
                                                              ".carry/seam/fashion-mnist (to carry to a GPU machine)")
    mode.add_argument("--rescore", metavar="SLUG", help="recompute results/SLUG/seam/interpolation.json from the "
                                                         "stored configs with this checkout's rule")
    p.add_argument("--data", default=None, help="Fashion-MNIST .gz dir or ImageFolder root (default $SEAM_DATA, "
                                                "/usr/share/datasets/fashion-mnist or .carry/seam/fashion-mnist)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "seam"), help="results.json, plots, records")
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default OUT/checkpoint)")
    p.add_argument("--granularity", choices=("block", "stage"), default=None)
    p.add_argument("--directions", choices=("fast_to_slow", "both"), default=None)
    p.add_argument("--all-points", action="store_true", help="keep stitches outside the anchors' FLOPs range too")
    p.add_argument("--stitch-bn", action="store_true", help="BatchNorm after each stitch conv")
    p.add_argument("--seeds", type=int, default=None, help="number of anchor seeds (0, 1, ...)")
    p.add_argument("--anchor-epochs", type=float, default=None)
    p.add_argument("--family-epochs", type=float, default=None)
    p.add_argument("--no-distill", action="store_true", help="family fine-tune on labels only")
    p.add_argument("--confidence", type=float, default=None, help="one-sided confidence of the selector's promise")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="time budget of the whole recipe")
    p.add_argument("--weights-r34", default=None, help="local pretrained weights for resnet34 (ImageNet setting)")
    p.add_argument("--weights-r50", default=None, help="local pretrained weights for resnet50")
    a = p.parse_args(argv)
    if a.prepare:
        from impl.seam.data import prepare_carry

        log(f"Fashion-MNIST copied to {prepare_carry()}")
        return 0
    if a.rescore:
        rescore(a.rescore)
        return 0
    bad = check_args(a)
    if bad:
        p.error(bad)
    recipe = preset("smoke" if a.smoke else "smoke-gpu" if a.smoke_gpu else "quick" if a.quick else "full")
    for key, value in (("granularity", a.granularity), ("directions", a.directions), ("image_size", a.image_size),
                       ("budget_s", a.budget_s), ("confidence", a.confidence)):
        if value is not None:
            setattr(recipe, key, value)
    recipe.stitch_bn, recipe.inside_only = a.stitch_bn, not a.all_points
    if a.seeds is not None:
        if a.seeds < 1:
            p.error(f"--seeds must be at least 1, got {a.seeds}")
        recipe.seeds = tuple(range(a.seeds))
    if a.anchor_epochs is not None:
        recipe.anchor_train.epochs = a.anchor_epochs
    if a.family_epochs is not None:
        recipe.family_train.epochs = a.family_epochs
    if a.no_distill:
        recipe.family_train.distill_alpha = 0.0
    write = not (a.smoke or a.smoke_gpu)
    if write and not backend.ON_GPU:
        log("no GPU: running without writing results/ (CPU numbers never go there)")
        write = False
    threads = torch.get_num_threads()
    if a.smoke and not backend.ON_GPU:
        torch.set_num_threads(1)  # tiny convolutions: one thread is faster, and far faster on a shared machine
    try:
        run(recipe, a.data, Path(a.out), write, {"resnet34": a.weights_r34, "resnet50": a.weights_r50},
            Path(a.checkpoint) if a.checkpoint else None)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
