"""The in-kernel L2 prefetch: how a grid splits a byte range (the CPU twin against the kernels' LOG mode), that it
changes no value a layer computes, that bad ranges are refused, and that the BULK variants compile for sm_90 to the
Hopper instruction."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.strategies import seeds
from impl.backend import DEVICE
from impl.l2cache.linear import gemv_programs, linear
from impl.l2cache.prefetch import (ALIGN, MAX_PIECE, L2Prefetch, aligned_range, check_pieces, plan_ranges,
                                   prefetch_l2)

pytestmark = pytest.mark.l2_state  # every test: the L2 state is checked (and put back) afterwards

ROOT = Path(__file__).resolve().parents[1]


@given(units=st.integers(0, 1 << 18), programs=st.integers(1, 600), lanes=st.sampled_from([32, 128, 256]))
def test_plan_tiles_the_range_exactly(units, programs, lanes):
    nbytes = units * ALIGN
    pieces = plan_ranges(nbytes, programs, lanes)
    assert pieces.shape == (programs * lanes, 2)
    check_pieces(pieces, 0, nbytes)


@pytest.mark.parametrize("pieces,why", [
    ([[0, 16], [32, 16]], "gap"), ([[0, 32], [16, 32]], "overlap"), ([[0, 24], [24, 24]], "aligned"),
    ([[16, 32]], "span"), ([[0, 16]], "span")], ids=["gap", "overlap", "unaligned", "late-start", "short"])
def test_check_pieces_finds_every_kind_of_bad_split(pieces, why):
    with pytest.raises(AssertionError, match=why):
        check_pieces(np.array(pieces, dtype=np.int64), 0, 48)


def test_check_pieces_refuses_a_piece_the_instruction_cannot_encode():
    with pytest.raises(AssertionError, match="exceeds"):
        check_pieces(np.array([[0, MAX_PIECE + 16]], dtype=np.int64), 0, MAX_PIECE + 16)


@given(n=st.integers(1, 40), k=st.integers(1, 70), units=st.integers(0, 400), start=st.integers(0, 64),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=seeds())
def test_gemv_prefetch_logs_the_twins_split_and_changes_no_value(n, k, units, start, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(s, generator=gen).to(DEVICE, dtype) for s in ((1, k), (n, k), (n,)))
    buf = torch.zeros(1 << 14, dtype=torch.uint8, device=DEVICE)
    pf = L2Prefetch(buf, start * ALIGN, units * ALIGN, force_log=True)
    plain = linear(x, w, b, relu=True)
    got = linear(x, w, b, relu=True, prefetch=pf)
    assert torch.equal(got, plain), "a prefetch must not change the layer's output"
    if units == 0:
        assert pf.log == [], "an empty range launches no prefetch"
        return
    (log,) = pf.log
    want = plan_ranges(units * ALIGN, gemv_programs(n, dtype), 128)
    want[:, 0] += start * ALIGN
    assert np.array_equal(log, want)
    check_pieces(log, start * ALIGN, units * ALIGN)


@pytest.mark.parametrize("programs", [1, 3, 8])
def test_prefetch_kernel_alone_covers_its_range(programs):
    buf = torch.zeros(1 << 16, dtype=torch.uint8, device=DEVICE)
    pf = L2Prefetch(buf, 4096, 40000, force_log=True)
    prefetch_l2(pf, programs=programs)
    check_pieces(pf.log[0], 4096, 40000)
    with pytest.raises(ValueError, match="programs"):
        prefetch_l2(pf, programs=0)


def test_a_prefetch_too_large_for_the_grid_is_refused():
    """One GEMV program (N <= 8) has 128 lanes of at most MAX_PIECE bytes each: a larger range would wrap the
    instruction's 16-bit size field, so it is refused rather than silently cut."""
    big = torch.empty(128 * MAX_PIECE + 4096, dtype=torch.uint8, device=DEVICE)
    x, w = torch.ones((1, 16), device=DEVICE), torch.ones((8, 16), device=DEVICE)
    with pytest.raises(ValueError, match="largest piece"):
        linear(x, w, prefetch=L2Prefetch(big, 0, 128 * MAX_PIECE + 16))
    linear(x, w, prefetch=L2Prefetch(big, 0, 128 * MAX_PIECE, force_log=True))  # exactly the most: accepted


def test_bad_ranges_are_refused_with_the_reason():
    buf = torch.zeros(4096, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(TypeError, match="uint8"):
        L2Prefetch(buf.view(torch.int32), 0, 16)
    with pytest.raises(ValueError, match="outside"):
        L2Prefetch(buf, 4000, 112)
    with pytest.raises(ValueError, match="16-byte"):
        L2Prefetch(buf, 8, 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        L2Prefetch(buf, 0, 24)
    assert aligned_range(buf, 8, 20) == (0, 32)
    assert aligned_range(buf, 4090, 6) == (4080, 16)


def test_prefetch_kernels_compile_for_sm90_to_the_bulk_prefetch_instruction():
    """BULK variants hold cp.async.bulk.prefetch.L2.global in PTX and UBLKPF in SASS; the others hold neither; the
    GEMV's weight loads are 16-byte vectors; registers allow four 4-warp programs per SM (<= 128)."""
    proc = subprocess.run([sys.executable, "-m", "impl.l2cache.compile_check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    assert proc.returncode == 0, json.dumps(report, indent=1)[-4000:] + proc.stderr[-2000:]
    assert len(report) == 8
    for name, facts in report.items():
        bulk = "bulk" in name
        assert facts["cubin_bytes"] > 1000
        assert (facts["ptx_bulk_prefetch"] > 0) == bulk, name
        if "sass_bulk_prefetch" in facts:  # cuobjdump ships with triton; absent, only the PTX is checked
            assert (facts["sass_bulk_prefetch"] > 0) == bulk, name
            if name.startswith("gemv"):
                assert facts["ldg128"] >= 8 and facts["registers"] <= 128, facts


# ---- the real instruction -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(777, 1024), (4224, 4224), (64, 1000)])
def test_gpu_bulk_prefetch_changes_no_value_and_logs_the_twins_split(n, k):
    gen = torch.Generator().manual_seed(n + k)
    x, w, b = (torch.randn(s, generator=gen).to(DEVICE, torch.float16) for s in ((1, k), (n, k), (n,)))
    buf = torch.zeros(1 << 24, dtype=torch.uint8, device=DEVICE)
    plain = linear(x, w, b, relu=True)
    bulk = L2Prefetch(buf, 4096, buf.numel() - 8192)
    assert bulk.mode == 1
    assert torch.equal(linear(x, w, b, relu=True, prefetch=bulk), plain) and bulk.log == []
    logged = L2Prefetch(buf, 4096, buf.numel() - 8192, force_log=True)
    linear(x, w, b, relu=True, prefetch=logged)
    want = plan_ranges(logged.nbytes, gemv_programs(n, torch.float16), 128)
    want[:, 0] += 4096
    assert np.array_equal(logged.log[0], want)


@pytest.mark.gpu
def test_gpu_prefetch_policies_in_graphs_keep_outputs_bit_identical(l2_controller):
    from impl.l2cache.nets import ChainConfig, ChainMLP
    from impl.l2cache.policies import POLICIES
    from impl.l2cache.serving import PolicyRunner, output_digest, outputs_by_kind
    wl = ChainMLP(ChainConfig("gpu_chain", 1024, 3, own=1, noise_bytes=1 << 22))
    digests = {}
    for name, policy in POLICIES.items():
        with PolicyRunner(wl, policy, l2_controller) as runner:
            assert runner.info["graphs"]
            digests[name] = [output_digest(o) for o in outputs_by_kind(runner)]
    assert all(d == digests["default"] for d in digests.values()), digests
