"""Evaluate the claims ledger against ``results/<slug>/`` into ``claims.json`` and ``REPORT.md`` (with PNG plots).

The report is a pure function of the stored results and the ledger: re-rendering it on any machine gives the same
files, so a CPU-only CI run can re-render the H100 report without changing it. Dates and commits in it are those of
the measurements, not of the rendering.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from impl.common.ledger import ResultsView, claims_modules, discover_systems, evaluate, load_claims
from impl.common.results import RESULTS, atomic_write_bytes, atomic_write_text

VERDICT_MARK = {"pass": "✅ pass", "fail": "❌ fail", "not measured": "— not measured"}


def render(slug: str, root: Path = RESULTS) -> dict[str, Any]:
    """Write ``claims.json``, ``REPORT.md`` and plots for one GPU slug; return a summary of verdicts."""
    view = ResultsView(slug, root)
    systems = discover_systems()
    claims = load_claims(systems)
    rows = [evaluate(c, view) for c in claims]
    out = root / slug
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "claims.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n", overwrite=True)
    plots = _draw_plots(systems, view, out)
    tables = _tables(systems, view)
    atomic_write_text(out / "REPORT.md", _markdown(slug, view, rows, plots, tables), overwrite=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICT_MARK}
    return {"slug": slug, "claims": len(rows), **counts, "dir": str(out)}


def _tables(systems: tuple[str, ...], view: ResultsView) -> dict[str, list[str]]:
    """Markdown lines from each system's ``TABLES`` (``fn(view) -> lines``; empty when its results are absent)."""
    made = {system: [line for table in getattr(mod, "TABLES", []) for line in table(view)]
            for system, mod in claims_modules(systems)}
    return {k: v for k, v in made.items() if v}


def _draw_plots(systems: tuple[str, ...], view: ResultsView, out: Path) -> dict[str, list[Path]]:
    return {system: [p for plot in getattr(mod, "PLOTS", []) for p in _run_plot(plot, view, out)]
            for system, mod in claims_modules(systems)}


def _run_plot(plot: Callable[..., list[Path]], view: ResultsView, out: Path) -> list[Path]:
    import tempfile

    # Plots draw into a scratch dir; only changed PNGs replace the stored ones (atomic, and stable across renders).
    with tempfile.TemporaryDirectory() as tmp:
        made = plot(view, Path(tmp)) or []
        kept = []
        for p in made:
            dest = out / Path(p).name
            atomic_write_bytes(dest, Path(p).read_bytes(), overwrite=True)
            kept.append(dest)
        return kept


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _markdown(slug: str, view: ResultsView, rows: list[dict[str, Any]], plots: dict[str, list[Path]],
              tables: dict[str, list[str]] | None = None) -> str:
    lines = [f"# Claims report — `{slug}`", ""]
    lines += _header(slug, view)
    lines += ["## Claims", "",
              "| claim | statement | seed | measured | target | verdict | card | date | commit |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = f"{_fmt(r['measured_value'])} {r['unit']}" if r["measured_value"] is not None else "—"
        verdict = VERDICT_MARK[r["verdict"]]
        lines.append(f"| `{r['id']}` | {r['statement']} | {_fmt(r['seed_value'])} | {measured} | "
                     f"{r['comparison']} {_fmt(r['target'])} {r['unit']} | {verdict} | {_fmt(r['device'])} | "
                     f"{_fmt((r['date'] or '')[:10] or None)} | {_fmt(r['commit'])} |")
    lines += ["", "## How each claim is measured, and why some are not", ""]
    for r in rows:
        why = f" — **not measured:** {r['reason']}" if r["verdict"] == "not measured" else ""
        src = f" (source: {r['source']})" if r["source"] else ""
        lines.append(f"- `{r['id']}`: {r['method']}{src}{why}")
    lines += _bench_table(view)
    for system, table in (tables or {}).items():
        lines += ["", f"## Tables: {system}", ""] + table
    for system, pngs in plots.items():
        if not pngs:
            continue
        lines += ["", f"## Plots: {system}", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


def _header(slug: str, view: ResultsView) -> list[str]:
    cal = view.calibration()
    if slug == "cpu" or not view.dir.exists():
        return ["No GPU results here: every GPU claim is *not measured*. Nothing measured on a CPU can pass a GPU "
                "claim.", ""]
    lines = []
    if cal:
        p = cal["peaks"]
        lines += [f"Card: **{cal['device']}** · calibration {cal['date'][:10]} (commit {cal['commit']}): copy "
                  f"{_fmt(p.get('copy_gbps'))} GB/s, bf16 GEMM {_fmt(p.get('bf16_tflops'))} TFLOP/s, fp8 GEMM "
                  f"{_fmt(p.get('fp8_tflops'))} TFLOP/s, H2D pinned {_fmt(p.get('h2d_pinned_gbps'))} / pageable "
                  f"{_fmt(p.get('h2d_pageable_gbps'))} GB/s.", ""]
    return lines


def _bench_table(view: ResultsView) -> list[str]:
    entries = {e["fullname"]: e for e in view.benches.values()}
    if not entries:
        return []
    lines = ["", "## Stored benchmarks (newest run of each)", "",
             "| benchmark | median | GB/s | % copy peak | TFLOP/s | % GEMM peak | card | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for name in sorted(entries):
        e = entries[name]
        x = e.get("extra_info") or {}
        lines.append(f"| `{e['name']}` | {_time(e['stats']['median'])} | {_fmt(x.get('gbps'))} | "
                     f"{_fmt(x.get('pct_peak_bw'))} | {_fmt(x.get('tflops'))} | {_fmt(x.get('pct_peak_flops'))} | "
                     f"{e['_meta']['device']} | {e['_meta']['commit']} |")
    return lines


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds / 1e-9:.4g} ns"


def slugs_with_results(root: Path = RESULTS) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "cpu") if root.exists() else []
