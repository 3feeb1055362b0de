"""Training the stitches: stage (a) KV regression warm-up, stage (b) end-to-end LoRA with the language-model loss.

Stage (a), per batch of training text ``x`` ``[B, T]``: ``KV_P = prefill_P(x)``, target ``KV_Q = prefill_Q(x)`` (the
decode model's own cache of the same tokens), loss over decode layers j and {K, V}:
``mean_j ||S_j(KV_P) - KV_Q,j||^2 / ||KV_Q,j - mean||^2 + w_cos * mean_j (1 - cos(S_j(KV_P), KV_Q,j))``
(cosine over each head vector). Starts from the ridge-regression solution (``StitchConfig.init``).

Stage (b), per batch split as prompt ``p`` ``[B, P]`` + continuation ``c`` ``[B, C]``: the stitched cache of ``p`` feeds
the decode model with LoRA adapters (peft), which reads ``c[:, :-1]``; loss = cross-entropy against ``c[:, 1:]``.
Trainable: LoRA matrices and stitches; the prefill model and the decode model's base weights stay frozen.

Both stages log progress, use fixed seeds, and checkpoint only the small trained parts (stitch bundle, LoRA adapter).
CLI: ``python -m impl.kvstitch.train {a,b} --prefill DIR --decode DIR --out DIR [--stitch DIR] [--steps N]``.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from impl.kvstitch.config import StageAConfig, StageBConfig
from impl.kvstitch.models import KV, build_cache, decoder_layers, forward, prefill
from impl.kvstitch.rope import positions_for
from impl.kvstitch.stitch import StitchBundle


def kv_loss(pred: KV, target: KV, cos_weight: float) -> torch.Tensor:
    """Normalised MSE + ``cos_weight`` * (1 - cosine), averaged over layers and over K and V."""
    terms = []
    for (pk, pv), (tk, tv) in zip(pred, target):
        for p, t in ((pk, tk), (pv, tv)):
            p, t = p.float(), t.float()
            mse = (p - t).pow(2).mean() / t.var().clamp_min(1e-8)
            cos = F.cosine_similarity(p, t, dim=-1).mean()
            terms.append(mse + cos_weight * (1 - cos))
    return torch.stack(terms).mean()


@torch.no_grad()
def initialise(bundle: StitchBundle, prefill_model: nn.Module, decode_model: nn.Module, ids: torch.Tensor) -> dict:
    """Apply ``bundle.spec.init`` using calibration tokens ``ids``; returns the least-squares residuals if any."""
    if bundle.spec.init == "identity":
        bundle.init_identity()
        return {}
    if bundle.spec.init == "random":
        return {}
    if bundle.spec.init != "lstsq":
        raise ValueError(f"unknown stitch init {bundle.spec.init!r}: use lstsq, identity or random")
    kv_p, kv_q = prefill(prefill_model, ids)[0], prefill(decode_model, ids)[0]
    return bundle.init_lstsq(kv_p, kv_q, positions_for(ids.shape[0], 0, ids.shape[1], ids.device))


def run_steps(opt: torch.optim.Optimizer, loss_of: Callable[[torch.Tensor], torch.Tensor],
              batches: Iterator[torch.Tensor], steps: int, device, label: str, metric: str, log_every: int,
              log: Callable[[str], None], *, clip: list | None = None, sched=None) -> list[float]:
    """The one optimisation loop of every kvstitch stage: ``steps`` batches moved to ``device``, ``loss_of(ids)``,
    backward, optional grad-norm clip (to 1.0) of ``clip``, optimiser and scheduler step; logs a line like
    "stage a step 3/150 kv loss 0.1234 (2 s)" every ``log_every`` steps and at the end. Returns the losses."""
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        loss = loss_of(next(batches).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            log(f"{label} step {step + 1}/{steps} {metric} {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    return losses


def stage_a(prefill_model: nn.Module, decode_model: nn.Module, bundle: StitchBundle, batches: Iterator[torch.Tensor],
            cfg: StageAConfig, log: Callable[[str], None] = print, init: bool = True) -> dict:
    """Warm the stitches up on the decode model's own KV; returns ``{"init_residual", "losses"}``."""
    torch.manual_seed(cfg.seed)
    dev = next(bundle.parameters()).device
    resid = initialise(bundle, prefill_model, decode_model, next(batches).to(dev)) if init else {}
    bundle.passthrough = False
    bundle.train()

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            kv_p, kv_q = prefill(prefill_model, ids)[0], prefill(decode_model, ids)[0]
        return kv_loss(bundle(kv_p, out_dtype=torch.float32), kv_q, cfg.cos_weight)

    opt = torch.optim.Adam(bundle.parameters(), lr=cfg.lr)
    losses = run_steps(opt, loss_of, batches, cfg.steps, dev, "stage a", "kv loss", cfg.log_every, log)
    bundle.eval()
    return {"init_residual": resid, "losses": losses}


@torch.no_grad()
def eval_kv_loss(prefill_model, decode_model, bundle: StitchBundle, ids: torch.Tensor, cos_weight: float) -> float:
    kv_p, kv_q = prefill(prefill_model, ids)[0], prefill(decode_model, ids)[0]
    return kv_loss(bundle(kv_p, out_dtype=torch.float32), kv_q, cos_weight).item()


def add_lora(decode_model: nn.Module, cfg: StageBConfig) -> nn.Module:
    """A peft LoRA wrapper around a *copy* of the decode model (the caller's model keeps its weights)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in decoder_layers(decode_model).named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in cfg.lora_targets if t in names]
    if not targets:
        raise ValueError(f"none of the LoRA targets {cfg.lora_targets} is a Linear of this model ({sorted(names)})")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    torch.manual_seed(cfg.seed)
    return get_peft_model(copy.deepcopy(decode_model), lcfg)


def continuation_loss(prefill_model, lora_model, bundle: StitchBundle, ids: torch.Tensor,
                      prompt_len: int) -> torch.Tensor:
    """LM loss of the decode model on ``ids[:, prompt_len:]`` after a stitched prefill of ``ids[:, :prompt_len]``."""
    prompt, cont = ids[:, :prompt_len], ids[:, prompt_len:]
    if cont.shape[1] < 2:
        raise ValueError("the continuation needs at least two tokens")
    with torch.no_grad():
        kv_p = prefill(prefill_model, prompt)[0]
    dtype = next(lora_model.parameters()).dtype
    cache = build_cache(lora_model.config, bundle(kv_p, out_dtype=dtype))
    logits = forward(lora_model, cont[:, :-1], cache).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), cont[:, 1:].flatten())


def own_continuation_loss(model: nn.Module, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """``continuation_loss`` for one model alone (one causal pass): the first continuation token is given, the next
    ones are predicted, so the two losses count the same tokens."""
    if ids.shape[1] - prompt_len < 2:
        raise ValueError("the continuation needs at least two tokens")
    logits = model(input_ids=ids[:, :-1]).logits[:, prompt_len:].float()
    return F.cross_entropy(logits.flatten(0, 1), ids[:, prompt_len + 1:].flatten())


def stage_b(prefill_model: nn.Module, decode_model: nn.Module, bundle: StitchBundle, batches: Iterator[torch.Tensor],
            cfg: StageBConfig, log: Callable[[str], None] = print) -> tuple[nn.Module, dict]:
    """End-to-end LoRA + stitch training; returns the LoRA-wrapped decode model (a copy) and ``{"losses"}``."""
    lora = add_lora(decode_model, cfg)
    lora.train()
    bundle.passthrough = False
    bundle.train()
    dev = next(bundle.parameters()).device
    opt = torch.optim.AdamW([{"params": [p for p in lora.parameters() if p.requires_grad], "lr": cfg.lr},
                             {"params": list(bundle.parameters()), "lr": cfg.stitch_lr}], weight_decay=0.0)
    losses = run_steps(opt, lambda ids: continuation_loss(prefill_model, lora, bundle, ids, cfg.prompt_len), batches,
                       cfg.steps, dev, "stage b", "lm loss", cfg.log_every, log)
    lora.eval()
    bundle.eval()
    return lora, {"losses": losses}


def lora_lm(model: nn.Module, batches: Iterator[torch.Tensor], cfg: StageBConfig,
            log: Callable[[str], None] = print) -> tuple[nn.Module, dict]:
    """Stage (b)'s LoRA and text without stitches: LM loss of ``model`` on ``ids[:, prompt_len:]`` after its own
    prefill (one causal pass). The fair upper anchor for the hybrid: the prefill model tuned on the same text."""
    if cfg.prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {cfg.prompt_len}")
    lora = add_lora(model, cfg)
    lora.train()
    dev = next(lora.parameters()).device
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    losses = run_steps(opt, lambda ids: own_continuation_loss(lora, ids, cfg.prompt_len), batches, cfg.steps, dev,
                       "prefill LoRA", "lm loss", cfg.log_every, log)
    lora.eval()
    return lora, {"losses": losses}


def save_checkpoint(out: Path, bundle: StitchBundle, lora: nn.Module | None = None) -> Path:
    """Only the small trained parts: ``out/stitch`` and, after stage (b), ``out/lora`` (peft adapter)."""
    bundle.save(out / "stitch")
    if lora is not None:
        lora.save_pretrained(out / "lora")
    return out


def load_lora(decode_model: nn.Module, lora_dir: str | Path) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(decode_model), str(lora_dir)).eval()


def main(argv: list[str] | None = None) -> int:
    import impl  # noqa: F401
    from impl.kvstitch import data
    from impl.kvstitch.models import load_model, load_tokenizer

    p = argparse.ArgumentParser(prog="python -m impl.kvstitch.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["a", "b"])
    p.add_argument("--prefill", required=True)
    p.add_argument("--decode", required=True)
    p.add_argument("--out", required=True, help="checkpoint dir (stitch/ and, for stage b, lora/)")
    p.add_argument("--stitch", default=None, help="stitch dir to start from (stage b: the stage-a checkpoint)")
    p.add_argument("--text", default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    pm, dm = load_model(a.prefill, device=a.device), load_model(a.decode, device=a.device)
    codec = data.HFCodec(load_tokenizer(a.decode))
    stream = data.token_stream(codec, data.train_texts(data.load_splits(a.text)))
    bundle = StitchBundle.load(a.stitch, a.device) if a.stitch else StitchBundle(pm.config, dm.config).to(a.device)
    out = Path(a.out)
    if a.stage == "a":
        cfg = StageAConfig(steps=a.steps, seed=a.seed)
        stage_a(pm, dm, bundle, data.random_chunks(stream, cfg.batch, cfg.seq_len, a.seed), cfg, init=a.stitch is None)
        save_checkpoint(out, bundle)
    else:
        cfg = StageBConfig(steps=a.steps, seed=a.seed)
        chunks = data.random_chunks(stream, cfg.batch, cfg.prompt_len + cfg.cont_len, a.seed)
        lora, _ = stage_b(pm, dm, bundle, chunks, cfg)
        save_checkpoint(out, bundle, lora)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
