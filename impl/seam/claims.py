"""seam's ledger: ordered anchors, interpolating stitches, a selector whose promise holds on unseen images and saves
compute, with the recipe's time and the anchors' seed intervals as a table, and the plots.

All numbers come from ``python -m impl.seam.experiments`` on a GPU (``results/<gpu>/seam/*.json``): a claim reads only
records of one finished run (``complete: true``, one ``run_id`` across the records it needs). Comparisons that could
be noise judge the conservative end of a 95 % paired-bootstrap interval over the test images (each stitch's margin
above the anchors' line, the selector's promise).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impl.common.ledger import Case, Claim, Measured, NotMeasured, ResultValue
from impl.seam.plots import plot_accuracy_vs_cost, plot_selector_sweep

MIN_SEEDS = 3


@dataclass(frozen=True)
class RunValue:
    """``ResultValue("seam", name, key)`` from a finished run: every record in ``needs`` (and ``name``) present,
    ``complete: true`` and of the same ``run_id``; with ``min_seeds``, the anchors' order over at least that many."""

    name: str
    key: str
    needs: tuple[str, ...] = ()
    min_seeds: int | None = None

    def __call__(self, view) -> Measured | NotMeasured:
        recs = {n: view.result("seam", n) for n in (self.name, *self.needs)}
        missing = [n for n, r in recs.items() if r is None]
        if missing:
            return NotMeasured(f"no result file results/{view.slug}/seam/{missing[0]}.json")
        data = {n: r.get("data") if isinstance(r, dict) else None for n, r in recs.items()}
        bad = [n for n, d in data.items() if not isinstance(d, dict)]
        if bad:
            return NotMeasured(f"seam/{bad[0]}.json holds no data object")
        unfinished = [n for n, d in data.items() if d.get("complete") is not True]
        if unfinished:
            return NotMeasured(f"seam/{unfinished[0]}.json is not from a finished run of this recipe "
                               "(no complete: true)")
        runs = {d.get("run_id") for d in data.values()}
        if len(runs) != 1 or None in runs:
            return NotMeasured(f"seam records {sorted(data)} come from different runs "
                               f"(run_id {sorted(map(str, runs))})")
        if self.min_seeds is not None:
            order = (data.get("anchors") or data[self.name]).get("order") or {}
            if (order.get("seeds") or 0) < self.min_seeds:
                return NotMeasured(f"the anchors were trained with {order.get('seeds') or 0} seed(s); the claim needs "
                                   f"at least {self.min_seeds}")
        return ResultValue("seam", self.name, self.key)(view)

    def describe(self) -> str:
        return f"`{self.key}` in results/<gpu>/seam/{self.name}.json (a finished run)"


CLAIMS = [
    Claim(id="seam.anchor_order_margin_pp", system="seam",
          statement="ResNet50's mean test accuracy over at least three training seeds exceeds ResNet34's by more than "
                    "the larger of their seed ranges (max − min), both trained by the same recipe (margin = gap − "
                    "spread)",
          unit="pp", comparison=">", target=0.0,
          measure=RunValue("anchors", "order.margin_pp", min_seeds=MIN_SEEDS)),
    Claim(id="seam.interpolation_fraction", system="seam",
          statement="After family fine-tuning, the stitches of the ResNet34/ResNet50 family interpolate FLOPs and test "
                    "accuracy (rule, applied to every stitch: FLOPs inside the anchors' range, and accuracy on or "
                    "above their line minus 0.25 pp at the lower end of the stitch's 95 % paired-bootstrap interval "
                    "over the test images)",
          unit="% of stitches", comparison=">=", target=92.16, seed_value=92.16,
          measure=RunValue("interpolation", "percent_conservative", needs=("configs",))),
    Claim(id="seam.selector_promise_kept", system="seam",
          statement="For accuracy floors between the anchors' promises, the configuration the selector serves (chosen "
                    "on the validation split) meets its floor on the held-out test split (judged at the lower end of "
                    "the 95 % bootstrap interval over the test images)",
          unit="% of served floors", comparison=">=", target=95.0,
          measure=RunValue("selector", "summary.promise_ci95.lo", needs=("configs",))),
    Claim(id="seam.selector_flops_saving", system="seam",
          statement="Over the floors where a stitch cheaper than the anchor-only baseline's choice qualifies, the "
                    "selector's choice saves FLOPs against the baseline on average",
          unit="% FLOPs", comparison=">=", target=10.0,
          measure=RunValue("selector", "summary.mean_saving_percent_where_stitch_qualifies", needs=("configs",))),
]


def _record(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "complete": True, "run_id": "failing-case"}


_CONFIGS = _record({"rows": []})
FAILING_CASES: dict[str, Case] = {
    "seam.anchor_order_margin_pp": Case(results={"seam/anchors": _record(
        {"order": {"light": "r34", "heavy": "r50", "seeds": 3, "gap_pp": 0.3, "spread_pp": 0.5, "margin_pp": -0.2}})}),
    "seam.interpolation_fraction": Case(results={"seam/configs": _CONFIGS, "seam/interpolation": _record(
        {"percent": 100.0, "percent_conservative": 91.7, "percent_ci95": {"lo": 83.3, "hi": 100.0}})}),
    "seam.selector_promise_kept": Case(results={"seam/configs": _CONFIGS, "seam/selector": _record(
        {"summary": {"percent_promise_kept": 97.0, "promise_ci95": {"lo": 88.0, "hi": 100.0}}})}),
    "seam.selector_flops_saving": Case(results={"seam/configs": _CONFIGS, "seam/selector": _record(
        {"summary": {"mean_saving_percent_where_stitch_qualifies": 6.4}})}),
}


def plot_family(view, out_dir: Path) -> list[Path]:
    """Accuracy against FLOPs and latency, with the anchors' seed intervals (results/<gpu>/seam/*.json)."""
    configs, interp, anchors = (view.result("seam", n) for n in ("configs", "interpolation", "anchors"))
    if configs is None:
        return []
    return [plot_accuracy_vs_cost(configs["data"], interp and interp["data"], anchors and anchors["data"],
                                  Path(out_dir) / "seam_acc_vs_flops.png")]


def plot_selector(view, out_dir: Path) -> list[Path]:
    """Served GFLOPs against the accuracy floor, selector vs anchor-only baseline."""
    selector = view.result("seam", "selector")
    if selector is None or "floors" not in selector["data"]:
        return []
    return [plot_selector_sweep(selector["data"], Path(out_dir) / "seam_selector.png")]


def seam_tables(view) -> list[str]:
    """The anchors per seed (mean and 95 % interval), the whole recipe's time, and the selector's bound."""
    anchors, training, configs = (view.result("seam", n) for n in ("anchors", "training", "configs"))
    lines: list[str] = []
    if anchors and isinstance(anchors.get("data"), dict) and anchors["data"].get("per_arch"):
        d = anchors["data"]
        lines += ["| anchor | seeds | test accuracy per seed (%) | mean (%) | 95 % interval | range (pp) |",
                  "|---|---|---|---|---|---|"]
        for name, p in d["per_arch"].items():
            t = p["test_pct"]
            ci = f"{t['lo']:.2f} – {t['hi']:.2f}" if t.get("lo") is not None else "–"
            lines.append(f"| {name} | {t['n']} | {', '.join(f'{100 * a:.2f}' for a in p['acc_test'])} | "
                         f"{t['mean']:.2f} | {ci} | {t['range']:.2f} |")
        lines.append("")
    if training and isinstance(training.get("data"), dict) and "anchors_s" in training["data"]:
        t = training["data"]
        lines.append(f"Whole recipe (every anchor seed, stitch init, family fine-tune, BatchNorm statistics, "
                     f"evaluation): **{t['recipe_total_s']:.0f} s** on {training.get('device')} (anchors "
                     f"{t['anchors_s']:.0f} s, family {t['family']['seconds']:.0f} s), "
                     f"{'complete' if t.get('complete') else 'unfinished'} run.")
        lines.append("")
    if configs and isinstance(configs.get("data"), dict) and configs["data"].get("rows"):
        anchors_rows = sorted((r for r in configs["data"]["rows"] if r["is_anchor"]), key=lambda r: r["flops"])
        if len(anchors_rows) == 2:
            bound = 100 * (1 - anchors_rows[0]["flops"] / anchors_rows[1]["flops"])
            light, heavy = (r["name"] for r in anchors_rows)
            lines.append(f"No stitch inside the anchors' FLOPs range can save more than 1 − F({light})/F({heavy}) = "
                         f"{bound:.1f} % against the heavier anchor.")
            lines.append("")
    return lines


PLOTS = [plot_family, plot_selector]
TABLES = [seam_tables]
