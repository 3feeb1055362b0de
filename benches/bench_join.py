"""Benches of the join: four GPU joins split into build / probe / materialize, end to end, host anchors, and the
scaling curve.

Cases (rows per side; ``impl.join.data``): uniform 100k / 1M / 10M / 100M int32 and int64 (unique build keys, ~50%
probe hits), zipf-1M (foreign keys Zipf(1)-skewed onto unique build keys) and m2m-1M (~8 build rows per key). Names:
  test_join_hash[{cuda|numba}-{build|probe|materialize|total}-{case}]
  test_join_tc[{phase}-{case}]  test_join_sortmerge[{phase}-{case}]  test_join_host[{pandas|duckdb|polars}-{case}]
Each phase is timed on its own (L2 flushed before every round, so a phase never inherits the previous phase's
cache); ``total`` is the whole join through the public call, exact-size outputs included (the hash joins: speculative
output and one host sync). ``bytes_moved`` is the compulsory traffic of the workload, the same for every join and
anchor (read both sides' keys and row ids once, write the pairs once); the hash joins add their estimated extra
traffic (``traffic_bytes``: table, per-row scratch), launches and host syncs per join; the tensor-core bench records
the FLOPs its tl.dot tiles issue per pass, per useful comparison, its extra traffic, launches and host syncs, and
times its partitioning on its own (``test_join_tc[partition-1M]``). After timing, every bench checks its output
against the sort-merge join's fingerprint (pair count, row-id sums, a pair hash; at CPU sizes the exact pairs against
pandas). A join that cannot fit in memory (100M) is skipped with its MemoryError, which names the bytes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from impl.backend import DEVICE, sized
from impl.join import host, make_operator
from impl.join.data import Case, compulsory_bytes, make_tables
from impl.join.tune import stored_hash_config

CASES = {
    "100k": Case("uniform", sized(100_000, 160)),
    "1M": Case("uniform", sized(1_000_000, 256)),
    "10M": Case("uniform", sized(10_000_000, 320)),
    "100M": Case("uniform", sized(100_000_000, 384)),
    "100k-i64": Case("uniform", sized(100_000, 160), dtype="int64"),
    "1M-i64": Case("uniform", sized(1_000_000, 256), dtype="int64"),
    "10M-i64": Case("uniform", sized(10_000_000, 320), dtype="int64"),
    "100M-i64": Case("uniform", sized(100_000_000, 384), dtype="int64"),
    "zipf-1M": Case("zipf", sized(1_000_000, 256)),
    "m2m-1M": Case("m2m", sized(1_000_000, 256)),
}
PHASES = ("build", "probe", "materialize", "total")
PHASED = ("100k", "1M", "10M", "zipf-1M", "m2m-1M")  # per-phase benches; the rest end to end only
SCALING = ("100k", "1M", "10M", "100M", "100k-i64", "1M-i64", "10M-i64", "100M-i64")
HASH_SPECS = ([f"cuda-{p}-{c}" for c in PHASED for p in PHASES]
              + [f"cuda-total-{c}" for c in SCALING if c not in PHASED]
              + [f"numba-{p}-{c}" for c in PHASED for p in PHASES])
TC_SPECS = [f"{p}-{c}" for c in PHASED for p in PHASES] + ["partition-1M", "total-1M-i64"]
SORTMERGE_SPECS = [f"{p}-{c}" for c in PHASED for p in PHASES] + [f"total-{c}" for c in SCALING if c not in PHASED]
HOST_CASES = ("100k", "1M", "10M", "1M-i64", "10M-i64", "zipf-1M", "m2m-1M")
HOST_SPECS = [f"{h}-{c}" for h in host.HOST_JOINS for c in HOST_CASES]
# HashConfig's defaults; the simulator runs a thread per CUDA thread and slow barriers, so smaller blocks. On a GPU
# with a stored tune (results/<card>/join/tune.json, written by ``impl.join.tune``) the fastest checked hash variant
# on the tune's case closest to the bench's (1M or 10M rows, int32 or int64 keys) replaces them (``hash_config``),
# named in every hash bench's extra_info.
HASH_CONFIG = {"threads": sized(256, 32), "items": 4}


@functools.cache
def hash_config(case_id: str) -> tuple[dict, dict]:
    """(HashConfig fields of the CUDA hash join on ``case_id``, extra_info naming them): the stored tune's choice on a
    GPU, else ``HASH_CONFIG``."""
    case = CASES[case_id]
    stored = stored_hash_config(case.n, case.dtype == "int64")
    if stored is not None:
        return stored[0], {"hash_variant": stored[1], "hash_config_source": stored[2]}
    return HASH_CONFIG, {"hash_variant": "defaults"}


@dataclass(frozen=True)
class Fingerprint:
    total: int
    build_sum: int
    probe_sum: int
    pair_hash: int  # Σ (build_row · 1000003 + probe_row), wrapping in int64 the same way for every join


def fingerprint(build_rows, probe_rows) -> Fingerprint:
    b = torch.as_tensor(build_rows).to(torch.int64)
    p = torch.as_tensor(probe_rows).to(device=b.device, dtype=torch.int64)
    return Fingerprint(b.numel(), int(b.sum()), int(p.sum()), int((b * 1000003 + p).sum()))


_TABLES: dict[str, tuple[torch.Tensor, ...]] = {}
_EXPECTED: dict[str, Fingerprint] = {}
_OPS: dict[tuple, object] = {}


def tables(case_id: str) -> tuple[torch.Tensor, ...]:
    if case_id not in _TABLES:
        _TABLES[case_id] = make_tables(CASES[case_id], seed=4, device=DEVICE)
    return _TABLES[case_id]


def expected(case_id: str) -> Fingerprint:
    if case_id not in _EXPECTED:
        bk, br, pk, pr = tables(case_id)
        res = make_operator("sortmerge-torch")(bk, pk, br, pr)
        if bk.numel() <= 4096:  # CPU sizes: the baseline itself against the oracle
            ref = host.reference_pairs(*(t.cpu().numpy() for t in (bk, pk, br, pr)))
            assert np.array_equal(res.pairs(), ref), "sort-merge baseline disagrees with pandas.merge"
        _EXPECTED[case_id] = fingerprint(res.build_rows, res.probe_rows)
    return _EXPECTED[case_id]


def operator(name: str, case_id: str):
    """One operator per implementation and configuration: its workspace persists across benches, as in use."""
    config = (hash_config(case_id)[0] if name == "hash-cuda" else HASH_CONFIG) if name.startswith("hash") else {}
    key = (name, tuple(sorted(config.items())))
    if key not in _OPS:
        _OPS[key] = make_operator(name, **config)
    return _OPS[key]


def check(ob, op_, case_id: str) -> None:
    got, want = fingerprint(ob, op_), expected(case_id)
    assert got == want, f"{case_id}: join output {got} differs from the sort-merge join's {want}"


def hash_counters(op, fn) -> dict[str, int]:
    """Kernel launches and host syncs of one call of ``fn`` (the hash and tensor-core operators count both)."""
    if not hasattr(op, "launches"):
        return {}
    before = (op.launches, op.syncs)
    fn()
    return {"launches": op.launches - before[0], "host_syncs": op.syncs - before[1]}


def hash_traffic(op, case: Case, pairs: int, kb: int, rb: int) -> dict[str, int]:
    """Estimated bytes a hash join moves beyond the compulsory ones: the table read and written back once, the
    per-row heads and per-thread counts written and read, the gathered build row ids; partitioned: both sides' keys
    read again (pcount, pscatter), their (key, row id) pairs written into partitions and read back by pjoin."""
    n, cfg = case.n, getattr(op, "config", None)
    if getattr(cfg, "scheme", None) == "partitioned" and getattr(op, "partitioned_available", False):
        return {"traffic_bytes": compulsory_bytes(n, n, pairs, kb, rb) + 2 * n * kb + 4 * n * (kb + rb)}
    if getattr(op, "layout", None) is None:
        return {}
    linear = cfg.scheme.startswith("linear64") and case.dtype == "int32"  # no heads or counts: the probe looks again
    scratch = 0 if linear else 2 * (4 * n + 8 * cfg.tiles(n) * cfg.threads)
    return {"traffic_bytes": compulsory_bytes(n, n, pairs, kb, rb) + 2 * op.layout.nbytes + scratch + pairs * rb}


def run_phase(device_bench, name: str, phase: str, case_id: str, flops_per_pass: int = 0, build_reads: bool = True,
              flops_dtype: str = "bf16", total_flops: int | None = None, **extra) -> None:
    """Time one phase (or the whole join) of operator ``name`` on ``case_id``, then check its output
    (``build_reads=False``: the operator's build only records its inputs, so it is charged no bytes; ``total_flops``:
    the FLOPs of the whole join, by default two passes)."""
    op = operator(name, case_id)
    bk, br, pk, pr = tables(case_id)
    case, want = CASES[case_id], expected(case_id)
    kb, rb = bk.element_size(), br.element_size()
    info = dict(impl=name, phase=phase, case=case_id, kind=case.kind, n=case.n, dtype=case.dtype, pairs=want.total,
                rows=2 * case.n, **(hash_config(case_id)[1] if name == "hash-cuda" else {}), **extra)

    def bench(fn, bytes_moved: int, flops: int = 0, **more):
        return device_bench(fn, bytes_moved=bytes_moved, flops=flops, flops_dtype=flops_dtype, **info, **more)

    if phase == "total":
        call = lambda: op(bk, pk, br, pr)  # noqa: E731
        try:
            counters = hash_counters(op, call)
        except MemoryError as e:
            pytest.skip(f"{name} refuses {case_id}: {e}")
        flops = 2 * flops_per_pass if total_flops is None else total_flops
        res = bench(call, compulsory_bytes(case.n, case.n, want.total, kb, rb), flops, **counters,
                    **hash_traffic(op, case, want.total, kb, rb), output_bytes=2 * want.total * rb)
        check(res.build_rows, res.probe_rows, case_id)
        return
    if phase == "build":
        bench(lambda: op.build(bk, br), case.n * (kb + rb) if build_reads else 0)
    built = op.build(bk, br)
    if phase == "probe":
        bench(lambda: op.probe(built, pk, pr), case.n * kb, flops_per_pass)
    probed = op.probe(built, pk, pr)
    assert probed.total == want.total, f"{case_id}: {name} counted {probed.total} pairs, expected {want.total}"
    ob = torch.empty(want.total, dtype=br.dtype, device=bk.device)
    op_ = torch.empty_like(ob)
    if phase == "materialize":
        bench(lambda: op.materialize(probed, ob, op_), case.n * rb + 3 * want.total * rb, flops_per_pass)
    elif want.total:
        op.materialize(probed, ob, op_)
    check(ob, op_, case_id)


@pytest.mark.parametrize("spec", HASH_SPECS)
def test_join_hash(device_bench, spec):
    impl_, phase, case_id = spec.split("-", 2)
    name = f"hash-{impl_}"
    if impl_ == "cuda":
        from impl.join.hash_cuda import unavailable_reason

        if unavailable_reason():
            pytest.skip(unavailable_reason())
    run_phase(device_bench, name, phase, case_id)


def tc_accounting(op, case_id: str) -> dict:
    """What the tensor-core join issues on ``case_id``: tl.dot FLOPs of one pass (the counting walk plus the second
    walk of programs whose rows match more than once), per useful comparison (one that found a pair, worth
    2·KBITS FLOPs), and its estimated traffic beyond the compulsory bytes."""
    from impl.join.tc_triton import dot_flops, rewalk_programs

    bk, br, pk, pr = tables(case_id)
    probed = op.partition(bk, pk, br, pr)
    flops = dot_flops(probed, op.config, rewalk_programs(probed, op.config))
    useful = expected(case_id).total
    kbits, kb, rb = 8 * bk.element_size(), bk.element_size(), br.element_size()
    n_scan, n_tile = (probed.nb, probed.np_) if probed.tile_probe else (probed.np_, probed.nb)
    enc_bytes = probed.enc.numel() * probed.enc.element_size()
    from impl.join.tc_triton import scan_chunks

    chunk_rows = int(scan_chunks(probed, op.config).sum()) * op.config.sub_tiles * op.config.block_n
    traffic = (compulsory_bytes(probed.nb, probed.np_, useful, kb, rb)
               + 2 * (probed.nb + probed.np_) * kb                # hist and scatter read the keys (scatter: again)
               + (probed.nb + probed.np_) * (kb + rb)             # partitioned keys and row ids written
               + enc_bytes                                        # scan-side encodings written ...
               + chunk_rows * enc_bytes // max(n_scan, 1)         # ... and read per chunk of every run
               + n_tile * kb + 2 * useful * rb)                   # tile keys read; matched row ids gathered
    return dict(flops=flops, flops_per_useful_comparison=flops / max(useful, 1), useful_flops=2 * kbits * useful,
                traffic_bytes=traffic, tc_enc=op.config.enc, tc_config=str(op.config))


@pytest.mark.parametrize("spec", TC_SPECS)
def test_join_tc(device_bench, spec):
    """Phases of the tensor-core join: build (records the inputs), partition (hist, cumsum, scatter: both sides),
    probe (partition + the pass counting only + the total read back), materialize (the pass writing exact-size
    outputs), total (partition + ONE counting-and-writing pass into a speculative output + the readback)."""
    phase, case_id = spec.split("-", 1)
    op = operator("tc-triton", case_id)
    acct = tc_accounting(op, case_id)
    flops_dtype = "fp8" if op.config.enc == "int8" else "bf16"  # the tensor-core rate the encoding runs at
    if phase == "partition":
        bk, br, pk, pr = tables(case_id)
        case = CASES[case_id]
        device_bench(lambda: op.partition(bk, pk, br, pr), bytes_moved=case.n * 2 * (bk.element_size()
                                                                                      + br.element_size()),
                     impl="tc-triton", phase=phase, case=case_id, kind=case.kind, n=case.n, dtype=case.dtype,
                     rows=2 * case.n, note="hist + cumsum + scatter of both sides (keys, row ids, scan encodings)",
                     launches=3, **{k: v for k, v in acct.items() if k not in ("flops", "traffic_bytes")})
        return
    flops = {"build": 0, "probe": acct["flops"], "materialize": acct["flops"], "total": acct["flops"]}[phase]
    run_phase(device_bench, "tc-triton", phase, case_id, flops_per_pass=flops, build_reads=False,
              flops_dtype=flops_dtype, total_flops=flops,
              note="both sides are partitioned in the probe phase; build only records the inputs",
              **{k: v for k, v in acct.items() if k != "flops" and (phase == "total" or k != "traffic_bytes")})


@pytest.mark.parametrize("spec", SORTMERGE_SPECS)
def test_join_sortmerge(device_bench, spec):
    phase, case_id = spec.split("-", 1)
    run_phase(device_bench, "sortmerge-torch", phase, case_id)


@pytest.mark.parametrize("spec", HOST_SPECS)
def test_join_host(device_bench, spec):
    name, case_id = spec.split("-", 1)
    reason = host.unavailable_reason(name)
    if reason:
        pytest.skip(reason)
    bk, br, pk, pr = (t.cpu().numpy() for t in tables(case_id))
    case, want = CASES[case_id], expected(case_id)
    ob, op_ = device_bench(lambda: host.JOINS[name](bk, pk, br, pr), clock="host", flush_l2=False,
                           rounds=3 if case.n >= 1_000_000 else 5, warmup=1,
                           bytes_moved=compulsory_bytes(case.n, case.n, want.total, bk.itemsize, br.itemsize),
                           impl=name, phase="total", case=case_id, kind=case.kind, n=case.n, dtype=case.dtype,
                           pairs=want.total, rows=2 * case.n, host_threads=torch.get_num_threads())
    assert fingerprint(np.array(ob), np.array(op_)) == want  # copies: pandas may hand out read-only arrays
