"""The device merge of two sorted runs (``impl.sort.merge``) against numpy: values, bits, ranges, bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from fixtures.sort import host_bits
from fixtures.strategies import arrays, make_array, max_size
from impl.sort.keys import SUPPORTED_DTYPES, decode_np, encode_np, key_format
from impl.sort.merge import (MergeConfig, launch_merge, launch_partition, merge_blocks, merge_reference,
                             merge_sorted, partition_slots)

CONFIGS = [MergeConfig(threads=8, items=4), MergeConfig(threads=4, items=1), MergeConfig(threads=2, items=7)]


def sorted_run(x: np.ndarray, descending: bool = False) -> np.ndarray:
    """``x`` in the sort's keys-only order (NaNs canonical and last, −0.0 before +0.0; reversed when descending)."""
    return decode_np(np.sort(encode_np(x, descending=descending)), x.dtype, descending=descending)


def check(got: np.ndarray, a: np.ndarray, b: np.ndarray, descending: bool) -> None:
    ref = merge_reference(a, b, descending=descending)
    same = (got == ref) | (np.isnan(got) & np.isnan(ref)) if got.dtype.kind == "f" else got == ref
    assert same.all(), f"{int((~same).sum())} of {got.size} differ from numpy"
    both = np.concatenate([a, b])
    assert np.array_equal(host_bits(got), host_bits(sorted_run(both, descending))), "bits differ from the key order"


@given(dtype=st.sampled_from(SUPPORTED_DTYPES), data=st.data(), descending=st.booleans(),
       config=st.sampled_from(CONFIGS))
@settings(max_examples=40, deadline=None)
def test_merge_matches_numpy(dtype, data, descending, config):
    a = data.draw(arrays(dtype, max_n=max_size(cpu=90, gpu=1 << 20)), label="a")
    b = data.draw(arrays(dtype, max_n=max_size(cpu=90, gpu=1 << 20)), label="b")
    a, b = sorted_run(a, descending), sorted_run(b, descending)
    check(merge_sorted(a, b, descending=descending, config=config), a, b, descending)


@pytest.mark.parametrize("case", ["empty_a", "empty_b", "both_empty", "one_each", "a_above_b", "b_above_a", "equal",
                                  "interleaved", "nasty"])
@pytest.mark.parametrize("dtype", ["float32", "int64", "float16"])
def test_merge_edge_cases(case, dtype):
    rng = np.random.default_rng(7)
    base = make_array(57, dtype, "random", seed=1)
    x, y = {
        "empty_a": (base[:0], base), "empty_b": (base, base[:0]), "both_empty": (base[:0], base[:0]),
        "one_each": (base[:1], base[1:2]), "a_above_b": (np.sort(base)[30:], np.sort(base)[:30]),
        "b_above_a": (np.sort(base)[:30], np.sort(base)[30:]), "equal": (np.full(33, base[0]), np.full(41, base[0])),
        "interleaved": (np.sort(base)[::2], np.sort(base)[1::2]),
        "nasty": (make_array(70, dtype, "nasty", seed=3), make_array(45, dtype, "nasty", seed=4)),
    }[case]
    x, y = x.astype(dtype), y.astype(dtype)
    for descending in (False, True):
        a, b = sorted_run(x, descending), sorted_run(y, descending)
        check(merge_sorted(a, b, descending=descending, config=CONFIGS[int(rng.integers(3))]), a, b, descending)


def test_merge_writes_only_its_range():
    """A launch over [lo, hi) writes exactly the blocks that start there (the rest stays poisoned), and writes them
    right; ranges that together cover [0, n) give the whole merge."""
    config = MergeConfig(threads=4, items=2)
    fmt = key_format(np.float32)
    a = sorted_run(make_array(50, "float32", "nasty", seed=5))
    b = sorted_run(make_array(37, "float32", "random", seed=6))
    n = a.size + b.size
    d_a, d_b = cuda.to_device(encode_np(a).astype(np.uint32)), cuda.to_device(encode_np(b).astype(np.uint32))
    full = merge_sorted(a, b, config=config)
    poison = np.uint32(0x7FC0DEAD)
    d_out = cuda.to_device(np.full(n, poison, dtype=np.uint32))
    enc = fmt.params(descending=False, canon_zero=False)
    diags = cuda.to_device(np.full(partition_slots(n, config), -5, dtype=np.int64))
    launch_partition(d_a, a.size, d_b, b.size, diags, config=config)
    both = np.concatenate([encode_np(a), encode_np(b)])  # diag(k): A's keys among the first k of the merged order
    merged_from_a = np.argsort(both, kind="stable") < a.size
    want = [int(merged_from_a[:min(j * config.tile, n)].sum()) for j in range(partition_slots(n, config))]
    assert diags.copy_to_host().tolist() == want
    launch_merge(d_a, a.size, d_b, b.size, diags, d_out, enc, lo=13, hi=35, config=config)  # blocks 2..4: 16..39
    got = d_out.copy_to_host()
    assert (got[:16] == poison).all() and (got[40:] == poison).all()
    assert np.array_equal(got[16:40], host_bits(full)[16:40])
    for lo, hi in [(0, 13), (35, 61), (61, n)]:
        launch_merge(d_a, a.size, d_b, b.size, diags, d_out, enc, lo=lo, hi=hi, config=config)
    assert np.array_equal(d_out.copy_to_host(), host_bits(full))


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64"])
def test_encoded_merge_of_runs_inside_buffers(dtype):
    """A tree level's merge: runs that are views into one buffer (A and B side by side) merged into a view of another
    buffer at the same offset, keys left encoded (``enc`` None); the rest of the output buffer stays poisoned, and
    decoding the written keys gives numpy's order."""
    config = MergeConfig(threads=4, items=2)
    fmt = key_format(np.dtype(dtype))
    a = sorted_run(make_array(29, dtype, "nasty", seed=8))
    b = sorted_run(make_array(44, dtype, "random", seed=9))
    lo, na, nb = 5, a.size, b.size
    buf = np.zeros(lo + na + nb + 3, dtype=fmt.key_dtype)
    buf[lo:lo + na], buf[lo + na:lo + na + nb] = encode_np(a), encode_np(b)
    src = cuda.to_device(buf)
    poison = np.iinfo(fmt.key_dtype).max - 1
    dst = cuda.to_device(np.full(buf.size, poison, dtype=fmt.key_dtype))
    diags = cuda.device_array(partition_slots(na + nb, config), dtype=np.int64)
    launch_partition(src[lo:lo + na], na, src[lo + na:], nb, diags, config=config)
    launch_merge(src[lo:lo + na], na, src[lo + na:], nb, diags, dst[lo:], None, config=config)
    got = dst.copy_to_host()
    assert (got[:lo] == poison).all() and (got[lo + na + nb:] == poison).all()
    merged = decode_np(got[lo:lo + na + nb].astype(fmt.key_dtype), fmt.dtype, descending=False)
    check(merged, a, b, False)
    with pytest.raises(TypeError, match="encoded merge writes keys"):
        launch_merge(src[lo:lo + na], na, src[lo + na:], nb, diags, cuda.device_array(buf.size, np.int8), None,
                     config=config)


def test_merge_rejects_bad_input():
    config = MergeConfig(threads=4, items=2)
    assert merge_blocks(16, 33, config) == (2, 3) and merge_blocks(3, 10, config) == (1, 1)
    assert merge_blocks(9, 9, config) == (2, 0)
    a, b = cuda.to_device(np.arange(5, dtype=np.uint32)), cuda.to_device(np.arange(5, 10, dtype=np.uint32))
    out = cuda.device_array(10, dtype=np.uint32)
    diags = cuda.device_array(partition_slots(10, config), dtype=np.int64)
    enc = key_format(np.uint32).params(descending=False, canon_zero=False)
    with pytest.raises(ValueError, match="na <= len"):
        launch_merge(a, 6, b, 5, diags, out, enc, config=config)
    with pytest.raises(ValueError, match="hi <= na"):
        launch_merge(a, 5, b, 5, diags, out, enc, hi=12, config=config)
    with pytest.raises(ValueError, match="out holds 9"):
        launch_merge(a, 5, b, 5, diags, cuda.device_array(9, dtype=np.uint32), enc, config=config)
    with pytest.raises(ValueError, match="nb <= len"):
        launch_partition(a, 5, b, 6, diags, config=config)
    with pytest.raises(TypeError, match="one dtype"):
        launch_partition(a, 5, cuda.to_device(np.arange(5, dtype=np.uint64)), 5, diags, config=config)
    with pytest.raises(ValueError, match="needs 3"):
        launch_partition(a, 5, b, 5, cuda.device_array(2, dtype=np.int64), config=config)
    with pytest.raises(TypeError, match="share a dtype"):
        merge_sorted(np.zeros(3, np.float32), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="power of two"):
        MergeConfig(threads=6)
