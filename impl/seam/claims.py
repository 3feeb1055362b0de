"""seam's ledger: the seed's two claims (interpolation, lighter selection), training time, and the plots.

All numbers come from ``python -m impl.seam.experiments`` on the GPU (``results/<gpu>/seam/*.json``). The
interpolation rule is in ``impl.seam.measure`` (FLOPs within the anchors' range, accuracy on or above the anchors'
line minus 0.25 percentage points and at most the best anchor's plus 0.25).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from impl.common.ledger import Claim, NotMeasured, ResultValue
from impl.seam.plots import plot_accuracy_vs_flops, plot_selector_sweep


@dataclass(frozen=True)
class WithAnchorOrder:
    """``inner``, and where it is not measured, why in the anchors' terms: the strictly-lighter claim has no case
    when the heavier anchor is not the more accurate one (the baseline then never needs it)."""

    inner: ResultValue

    def __call__(self, view):
        got = self.inner(view)
        configs = view.result("seam", "configs")
        if not isinstance(got, NotMeasured) or configs is None:
            return got
        anchors = sorted((r for r in configs["data"]["rows"] if r["is_anchor"]), key=lambda r: r["flops"])
        if len(anchors) == 2 and anchors[1]["acc_test"] <= anchors[0]["acc_test"]:
            light, heavy = anchors
            return NotMeasured(f"no case: the heavier anchor {heavy['name']} ({heavy['flops'] / 1e9:.2f} GFLOPs, "
                               f"{100 * heavy['acc_test']:.2f}% test) is less accurate than {light['name']} "
                               f"({light['flops'] / 1e9:.2f} GFLOPs, {100 * light['acc_test']:.2f}%), so the anchor-only "
                               f"baseline never chooses it and no stitch lies between the anchors "
                               f"({got.reason})")
        return got

    def describe(self) -> str:
        return self.inner.describe()


CLAIMS = [
    Claim(id="seam.interpolation_fraction", system="seam",
          statement="Stitches of ResNet34/ResNet50 (every block boundary, both directions) interpolate FLOPs and test "
                    "accuracy after family fine-tuning on Fashion-MNIST (rule: within the anchors' ranges, on or "
                    "above their line, tolerance 0.25 pp)",
          unit="% of stitches", comparison=">=", target=92.16, seed_value=92.16,
          measure=ResultValue("seam", "interpolation", "percent")),
    Claim(id="seam.selector_lighter", system="seam",
          statement="For every accuracy constraint of the sweep, the selector serves a configuration with FLOPs <= "
                    "those of the anchor-only baseline's choice (ResNet34 or ResNet50)",
          unit="% of constraints", comparison=">=", target=100.0, seed_value=100.0,
          measure=ResultValue("seam", "selector", "summary.percent_lighter_or_equal")),
    Claim(id="seam.selector_strictly_lighter_where_between", system="seam",
          statement="Wherever a stitch lighter than the baseline's anchor meets the constraint, the selector's choice "
                    "is strictly lighter than the baseline's",
          unit="% of such constraints", comparison=">=", target=100.0,
          measure=WithAnchorOrder(ResultValue("seam", "selector",
                                              "summary.percent_strictly_lighter_where_stitch_between"))),
    Claim(id="seam.train_time_s", system="seam",
          statement="The whole training recipe (both anchors, least-squares init, family fine-tune, per-configuration "
                    "BatchNorm statistics) on one GPU, within the 5-minute budget",
          unit="s", comparison="<=", target=300.0,
          measure=ResultValue("seam", "training", "training_s")),
]


def plot_family(view, out_dir: Path) -> list[Path]:
    """Accuracy vs FLOPs of anchors and stitches (from results/<gpu>/seam/configs.json)."""
    configs, interp = view.result("seam", "configs"), view.result("seam", "interpolation")
    if configs is None:
        return []
    return [plot_accuracy_vs_flops(configs["data"], interp and interp["data"], Path(out_dir) / "seam_acc_vs_flops.png")]


def plot_selector(view, out_dir: Path) -> list[Path]:
    """Served GFLOPs vs accuracy constraint, selector vs anchor-only baseline."""
    selector = view.result("seam", "selector")
    if selector is None:
        return []
    return [plot_selector_sweep(selector["data"], Path(out_dir) / "seam_selector.png")]


PLOTS = [plot_family, plot_selector]
