"""The claims ledger: each performance or quality claim of a system is a ``Claim`` record.

A claim names its system, the statement, the seed's figure (where the seed gives one), how it is measured (a
``Measure`` over the stored results of one GPU kind), the comparison and the target. ``evaluate`` turns the ledger
into rows for ``claims.json``: ``verdict`` is ``pass``/``fail`` only for a real measurement on a GPU; everything else
is ``not measured`` with the reason.

Rules every verdict obeys (each has a test in ``correctness/test_ledger*.py``):

* Provenance: every record a measurement reads must come from a clean commit of this repository (no ``+dirty``, not
  ``unknown``, a commit git knows where git and its full history are available), from a finished run (an
  experiment record with ``complete: false`` is not measured), on this folder's card (a CPU run never feeds a GPU
  claim). A ratio or difference takes both sides from one run (one stored bench file) and shows both sides.
* Noise: a comparison that could be noise carries an interval and the verdict judges its conservative end (the lower
  end for ``>=``/``>``, the upper for ``<=``/``<``). Bench medians get distribution-free order-statistic intervals
  from their stored rounds (``impl.common.stats``); experiment differences store their own (paired bootstrap) and
  are read with ``ResultInterval``. A "best of many" figure passes only when re-measured in a fresh run
  (``Reselected``).
* Peaks: a figure above 100% of its calibrated peak is not a measurement (its byte/FLOP count or the calibration is
  wrong); the row says which is likelier.
* Unreadable files (truncated JSON, a list where an object belongs) make the claims they feed not measured with the
  file and the reason; everything else still renders.

Systems declare ``CLAIMS: list[Claim]`` and ``FAILING_CASES: dict[str, Case]`` (one stored-result input per claim on
which its verdict must be "fail") in ``impl/<system>/claims.py``, and optionally ``PLOTS``/``TABLES`` (figures and
tables of the report, functions of a ``ResultsView``) in ``impl/<system>/plots.py`` (``report_modules``).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import math
import operator
import pkgutil
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from impl.common.benchkit import TIMING_EAGER, TIMING_QUEUED, bandwidth_peak, over_peak_message
from impl.common.results import RESULTS, commit_exists, slugify_gpu
from impl.common.stats import Interval, median_interval, ratio_interval, summary_interval

# Every system, in report order; ``discover_systems`` checks that the packages under impl/ are exactly these.
SYSTEMS = ("examples", "sort", "join", "l2cache", "fp8", "kvstitch", "seam", "serve")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
LEVEL = 0.95  # coverage of every interval a verdict judges
RATE_KEYS = {"gbps": -1, "tflops": -1, "pct_peak_bw": -1, "pct_peak_flops": -1, "traffic_gbps": -1}  # ∝ 1 / time
PEAK_PCT_KEYS = ("pct_peak_bw", "pct_peak_flops")


@dataclass(frozen=True)
class Provenance:
    """Where one side of a measurement comes from: what was read (a bench name or a record's key), the file
    (relative to results/<slug>/), the run it belongs to (a bench file is one pytest run), device, commit (``+dirty``
    when the tree had changes), date, and whether the run finished. ``rescored_commit``: the commit that recomputed
    derived values of the record (kvstitch rescore)."""

    what: str
    file: str
    run: str
    device: str
    commit: str
    date: str
    complete: bool = True
    rescored_commit: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Measured:
    value: float
    device: str
    commit: str
    date: str
    source: str
    provenance: tuple[Provenance, ...] = ()
    interval: Interval | None = None
    note: str | None = None  # how the interval was made, when that matters (e.g. from min/max of old records)


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


# ---- reading results/<slug>/ ----------------------------------------------------------------------------------

def _parse_date(text: str) -> dt.datetime | None:
    try:
        d = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


class ResultsView:
    """Read-only view of ``results/<slug>/``: the newest stored run of each benchmark (runs ordered by their recorded
    date), experiment JSONs, calibration; files that cannot be read are listed in ``unreadable`` (path -> why), runs
    of another card in ``ignored``."""

    def __init__(self, slug: str, root: Path = RESULTS) -> None:
        self.slug = slug
        self.dir = Path(root) / slug
        self.benches: dict[str, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []
        self.unreadable: dict[str, str] = {}
        self.ignored: dict[str, str] = {}
        self._results: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._load_benches()

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.dir))

    def _read_json(self, path: Path, expect: type) -> Any:
        """The parsed file, or None (and the reason in ``unreadable``)."""
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self.unreadable[self._rel(path)] = _why(e)
            return None
        if not isinstance(obj, expect):
            self.unreadable[self._rel(path)] = f"holds a JSON {type(obj).__name__}, not an object"
            return None
        return obj

    def _load_benches(self) -> None:
        if not self.dir.exists():
            return
        runs = []
        for path in sorted(self.dir.glob("*/[0-9][0-9][0-9][0-9]_*.json")):
            run = self._read_json(path, dict)
            if run is None:
                continue
            meta = self._run_meta(run, path)
            if meta is None:
                continue
            runs.append((meta, run))
        # Later runs win: by the date each run recorded, not by file name (numbers restart per machine folder)
        runs.sort(key=lambda mr: (mr[0]["_when"], mr[0]["file"]))
        for meta, run in runs:
            entries = {}
            for b in run["benchmarks"]:
                if not isinstance(b, dict) or not isinstance(b.get("stats"), dict) or "name" not in b or \
                        not isinstance(b["stats"].get("median"), (int, float)):
                    continue  # a bench that errored before timing stores no stats
                entry = {**b, "_meta": meta}
                entries[b["name"]] = entry
                self.benches[b["name"]] = entry
                self.benches[b.get("fullname", b["name"])] = entry
            self.runs.append({**meta, "benches": entries})

    def _run_meta(self, run: dict[str, Any], path: Path) -> dict[str, Any] | None:
        rel = self._rel(path)
        if not isinstance(run.get("benchmarks"), list):
            self.unreadable[rel] = "no 'benchmarks' list (not a pytest-benchmark run)"
            return None
        when = _parse_date(run.get("datetime", ""))
        if when is None:
            self.unreadable[rel] = f"no readable 'datetime' ({run.get('datetime')!r}): its order among runs is unknown"
            return None
        info = run.get("commit_info") or {}
        machine = run.get("machine_info") or {}
        device = machine.get("gpu") or "cpu"
        if (device == "cpu") != (self.slug == "cpu"):
            self.ignored[rel] = (f"a run on {'a CPU' if device == 'cpu' else device} in results/{self.slug}/: "
                                 "never read (CPU numbers and GPU numbers are kept apart)")
            return None
        commit = (info.get("id") or "unknown")[:12] + ("+dirty" if info.get("dirty") else "")
        return {"commit": commit, "date": run.get("datetime", ""), "device": device, "file": rel, "_when": when,
                "calibration": machine.get("calibration") if isinstance(machine.get("calibration"), dict) else None}

    def bench(self, name: str) -> dict[str, Any] | None:
        return self.benches.get(name)

    def result(self, system: str, name: str) -> dict[str, Any] | None:
        """The record ``<system>/<name>.json`` (an object with a ``data`` object), or None when it is absent or
        unreadable (then ``result_problem`` says why)."""
        key = (system, name)
        if key not in self._results:
            path = self.dir / system / f"{name}.json"
            rec = self._read_json(path, dict) if path.exists() else None
            if rec is not None and not isinstance(rec.get("data"), dict):
                self.unreadable[self._rel(path)] = "its 'data' is not a JSON object"
                rec = None
            self._results[key] = rec
        return self._results[key]

    def result_problem(self, system: str, name: str) -> str | None:
        self.result(system, name)
        return self.unreadable.get(f"{system}/{name}.json")

    def calibration(self) -> dict[str, Any] | None:
        path = self.dir / "calibration.json"
        if not path.exists():
            return None
        cal = self._read_json(path, dict)
        if cal is not None and not isinstance(cal.get("peaks"), dict):
            self.unreadable["calibration.json"] = "no 'peaks' object"
            return None
        return cal

    def unreadable_bench_files(self) -> dict[str, str]:
        return {p: w for p, w in self.unreadable.items() if re.fullmatch(r"[^/]+/[0-9]{4}_[^/]*\.json", p)}

    def no_bench_reason(self, names: list[str]) -> str:
        why = f"no stored result for benchmark(s) {', '.join(map(repr, names))} in results/{self.slug}/"
        return why + "".join(f"; {p} unreadable ({w})" for p, w in sorted(self.unreadable_bench_files().items()))

    def bench_files_problem(self) -> str | None:
        """A stored bench file that cannot be read may hold a newer run of any bench: then no bench is judged."""
        bad = self.unreadable_bench_files()
        if not bad:
            return None
        return "; ".join(f"{p} unreadable ({w})" for p, w in sorted(bad.items())) + (
            ": it may hold a newer run of this bench, so no stored bench is judged until it is fixed or removed")


# ---- measures -------------------------------------------------------------------------------------------------

def bench_rounds(entry: dict[str, Any]) -> list[float] | None:
    """Per-round seconds of a stored bench (``extra_info.rounds_s``, or pytest-benchmark's ``stats.data`` when saved
    with ``--benchmark-save-data``); None for runs stored without them."""
    for rounds in ((entry.get("extra_info") or {}).get("rounds_s"), entry["stats"].get("data")):
        if isinstance(rounds, list) and rounds and all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0
                                                       for x in rounds):
            return [float(x) for x in rounds]
    return None


def bench_interval(entry: dict[str, Any], level: float = LEVEL) -> tuple[Interval, str | None]:
    """The median's interval from the stored rounds; for runs stored without them, from the stored quartiles where
    those certainly contain it, else from the min and max round (wider; see ``impl.common.stats.summary_interval``)."""
    rounds = bench_rounds(entry)
    if rounds:
        return median_interval(rounds, level), None
    s = entry["stats"]
    iv = summary_interval(float(s["median"]), int(s.get("rounds") or 1), s.get("q1"), s.get("q3"),
                          float(s.get("min", s["median"])), float(s.get("max", s["median"])), level)
    basis = "quartiles" if (iv.lo, iv.hi) != (s.get("min"), s.get("max")) else "min and max round"
    return iv, f"{entry['name']} stored without per-round times: interval from its {basis}"


def _provenance(entry: dict[str, Any]) -> Provenance:
    m = entry["_meta"]
    return Provenance(what=entry["name"], file=m["file"], run=m["file"], device=m["device"], commit=m["commit"],
                      date=m["date"])


def _bench_measured(entry: dict[str, Any], value: float, source: str, *, interval: Interval | None = None,
                    note: str | None = None, others: tuple[dict[str, Any], ...] = ()) -> Measured:
    m = entry["_meta"]
    for e in (entry, *others):
        timing = (e.get("extra_info") or {}).get("timing")
        if e["_meta"]["device"] != "cpu" and timing != TIMING_QUEUED:
            source += f"; {e['name']} timed eager: the host's launch latency is inside the time" + (
                "" if timing == TIMING_EAGER else " (stored before the queued timer)")
    prov = tuple(_provenance(e) for e in (entry, *others))
    return Measured(value, m["device"], m["commit"], m["date"], source, prov, interval, note)


@dataclass(frozen=True)
class BenchStat:
    """A statistic of one stored benchmark, times ``scale`` (e.g. 1e3 for seconds to ms); the median carries its
    order-statistic interval."""

    bench: str
    stat: str = "median"
    scale: float = 1.0

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        e = view.bench(self.bench)
        if e is None:
            return NotMeasured(view.no_bench_reason([self.bench]))
        if view.bench_files_problem():
            return NotMeasured(view.bench_files_problem())
        iv, note = bench_interval(e) if self.stat == "median" else (None, None)
        return _bench_measured(e, e["stats"][self.stat] * self.scale, f"{self.bench} ({e['_meta']['file']})",
                               interval=iv.scaled(self.scale) if iv else None, note=note)

    def describe(self) -> str:
        return f"{self.stat} of bench `{self.bench}`" + (f" × {self.scale:g}" if self.scale != 1 else "")


@dataclass(frozen=True)
class BenchRatio:
    """``median(num) / median(den)`` of two benchmarks of one stored run (a speed-up when ``num`` is the slower
    one), with the distribution-free interval of a ratio of medians from both benches' rounds."""

    num: str
    den: str

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        a, b = view.bench(self.num), view.bench(self.den)
        missing = [n for n, e in ((self.num, a), (self.den, b)) if e is None]
        if missing:
            return NotMeasured(view.no_bench_reason(missing))
        if view.bench_files_problem():
            return NotMeasured(view.bench_files_problem())
        fa, fb = a["_meta"]["file"], b["_meta"]["file"]
        if fa != fb:
            return NotMeasured(f"the newest {self.num!r} is from {fa} ({a['_meta']['date'][:19]}) and the newest "
                               f"{self.den!r} from {fb} ({b['_meta']['date'][:19]}): a ratio takes both sides from one "
                               "run; run both benches in one pytest session")
        each = 1 - (1 - LEVEL) / 2  # both sides' intervals hold together with probability >= LEVEL
        (ia, na), (ib, nb) = bench_interval(a, each), bench_interval(b, each)
        ra, rb = bench_rounds(a), bench_rounds(b)
        if ra and rb:
            iv = ratio_interval(ra, rb, LEVEL)
        else:  # a side stored without rounds: combine the two (wider) intervals the same way
            iv = Interval(ia.point / ib.point, ia.lo / ib.hi, ia.hi / ib.lo, max(0.0, ia.coverage + ib.coverage - 1))
        note = "; ".join(n for n in (na, nb) if n) or None
        return _bench_measured(a, a["stats"]["median"] / b["stats"]["median"], f"{self.num} / {self.den} ({fa})",
                               interval=iv, note=note, others=(b,))

    def describe(self) -> str:
        return f"median(`{self.num}`) / median(`{self.den}`), one run"


@dataclass(frozen=True)
class ExtraInfo:
    """A key of a stored benchmark's ``extra_info`` (e.g. ``pct_peak_bw``). Rates derived from the median time
    (GB/s, TFLOP/s, % of peak) carry the median's interval; a % of peak above 100 is not a measurement."""

    bench: str
    key: str

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        e = view.bench(self.bench)
        if e is None:
            return NotMeasured(view.no_bench_reason([self.bench]))
        if view.bench_files_problem():
            return NotMeasured(view.bench_files_problem())
        x = e.get("extra_info") or {}
        if self.key not in x:
            return NotMeasured(f"benchmark {self.bench!r} has no extra_info[{self.key!r}]")
        value = float(x[self.key])
        if self.key in PEAK_PCT_KEYS and value > 100:
            return NotMeasured(f"{self.bench} reads {value:.1f}% of its calibrated peak, above 100%: not a measurement "
                               f"({_over_peak(e, view)})")
        iv, note = None, None
        if self.key in RATE_KEYS and value > 0:
            med, note = bench_interval(e)
            iv = med.inverted(value * med.point)  # a rate ∝ 1 / time: the slow end of the time is the low end
        return _bench_measured(e, value, f"{self.bench}.extra_info.{self.key} ({e['_meta']['file']}{_peak_used(x)})",
                               interval=iv, note=note)

    def describe(self) -> str:
        return f"extra_info[{self.key}] of bench `{self.bench}`"


def _peak_used(x: dict[str, Any]) -> str:
    """The bandwidth peak a bench's % figures were computed against, in words (empty where it stored none)."""
    return f"; peak {x['peak_bw_gbps']:.0f} GB/s" if x.get("peak_bw_gbps") else ""


def _over_peak(entry: dict[str, Any], view: ResultsView) -> str:
    """The stored diagnosis, or one made from the run's own calibration (or calibration.json for runs without)."""
    x = entry.get("extra_info") or {}
    if x.get("over_peak"):
        return x["over_peak"]
    peaks = entry["_meta"].get("calibration")
    if peaks is None:
        cal = view.calibration()
        if cal is None:
            problem = view.unreadable.get("calibration.json")
            return f"calibration.json unreadable ({problem})" if problem else "no calibration stored with the run"
        peaks = cal["peaks"]
    metrics = {k: x[k] for k in ("gbps", "tflops", "pct_peak_bw", "pct_peak_flops") if k in x}
    nbytes = int(x.get("bytes") or 0)
    metrics.setdefault("peak_bw_gbps", x.get("peak_bw_gbps") or bandwidth_peak(peaks, nbytes) or float("nan"))
    metrics.setdefault("peak_tflops", x.get("peak_tflops") or float("nan"))
    return over_peak_message(metrics, peaks, x.get("flops_dtype", "bf16"), nbytes) or "see the bench"


def _record_provenance(rec: dict[str, Any], file: str, what: str) -> Provenance:
    data = rec["data"]
    complete = rec.get("complete", data.get("complete", True)) is not False
    rescore = rec.get("rescored") if isinstance(rec.get("rescored"), dict) else {}
    return Provenance(what=what, file=file, run=str(rec.get("run_id") or file), device=str(rec.get("device") or "cpu"),
                      commit=str(rec.get("commit") or "unknown"), date=str(rec.get("date") or ""), complete=complete,
                      rescored_commit=rescore.get("commit"))


def _dig(data: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False, None
        data = data[part]
    return True, data


@dataclass(frozen=True)
class ResultValue:
    """A number inside an experiment result ``results/<slug>/<system>/<name>.json``, by a dotted key path in
    ``data``; ``requires``: (dotted key, value) pairs the record must hold for the number to be what the claim
    states (e.g. how it was measured), else the claim is not measured."""

    system: str
    name: str
    key: str
    requires: tuple[tuple[str, Any], ...] = ()

    def record(self, view: ResultsView) -> dict[str, Any] | NotMeasured:
        rec = view.result(self.system, self.name)
        if rec is None:
            problem = view.result_problem(self.system, self.name)
            return NotMeasured(f"{self.system}/{self.name}.json unreadable ({problem})" if problem else
                               f"no result file results/{view.slug}/{self.system}/{self.name}.json")
        for key, want in self.requires:
            found, got = _dig(rec["data"], key)
            if not found or got != want:
                return NotMeasured(f"{self.system}/{self.name}.json: {key} is "
                                   f"{repr(got) if found else 'absent'}, the claim needs {want!r}")
        return rec

    def number(self, rec: dict[str, Any], key: str) -> float | NotMeasured:
        found, value = _dig(rec["data"], key)
        if not found:
            return NotMeasured(f"{self.system}/{self.name}.json has no key {key!r}")
        if value is None:
            return NotMeasured(f"{self.system}/{self.name}.json: {key} is null")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return NotMeasured(f"{self.system}/{self.name}.json: {key} is {type(value).__name__} {value!r}, "
                               "not a number")
        return float(value)

    def measured(self, rec: dict[str, Any], value: float, *, interval: Interval | None = None,
                 source: str | None = None) -> Measured:
        prov = _record_provenance(rec, f"{self.system}/{self.name}.json", self.key)
        commit = prov.commit + (f" (rescored at {prov.rescored_commit})" if prov.rescored_commit else "")
        return Measured(value, prov.device, commit, prov.date, source or f"{self.system}/{self.name}.json:{self.key}",
                        (prov,), interval)

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        rec = self.record(view)
        if isinstance(rec, NotMeasured):
            return rec
        value = self.number(rec, self.key)
        return value if isinstance(value, NotMeasured) else self.measured(rec, value)

    def describe(self) -> str:
        return f"`{self.key}` in results/<gpu>/{self.system}/{self.name}.json"


@dataclass(frozen=True)
class ResultInterval(ResultValue):
    """A stored estimate with its stored interval (``lo``, ``hi``: dotted keys in the same record, e.g. a paired
    bootstrap's ends); the verdict judges the end the comparison needs."""

    lo: str = ""
    hi: str = ""

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        rec = self.record(view)
        if isinstance(rec, NotMeasured):
            return rec
        got = [self.number(rec, k) for k in (self.key, self.lo, self.hi)]
        bad = next((g for g in got if isinstance(g, NotMeasured)), None)
        if bad is not None:
            return bad
        point, lo, hi = got
        if not lo <= point <= hi:
            return NotMeasured(f"{self.system}/{self.name}.json: {self.key}={point} lies outside its interval "
                               f"[{lo}, {hi}]")
        return self.measured(rec, point, interval=Interval(point, lo, hi, LEVEL),
                             source=f"{self.system}/{self.name}.json:{self.key} [{self.lo}, {self.hi}]")

    def describe(self) -> str:
        return (f"`{self.key}` and its interval [`{self.lo}`, `{self.hi}`] in "
                f"results/<gpu>/{self.system}/{self.name}.json")


@dataclass(frozen=True)
class Reselected:
    """A "best of many" figure (the best workload, policy or configuration of a sweep), which passes only when it was
    re-measured in a fresh run: ``marker`` (a dotted key in the same record's ``data``) holds ``selected_in_run``
    (the run that chose it) and ``verdict_run`` (the run that measured the figure, this record's ``run_id``); the
    two must differ."""

    inner: ResultValue
    marker: str

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        got = self.inner(view)
        if isinstance(got, NotMeasured):
            return got
        rec = view.result(self.inner.system, self.inner.name)
        found, mark = _dig(rec["data"], self.marker)
        where = f"{self.inner.system}/{self.inner.name}.json"
        if not found or not isinstance(mark, dict) or not mark.get("selected_in_run") or not mark.get("verdict_run"):
            return NotMeasured(f"{where}: a best-of-many figure without {self.marker}.selected_in_run / verdict_run: "
                               "it must be re-measured in a fresh run before it can pass")
        if mark["selected_in_run"] == mark["verdict_run"]:
            return NotMeasured(f"{where}: chosen and measured in the same run ({mark['verdict_run']}): a best-of-many "
                               "figure passes only when re-measured in a fresh run")
        if rec.get("run_id") and rec["run_id"] != mark["verdict_run"]:
            return NotMeasured(f"{where}: verdict_run {mark['verdict_run']} is not the run that wrote the record "
                               f"({rec['run_id']})")
        return got

    def describe(self) -> str:
        return self.inner.describe() + f", re-measured in a fresh run (`{self.marker}`)"


@dataclass(frozen=True)
class NotYet:
    """A claim whose measurement does not exist yet; ``reason`` says why."""

    reason: str

    def __call__(self, view: ResultsView) -> NotMeasured:
        return NotMeasured(self.reason)

    def describe(self) -> str:
        return "not yet defined"


def record_stamp(record: dict[str, Any]) -> str:
    """"<commit[:12]> <date[:10]>" of a stored result record, for a claim's source text (blank parts where absent)."""
    return f"{str(record.get('commit', ''))[:12]} {str(record.get('date', ''))[:10]}"


@dataclass(frozen=True)
class Beside:
    """``measure`` whose source also names the figure to read it against (a ceiling no implementation can pass, the
    share of a change no remedy takes back): ``note(view)``, in words, empty where its records are missing;
    ``what`` names it in the claim's description."""

    measure: Measure
    note: Callable[[ResultsView], str]
    what: str

    def __call__(self, view: ResultsView) -> Measured | NotMeasured:
        m = self.measure(view)
        if isinstance(m, NotMeasured):
            return m
        return dataclasses.replace(m, source=m.source + self.note(view))

    def describe(self) -> str:
        return f"{self.measure.describe()}, beside {self.what}"


def referenced_benches(measure: Any) -> list[str]:
    """Bench names a measure reads (``bench``/``num``/``den`` fields, through wrapping measures)."""
    found: list[str] = []
    if dataclasses.is_dataclass(measure) and not isinstance(measure, type):
        for f in dataclasses.fields(measure):
            v = getattr(measure, f.name)
            if f.name in ("bench", "num", "den") and isinstance(v, str):
                found.append(v)
            elif dataclasses.is_dataclass(v) and not isinstance(v, type):
                found += referenced_benches(v)
    return found


# ---- evaluation -----------------------------------------------------------------------------------------------

def _system_module(system: str, name: str) -> Any | None:
    """``impl.<system>.<name>``, or None where the system has no such module; a missing dependency inside one is an
    error, not a skip."""
    try:
        return importlib.import_module(f"impl.{system}.{name}")
    except ModuleNotFoundError as e:
        if e.name in (f"impl.{system}", f"impl.{system}.{name}"):
            return None
        raise


def claims_modules(systems: tuple[str, ...] = SYSTEMS) -> Iterator[tuple[str, Any]]:
    """``(system, impl.<system>.claims)`` for every system that has that module (where CLAIMS and FAILING_CASES
    live)."""
    for system in systems:
        mod = _system_module(system, "claims")
        if mod is not None:
            yield system, mod


def report_modules(systems: tuple[str, ...] = SYSTEMS) -> Iterator[tuple[str, Any]]:
    """``(system, module)`` whose ``PLOTS`` and ``TABLES`` the report draws: ``impl.<system>.plots`` of every system
    that has one."""
    for system in systems:
        mod = _system_module(system, "plots")
        if mod is not None:
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


def provenance_problem(m: Measured, view: ResultsView, needs_gpu: bool) -> str | None:
    """Why a measurement cannot give a verdict (None when it can): every side from one device (a GPU for a GPU
    claim), one run, a finished run, and a clean commit of this repository."""
    sides = m.provenance or (Provenance(what=m.source, file=m.source, run=m.source, device=m.device, commit=m.commit,
                                        date=m.date),)
    devices = sorted({p.device or "cpu" for p in sides})
    if len(devices) > 1:
        return f"the sides were measured on different devices ({' vs '.join(devices)})"
    device = devices[0]
    if needs_gpu and device.lower() == "cpu":
        return "measured on a CPU; a GPU claim needs a GPU measurement"
    runs = sorted({p.run for p in sides})
    if len(runs) > 1:
        return f"the sides come from different runs ({', '.join(runs)}): a comparison takes both from one run"
    for p in sides:
        if not p.complete:
            return f"{p.file} is from a run that did not finish (complete: false)"
        for label, commit in (("commit", p.commit), ("rescoring commit", p.rescored_commit)):
            if commit is None and label != "commit":
                continue
            problem = commit_problem(commit)
            if problem:
                return f"{p.file}: {label} {commit!r} {problem}"
    return None


def commit_problem(commit: str | None) -> str | None:
    """Why a recorded commit cannot vouch for a result: uncommitted code, unknown, or not in this repository."""
    if not commit or commit == "unknown":
        return "is unknown: a result must name the commit it was measured at"
    if commit.endswith("+dirty"):
        return "had uncommitted changes: results come from committed code"
    known = commit_exists(commit)
    if known is False:
        return "is not a commit of this repository"
    return None


def _judged(comparison: str, value: float, interval: Interval | None) -> float:
    if interval is None or comparison == "==":
        return value
    return interval.lo if comparison in (">=", ">") else interval.hi


def evaluate(claim: Claim, view: ResultsView) -> dict[str, Any]:
    """One row of ``claims.json`` (keys as documented in the README)."""
    m = claim.measure(view)
    row: dict[str, Any] = {"id": claim.id, "system": claim.system, "statement": claim.statement,
                           "seed_value": claim.seed_value, "measured_value": None, "unit": claim.unit,
                           "comparison": claim.comparison, "target": claim.target, "verdict": "not measured",
                           "reason": None, "device": None, "commit": None, "date": None,
                           "method": claim.measure.describe(), "source": None, "interval": None,
                           "judged_value": None, "provenance": []}
    if isinstance(m, NotMeasured):
        row["reason"] = m.reason
        return row
    row.update(measured_value=_round(m.value), device=m.device, commit=m.commit, date=m.date, source=m.source,
               provenance=[p.as_dict() for p in m.provenance])
    if m.interval is not None:
        row["interval"] = [_round(m.interval.lo), _round(m.interval.hi)]
        if m.note:
            row["source"] += f"; {m.note}"
    problem = provenance_problem(m, view, claim.needs_gpu)
    judged = _judged(claim.comparison, m.value, m.interval)
    if problem:
        row["reason"] = problem
    elif not math.isfinite(m.value) or not math.isfinite(judged):
        row["reason"] = f"measurement is {m.value}" + (f" (interval end {judged})" if judged != m.value else "")
    else:
        row["judged_value"] = _round(judged)
        row["verdict"] = "pass" if _OPS[claim.comparison](judged, claim.target) else "fail"
    return row


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def discover_systems() -> tuple[str, ...]:
    """``SYSTEMS``, after checking that it names exactly the system packages under ``impl/``."""
    import impl

    found = {m.name for m in pkgutil.iter_modules(impl.__path__) if m.ispkg and m.name != "common"}
    if found != set(SYSTEMS):
        raise RuntimeError(f"impl/ holds the systems {sorted(found)} but ledger.SYSTEMS lists {sorted(SYSTEMS)}: "
                           "keep the one list in impl/common/ledger.py current")
    return SYSTEMS


# ---- failing cases: stored-result inputs on which a claim must fail ------------------------------------------

CASE_DEVICE = "NVIDIA H200"


def clean_commit() -> str:
    """A commit the provenance rule accepts, for stored-result fixtures: this checkout's HEAD (a commit that exists),
    or, without git, any well-formed id (whose existence then cannot be checked)."""
    from impl.common.results import git_commit

    commit = git_commit(short=False).removesuffix("+dirty")
    return "0" * 40 if commit == "unknown" else commit


@dataclass(frozen=True)
class Case:
    """Stored results on which one claim's verdict must be "fail": ``benches`` maps a bench name to
    ``{"median": seconds, "rounds": [seconds, ...], "extra_info": {...}}`` (rounds default to 20 copies of the
    median), ``results`` maps ``"<system>/<name>"`` to a record's ``data``. ``materialise`` writes them as one clean,
    complete GPU run."""

    benches: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def _stats(rounds: list[float], median: float) -> dict[str, Any]:
    xs = sorted(rounds)
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"min": xs[0], "max": xs[-1], "mean": statistics.fmean(xs), "median": median, "q1": q[0], "q3": q[2],
            "iqr": q[2] - q[0], "rounds": len(xs), "stddev": statistics.pstdev(xs), "iterations": 1}


def materialise(case: Case, root: Path, *, slug: str | None = None, device: str = CASE_DEVICE,
                commit: str | None = None, date: str = "2026-12-01T00:00:00+00:00") -> ResultsView:
    """Write ``case`` under ``root/<slug>/`` as one clean, complete run on ``device`` at ``commit`` (default: this
    checkout's HEAD, a commit that exists) and return the view of it."""
    slug = slug or slugify_gpu(device)
    commit = commit or clean_commit()
    out = Path(root) / slug
    benches = []
    for name, b in case.benches.items():
        median = float(b["median"])
        rounds = [float(x) for x in b.get("rounds") or [median] * 20]
        extra = {"timing": TIMING_QUEUED, "rounds_s": rounds, **(b.get("extra_info") or {})}
        benches.append({"name": name, "fullname": f"benches/case.py::{name}", "extra_info": extra,
                        "stats": _stats(rounds, median)})
    if benches:
        run = {"machine_info": {"gpu": device, "gpu_slug": slug}, "commit_info": {"id": commit, "dirty": False},
               "datetime": date, "benchmarks": benches}
        path = out / "Linux-CPython-3.12-64bit" / "0001_case.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run))
    for key, data in case.results.items():
        system, name = key.split("/", 1)
        rec = {"system": system, "name": name, "device": device, "commit": commit[:12], "date": date,
               "run_id": "case-run", "data": {"complete": True, **data}}
        path = out / system / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    return ResultsView(slug, Path(root))
