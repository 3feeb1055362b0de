"""Training: each anchor alone, then the whole family end to end with one configuration sampled per step (SN-Net).

Loss: cross-entropy with label smoothing; in the family phase optionally mixed with distillation from a frozen
teacher (the more accurate anchor), ``(1 − α)·CE + α·T²·KL(softmax(t/T) ‖ softmax(s/T))``. Optimiser: SGD with
Nesterov momentum, weight decay on conv/linear weights only; optionally the global gradient norm is clipped to
``grad_clip`` (on in the family phase: there the stitches are the only layers with no BatchNorm behind them, and an
unclipped family phase diverged to NaN within its warm-up; the recipe's anchors take a looser clip as a guard against
loss spikes; the per-step norm before clipping is kept in ``grad_norm_curve``). Schedule: one cycle (as ``torch.optim.lr_scheduler.OneCycleLR``): over the first ``pct_start``
of training the learning rate rises from ``lr/div_factor`` to ``lr`` and momentum falls from ``momentum_max`` to
``momentum_min`` (cosine), then the learning rate falls to ``lr/(div_factor·final_div_factor)`` while momentum rises
back. The schedule runs by step only: ``progress = (step + 0.5) / planned_steps``, so a slow step (compilation,
cuDNN autotuning, a busy machine) never moves the learning rate. Before the timed run, ``warm_up`` runs a few SGD
steps of every forward the run will use (every configuration of a family) on the model's own weights, restored
afterwards: kernels are compiled and autotuned, the allocator holds its blocks, and its last, synchronised steps
(``warmup_timed_steps``) give the steady-state step time. With a time budget, ``planned_steps`` is cut up front to
what that step time fits in ``budget_fill`` of the budget (``planned_by_budget``), so the schedule still completes;
the budget is also a hard stop (``budget_bound``: the run ended early, mid-schedule). Warm-up and its time are
outside the budget and reported (``warmup``). On a GPU: bf16 autocast and channels_last;
``torch.backends.cudnn.benchmark`` is on during warm-up and the run and restored after them. A non-finite loss at
any step raises ``CollapseError`` (checked at every loss-curve point, every 20 steps and at the end, so it costs no
extra sync): weights trained through a NaN are garbage.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from impl.seam.data import DataBundle, augment_shift_flip, preprocess
from impl.seam.family import Config, SeamFamily


class CollapseError(RuntimeError):
    """Training diverged (non-finite loss) or a trained network fell to chance: its results must not be written."""


@dataclass
class TrainConfig:
    """One training phase."""

    epochs: float = 5.0
    batch_size: int = 512
    lr: float = 0.2                  # peak of the cycle, for SGD at this batch size
    momentum_max: float = 0.95       # at the start and the end of the cycle
    momentum_min: float = 0.85       # at the peak learning rate
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    pct_start: float = 0.3           # fraction of training spent rising to the peak
    div_factor: float = 25.0         # start at lr / div_factor
    final_div_factor: float = 1e4    # end at lr / (div_factor * final_div_factor)
    seed: int = 0
    max_steps: int | None = None     # cap (smoke runs)
    time_budget_s: float | None = None
    anchor_weight: float = 1.0       # family phase: sampling weight of each anchor relative to one stitch
    grad_clip: float | None = None   # max global gradient norm per step (None: no clipping)
    distill_alpha: float = 0.0       # family phase: weight of the distillation term (needs a teacher)
    distill_temperature: float = 2.0
    warmup_rounds: int | None = None  # untimed steps per forward before the run (None: 1 on a GPU, 0 on the CPU)
    warmup_timed_steps: int = 10      # then this many timed steps (at least one per forward); none without rounds
    budget_fill: float = 0.95         # share of the time budget the planned steps may fill at the warm-up step time


def _cos(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, t))))


def lr_at(progress: float, cfg: TrainConfig) -> float:
    """Learning rate at ``progress`` in [0, 1] (one cycle, module docstring)."""
    low, end = cfg.lr / cfg.div_factor, cfg.lr / (cfg.div_factor * cfg.final_div_factor)
    if progress < cfg.pct_start:
        return _cos(low, cfg.lr, progress / cfg.pct_start)
    return _cos(cfg.lr, end, (progress - cfg.pct_start) / max(1e-12, 1.0 - cfg.pct_start))


def momentum_at(progress: float, cfg: TrainConfig) -> float:
    """Momentum at ``progress``: the mirror image of the learning rate's cycle."""
    if progress < cfg.pct_start:
        return _cos(cfg.momentum_max, cfg.momentum_min, progress / cfg.pct_start)
    return _cos(cfg.momentum_min, cfg.momentum_max, (progress - cfg.pct_start) / max(1e-12, 1.0 - cfg.pct_start))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, mean over the batch, in float32."""
    t = temperature
    log_p = F.log_softmax(student.float() / t, dim=1)
    log_q = F.log_softmax(teacher.float() / t, dim=1)
    return t * t * F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.SGD:
    decay = [p for p in params if p.ndim > 1]
    plain = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum_max, nesterov=True)


def autocast(device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU; nothing on the CPU (float32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def cudnn_benchmark(on: bool = True) -> Iterator[None]:
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


class _PlainProgress:
    """Fallback when tqdm is missing: a line every 10 % of the steps."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.post = total, desc, 0, ""

    def update(self, k: int) -> None:
        self.n += k
        if self.n == self.total or self.n % max(1, self.total // 10) == 0:
            print(f"{self.desc}: {self.n}/{self.total} {self.post}", file=sys.stderr, flush=True)

    def set_postfix(self, **kw: str) -> None:
        self.post = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, mininterval=0.5 if tty else 10.0, file=sys.stderr, dynamic_ncols=tty)


Forward = Callable[[torch.Tensor, int], torch.Tensor]


def sgd_step(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
             opt: torch.optim.Optimizer, params: list[nn.Parameter], data: DataBundle, cfg: TrainConfig,
             gen: torch.Generator, device: str, channels_last: bool,
             teacher: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step on one batch: augment, loss (cross-entropy, plus distillation with a teacher), backward, optional
    clipping, update. Returns the loss and the gradient norm before clipping (None without clipping), unsynchronised."""
    if data.gpu_augment:
        images = augment_shift_flip(images, gen)
    x = preprocess(images, data.mean, data.std, None, channels_last)
    with autocast(device):
        logits = forward(x)
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        if cfg.distill_alpha:
            with torch.no_grad():
                target = teacher(x)
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * distill_loss(logits, target,
                                                                                     cfg.distill_temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip is not None else None
    opt.step()
    return loss.detach(), gn


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def warm_up(model: nn.Module, forwards: list[Callable[[torch.Tensor], torch.Tensor]], data: DataBundle,
            cfg: TrainConfig, device: str, channels_last: bool, teacher: nn.Module | None = None) -> dict:
    """``warmup_rounds`` untimed SGD steps of every forward in ``forwards`` (module docstring), then
    ``max(warmup_timed_steps, len(forwards))`` more cycling through them, synchronised and timed: ``step_s`` is their
    mean seconds per step. Each step takes a fresh training batch; optimiser and augmentation generator are
    throwaway; the model's parameters and buffers are restored afterwards and its gradients cleared."""
    rounds = cfg.warmup_rounds if cfg.warmup_rounds is not None else (1 if device == "cuda" else 0)
    if rounds <= 0 or not forwards:
        return {"rounds": 0, "steps": 0, "seconds": 0.0, "step_s": None}
    t0 = time.perf_counter()
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    batches = _endless_batches(data, cfg.batch_size, seed=-1 - cfg.seed)
    model.train()

    def step(fwd: Callable[[torch.Tensor], torch.Tensor]) -> None:
        images, labels = next(batches)
        sgd_step(fwd, images, labels, opt, params, data, cfg, gen, device, channels_last, teacher)

    for _ in range(rounds):
        for fwd in forwards:
            step(fwd)
    timed = max(cfg.warmup_timed_steps, len(forwards))
    _sync(device)
    t_timed = time.perf_counter()
    for k in range(timed):
        step(forwards[k % len(forwards)])
    _sync(device)
    step_s = (time.perf_counter() - t_timed) / timed
    with torch.no_grad():
        model.load_state_dict(saved)
    opt.zero_grad(set_to_none=True)
    del opt
    return {"rounds": rounds, "steps": rounds * len(forwards) + timed, "seconds": time.perf_counter() - t0,
            "step_s": step_s}


def _endless_batches(data: DataBundle, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        got = False
        for batch in data.train.batches(batch_size, shuffle=True, seed=seed * 1000 - epoch,
                                        drop_last=len(data.train) >= batch_size):
            got = True
            yield batch
        if not got:
            raise ValueError("the training split yields no batch")
        epoch += 1


def plan_steps(cfg: TrainConfig, steps_per_epoch: int, step_s: float | None) -> tuple[int, int]:
    """(requested, planned) steps: ``epochs · steps_per_epoch`` (capped by ``max_steps``), cut to what
    ``budget_fill · time_budget_s / step_s`` allows when both a budget and a measured step time exist (at least 1)."""
    requested = max(1, int(round(cfg.epochs * steps_per_epoch)))
    if cfg.max_steps is not None:
        requested = min(requested, cfg.max_steps)
    if cfg.time_budget_s and step_s and step_s > 0:
        return requested, max(1, min(requested, int(cfg.budget_fill * cfg.time_budget_s / step_s)))
    return requested, requested


def train_steps(model: nn.Module, forward: Forward, data: DataBundle, cfg: TrainConfig, device: str, desc: str,
                channels_last: bool, teacher: nn.Module | None = None,
                warmup_forwards: list[Callable[[torch.Tensor], torch.Tensor]] | None = None) -> dict:
    """The shared loop: step i trains ``forward(x, i)`` (logits of ``model``) on one augmented batch, after
    ``warm_up`` over ``warmup_forwards`` (default: ``forward(x, 0)``); the schedule runs by step (module docstring)."""
    if cfg.distill_alpha and teacher is None:
        raise ValueError(f"distill_alpha={cfg.distill_alpha} needs a teacher")
    if not 0 < cfg.budget_fill <= 1:
        raise ValueError(f"budget_fill must be in (0, 1], got {cfg.budget_fill}")
    if teacher is not None:
        teacher.eval()
    steps_per_epoch = max(1, len(data.train) // cfg.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    with cudnn_benchmark(device == "cuda"):
        warm = warm_up(model, warmup_forwards or [lambda x: forward(x, 0)], data, cfg, device, channels_last,
                       teacher)
        requested, total = plan_steps(cfg, steps_per_epoch, warm["step_s"])
        opt = make_optimizer(params, cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        model.train()
        step, losses, grad_norms, epoch = 0, [], [], 0
        finite = torch.ones((), dtype=torch.bool, device=device)  # all losses so far finite (on device: no sync)
        budget_bound = False
        bar = _progress_bar(total, desc)
        t0 = time.perf_counter()
        while step < total:
            for images, labels in data.train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch,
                                                     drop_last=len(data.train) >= cfg.batch_size):
                if step >= total:
                    break
                if cfg.time_budget_s and time.perf_counter() - t0 >= cfg.time_budget_s:
                    budget_bound = True
                    break
                progress = (step + 0.5) / total  # mid-step: neither the first nor the last lr is 0
                for g in opt.param_groups:
                    g["lr"], g["momentum"] = lr_at(progress, cfg), momentum_at(progress, cfg)
                loss, gn = sgd_step(lambda x: forward(x, step), images, labels, opt, params, data, cfg, gen, device,
                                    channels_last, teacher)
                step += 1
                bar.update(1)
                finite &= torch.isfinite(loss)
                if step % 20 == 0 or step == total:
                    losses.append((step, float(loss)))  # a sync every 20 steps only
                    if gn is not None:
                        grad_norms.append((step, float(gn)))  # before clipping
                    if not bool(finite):
                        bar.close()
                        last = [(s, v) for s, v in losses if math.isfinite(v)]
                        raise CollapseError(f"{desc}: training loss became non-finite by step {step} of {total} "
                                            f"(last finite loss-curve point: {last[-1] if last else None}); "
                                            f"the weights are garbage, nothing is measured or written")
                    bar.set_postfix(loss=f"{losses[-1][1]:.3f}", lr=f"{g['lr']:.3g}")
            else:
                epoch += 1
                continue
            break
        bar.close()
        _sync(device)
        seconds = time.perf_counter() - t0
    model.eval()
    return {"steps": step, "planned_steps": total, "requested_steps": requested,
            "planned_by_budget": total < requested, "epochs_done": step / steps_per_epoch, "seconds": seconds,
            "budget_bound": budget_bound, "warmup": warm, "loss_curve": losses, "grad_norm_curve": grad_norms,
            "config": asdict(cfg)}


def train_anchor(net: nn.Module, data: DataBundle, cfg: TrainConfig, device: str, channels_last: bool = True,
                 desc: str = "anchor") -> dict:
    """Train one network alone (e.g. ``family.nets["r34"]``: the family's stitches get no gradient)."""
    if isinstance(net, SeamFamily):
        raise TypeError("train_anchor takes one network (family.nets[name]), not the family")
    return train_steps(net, lambda x, _i: net(x), data, cfg, device, desc, channels_last)


def sample_configs(family: SeamFamily, n: int, seed: int, anchor_weight: float = 1.0) -> list[Config]:
    """``n`` configurations drawn i.i.d.: each stitch with weight 1, each anchor with ``anchor_weight``."""
    if anchor_weight < 0:
        raise ValueError(f"anchor_weight must be >= 0, got {anchor_weight}")
    w = np.array([anchor_weight if c.is_anchor else 1.0 for c in family.configs])
    idx = np.random.default_rng(seed).choice(len(family.configs), size=n, p=w / w.sum())
    return [family.configs[i] for i in idx]


def finetune_family(family: SeamFamily, data: DataBundle, cfg: TrainConfig, device: str,
                    channels_last: bool = True, teacher: nn.Module | None = None) -> dict:
    """Fine-tune everything end to end; step i trains one configuration drawn at random (anchors included).

    Running BatchNorm statistics change, so stored per-configuration statistics are dropped (recalibrate after)."""
    steps_per_epoch = max(1, len(data.train) // cfg.batch_size)
    n = max(1, int(round(cfg.epochs * steps_per_epoch)))
    plan = sample_configs(family, n + 1, cfg.seed, cfg.anchor_weight)
    family.bn_states, family.active = {}, None
    every = [lambda x, c=c: family(x, c) for c in family.configs]
    out = train_steps(family, lambda x, i: family(x, plan[i]), data, cfg, device, "family", channels_last, teacher,
                      warmup_forwards=every)
    counts: dict[str, int] = {}
    for c in plan[: out["steps"]]:
        counts[c.name] = counts.get(c.name, 0) + 1
    out["steps_per_config"] = counts
    return out
