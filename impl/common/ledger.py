"""The claims ledger: each performance or quality claim of a system is a ``Claim`` record.

A claim names its system, the statement, the seed's figure (where the seed gives one), how it is measured (a
``Measure`` over the stored results of one GPU kind), the comparison and the target. ``evaluate`` turns the ledger
into rows for ``claims.json``: ``verdict`` is ``pass``/``fail`` only for a real measurement on a GPU; everything else
is ``not measured`` with the reason.

Systems declare ``CLAIMS: list[Claim]`` (and optionally ``PLOTS``) in ``impl/<system>/claims.py``.
"""
from __future__ import annotations

import importlib
import json
import math
import operator
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from impl.common.benchkit import TIMING_EAGER, TIMING_QUEUED
from impl.common.results import RESULTS

SYSTEMS = ("examples", "sort", "join", "l2cache", "fp8", "kvstitch", "seam")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


@dataclass(frozen=True)
class Measured:
    value: float
    device: str
    commit: str
    date: str
    source: str


@dataclass(frozen=True)
class NotMeasured:
    reason: str


class Measure(Protocol):
    def __call__(self, view: "ResultsView") -> Measured | NotMeasured: ...
    def describe(self) -> str: ...


@dataclass(frozen=True)
class Claim:
    id: str
    system: str
    statement: str
    unit: str
    comparison: str
    target: float
    measure: Measure
    seed_value: float | None = None
    seed_unit: str | None = None
    needs_gpu: bool = True

    def __post_init__(self) -> None:
        if self.comparison not in _OPS:
            raise ValueError(f"claim {self.id}: comparison {self.comparison!r} is not one of {sorted(_OPS)}")
        if not self.id.startswith(self.system + "."):
            raise ValueError(f"claim id {self.id!r} must start with its system {self.system!r} and a dot")


class ResultsView:
    """Read-only view of ``results/<slug>/``: the newest stored run of each benchmark, experiment JSONs, calibration."""

    def __init__(self, slug: str, root: Path = RESULTS) -> None:
        self.slug = slug
        self.dir = root / slug
        self.benches: dict[str, dict[str, Any]] = {}
        self._load_benches()

    def _load_benches(self) -> None:
        if not self.dir.exists():
            return
        for path in sorted(self.dir.glob("*/[0-9][0-9][0-9][0-9]_*.json")):
            run = json.loads(path.read_text())
            meta = {"commit": (run.get("commit_info") or {}).get("id", "unknown")[:12],
                    "date": run.get("datetime", ""), "device": (run.get("machine_info") or {}).get("gpu") or "cpu",
                    "file": str(path.relative_to(self.dir))}
            for b in run.get("benchmarks", []):
                if b.get("stats") is None:
                    continue
                entry = {**b, "_meta": meta}
                self.benches[b["name"]] = entry  # files sort by run number: later runs win
                self.benches[b["fullname"]] = entry

    def bench(self, name: str) -> dict[str, Any] | None:
        return self.benches.get(name)

    def result(self, system: str, name: str) -> dict[str, Any] | None:
        path = self.dir / system / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def calibration(self) -> dict[str, Any] | None:
        path = self.dir / "calibration.json"
        return json.loads(path.read_text()) if path.exists() else None


# ---- measures -------------------------------------------------------------------------------------------------

def _bench_measured(entry: dict[str, Any], value: float, source: str) -> Measured:
    m = entry["_meta"]
    timing = (entry.get("extra_info") or {}).get("timing")
    if m["device"] != "cpu" and timing != TIMING_QUEUED:
        source += "; timed eager: the host's launch latency is inside the time" + (
            "" if timing == TIMING_EAGER else " (stored before the queued timer)")
    return Measured(value, m["device"], m["commit"], m["date"], source)


@dataclass(frozen=True)
class BenchStat:
    """A statistic of one stored benchmark, times ``scale`` (e.g. 1e3 for seconds to ms)."""

    bench: str
    stat: str = "median"
    scale: float = 1.0

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        e = view.bench(self.bench)
        if e is None:
            return NotMeasured(f"no stored result for benchmark {self.bench!r} in results/{view.slug}/")
        return _bench_measured(e, e["stats"][self.stat] * self.scale, f"{self.bench} ({e['_meta']['file']})")

    def describe(self) -> str:
        return f"{self.stat} of bench `{self.bench}`" + (f" × {self.scale:g}" if self.scale != 1 else "")


@dataclass(frozen=True)
class BenchRatio:
    """``stat(num) / stat(den)`` of two stored benchmarks (a speed-up when ``num`` is the slower one)."""

    num: str
    den: str
    stat: str = "median"

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        a, b = view.bench(self.num), view.bench(self.den)
        missing = [n for n, e in ((self.num, a), (self.den, b)) if e is None]
        if missing:
            return NotMeasured(f"no stored result for benchmark(s) {', '.join(map(repr, missing))} in results/{view.slug}/")
        value = a["stats"][self.stat] / b["stats"][self.stat]
        newest = max((a, b), key=lambda e: e["_meta"]["date"])
        return _bench_measured(newest, value, f"{self.num} / {self.den}")

    def describe(self) -> str:
        return f"{self.stat}(`{self.num}`) / {self.stat}(`{self.den}`)"


@dataclass(frozen=True)
class ExtraInfo:
    """A key of a stored benchmark's ``extra_info`` (e.g. ``pct_peak_bw``)."""

    bench: str
    key: str

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        e = view.bench(self.bench)
        if e is None:
            return NotMeasured(f"no stored result for benchmark {self.bench!r} in results/{view.slug}/")
        if self.key not in (e.get("extra_info") or {}):
            return NotMeasured(f"benchmark {self.bench!r} has no extra_info[{self.key!r}]")
        return _bench_measured(e, float(e["extra_info"][self.key]), f"{self.bench}.extra_info.{self.key}")

    def describe(self) -> str:
        return f"extra_info[{self.key}] of bench `{self.bench}`"


@dataclass(frozen=True)
class ResultValue:
    """A number inside an experiment result ``results/<slug>/<system>/<name>.json``, by a dotted key path in ``data``."""

    system: str
    name: str
    key: str

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        rec = view.result(self.system, self.name)
        if rec is None:
            return NotMeasured(f"no result file results/{view.slug}/{self.system}/{self.name}.json")
        value: Any = rec["data"]
        for part in self.key.split("."):
            if not isinstance(value, dict) or part not in value:
                return NotMeasured(f"{self.system}/{self.name}.json has no key {self.key!r}")
            value = value[part]
        if value is None:
            return NotMeasured(f"{self.system}/{self.name}.json: {self.key} is null")
        return Measured(float(value), rec.get("device", "cpu"), rec.get("commit", "unknown"), rec.get("date", ""),
                        f"{self.system}/{self.name}.json:{self.key}")

    def describe(self) -> str:
        return f"`{self.key}` in results/<gpu>/{self.system}/{self.name}.json"


@dataclass(frozen=True)
class NotYet:
    """A claim whose measurement does not exist yet; ``reason`` says why."""

    reason: str

    def __call__(self, view: ResultsView) -> NotMeasured:
        return NotMeasured(self.reason)

    def describe(self) -> str:
        return "not yet defined"


# ---- evaluation -----------------------------------------------------------------------------------------------

def claims_modules(systems: tuple[str, ...] = SYSTEMS) -> Iterator[tuple[str, Any]]:
    """``(system, impl.<system>.claims)`` for every system that has that module (where CLAIMS, PLOTS and TABLES
    live); a missing dependency inside one is an error, not a skip."""
    for system in systems:
        try:
            mod = importlib.import_module(f"impl.{system}.claims")
        except ModuleNotFoundError as e:
            if e.name in (f"impl.{system}", f"impl.{system}.claims"):
                continue
            raise
        yield system, mod


def load_claims(systems: tuple[str, ...] = SYSTEMS) -> list[Claim]:
    """Collect ``CLAIMS`` from ``impl/<system>/claims.py`` for every system that has one; ids must be unique."""
    claims: list[Claim] = []
    for _, mod in claims_modules(systems):
        claims.extend(getattr(mod, "CLAIMS", []))
    ids = [c.id for c in claims]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"duplicate claim ids: {sorted(dup)}")
    return claims


def evaluate(claim: Claim, view: ResultsView) -> dict[str, Any]:
    """One row of ``claims.json`` (keys as documented in the README)."""
    m = claim.measure(view)
    row: dict[str, Any] = {"id": claim.id, "system": claim.system, "statement": claim.statement,
                           "seed_value": claim.seed_value, "measured_value": None, "unit": claim.unit,
                           "comparison": claim.comparison, "target": claim.target, "verdict": "not measured",
                           "reason": None, "device": None, "commit": None, "date": None,
                           "method": claim.measure.describe(), "source": None}
    if isinstance(m, NotMeasured):
        row["reason"] = m.reason
        return row
    row.update(measured_value=_round(m.value), device=m.device, commit=m.commit, date=m.date, source=m.source)
    if claim.needs_gpu and (m.device or "cpu").lower() == "cpu":
        row["reason"] = "measured on a CPU; a GPU claim needs a GPU measurement"
    elif not math.isfinite(m.value):
        row["reason"] = f"measurement is {m.value}"
    else:
        row["verdict"] = "pass" if _OPS[claim.comparison](m.value, claim.target) else "fail"
    return row


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def discover_systems() -> tuple[str, ...]:
    import impl

    found = [m.name for m in pkgutil.iter_modules(impl.__path__) if m.ispkg and m.name != "common"]
    return tuple(s for s in SYSTEMS if s in found) + tuple(sorted(set(found) - set(SYSTEMS)))
