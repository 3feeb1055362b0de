"""seam's ledger: ordered anchors, interpolating stitches, a selector whose promise holds on unseen images and saves
compute (the recipe's time, the anchors' seed intervals and the figures: ``plots.py``).

All numbers come from ``python -m impl.seam.experiments`` on a GPU (``results/<gpu>/seam/*.json``): a claim reads only
records of one finished run (``complete: true``, one ``run_id`` across the records it needs). Comparisons that could
be noise judge the conservative end of a 95 % paired-bootstrap interval over the test images (each stitch's margin
above the anchors' line, the selector's promise).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from impl.common.ledger import Case, Claim, Measured, NotMeasured, ResultValue

MIN_SEEDS = 3


@dataclass(frozen=True)
class RunValue:
    """``ResultValue("seam", name, key)`` from a finished run: every record in ``needs`` (and ``name``) present,
    ``complete: true`` and of the same ``run_id``; with ``min_seeds``, the anchors' order over at least that many.
    ``zero_when_none``: a count key of the same record; when ``key`` (a mean over those items) is null because the
    count is 0, the value is 0 (the run found nothing to average: nothing saved), not "not measured"."""

    name: str
    key: str
    needs: tuple[str, ...] = ()
    min_seeds: int | None = None
    zero_when_none: str | None = None

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
        got = ResultValue("seam", self.name, self.key)(view)
        if isinstance(got, NotMeasured) and self.zero_when_none:
            count = ResultValue("seam", self.name, self.zero_when_none)(view)
            if isinstance(count, Measured) and count.value == 0:
                return replace(count, value=0.0, note=f"{self.zero_when_none} is 0: {self.key} averages nothing")
        return got

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
          measure=RunValue("selector", "summary.mean_saving_percent_where_stitch_qualifies", needs=("configs",),
                           zero_when_none="summary.floors_where_stitch_qualifies")),
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
