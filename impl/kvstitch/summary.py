"""From a series' generations and losses to its verdicts: ROUGE-L means, whether the hybrid interpolates between its
anchors, the paired-bootstrap intervals of the gaps, and the ROUGE table (pure functions of the record).

``summarise(rec)`` fills in, per decode size, ``rougeL`` means, ``interpolation`` (``interpolation_score`` of decode
alone, hybrid b and prefill alone), the same against the LoRA-tuned prefill and on held-out news loss, and ``gaps``;
per series the fraction of sizes that interpolate and ``hybrid_gain_lo`` / ``kv_gain_lo`` (the weakest size's lower
95% bound of hybrid b minus decode alone / minus decode+LoRA alone), and ``table``.
"""
from __future__ import annotations

from impl.kvstitch.evaluate import ROUGE_KEYS, paired_bootstrap, rouge_l_each


def mean_rouge_l(scores: dict) -> float | None:
    vals = [v["rouge"]["rougeL"] for v in scores.values() if v.get("rouge")]
    return sum(vals) / len(vals) if vals and len(vals) == len(scores) else None


def interpolation_score(decode: float | None, hybrid: float | None, prefill: float | None) -> float | None:
    """1.0 when ``decode < hybrid`` and ``hybrid`` lies between decode and prefill; ``None`` without scores."""
    if None in (decode, hybrid, prefill):
        return None
    lo, hi = min(decode, prefill), max(decode, prefill)
    return float(hybrid > decode and lo <= hybrid <= hi)


def summarise(rec: dict) -> dict:
    """Adds ``rougeL`` means, the ROUGE table, per decode size the interpolation verdicts and the gaps' bootstrap
    intervals, and per series ``interpolation`` (the fraction of decode sizes that interpolate: 1 = all),
    ``nll_interpolation`` (the same on held-out news loss), ``hybrid_gain_lo`` (the smallest lower 95% bound of
    hybrid b - decode alone over the sizes) and ``kv_gain_lo`` (the same for hybrid b - decode+LoRA alone)."""
    p = mean_rouge_l(rec["prefill"]["scores"])
    rec["prefill"]["rougeL"] = p
    tuned, pt = rec.get("prefill_lora"), None
    if tuned is not None:
        pt = tuned["rougeL"] = mean_rouge_l(tuned["scores"])
    for d in rec["decodes"]:
        d["rougeL"] = {k: mean_rouge_l(v) for k, v in d["scores"].items()}
        decode, hybrid = d["rougeL"]["decode_alone"], d["rougeL"]["hybrid_b"]
        d["interpolation"] = interpolation_score(decode, hybrid, p)
        # the same test against the prefill model tuned with stage (b)'s LoRA on the same text (a fair upper anchor)
        d["interpolation_vs_tuned_prefill"] = interpolation_score(decode, hybrid, pt)
        d["gaps"] = rouge_gaps(rec, d)
        # the same verdict on held-out news loss (lower is better, so on -loss); None for records without losses
        nll = d.get("nll") or {}
        d["nll_interpolation"] = interpolation_score(*(None if x is None else -x for x in (
            nll.get("decode_alone"), nll.get("hybrid_b"), rec["prefill"].get("nll"))))
    for key in ("interpolation", "interpolation_vs_tuned_prefill", "nll_interpolation"):  # fraction of sizes
        rec[key] = _mean_or_none([d[key] for d in rec["decodes"]])
    for key, gap in (("hybrid_gain_lo", "hybrid_b_minus_decode"), ("kv_gain_lo", "hybrid_b_minus_lora_alone")):
        los = [(d["gaps"] or {}).get(gap, {}).get("lo") for d in rec["decodes"]]
        rec[key] = None if None in los or not los else min(los)  # the weakest size's lower 95% bound
    rec["table"] = rouge_table(rec)
    return rec


def _mean_or_none(xs: list[float | None]) -> float | None:
    return None if not xs or None in xs else sum(xs) / len(xs)


def rouge_gaps(rec: dict, d: dict) -> dict | None:
    """Paired-bootstrap 95% intervals of the ROUGE-L gaps the interpolation verdict rests on (``None`` without
    rouge-score): hybrid b - decode alone, prefill - hybrid b, tuned prefill - hybrid b, and hybrid b - decode+LoRA
    alone (the same LoRA recipe without the stitched prefill KV)."""
    refs = rec["references"]

    def each(scores: dict) -> list[list[float]] | None:
        rows = [rouge_l_each(scores[t]["generations"], refs[t]) for t in sorted(scores)]
        return None if any(r is None for r in rows) else rows

    dec, hyb, pre = each(d["scores"]["decode_alone"]), each(d["scores"]["hybrid_b"]), each(rec["prefill"]["scores"])
    if None in (dec, hyb, pre):
        return None
    gaps = {"hybrid_b_minus_decode": paired_bootstrap(dec, hyb), "prefill_minus_hybrid_b": paired_bootstrap(hyb, pre)}
    if "lora_alone" in d["scores"]:  # what the prefill KV adds beyond stage (b)'s LoRA on the decode model
        gaps["hybrid_b_minus_lora_alone"] = paired_bootstrap(each(d["scores"]["lora_alone"]), hyb)
    if "prefill_lora" in rec:
        gaps["tuned_prefill_minus_hybrid_b"] = paired_bootstrap(hyb, each(rec["prefill_lora"]["scores"]))
    return gaps


def rouge_table(rec: dict) -> list[dict]:
    """One row per system: ROUGE per task and the held-out news loss (``news_nll``, None in records without it)."""
    rows = [{"system": "prefill alone", "params": rec["prefill"]["params"],
             **_task_cols(rec["prefill"]["scores"]), "news_nll": rec["prefill"].get("nll")}]
    if "prefill_lora" in rec:
        rows.append({"system": "prefill+LoRA alone (stage-b text)", "params": rec["prefill"]["params"],
                     **_task_cols(rec["prefill_lora"]["scores"]), "news_nll": rec["prefill_lora"].get("nll")})
    for d in rec["decodes"]:
        for k, label in (("decode_alone", "decode alone"), ("hybrid_a", "hybrid stage a"),
                         ("hybrid_b", "hybrid stage b"), ("lora_alone", "decode+LoRA alone")):
            rows.append({"system": f"{label} [{d['tag']}]", "params": d["params"], **_task_cols(d["scores"][k]),
                         "news_nll": (d.get("nll") or {}).get(k)})
    return rows


def _task_cols(scores: dict) -> dict:
    return {f"{task}_{k}": (v["rouge"] or {}).get(k) for task, v in scores.items() for k in ROUGE_KEYS}
