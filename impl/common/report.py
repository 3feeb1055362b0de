"""Evaluate the claims ledger against ``results/<slug>/`` into ``claims.json`` and ``REPORT.md`` (with PNG plots).

The report is a pure function of the stored results and the ledger: re-rendering it on any machine gives the same
files, so a CPU-only CI run can re-render a GPU's report without changing it. Dates and commits in it are those of
the measurements, not of the rendering. A file that cannot be read, or a plot or table that fails on what it reads,
is listed under "Problems" and the rest renders. A card other than ``CURRENT_CARD`` gets a history banner.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from impl.common.ledger import ResultsView, discover_systems, evaluate, load_claims, report_modules
from impl.common.results import CURRENT_CARD, RESULTS, atomic_write_bytes, atomic_write_text

VERDICT_MARK = {"pass": "✅ pass", "fail": "❌ fail", "not measured": "— not measured"}


def render(slug: str, root: Path = RESULTS) -> dict[str, Any]:
    """Write ``claims.json``, ``REPORT.md`` and plots for one GPU slug; return a summary of verdicts."""
    view = ResultsView(slug, root)
    systems = discover_systems()
    claims = load_claims(systems)
    rows = [evaluate(c, view) for c in claims]
    out = Path(root) / slug
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "claims.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n", overwrite=True)
    problems: list[str] = []
    plots = _draw_plots(systems, view, out, problems)
    tables = _tables(systems, view, problems)
    atomic_write_text(out / "REPORT.md", _markdown(slug, view, rows, plots, tables, problems), overwrite=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICT_MARK}
    return {"slug": slug, "claims": len(rows), **counts, "dir": str(out), "problems": _problem_lines(view, problems)}


def _guarded(what: str, fn: Callable[[], Any], problems: list[str], empty: Any) -> Any:
    """``fn()``, or ``empty`` with the failure listed: one plot or table that cannot read its data must not stop the
    report (its claims already say why they are not measured)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the report itself, never swallowed silently
        problems.append(f"{what} not drawn: {type(e).__name__}: {e}")
        return empty


def _tables(systems: tuple[str, ...], view: ResultsView, problems: list[str]) -> dict[str, list[str]]:
    """Markdown lines from each system's ``TABLES`` (``fn(view) -> lines``; empty when its results are absent)."""
    made = {system: [line for table in getattr(mod, "TABLES", [])
                     for line in _guarded(f"table {system}.{table.__name__}", lambda t=table: t(view), problems, [])]
            for system, mod in report_modules(systems)}
    return {k: v for k, v in made.items() if v}


def _draw_plots(systems: tuple[str, ...], view: ResultsView, out: Path, problems: list[str]) -> dict[str, list[Path]]:
    return {system: [p for plot in getattr(mod, "PLOTS", [])
                     for p in _guarded(f"plot {system}.{plot.__name__}", lambda f=plot: _run_plot(f, view, out),
                                       problems, [])]
            for system, mod in report_modules(systems)}


def _run_plot(plot: Callable[..., list[Path]], view: ResultsView, out: Path) -> list[Path]:
    # Plots draw into a scratch dir; only changed PNGs replace the stored ones (atomic, and stable across renders).
    with tempfile.TemporaryDirectory() as tmp:
        made = plot(view, Path(tmp)) or []
        kept = []
        for p in made:
            dest = out / Path(p).name
            atomic_write_bytes(dest, Path(p).read_bytes(), overwrite=True)
            kept.append(dest)
        return kept


def _problem_lines(view: ResultsView, problems: list[str]) -> list[str]:
    return ([f"`{p}` unreadable: {why}" for p, why in sorted(view.unreadable.items())]
            + [f"`{p}` ignored: {why}" for p, why in sorted(view.ignored.items())] + problems)


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _measured(r: dict[str, Any]) -> str:
    if r["measured_value"] is None:
        return "—"
    text = f"{_fmt(r['measured_value'])} {r['unit']}"
    if r.get("interval"):
        lo, hi = r["interval"]
        text += f" [{_fmt(lo)}, {_fmt(hi)}]"
    return text


def _commit(r: dict[str, Any]) -> str:
    commits = list(dict.fromkeys(p["commit"] + (f" (rescored at {p['rescored_commit']})" if p.get("rescored_commit")
                                                else "") for p in r.get("provenance") or []))
    return " + ".join(commits) if commits else _fmt(r["commit"])


def _markdown(slug: str, view: ResultsView, rows: list[dict[str, Any]], plots: dict[str, list[Path]],
              tables: dict[str, list[str]] | None = None, problems: list[str] | None = None) -> str:
    lines = [f"# Claims report — `{slug}`", ""]
    if slug not in (CURRENT_CARD, "cpu"):
        lines += [f"> **History: this card is no longer lent.** The current card's report is "
                  f"[`results/{CURRENT_CARD}/REPORT.md`](../{CURRENT_CARD}/REPORT.md); this one stays as the record "
                  "of what was measured here.", ""]
    lines += _header(slug, view)
    lines += ["## Claims", "",
              "Measured: the estimate, and in brackets its 95% interval where it could be noise; the verdict judges "
              "the interval's end the comparison needs (the lower end for >=, the upper for <=). Each verdict is "
              "about the code of the commit beside it: `python -m impl stale` says which systems' code has changed "
              "since (from git history, so not written here).", "",
              "| claim | statement | seed | measured | target | verdict | card | date | commit |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = VERDICT_MARK[r["verdict"]]
        lines.append(f"| `{r['id']}` | {r['statement']} | {_fmt(r['seed_value'])} | {_measured(r)} | "
                     f"{r['comparison']} {_fmt(r['target'])} {r['unit']} | {verdict} | {_fmt(r['device'])} | "
                     f"{_fmt((r['date'] or '')[:10] or None)} | {_commit(r)} |")
    lines += ["", "## How each claim is measured, and why some are not", ""]
    for r in rows:
        why = f" — **not measured:** {r['reason']}" if r["verdict"] == "not measured" else ""
        src = f" (source: {r['source']})" if r["source"] else ""
        sides = r.get("provenance") or []
        prov = (" — read: " + "; ".join(f"`{p['what']}` from {p['file']} ({p['device']}, commit {p['commit']}, "
                                         f"{p['date'][:19]})" for p in sides)) if len(sides) > 1 else ""
        lines.append(f"- `{r['id']}`: {r['method']}{src}{prov}{why}")
    lines += _bench_table(view)
    for system, table in (tables or {}).items():
        lines += ["", f"## Tables: {system}", ""] + table
    for system, pngs in plots.items():
        if not pngs:
            continue
        lines += ["", f"## Plots: {system}", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    found = _problem_lines(view, problems or [])
    if found:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in found]
    return "\n".join(lines) + "\n"


def _header(slug: str, view: ResultsView) -> list[str]:
    cal = view.calibration()
    if slug == "cpu" or not view.dir.exists():
        return ["No GPU results here: every GPU claim is *not measured*. Nothing measured on a CPU can pass a GPU "
                "claim.", ""]
    lines = []
    if cal:
        p = cal["peaks"]
        held = ("each bench is held against the best that moves at least half its bytes" if p.get("bw_kernel_bytes")
                else "this calibration predates kernel sizes: each bench is held against it")
        peak = (f"; bandwidth peak {_fmt(p['bw_peak_gbps'])} GB/s (best calibration kernel; {held})"
                if p.get("bw_peak_gbps") else "")
        lines += [f"Card: **{cal.get('device', '?')}** · calibration {str(cal.get('date', ''))[:10]} (commit "
                  f"{cal.get('commit', '?')}): copy {_fmt(p.get('copy_gbps'))} GB/s, bf16 GEMM "
                  f"{_fmt(p.get('bf16_tflops'))} TFLOP/s, fp8 GEMM {_fmt(p.get('fp8_tflops'))} TFLOP/s, H2D pinned "
                  f"{_fmt(p.get('h2d_pinned_gbps'))} / pageable {_fmt(p.get('h2d_pageable_gbps'))} GB/s{peak}.", ""]
    elif "calibration.json" in view.unreadable:
        lines += [f"calibration.json unreadable ({view.unreadable['calibration.json']}).", ""]
    return lines


def _bench_table(view: ResultsView) -> list[str]:
    entries = {e["fullname"]: e for e in view.benches.values()}
    if not entries:
        return []
    lines = ["", "## Stored benchmarks (newest run of each)", "",
             "GB/s from compulsory bytes (each input read once, each output written once); traffic GB/s where a "
             "variant moves more; % of the calibrated peak for the bench's bytes (its peak in the source of each "
             "claim).", "",
             "| benchmark | median | GB/s | traffic GB/s | % BW peak | TFLOP/s | % GEMM peak | card | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(entries):
        e = entries[name]
        x = e.get("extra_info") or {}
        lines.append(f"| `{e['name']}` | {_time(e['stats']['median'])} | {_fmt(x.get('gbps'))} | "
                     f"{_fmt(x.get('traffic_gbps'))} | {_fmt(x.get('pct_peak_bw'))} | {_fmt(x.get('tflops'))} | "
                     f"{_fmt(x.get('pct_peak_flops'))} | {e['_meta']['device']} | {e['_meta']['commit']} |")
    return lines


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds / 1e-9:.4g} ns"


def slugs_with_results(root: Path = RESULTS) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "cpu") if root.exists() else []
