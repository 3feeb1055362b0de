"""Property tests of the bitonic sort (impl.sort) against numpy.sort / numpy.argsort(kind="stable").

Kernels run under the numba simulator here (small tiles, sizes to ~1500) and natively on a GPU (the ``gpu`` profile
draws up to 2^20 keys; ``@pytest.mark.gpu`` tests go to 10M+). The numpy twin runs the GPU configuration's own pass
programs at sizes the simulator cannot reach.
"""
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from fixtures.oracle import assert_close, check_kernel
from fixtures.sort import host_bits
from fixtures.strategies import arrays, make_array, max_size, seeds, sizes
from impl.sort import bitonic
from impl.sort.bitonic import MAX_N, BitonicSorter, argsort, check_fits, sort
from impl.sort.keys import FLOAT, FORMATS, SUPPORTED_DTYPES, KeyFormat, decode_np, encode_np
from impl.sort.network import (CPU_CONFIG, GPU_CONFIG, TINY_CONFIG, SortConfig, build_plan, default_config, log2,
                               network_steps, sort_keys_np)
from impl.sort.reference import argsort_reference, is_permutation, sort_reference

DTYPES = st.sampled_from(SUPPORTED_DTYPES)
GLOBAL_ONLY = default_config("global")
PLAN_CONFIGS = [GPU_CONFIG, CPU_CONFIG, TINY_CONFIG, replace(GPU_CONFIG, wide="shared"),
                replace(GPU_CONFIG, items_per_thread=8, min_run=16), GLOBAL_ONLY,
                replace(GLOBAL_ONLY, fused_strides=3)]


def run_sort(x: np.ndarray, *, argsort_: bool = False, descending: bool = False, config: SortConfig | None = None):
    """Sort ``x`` on the device through ``check_kernel`` (poisoned output, two runs) and return the host result."""
    sorter = BitonicSorter(x.size, x.dtype, argsort=argsort_, config=config)
    d_x = cuda.to_device(x)
    expected = (argsort_reference if argsort_ else sort_reference)(x, descending=descending)
    out = cuda.device_array(x.size, dtype=sorter.out_dtype)
    check_kernel(lambda o: sorter(d_x, o, descending=descending), out, expected, rtol=0, atol=0)
    assert np.array_equal(host_bits(d_x.copy_to_host()), host_bits(x)), "the input was modified"
    return out.copy_to_host()


# ---- the network and its programs (pure Python / numpy: fast, any size) ---------------------------------------

@given(n=sizes(max_n=1 << 22), config=st.sampled_from(PLAN_CONFIGS), elem_bytes=st.sampled_from([4, 8, 12]))
def test_plan_runs_every_network_step_once_in_order(n, config, elem_bytes):
    plan = build_plan(n, elem_bytes, config)
    assert plan.steps == network_steps(plan.n_slots)
    assert plan.passes[0].encode and plan.passes[-1].decode
    assert sum(p.encode for p in plan.passes) == 1 and sum(p.decode for p in plan.passes) == 1
    for p in plan.passes:
        if p.kind == "wide":
            assert len(p.steps) <= log2(plan.tile // config.min_run) and min(p.steps) >= plan.tile
        if p.kind == "register":
            assert len(p.steps) <= config.fused_strides
        if p.kind == "tile":
            assert all(m < plan.tile for m in p.steps)


def test_pass_counts_of_the_gpu_configuration():
    """10M float32 keys: one block sort, 11 merge tiles, 21 register passes of <= 4 strides (66 wide steps); with
    coset tiles in shared memory instead, 14 wide passes (the ablation of the tune experiment)."""
    plan = build_plan(10_000_000, 4, GPU_CONFIG)
    kinds = [p.kind for p in plan.passes]
    assert (plan.tile, kinds.count("tile"), kinds.count("register"), kinds.count("wide")) == (8192, 12, 21, 0)
    assert sum(len(p.steps) for p in plan.passes if p.kind == "register") == sum(range(1, 12))
    shared_wide = [p.kind for p in build_plan(10_000_000, 4, replace(GPU_CONFIG, wide="shared")).passes]
    assert (shared_wide.count("tile"), shared_wide.count("wide")) == (12, 14)
    assert len(build_plan(10_000_000, 4, GLOBAL_ONLY).passes) == 24 * 25 // 2


@given(n=sizes(max_n=1 << 17), seed=seeds(), config=st.sampled_from(PLAN_CONFIGS),
       elem_bytes=st.sampled_from([4, 8, 12]))
@settings(max_examples=25)
def test_numpy_twin_of_the_kernels_sorts(n, seed, config, elem_bytes):
    """The GPU configuration's programs (rounds, cosets, pivots) executed in numpy sort, and never touch a pad slot."""
    keys = np.random.default_rng(seed).integers(0, max(n // 3, 1), n).astype(np.uint64)
    assert np.array_equal(sort_keys_np(keys, build_plan(n, elem_bytes, config)), np.sort(keys))


@given(x=arrays(DTYPES, max_n=3000), descending=st.booleans())
@settings(max_examples=60)
def test_order_keys_give_numpys_order(x, descending):
    keys = encode_np(x, descending=descending)
    assert_close(decode_np(np.sort(keys), x.dtype, descending=descending), sort_reference(x, descending=descending),
                 rtol=0, atol=0)
    stable = np.argsort(encode_np(x, descending=descending, canon_zero=True), kind="stable")
    assert np.array_equal(stable, argsort_reference(x, descending=descending))


# ---- the kernels: keys-only, argsort, descending, both variants ------------------------------------------------

@given(x=arrays(DTYPES, max_n=max_size(cpu=3000, gpu=1 << 20)))
def test_sort_matches_numpy(x):
    run_sort(x)


@given(x=arrays(DTYPES, max_n=max_size(cpu=2000, gpu=1 << 20)))
def test_argsort_matches_numpy_stable(x):
    p = run_sort(x, argsort_=True)
    assert is_permutation(p, x.size)


@given(x=arrays(DTYPES, max_n=max_size(cpu=600, gpu=1 << 20)), argsort_=st.booleans())
@settings(max_examples=10)
def test_descending_puts_nans_first(x, argsort_):
    run_sort(x, argsort_=argsort_, descending=True)


@given(x=arrays(st.sampled_from(["float32", "int32", "int64"]), max_n=max_size(cpu=200, gpu=1 << 18)),
       argsort_=st.booleans(), fused=st.sampled_from([1, 3]))
@settings(max_examples=6)
def test_global_only_variant_matches_numpy(x, argsort_, fused):
    run_sort(x, argsort_=argsort_, config=replace(GLOBAL_ONLY, fused_strides=fused))


@pytest.mark.parametrize("dtype,pattern,argsort_", [("float32", "nasty", False), ("float16", "nasty", False),
                                                     ("int32", "zipf", False), ("uint32", "few_distinct", True),
                                                     ("int64", "extremes", True), ("float32", "reverse", True)])
def test_a_few_thousand_keys(dtype, pattern, argsort_):
    """Explicit sizes of a few thousand (the CI profile's 15 draws stay smaller): every mode over several passes."""
    x = make_array(2500 + len(pattern), dtype, pattern, seed=len(dtype))
    run_sort(x, argsort_=argsort_)


@pytest.mark.parametrize("dtype,argsort_,n,wide", [("float32", False, 600, "shared"), ("float16", True, 300, "shared"),
                                                    ("int64", True, 150, "shared"), ("int32", False, 400, "registers")],
                         ids=["keys-f32", "composite-f16", "pairs-i64", "keys-i32-registers"])
def test_several_wide_passes_per_stage(dtype, argsort_, n, wide):
    """Tiles of 32 (keys), 16 (composite) and 8 (pairs) slots: each stage needs several wide passes at these n."""
    config = replace(TINY_CONFIG, wide=wide)
    sorter = BitonicSorter(n, dtype, argsort=argsort_, config=config)
    assert max(sum(p.kind != "tile" for p in sorter.plan.passes[i:i + 8]) for i in range(len(sorter.plan.passes))) > 2
    run_sort(make_array(n, dtype, "few_distinct", seed=7), argsort_=argsort_, config=config)


def test_signed_zeros_and_nans_follow_the_documented_policy():
    x = np.array([0.0, np.nan, -0.0, 1.0, -np.nan, -0.0, 0.0, -np.inf, np.inf, -0.0], dtype=np.float32)
    x[1] = np.frombuffer(np.uint32(0x7FC00123).tobytes(), np.float32)[0]  # a NaN with a payload
    got = sort(x)
    assert np.array_equal(np.signbit(got[1:6]), [True, True, True, False, False]), "keys-only: −0.0 before +0.0"
    assert np.all(host_bits(got[-2:]) == 0x7FFFFFFF), "keys-only: every NaN becomes the canonical NaN"
    assert np.array_equal(argsort(x), np.argsort(x, kind="stable")), "argsort: ±0.0 equal, index order"
    desc = sort(x, descending=True)
    assert np.isnan(desc[:2]).all() and desc[2] == np.inf and not np.signbit(desc[3])


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_dtype_extremes_and_duplicates(dtype):
    dt = np.dtype(dtype)
    info = np.finfo(dt) if dt.kind == "f" else np.iinfo(dt)
    edge = [info.min, info.max, 0, 1, info.max, info.min] + ([np.inf, -np.inf, np.nan, -0.0, info.tiny]
                                                              if dt.kind == "f" else [info.min + 1, info.max - 1])
    x = np.array(edge * 23, dtype=dt)  # non-power-of-two length with heavy duplication
    run_sort(x)
    run_sort(x, argsort_=True)


def test_inplace_sorts_the_input_and_default_does_not():
    x = make_array(300, "int32", "random", seed=1)
    keep = x.copy()
    y = sort(x)
    assert np.array_equal(x, keep) and np.array_equal(y, np.sort(keep))
    assert sort(x, inplace=True) is x and np.array_equal(x, np.sort(keep))
    d = cuda.to_device(keep)
    assert sort(d, inplace=True) is d and np.array_equal(d.copy_to_host(), np.sort(keep))


def test_device_arrays_in_give_device_arrays_out():
    x = make_array(257, "float32", "nasty", seed=3)
    got = argsort(cuda.to_device(x))
    assert hasattr(got, "copy_to_host") and np.array_equal(got.copy_to_host(), np.argsort(x, kind="stable"))


def test_bad_input_gets_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="1-D"):
        sort(np.zeros((4, 4), np.float32))
    for dt in ("float64", "int8", "bool", "uint64"):
        with pytest.raises(TypeError, match="unsupported dtype"):
            sort(np.zeros(8, dt))
    with pytest.raises(ValueError, match="contiguous"):
        sort(np.zeros(16, np.float32)[::2])
    with pytest.raises(ValueError, match="writeable"):
        ro = np.zeros(8, np.float32)
        ro.flags.writeable = False
        sort(ro, inplace=True)
    with pytest.raises(ValueError, match="exceeds the supported maximum"):
        check_fits(MAX_N + 1, 0)
    monkeypatch.setattr(bitonic, "device_free_bytes", lambda: 1000.0)
    with pytest.raises(MemoryError, match="larger than device memory"):
        sort(np.zeros(1000, np.float32))
    with pytest.raises(TypeError, match="numpy array or a CUDA device array"):
        sort([3, 1, 2])


def test_config_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="power of two"):
        SortConfig(items_per_thread=6)
    with pytest.raises(ValueError, match="1024"):
        SortConfig(shared_bytes=65536, items_per_thread=2).tile(4)
    with pytest.raises(ValueError, match="too small"):
        SortConfig(shared_bytes=64).tile(12)
    with pytest.raises(ValueError, match="variant"):
        SortConfig(variant="texture")


# ---- the real compiler (no GPU needed) and the GPU at full size ------------------------------------------------

def test_kernels_compile_for_sm90_without_spilling_much():
    """numba's real CUDA compiler + ptxas for sm_90: every kernel variant types, fits its block, stays in registers."""
    import shutil

    from impl.sort.ptxcheck import run_in_subprocess

    if shutil.which("ptxas") is None:
        pytest.skip("ptxas (CUDA toolkit) is not installed: cannot check sm_90 resource use")
    rows = run_in_subprocess()
    assert {(r["kind"], r["mode"], r["key"]) for r in rows} >= {("block", m, k) for m, k in
                                                                 [("keys", "uint32"), ("keys", "uint64"),
                                                                  ("composite", "uint64"), ("pairs", "uint64")]}
    assert {(r["kind"], r["key"]) for r in rows} >= {(k, w) for k in ("merge", "partition")
                                                      for w in ("uint32", "uint64")}  # the pipeline's merge finish
    assert sum(1 for r in rows if r["kind"] == "merge" and not r.get("decode", True)) == 2  # its tree levels
    for r in rows:
        assert r["local_ops"] == 0, f"{r}: register arrays fell back to local memory"
        assert r["registers"] * r["threads"] <= 65536, f"{r}: block does not fit the register file"
        assert r["spill_stores"] <= 64, f"{r}: ptxas spills"


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1 << 20, 10_000_001])
@pytest.mark.parametrize("dtype", ["float32", "int64", "float16"])
def test_large_sorts_on_gpu(n, dtype):
    x = make_array(n, dtype, "nasty" if dtype != "int64" else "extremes", seed=n)
    got = sort(x)
    assert_close(got, np.sort(x), rtol=0, atol=0)
    assert np.array_equal(argsort(x), np.argsort(x, kind="stable"))
    g = sort(x[: 1 << 18], config=GLOBAL_ONLY)
    assert_close(g, np.sort(x[: 1 << 18]), rtol=0, atol=0)


def check_nan_and_pad(fmt: KeyFormat) -> None:
    """Every NaN bit pattern (both signs, quiet, signalling, largest payload) gets the one key ``fmt.full``, which
    decodes to a NaN and sorts after +inf (first when descending); for integers ``full`` is the dtype's largest
    value. The kernels' virtual pad slot (``kernels._make_memory_ops``: the key container's maximum, index
    0xFFFFFFFF) never sorts before that key: keys-only allows a tie (equal keys are interchangeable), the argsort
    slots (key << 32 | index, or key with a separate index) are strictly above it for every real index."""
    key_max = int(np.iinfo(fmt.key_dtype).max)
    assert 0 < fmt.full <= key_max, f"{fmt.dtype}: the NaN/top key {fmt.full:#x} does not fit {fmt.key_dtype}"
    top = decode_np(np.array([fmt.full], dtype=np.uint64), fmt.dtype)[0]
    if fmt.kind == FLOAT:
        inf_bits = int(np.array([np.inf], dtype=fmt.dtype).view(fmt.bits_dtype)[0])  # numpy's, not the format's
        mags = [inf_bits + 1, inf_bits | 1 << (np.finfo(fmt.dtype).nmant - 1), inf_bits | (inf_bits - 1) >> 1,
                (1 << (8 * fmt.dtype.itemsize - 1)) - 1]
        bits = np.array(mags + [m | fmt.sign for m in mags], dtype=np.uint64).astype(fmt.bits_dtype)
        nans = bits.view(fmt.dtype)
        assert np.isnan(nans).all(), f"{fmt.dtype}: test patterns {bits} are not all NaN"
        keys = encode_np(nans)
        assert (keys == fmt.full).all(), f"{fmt.dtype}: NaN keys {keys} are not the one key {fmt.full:#x}"
        assert np.isnan(top), f"{fmt.dtype}: key {fmt.full:#x} decodes to {top}, not NaN"
        inf = np.array([np.inf], dtype=fmt.dtype)
        assert int(encode_np(inf)[0]) < fmt.full, f"{fmt.dtype}: NaN does not sort after +inf"
        assert int(encode_np(nans, descending=True).max()) == 0 < int(encode_np(inf, descending=True)[0])
    else:
        assert top == np.iinfo(fmt.dtype).max, f"{fmt.dtype}: the top key decodes to {top}, not the largest value"
    if fmt.nbits < 32:
        assert fmt.full < key_max, f"{fmt.dtype}: the NaN key ties the keys-only pad"
    last_real = min(MAX_N, 1 << 32) - 1
    if fmt.pairs:  # (key, index) pairs: the pad is (key_max, 0xFFFFFFFF)
        assert (fmt.full, last_real) < (key_max, 0xFFFFFFFF)
    else:  # composite key << 32 | index in a uint64
        assert fmt.full << 32 | last_real < (1 << 64) - 1


def test_every_format_has_a_distinct_nan_and_pad():
    for fmt in FORMATS.values():
        check_nan_and_pad(fmt)


@pytest.mark.parametrize("name,broken", [
    ("float32", dict(inf_bits=0x7F800001)),                 # the smallest-payload NaN is taken for a number
    ("float16", dict(key_dtype=np.dtype("uint16"))),       # 16-bit keys in a 16-bit container: NaN ties the pad
    ("int32", dict(nbits=31)),                             # the top key is not the largest int32
    ("float32", dict(inf_bits=0x7FC00000)),                 # signalling NaNs are taken for numbers
], ids=["nan-payload", "pad-tie", "int-top", "snan"])
def test_nan_and_pad_check_catches_a_broken_format(monkeypatch, name, broken):
    """Each broken format, put where the encoder and decoder look it up, fails the check."""
    from impl.sort import keys

    monkeypatch.setitem(keys.FORMATS, name, replace(keys.FORMATS[name], **broken))
    with pytest.raises(AssertionError):
        check_nan_and_pad(keys.FORMATS[name])


