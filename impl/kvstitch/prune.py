"""Make a smaller sibling of a model the way Minitron does: importance-ranked depth/width pruning, then distillation.

Importance on calibration text (forward hooks, no gradients):
  block   1 - mean_t cos(x_in, x_out) of each decoder block (a block that barely changes its input is cheap to drop);
  channel mean_t |a| of each MLP channel (the input of ``down_proj``);
  group   sum over a KV group's query heads of mean_t ||head output|| (the input of ``o_proj``), so GQA groups are
          kept or dropped whole and the query/KV head ratio is unchanged.
The pruned model is a fresh model of the smaller config loaded with sliced weights; its config records
``kvstitch_parent_layers`` (which parent block each kept block was), used to pair stitches. Healing minimises
``T^2 KL(softmax(z_teacher / T) || softmax(z_student / T))`` over all tokens of random training crops.

CLI: ``python -m impl.kvstitch.prune --parent DIR|FILE.gguf --out DIR [--layers N] [--mlp-keep F] [--kv-groups G]
[--steps S] [--text DIR] [--device cuda] [--seed 0]``.
"""
from __future__ import annotations

import argparse
import copy
import re
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from impl.kvstitch.config import HealConfig, PruneConfig
from impl.kvstitch.models import decoder_layers
from impl.kvstitch.rope import text_config
from impl.kvstitch.train import run_steps


def _hidden(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def importance(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``block`` ``[L]``, ``channel`` ``[L, I]``, ``group`` ``[L, H_kv]`` importances on ``batches`` of token ids."""
    cfg = text_config(model.config)
    layers = decoder_layers(model)
    n_kv, n_h = cfg.num_key_value_heads, cfg.num_attention_heads
    stats = {"block": torch.zeros(len(layers), dtype=torch.float64), "channel": None,
             "group": torch.zeros(len(layers), n_kv, dtype=torch.float64)}
    channel: list[torch.Tensor | None] = [None] * len(layers)
    hooks = []

    def on_block(i):
        def hook(mod, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            cos = F.cosine_similarity(x_in.double(), _hidden(out).double(), dim=-1)
            stats["block"][i] += (1 - cos).mean().item()
        return hook

    def on_down(i):
        def hook(mod, args):
            a = args[0].double().abs().mean(dim=(0, 1)).cpu()
            channel[i] = a if channel[i] is None else channel[i] + a
        return hook

    def on_o(i):
        def hook(mod, args):
            x = args[0]
            h = x.view(*x.shape[:-1], n_h, -1).double().norm(dim=-1).mean(dim=(0, 1)).cpu()
            stats["group"][i] += h.view(n_kv, n_h // n_kv).sum(-1)
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
        if hasattr(layer, "mlp") and hasattr(layer.mlp, "down_proj"):
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
    try:
        for ids in batches:
            model(input_ids=ids.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    if all(c is not None for c in channel):
        stats["channel"] = torch.stack(channel)
    return stats


def choose(imp: dict[str, torch.Tensor], spec: PruneConfig, config) -> dict[str, list]:
    """Kept blocks (first and last always kept), and per kept block the kept MLP channels and KV groups (sorted)."""
    cfg = text_config(config)
    n = cfg.num_hidden_layers
    keep_n = n if spec.layers is None else spec.layers
    if not 1 <= keep_n <= n:
        raise ValueError(f"layers must be in [1, {n}], got {keep_n}")
    score = imp["block"].clone()
    score[0] = score[-1] = float("inf")
    blocks = sorted(torch.argsort(score, descending=True)[:keep_n].tolist())
    n_i, n_kv = cfg.intermediate_size, cfg.num_key_value_heads
    k_i = max(1, round(n_i * spec.mlp_keep))
    k_g = n_kv if spec.kv_groups is None else spec.kv_groups
    if not 0 < spec.mlp_keep <= 1 or not 1 <= k_g <= n_kv:
        raise ValueError(f"mlp_keep must be in (0, 1] and kv_groups in [1, {n_kv}]; got {spec.mlp_keep}, {k_g}")
    if k_i < n_i and imp["channel"] is None:
        raise ValueError("width pruning needs mlp.down_proj in every block; this architecture has none")
    chans = [sorted(torch.argsort(imp["channel"][b], descending=True)[:k_i].tolist()) if k_i < n_i else
             list(range(n_i)) for b in blocks]
    groups = [sorted(torch.argsort(imp["group"][b], descending=True)[:k_g].tolist()) for b in blocks]
    return {"blocks": blocks, "channels": chans, "groups": groups}


def spread_plan(config, spec: PruneConfig) -> dict[str, list]:
    """A plan of ``spec``'s shapes without calibration: blocks spread evenly over depth (first and last kept), the
    first MLP channels and KV groups. For what needs only the pruned model's shape (speed benches)."""
    cfg = text_config(config)
    n = cfg.num_hidden_layers
    k = n if spec.layers is None else spec.layers
    if not 1 <= k <= n:
        raise ValueError(f"layers must be in [1, {n}], got {k}")
    blocks = [0] if k == 1 else [int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]
    k_i = max(1, round(cfg.intermediate_size * spec.mlp_keep))
    k_g = cfg.num_key_value_heads if spec.kv_groups is None else spec.kv_groups
    return {"blocks": blocks, "channels": [list(range(k_i))] * k, "groups": [list(range(k_g))] * k}


def pruned_config(config, plan: dict[str, list]):
    """The smaller config: fewer blocks (and their layer types), MLP width, heads; records the parent blocks."""
    cfg = copy.deepcopy(text_config(config))
    old_parents = getattr(cfg, "kvstitch_parent_layers", None)
    n_kv, n_h = cfg.num_key_value_heads, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_h
    k_g = len(plan["groups"][0])
    cfg.head_dim = head_dim
    cfg.num_hidden_layers = len(plan["blocks"])
    cfg.intermediate_size = len(plan["channels"][0])
    cfg.num_key_value_heads = k_g
    cfg.num_attention_heads = k_g * (n_h // n_kv)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[b] for b in plan["blocks"]]
    cfg.kvstitch_parent_layers = [old_parents[b] if old_parents else b for b in plan["blocks"]]
    return cfg


def slice_state(state: dict[str, torch.Tensor], plan: dict[str, list], config) -> dict[str, torch.Tensor]:
    """Parent weights -> pruned weights: renumber kept blocks, slice MLP and attention projections."""
    cfg = text_config(config)
    n_kv, n_h = cfg.num_key_value_heads, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_h
    per = n_h // n_kv
    new_index = {b: j for j, b in enumerate(plan["blocks"])}
    out = {}
    for key, w in state.items():
        m = re.search(r"layers\.(\d+)\.", key)
        if m is None:
            out[key] = w
            continue
        b = int(m.group(1))
        if b not in new_index:
            continue
        j = new_index[b]
        ch = torch.tensor(plan["channels"][j])
        g = plan["groups"][j]
        kv_rows = torch.cat([torch.arange(x * head_dim, (x + 1) * head_dim) for x in g])
        heads = [h for x in g for h in range(x * per, (x + 1) * per)]
        q_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
        if re.search(r"mlp\.(gate_proj|up_proj)\.(weight|bias)$", key):
            w = w[ch]
        elif re.search(r"mlp\.down_proj\.weight$", key):
            w = w[:, ch]
        elif re.search(r"self_attn\.q_proj\.(weight|bias)$", key):
            w = w[q_rows]
        elif re.search(r"self_attn\.(k_proj|v_proj)\.(weight|bias)$", key):
            w = w[kv_rows]
        elif re.search(r"self_attn\.o_proj\.weight$", key):
            w = w[:, q_rows]
        out[key[:m.start()] + f"layers.{j}." + key[m.end():]] = w.clone()
    return out


def prune(model: nn.Module, spec: PruneConfig, batches: list[torch.Tensor]) -> tuple[nn.Module, dict]:
    """A pruned copy of ``model`` (the parent is not modified) and the plan that made it."""
    from transformers import AutoModelForCausalLM

    plan = choose(importance(model, batches), spec, model.config)
    cfg = pruned_config(model.config, plan)
    child = AutoModelForCausalLM.from_config(cfg).to(next(model.parameters()).dtype)
    missing, unexpected = child.load_state_dict(slice_state(model.state_dict(), plan, model.config), strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"pruned weights do not fit: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    if tied:
        child.tie_weights()
    return child.to(model.device).eval(), plan


def heal(student: nn.Module, teacher: nn.Module, batches: Iterator[torch.Tensor], cfg: HealConfig,
         log: Callable[[str], None] = print) -> list[float]:
    """Distil ``teacher`` into ``student`` for ``cfg.steps`` steps (AdamW, linear warm-up); returns the losses."""
    torch.manual_seed(cfg.seed)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits.float()
        return kd_loss(student(input_ids=ids).logits.float(), t_logits, cfg.temperature)

    losses = run_steps(opt, loss_of, batches, cfg.steps, next(student.parameters()).device, "heal", "kd",
                       cfg.log_every, log, clip=list(student.parameters()), sched=sched)
    student.eval()
    return losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` averaged over tokens; logits ``[B, T, V]``."""
    t = temperature
    s = F.log_softmax(student_logits / t, dim=-1).flatten(0, -2)
    p = F.log_softmax(teacher_logits / t, dim=-1).flatten(0, -2)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def main(argv: list[str] | None = None) -> int:
    import impl  # noqa: F401
    from impl.kvstitch import data
    from impl.kvstitch.models import count_params, load_model, load_tokenizer

    p = argparse.ArgumentParser(prog="python -m impl.kvstitch.prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", required=True, help="parent model: HF dir or .gguf file")
    p.add_argument("--out", required=True, help="where the pruned, healed model (and tokenizer) is saved")
    p.add_argument("--text", default=None, help="prepared text dir (default: read gensim's data)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--mlp-keep", type=float, default=1.0)
    p.add_argument("--kv-groups", type=int, default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    parent = load_model(a.parent, device=a.device)
    tok = load_tokenizer(a.parent)
    stream = data.token_stream(data.HFCodec(tok), data.train_texts(data.load_splits(a.text)))
    chunks = data.random_chunks(stream, a.batch, a.seq_len, a.seed)
    spec = PruneConfig(layers=a.layers, mlp_keep=a.mlp_keep, kv_groups=a.kv_groups)
    child, plan = prune(parent, spec, [next(chunks) for _ in range(spec.calib_batches)])
    print(f"pruned {count_params(parent):,} -> {count_params(child):,} parameters; kept blocks {plan['blocks']}")
    heal(child, parent, data.random_chunks(stream, a.batch, a.seq_len, a.seed + 1),
         HealConfig(steps=a.steps, lr=a.lr, batch=a.batch, seq_len=a.seq_len, seed=a.seed))
    child.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
