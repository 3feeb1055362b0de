"""A Hugging Face ``transformers`` model running on a loaded checkpoint, with our FP8 linears swapped in.

``build_model(loaded)`` makes the HF Llama model from the checkpoint's config (its quantization_config removed, so
transformers' own FP8 integration stays out of the way), copies the dense tensors (embeddings, norms, lm_head) in,
and replaces every ``nn.Linear`` the checkpoint quantized with an ``Fp8Linear`` (unquantized ones get their dense
weight). Load unfused (``fuse=False``): HF modules keep q/k/v and gate/up separate.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from impl.fp8.linear import Fp8Linear, Fp8Weight
from impl.fp8.loader import LoadedCheckpoint


def hf_config(config: dict[str, Any]):
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_version")}
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def build_model(loaded: LoadedCheckpoint, *, dtype: torch.dtype | None = None, path: str | None = None,
                mode: str | None = None) -> nn.Module:
    """The HF causal LM on ``loaded``'s device, in ``dtype`` (default: bf16 on a GPU, fp32 on the CPU); ``mode``
    (None, "w8a16", "w8a8") and ``path`` go to every ``Fp8Linear``."""
    from transformers import AutoModelForCausalLM

    device = next(iter(loaded.dense.values())).device
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device(device), _no_init():  # every weight is overwritten below: skip the random init
        model = AutoModelForCausalLM.from_config(hf_config(loaded.config), dtype=dtype)
    model.eval()
    for name, t in loaded.dense.items():
        _param(model, name).data = t.to(dtype)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    for module, w in loaded.linears.items():
        if isinstance(w, Fp8Weight):
            layer = Fp8Linear(w, path=path, compute_dtype=dtype, mode=mode)
        else:
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            layer.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        _replace(model, module, layer)
    return model


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise (slower, same result)
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def _param(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _replace(model: nn.Module, module: str, layer: nn.Module) -> None:
    owner, _, attr = module.rpartition(".")
    parent = model.get_submodule(owner)
    old = getattr(parent, attr)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{module} is a {type(old).__name__}, not an nn.Linear")
    if getattr(old, "bias", None) is not None and isinstance(layer, nn.Linear) and layer.bias is None:
        raise ValueError(f"{module} has a bias the checkpoint did not provide")
    setattr(parent, attr, layer)


def linear_paths(model: nn.Module) -> dict[str, int]:
    """How many Fp8Linears use each path: the explicit record of what ran."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            out[m.path] = out.get(m.path, 0) + 1
    return out


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, *, window: int = 1024, batch: int = 8,
               reference_argmax: list[torch.Tensor] | None = None, keep_argmax: bool = False,
               bos: int | None = None) -> dict[str, Any]:
    """exp(mean next-token NLL) over non-overlapping windows of ``ids`` (1-D), plus token counts and each window's
    mean NLL (``window_nll``, for intervals over windows).

    With ``keep_argmax`` the argmax predictions per window are returned (``argmax``) so that another model's
    next-token agreement can be computed against them (pass them back as ``reference_argmax``). With ``bos`` each
    window starts with that token (models trained to always see one, like Gemma), which is never scored.
    """
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else ids.device
    n = (ids.numel() // window) * window
    if n == 0:
        window, n = ids.numel(), ids.numel()
    chunks = ids[:n].reshape(-1, window)
    nll, count, agree = 0.0, 0, 0
    argmax: list[torch.Tensor] = []
    per_window: list[float] = []
    for i in range(0, chunks.shape[0], batch):
        x = chunks[i: i + batch].to(device)
        if bos is not None:
            x = torch.cat([torch.full_like(x[:, :1], bos), x], dim=1)
        logits = model(input_ids=x).logits[:, (1 if bos is not None else 0):-1]
        x = x[:, (1 if bos is not None else 0):]
        # one window at a time through float32 and log-softmax: [window, vocab] at most beside the logits (Gemma's
        # 262k vocabulary makes a batch's float32 log-probabilities 8.6 GB)
        preds, toks = [], []
        for row, target in zip(logits, x[:, 1:]):
            lr = row.float()
            preds.append(lr.argmax(-1))
            toks.append(-torch.log_softmax(lr, dim=-1).gather(-1, target[:, None])[:, 0].double())
        del logits
        pred_next, tok = torch.stack(preds), torch.stack(toks)
        per_window.extend(tok.mean(dim=1).tolist())
        nll += tok.sum().item()
        count += x[:, 1:].numel()
        pred = pred_next.cpu()
        if keep_argmax:
            argmax.append(pred)
        if reference_argmax is not None:
            agree += int((pred == reference_argmax[i // batch]).sum())
    out = {"ppl": float(torch.exp(torch.tensor(nll / max(count, 1)))), "tokens": count, "window": window,
           "window_nll": per_window}
    if keep_argmax:
        out["argmax"] = argmax
    if reference_argmax is not None:
        out["top1_agreement"] = agree / max(count, 1)
    return out
