"""The GPU evidence for l2cache: latency of every workload under every policy, ncu DRAM bytes, a weight-size sweep.

    python -m impl.l2cache.experiments            # full run on the GPU (~2.5 min on an H100), writes results
    python -m impl.l2cache.experiments --quick    # fewer workloads and repetitions (~1 min)
    python -m impl.l2cache.experiments --smoke    # CPU, tiny sizes, fake L2 driver, no ncu; writes nothing

Latency: per (workload, policy) a ``PolicyRunner`` resets the L2 fully (carve-out 0, no window, persisting lines
reset, L2 flushed), applies the policy and times ``reps`` batch-1 requests with device events and no flush between
them (the cache is the subject); the policies are visited ``rounds`` times in alternating order and the times pooled.
gain % = 100 · (median_default − median_policy) / median_default. Outputs under every policy are hashed and compared
with the default's (bit-identity).
ncu: one driver process per workload (``--ncu-driver``) serves each policy in turn and brackets ``ncu_requests``
requests with cudaProfilerStart/Stop; ``ncu --graph-profiling graph`` reports DRAM bytes read/written and L2 hit rate
per request. Sweep: the shared MLP at several weight sizes, default vs persist_weights, for the gain-vs-size plot.
Results: ``results/<gpu>/l2cache/{policies,ncu,sweep}.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import impl  # noqa: F401  (backend before triton)
import torch

from impl import backend
from impl.l2cache.control import L2Controller
from impl.l2cache.fake import FakeL2Driver
from impl.l2cache.nets import (CONV_PRESETS, MLP_PRESETS, ConvNetConfig, MLPConfig, SharedConvNet, SharedMLP,
                               mlp_for_bytes)
from impl.l2cache.ofa import OFA_PRESETS, OfaConfig, OfaServing
from impl.l2cache.policies import POLICIES, get_policy
from impl.l2cache.serving import (Latency, PolicyRunner, lab_streams, measure, output_digest, outputs_by_kind,
                                  stream_handles)

SMOKE_PRESETS: dict[str, Any] = {
    "mlp_tiny": MLPConfig("mlp_tiny", 32, 3, dtype="float32"),
    "conv_tiny": ConvNetConfig("conv_tiny", 8, 4, 2, dtype="float32"),
    "ofa_tiny": OfaConfig("ofa_tiny", resolution=32, model="mobilenetv3_small_050", num_classes=10, dtype="float32"),
    "ofa_tiny_noisy": OfaConfig("ofa_tiny_noisy", resolution=32, model="mobilenetv3_small_050", num_classes=10,
                                dtype="float32", noise_bytes=1 << 16),
}


@dataclass(frozen=True)
class ExperimentConfig:
    workloads: tuple[str, ...]
    policies: tuple[str, ...]
    reps: int
    warmup: int
    rounds: int
    sweep_mib: tuple[int, ...]
    sweep_reps: int
    ncu: bool
    ncu_requests: int
    budget_s: float
    prefetch_group: int = 1
    prefetch_programs: int | None = None
    prefetch_max_bytes: int | None = None


ALL_POLICIES = tuple(POLICIES)
FULL = ExperimentConfig(("mlp_16mb", "mlp_32mb", "mlp_64mb", "conv_16mb", "conv_64mb", "ofa_alt", "ofa_alt_noisy"),
                        ALL_POLICIES, reps=200, warmup=20, rounds=2, sweep_mib=(8, 16, 24, 32, 48, 64, 96),
                        sweep_reps=150, ncu=True, ncu_requests=2, budget_s=175)
QUICK = ExperimentConfig(("mlp_16mb", "mlp_64mb", "conv_64mb", "ofa_alt_noisy"), ALL_POLICIES, reps=120, warmup=10,
                         rounds=1, sweep_mib=(16, 64), sweep_reps=80, ncu=True, ncu_requests=2, budget_s=90)
# the interpreter reads ~1 MB/s in the touch kernel, so the smoke run prefetches once per request (16 layers, one
# program, at most 64 KB) and times 2 requests
SMOKE = ExperimentConfig(("mlp_tiny", "conv_tiny", "ofa_tiny"), ALL_POLICIES, reps=2, warmup=0, rounds=1,
                         sweep_mib=(), sweep_reps=2, ncu=False, ncu_requests=1, budget_s=600, prefetch_group=16,
                         prefetch_programs=1, prefetch_max_bytes=1 << 16)


def build_workload(name: str, seed: int = 0) -> Any:
    presets = {**MLP_PRESETS, **CONV_PRESETS, **OFA_PRESETS, **SMOKE_PRESETS}
    if name not in presets:
        raise KeyError(f"unknown workload {name!r}; one of {sorted(presets)}")
    cfg = presets[name]
    if isinstance(cfg, MLPConfig):
        return SharedMLP(cfg, seed=seed)
    if isinstance(cfg, ConvNetConfig):
        return SharedConvNet(cfg, seed=seed)
    return OfaServing(cfg, seed=seed)


def make_controller(smoke: bool) -> L2Controller:
    if smoke or not backend.ON_GPU:
        return L2Controller(FakeL2Driver())
    from impl.l2cache.control import CudaRuntimeDriver

    return L2Controller(CudaRuntimeDriver())


def log(msg: str) -> None:
    print(f"[l2cache {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- latency ----------------------------------------------------------------------------------------------------

def latency_of(workload: Any, policy_names: tuple[str, ...], controller: L2Controller, cfg: ExperimentConfig
               ) -> dict[str, dict]:
    """Pooled per-request times of each policy over ``cfg.rounds`` alternating passes, with plan info and digests."""
    times: dict[str, list[float]] = {p: [] for p in policy_names}
    round_medians: dict[str, list[float]] = {p: [] for p in policy_names}
    info: dict[str, dict] = {}
    for r in range(cfg.rounds):
        for name in (policy_names if r % 2 == 0 else tuple(reversed(policy_names))):
            with PolicyRunner(workload, get_policy(name), controller, prefetch_group=cfg.prefetch_group,
                              prefetch_programs=cfg.prefetch_programs,
                              prefetch_max_bytes=cfg.prefetch_max_bytes) as runner:
                digests = [output_digest(o) for o in outputs_by_kind(runner)]
                lat = measure(runner, cfg.reps, cfg.warmup)
                times[name] += lat.times_ms
                round_medians[name].append(lat.summary()["median_ms"])
                info[name] = {**runner.info, "digests": digests}
    out = {}
    for name in policy_names:
        out[name] = {**Latency(times[name], workload.kinds).summary(), **info[name],
                     "round_medians_ms": round_medians[name]}
    return out


def gain_pct(default_ms: float, policy_ms: float) -> float:
    return 100.0 * (default_ms - policy_ms) / default_ms


def build_table(latency: dict[str, dict[str, dict]], workloads: dict[str, dict], max_carveout: int) -> list[dict]:
    rows = []
    for w, per_policy in latency.items():
        base = per_policy["default"]
        for p, r in per_policy.items():
            rows.append({"workload": w, "policy": p, "weight_bytes": workloads[w]["weight_bytes"],
                         "weight_over_carveout": workloads[w]["weight_bytes"] / max_carveout,
                         "median_ms": r["median_ms"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
                         "gain_pct": gain_pct(base["median_ms"], r["median_ms"]), "applicable": r["applicable"],
                         "gain_pct_per_round": [gain_pct(d, m) for d, m in zip(base["round_medians_ms"],
                                                                               r["round_medians_ms"])],
                         "bit_identical": r["digests"] == base["digests"], "note": r.get("note", "")})
    return rows


def best_of(rows: list[dict], policies: tuple[str, ...]) -> dict | None:
    cands = [r for r in rows if r["policy"] in policies and r["applicable"] and r["policy"] != "default"]
    return max(cands, key=lambda r: r["gain_pct"]) if cands else None


def table_markdown(rows: list[dict]) -> str:
    lines = ["| workload | weight MB | W / carve-out | policy | median µs | p10–p90 µs | gain % | per round | "
             "bit-identical |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = f"{r['gain_pct']:+.2f}" if r["applicable"] else f"n/a ({r['note']})"
        per_round = " / ".join(f"{g:+.1f}" for g in r.get("gain_pct_per_round", []))
        lines.append(f"| {r['workload']} | {r['weight_bytes'] / 1e6:.1f} | {r['weight_over_carveout']:.2f} | "
                     f"{r['policy']} | {1e3 * r['median_ms']:.1f} | {1e3 * r['p10_ms']:.1f}–{1e3 * r['p90_ms']:.1f} | "
                     f"{gain} | {per_round} | {'yes' if r['bit_identical'] else 'NO'} |")
    return "\n".join(lines)


def run_latency(cfg: ExperimentConfig, controller: L2Controller, deadline: float) -> dict[str, Any]:
    latency, workloads = {}, {}
    for name in cfg.workloads:
        if time.time() > deadline:
            log(f"budget spent: skipping latency of {name}")
            continue
        t0 = time.time()
        wl = build_workload(name)
        workloads[name] = wl.info()
        latency[name] = latency_of(wl, cfg.policies, controller, cfg)
        summary = ", ".join(f"{p} {1e3 * r['median_ms']:.1f} µs" for p, r in latency[name].items())
        log(f"{name} ({wl.weight_bytes / 1e6:.1f} MB weights): {summary}  [{time.time() - t0:.1f} s]")
        del wl
    rows = build_table(latency, workloads, controller.limits.max_persisting_bytes)
    best = best_of(rows, cfg.policies)
    prefetch = best_of(rows, ("prefetch",))  # prefetch alone: its gain is claimed separately
    return {"config": asdict(cfg), "limits": asdict(controller.limits), "workloads": workloads, "latency": latency,
            "table": rows, "table_md": table_markdown(rows), "best": best, "prefetch_best": prefetch,
            "all_bit_identical": all(r["bit_identical"] for r in rows)}


def run_sweep(cfg: ExperimentConfig, controller: L2Controller, deadline: float) -> dict[str, Any]:
    points = []
    sweep_cfg = ExperimentConfig((), ("default", "persist_weights"), cfg.sweep_reps, cfg.warmup, 1, (), 0, False, 0, 0)
    for mib in cfg.sweep_mib:
        if time.time() > deadline:
            log(f"budget spent: sweep stops before {mib} MiB")
            break
        wl = SharedMLP(mlp_for_bytes(mib << 20))
        lat = latency_of(wl, sweep_cfg.policies, controller, sweep_cfg)
        d, p = lat["default"]["median_ms"], lat["persist_weights"]["median_ms"]
        points.append({"mib": mib, "hidden": wl.cfg.hidden, "weight_bytes": wl.weight_bytes,
                       "weight_over_carveout": wl.weight_bytes / controller.limits.max_persisting_bytes,
                       "default_ms": d, "persist_ms": p, "gain_pct": gain_pct(d, p),
                       "hit_ratio": lat["persist_weights"]["hit_ratio"]})
        log(f"sweep {mib} MiB: default {1e3 * d:.1f} µs, persist {1e3 * p:.1f} µs, gain {gain_pct(d, p):+.2f}%")
        del wl
    return {"points": points, "layers": 12, "policy": "persist_weights"}


# ---- ncu --------------------------------------------------------------------------------------------------------

def ncu_driver(workload_name: str, policy_names: list[str], requests: int, controller: L2Controller,
               warmup: int = 10) -> list[tuple[str, int]]:
    """Serve each policy in turn and bracket ``requests`` requests with the profiler; returns (policy, kind) of
    each profiled request in order (the order ncu's result rows come in)."""
    wl = build_workload(workload_name)
    profiled = []
    on_gpu = backend.ON_GPU and backend.DEVICE == "cuda"
    for name in policy_names:
        with PolicyRunner(wl, get_policy(name), controller) as runner:
            for i in range(warmup):
                wl.between_requests()
                runner.request(i % wl.kinds)
            for i in range(requests):
                wl.between_requests()
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.profiler.start()
                runner.request(i % wl.kinds)
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.profiler.stop()
                profiled.append((name, i % wl.kinds))
    return profiled


def run_ncu(cfg: ExperimentConfig, best: dict | None, deadline: float) -> dict[str, Any]:
    from pathlib import Path

    from impl.l2cache import ncu

    out: dict[str, Any] = {"metrics": list(ncu.METRICS), "requests_per_policy": cfg.ncu_requests, "workloads": {}}
    if ncu.ncu_binary() is None:
        out["error"] = "ncu is not on PATH"
        return out
    root = Path(__file__).resolve().parents[2]
    order = list(cfg.workloads)
    if best is not None and best["workload"] in order:  # the claim needs the best workload's bytes: profile it first
        order.remove(best["workload"])
        order.insert(0, best["workload"])
    for name in order:
        left = deadline - time.time()
        if left < 15:
            out["workloads"][name] = {"skipped": "GPU time budget spent"}
            log(f"ncu: budget spent, skipping {name}")
            continue
        args = ["--ncu-driver", name, "--policies", ",".join(cfg.policies), "--requests", str(cfg.ncu_requests)]
        t0 = time.time()
        try:
            rows, _ = ncu.run_profile(args, timeout_s=max(30.0, left), cwd=root)
        except Exception as e:  # record and go on: one failed profile must not lose the others
            out["workloads"][name] = {"error": str(e)[-3000:]}
            log(f"ncu {name}: FAILED: {str(e)[:300]}")
            continue
        out["workloads"][name] = per_policy_metrics(rows, list(cfg.policies), cfg.ncu_requests)
        log(f"ncu {name}: {len(rows)} results [{time.time() - t0:.1f} s]")
    if best is not None and "default" in out["workloads"].get(best["workload"], {}):
        w = out["workloads"][best["workload"]]
        d, p = w["default"]["dram_read_bytes"], w[best["policy"]]["dram_read_bytes"]
        out["best"] = {"workload": best["workload"], "policy": best["policy"], "default_dram_read_bytes": d,
                       "policy_dram_read_bytes": p, "dram_read_drop_pct": 100.0 * (d - p) / d if d else None,
                       "latency_gain_pct": best["gain_pct"]}
    return out


def per_policy_metrics(rows: list[dict[str, float]], policies: list[str], requests: int) -> dict[str, dict]:
    """Average the per-request ncu rows of each policy (rows come policy by policy, ``requests`` each)."""
    if len(rows) != len(policies) * requests:
        raise ValueError(f"expected {len(policies) * requests} ncu results ({len(policies)} policies × {requests}), "
                         f"got {len(rows)}")
    out = {}
    for i, p in enumerate(policies):
        chunk = rows[i * requests:(i + 1) * requests]
        out[p] = {k: sum(r[k] for r in chunk) / len(chunk) for k in chunk[0]}
    return out


# ---- main -------------------------------------------------------------------------------------------------------

def run(cfg: ExperimentConfig, smoke: bool) -> dict[str, Any]:
    start = time.time()
    deadline = start + cfg.budget_s
    controller = make_controller(smoke)
    log(f"backend: {backend.describe()}; limits {controller.limits}; {len(cfg.workloads)} workloads × "
        f"{len(cfg.policies)} policies")
    streams = stream_handles(lab_streams())
    before = controller.snapshot(streams)
    policies = run_latency(cfg, controller, deadline - (60 if cfg.ncu else 0))
    print(policies["table_md"], flush=True)
    if not smoke:
        from impl.common.results import write_result

        log(f"wrote {write_result('l2cache', 'policies', policies, overwrite=True)}")
    sweep = run_sweep(cfg, controller, deadline - (50 if cfg.ncu else 0))
    if not smoke and sweep["points"]:
        from impl.common.results import write_result

        log(f"wrote {write_result('l2cache', 'sweep', sweep, overwrite=True)}")
    if cfg.ncu and not smoke:
        from impl.common.results import write_result

        ncu_data = run_ncu(cfg, policies["best"], deadline)
        log(f"wrote {write_result('l2cache', 'ncu', ncu_data, overwrite=True)}")
    else:
        ncu_data = {"skipped": "smoke mode" if smoke else "disabled"}
        if smoke:
            ncu_data["driver_order"] = ncu_driver(cfg.workloads[0], list(cfg.policies), cfg.ncu_requests, controller,
                                                  warmup=1)
    restored = controller.snapshot(streams) == before
    log(f"done in {time.time() - start:.0f} s; L2 state restored: {restored}; best: {policies['best']}")
    return {"policies": policies, "sweep": sweep, "ncu": ncu_data, "restored": restored,
            "elapsed_s": time.time() - start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.l2cache.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer workloads and repetitions")
    mode.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, fake driver, writes nothing")
    mode.add_argument("--ncu-driver", metavar="WORKLOAD", help="internal: the process ncu profiles")
    p.add_argument("--policies", default=",".join(ALL_POLICIES), help="comma-separated (with --ncu-driver)")
    p.add_argument("--requests", type=int, default=2, help="profiled requests per policy (with --ncu-driver)")
    a = p.parse_args(argv)
    if a.ncu_driver:
        order = ncu_driver(a.ncu_driver, a.policies.split(","), a.requests, make_controller(False))
        print(json.dumps({"profiled": order}), flush=True)
        return 0
    if not backend.ON_GPU and not a.smoke:
        print("the experiments need a CUDA GPU; run with --smoke on a CPU", file=sys.stderr)
        return 2
    result = run(SMOKE if a.smoke else QUICK if a.quick else FULL, smoke=a.smoke)
    return 0 if result["restored"] and result["policies"]["all_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
