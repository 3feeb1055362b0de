"""fp8 claims: kernel bandwidth, FP8 GEMM speed-up, loading, quality of every layout on two models (figures:
``plots.py``).

Kernels: % of the card's bandwidth peak for the kernel's size (the fastest of its calibration kernels -- copies, a
read-only sum, triads -- that moves at least half the kernel's bytes: ``impl.common.calibrate``; a higher bar than its
1 GiB copy's median) counting compulsory bytes (inputs read once, outputs written once), on a Llama-3-8B layer's
matrices; per-tensor dynamic requantization reads its input twice (amax, then convert) and is judged against that
two-read bound (``pct_traffic_bw``). Quality: |perplexity change| at the conservative end of a 95% bootstrap interval
over evaluation windows (``quality``), per model, layout and mode, of the project's recipe (``RECIPE``: what
``impl.fp8.quantize --calibration`` writes; every decoder linear in FP8, the LM head not): W8A16 codes rounded by
GPTQ; W8A8 rounded by GPTQ, smoothed or not as the calibration tokens choose (``quality.recipe_of``). Round-to-nearest
figures stay in the record and the plot beside them. A W8A8 claim's source names what rounding the activations alone
costs the same model (``activation_share``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from impl.common.ledger import BenchRatio, Beside, Case, Claim, ExtraInfo, Measured, NotMeasured, ResultValue
from impl.common.shapes import LLAMA3_8B
from impl.fp8.formats import activation_name
from impl.fp8.gptq import CALIB_TOKENS, PLACEMENTS
from impl.fp8.layouts import LAYOUTS

# Llama-3-8B's gate (or up) projection; then q/o, qkv fused, down, gate+up fused
BIG, *OTHER = [f"{n}x{k}" for n, k in LLAMA3_8B.kernel_matrices()]
GEMM = "M8192-N8192-K8192"
BW_TARGET = 92.0
TWO_READ_TARGET = 90.0
QUALITY_TARGET = {"w8a16": 0.5, "w8a8": 1.0}
# the quality record's row (``layouts.<layout>.<key>``, experiments.layout_table) each mode's claim judges
RECIPE = {"w8a16": "w8a16-gptq", "w8a8": "w8a8-recipe"}  # W8A16 has one candidate (quality.RECIPE_CANDIDATES)
MODELS = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M"}


def copy_bench(case: str) -> str:
    """The bench of the card's own copy of the same bytes as a kernel case (``test_fp8_dequant[tensor-4096x4096]`` or
    ``tensor-4096x4096`` -> ``test_fp8_copy[4096x4096]``): the ceiling a kernel of that size is read against."""
    return f"test_fp8_copy[{case.rstrip(']').rsplit('-', 1)[-1]}]"


def stream_bench(case: str) -> str:
    """The bench of the no-arithmetic stream of a kernel case's read/write mix (``test_fp8_dequant[...-4096x4096]``
    -> ``test_fp8_stream[widen-4096x4096]``; a requantize -> ``narrow``): the ceiling of that mix."""
    mode = "widen" if case.startswith("test_fp8_dequant") else "narrow"
    return f"test_fp8_stream[{mode}-{case.rstrip(']').rsplit('-', 1)[-1]}]"


def same_size_ceilings(view, bench: str, target: float | None = None) -> str:
    """The % of the peak of ``copy_bench`` and of ``stream_bench`` in words, for a claim's source; each left out
    where its bench is not stored. With ``target`` (a claim on the same % of the peak), a stream below it says so:
    on this card the traffic mix alone, with no arithmetic, misses the target."""
    words = ""
    for name, what in ((copy_bench(bench), "the card's own copy of those bytes"),
                       (stream_bench(bench), "a stream of the same read/write mix with no arithmetic")):
        m = ExtraInfo(name, "pct_peak_bw")(view)
        if isinstance(m, NotMeasured):
            continue
        words += f"; {what}: {m.value:.1f}% ({name[name.index('[') + 1:-1]}, {m.commit[:12]} {m.date[:10]})"
        if name.startswith("test_fp8_stream") and target is not None and m.value < target:
            words += f", itself below the {target:g}% target"
    return words


DISK_COLD = "test_fp8_disk_read[cold]"
LOAD_FLOOR = 2.0  # GB/s, the cold load's


def disk_speed(view) -> str:
    """The file system's own read of the same files with the page cache evicted (``DISK_COLD``), in words, for the
    cold load's claim; empty where it is not stored. Below the load's floor it says so: in that run the disk itself
    delivered less than the claim asks of the load."""
    m = ExtraInfo(DISK_COLD, "gbps")(view)
    if isinstance(m, NotMeasured):
        return ""
    words = (f"; the plain read of the same files, page cache evicted: {m.value:.2f} GB/s ({DISK_COLD}, "
             f"{m.commit[:12]} {m.date[:10]})")
    return words + (f", itself below the {LOAD_FLOOR:g} GB/s floor" if m.value < LOAD_FLOOR else "")


@dataclass(frozen=True)
class MinExtraInfo:
    """The smallest ``extra_info[key]`` over one or more stored benches (every one must be stored), with the
    same-size copy's and traffic-mix stream's figures for the worst shape in its source (``same_size_ceilings``; with
    ``target``, the claim's own, a stream below it is marked)."""

    benches: tuple[str, ...]
    key: str
    target: float | None = None

    def __call__(self, view) -> Measured | NotMeasured:
        got = []
        for name in self.benches:
            m = ExtraInfo(name, self.key)(view)
            if isinstance(m, NotMeasured):
                return m
            got.append((m.value, name, m))
        _, name, worst = min(got, key=lambda vnm: vnm[0])
        over = f"min over {len(got)} shapes: " if len(got) > 1 else ""
        # its provenance and interval
        return replace(worst, source=over + worst.source + same_size_ceilings(view, name, self.target))

    def describe(self) -> str:
        if len(self.benches) == 1:
            return f"extra_info[{self.key}] of bench `{self.benches[0]}`"
        return f"min of extra_info[{self.key}] over benches " + ", ".join(f"`{b}`" for b in self.benches)


def _bw(kind: str, group: str, key: str = "pct_peak_bw", target: float = BW_TARGET, what: str = "") -> list[Claim]:
    """A kernel's claim on the largest matrix and on the layer's other shapes."""
    verb = {"dequant": "dequantize FP8 -> bf16", "requant": "requantize bf16 -> FP8 (dynamic scales)",
            "requant_delayed": "requantize bf16 -> FP8 with the previous call's per-tensor scale (one read)"}[kind]
    bench = f"test_fp8_{kind}"
    unit = "% of bandwidth peak" + (" (two-read bound)" if key == "pct_traffic_bw" else "")
    base = f"fp8.{kind}_bw_pct_{group}"
    ceiling_target = target if key == "pct_peak_bw" else None  # a two-read bound is not the stream's measure
    return [
        Claim(id=base, system="fp8", unit=unit, comparison=">=", target=target,
              statement=f"Triton {verb}, {group} scales, on a {BIG} matrix reaches >= {target:g}% of the card's "
                        f"bandwidth peak for its size (the fastest calibration kernel moving at least half its bytes)"
                        f"{what}",
              measure=MinExtraInfo((f"{bench}[{group}-{BIG}]",), key, ceiling_target)),
        Claim(id=f"{base}_other_shapes", system="fp8", unit=unit, comparison=">=", target=target,
              statement=f"Triton {verb}, {group} scales, reaches >= {target:g}% of the bandwidth peak{what} on every "
                        f"other matrix of a Llama-3-8B layer ({', '.join(OTHER)}): the worst",
              measure=MinExtraInfo(tuple(f"{bench}[{group}-{s}]" for s in OTHER), key, ceiling_target)),
    ]


def activation_share(view, model: str, group: str) -> str:
    """What rounding the activations alone costs ``model`` (weights unquantized, unsmoothed;
    ``models.<model>.activations_only.<group>``), in words: the share of a W8A8 change no weight rounding takes
    back; empty where the record has none."""
    rec = view.result("fp8", "quality")
    row = ((rec or {}).get("data", {}).get("models", {}).get(model, {}).get("activations_only") or {}).get(group)
    if not row or "ci95" not in row:
        return ""
    lo, hi = row["ci95"]
    return (f"; the {group} activations' rounding alone (weights unquantized): {row['delta_pct']:+.2f}% "
            f"[{lo:+.2f}, {hi:+.2f}], |.| <= {row['abs_hi']:.2f}")


def act_group(layout: str, mode: str) -> str:
    """How a layout rounds activations in ``mode`` (``activation_name`` of its weight scales, as vLLM runs such a
    checkpoint and as the quality record names it)."""
    return activation_name(LAYOUTS[layout].group, mode)


def _quality(model: str, layout: str, mode: str) -> Claim:
    target = QUALITY_TARGET[mode]
    acts = {"token": "per-token", "1x128": "per-token-group (1x128)"}.get(act_group(layout, mode))
    gptq = (f"codes rounded by GPTQ on {CALIB_TOKENS} calibration tokens at the best of {PLACEMENTS} FP8 grid "
            "placements per band of rows sharing scales")
    what = {"w8a16": f"weight-only FP8 (W8A16), {gptq}",
            "w8a8": f"FP8 weights and {acts} dynamic FP8 activations (W8A8), {gptq}, smoothed with SmoothQuant's "
                    "factors or not as those tokens choose"}
    row = f"models.{model}.layouts.{layout}.{RECIPE[mode]}"
    # the GPTQ calibration the statement names; a block layout's W8A8 figure counts only from a run that rounded its
    # activations in 1x128 groups
    needs = ((f"models.{model}.gptq.calib_tokens", CALIB_TOKENS), (f"models.{model}.gptq.placements", PLACEMENTS))
    needs += ((f"{row}.act_group", "1x128"),) if act_group(layout, mode) == "1x128" else ()
    value = ResultValue("fp8", "quality", f"{row}.abs_hi", requires=needs)
    return Claim(id=f"fp8.ppl_{mode}_{model}_{layout.replace('-', '_')}", system="fp8", unit="|% ppl change|",
                 comparison="<=", target=target,
                 statement=f"{MODELS[model]} with every decoder linear in {what[mode]}, {layout} layout: |perplexity "
                           f"change| vs the unquantized model on gensim's Wikipedia pages <= {target:g}% at the "
                           "conservative end of a 95% bootstrap interval over windows",
                 measure=value if mode == "w8a16" else Beside(
                     value, partial(activation_share, model=model, group=act_group(layout, mode)),
                     f"the activations' rounding alone ({act_group(layout, mode)})"))


CLAIMS = [
    *[c for g in ("tensor", "channel", "block") for c in _bw("dequant", g)],
    *[c for g in ("channel", "group", "block") for c in _bw("requant", g)],
    *_bw("requant", "tensor", "pct_traffic_bw", TWO_READ_TARGET,
         " counting both reads of x (amax pass, then quantize pass)"),
    *_bw("requant_delayed", "tensor"),
    Claim(id="fp8.gemm_speedup", system="fp8",
          statement="FP8 GEMM (torch._scaled_mm, per-tensor scales) is >= 1.6x faster than bf16 GEMM at 8192^3",
          unit="x", comparison=">=", target=1.6, seed_value=round(1364 / 763, 3), seed_unit="x (1364 / 763 TFLOP/s)",
          measure=BenchRatio(f"test_fp8_gemm[bf16-{GEMM}]", f"test_fp8_gemm[fp8-{GEMM}]")),
    Claim(id="fp8.linear_speedup", system="fp8",
          statement="Fp8Linear (per-channel weights, per-token activation quantization included) is >= 1.6x faster "
                    "than a bf16 linear at 8192^3",
          unit="x", comparison=">=", target=1.6,
          measure=BenchRatio(f"test_fp8_gemm[bf16-{GEMM}]", f"test_fp8_gemm[fp8-linear-{GEMM}]")),
    Claim(id="fp8.load_gbps", system="fp8",
          statement="Loading an FP8 checkpoint (two Llama-3-8B layers, page cache evicted) from safetensors to the "
                    f"GPU reaches >= {LOAD_FLOOR:g} GB/s (a floor; the number is the report)",
          unit="GB/s", comparison=">=", target=LOAD_FLOOR,
          measure=Beside(ExtraInfo("test_fp8_load[cold-pinned]", "gbps"), disk_speed,
                         f"the file system's own cold read of the same files (`{DISK_COLD}`)")),
    Claim(id="fp8.load_cold_vs_disk", system="fp8",
          statement="A cold load (page cache evicted) reaches >= 80% of the file system's own sequential read speed "
                    "of the same files in the same run (time of the plain read / time of the load)",
          unit="x disk read speed", comparison=">=", target=0.8,
          measure=BenchRatio("test_fp8_disk_read[cold]", "test_fp8_load[cold-pinned]")),
    Claim(id="fp8.load_warm_gbps", system="fp8",
          statement="A warm load (files in the page cache) moves >= 10 GB/s from safetensors to the GPU",
          unit="GB/s", comparison=">=", target=10.0, measure=ExtraInfo("test_fp8_load[warm-pinned]", "gbps")),
    Claim(id="fp8.load_peak_host", system="fp8",
          statement="The loader's peak host memory is <= 3.5x the largest tensor (measured: resident memory growth, "
                    "or the staging buffers counted where larger or where the machine reports no RSS), not the model",
          unit="x largest tensor", comparison="<=", target=3.5,
          # host_peak_over_largest is written by the chunked loader (staging.HostMemory); earlier records stored a
          # peak_host_over_largest of 0 where the machine reported no RssAnon, which is no measurement
          measure=ExtraInfo("test_fp8_load[warm-pinned]", "host_peak_over_largest")),
    *[_quality(m, lay, mode) for m in MODELS for lay in LAYOUTS for mode in QUALITY_TARGET],
]


# ---- inputs on which each claim must fail (the ledger's walker materializes them as a clean GPU run) --------------

def _bench(median: float, **extra) -> dict[str, Any]:
    return {"median": median, "rounds": [median * f for f in (0.99, 1.0, 1.01)], "extra_info": extra}


def _bad_quality() -> dict[str, Any]:
    def row(lay: str) -> dict[str, Any]:
        return {RECIPE[mode]: {"abs_hi": 5.0, "delta_pct": -4.0, "ci95": [-5.0, -3.0],
                               "act_group": act_group(lay, mode)} for mode in QUALITY_TARGET}
    acts = {g: {"abs_hi": 0.5, "delta_pct": 0.4, "ci95": [0.3, 0.5]} for g in ("token", "1x128")}
    gptq = {"calib_tokens": CALIB_TOKENS, "placements": PLACEMENTS}
    return {"models": {m: {"layouts": {lay: row(lay) for lay in LAYOUTS}, "gptq": gptq, "activations_only": acts}
                       for m in MODELS}, "complete": True}


def _failing(claim: Claim) -> Case:
    m = claim.measure.measure if isinstance(claim.measure, Beside) else claim.measure
    if isinstance(m, ExtraInfo):
        bad = {"pct_peak_bw": 80.0, "pct_traffic_bw": 80.0, "gbps": 1.0, "host_peak_over_largest": 8.0}[m.key]
        return Case(benches={m.bench: _bench(1e-3, **{m.key: bad})}, results={})
    if isinstance(m, MinExtraInfo):  # every shape fine but one
        return Case(benches={b: _bench(1e-3, **{m.key: 99.0 if i else 80.0}) for i, b in enumerate(m.benches)},
                    results={})
    if isinstance(m, BenchRatio):  # num / den = 0.5: half the speed-up, half the disk's speed
        return Case(benches={m.num: _bench(1e-3), m.den: _bench(2e-3)}, results={})
    if isinstance(m, ResultValue):  # a suspicious -4% (|delta| 5% at the interval's end) must fail too
        return Case(benches={}, results={f"{m.system}/{m.name}": _bad_quality()})
    raise TypeError(f"{claim.id}: no failing case for measure {type(m).__name__}")


FAILING_CASES: dict[str, Case] = {c.id: _failing(c) for c in CLAIMS}
