"""The lines every plot of the suite shares: pyplot on the Agg backend, a figure for a stored record, and
save-then-close."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib.pyplot on the Agg backend (plots are written to files; no machine here has a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, *, dpi: int = 120) -> list[Path]:
    """Lay out, write ``path`` and close ``fig`` (the report draws many plots in one process); returns ``[path]``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return [Path(path)]


def record_figure(view: Any, system: str, name: str, **subplots: Any) -> tuple[dict, Any, Any] | None:
    """The stored record ``results/<slug>/<system>/<name>.json`` of ``view`` with a new figure and its axes
    (``plt.subplots(**subplots)``); None when the record is missing, so the plot is skipped."""
    rec = view.result(system, name)
    if rec is None:
        return None
    fig, ax = pyplot().subplots(**subplots)
    return rec, fig, ax
