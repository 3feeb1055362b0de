"""The GPU evidence for l2cache as functions: a selection run, then a verdict run (in a fresh process: the CLI in
``experiments.py`` starts it).

    sel = select(SELECT, make_controller(False), out_dir, smoke=False)
    ver, ncu = verdict(VERDICT, controller, read_record(path)["data"], out_dir, smoke=False)
    sel, ver = smoke()                        # CPU: both runs at tiny sizes over the fake L2 driver

Selection (``selection.json``): the candidate workloads, sized from the card (``nets.chain_presets``: L2, the largest
persisting carve-out, SMs; plus the once-for-all MobileNetV3 supernet with other tenants' traffic between requests at
224 and 160 px), each served under the default and every candidate policy by ``chooser.compare_policies`` (rounds in
alternating order, a full L2 reset before every measurement, bit-identity of outputs, gain with a bootstrap interval);
then three picks by the interval's lower end: ``best`` (workloads whose weights are shared by layers or subnets),
``ofa_best`` (the supernet) and ``prefetch_best`` (prefetch policies alone); and the weight-size sweep (ALBERT
block, default vs persist_weights, with intervals).

Verdict (``verdict.json``, ``ncu.json``): a new process with a new run id reads the selection, rebuilds the picked
workloads from their stored specs and re-measures only those (workload, policy) pairs with more rounds; runs the
policy chooser on the best workload and compares its choice with the selection's offline pick; and profiles the
best and the prefetch pairs with ncu (DRAM bytes, L2 hit rate per request, ``--cache-control none``). The claims
read only the verdict's figures, so what selected a pair never judges it.

Both runs stop starting new work when their ``--budget-s`` is near, still write what they have
(``complete: false``), put the device's L2 state back on every exit (Ctrl-C and SIGTERM included) and say whether
they did (``restored``).
"""
from __future__ import annotations

import json
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import impl  # noqa: F401  (backend before triton)
import torch

from impl import backend
from impl.common.log import logger
from impl.common.timing import sm_count
from impl.l2cache.chooser import CANDIDATES, choose_policy, compare_policies, pick_best
from impl.l2cache.claims import WEIGHT_SHARED
from impl.l2cache.control import L2Controller, L2Limits
from impl.l2cache.fake import FakeL2Driver
from impl.l2cache.ncu import profile_pair
from impl.l2cache.nets import ChainConfig, ChainMLP
from impl.l2cache.policies import PREFETCH_POLICIES, get_policy
from impl.l2cache.serving import PolicyRunner, lab_streams, output_digest, stream_handles
from impl.l2cache.workloads import build, candidate_specs, sweep_spec

SYSTEM = "l2cache"
log = logger(SYSTEM)


@dataclass(frozen=True)
class RunConfig:
    rounds: int
    reps: int
    warmup: int
    budget_s: float
    sweep_fracs: tuple[float, ...] = ()  # ALBERT W / max carve-out
    sweep_rounds: int = 2
    sweep_reps: int = 80
    chooser_rounds: int = 3
    chooser_reps: int = 50
    chooser_on: tuple[str, ...] = ("best", "ofa_best")  # the picks whose workloads the chooser serves
    ncu: bool = True
    ncu_requests: int = 3
    runner_kw: dict = field(default_factory=dict)


SELECT = RunConfig(rounds=3, reps=100, warmup=10, budget_s=150, sweep_fracs=(0.5, 0.9, 1.3, 1.7, 2.5))
VERDICT = RunConfig(rounds=10, reps=150, warmup=10, budget_s=150)
# the interpreter reads ~1 MB/s in the side stream's touch kernel: one small read per request there
_SMOKE_KW = {"prefetch_group": 16, "prefetch_programs": 1, "prefetch_max_bytes": 1 << 16}
SMOKE_SELECT = RunConfig(rounds=2, reps=2, warmup=0, budget_s=900, sweep_fracs=(2.0,), sweep_rounds=1,
                         sweep_reps=2, ncu=False, runner_kw=_SMOKE_KW)
SMOKE_VERDICT = RunConfig(rounds=2, reps=3, warmup=0, budget_s=900, chooser_rounds=1, chooser_reps=2,
                          chooser_on=("best",), ncu=False, runner_kw=_SMOKE_KW)
SMOKE_LIMITS = L2Limits(l2_bytes=1 << 16, max_persisting_bytes=1 << 14, max_window_bytes=1 << 20)


class SelectionUnreadable(ValueError):
    """The selection record a verdict run needs is missing or malformed."""


# ---- the device -------------------------------------------------------------------------------------------------

def make_controller(smoke: bool) -> L2Controller:
    if smoke or not backend.ON_GPU:
        return L2Controller(FakeL2Driver(limits_=SMOKE_LIMITS, carveout=0) if smoke else FakeL2Driver())
    from impl.l2cache.control import CudaRuntimeDriver

    return L2Controller(CudaRuntimeDriver())


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Guard:
    """The device's L2 state at the start of a run, put back at its end whatever happened (``restored`` says
    whether the state at the end equals it). SIGTERM becomes SystemExit inside, so ``finally`` blocks run."""

    def __init__(self, controller: L2Controller) -> None:
        self.controller = controller
        self.streams = stream_handles(lab_streams())
        self.restored: bool | None = None

    def __enter__(self) -> "Guard":
        self.before = self.controller.snapshot(self.streams)
        try:
            self._old_term = signal.signal(signal.SIGTERM, self._term)
        except ValueError:  # not the main thread
            self._old_term = None
        return self

    @staticmethod
    def _term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.controller.snapshot(self.streams) != self.before:
                self.controller.restore(self.before)
            self.restored = self.controller.snapshot(self.streams) == self.before
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)


# ---- storage ----------------------------------------------------------------------------------------------------

def store(name: str, data: dict, out_dir: Path | None) -> Path:
    """Write ``data`` as the record ``results/<gpu>/l2cache/<name>.json`` (or ``<out_dir>/<name>.json``) with the
    device, commit, date and machine, and ``complete`` copied to the top."""
    from impl.common.results import (atomic_write_text, gpu_name, git_commit, json_default, machine_info, now_iso,
                                    results_dir)

    if out_dir is None:
        if not backend.ON_GPU:
            raise RuntimeError("without a GPU results are written only to an explicit --out folder")
        out_dir = results_dir() / SYSTEM
    record = {"system": SYSTEM, "name": name, "device": gpu_name(), "commit": git_commit(), "date": now_iso(),
              "complete": bool(data.get("complete")), "machine": machine_info(), "data": data}
    path = Path(out_dir) / f"{name}.json"
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, default=json_default) + "\n", overwrite=True)
    return path


# ---- correctness first ------------------------------------------------------------------------------------------

def check_correctness(controller: L2Controller, smoke: bool, runner_kw: dict) -> dict:
    """Before any timing: the prefetching GEMV against the float64 reference on fresh random data (outputs poisoned
    first, ``fixtures.oracle.check_kernel``), and a small hybrid chain served under every policy against its float64
    reference (activation buffers poisoned before each request). Raises ``AssertionError`` naming what is wrong."""
    from fixtures.oracle import assert_close, check_kernel, poison_
    from impl.l2cache.linear import linear, linear_reference
    from impl.l2cache.policies import POLICIES
    from impl.l2cache.prefetch import L2Prefetch

    dev, dt = backend.DEVICE, (torch.float32 if smoke else torch.float16)
    tol = {"rtol": 2e-3, "atol": 0.05} if dt == torch.float16 else {"rtol": 1e-5, "atol": 1e-4}
    gen = torch.Generator().manual_seed(int(time.time()) % 2**31)  # fresh data every run
    shapes = [(40, 48)] if smoke else [(777, 1024), (4224, 4224), (64, 1000)]
    scratch = torch.zeros(1 << 16 if smoke else 1 << 24, dtype=torch.uint8, device=dev)
    for n, k in shapes:
        x, w, b = (torch.randn(s, generator=gen).to(dev, dt) for s in ((1, k), (n, k), (n,)))
        pf = L2Prefetch(scratch, 256, scratch.numel() - 512)
        ref = linear_reference(x, w, b, relu=True).astype(str(dt).removeprefix("torch."))
        check_kernel(lambda out: linear(x, w, b, relu=True, out=out, prefetch=pf), torch.empty((1, n), device=dev,
                     dtype=dt), ref, **tol)
    wl = ChainMLP(ChainConfig("check", 32 if smoke else 512, 2, own=1, dtype="float32" if smoke else "float16"),
                  seed=int(time.time()) % 1000)
    ref, digests = wl.reference().astype(wl.cfg.dtype), {}
    for name, policy in POLICIES.items():
        with PolicyRunner(wl, policy, controller, **runner_kw) as runner:
            poison_(wl.acts["h0"])
            poison_(wl.acts["h1"])
            out = runner.request()
            assert_close(out, ref, msg=f"chain under {name}", **tol)
            digests[name] = output_digest(out)
    differ = [n for n, d in digests.items() if d != digests["default"]]
    assert not differ, f"outputs under {differ} differ from the default's"
    return {"gemv_shapes": shapes, "chain_policies": list(digests), "ok": True}


# ---- selection --------------------------------------------------------------------------------------------------

def table_rows(comparisons: dict[str, dict]) -> list[dict]:
    """One row per measured (workload, policy): medians, gain and interval, bit-identity, why excluded."""
    rows = []
    for w, c in comparisons.items():
        for p, r in c["policies"].items():
            g = r.get("gain") or {}
            rows.append({"workload": w, "policy": p, "sharing": c["sharing"], "kind": c["spec"]["kind"],
                         "weight_bytes": c["info"]["weight_bytes"], "persist_bytes": c["persist_bytes"],
                         "median_ms": r["median_ms"], "gain_pct": g.get("gain_pct"), "lo_pct": g.get("lo_pct"),
                         "hi_pct": g.get("hi_pct"), "bit_identical": r["bit_identical"],
                         "excluded": r["excluded"], "prefetch": r.get("prefetch", "")})
    return rows


def pick(rows: list[dict], comparisons: dict[str, dict], keep) -> dict | None:
    """The eligible row with the highest interval lower end among rows ``keep`` accepts (None: none)."""
    ok = [r for r in rows if r["policy"] != "default" and not r["excluded"] and r["bit_identical"]
          and r["lo_pct"] is not None and keep(r)]
    if not ok:
        return None
    best = max(ok, key=lambda r: (r["lo_pct"], r["gain_pct"]))
    return {**best, "spec": comparisons[best["workload"]]["spec"]}


def table_markdown(rows: list[dict]) -> str:
    lines = ["| workload | sharing | weights MB | persist MB | policy | median µs | gain % [95% CI] | bit-identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["excluded"]:
            gain = f"— ({r['excluded']})"
        elif r["gain_pct"] is None:
            gain = "(baseline)"
        else:
            gain = f"{r['gain_pct']:+.2f} [{r['lo_pct']:+.2f}, {r['hi_pct']:+.2f}]"
        med = f"{1e3 * r['median_ms']:.1f}" if r["median_ms"] else "—"
        lines.append(f"| {r['workload']} | {r['sharing']} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{r['persist_bytes'] / 1e6:.1f} | {r['policy']} | {med} | {gain} | "
                     f"{'yes' if r['bit_identical'] or r['excluded'] else 'NO'} |")
    return "\n".join(lines)


def correctness_or_stop(controller: L2Controller, smoke: bool, cfg: RunConfig) -> dict:
    """``check_correctness``, recorded; a failure stops the run's measurements (wrong kernels are not timed)."""
    t0 = time.time()
    try:
        out = check_correctness(controller, smoke, cfg.runner_kw)
        log(f"correctness: GEMV with prefetch and a chain under every policy match float64 [{time.time() - t0:.1f} s]")
        return out
    except AssertionError as e:
        log(f"correctness FAILED, nothing is timed: {str(e)[:500]}")
        return {"ok": False, "error": str(e)[-3000:]}


def measure_workload(spec: dict, controller: L2Controller, candidates: tuple[str, ...], cfg: RunConfig,
                     deadline: float) -> dict:
    wl = build(spec)
    t0 = time.time()
    cmp = compare_policies(wl, controller, candidates, rounds=cfg.rounds, reps=cfg.reps, warmup=cfg.warmup,
                           deadline=deadline, runner_kw=cfg.runner_kw)
    out = {**cmp.as_dict(), "spec": spec, "info": wl.info(), "sharing": wl.sharing,
           "persist_bytes": wl.persist_span().nbytes, "wall_s": time.time() - t0}
    summary = ", ".join(f"{p} {g.gain_pct:+.1f}% [{g.lo_pct:+.1f}, {g.hi_pct:+.1f}]" for p, g in cmp.gains.items())
    log(f"{wl.name} ({wl.weight_bytes / 1e6:.1f} MB): {summary or 'no candidate'}  [{out['wall_s']:.1f} s]")
    return out


def run_sweep(cfg: RunConfig, controller: L2Controller, limits: L2Limits, deadline: float, smoke: bool) -> dict:
    points = []
    for frac in cfg.sweep_fracs:
        if time.time() > deadline:
            log(f"budget spent: the sweep stops before W = {frac} carve-outs")
            break
        spec = sweep_spec(frac, limits, smoke)
        wl = build(spec)
        cmp = compare_policies(wl, controller, ("persist_weights",), rounds=cfg.sweep_rounds, reps=cfg.sweep_reps,
                               warmup=cfg.warmup, runner_kw=cfg.runner_kw)
        g = cmp.gains.get("persist_weights")
        points.append({"frac": frac, "weight_bytes": wl.weight_bytes, "hidden": wl.cfg.hidden,
                       "weight_over_carveout": wl.weight_bytes / limits.max_persisting_bytes,
                       "weight_over_l2": wl.weight_bytes / limits.l2_bytes,
                       "gain": g.as_dict() if g else None, "bit_identical": cmp.bit_identical("persist_weights"),
                       "hit_ratio": cmp.info.get("persist_weights", {}).get("hit_ratio")})
        if g:
            log(f"sweep W = {frac} carve-outs: persist_weights {g.gain_pct:+.2f}% [{g.lo_pct:+.2f}, {g.hi_pct:+.2f}]")
        del wl
    return {"points": points, "layers": 12, "policy": "persist_weights",
            "complete": len(points) == len(cfg.sweep_fracs)}


def select(cfg: RunConfig, controller: L2Controller, out_dir: Path | None, smoke: bool) -> dict:
    """The selection run (module doc); returns its data (also stored unless ``smoke`` without ``out_dir``)."""
    start = time.time()
    deadline = start + cfg.budget_s - 8  # leave time to write
    run_id = new_run_id()
    limits = controller.limits
    sms = sm_count()
    data: dict[str, Any] = {"run_id": run_id, "role": "selection", "limits": asdict(limits), "sms": sm_count(),
                            "config": asdict(cfg), "candidates": list(CANDIDATES), "comparisons": {}}
    specs = candidate_specs(limits, sms, smoke)
    with Guard(controller) as guard:
        log(f"selection run {run_id}; backend {backend.describe()}; {limits}")
        data["correctness"] = correctness_or_stop(controller, smoke, cfg)
        if not data["correctness"]["ok"]:
            specs, cfg = {}, replace(cfg, sweep_fracs=())
        sweep_reserve = 0.18 * cfg.budget_s if cfg.sweep_fracs else 0
        for name, spec in specs.items():
            if time.time() > deadline - sweep_reserve:
                log(f"budget spent: {name} not measured")
                continue
            try:
                data["comparisons"][name] = measure_workload(spec, controller, CANDIDATES, cfg,
                                                             deadline - sweep_reserve)
            except Exception as e:  # one failing workload must not lose the others
                data.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                log(f"{name}: FAILED: {e}")
        data["sweep"] = run_sweep(cfg, controller, limits, deadline, smoke)
    rows = table_rows(data["comparisons"])
    comps = data["comparisons"]
    data.update(table=rows, table_md=table_markdown(rows), restored=guard.restored,
                outputs_differ=[(r["workload"], r["policy"]) for r in rows if not r["bit_identical"]],
                selection={"best": pick(rows, comps, lambda r: r["sharing"] in WEIGHT_SHARED),
                           "ofa_best": pick(rows, comps, lambda r: r["kind"] == "ofa"),
                           "prefetch_best": pick(rows, comps, lambda r: r["policy"] in PREFETCH_POLICIES)},
                complete=data["correctness"]["ok"] and len(comps) == len(specs) and not data.get("errors")
                and data["sweep"]["complete"],
                elapsed_s=time.time() - start)
    print(data["table_md"], flush=True)
    for k, v in data["selection"].items():
        log(f"selected {k}: " + (f"{v['workload']} / {v['policy']} {v['gain_pct']:+.2f}% "
                                 f"[{v['lo_pct']:+.2f}, {v['hi_pct']:+.2f}]" if v else "none"))
    if out_dir is not None or not smoke:
        log(f"wrote {store('selection', data, out_dir)}")
    return data


# ---- verdict ----------------------------------------------------------------------------------------------------

def remeasure(target: dict, controller: L2Controller, cfg: RunConfig, deadline: float) -> dict:
    wl = build(target["spec"])
    cmp = compare_policies(wl, controller, (target["policy"],), rounds=cfg.rounds, reps=cfg.reps,
                           warmup=cfg.warmup, deadline=deadline, runner_kw=cfg.runner_kw)
    g = cmp.gains.get(target["policy"])
    out = {"workload": target["workload"], "policy": target["policy"], "sharing": wl.sharing,
           "kind": target["spec"]["kind"], "spec": target["spec"], "gain": g.as_dict() if g else None,
           "bit_identical": cmp.bit_identical(target["policy"]), "excluded": cmp.excluded.get(target["policy"]),
           "complete": cmp.complete, "selection_gain": {k: target[k] for k in ("gain_pct", "lo_pct", "hi_pct")},
           "comparison": cmp.as_dict()}
    log(f"verdict {target['workload']} / {target['policy']}: " +
        (f"{g.gain_pct:+.2f}% [{g.lo_pct:+.2f}, {g.hi_pct:+.2f}] ({g.rounds} rounds × {g.requests})" if g else
         f"not measured ({out['excluded']})"))
    return out


def run_chooser(target: dict, selection: dict, controller: L2Controller, cfg: RunConfig) -> dict:
    wl = build(target["spec"])
    choice = choose_policy(wl, controller, CANDIDATES, rounds=cfg.chooser_rounds, reps=cfg.chooser_reps,
                           runner_kw=cfg.runner_kw)
    offline = pick_best(selection["comparisons"][target["workload"]])
    with PolicyRunner(wl, get_policy(choice.policy), controller, **cfg.runner_kw) as runner:  # serve with it
        served = runner.info["policy"]
    log(f"chooser on {wl.name}: chose {choice.policy} (offline best {offline})")
    return {"workload": wl.name, "chosen": choice.policy, "offline_best": offline, "served": served,
            "matches": choice.policy == offline, "comparison": choice.comparison.as_dict()}


def verdict(cfg: RunConfig, controller: L2Controller, selection: dict, out_dir: Path | None, smoke: bool,
            selection_record: dict | None = None) -> tuple[dict, dict]:
    """The verdict run (module doc): returns (verdict data, ncu data), stored unless ``smoke`` without ``out_dir``."""
    start = time.time()
    deadline = start + cfg.budget_s - 8
    run_id = new_run_id()
    if run_id == selection.get("run_id"):
        raise RuntimeError("the verdict must be a different run from the selection")
    picks = selection["selection"]
    data: dict[str, Any] = {"verdict_run": run_id, "selected_in_run": selection.get("run_id"), "role": "verdict",
                            "selection_commit": (selection_record or {}).get("commit"), "config": asdict(cfg),
                            "selection_restored": selection.get("restored"),
                            "selection_outputs_differ": selection.get("outputs_differ", []), "results": {}}
    ncu_data: dict[str, Any] = {"verdict_run": run_id, "profiles": {}}
    names = {"best": "best", "ofa": "ofa_best", "prefetch": "prefetch_best"}
    ncu_reserve = 70 if cfg.ncu else 0
    with Guard(controller) as guard:
        log(f"verdict run {run_id} of selection {selection.get('run_id')}")
        data["correctness"] = correctness_or_stop(controller, smoke, cfg)
        if not data["correctness"]["ok"]:
            cfg = replace(cfg, ncu=False, chooser_on=())
        done: dict[tuple[str, str], dict] = {}
        for key, pick_name in names.items():
            target = picks.get(pick_name)
            if not data["correctness"]["ok"]:
                data["results"][key] = {"skipped": "the correctness check failed: nothing is timed"}
            elif target is None:
                data["results"][key] = {"skipped": f"the selection picked no {pick_name}"}
            elif (target["workload"], target["policy"]) in done:  # one pair picked twice is measured once
                data["results"][key] = done[(target["workload"], target["policy"])]
            elif time.time() > deadline - ncu_reserve:
                data["results"][key] = {"skipped": "GPU time budget spent"}
            else:
                data["results"][key] = remeasure(target, controller, cfg, deadline - ncu_reserve)
                done[(target["workload"], target["policy"])] = data["results"][key]
        data["chooser"] = []
        for pick_name in cfg.chooser_on:
            target = picks.get(pick_name)
            if target is not None and time.time() < deadline - ncu_reserve:
                data["chooser"].append(run_chooser(target, selection, controller, cfg))
        if cfg.ncu:
            for key in ("best", "prefetch"):
                target = picks.get(names[key])
                if target is not None:
                    ncu_data["profiles"][key] = profile_pair(target, cfg.ncu_requests, deadline)
    res = data["results"]
    data.update(restored=guard.restored, elapsed_s=time.time() - start,
                outputs_differ=[(r["workload"], r["policy"]) for r in res.values()
                                if "policy" in r and not r["bit_identical"]],
                complete=data["correctness"]["ok"] and len(data["chooser"]) > 0
                and all("gain" in r and r["gain"] and r["complete"] for r in res.values()))
    ncu_data["complete"] = cfg.ncu and all("error" not in p and "skipped" not in p
                                           for p in ncu_data["profiles"].values())
    if out_dir is not None or not smoke:
        log(f"wrote {store('verdict', data, out_dir)}")
        if cfg.ncu:
            log(f"wrote {store('ncu', ncu_data, out_dir)}")
    return data, ncu_data


# ---- stored selections, budgets, the CPU smoke run --------------------------------------------------------------

def read_record(path: Path) -> dict:
    """The stored selection record at ``path``; ``SelectionUnreadable`` when it is missing or malformed."""
    try:
        rec = json.loads(path.read_text())
        rec["data"]["selection"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SelectionUnreadable(f"cannot read the selection {path}: {type(e).__name__}: {e}; run --select first") \
            from e
    return rec


def default_selection_path(out_dir: Path | None) -> Path:
    if out_dir is not None and (out_dir / "selection.json").exists():
        return out_dir / "selection.json"
    from impl.common.results import results_dir

    return results_dir() / SYSTEM / "selection.json"


def with_budget(cfg: RunConfig, budget_s: float | None) -> RunConfig:
    return cfg if budget_s is None else replace(cfg, budget_s=budget_s)


def smoke(out_dir: Path | None = None) -> tuple[dict, dict]:
    """Both runs on the CPU at tiny sizes with the fake driver: the protocol, not the numbers."""
    controller = make_controller(True)
    sel = select(SMOKE_SELECT, controller, out_dir, smoke=True)
    ver, _ = verdict(SMOKE_VERDICT, controller, sel, out_dir, smoke=True)
    return sel, ver
