"""Property tests of the two example kernels: the proof that Triton and numba-cuda kernels execute in CI."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.oracle import assert_close, check_kernel
from fixtures.strategies import arrays, seeds, sizes
from impl.backend import DEVICE
from impl.examples.axpy_triton import axpy, axpy_reference
from impl.examples.blocksum_numba import blocksum, blocksum_reference


@given(n=sizes(max_n=5000), seed=seeds(), a=st.floats(-4, 4, allow_nan=False), dtype=st.sampled_from(["float32", "float16"]))
def test_axpy_matches_float64_reference(n, seed, a, dtype):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(n).astype(dtype)).to(DEVICE)
    y = torch.from_numpy(rng.standard_normal(n).astype(dtype)).to(DEVICE)
    x0, y0 = x.clone(), y.clone()
    ref = axpy_reference(a, x.cpu().numpy(), y.cpu().numpy()).astype(dtype)
    check_kernel(lambda out: axpy(a, x, y, out=out), torch.empty_like(x), ref, dtype=dtype)
    assert torch.equal(x, x0) and torch.equal(y, y0), "inputs were modified"


def test_axpy_rejects_bad_input():
    x = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="1-D"):
        axpy(1.0, x.view(2, 2), x.view(2, 2))
    with pytest.raises(TypeError, match="dtype"):
        axpy(1.0, x, x.double())
    with pytest.raises(ValueError, match="contiguous"):
        axpy(1.0, torch.zeros(8, device=DEVICE)[::2], x)


@given(x=arrays(st.sampled_from(["float32", "float64", "int32", "int64"]), max_n=1500,
                patterns=("random", "all_equal", "few_distinct", "sorted")),
       threads=st.sampled_from([32, 64, 128]))
def test_blocksum_matches_reference(x, threads):
    if x.dtype.kind in "iu":
        x = x // 4096  # keep int sums inside the dtype: overflow is not what this kernel tests
    got = blocksum(x, threads)
    ref = blocksum_reference(x, threads)
    assert_close(got, ref, rtol=1e-6 if x.dtype.kind == "f" else 0, atol=1e-3 if x.dtype.kind == "f" else 0)


def test_blocksum_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        blocksum(np.zeros((2, 2), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        blocksum(np.zeros(4, np.float16))


def test_oracle_catches_unwritten_output():
    x = torch.arange(8, dtype=torch.float32, device=DEVICE)

    def lazy(out):  # writes only half the output
        out[:4] = x[:4] * 2

    with pytest.raises(AssertionError):
        check_kernel(lazy, torch.empty_like(x), (x * 2).cpu().numpy())
