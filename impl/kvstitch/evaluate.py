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


def rouge_each(predictions: list[str], references: list[str],
               keys: tuple[str, ...] = ROUGE_KEYS) -> dict[str, list[float]] | None:
    """F1 of every pair for each of ``keys`` (stemmed; ``None`` without rouge-score)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not rouge_available():
        return None
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {k: [s[k].fmeasure for s in scores] for k in keys}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float] | None:
    """Mean ROUGE-1/2/L F1 over pairs (``None`` without rouge-score)."""
    each = rouge_each(predictions, references)
    return None if each is None else {k: sum(v) / max(len(v), 1) for k, v in each.items()}


def rouge_l_each(predictions: list[str], references: list[str]) -> list[float] | None:
    """ROUGE-L F1 of every pair (``None`` without rouge-score): the per-example scores the paired bootstrap needs."""
    each = rouge_each(predictions, references, ("rougeL",))
    return None if each is None else each["rougeL"]


def paired_bootstrap(a: list[list[float]], b: list[list[float]], reps: int = 2000, seed: int = 0) -> dict:
    """Mean over tasks of the per-task mean of ``b - a`` (paired examples; the same task weighting as the reported
    ROUGE-L) and its 95% percentile-bootstrap interval: examples resampled with replacement within each task,
    ``reps`` times, fixed ``seed`` (``impl.common.stats.paired_bootstrap`` with tasks as strata). Returns
    ``{"diff", "lo", "hi", "n"}``; an interval above 0 says b beats a beyond the noise of this many examples."""
    from impl.common.stats import paired_bootstrap as bootstrap

    if len(a) != len(b) or not a or any(len(x) != len(y) or not x for x, y in zip(a, b)):
        raise ValueError(f"need equally many paired scores per task, got {[len(x) for x in a]} and {[len(y) for y in b]}")
    got = bootstrap(a, b, "mean", n=reps, seed=seed)
    return {k: got[k] for k in ("diff", "lo", "hi", "n")}


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


@torch.no_grad()
def continuation_nll(loss_of: Callable[[torch.Tensor, int], torch.Tensor], task: Task, batch: int,
                     device: str) -> float | None:
    """Mean held-out loss (nats per token) of a system on ``task``'s reference continuations: ``loss_of(ids, P)`` is
    the mean cross-entropy of ``ids[:, P + 1:]`` given ``ids[:, :P + 1]`` for ``ids`` = prompt + continuation.
    ``None`` for a task without reference tokens. Lower is better; far less noisy than ROUGE of 48 greedy tokens."""
    if task.continuations is None or not len(task.prompts):
        return None
    ids = torch.cat([task.prompts, task.continuations], dim=1)
    p, total = task.prompts.shape[1], 0.0
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch].to(device)
        total += float(loss_of(chunk, p)) * len(chunk)  # equal token counts per row: a row-weighted mean
    return total / len(ids)


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
