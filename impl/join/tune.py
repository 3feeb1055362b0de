"""Decide the hash join's and the tensor-core join's designs on a GPU:
``python3 -m impl.join.tune --out DIR [--budget-s 80] [--tc-budget-s 30] [--dry-run]``.

Every variant (a ``HashConfig``: scheme, probes in flight, bucket size, load factor, clear, readback, rows per
partition, or the exact-size path with a sync before the write) is first checked exactly against the torch
sort-merge join on fresh random tables of ``--n`` rows per side (unique keys, zipf-skewed probes, many-to-many, int64
keys that differ only in their high 32 bits): the sorted (build_row, probe_row) pairs must be identical. A variant
that fails (or raises) is reported and skipped. The ones that pass are timed with the suite's timer (queued device
events, L2 flushed, warm-up, median of the rounds) end to end at ``--n`` and ``--big`` rows, the leading ones also
on zipf, m2m and int64 tables and phase by phase (build / count + readback / write). Results go to ``DIR/tune.json``
after every variant (``complete: true`` only at the end) and a short table is printed. The run stops starting new
work when the next step would pass ``--budget-s`` (CuPy compiles count: ~5-15 s per new kernel module).

The tensor-core join's variants (a ``TCConfig``: encoding, sub-tiles per program, chunk width, bucket size, stored
scan encodings) get the last ``--tc-budget-s`` seconds of the budget (the hash variants stop short of it): the same
exact checks, end-to-end times, and for the first one its phases (partition; probe = partition + counting pass +
readback; materialize = the exact-size pass; total = the one-pass call) with the tl.dot FLOPs it issues per pass and
per useful comparison. The table ends with the decision: the fastest checked hash and tensor-core variants at --n and
their ratio (the claim asks tensor-core / hash <= 10).

``--dry-run`` runs the same harness on the CPU with the numba twin and the Triton interpreter at tiny sizes
(everything but CuPy).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import impl  # noqa: F401  (backend before triton/numba)
import torch

from impl import backend
from impl.common.results import RUN_ID, git_commit, gpu_name, now_iso
from impl.common.timing import time_fn
from impl.join.common import run_join
from impl.join.data import Case, compulsory_bytes, make_tables
from impl.join.hash_cuda import compile_options
from impl.join.hash_table import HashConfig

BASE = HashConfig(scheme="fused", items=8)  # the sweep's reference point: each label names its differences
VARIANTS: list[tuple[str, dict[str, Any]]] = [  # most informative first: the budget may cut the tail
    ("split-items4", {"scheme": "split", "items": 4}),  # split kernels, 4 rows per thread (what int64 keys run)
    ("linear64", {"scheme": "linear64", "items": 4}),  # HashConfig's default: int64 keys on the linear kernels too
    # duplicate build keys' rows on one slot's list (int32 keys): m2m's clusters hold its distinct keys only
    ("linear64-chains", {"scheme": "linear64", "items": 4, "chains": True}),
    # pcount, pscatter, pjoin: ~2048 build rows per partition, 8 rows per thread in pcount / pscatter's chunks
    ("partitioned", {"scheme": "partitioned", "items": 8}),
    ("partitioned-items16", {"scheme": "partitioned", "items": 16}),  # longer runs per partition in pscatter
    # int64 keys on split-items4's kernels; its int32 columns repeat linear64's kernels
    ("linear64-narrow", {"scheme": "linear64", "items": 4, "linear_wide": False}),
    # build + probe one table slice (<= half the L2) at a time, both sides scattered by slice first (each slice
    # reads its own rows). Unscattered slices read every key once a slice: on an H100 at 10M rows 2.1x / 3.5x the
    # fastest unsliced variant's time for int32 / int64 keys, so the tune leaves them out
    ("linear64-scatter", {"scheme": "linear64", "items": 4, "linear_wide": True, "slices": 256, "scatter": True}),
    ("linear64-lf0.35-scatter", {"scheme": "linear64", "items": 4, "linear_wide": True, "load_factor": 0.35,
                                 "slices": 256, "scatter": True}),
    # 2 rows per thread and step in lbuild / lprobe (loads and CASes of both in flight), int64 keys linear too
    ("linear64-wide-r2", {"scheme": "linear64", "items": 4, "linear_wide": True, "lrows": 2}),
    # partitions of ~1024 / ~3072 build rows (2x / 0.67x the partitions: smaller / larger shared tables)
    ("partitioned-p1024", {"scheme": "partitioned", "items": 8, "part_rows": 1024}),
    ("partitioned-p3072", {"scheme": "partitioned", "items": 8, "part_rows": 3072}),
    ("partitioned-t512", {"scheme": "partitioned", "items": 8, "threads": 512}),
    # pjoin work items of at most 2048 probe rows (a zipf-hot partition over more blocks); an 8x speculative output
    # (many-to-many joins in one pass, no exact-size re-run)
    ("partitioned-probe2048", {"scheme": "partitioned", "items": 8, "part_probe": 2048}),
    ("partitioned-spec8", {"scheme": "partitioned", "items": 8, "spec_factor": 8}),
    ("partitioned-t128-items16", {"scheme": "partitioned", "items": 16, "threads": 128}),
    ("linear64-fused", {"scheme": "linear64-fused", "items": 4}),  # lbuild | grid barrier | lprobe, one launch
    ("linear64-wide-r4", {"scheme": "linear64", "items": 4, "linear_wide": True, "lrows": 4}),
    # a speculative output of 8 * n_probe pairs: m2m (~4 pairs per probe row on average) in one probe pass
    ("linear64-spec8", {"scheme": "linear64", "items": 4, "spec_factor": 8}),
    ("linear64-chains-spec8", {"scheme": "linear64", "items": 4, "chains": True, "spec_factor": 8}),
    ("linear64-wide-lf0.35", {"scheme": "linear64", "items": 4, "linear_wide": True, "load_factor": 0.35}),
    ("linear64-wide-bucket64", {"scheme": "linear64", "items": 4, "linear_wide": True, "bucket_bytes": 64}),
    ("linear64-wide-r2-t128", {"scheme": "linear64", "items": 4, "linear_wide": True, "lrows": 2, "threads": 128}),
    ("linear64-t128", {"scheme": "linear64", "items": 4, "threads": 128}),
    ("linear64-t512", {"scheme": "linear64", "items": 4, "threads": 512}),
    ("linear64-lf0.35", {"scheme": "linear64", "items": 4, "load_factor": 0.35}),
    ("linear64-lf0.7", {"scheme": "linear64", "items": 4, "load_factor": 0.7}),
    ("linear64-memset", {"scheme": "linear64", "items": 4, "clear": "memset"}),
    ("linear64-bucket64", {"scheme": "linear64", "items": 4, "bucket_bytes": 64}),
    ("linear64-item-readback", {"scheme": "linear64", "items": 4, "readback": "item"}),
    ("linear64-exact-2sync", {"scheme": "linear64", "items": 4, "_exact": True}),
    ("split-items4-reconverge", {"scheme": "split", "items": 4, "reconverge": True}),
    ("fused", {}),
    ("split", {"scheme": "split"}),
    ("fused-reconverge", {"reconverge": True}),
    ("fused-items4", {"items": 4}),
    ("fused-memset", {"clear": "memset"}),
    ("fused-lf0.7", {"load_factor": 0.7}),
    ("fused-item-readback", {"readback": "item"}),
    ("split-exact-2sync", {"scheme": "split", "_exact": True}),
    ("fused-bucket64", {"bucket_bytes": 64}),
    ("fused-lf0.85", {"load_factor": 0.85}),
    ("fused-items16", {"items": 16}),
    ("fused-t512-items4", {"threads": 512, "items": 4}),
]
DETAIL = 5  # the first DETAIL variants are also timed on every case and phase by phase
COMPILE_S = 8.0  # budget charge for a variant that needs new kernel modules (int32 and int64 keys)
CASES_1M = ("uniform", "zipf", "m2m", "highbits")
TC_VARIANTS: list[tuple[str, dict[str, Any]]] = [  # TCConfig overrides, most informative first (bucket sizes
    ("tc", {}),                                      # reuse the compiled kernels: cheap)
    ("tc-rho2", {"bucket_rows": 2}),
    ("tc-noenc", {"pre_encode": False}),
    ("tc-sub2", {"sub_tiles": 2, "num_warps": 2}),
    ("tc-rho8", {"bucket_rows": 8}),
    ("tc-fp16", {"enc": "fp16"}),
    ("tc-bn16", {"block_n": 16}),
    ("tc-sub8", {"sub_tiles": 8, "num_warps": 8}),
    ("tc-m64", {"block_m": 64, "sub_tiles": 1, "block_n": 64}),
]
TC_DETAIL = 1
TC_COMPILE_S = 8.0  # Triton: scatter + pass for int32 and int64 keys (the first variant also the histogram: + 4)
TC_KERNEL_FIELDS = ("pre_encode", "enc", "block_m", "sub_tiles", "block_n", "write_n", "num_warps", "num_stages",
                    "scatter_block", "part_block")


@dataclass
class Plan:
    n: int
    big: int
    reps: int
    budget_s: float
    dry_run: bool
    tc_budget_s: float = 0.0  # the end of the budget kept for the tensor-core variants
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


def highbit_tables(n: int, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """int64 keys that share their low 32 bits and differ only above: (id << 32) | 0x5BD1E995, 50% probe hits."""
    bk, br, pk, pr = make_tables(Case("uniform", n, dtype="int32"), seed=seed, device=device)
    lift = lambda k: ((k.to(torch.int64) & 0x7FFFFFFF) << 32) | 0x5BD1E995  # noqa: E731  (injective on ids < 2^31)
    return lift(bk), br, lift(pk), pr


_TIMING_TABLES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def tables(kind: str, n: int, seed: int, device: str, *, keep: bool = False) -> tuple[torch.Tensor, ...]:
    """(build_keys, build_rows, probe_keys, probe_rows); ``keep``: cached (the timed tables, reused by variants)."""
    key = (kind, n, seed, device)
    if key in _TIMING_TABLES:
        return _TIMING_TABLES[key]
    if kind == "highbits":
        t = highbit_tables(n, seed, device)
    else:
        dtype = "int64" if kind == "uniform64" else "int32"
        t = make_tables(Case("uniform" if kind == "uniform64" else kind, n, dtype=dtype), seed=seed, device=device)
    if keep:
        _TIMING_TABLES[key] = t
    return t


def packed_pairs(build_rows: torch.Tensor, probe_rows: torch.Tensor) -> torch.Tensor:
    return torch.sort((build_rows.to(torch.int64) << 32) | probe_rows.to(torch.int64)).values


def make_op(label: str, overrides: dict[str, Any], dry_run: bool):
    cfg = {k: v for k, v in overrides.items() if not k.startswith("_")}
    if label.startswith("tc"):
        from impl.join.tc_triton import TCConfig, TensorCoreJoin

        return TensorCoreJoin(TCConfig(**cfg))
    if dry_run:
        from impl.join.hash_numba import HashJoinNumba

        return HashJoinNumba(replace(BASE, threads=32, items=min(cfg.get("items", 4), 4),
                                     **{k: v for k, v in cfg.items() if k not in ("threads", "items")}))
    from impl.join.hash_cuda import HashJoinCuda

    return HashJoinCuda(replace(BASE, **cfg))


def join_fn(op, overrides: dict[str, Any], t: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    bk, br, pk, pr = t
    if overrides.get("_exact"):  # build, count, sync, exact-size allocation, write
        return lambda: run_join(op, bk, pk, br, pr)
    return lambda: op(bk, pk, br, pr)


def check(op, overrides: dict[str, Any], kinds: tuple[str, ...], n: int, device: str) -> dict[str, str]:
    """Exact comparison with the sort-merge join on fresh random tables; 'ok' or the failure."""
    from impl.join.sortmerge import SortMergeJoin

    out = {}
    for kind in kinds:
        t = tables(kind, n, seed=int(time.time_ns() % 2**31), device=device)
        try:
            got = join_fn(op, overrides, t)()
            want = SortMergeJoin()(t[0], t[2], t[1], t[3])
            same = len(got) == len(want) and torch.equal(packed_pairs(got.build_rows, got.probe_rows),
                                                         packed_pairs(want.build_rows, want.probe_rows))
            out[kind] = "ok" if same else f"differs: {len(got)} pairs, sort-merge {len(want)}"
        except Exception as e:  # a failing variant is reported, not fatal
            out[kind] = f"error: {type(e).__name__}: {e}"
    return out


def timed(fn: Callable[[], Any], reps: int) -> dict[str, Any]:
    t = time_fn(fn, warmup=3, reps=reps, flush=True, queue_ahead=backend.ON_GPU)
    ts = sorted(t.times_ms)
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))] * 1e3  # noqa: E731
    return {"median_us": t.median_ms * 1e3, "p10_us": q(0.1), "p90_us": q(0.9), "rounds_us": [x * 1e3 for x in ts]}


def time_variant(op, overrides: dict[str, Any], plan: Plan, device: str, detail: bool) -> dict[str, Any]:
    cases = [("uniform", plan.n), ("uniform", plan.big)]
    if detail:
        cases += [("zipf", plan.n), ("m2m", plan.n), ("uniform64", plan.n), ("uniform64", plan.big)]
    else:  # what the variant is about beyond the int32 uniform tables
        cases += [("m2m", plan.n)] if overrides.get("spec_factor", 1) > 1 or overrides.get("chains") else []
        cases += [("uniform64", plan.n), ("uniform64", plan.big)] if "linear_wide" in overrides else []
    out: dict[str, Any] = {}
    for kind, n in cases:
        if plan.left() < 3:
            out[f"{kind}-{n}"] = {"skipped": "budget"}
            continue
        t = tables(kind, n, seed=4, device=device, keep=True)
        res = join_fn(op, overrides, t)()
        before = (op.launches, op.syncs)
        op_call = join_fn(op, overrides, t)
        op_call()
        per_join = {"launches": op.launches - before[0], "host_syncs": op.syncs - before[1]}
        kb, rb = t[0].element_size(), t[1].element_size()
        rec = timed(op_call, plan.reps if n <= plan.n else max(5, plan.reps // 2))
        rec.update(per_join, pairs=len(res), bytes=compulsory_bytes(n, n, len(res), kb, rb))
        rec["rows_per_s"] = 2 * n / (rec["median_us"] * 1e-6)
        out[f"{kind}-{n}"] = rec
    if detail and plan.left() > 5:
        out["phases"] = (time_tc_phases if hasattr(op, "partition") else time_phases)(op, plan, device)
    return out


def time_probe_and_materialize(op, t: tuple[torch.Tensor, ...], reps: int, out: dict[str, Any]) -> Any:
    """Time ``op``'s probe (after one build) and materialize phases of tables ``t`` = (bk, br, pk, pr) into ``out``
    ("probe", "materialize"); returns the probe state."""
    bk, br, pk, pr = t
    built = op.build(bk, br)
    out["probe"] = timed(lambda: op.probe(built, pk, pr), reps)
    probed = op.probe(built, pk, pr)
    ob = torch.empty(probed.total, dtype=br.dtype, device=br.device)
    opr = torch.empty_like(ob)
    out["materialize"] = timed(lambda: op.materialize(probed, ob, opr), reps)
    return probed


def time_tc_phases(op, plan: Plan, device: str) -> dict[str, Any]:
    """The tensor-core join's phases at --n (uniform): partition, probe, materialize, total; the tl.dot FLOPs of one
    pass, per useful comparison, and the pass's TFLOP/s."""
    from impl.join.tc_triton import dot_flops, rewalk_programs

    bk, br, pk, pr = t = tables("uniform", plan.n, seed=4, device=device, keep=True)
    out = {"partition": timed(lambda: op.partition(bk, pk, br, pr), plan.reps)}
    probed = time_probe_and_materialize(op, t, plan.reps, out)
    out["total"] = timed(lambda: op(bk, pk, br, pr), plan.reps)
    rec = {k: {"median_us": v["median_us"]} for k, v in out.items()}
    flops = dot_flops(probed, op.config, rewalk_programs(probed, op.config))
    rec["flops_per_pass"] = flops
    rec["flops_per_useful_comparison"] = flops / max(probed.total, 1)
    rec["pass_tflops"] = flops / (out["materialize"]["median_us"] * 1e-6) / 1e12
    return rec


def time_phases(op, plan: Plan, device: str) -> dict[str, Any]:
    """build (epoch bump + build kernel), probe (count kernel + readback), materialize (write kernel) at --n."""
    bk, br, pk, pr = t = tables("uniform", plan.n, seed=4, device=device, keep=True)
    out = {"build": timed(lambda: op.build(bk, br), plan.reps)}
    time_probe_and_materialize(op, t, plan.reps, out)
    return {k: {"median_us": v["median_us"]} for k, v in out.items()}


def write(out_dir: Path, record: dict[str, Any]) -> None:
    """``record`` as ``out_dir/tune.json``, with the device, commit, date and run id of the run that measured it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tune.json.tmp"
    stamp = {"device": gpu_name(), "commit": git_commit(), "date": now_iso(), "run_id": RUN_ID}
    tmp.write_text(json.dumps({**stamp, **record}, indent=1, default=str))
    tmp.replace(out_dir / "tune.json")


def table(record: dict[str, Any]) -> str:
    """Median µs per variant: n = --n rows per side, N = --big; launches and host syncs of one n-row join."""
    n, big = record["n"], record["big"]
    cols = [("n", f"uniform-{n}"), ("N", f"uniform-{big}"), ("zipf", f"zipf-{n}"), ("m2m", f"m2m-{n}"),
            ("i64 n", f"uniform64-{n}"), ("i64 N", f"uniform64-{big}")]
    lines = [f"median us; n = {n:,}, N = {big:,} rows per side",
             f"{'variant':22s} {'check':5s} " + " ".join(f"{c:>8s}" for c, _ in cols) + "  launches syncs"]
    for v in record["variants"]:
        t = v.get("times", {})
        ok = "ok" if v.get("checks") and all(c == "ok" for c in v["checks"].values()) else "FAIL"
        if "skipped" in v:
            ok = "skip"
        cells = [f"{t[k]['median_us']:8.1f}" if "median_us" in t.get(k, {}) else f"{'-':>8s}" for _, k in cols]
        u = t.get(f"uniform-{n}", {})
        lines.append(f"{v['label']:22s} {ok:5s} " + " ".join(cells)
                     + f"  {u.get('launches', '-'):>8} {u.get('host_syncs', '-'):>5}")
        if "phases" in t:
            ph = t["phases"]
            lines.append("    phases at n (us): "
                         + ", ".join(f"{k} {p['median_us']:.1f}" for k, p in ph.items() if isinstance(p, dict)))
            if "flops_per_pass" in ph:
                lines.append(f"    tl.dot: {ph['flops_per_pass'] / 1e9:.2f} GFLOP per pass, "
                             f"{ph['flops_per_useful_comparison']:,.0f} per useful comparison, "
                             f"pass at {ph['pass_tflops']:.1f} TFLOP/s")
    lines.append(decision(record))
    return "\n".join(lines)


def fastest(record: dict[str, Any], key: str, kind: str) -> tuple[float, str] | None:
    """(median µs, label) of the fastest checked variant of ``kind`` ("hash" or "tc") on the timed case ``key``."""
    best = None
    for v in record["variants"]:
        med = v.get("times", {}).get(key, {}).get("median_us")
        ok = v.get("checks") and all(c == "ok" for c in v["checks"].values())
        if (v["label"].startswith("tc")) == (kind == "tc") and med is not None and ok and (best is None
                                                                                           or med < best[0]):
            best = (med, v["label"])
    return best


def tuned_case_key(record: dict[str, Any], rows: int, wide: bool) -> str:
    """The tune's timed case closest to a join of ``rows`` rows per side: its large size (``big``) from there up,
    else its main one (``n``); int64 keys (``wide``) on the int64 tables."""
    size = record["big"] if rows >= record["big"] else record["n"]
    return f"{'uniform64' if wide else 'uniform'}-{size}"


def tuned_hash_config(path: str | Path, rows: int | None = None,
                      wide: bool = False) -> tuple[dict[str, Any], str] | None:
    """(HashConfig fields, label) of the fastest hash variant that passed its checks in the tune record at ``path``
    on the timed case closest to ``rows`` x ``rows`` joins (``tuned_case_key``; default: n on uniform int32 keys,
    which every variant times; a case no checked variant timed falls back to it), as the record's ``base_config``
    with the variant's overrides; None if there is no record or no such variant. Variants that are not a HashConfig
    (the exact-size paths' ``_exact``) are left out."""
    path = Path(path)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    fields = set(HashConfig.__dataclass_fields__)
    variants = [v for v in record.get("variants", []) if set(v.get("config", {})) <= fields]
    usable = {**record, "variants": variants}
    best = None if rows is None else fastest(usable, tuned_case_key(record, rows, wide), "hash")
    best = best or fastest(usable, f"uniform-{record['n']}", "hash")
    if best is None:
        return None
    overrides = next(v["config"] for v in variants if v["label"] == best[1])
    base = {k: v for k, v in record["base_config"].items() if k in fields}
    return {**base, **overrides}, best[1]


def stored_hash_config(rows: int | None = None, wide: bool = False) -> tuple[dict[str, Any], str, str] | None:
    """On a GPU: (HashConfig fields, variant label, source) of this card's stored tune
    (``results/<card>/join/tune.json``, ``tuned_hash_config`` for joins of ``rows`` rows per side), which the join
    benches and the ncu driver run the CUDA hash join with; None without a GPU or a usable record."""
    if not backend.ON_GPU:
        return None
    from impl.common.results import results_dir

    path = results_dir() / "join" / "tune.json"
    tuned = tuned_hash_config(path, rows, wide)
    return None if tuned is None else (*tuned, f"{path.parent.parent.name}/join/tune.json")


def decision(record: dict[str, Any]) -> str:
    """The fastest checked hash and tensor-core variants at n (uniform) and their ratio; the fastest hash variants
    on int64 keys at --big and on m2m at n."""
    n, big = record["n"], record["big"]
    best = {kind: fastest(record, f"uniform-{n}", kind) for kind in ("hash", "tc")}
    parts = [f"{kind} {b[1]} {b[0]:.1f} us" for kind, b in best.items() if b]
    if best["hash"] and best["tc"]:
        parts.append(f"tc/hash {best['tc'][0] / best['hash'][0]:.2f}x (claim: <= 10)")
    line = "decision at n: " + ("; ".join(parts) if parts else "no variant passed its checks")
    for label, key in (("int64 at N", f"uniform64-{big}"), ("m2m at n", f"m2m-{n}")):
        b = fastest(record, key, "hash")
        line += f"\ndecision {label}: " + (f"hash {b[1]} {b[0]:.1f} us" if b else "no checked variant timed it")
    return line


def skip(record: dict[str, Any], label: str, overrides: dict[str, Any], plan: Plan) -> None:
    """Record a variant the budget has no room for."""
    record["variants"].append({"label": label, "config": overrides, "skipped": f"budget ({plan.left():.0f} s left)"})


def try_variant(v: dict[str, Any], overrides: dict[str, Any], plan: Plan, out_dir: Path, record: dict[str, Any],
                device: str, detail: bool) -> bool:
    """Check the variant ``v["label"]`` on the 1M cases and time it where every check passed, filling ``v`` (an
    exception is kept as its traceback); append ``v`` to the record and write it. True when the variant built (its
    kernels are compiled now)."""
    label, built = v["label"], False
    t0 = time.monotonic()
    try:
        op = make_op(label, overrides, plan.dry_run)
        v["checks"] = check(op, overrides, CASES_1M, plan.n, device)
        built = True
        if all(c == "ok" for c in v["checks"].values()):
            v["times"] = time_variant(op, overrides, plan, device, detail=detail)
    except Exception:
        v["error"] = traceback.format_exc()[-2000:]
    v["wall_s"] = time.monotonic() - t0
    record["variants"].append(v)
    write(out_dir, record)
    print(f"tune: {label}: {v.get('checks', v.get('error', '')[-200:])} ({v['wall_s']:.1f} s)", flush=True)
    return built


def run(plan: Plan, out_dir: Path, only: set[str] | None = None) -> dict[str, Any]:
    device = backend.DEVICE
    record: dict[str, Any] = {"n": plan.n, "big": plan.big, "device": torch.cuda.get_device_name()
                              if backend.ON_GPU else "cpu", "dry_run": plan.dry_run, "budget_s": plan.budget_s,
                              "base_config": asdict(BASE), "variants": [], "complete": False}
    compiled: set[tuple] = set()
    for i, (label, overrides) in enumerate(VARIANTS):
        if only and label not in only:
            continue
        # a new module to compile where the -D options differ (hash_cuda.compile_options: what the kernels read)
        key = compile_options(replace(BASE, **{k: v for k, v in overrides.items() if not k.startswith("_")}))
        cost = (0 if key in compiled else COMPILE_S) + 5
        if plan.left() - plan.tc_budget_s < cost:
            skip(record, label, overrides, plan)
            continue
        v: dict[str, Any] = {"label": label, "config": overrides}
        if try_variant(v, overrides, plan, out_dir, record, device, detail=i < DETAIL):
            compiled.add(key)
    run_tc(plan, out_dir, record, device, only)
    record["complete"] = True
    record["wall_s"] = time.monotonic() - plan.started
    write(out_dir, record)
    return record


def run_tc(plan: Plan, out_dir: Path, record: dict[str, Any], device: str, only: set[str] | None) -> None:
    """The tensor-core variants, in the rest of the budget (the same checks and timings as the hash variants)."""
    from impl.join.tc_triton import TCConfig

    compiled: set[tuple] = set()
    for i, (label, overrides) in enumerate(TC_VARIANTS):
        if only and label not in only:
            continue
        cfg = TCConfig(**overrides)
        key = tuple(getattr(cfg, f) for f in TC_KERNEL_FIELDS)
        cost = (0 if key in compiled else TC_COMPILE_S + (0 if compiled else 4)) + 4
        if plan.left() < cost:
            skip(record, label, overrides, plan)
            continue
        v: dict[str, Any] = {"label": label, "config": overrides, "tc_config": asdict(cfg)}
        if try_variant(v, overrides, plan, out_dir, record, device, detail=i < TC_DETAIL):
            compiled.add(key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for tune.json")
    ap.add_argument("--budget-s", type=float, default=80.0)
    ap.add_argument("--tc-budget-s", type=float, default=30.0,
                    help="the end of the budget kept for the tensor-core variants")
    ap.add_argument("--n", type=int, default=None, help="rows per side of the main case (1M on a GPU)")
    ap.add_argument("--big", type=int, default=None, help="rows per side of the large case (10M on a GPU)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--variants", default="", help="comma-separated labels to run (default: all, in order)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: the numba twin at tiny sizes (all but CuPy)")
    a = ap.parse_args(argv)
    dry = a.dry_run or not backend.ON_GPU
    if not a.dry_run and not backend.ON_GPU:
        print(f"tune: no GPU ({backend.NO_GPU_REASON}); running the dry run", file=sys.stderr)
    if not dry:
        from impl.join.hash_cuda import unavailable_reason

        if unavailable_reason():
            print(f"tune: {unavailable_reason()}", file=sys.stderr)
            return 2
    plan = Plan(n=a.n or (300 if dry else 1_000_000), big=a.big or (700 if dry else 10_000_000),
                reps=a.reps or (2 if dry else 20), budget_s=a.budget_s, dry_run=dry,
                tc_budget_s=min(a.tc_budget_s, a.budget_s))
    only = {v for v in a.variants.split(",") if v}
    labels = [label for label, _ in VARIANTS + TC_VARIANTS]
    unknown = only - set(labels)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {labels}")
    record = run(plan, Path(a.out), only or None)
    print(table(record), flush=True)
    print(f"tune: wrote {Path(a.out) / 'tune.json'} in {record['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
