"""kvstitch's ledger entries, per series, and the inputs on which each must fail (its figures and tables:
``plots.py``)."""
from __future__ import annotations

from impl.common.ledger import Case, Claim, ResultValue

SERIES = {"smollm2": ("SmolLM2-135M", "SmolLM2"), "gemma3": ("Gemma-3-270M", "Gemma-3")}  # id: (prefill, family)


EVERY_SIZE = ", for every decode size (value: the fraction of sizes where it holds)"
LOWER_BOUND = "ROUGE-L (lower 95% bound of the gain)"


def series_claims(series: str) -> list[Claim]:
    """The claims of one series: interpolation (against the prefill model, and against it tuned with the same LoRA),
    the gain's confidence interval over decode alone and over decode+LoRA alone, interpolation on held-out loss, and
    the layer-by-layer KV transfer."""
    prefill, family = SERIES[series]
    pair = f"{prefill} prefill -> pruned {family} decode"

    def claim(name: str, statement: str, key: str, unit: str = "of decode sizes", comparison: str = ">=",
              target: float = 1.0, result: str = f"rouge_{series}") -> Claim:
        return Claim(id=f"kvstitch.{name}_{series}", system="kvstitch", statement=statement, unit=unit,
                     comparison=comparison, target=target, measure=ResultValue("kvstitch", result, key))

    return [
        claim("interpolation", f"{pair}: after stage (b) the hybrid's ROUGE-L (mean of news continuation and wiki "
                               f"lead) lies between decode-alone and prefill-alone and above decode-alone{EVERY_SIZE}",
              "interpolation"),
        claim("interpolation_vs_tuned_prefill",
              f"{pair}: after stage (b) the hybrid's ROUGE-L lies between decode-alone and the prefill model tuned "
              "with the same LoRA recipe on the same text (the fair upper anchor: stage b also tunes), and above "
              f"decode-alone{EVERY_SIZE}", "interpolation_vs_tuned_prefill"),
        claim("hybrid_gain_ci", f"{pair}: for every decode size, the hybrid's ROUGE-L gain over decode-alone after "
                                "stage (b) is beyond noise: the lower end of its paired-bootstrap 95% interval "
                                "(examples resampled within each task) is above 0",
              "hybrid_gain_lo", LOWER_BOUND, ">", 0.0),
        claim("kv_gain_over_lora", f"{pair}: for every decode size, the stitched prefill KV adds ROUGE-L beyond stage "
                                   "(b)'s LoRA alone: the lower end of the paired-bootstrap 95% interval of hybrid b "
                                   "minus the decode model tuned with the same LoRA recipe (no prefill KV) is above 0",
              "kv_gain_lo", LOWER_BOUND, ">", 0.0),
        claim("loss_interpolation", f"{pair}: after stage (b) the hybrid's held-out news loss (nats/token of the "
                                    "reference continuation) lies between decode-alone's and prefill-alone's and "
                                    f"below decode-alone's{EVERY_SIZE}", "nll_interpolation"),
        claim("nccl_transfer_pct", f"On two GPUs of one host, a request's KV of the pruned {family} (batch 16 x 2048 "
                                   "tokens, one message per decode layer) sent over NCCL moves at >= 80% of the "
                                   "bandwidth of one message of the same size between the same GPUs",
              "pct_of_p2p", "% of measured GPU-to-GPU bandwidth", target=80.0, result=f"nccl_transfer_{series}"),
    ]


CLAIMS = [claim for series in SERIES for claim in series_claims(series)]


def failing_cases(series: str) -> dict[str, Case]:
    """Per claim of one series, a finished record on which it must fail: one of two decode sizes interpolates, a
    gain's lower bound below 0, a transfer at half the point-to-point bandwidth."""
    rouge = {"interpolation": 0.5, "interpolation_vs_tuned_prefill": 0.5, "hybrid_gain_lo": -0.004,
             "kv_gain_lo": -0.004, "nll_interpolation": 0.5}
    cases = {f"kvstitch.{name}_{series}": Case(results={f"kvstitch/rouge_{series}": {**rouge}})
             for name in ("interpolation", "interpolation_vs_tuned_prefill", "hybrid_gain_ci", "kv_gain_over_lora",
                          "loss_interpolation")}
    cases[f"kvstitch.nccl_transfer_pct_{series}"] = Case(results={f"kvstitch/nccl_transfer_{series}":
                                                                  {"pct_of_p2p": 50.0}})
    return cases


FAILING_CASES = {cid: case for series in SERIES for cid, case in failing_cases(series).items()}
