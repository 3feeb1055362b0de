"""The streaming-read anchor (``impl.common.stream_read``): its loops' twin against an independent XOR of the words,
the kernel against the twin on a GPU, the source compiled for sm_90 by nvcc and NVRTC, and its refusals."""
from __future__ import annotations

import functools
import operator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.nvcc import compile_for_sm90
from fixtures.nvrtc import assert_compiles_with_nvrtc
from impl import backend
from impl.backend import DEVICE
from impl.common.stream_read import KERNEL, SOURCE, compile_options, fold, grid_blocks, stream_read, stream_read_twin


def xor_words(buf: torch.Tensor) -> int:
    """XOR of the buffer's little-endian 32-bit words, by Python ints (signed int32 value)."""
    raw = bytes(buf.cpu().reshape(-1).view(torch.uint8).numpy())
    x = functools.reduce(operator.xor, (int.from_bytes(raw[j:j + 4], "little") for j in range(0, len(raw), 4)), 0)
    return x - (1 << 32) if x >= 1 << 31 else x


def random_bytes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=40, deadline=None)
@given(pieces=st.integers(0, 700), blocks=st.integers(1, 9), threads=st.sampled_from([1, 3, 32, 64]),
       unroll=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**31 - 1))
def test_twin_loops_read_every_piece_once(pieces, blocks, threads, unroll, seed):
    """For grids smaller and larger than the buffer and every unroll: the kernel's loops read each 16-byte piece
    exactly once (a miss or a repeat changes the XOR of random bytes)."""
    buf = random_bytes(16 * pieces, seed)
    slots = stream_read_twin(buf, blocks, threads, unroll)
    assert slots.shape == (blocks,) and fold(torch.from_numpy(slots.view(np.int32))) == xor_words(buf)


def test_twin_slots_follow_the_blocks():
    """The check can fail and places pieces: with one nonzero piece the slot of the block whose thread reads it holds
    its XOR and every other slot 0; dropping that piece changes the fold."""
    buf = torch.zeros(16 * 40, dtype=torch.uint8)
    buf[16 * 13:16 * 13 + 4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)  # piece 13: thread 13 % 8 = 5, block 1
    slots = stream_read_twin(buf, 2, 4, 2)
    assert slots.tolist() == [0, 0x04030201] and xor_words(buf) == 0x04030201
    assert fold(torch.from_numpy(stream_read_twin(buf[16 * 14:], 2, 4, 2).view(np.int32))) != xor_words(buf)


@pytest.mark.parametrize("nbytes", [0, 16, 16 * 1000 + 16 * 7, 1 << 20])
def test_stream_read_gives_the_xor_of_the_words(nbytes):
    """On a GPU the kernel (its slots poisoned first: every block writes its own), on a CPU the twin at the card's
    grid; both against the independent XOR. Every dtype reads the same bytes."""
    buf = random_bytes(nbytes, nbytes).to(DEVICE)
    out = torch.full((grid_blocks(),), -123456789, dtype=torch.int32, device=DEVICE)
    got = stream_read(buf, out if backend.ON_GPU else None)
    assert got.shape == (grid_blocks(),) and fold(got) == xor_words(buf)
    if nbytes:
        assert fold(stream_read(buf.view(torch.float32))) == xor_words(buf)


@pytest.mark.skipif(not backend.ON_GPU, reason="needs a CUDA GPU: on a CPU stream_read is the twin itself")
def test_kernel_matches_twin_at_the_cards_grid():
    buf = random_bytes(16 * 3_000_017, 5).to(DEVICE)
    got = stream_read(buf).cpu().numpy().view(np.uint32)
    assert np.array_equal(got, stream_read_twin(buf, grid_blocks()))


def test_refusals():
    with pytest.raises(ValueError, match="multiple of 16"):
        stream_read(torch.zeros(20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        stream_read(torch.zeros(64, 64, dtype=torch.uint8)[:, :32])
    with pytest.raises(ValueError, match=">= 1"):
        stream_read_twin(torch.zeros(16, dtype=torch.uint8), 0)
    if backend.ON_GPU:
        with pytest.raises(ValueError, match="one int32 a block"):
            stream_read(torch.zeros(64, dtype=torch.uint8, device=DEVICE), torch.zeros(1, dtype=torch.int32,
                                                                                        device=DEVICE))


def test_source_compiles_for_sm90_without_spills(tmp_path):
    report, cubin = compile_for_sm90(SOURCE, [o for o in compile_options() if o.startswith("-D")], tmp_path)
    assert "0 bytes spill stores" in report and KERNEL.encode() in cubin


def test_source_compiles_with_nvrtc_like_cupy():
    opts = [o.encode() for o in compile_options()] + [b"--gpu-architecture=sm_90"]
    assert_compiles_with_nvrtc(SOURCE.read_bytes(), "stream_read.cu", opts)
