"""Quality and speed of one generator on the held-out tasks: ROUGE-1/2/L F1 (``rouge-score``), TTFT, tokens/s.

A *generator* is ``gen(ids [B, T]) -> tokens [B, n]`` (model alone, or hybrid). Generations are cut at the first EOS,
decoded, and scored against the references with stemming. Where ``rouge-score`` is not importable (the GPU machine
may lack it) the scores are ``None`` and the generations are kept, so ``python -m impl.kvstitch.experiments rescore``
can score them on a machine that has it.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from impl.kvstitch.data import Task

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge_available() -> bool:
    try:
        import rouge_score  # noqa: F401
    except ImportError:
        return False
    return True


def rouge(predictions: list[str], references: list[str]) -> dict[str, float] | None:
    """Mean ROUGE-1/2/L F1 over pairs (``None`` without rouge-score)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not rouge_available():
        return None
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)
        for k in ROUGE_KEYS:
            totals[k] += s[k].fmeasure
    n = max(len(predictions), 1)
    return {k: totals[k] / n for k in ROUGE_KEYS}


def cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:tokens.index(eos)] if eos is not None and eos in tokens else tokens


def generate_task(gen: Callable[[torch.Tensor], torch.Tensor], task: Task, codec, batch: int,
                  device: str) -> tuple[list[str], float]:
    """Texts generated for every prompt of ``task`` (batches of ``batch``) and the wall time spent."""
    texts: list[str] = []
    t0 = time.perf_counter()
    for s in range(0, len(task.prompts), batch):
        out = gen(task.prompts[s:s + batch].to(device)).cpu().tolist()
        texts.extend(codec.decode(cut_at_eos(row, codec.eos_id)) for row in out)
    _sync(device)
    return texts, time.perf_counter() - t0


def score_system(gen, tasks: list[Task], codec, batch: int, device: str) -> dict:
    """``{task: {"rouge": {...} | None, "generations": [...], "seconds": s}}`` for one generator."""
    out = {}
    for task in tasks:
        texts, secs = generate_task(gen, task, codec, batch, device)
        out[task.name] = {"rouge": rouge(texts, task.references), "generations": texts, "seconds": secs}
    return out


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
