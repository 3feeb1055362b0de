"""Property tests of the joins: every implementation equals pandas.merge as a multiset of pairs.

Tables come from one strategy that mixes the cases that break joins: unique keys with ~50% misses, heavy duplicates
(many-to-many), Zipf skew, dtype extremes, keys equal to any value a table might reserve (-1, 0, INT_MIN/MAX), int64
keys differing only in their high 32 bits (and pairs whose folded 32-bit hashes collide), disjoint key sets and empty
tables; row ids are absent (positions), int32, int64 or mixed (widened). Outputs are poisoned with two patterns
before the materialize kernel writes them. The hash-join operators are reused across examples, so tables are reused
across joins (epoch tags, wraps forced with 1-2 epoch bits). The CUDA C++ join runs where cupy and a GPU exist, on
the same tables as its numba twin; on the CPU its source runs under a CUDA emulation (g++), every scheme, several
joins per process, and hash_cuda.py's own launch code drives the emulated kernels. Sizes grow under the ``gpu``
profile.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.oracle import POISON_PATTERNS, assert_close, poison_
from fixtures.strategies import make_array, max_size, seeds
from impl.backend import DEVICE, ON_GPU, sized
from impl.join import IMPLS, common, host, make_operator
from impl.join.common import check_inputs, hash_keys, hash_keys_torch, sort_pairs
from impl.join.hash_cuda import SOURCE
from impl.join.hash_cuda import unavailable_reason as cuda_reason
from impl.join.hash_numba import HashJoinNumba
from impl.join.hash_table import (PART_ROWS_MAX, SCHEMES, SHARED_BYTES, HashConfig, bucket_step_np, first_bucket_np,
                                  next_epoch, part_capacity, part_table_bytes, partition_bits, plan_layout,
                                  table_contents)
from impl.join.host import reference_pairs
from impl.join.tc_triton import TCConfig, TensorCoreJoin

MIXES = ("unique", "dups", "zipf", "extremes", "sentinel", "highbits", "disjoint", "patterns")
SMALL_DOMAIN = ("dups", "extremes", "sentinel", "highbits", "patterns")  # fan-out ~n²/domain: keep these smaller
ROWS = ("none", "int32", "int64", "mixed")


# ---- inputs -----------------------------------------------------------------------------------------------------

def _unique_pool(rng: np.random.Generator, size: int, dtype: str) -> np.ndarray:
    info = np.iinfo(dtype)
    pool = np.unique(rng.integers(info.min, info.max, size=size + 16, dtype=dtype, endpoint=True))
    rng.shuffle(pool)
    return pool


def _pick(rng: np.random.Generator, values: np.ndarray, n: int) -> np.ndarray:
    return values[rng.integers(0, len(values), n)] if len(values) else values[:0]


def make_join_tables(nb: int, np_: int, dtype: str, mix: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Build and probe keys (numpy, ``dtype``) for one key mix; see the module doc."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    if mix == "unique":
        pool = _unique_pool(rng, 2 * (nb + np_), dtype)
        bk, absent = pool[:nb], pool[nb:]
        return bk, np.where(rng.random(np_) < 0.5, _pick(rng, bk, np_) if nb else _pick(rng, absent, np_),
                            _pick(rng, absent, np_)).astype(dtype)
    if mix == "dups":
        domain = np.arange(-4, 12, dtype=dtype)
        return _pick(rng, domain, nb), _pick(rng, domain, np_)
    if mix == "zipf":
        domain = _unique_pool(rng, 64, dtype)
        ranks = lambda n: np.minimum(rng.zipf(1.5, n), len(domain)) - 1  # noqa: E731
        return domain[ranks(nb)], domain[ranks(np_)]
    if mix == "extremes":
        domain = np.array([info.min, info.min + 1, -1, 0, 1, info.max - 1, info.max], dtype=dtype)
        domain = np.concatenate([domain, _unique_pool(rng, 4, dtype)[:4]])
        return _pick(rng, domain, nb), _pick(rng, domain, np_)
    if mix == "sentinel":
        domain = np.array([-1, -1, -1, 0, 0, info.min, info.max, 3, -2], dtype=dtype)
        return _pick(rng, domain, nb), _pick(rng, domain, np_)
    if mix == "highbits":  # int64: equal low words, different high words; (a, b) and (b, a) fold to one hash
        if dtype == "int32":
            return make_join_tables(nb, np_, dtype, "extremes", seed)
        a, b = (rng.integers(-2**31, 2**31, 3, dtype=np.int64) for _ in range(2))
        words = np.concatenate([(a << 32) | (b & 0xFFFFFFFF), (b << 32) | (a & 0xFFFFFFFF),
                                ((a + 1) << 32) | (b & 0xFFFFFFFF), [info.min, info.max, -1, 0]])
        domain = np.unique(words.astype(np.int64))
        return _pick(rng, domain, nb), _pick(rng, domain, np_)
    if mix == "disjoint":
        half = info.max // 2
        return (2 * rng.integers(-half // 2, half // 2, nb)).astype(dtype), \
            (2 * rng.integers(-half // 2, half // 2, np_) + 1).astype(dtype)
    pattern_b, pattern_p = rng.choice(["random", "sorted", "all_equal", "few_distinct", "zipf", "extremes"], 2)
    bk = make_array(nb, dtype, str(pattern_b), seed)
    own = make_array(np_, dtype, str(pattern_p), seed + 1)
    return bk, np.where(rng.random(np_) < 0.5, _pick(rng, bk, np_) if nb else own, own).astype(dtype)


def make_rows(n: int, kind: str, side: str, rng: np.random.Generator) -> np.ndarray | None:
    """Row ids that are not positions (a shuffled, offset range), so a join that returns positions fails."""
    if kind == "none":
        return None
    wide = kind == "int64" or (kind == "mixed" and side == "probe")
    ids = rng.permutation(n).astype(np.int64)
    return (ids * 3 - 7 + (1 << 40 if wide else 0)).astype(np.int64 if wide else np.int32)


@st.composite
def join_inputs(draw, max_n: int | None = None):
    mix = draw(st.sampled_from(MIXES))
    hi = max_n or max_size(cpu=300 if mix in SMALL_DOMAIN else 600, gpu=2_000 if mix in SMALL_DOMAIN else 100_000)
    sizes = st.one_of(st.sampled_from([0, 1, 2, 31, 32, 33, 127, 128, 129]), st.integers(0, hi)).map(
        lambda n: min(n, hi))
    nb, np_ = draw(sizes), draw(sizes)
    dtype = draw(st.sampled_from(["int32", "int64"]))
    seed = draw(seeds())
    bk, pk = make_join_tables(nb, np_, dtype, mix, seed)
    rng = np.random.default_rng(seed + 7)
    rows = draw(st.sampled_from(ROWS))
    return bk, pk, make_rows(nb, rows, "build", rng), make_rows(np_, rows, "probe", rng)


def to_device(*arrays):
    return [None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE) for a in arrays]


# ---- the check --------------------------------------------------------------------------------------------------

def check_join(op, bk, pk, br=None, pr=None) -> None:
    """Phases by hand: build, probe (total must equal the oracle's), then materialize twice into poisoned outputs;
    both results must equal pandas.merge's pairs as multisets, and the inputs must be unchanged."""
    ref = reference_pairs(bk, pk, br, pr)
    tensors = to_device(bk, pk, br, pr)
    before = [None if t is None else t.clone() for t in tensors]
    t = check_inputs(*tensors)
    built = op.build(t.build_keys, t.build_rows)
    probed = op.probe(built, t.probe_keys, t.probe_rows)
    assert probed.total == len(ref), f"{op.name}: counted {probed.total} pairs, pandas.merge has {len(ref)}"
    for pattern in POISON_PATTERNS:
        ob = torch.empty(probed.total, dtype=t.build_rows.dtype, device=DEVICE)
        opr = torch.empty_like(ob)
        poison_(ob, pattern)
        poison_(opr, pattern)
        if probed.total:
            op.materialize(probed, ob, opr)
        assert_close(sort_pairs(ob.cpu().numpy(), opr.cpu().numpy()), ref, msg=f"{op.name}, poison={pattern}")
    for a, b in zip(tensors, before):
        assert a is None or torch.equal(a, b), f"{op.name} modified its input"


_OPS: dict[tuple, object] = {}


def cached(key: tuple, make):
    """Operators are reused across examples, so workspaces are reused too (and self-resetting counters tested)."""
    if key not in _OPS:
        _OPS[key] = make()
    return _OPS[key]


# Each distinct (threads, items, bucket) is a fresh compile on the GPU: few there, more variety here.
HASH_CONFIGS = st.builds(HashConfig, scheme=st.sampled_from(["split", "linear64", "partitioned"]),
                         linear_wide=st.booleans(),
                         spec_factor=st.sampled_from([1, 8]),
                         load_factor=st.sampled_from([0.25, 0.5, 0.9]),
                         threads=st.sampled_from(sized(gpu=[256], cpu=[32, 64])),
                         items=st.sampled_from(sized(gpu=[1, 8], cpu=[1, 4])),
                         bucket_bytes=st.sampled_from([32, 64]), clear=st.sampled_from(["epoch", "memset"]),
                         epoch_bits=st.sampled_from([None, 1, 2]))
TC_CONFIGS = st.builds(TCConfig, bucket_rows=st.sampled_from([1, 4, 32]),
                       block_m=st.sampled_from(sized(gpu=[16], cpu=[16, 32])),
                       sub_tiles=st.sampled_from(sized(gpu=[4], cpu=[1, 2, 4])),
                       block_n=st.sampled_from(sized(gpu=[32], cpu=[16, 32])),
                       write_n=st.sampled_from([16, 32]), pre_encode=st.booleans(),
                       enc=st.sampled_from(sized(gpu=["fp16", "int8"], cpu=["fp32", "fp16", "int8"])),
                       num_warps=st.sampled_from(sized(gpu=[4], cpu=[1, 4])),
                       part_block=st.sampled_from(sized(gpu=[1024], cpu=[64, 1024])),
                       scatter_block=st.sampled_from(sized(gpu=[256], cpu=[64, 256])))


@given(inputs=join_inputs(), config=HASH_CONFIGS)
def test_hash_numba_join_equals_pandas(inputs, config):
    op = cached(("numba", config), lambda: HashJoinNumba(config))
    check_join(op, *inputs)
    got = op(*to_device(*inputs))  # the speculative one-sync path (a short buffer is re-written exact-size)
    assert np.array_equal(got.pairs(), reference_pairs(*inputs)), "hash-numba speculative join differs from pandas"


CUDA_CONFIGS = st.builds(HashConfig, load_factor=st.sampled_from([0.5, 0.9]),
                         scheme=st.sampled_from(SCHEMES),
                         linear_wide=st.booleans(), spec_factor=st.sampled_from([1, 8]),
                         items=st.sampled_from([1, 8]), bucket_bytes=st.sampled_from([32, 64]),
                         readback=st.sampled_from(["pinned", "item"]), epoch_bits=st.sampled_from([None, 1]))
CUDA_CONFIGS = st.one_of(CUDA_CONFIGS, st.builds(HashConfig, scheme=st.just("linear64"), linear_wide=st.booleans(),
                                                 slices=st.sampled_from([2, 16]), lrows=st.sampled_from([1, 2]),
                                                 scatter=st.booleans()),
                         st.builds(HashConfig, scheme=st.sampled_from(["linear64", "linear64-fused"]),
                                   chains=st.just(True), lrows=st.sampled_from([1, 2]),
                                   spec_factor=st.sampled_from([1, 8]), epoch_bits=st.sampled_from([None, 1])))


@pytest.mark.skipif(cuda_reason() is not None, reason=str(cuda_reason()))
@given(inputs=join_inputs(), config=CUDA_CONFIGS)
def test_hash_cuda_join_equals_pandas_and_its_twin(inputs, config):
    from impl.join.hash_cuda import HashJoinCuda

    op = cached(("cuda", config), lambda: HashJoinCuda(config))
    check_join(op, *inputs)
    twin = cached(("numba", config), lambda: HashJoinNumba(config))
    a = op(*to_device(*inputs)).pairs()
    assert np.array_equal(a, twin(*to_device(*inputs)).pairs()), "CUDA C++ and numba hash joins disagree"
    assert np.array_equal(a, reference_pairs(*inputs)), "CUDA C++ speculative join differs from pandas"


EMULATED_PART_ROWS = 16  # the emulated pjoin's table holds part_capacity(16) = 20 build rows: skew takes rounds
EMULATED_PART_PROBE = 8  # and a pjoin work item holds at most 8 probe rows: a partition's probe rows span items


def build_emulated(tmp_path_factory, *defines: str, lib: bool = False, threads: int = 32,
                   part_probe: int = EMULATED_PART_PROBE) -> Path:
    """hash_join.cu compiled for the CPU with its CUDA emulation layer (``hash_join_emulated.cpp``), ``threads`` x 4,
    pjoin tables of ``part_capacity(EMULATED_PART_ROWS)`` rows and work items of ``part_probe`` probe rows;
    ``lib``: the shared library with ``emu_launch``."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH: the CUDA C++ source cannot be run under the CPU emulation here")
    exe = tmp_path_factory.mktemp("emulated") / ("hash_join_emulated.so" if lib else "hash_join_emulated")
    src = Path(SOURCE).with_name("hash_join_emulated.cpp")
    shared = ["-shared", "-fPIC", "-DJOIN_EMULATED_LIB"] if lib else []
    proc = subprocess.run([gxx, "-std=c++20", "-O1", "-pthread", f"-DJOIN_THREADS={threads}", "-DJOIN_ITEMS=4",
                           f"-DJOIN_PART_CAP={part_capacity(EMULATED_PART_ROWS)}",
                           f"-DJOIN_PART_PROBE={part_probe}", *shared, *defines,
                           f"-I{src.parent}", "-o", str(exe), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


@pytest.fixture(scope="module")
def emulated_cuda_join(tmp_path_factory):
    return build_emulated(tmp_path_factory)


@pytest.fixture(scope="module")
def emulated_direct_scatter(tmp_path_factory):
    """The same with pscatter's staged path off beyond one partition (JOIN_STAGE_PARTS=1): rows stored from their own
    threads, as for more partitions than the stage serves."""
    return build_emulated(tmp_path_factory, "-DJOIN_STAGE_PARTS=1")


@pytest.fixture(scope="module")
def emulated_two_warps(tmp_path_factory):
    """The same with 64 threads a block and pjoin items of 256 probe rows: block-wide steps (reservations of output
    ranges, scans) across two warps that both hold rows."""
    return build_emulated(tmp_path_factory, threads=64, part_probe=256)


@pytest.fixture(scope="module")
def emulated_lrows3(tmp_path_factory):
    """The same with 3 rows per thread in the linear64 kernels (JOIN_LROWS: loads and CASes of 3 rows in flight)."""
    return build_emulated(tmp_path_factory, "-DJOIN_LROWS=3")


EMULATED_TILE = 32 * 4


def emulate(exe: Path, joins: list[tuple], wide: bool, scheme: int, config: HashConfig, grid: int,
            capacities: list[int]) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Run several joins through the emulated kernels with hash_cuda.py's host decisions (layout, epoch, clear;
    schemes 4-5: the partition bits); returns (total, error, guards intact, rewritten, sorted pairs) per join."""
    text = f"{int(wide)} {scheme} {len(joins)}\n"
    layout, epoch = None, 0
    for (bk, pk, br, pr), cap in zip(joins, capacities):
        if scheme in (4, 5):
            text += f"{len(bk)} {len(pk)} {partition_bits(len(bk), config.part_rows)} 0 0 0 {cap} {grid}\n"
            text += "\n".join(" ".join(map(str, a.tolist())) for a in (bk, br, pk, pr)) + "\n"
            continue
        new = plan_layout(config, len(bk), torch.int64 if wide else torch.int32)
        epoch, clear = next_epoch(layout, new, epoch, config.clear)
        layout = new
        text += f"{len(bk)} {len(pk)} {new.buckets} {new.shift} {epoch} {int(clear)} {cap} {grid}\n"
        text += "\n".join(" ".join(map(str, a.tolist())) for a in (bk, br, pk, pr)) + "\n"
    proc = subprocess.run([str(exe)], input=text, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"emulated join exited {proc.returncode}: {proc.stderr[-2000:]}"
    lines, out, i = proc.stdout.splitlines(), [], 0
    for _ in joins:
        total, err, guards, rewrite = map(int, lines[i].split())
        got = np.array([list(map(int, line.split())) for line in lines[i + 1:i + 1 + total]], np.int64).reshape(-1, 2)
        out.append((total, err, guards, rewrite, sort_pairs(got[:, 0], got[:, 1])))
        i += 1 + total
    return out


@given(tables=st.lists(join_inputs(max_n=400), min_size=1, max_size=3), scheme=st.sampled_from([0, 1, 4]),
       grid=st.integers(1, 4), config=st.builds(HashConfig, load_factor=st.sampled_from([0.25, 0.5, 0.9]),
                                                 clear=st.sampled_from(["epoch", "memset"]),
                                                 epoch_bits=st.sampled_from([None, 1, 2]),
                                                 part_rows=st.sampled_from([16, 64, 2048])),
       wide=st.booleans(), capacity=st.sampled_from(["speculative", "exact", "short"]))
def test_cuda_source_under_cpu_emulation_equals_pandas(emulated_cuda_join, tables, scheme, grid, config, wide,
                                                       capacity):
    """The C++ kernels themselves (not their numba twin), several joins on one reused table (partitioned: reused
    workspaces), split, fused and partitioned schemes (part_rows 2048: one partition, many pjoin rounds)."""
    dtype = np.int64 if wide else np.int32
    joins, refs, caps = [], [], []
    for q, (bk, pk, _, _) in enumerate(tables):
        bk, pk = bk.astype(dtype), pk.astype(dtype)  # an int64 table's keys as int32 wrap: still a valid table
        rng = np.random.default_rng(len(bk) * 7919 + len(pk) + q)
        br, pr = (rng.permutation(n).astype(dtype) * 3 - 7 for n in (len(bk), len(pk)))
        ref = reference_pairs(bk, pk, br, pr)
        joins.append((bk, pk, br, pr))
        refs.append(ref)
        caps.append({"speculative": len(pk), "exact": len(ref), "short": len(ref) // 2}[capacity])
    for ref, (total, err, guards, rewrite, got) in zip(refs, emulate(emulated_cuda_join, joins, wide, scheme,
                                                                    config, grid, caps)):
        assert err == 0 and total == len(ref), f"total {total} (want {len(ref)}), device error {err}"
        assert guards == 1, "a write kernel wrote past its capacity"
        assert_close(got, ref, msg=f"hash_join.cu under CPU emulation, scheme {scheme}, grid {grid}")


LINEAR_CHAINED = {2: 7, 3: 8, 6: 9}  # the emulation's linear64 schemes with chains (int32 keys)


@given(tables=st.lists(join_inputs(max_n=400), min_size=1, max_size=3), grid=st.integers(1, 4),
       scheme=st.sampled_from([2, 3, 6]),
       config=st.builds(HashConfig, scheme=st.just("linear64"), load_factor=st.sampled_from([0.25, 0.5, 0.9]),
                        clear=st.sampled_from(["epoch", "memset"]), epoch_bits=st.sampled_from([None, 1, 2]),
                        chains=st.booleans()),
       capacity=st.sampled_from(["speculative", "exact", "short"]), wide=st.booleans(), lrows=st.sampled_from([1, 3]))
def test_linear64_kernels_under_cpu_emulation_equal_pandas(emulated_cuda_join, emulated_lrows3, tables, grid, scheme,
                                                          config, capacity, wide, lrows):
    """lbuild + lprobe (linear probing, warp-reserved output ranges) on int32 keys (packed 64-bit slots) or int64
    keys (16-byte slots: tag CAS, then the key's store), both in the cooperative lfused kernel (scheme 3), or both
    slice by slice in 4 table slices (scheme 6: only the last slice publishes, each leaves its ticket at zero), one
    or 3 rows per thread and step, several joins on one reused table; grids smaller than the rows exercise the
    grid-stride loops; a short speculative buffer makes the probe run again exact-size, and it must leave its
    counter and ticket at zero. int32 keys with ``chains``: duplicate keys' rows on one slot's list (a chain array
    poisoned before every join, so an entry of an earlier join read by mistake shows)."""
    dtype = np.int64 if wide else np.int32
    if config.chains and not wide:
        scheme = LINEAR_CHAINED[scheme]
    joins, refs, caps = [], [], []
    for q, (bk, pk, _, _) in enumerate(tables):
        bk, pk = bk.astype(dtype), pk.astype(dtype)  # int64 tables as int32 wrap: still valid tables
        rng = np.random.default_rng(len(bk) * 7919 + len(pk) + q)
        br, pr = (rng.permutation(n).astype(dtype) * 3 - 7 for n in (len(bk), len(pk)))
        ref = reference_pairs(bk, pk, br, pr)
        joins.append((bk, pk, br, pr))
        refs.append(ref)
        caps.append({"speculative": len(pk), "exact": len(ref), "short": len(ref) // 2}[capacity])
    exe = emulated_lrows3 if lrows == 3 else emulated_cuda_join
    for ref, (total, err, guards, rewrite, got) in zip(refs, emulate(exe, joins, wide, scheme, config, grid, caps)):
        assert err == 0 and total == len(ref), f"total {total} (want {len(ref)}), device error {err}"
        assert guards == 1, "the linear64 probe wrote past its capacity"
        assert_close(got, ref, msg=f"linear64 kernels under CPU emulation, grid {grid}, scheme {scheme}, wide {wide}, "
                                   f"lrows {lrows}")


@pytest.mark.parametrize("scheme", [2, 3, 6], ids=["lprobe", "lfused", "slices4"])
def test_chained_linear64_kernels_join_heavy_duplicates_under_cpu_emulation(emulated_cuda_join, emulated_lrows3,
                                                                           scheme):
    """Chains where they matter: build sides of a few keys on hundreds of rows each (one list per key, pushes racing
    on one slot), the sentinels -1, 0, INT32_MIN/MAX among them, probe rows that fan out to hundreds of pairs, a
    short speculative buffer (the probe again exact-size, writing from the lists), 1-bit epochs (the table cleared
    every other join: a stale slot or chain entry would show), 1 and 3 rows per thread and step, grids of 1-3
    blocks; every join must equal pandas.merge, write nothing past its capacity, and report no device error."""
    rng = np.random.default_rng(scheme)
    info = np.iinfo(np.int32)
    pool = np.array([-1, 0, info.min, info.max, 7, -7], np.int32)
    config = HashConfig(scheme="linear64", chains=True, load_factor=0.9, epoch_bits=1)
    joins, refs, caps = [], [], []
    for nb, npr, distinct in ((400, 300, 3), (257, 129, 6), (1, 5, 1), (300, 0, 2), (0, 40, 2), (390, 410, 6)):
        bk = rng.choice(pool[:distinct], nb).astype(np.int32)
        pk = rng.choice(np.concatenate([pool, [3, 4]]).astype(np.int32), npr)
        br, pr = (rng.permutation(n).astype(np.int32) * 3 - 7 for n in (nb, npr))
        ref = reference_pairs(bk, pk, br, pr)
        joins.append((bk, pk, br, pr))
        refs.append(ref)
        caps.append(max(1, len(ref) // 3))
    for exe, grid in ((emulated_cuda_join, 1), (emulated_lrows3, 3), (emulated_cuda_join, 2)):
        out = emulate(exe, joins, False, LINEAR_CHAINED[scheme], config, grid, caps)
        for ref, (total, err, guards, rewrite, got) in zip(refs, out):
            assert err == 0 and total == len(ref), f"total {total} (want {len(ref)}), device error {err}"
            assert guards == 1, "the chained probe wrote past its capacity"
            assert_close(got, ref, msg=f"chained linear64 kernels under CPU emulation, scheme {scheme}, grid {grid}")


@pytest.mark.parametrize("chains", [False, True], ids=["plain", "chains"])
def test_chains_take_one_tag_bit_of_int32_tables_and_the_twin_runs_without(chains):
    """``chains`` takes one tag bit below the epoch field for int32 keys (MULTI), none for int64 keys (no chains
    there), is refused outside linear64, and the numba twin, which has no chains, still joins exactly on that
    layout."""
    cfg = HashConfig(scheme="linear64", chains=chains)
    plain = HashConfig(scheme="linear64")
    n = 1000
    assert plan_layout(cfg, n, torch.int32).shift == plan_layout(plain, n, torch.int32).shift + int(chains)
    assert plan_layout(cfg, n, torch.int64).shift == plan_layout(plain, n, torch.int64).shift
    with pytest.raises(ValueError, match="chains"):
        HashConfig(scheme="split", chains=True)
    op = HashJoinNumba(replace(cfg, threads=32))
    assert not op._chains(torch.int32)
    rng = np.random.default_rng(5)
    bk, pk = rng.integers(-4, 4, 200).astype(np.int32), rng.integers(-5, 5, 150).astype(np.int32)
    assert np.array_equal(op(*to_device(bk, pk)).pairs(), reference_pairs(bk, pk, None, None))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_linear64_twin_joins_sentinels_and_reruns_short_outputs(dtype):
    """The numba twin of linear64 through the host protocol (speculative one-sync join, phases by hand): keys equal
    to -1, 0, the dtype's MIN/MAX (int64: also keys equal in their low 32 bits, 16-byte slots), dense duplicates
    whose pairs overflow the speculative buffer (the probe runs again exact-size), full tables (load 0.9: clusters
    span buckets), empty sides; one operator, so tables are reused."""
    op = HashJoinNumba(HashConfig(scheme="linear64", threads=32, load_factor=0.9, epoch_bits=2, linear_wide=True))
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    special = [-1, info.min, info.max, 0, -1] + ([1 << 32, (1 << 32) | 1, 1] if dtype == np.int64 else [])
    for nb, npr, hi in ((300, 517, 400), (1, 1, 3), (130, 95, 20), (0, 10, 3), (50, 0, 3), (200, 300, 5)):
        bk, pk = rng.integers(-hi, hi, nb).astype(dtype), rng.integers(-hi, hi, npr).astype(dtype)
        if nb >= len(special) and npr >= len(special):
            bk[:len(special)] = pk[:len(special)] = special
        ref = reference_pairs(bk, pk, None, None)
        before = (op.launches, op.syncs)
        got = op(*to_device(bk, pk))
        assert np.array_equal(got.pairs(), ref), f"linear64 twin, {nb} x {npr}: {len(got)} pairs, pandas {len(ref)}"
        if npr:
            kernels = (1 if nb else 0) + 1 + (len(ref) > npr)  # build, probe, the exact-size probe
            assert op.syncs - before[1] == 1 and op.launches - before[0] - kernels in (0, 1)  # (+ a table clear)
        check_join(op, bk, pk)


@pytest.mark.parametrize("scheme", [0, 1], ids=["split", "fused"])
def test_reconverging_kernels_under_cpu_emulation_equal_pandas(tmp_path_factory, scheme):
    """JOIN_RECONVERGE=1 (a __syncwarp before each row): every lane must meet there the same number of times, rows
    past n included, or the emulated warp barrier deadlocks; the pairs must not change."""
    exe = build_emulated(tmp_path_factory, "-DJOIN_RECONVERGE=1")
    rng = np.random.default_rng(11)
    joins, refs = [], []
    for nb, npr, hi in ((300, 517, 400), (1, 1, 3), (130, 95, 20)):  # a partial last tile; duplicates and misses
        bk, pk = rng.integers(0, hi, nb).astype(np.int32), rng.integers(0, hi, npr).astype(np.int32)
        br, pr = np.arange(nb, dtype=np.int32), np.arange(npr, dtype=np.int32)
        joins.append((bk, pk, br, pr))
        refs.append(reference_pairs(bk, pk, br, pr))
    out = emulate(exe, joins, False, scheme, HashConfig(), 3, [len(j[1]) for j in joins])
    for ref, (total, err, guards, _, got) in zip(refs, out):
        assert err == 0 and total == len(ref) and guards == 1
        assert_close(got, ref, msg=f"reconverging hash_join.cu under CPU emulation, scheme {scheme}")


def test_emulated_fused_kernel_covers_both_heads_paths(emulated_cuda_join):
    """Tiles > grid keeps heads in memory, tiles <= grid in registers; a short buffer makes the fused kernel hand
    heads to the exact-size write either way."""
    rng = np.random.default_rng(5)
    bk = rng.integers(0, 64, 300).astype(np.int32)
    pk = rng.integers(0, 80, 3 * EMULATED_TILE + 5).astype(np.int32)
    br, pr = np.arange(300, dtype=np.int32), np.arange(len(pk), dtype=np.int32)
    ref = reference_pairs(bk, pk, br, pr)
    for grid in (1, 4, 6):
        (total, err, guards, rewrite, got), = emulate(emulated_cuda_join, [(bk, pk, br, pr)], False, 1, HashConfig(),
                                                     grid, [len(pk)])
        assert (err, guards, rewrite) == (0, 1, int(len(ref) > len(pk))) and total == len(ref)
        assert_close(got, ref, msg=f"fused kernel, grid {grid}")


def partitioned_cases(wide: bool, rng: np.random.Generator) -> list[tuple]:
    """(name, build keys, probe keys) for the partitioned kernels: empty sides, all misses, one row, sentinel keys,
    int64 keys equal in their low 32 bits (and pairs whose folded hashes collide), one key duplicated far beyond a
    pjoin round (build-side skew: many rounds, and more pairs than the speculative buffer), one probe key filling
    its partition with many work items' worth of probe rows (probe-side skew), non-power-of-two sizes, more
    partitions than a block has threads (each thread scans a run of them)."""
    dtype = np.int64 if wide else np.int32
    info = np.iinfo(dtype)
    k = lambda *v: np.array(v, dtype=dtype)  # noqa: E731
    sentinels = k(-1, 0, info.min, info.max, -1, 1, info.min, info.max - 1)
    cases = [("empty build", k(), k(3, 4, 5)), ("empty probe", k(3, 4, 5), k()), ("one row", k(7), k(7)),
             ("all misses", (2 * rng.integers(-1000, 1000, 150)).astype(dtype),
              (2 * rng.integers(-1000, 1000, 97) + 1).astype(dtype)),
             ("sentinels", np.concatenate([sentinels, sentinels[:5]]), k(-1, info.max, 0, 0, 2, info.min, -1)),
             ("build skew", np.concatenate([np.full(150, 5, dtype), rng.integers(-50, 50, 40).astype(dtype)]),
              np.concatenate([np.full(30, 5, dtype), rng.integers(-50, 50, 20).astype(dtype)])),
             ("probe skew", rng.permutation(np.arange(-60, 60)).astype(dtype),
              rng.permutation(np.concatenate([np.full(200, 7, dtype), rng.integers(-90, 90, 60).astype(dtype)]))),
             ("non-pow2", rng.integers(-200, 200, 333).astype(dtype), rng.integers(-200, 200, 517).astype(dtype)),
             ("many partitions", rng.integers(-3000, 3000, 1500).astype(dtype),  # 128: runs of 2-4 per thread
              rng.integers(-3000, 3000, 1100).astype(dtype))]
    if wide:
        a, b = np.int64(0x12345678), np.int64(0x0BADF00D)
        low = np.int64(0x5BD1E995)
        lifted = (np.arange(1, 60, dtype=np.int64) << 32) | low  # one low word, 59 high words
        cases.append(("high bits", np.concatenate([lifted, [(a << 32) | b, (b << 32) | a, b]]),
                      np.concatenate([lifted[::3], (lifted[-1:] + (1 << 32)), [(b << 32) | a, a, low]])))
    return cases


@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("grid", [1, 3])
@pytest.mark.parametrize("build", ["staged", "direct", "two-warps"])
def test_partitioned_kernels_under_cpu_emulation_equal_pandas(request, build, wide, grid):
    """pcount, pscatter, pjoin on the named cases of ``partitioned_cases``, one after another in one process (the
    counts, starts, cursors and partitioned buffers are reused and must come back clean: the driver checks that the
    counts, tickets and pair counter are zero and every cursor reached its partition's end), with 1-128 partitions
    (part_rows 16) and 20-row pjoin rounds; a short speculative buffer is re-written exact-size by pjoin alone.
    pscatter stores each partition's run from a stage in partition order, or (``direct``) each row from its thread;
    ``two-warps``: 64 threads a block, so the block-wide reservations and scans span warps."""
    exe = request.getfixturevalue({"staged": "emulated_cuda_join", "direct": "emulated_direct_scatter",
                                   "two-warps": "emulated_two_warps"}[build])
    rng = np.random.default_rng(21 + grid)
    dtype = np.int64 if wide else np.int32
    joins, refs, names = [], [], []
    for name, bk, pk in partitioned_cases(wide, rng):
        br, pr = (rng.permutation(n).astype(dtype) * 3 - 7 for n in (len(bk), len(pk)))
        joins.append((bk, pk, br, pr))
        refs.append(reference_pairs(bk, pk, br, pr))
        names.append(name)
    config = HashConfig(part_rows=EMULATED_PART_ROWS, part_probe=EMULATED_PART_PROBE)
    out = emulate(exe, joins, wide, 4, config, grid, [len(j[1]) for j in joins])
    for name, (bk, pk, *_), ref, (total, err, guards, rewrite, got) in zip(names, joins, refs, out):
        assert err == 0 and total == len(ref), f"{name}: total {total} (want {len(ref)}), device error {err}"
        assert guards == 1, f"{name}: pjoin wrote past its capacity"
        assert rewrite == int(len(ref) > len(pk)), f"{name}: rewritten {rewrite}"
        assert_close(got, ref, msg=f"partitioned kernels under CPU emulation, {name}, grid {grid}")
    skew = names.index("build skew")
    assert max(np.bincount(hash_keys(joins[skew][0], wide) >> (32 - partition_bits(len(joins[skew][0]), 16)))) \
        > part_capacity(EMULATED_PART_ROWS), "the skew case must overflow one pjoin round"
    assert refs[skew].shape[0] > len(joins[skew][1]), "the skew case must overflow the speculative buffer"
    hot = names.index("probe skew")
    assert max(np.bincount(hash_keys(joins[hot][1], wide) >> (32 - partition_bits(len(joins[hot][0]), 16)))) \
        > 10 * EMULATED_PART_PROBE, "the probe-skew case must spread one partition over many pjoin work items"


def test_partitioned_planted_bug_is_caught(emulated_cuda_join):
    """Scheme 5 hides the last partition's probe rows from pjoin: the comparison with pandas must fail (the tests'
    comparisons see every partition)."""
    rng = np.random.default_rng(4)
    bk = rng.integers(0, 300, 300).astype(np.int32)
    pk = rng.integers(0, 300, 400).astype(np.int32)
    br, pr = np.arange(300, dtype=np.int32), np.arange(400, dtype=np.int32)
    ref = reference_pairs(bk, pk, br, pr)
    config = HashConfig(part_rows=EMULATED_PART_ROWS)
    ((total, err, guards, _, got),) = emulate(emulated_cuda_join, [(bk, pk, br, pr)], False, 4, config, 2, [400])
    assert total == len(ref) and np.array_equal(got, ref)
    ((total, err, guards, _, got),) = emulate(emulated_cuda_join, [(bk, pk, br, pr)], False, 5, config, 2, [400])
    assert total < len(ref)
    with pytest.raises(AssertionError):
        assert_close(got, ref, msg="the planted bug")


class _EmulatedFunction:
    def __init__(self, name: str, cooperative: bool) -> None:
        self.name, self.cooperative = name, cooperative


class _EmulatedModule:
    def __init__(self, cooperative: bool) -> None:
        self.cooperative = cooperative

    def get_function(self, name: str) -> _EmulatedFunction:
        return _EmulatedFunction(name, self.cooperative)


class _HostWords:
    """Stands in for mapped pinned memory: the emulated kernels write ``host[]`` through its address."""

    def __init__(self) -> None:
        self.words = (ctypes.c_longlong * 2)()
        self.host = self.device = ctypes.addressof(self.words)

    def arm(self) -> None:
        self.words[0], self.words[1] = -1, 0


class _Done:
    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


@pytest.fixture(scope="module")
def emulated_launches(tmp_path_factory):
    """``emu_launch`` of the emulation's shared library: one kernel, its arguments as 8-byte words."""
    lib = ctypes.CDLL(str(build_emulated(tmp_path_factory, lib=True)))
    lib.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int,
                               ctypes.POINTER(ctypes.c_longlong)]
    return lib.emu_launch


@pytest.mark.skipif(cuda_reason() is None, reason="cupy and a GPU are here: the real kernels are tested")
@pytest.mark.parametrize("scheme", [*SCHEMES, "linear64/slices4", "linear64/slices4/scatter", "linear64+chains",
                                    "linear64-fused+chains", "linear64/slices4/scatter+chains"])
def test_hash_cuda_launch_code_drives_emulated_kernels(emulated_launches, monkeypatch, scheme):
    """hash_cuda.py itself (its launches' argument order and types, grids, workspaces, the pinned-word readback, the
    one-sync join with its exact-size re-run, the phases, the launch and sync counters) on CPU tensors, its CuPy
    launches routed to the emulated kernels; every result must equal pandas.merge's pairs. ``/slices4``: linear64
    built and probed in 4 table slices (``/scatter``: both sides partitioned by slice first)."""
    from impl.join import hash_cuda

    launched = []  # (kernel kind, slice) of each launch; slice -1: every row

    def launch(fn, grid, block, args, shared_mem=0, pdl=False):
        words = (ctypes.c_longlong * max(1, len(args)))(*[int(a) for a in args])
        assert emulated_launches(fn.name.encode(), grid, block, int(fn.cooperative), words) == 0, fn.name
        kind = fn.name.split("_")[1]
        at = {"lbuild": -3, "lprobe": -4}.get(kind)  # slice_shift, slice (, publish), bounds: the last words
        one = at is not None and (int(args[at]) < 32 or int(args[-1]) != 0)
        launched.append((kind, int(args[at + 1]) if one else -1))

    hash_cuda.kernel.cache_clear()
    from impl.common import timing

    monkeypatch.setattr(timing, "l2_bytes", lambda: 2048)  # tables of a few KiB take slices of at most 1 KiB
    monkeypatch.setattr(hash_cuda, "_module", lambda options, cooperative: _EmulatedModule(cooperative))
    monkeypatch.setattr(hash_cuda, "_launch", launch)
    monkeypatch.setattr(hash_cuda, "unavailable_reason", lambda: None)
    monkeypatch.setattr(hash_cuda, "PinnedWords", _HostWords)
    monkeypatch.setattr(hash_cuda.HashJoinCuda, "_check_device", lambda self, t: None)
    monkeypatch.setattr(hash_cuda.HashJoinCuda, "_mark", lambda self: _Done())
    monkeypatch.setattr(hash_cuda.HashJoinCuda, "resident_blocks", lambda self, *a, **k: 3)
    rng, sliced_joins = np.random.default_rng(8), 0
    try:
        for readback in ("pinned", "item"):
            plan, _, chains = scheme.partition("+")
            name, _, slices = plan.partition("/slices")
            slices, _, scatter = slices.partition("/")
            op = hash_cuda.HashJoinCuda(HashConfig(threads=32, items=4, part_rows=EMULATED_PART_ROWS,
                                                   part_probe=EMULATED_PART_PROBE, scheme=name, readback=readback,
                                                   slices=int(slices or 1), scatter=scatter == "scatter",
                                                   chains=chains == "chains"))
            for dtype in (np.int32, np.int64):
                for nb, npr, hi, rows in ((300, 517, 400, None), (1, 1, 3, np.int32), (130, 95, 5, np.int64),
                                          (0, 10, 3, None), (40, 0, 3, np.int32), (200, 300, 4, None)):
                    bk, pk = rng.integers(-hi, hi, nb).astype(dtype), rng.integers(-hi, hi, npr).astype(dtype)
                    br = pr = None
                    if rows is not None:
                        br, pr = (rng.permutation(nb) * 3 - 7).astype(rows), (rng.permutation(npr) * 5).astype(rows)
                    ref = reference_pairs(bk, pk, br, pr)
                    tensors = [None if a is None else torch.from_numpy(a) for a in (bk, pk, br, pr)]
                    before, launched[:] = (op.launches, op.syncs), []
                    got = op(*tensors)
                    assert np.array_equal(got.pairs(), ref), f"{scheme}, {nb} x {npr}: {len(got)} pairs"
                    if scheme == "partitioned" and npr:
                        assert (op.launches - before[0], op.syncs - before[1]) == (3 + (len(ref) > npr), 1)
                    count = op.slice_count(op.layout, tensors[0].dtype) if slices else 1
                    sliced_joins += count > 1
                    if count > 1 and npr:  # each slice's lbuild (build rows there) and lprobe; the rewrite: whole
                        want = [(k, q) for q in range(count) for k in ("lbuild", "lprobe")[nb == 0 and not scatter:]]
                        want = [("pcount", -1), ("pscatter", -1)] * bool(scatter) + want
                        assert launched == want + [("lprobe", -1)] * (len(ref) > npr), launched
                        assert op.syncs - before[1] == 1
                    assert np.array_equal(op(*tensors, timed=True).pairs(), ref), f"{scheme} by phases"
        assert sliced_joins > 0 if "/slices" in scheme else sliced_joins == 0
    finally:
        hash_cuda.kernel.cache_clear()


def test_sliced_join_takes_slices_of_at_most_half_the_l2(monkeypatch):
    """A sliced linear64 join cuts its table into the fewest power-of-two slices of at most half the L2, at most
    ``slices``; a table within half the L2 runs whole, and so does one whose capped slices would not fit in L2
    unless both sides are scattered by slice; another scheme's keys or a backend without the kernels run whole."""
    from impl.common import timing
    from impl.join.hash_table import HashJoinBase, plan_layout

    class Sliced(HashJoinBase):
        linear_available = sliced_available = True

    monkeypatch.setattr(timing, "l2_bytes", lambda: 60 << 20)  # an H200's L2
    cfg = HashConfig(slices=16)
    tables = {n: plan_layout(cfg, n, torch.int64) for n in (1_000_000, 10_000_000, 100_000_000)}  # 32, 320, 3200 MB
    count = lambda config, n: Sliced(config).slice_count(tables[n], torch.int64)  # noqa: E731
    assert (count(cfg, 1_000_000), count(cfg, 10_000_000), count(cfg, 100_000_000)) == (2, 16, 1)
    scatter = HashConfig(slices=256, scatter=True)
    assert (count(scatter, 1_000_000), count(scatter, 10_000_000), count(scatter, 100_000_000)) == (2, 16, 128)
    assert count(HashConfig(slices=8), 10_000_000) == 8  # 40 MB slices: they fit
    assert count(HashConfig(slices=4), 10_000_000) == 1  # 80 MB slices would not
    monkeypatch.setattr(timing, "l2_bytes", lambda: 0)  # off a GPU: an H100's 50 MiB
    assert count(cfg, 10_000_000) == 16 and count(HashConfig(), 10_000_000) == 1
    assert Sliced(HashConfig(slices=16, linear_wide=False)).slice_count(tables[10_000_000], torch.int64) == 1
    assert HashJoinNumba(cfg).slice_count(tables[10_000_000], torch.int32) == 1


def test_wait_for_total_returns_on_the_published_total_or_the_finished_event():
    """The readback spins on the pinned total; a launch that never publishes ends the wait through its event, which
    is only queried every check_every polls."""
    from impl.join.hash_cuda import wait_for_total

    class Mark:
        def __init__(self, done_after: int) -> None:
            self.queries, self.done_after = 0, done_after

        def query(self) -> bool:
            self.queries += 1
            return self.queries > self.done_after

    words = (ctypes.c_longlong * 2)(7, 0)
    mark = Mark(done_after=0)
    wait_for_total(words, mark)
    assert mark.queries == 0, "a published total needs no event query"
    words[0] = -1
    mark = Mark(done_after=3)
    wait_for_total(words, mark, check_every=5)
    assert mark.queries == 4 and words[0] == -1


def test_partition_plan():
    """Partition bits bring the mean partition to at most part_rows (within PART_BITS_MAX), and pjoin's table fits
    a block's static shared memory for every allowed part_rows."""
    for n in (0, 1, 16, 17, 2048, 2049, 10**6, 10**7):
        p = partition_bits(n, 2048)
        assert n <= 2048 << p or p == 13
        assert p == 0 or n > 2048 << (p - 1)
    assert part_table_bytes(PART_ROWS_MAX, 8) + 64 <= SHARED_BYTES
    assert part_table_bytes(PART_ROWS_MAX + 128, 8) > SHARED_BYTES - 1024

@given(inputs=join_inputs(), config=TC_CONFIGS)
def test_tensor_core_join_equals_pandas(inputs, config):
    op = cached(("tc", config), lambda: TensorCoreJoin(config))
    check_join(op, *inputs)
    got = op(*to_device(*inputs))  # the one-pass call (a short speculative output is re-written exact-size)
    assert np.array_equal(got.pairs(), reference_pairs(*inputs)), "tc-triton one-pass join differs from pandas"
    assert not op.ws.get("counts", 1, torch.int32, DEVICE, zeros=True).any(), "the scatter left the histogram non-zero"


@given(inputs=join_inputs())
def test_sortmerge_join_equals_pandas(inputs):
    check_join(cached(("sortmerge",), lambda: make_operator("sortmerge-torch")), *inputs)


# ---- named cases every implementation must get right ------------------------------------------------------------

def available_impls() -> list:
    return [pytest.param(name, marks=pytest.mark.skip(reason=str(cuda_reason())))
            if name == "hash-cuda" and cuda_reason() else name for name in IMPLS]


def small_op(name: str):
    return make_operator(name, **({"threads": 32, "items": 4} if name.startswith("hash") else {}))


@pytest.mark.parametrize("name", available_impls())
@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_sentinel_valued_keys_join(name, dtype):
    info = np.iinfo(dtype)
    bk = np.array([-1, 5, -1, 7, 0, -1, info.min, info.max, info.max], dtype)
    pk = np.array([-1, 7, 8, -1, 0, 5, 5, info.min, info.max, info.min + 1], dtype)
    check_join(small_op(name), bk, pk)
    res = small_op(name)(*to_device(bk, pk))
    assert len(res) == 3 * 2 + 1 + 1 + 2 + 1 + 2  # -1: 3 build x 2 probe; 7; 0; 5 twice; min; max x 2


def test_int64_keys_differing_only_in_high_bits_do_not_match():
    """Keys whose low words agree, and key pairs (a << 32 | b, b << 32 | a) whose folded hashes are equal."""
    a, b = np.int64(0x12345678), np.int64(0x0BADF00D)
    bk = np.array([(a << 32) | b, (b << 32) | a, (a << 33) | b, b], np.int64)
    pk = np.array([(b << 32) | a, b, (a << 32) | b, (a << 34) | b], np.int64)
    assert len(set(hash_keys(bk[:2], True).tolist())) == 1, "the first two keys must collide in the hash"
    for name in [n for n in IMPLS if not (n == "hash-cuda" and cuda_reason())]:
        check_join(small_op(name), bk, pk)
        assert len(small_op(name)(*to_device(bk, pk))) == 3


@pytest.mark.parametrize("name", available_impls())
@pytest.mark.parametrize("nb,np_", [(0, 0), (0, 5), (5, 0), (1, 1)])
def test_empty_and_single_row_tables(name, nb, np_):
    bk, pk = np.full(nb, 3, np.int32), np.full(np_, 3, np.int32)
    res = small_op(name)(*to_device(bk, pk))
    assert len(res) == nb * np_ and res.build_rows.dtype == torch.int64 and res.probe_rows.dtype == torch.int64
    assert res.build_rows.device.type == torch.device(DEVICE).type


@pytest.mark.parametrize("name", available_impls())
def test_timed_join_reports_each_phase(name):
    bk, pk = to_device(np.arange(50, dtype=np.int64), np.arange(25, 75, dtype=np.int64))
    res = small_op(name)(bk, pk, timed=True)
    assert len(res) == 25 and set(res.timings_ms) == {"build", "probe", "materialize", "total"}
    assert all(v >= 0 for v in res.timings_ms.values())
    assert res.timings_ms["total"] == pytest.approx(sum(v for k, v in res.timings_ms.items() if k != "total"))


@pytest.mark.parametrize("name", available_impls())
def test_bad_input_gives_clear_errors(name):
    op = small_op(name)
    k32, k64 = torch.zeros(4, dtype=torch.int32, device=DEVICE), torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError, match="key dtypes differ"):
        op(k32, k64)
    with pytest.raises(ValueError, match="1-D"):
        op(k32.view(2, 2), k32)
    with pytest.raises(ValueError, match="row ids must match"):
        op(k32, k32, torch.arange(3, device=DEVICE), None)
    with pytest.raises(TypeError, match="int32 or int64"):
        op(k32.float(), k32.float())
    with pytest.raises(TypeError, match="probe_rows must be int32 or int64"):
        op(k32, k32, None, torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        op(torch.zeros(8, dtype=torch.int32, device=DEVICE)[::2], k32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        op(np.zeros(4, np.int32), k32)
    if ON_GPU:
        with pytest.raises(ValueError, match="different devices"):
            op(k32, k32.cpu())


@pytest.mark.parametrize("name", available_impls())
def test_output_that_cannot_fit_is_refused_before_allocation(name, monkeypatch):
    """A skewed join whose exact output exceeds the memory left: MemoryError with the exact pair count and bytes,
    raised before the output is allocated or written."""
    bk, pk = np.full(40, 7, np.int32), np.full(25, 7, np.int32)  # 1000 pairs of int64 row ids = 16,000 bytes
    op = small_op(name)
    tensors = to_device(bk, pk)
    monkeypatch.setattr(common, "free_bytes", lambda device, at_least=None: 12_000)
    sizes, empty = [], torch.empty

    def spy(*size, **kw):
        sizes.append(int(np.prod(size[0] if size and isinstance(size[0], (tuple, list)) else size)))
        return empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", spy)
    with pytest.raises(MemoryError, match=r"16,000 bytes \(1,000 pairs as two torch.int64 columns\)"):
        op(*tensors)
    assert max(sizes, default=0) < 1000, f"{name} allocated {max(sizes)} elements before refusing"


def test_output_check_reads_allocator_statistics_only_when_the_driver_bound_is_short(monkeypatch):
    """On a GPU, check_output_fits reads the allocator's statistics (slow) only when the driver's free memory alone
    cannot hold the request; past it, free memory plus the allocator's unused blocks decides, and what they cannot
    hold is refused. (The CUDA calls are stand-ins: this runs without a GPU.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (16_000, 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: calls.append(device) or 4_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    gpu = torch.device("cuda", 0)
    common.check_output_fits(1000, torch.int64, gpu)  # 16,000 bytes: the driver's bound holds it
    assert calls == []
    common.check_output_fits(1200, torch.int64, gpu)  # 19,200 bytes: asks, fits
    assert len(calls) == 1
    with pytest.raises(MemoryError, match=r"24,000 bytes \(1,500 pairs"):
        common.check_output_fits(1500, torch.int64, gpu)


def test_ten_billion_pair_output_is_refused_on_the_host():
    """1M probe rows all hitting a key that 10^4 build rows share: 10^10 pairs, refused with the exact count."""
    bk = torch.full((10_000,), 3, dtype=torch.int32)
    pk = torch.full((1_000_000,), 3, dtype=torch.int32)
    with pytest.raises(MemoryError, match=r"160,000,000,000 bytes \(10,000,000,000 pairs"):
        make_operator("sortmerge-torch")(bk, pk)


def test_host_joins_take_non_native_byte_order():
    """numpy arrays in big-endian order join like native ones (the host anchors and the oracle); the GPU joins take
    torch tensors only, which are always native."""
    bk = np.array([3, -1, 2, 7, 2], dtype=">i4")
    pk = np.array([2, 7, 5, -1], dtype=">i8").astype(">i4")
    br = np.array([10, 11, 12, 13, 14], dtype=">i8")
    want = sort_pairs(*host.pandas_join(bk.astype("<i4"), pk.astype("<i4"), br.astype("<i8")))
    assert len(want) == 4
    for name in host.HOST_JOINS:
        if host.unavailable_reason(name) is None:
            assert np.array_equal(sort_pairs(*host.JOINS[name](bk, pk, br)), want), name
    assert np.array_equal(reference_pairs(bk, pk, br), want)
    with pytest.raises(TypeError, match="int32 or int64"):
        host.pandas_join(bk.astype(">f4"), pk)
    with pytest.raises(TypeError, match="torch.Tensor"):
        make_operator("sortmerge-torch")(bk, pk)


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="load_factor"):
        HashConfig(load_factor=1.0)
    with pytest.raises(ValueError, match="threads"):
        HashConfig(threads=48)
    with pytest.raises(ValueError, match="bucket_bytes"):
        HashConfig(bucket_bytes=48)
    with pytest.raises(ValueError, match="scheme"):
        HashConfig(scheme="graph")
    for rows in (8, PART_ROWS_MAX + 1):
        with pytest.raises(ValueError, match="part_rows"):
            HashConfig(part_rows=rows)
    for slices in (0, 3, 512):
        with pytest.raises(ValueError, match="slices must be a power of two"):
            HashConfig(slices=slices)
    with pytest.raises(ValueError, match="needs scheme 'linear64'"):
        HashConfig(scheme="partitioned", slices=4)
    with pytest.raises(ValueError, match="enc"):
        TCConfig(enc="bf8")
    with pytest.raises(ValueError, match="block_m"):
        TCConfig(block_m=8)
    with pytest.raises(ValueError, match="unknown join"):
        make_operator("nested-loop")


# ---- white-box: the structures the kernels build ------------------------------------------------------------------

@given(keys=st.lists(st.builds(make_join_tables, st.integers(0, 400), st.just(0), st.sampled_from(["int32", "int64"]),
                                st.sampled_from(MIXES), seeds()).map(lambda t: t[0]), min_size=1, max_size=3),
       config=HASH_CONFIGS)
def test_hash_table_holds_every_build_row_once(keys, config):
    """After each of several builds on one operator: the live slots (tag epoch == the build's) hold exactly the build
    rows, each once, with their keys; slots of a bucket fill in order; every row sits in the first bucket with a free
    slot along its key's bucket sequence (double hashing; linear64 on int32 keys: the next bucket), so the buckets
    before it are full. Stale rows of earlier builds never count."""
    op = HashJoinNumba(config)
    for k in keys:
        k = k.astype(keys[-1].dtype)
        built = op.build(*to_device(k, None))
        lay, wide = built.layout, k.dtype == np.int64
        slot_keys, tags = table_contents(built.table, lay, built.table.dtype)
        live = (tags >> lay.shift) == built.epoch
        pos = tags & ((1 << lay.shift) - 1)
        assert np.array_equal(np.sort(pos[live]), np.arange(len(k))), "every build row owns exactly one live slot"
        assert np.array_equal(slot_keys[live], k[pos[live]].astype(np.int64)), "a slot holds its row's key"
        assert np.all(live[:, :-1] | ~live[:, 1:]), "a live slot follows an empty one in its bucket"
        full = live.all(axis=1)
        h = hash_keys(k, wide)
        bucket = np.empty(len(k), np.int64)
        bucket[pos[live]] = np.nonzero(live)[0]
        linear = op._linear(built.table.dtype)
        b = first_bucket_np(h, lay.buckets).astype(np.int64)
        step = np.ones(len(k), np.int64) if linear else bucket_step_np(h, lay.buckets)
        for i in range(len(k)):
            seen = 0
            while b[i] != bucket[i]:
                assert full[b[i]], f"row {i} skipped a bucket with a free slot"
                b[i] = (b[i] + step[i]) % lay.buckets
                seen += 1
                assert seen <= lay.buckets


def test_stale_build_state_is_refused():
    op = HashJoinNumba(HashConfig(threads=32, items=4))
    first = op.build(*to_device(np.arange(10, dtype=np.int32), None))
    op.build(*to_device(np.arange(5, dtype=np.int32), None))
    with pytest.raises(RuntimeError, match="stale"):
        op.probe(first, *to_device(np.arange(3, dtype=np.int32), None))


@given(inputs=join_inputs(max_n=300), config=TC_CONFIGS)
def test_tensor_core_partitions_runs_and_encodings(inputs, config):
    """Both sides are bucketed permutations carrying their row ids; each sub-tile's run is exactly the scan rows of
    the buckets of its rows; the stored scan-side encodings are 1 - 2·bit of the scan keys."""
    bk, pk, _, _ = inputs
    op = cached(("tc", config), lambda: TensorCoreJoin(config))
    t = check_inputs(*to_device(bk, pk))
    probed = op.partition(t.build_keys, t.probe_keys, t.build_rows, t.probe_rows)
    p, wide = probed.pmask + 1, bk.dtype == np.int64
    bounds, part, rows = (x.cpu().numpy() for x in (probed.bounds, probed.part_keys, probed.part_rows))
    side_of = {"build": (bk, 0), "probe": (pk, p)}
    for side, (keys, off) in side_of.items():
        lo, hi = bounds[off], bounds[off + p]
        assert hi - lo == len(keys)
        assert np.array_equal(keys[rows[lo:hi]], part[lo:hi]), f"{side}: row ids do not map back to the keys"
        assert np.array_equal(np.sort(rows[lo:hi]), np.arange(len(keys))), f"{side}: not a permutation"
        for b in range(p):
            seg = part[bounds[off + b]:bounds[off + b + 1]]
            assert np.all((hash_keys(seg, wide) & probed.pmask) == b), f"{side} bucket {b}"
    tile, scan = ("probe", "build") if probed.tile_probe else ("build", "probe")
    (tk, toff), (sk, soff) = side_of[tile], side_of[scan]
    tile_part = part[bounds[toff]:bounds[toff] + len(tk)]
    runs = probed.runs.cpu().numpy()
    assert len(runs) == -(-len(tk) // config.block_m)
    for i, (start, end) in enumerate(runs):
        b = hash_keys(tile_part[i * config.block_m:(i + 1) * config.block_m], wide) & probed.pmask
        assert (start, end) == (bounds[soff + b.min()], bounds[soff + b.max() + 1]), f"sub-tile {i}'s run"
    if config.pre_encode and len(sk):
        scan_part = part[bounds[soff]:bounds[soff] + len(sk)].astype(np.int64)
        kbits = 64 if wide else 32
        bits = (scan_part[:, None] >> np.arange(kbits)[None, :]) & 1
        assert np.array_equal(probed.enc.float().cpu().numpy(), 1 - 2 * bits), "stored scan-side encodings"


def test_tensor_core_join_clears_an_interrupted_histogram():
    """The scatter consumes the histogram back to zeros; a partition interrupted between its launches leaves it
    dirty, and the next join clears it first (else its bucket bounds would be wrong)."""
    op = TensorCoreJoin(TCConfig(bucket_rows=1))
    bk, pk = np.arange(40, dtype=np.int32), np.arange(20, 60, dtype=np.int32)
    tensors = to_device(bk, pk)
    op.ws.get("counts", 64, torch.int32, DEVICE, zeros=True).fill_(3)  # what an interrupted hist leaves
    op._counts_dirty = True
    assert np.array_equal(op(*tensors).pairs(), reference_pairs(bk, pk))
    assert not op.ws.get("counts", 64, torch.int32, DEVICE, zeros=True).any()


@given(keys=st.builds(make_array, st.integers(0, 300), st.sampled_from(["int32", "int64"]),
                      st.sampled_from(["random", "extremes", "few_distinct"]), seeds()))
def test_hash_is_the_same_in_numpy_and_torch(keys):
    wide = keys.dtype == np.int64
    assert np.array_equal(hash_keys_torch(torch.from_numpy(keys), wide).numpy(), hash_keys(keys, wide))
    assert np.all((hash_keys(keys, wide) >= 0) & (hash_keys(keys, wide) < 2**32))


# ---- GPU scale ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["uniform", "zipf", "m2m"])
@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_gpu_joins_agree_at_1m(kind, dtype):
    from impl.join.data import Case, make_tables

    bk, br, pk, pr = make_tables(Case(kind, 1_000_000, dtype=dtype), seed=1, device=DEVICE)
    want = make_operator("sortmerge-torch")(bk, pk, br, pr)
    packed = lambda r: torch.sort((r.build_rows.to(torch.int64) << 32) | r.probe_rows.to(torch.int64)).values  # noqa: E731
    for name in IMPLS[:3]:
        if name == "hash-cuda" and cuda_reason():
            continue
        got = make_operator(name)(bk, pk, br, pr)
        assert torch.equal(packed(got), packed(want)), f"{name} differs from sort-merge on {kind} {dtype}"
    if cuda_reason():
        return
    from impl.common.timing import l2_bytes
    from impl.join.hash_cuda import HashJoinCuda

    for config in (HashConfig(slices=16), HashConfig(slices=256, scatter=True)):  # the table in slices of <= L2 / 2
        op = HashJoinCuda(config)
        got = op(bk, pk, br, pr)
        assert op.slice_count(op.layout, bk.dtype) > 1 or op.layout.nbytes <= l2_bytes() // 2
        assert torch.equal(packed(got), packed(want)), f"sliced hash join {config} differs on {kind} {dtype}"
        assert torch.equal(packed(op(bk, pk, br, pr, timed=True)), packed(want)), f"{config} by phases"
