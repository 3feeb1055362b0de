"""The tensor-core FP8 GEMV in CUDA C++ (``fp8_mma``) against float64: its CPU twin here, the kernel itself on a GPU
(the same tests), the source compiled for sm_90 by nvcc and NVRTC, and its refusals."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.nvcc import compile_for_sm90
from fixtures.nvrtc import assert_compiles_with_nvrtc
from fixtures.oracle import check_kernel
from impl import backend
from impl.backend import DEVICE
from impl.serve import fp8_mma
from impl.serve.choose import GemmTable
from impl.serve.fp8_gemv import DecodeFp8Linear, GemvConfig, gemv
from impl.serve.fp8_mma import (SOURCE, compile_options, kernel_name, mma_gemv, mma_gemv_twin, mma_row_twin,
                                mma_sweep_twin, token_rows)
from impl.serve.tune import MMA_ROW_A8_SHAPES, MMA_ROW_SHAPES, MMA_SHAPES, MMA_SWEEP_SHAPES, error_bound

CONFIGS = [GemvConfig(mma=True, num_warps=w, unroll=u) for w, u in ((1, 1), (2, 2), (3, 8), (8, 4))] + [
    GemvConfig(mma=True, num_warps=w, unroll=u, row_run=r, pipe=p)
    for w, u, r, p in ((1, 1, 1, False), (2, 2, 2, False), (3, 4, 1, False), (1, 1, 1, True), (2, 2, 2, True))] + [
    GemvConfig(mma=True, num_warps=w, unroll=u, sweep=r, pipe=p) for w, u, r, p in ((2, 2, 3, False), (3, 4, 2, True))]
# (row_run or sweep > 0: the one-token row or sweep kernel at M == 1, the tile kernel for more tokens)
ONE_TOKEN = [c for c in CONFIGS if c.row_run or c.sweep] + [GemvConfig(mma=True, num_warps=4, unroll=1, sweep=1)]


def fp8_weight(n: int, k: int, seed: int, zero_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes over e4m3's whole range (subnormals, +-448, -0.0 included, no NaN) and per-channel scales."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, n)[:, None]  # rows of very different ranges
    if zero_rows and n > 1:
        w[1] = 0
        w[0, : min(k, 3)] = -0.0
    amax = w.abs().amax(1)
    s = torch.where(amax > 0, amax / 448, torch.ones(n))
    q = (w / s[:, None]).to(torch.float8_e4m3fn)
    if k >= 16 and n > 2:
        q[2, :16] = torch.tensor([2.0 ** -9, -(2.0 ** -9), 448, -448, 0, -0.0, 2.0 ** -6, 3 * 2.0 ** -9] * 2,
                                 dtype=torch.float8_e4m3fn)  # subnormals, extremes, zeros of both signs
    return q.to(DEVICE), s.to(DEVICE)


def ref64(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(x · (s ⊙ q)ᵀ, |x| · |s ⊙ q|ᵀ) in float64 on the CPU."""
    w = q.cpu().double() * s.cpu().double().reshape(-1, 1)
    xd = x.cpu().double()
    with np.errstate(invalid="ignore"):
        return (xd @ w.T).numpy(), (xd.abs() @ w.abs().T).numpy()


def check_w8a16(run, m: int, n: int, k: int, ref: np.ndarray, a: np.ndarray) -> None:
    """The W8A16 bound the tune run holds every kernel to: 2^-7 |ref| (bf16 output) + K 2^-22 |x|·|w| (float32
    sums), on a poisoned bf16 output, twice (check_kernel: every element written, same bits each time)."""
    atol = k * 2.0 ** -22 * float(np.nanmax(a, initial=0.0)) + 1e-30
    check_kernel(run, torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16), ref, check_dtype=False,
                 rtol=2.0 ** -7, atol=atol)


@settings(max_examples=min(settings.default.max_examples, 40))
@given(m=st.sampled_from([1, 2, 7, 8, 9, 16, 17, 40]), n=st.sampled_from([1, 7, 8, 9, 24, 40]),
       k=st.sampled_from([16, 48, 64, 80, 208]), cfg=st.sampled_from(CONFIGS), seed=st.integers(0, 2**31 - 1),
       per_tensor=st.booleans(), zero_rows=st.booleans())
def test_mma_gemv_matches_float64_reference(m, n, k, cfg, seed, per_tensor, zero_rows):
    """Ragged M (one or several 16-token tiles, 8 or 16 token rows), N not a multiple of 8, K not a multiple of a
    warp's 64 codes, 1-8 warps and any unroll: every element within the W8A16 bound, inputs untouched."""
    q, s = fp8_weight(n, k, seed, zero_rows)
    if per_tensor:
        s = s.max().reshape(1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, torch.bfloat16)
    x0, q0 = x.clone(), q.clone()
    ref, a = ref64(x, q, s)
    check_w8a16(lambda out: gemv(x, q, s, cfg, out=out), m, n, k, ref, a)
    assert torch.equal(x, x0) and torch.equal(q.view(torch.uint8), q0.view(torch.uint8)), "inputs modified"


@settings(max_examples=min(settings.default.max_examples, 25))
@given(n=st.sampled_from([1, 5, 13, 40]), k=st.sampled_from([512, 1040, 2048, 2576]), cfg=st.sampled_from(ONE_TOKEN),
       seed=st.integers(0, 2**31 - 1), per_tensor=st.booleans())
def test_one_token_kernels_match_float64_across_pieces(n, k, cfg, seed, per_tensor):
    """The row and sweep kernels over rows of several 512-code pieces (the last one partial): a sweep block's warps
    share a row's pieces and their partial sums meet in shared memory; every element within the W8A16 bound."""
    q, s = fp8_weight(n, k, seed, zero_rows=seed % 2 == 0)
    if per_tensor:
        s = s.max().reshape(1)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, torch.bfloat16)
    ref, a = ref64(x, q, s)
    check_w8a16(lambda out: gemv(x, q, s, cfg, out=out), 1, n, k, ref, a)


A8_CONFIGS = [GemvConfig(mma=True, a8=True, num_warps=w, unroll=u, row_run=r, pipe=p)
              for w, u, r, p in ((1, 1, 1, False), (2, 2, 2, False), (3, 4, 1, True))]


@settings(max_examples=min(settings.default.max_examples, 25))
@given(n=st.sampled_from([1, 5, 13, 40]), k=st.sampled_from([16, 208, 512, 1040, 2576]),
       cfg=st.sampled_from(A8_CONFIGS), seed=st.integers(0, 2**31 - 1), per_tensor=st.booleans(), as_rows=st.booleans())
def test_w8a8_row_kernel_matches_float64(n, k, cfg, seed, per_tensor, as_rows):
    """The W8A8 row kernel (e4m3 x codes on the tensor cores): one token, x given as bf16 (gemv quantises it per row;
    on a GPU) or as the FP8 rows a norm would hand over; every element within the tune's W8A8 bound of the float64
    product of the unquantised x and the weight, inputs untouched."""
    from impl.fp8.reference import quantize_reference
    from impl.serve.fused_quant import Fp8Rows, quantize_rows

    q, s = fp8_weight(n, k, seed, zero_rows=seed % 2 == 0)
    if per_tensor:
        s = s.max().reshape(1)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, torch.bfloat16)
    ref, a = ref64(x, q, s)
    bound = error_bound("a8", torch.from_numpy(ref), torch.from_numpy(a), k).numpy()
    if backend.ON_GPU:
        xin = quantize_rows(x) if as_rows else x
    else:  # the interpreter's quantiser takes no bf16: impl.fp8's bit-exact CPU mirror makes the rows
        codes, scales = quantize_reference(x.float(), "channel", "e4m3")
        xin = Fp8Rows(codes.view(torch.float8_e4m3fn), scales.reshape(-1, 1).float(), x.dtype)
    x0 = x.clone()
    y = gemv(xin, q, s, cfg).double().cpu().numpy()
    assert np.all(np.abs(y - ref) <= bound), float(np.max(np.abs(y - ref) / bound))
    assert torch.equal(x, x0)


def test_mma_gemv_specials_follow_ieee():
    """An infinite activation gives +-inf where every other product is finite and NaN where +inf meets -inf (a
    weight row of both signs) or a zero code; an empty batch writes nothing."""
    n, k = 9, 32
    q, s = fp8_weight(n, k, 3, zero_rows=True)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    x[1, 5] = float("inf")
    x[2, 0] = float("-inf")
    x = x.to(DEVICE)
    ref, a = ref64(x, q, s)
    assert np.isnan(ref).any() and np.isinf(ref).any(), "the case must hold both"
    check_w8a16(lambda out: gemv(x, q, s, GemvConfig(mma=True, num_warps=2, unroll=2), out=out), 3, n, k,
                ref, np.where(np.isfinite(a), a, 0.0))
    empty = torch.empty(0, k, device=DEVICE, dtype=torch.bfloat16)
    assert gemv(empty, q, s, GemvConfig(mma=True)).shape == (0, n)


@pytest.mark.parametrize("cfg", CONFIGS[1:3], ids=lambda c: c.name)
def test_mma_gemv_rows_do_not_depend_on_their_batch(cfg):
    """Each token's result depends only on its own row of x: alone, in a tile of 8 token rows or of 16, or in a
    later 16-token tile, its bits are the same (batch-invariant serving)."""
    n, k = 24, 80
    q, s = fp8_weight(n, k, 7, zero_rows=False)
    x = torch.randn(21, k, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.bfloat16)
    whole = gemv(x, q, s, cfg)
    for i in (0, 5, 17, 20):
        for lo, hi in ((i, i + 1), (max(0, i - 3), i + 1), (0, 21)):
            part = gemv(x[lo:hi].contiguous(), q, s, cfg)
            assert torch.equal(part[i - lo].view(torch.int16), whole[i].view(torch.int16)), (i, lo, hi)
    assert token_rows(8) == 8 and token_rows(9) == 16


@pytest.mark.skipif(not backend.ON_GPU, reason=backend.NO_GPU_REASON)
def test_mma_gemv_chains_under_pdl_and_in_a_cuda_graph():
    """Programmatic dependent launch: the second call starts while the first (which writes its input) runs, loads
    its codes, and waits before reading x; the chain's bits equal the plain launches', eager and replayed from a
    CUDA graph."""
    q1, s1 = fp8_weight(4096, 1024, 1, zero_rows=False)
    q2, s2 = fp8_weight(512, 4096, 2, zero_rows=False)
    x = torch.randn(1, 1024, device=DEVICE).to(torch.bfloat16)
    cfg = GemvConfig(mma=True, num_warps=8, unroll=8)

    def chain(pdl: bool) -> torch.Tensor:
        return gemv(gemv(x, q1, s1, cfg, pdl=pdl), q2, s2, cfg, pdl=pdl)

    want = chain(False)
    for _ in range(3):
        assert torch.equal(chain(True).view(torch.int16), want.view(torch.int16))
    chain(True)  # compiled and loaded before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(True)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))


def test_twin_follows_the_fragment_layout():
    """The twin is not a plain matmul: a code placed at k slot j of row r meets exactly the activation at k = j of
    each token (one-hot inputs over every position of a 64-code chunk and every row of a block)."""
    k, n = 64, 8
    for r in range(n):
        for j in range(k):
            q = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
            q[r, j] = 1.0
            x = torch.zeros(2, k, dtype=torch.bfloat16)
            x[0, j] = 2.0
            x[1, (j + 1) % k] = 3.0
            y = mma_gemv_twin(x, q, torch.ones(n), warps=1, unroll=1).float()
            want = torch.zeros(2, n)
            want[0, r] = 2.0
            assert torch.equal(y, want), (r, j, y)


def w8a8_row_twin(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The W8A8 row twin on x's e4m3 codes, a token scale of 0.5 and the weight scales tripled: y = 1.5 x · (s ⊙ q)ᵀ
    when every code is exact."""
    return mma_row_twin(x.to(torch.float8_e4m3fn), q, 3 * s, warps=1, unroll=1, row_run=1, sx=torch.tensor([0.5])) / 1.5


@pytest.mark.parametrize("twin", [lambda x, q, s: mma_row_twin(x, q, s, warps=1, unroll=1, row_run=1),
                                  lambda x, q, s: mma_sweep_twin(x, q, s, warps=3, unroll=1, rows=2),
                                  w8a8_row_twin],
                         ids=["row", "sweep", "w8a8-row"])
def test_row_twin_follows_the_fragment_layout(twin):
    """The one-token twins: a code at k = j of row r meets exactly x[j], for every position of a 512-code chunk and
    past it, whichever lane group, mma step, slot and (sweep) warp it lands in; the W8A8 twin also carries the
    token's scale times the row's."""
    k, n = 1024, 3
    for r in range(n):
        for j in list(range(0, 512, 7)) + [511, 512, 1023]:
            q = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
            q[r, j] = 1.0
            q[(r + 1) % n, (j + 1) % k] = 1.0  # a neighbour that must meet x[j + 1] = 0
            x = torch.zeros(1, k, dtype=torch.bfloat16)
            x[0, j] = 2.0
            y = twin(x, q, torch.ones(n)).float()
            want = torch.zeros(1, n)
            want[0, r] = 2.0
            assert torch.equal(y, want), (r, j, y)


def test_mma_gemv_refuses_what_it_cannot_run():
    q, s = fp8_weight(8, 48, 1, zero_rows=False)
    x = torch.randn(2, 48).to(DEVICE, torch.bfloat16)
    cfg = GemvConfig(mma=True, num_warps=2)
    with pytest.raises(TypeError, match="bf16"):
        gemv(x.float(), q, s, cfg)
    with pytest.raises(TypeError, match="e4m3"):
        mma_gemv(x, q.view(torch.uint8), s, torch.empty(2, 8, device=DEVICE, dtype=torch.bfloat16), 2, 2)
    q40, s40 = fp8_weight(8, 40, 1, zero_rows=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        gemv(torch.randn(2, 40).to(DEVICE, torch.bfloat16), q40, s40, cfg)
    wide = torch.randn(2, 49).to(DEVICE, torch.bfloat16)
    with pytest.raises(ValueError, match="16-byte aligned"):
        gemv(wide[:, 1:], q, s, cfg)  # rows start 2 bytes past an alignment
    for bad in (dict(splits=2), dict(dot=True), dict(unroll=3), dict(prefetch=1), dict(block_m=16)):
        with pytest.raises(ValueError, match="mma config"):
            GemvConfig(mma=True, **bad)
    for bad in (dict(mma=True, sweep=2, row_run=1), dict(sweep=2), dict(mma=True, sweep=65)):
        with pytest.raises(ValueError, match="sweep"):
            GemvConfig(**bad)
    with pytest.raises(ValueError, match="pipe"):
        GemvConfig(mma=True, pipe=True)
    with pytest.raises(ValueError, match="one-token row kernel"):
        GemvConfig(mma=True, a8=True)
    codes = x.to(torch.float8_e4m3fn)
    y2 = torch.empty(2, 8, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one-token row kernel"):
        mma_gemv(codes, q, s, y2, 2, 2, row_run=1, sx=torch.ones(2, device=DEVICE))
    with pytest.raises(TypeError, match="e4m3 x codes"):
        mma_gemv(x[:1], q, s, y2[:1], 2, 2, row_run=1, sx=torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="one a row"):
        mma_gemv(codes[:1], q, s, y2[:1], 2, 2, row_run=1, sx=torch.ones(2, device=DEVICE))


def test_decode_linear_serves_an_mma_table_entry():
    """A table whose entry is an mma config routes DecodeFp8Linear through the kernel (twin on a CPU): the same bits
    as calling it directly, SwiGLU input included (silu_mul's product first)."""
    from impl.serve import fp8_adapter
    from impl.serve.model import DenseLinear

    dense = DenseLinear(64, 40, torch.bfloat16, DEVICE)
    dense.weight.data.normal_(0.0, 0.02, generator=torch.Generator(device=DEVICE).manual_seed(0))
    lin = fp8_adapter.quantize_linear(dense)
    cfg = GemvConfig(mma=True, num_warps=2, unroll=4)
    mod = DecodeFp8Linear(lin.inner, use_kernel=True, table=GemmTable(fixed=cfg))
    x = torch.randn(3, 64).to(DEVICE, torch.bfloat16)
    assert torch.equal(mod(x), gemv(x, lin.inner.weight, lin.inner.weight_scale, cfg))
    gu = torch.randn(3, 128).to(DEVICE, torch.bfloat16)
    mod2 = DecodeFp8Linear(fp8_adapter.quantize_linear(DenseLinear(64, 40, torch.bfloat16, DEVICE)).inner,
                           use_kernel=True, table=GemmTable(fixed=cfg))
    from impl.serve.fused import silu_mul

    assert torch.equal(mod2(gu, swiglu=True), gemv(silu_mul(gu), mod2.inner.weight, mod2.inner.weight_scale, cfg))


# ---- the source compiles for the card -------------------------------------------------------------------------

SHAPES = ([(w, u, tokens, 0, False, 0, False) for w, u in MMA_SHAPES for tokens in (8, 16)]
          + [(w, u, 8, r, p, 0, False) for w, u, r, p in MMA_ROW_SHAPES]
          + [(w, u, 8, 0, p, r, False) for w, u, r, p in MMA_SWEEP_SHAPES]
          + [(w, u, 8, r, p, 0, True) for w, u, r, p in MMA_ROW_A8_SHAPES])


@pytest.mark.parametrize("warps,unroll,tokens,row_run,pipe,sweep,a8", SHAPES)
def test_fp8_mma_cu_compiles_for_sm90_without_spills(tmp_path, warps, unroll, tokens, row_run, pipe, sweep, a8):
    """Every shape the tune run times compiles with nvcc for sm_90 inside its register budget (no spills, no stack)
    and holds the kernel the launcher asks for."""
    defines = [o for o in compile_options(warps, unroll, tokens, row_run, pipe, sweep) if o.startswith("-D")]
    stderr, cubin = compile_for_sm90(SOURCE, defines, tmp_path)
    name = kernel_name(row_run, sweep, a8)
    report = stderr[stderr.find(f"Compiling entry function '{name}'"):]
    if "Compiling entry function" in report[10:]:
        report = report[:report.find("Compiling entry function", 10)]
    spills = [int(v) for v in re.findall(r"(\d+) bytes (?:spill stores|spill loads|stack frame)", report)]
    assert spills and not any(spills), f"ptxas spills registers: {report[-2000:]}"
    assert name.encode() in cubin
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    assert regs * 32 * warps * fp8_mma.min_blocks(warps, unroll, tokens, 1 if sweep else row_run, pipe) <= 65536


@pytest.mark.parametrize("row_run,pipe,sweep", [(0, False, 0), (2, False, 0), (2, True, 0), (0, True, 8)])
def test_fp8_mma_cu_compiles_with_nvrtc_like_cupy(row_run, pipe, sweep):
    """As CuPy compiles it on the GPU: NVRTC, no headers."""
    opts = [o.encode() for o in compile_options(8, 8, 8, row_run, pipe, sweep)] + [b"--gpu-architecture=sm_90"]
    assert_compiles_with_nvrtc(SOURCE.read_bytes(), "fp8_mma.cu", opts)
