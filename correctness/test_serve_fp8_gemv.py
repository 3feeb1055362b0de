"""The W8A16 decode GEMV (``fp8_gemv``) against float64, its module, and the GEMM choice table (``choose``)."""
import json
import os
from dataclasses import replace
import subprocess
import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle import assert_close, check_kernel
from impl import backend
from impl.backend import DEVICE
from impl.serve import choose, fp8_adapter, fp8_gemv
from impl.serve.choose import GemmChoice, GemmTable
from impl.serve.fp8_gemv import (DecodeFp8Linear, GemvConfig, decode_bits_reference, default_config, gemv,
                                 new_counters, prefetch_chunks, prefetch_ranges, prefetch_row_bytes, split_plan,
                                 swiglu_torch)
from impl.serve.model import DenseLinear
from impl.serve.tune import error_bound, reference

X_DTYPES = ["float32"] + (["bfloat16"] if backend.ON_GPU else [])
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}
CONFIGS = [GemvConfig(), GemvConfig(splits=3), GemvConfig(block_m=2, block_n=8, block_k=16, splits=2),
           GemvConfig(dot=True, block_n=16, splits=2), GemvConfig(dot=True, block_m=16, block_n=32, num_stages=2),
           GemvConfig(dot=True, bits=True, block_n=16, splits=2), GemvConfig(dot=True, block_n=16, prefetch=1),
           GemvConfig(dot=True, block_n=16, persistent=1), GemvConfig(dot=True, bits=True, block_n=16, persistent=2)]


def fp8_weight(n: int, k: int, seed: int, zero_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, n)[:, None]  # rows of very different ranges
    if zero_rows and n > 1:
        w[1] = 0
    amax = w.abs().amax(1) if k else torch.zeros(n)
    s = torch.where(amax > 0, amax / 448, torch.ones(n))
    return (w / s[:, None]).to(torch.float8_e4m3fn).to(DEVICE), s.to(DEVICE)


def swiglu64(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.double().chunk(2, dim=-1)
    return g * torch.sigmoid(g) * u


def ref64(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
    xd = swiglu64(x.cpu()) if swiglu else x.double().cpu()
    return xd @ (q.double().cpu() * s.double().cpu().reshape(-1, 1)).T


@settings(max_examples=min(settings.default.max_examples, 30))  # each tile shape is a compile on a GPU
@given(m=st.sampled_from([0, 1, 2, 5, 17]), n=st.sampled_from([1, 16, 33]), k=st.sampled_from([1, 16, 48, 100]),
       cfg=st.sampled_from(CONFIGS), seed=st.integers(0, 2**31 - 1), per_tensor=st.booleans(),
       zero_rows=st.booleans(), swiglu=st.booleans(), dtype=st.sampled_from(X_DTYPES))
def test_gemv_matches_float64_reference(m, n, k, cfg, seed, per_tensor, zero_rows, swiglu, dtype):
    """Every kind of tile (CUDA-core, tensor-core, fixed rows), split or not, ragged sizes, SwiGLU input or not:
    y = x · (s ⊙ q)ᵀ in every element of a poisoned output, inputs untouched."""
    q, s = fp8_weight(n, k, seed, zero_rows)
    if per_tensor:
        s = s.max().reshape(1)
    x = torch.randn(m, 2 * k if swiglu else k, generator=torch.Generator().manual_seed(seed + 1))
    x = x.to(DEVICE, getattr(torch, dtype))
    x0, q0 = x.clone(), q.clone()
    ref = ref64(x, q, s, swiglu)
    scale = max(float(ref.abs().max()), 1e-30) if ref.numel() else 1.0
    check_kernel(lambda out: gemv(x, q, s, cfg, out=out, swiglu=swiglu), torch.empty(m, n, device=DEVICE,
                 dtype=x.dtype), ref.numpy(), check_dtype=False, rtol=TOL[dtype]["rtol"],
                 atol=TOL[dtype]["atol"] * scale)
    assert torch.equal(x, x0) and torch.equal(q.view(torch.uint8), q0.view(torch.uint8)), "inputs modified"


@pytest.mark.parametrize("m", [1, 20])
def test_fp8_activations_stay_within_the_w8a8_bound(m):
    """a8 tiles: x quantised per row to e4m3 by impl.fp8, an FP8 x FP8 product, scaled by s_x ⊙ s: within the
    bound the tune run checks (activations rounded to 2^-4), and exact where the activations are exact in e4m3."""
    q, s = fp8_weight(40, 100, m, True)
    x = torch.randn(m, 100, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    cfg = GemvConfig(dot=True, a8=True, block_n=16, splits=2)
    y = gemv(x, q, s, cfg).double().cpu()
    ref, a = reference(x.cpu(), q.cpu(), s.cpu())
    assert bool(((y - ref).abs() <= error_bound("a8", ref, a, 100)).all())
    assert float((y - ref).abs().max()) > 0  # the activations really were rounded (not the W8A16 path)
    pick = torch.randint(0, 9, (m, 100), generator=torch.Generator().manual_seed(1))
    exact = torch.tensor([0.0, 1, 2, 4, 8, -1, -2, -4, -8])[pick]
    exact[:, 0] = 8.0  # amax 8 -> s_x = 8/448: +-1, 2, 4, 8 are the e4m3 codes 56, 112, 224, 448 times s_x
    assert_close(gemv(exact.to(DEVICE), q, s, cfg).double().cpu(), ref64(exact, q, s), rtol=1e-5, atol=1e-4)


def test_split_k_is_deterministic_and_leaves_its_counters_zero():
    """The last program of each tile sums the partials in split order: the same bits every call; counters are reset,
    so a second call through the same counters is right too (a stuck counter would leave the poisoned output)."""
    q, s = fp8_weight(33, 300, 0, False)
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cnt = new_counters(DEVICE)
    cfg = GemvConfig(block_n=16, block_k=32, splits=5)
    a = gemv(x, q, s, cfg, counters=cnt)
    assert int(cnt.abs().sum()) == 0
    b = torch.full_like(a, float("nan"))
    gemv(x, q, s, cfg, counters=cnt, out=b)
    assert torch.equal(a, b)
    assert split_plan(300, 5, 32) == (64, 5) and split_plan(100, 50, 32) == (32, 4)  # trailing empty splits dropped


@pytest.mark.parametrize("cfg", [GemvConfig(block_m=2, block_n=8, block_k=16, splits=3),
                                 GemvConfig(dot=True, block_m=16, block_n=16, block_k=16, splits=2)], ids=str)
def test_fixed_rows_per_tile_make_each_row_independent_of_the_batch(cfg):
    """With a fixed block_m the kernel is batch-invariant: row i of a batch equals row i computed alone, bit for bit
    (what batch-invariant serving relies on for greedy outputs equal to running each prompt alone)."""
    q, s = fp8_weight(24, 80, 2, False)
    x = torch.randn(5, 80, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    batch = gemv(x, q, s, cfg)
    for i in range(5):
        assert torch.equal(gemv(x[i:i + 1], q, s, cfg)[0], batch[i]), f"row {i}"


def test_persistent_programs_take_several_tiles_each():
    """The persistent kernel's programs stride over the tiles (fewer programs than tiles here), every tile written
    once: the result equals the one-program-per-tile kernel's, and both the float64 reference."""
    cfg = GemvConfig(dot=True, block_n=16, persistent=1)
    tiles = fp8_gemv.persistent_programs(cfg, 1 << 20, torch.device(DEVICE)) + 3  # the programs of one per SM, + 3
    n = 16 * tiles
    q, s = fp8_weight(n, 48, 3, False)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    assert fp8_gemv.persistent_programs(cfg, tiles, x.device) < tiles
    out = torch.full((3, n), float("nan"), device=DEVICE)
    got = gemv(x, q, s, cfg, out=out)
    assert_close(got, gemv(x, q, s, GemvConfig(dot=True, block_n=16)), rtol=0, atol=0)
    assert_close(got.double().cpu(), ref64(x, q, s), rtol=1e-5, atol=1e-5)
    assert cfg.name.endswith("-P1") and GemvConfig.from_dict(cfg.to_dict()) == cfg


def test_gemv_rejects_bad_input():
    q, s = fp8_weight(33, 48, 0, False)
    x = torch.randn(3, 48).to(DEVICE)
    cfg = GemvConfig()
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        gemv(x[:, :40], q, s, cfg)
    with pytest.raises(ValueError, match="gate | up"):
        gemv(x, q, s, cfg, swiglu=True)
    with pytest.raises(ValueError, match="must be"):
        gemv(x[0], q, s, cfg)
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        gemv(x.to(torch.int32), q, s, cfg)
    with pytest.raises(TypeError, match="e4m3 or x's dtype"):
        gemv(x, q.to(torch.float16), s, cfg)
    with pytest.raises(ValueError, match="1 or 33"):
        gemv(x, q, s[:5], cfg)
    with pytest.raises(ValueError, match="row-major"):
        gemv(x, q, s, cfg, out=torch.empty(33, 3, device=DEVICE).T)
    with pytest.raises(ValueError, match="counters"):
        gemv(x, q, s, GemvConfig(block_k=16, splits=2), counters=torch.zeros(4, dtype=torch.int32, device=DEVICE))
    for bad in (dict(block_n=24), dict(block_k=8), dict(splits=0), dict(dot=True, block_n=8), dict(a8=True),
                dict(persistent=1), dict(dot=True, persistent=1, splits=2), dict(dot=True, a8=True, persistent=1),
                dict(dot=True, persistent=-1)):
        with pytest.raises(ValueError):
            GemvConfig(**bad)
    with pytest.raises(ValueError, match="unknown GemvConfig fields"):
        GemvConfig.from_dict({"block_n": 16, "tile": 3})


def test_default_config_splits_for_about_four_programs_per_sm():
    wo = default_config(1, 4096, 4096)  # 256 tiles of 16 rows: 3 splits for ~4 programs per SM on 132 SMs
    assert (wo.dot, wo.block_n, wo.block_k, wo.splits) == (False, 16, 512, 3)
    assert default_config(1, 28672, 4096).splits == 1  # 1792 tiles already
    assert default_config(64, 4096, 14336).dot
    assert all(default_config(m, 4096, 4096).shared_bytes(m) < 200 << 10 for m in (1, 8, 16, 64, 128))


# ---- the choice table ----------------------------------------------------------------------------------------

FMA = GemvConfig(block_n=16, block_k=32, splits=2)
DOT = GemvConfig(dot=True, block_n=16, block_k=32)


def assert_matches(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, w8a8: bool) -> None:
    """y = x · wᵀ (float64 x and dequantised w): to float32 accuracy, or for W8A8 within the tune run's bound for it
    (activations rounded to e4m3)."""
    ref = x @ w.t()
    if not w8a8:
        assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
        return
    err = (y.double() - ref).abs()
    bound = error_bound("inner", ref, x.abs() @ w.abs().t(), w.shape[1])
    assert bool((err <= bound).all()), f"W8A8: worst {float((err / bound).max()):.3g} of the bound"


def synthetic_table() -> GemmTable:
    """Projection [48, 64]: M <= 1 the CUDA-core kernel, M 2..4 impl.fp8's path, M 5..8 the tensor-core kernel."""
    return GemmTable({(48, 64): [(1, GemmChoice("w8a16", FMA, "measured")), (4, GemmChoice("inner", None, "measured")),
                                 (8, GemmChoice("w8a16", DOT, "measured"))]}, origin="synthetic")


def test_table_lookup_takes_the_smallest_measured_m_at_least_m_and_the_rule_beyond():
    t = synthetic_table()
    assert [t.lookup(48, 64, m).name for m in (1, 2, 4, 5, 8)] == [FMA.name, "inner", "inner", DOT.name, DOT.name]
    assert t.lookup(48, 64, 9) == choose.rule_choice(48, 64, 9)  # beyond the measured sizes: prefill's rule
    assert t.lookup(48, 64, 500).path == "inner"
    assert t.lookup(64, 48, 1) == choose.rule_choice(64, 48, 1)  # a projection the table does not hold
    fixed = GemmTable(t.entries, fixed=DOT)
    assert {fixed.lookup(48, 64, m).config for m in (1, 4, 300)} == {DOT} and "batch-invariant" in fixed.describe()


def test_table_round_trips_through_json_and_refuses_malformed_files(tmp_path, monkeypatch):
    t = synthetic_table()
    t.pdl, t.selected_in_run = True, "abc123"
    record = {"system": "serve", "name": "gemm_table", "commit": "0123abcd", "data": t.to_data()}
    path = tmp_path / "gemm_table.json"
    path.write_text(json.dumps(record))
    back = GemmTable.load(path)
    assert back.entries == t.entries and back.pdl and back.selected_in_run == "abc123"
    assert "0123abcd" in back.origin
    bad = [{"format": "other"}, {**t.to_data(), "entries": [{"n": 48, "k": 64, "m": 1, "path": "w8a16"}]},
           {**t.to_data(), "entries": [{"n": 48, "k": 64, "m": 1, "path": "cublas", "config": None}]},
           {**t.to_data(), "entries": [{"n": 48, "k": 64, "m": 0, "path": "inner", "config": None}]},
           {**t.to_data(), "entries": t.to_data()["entries"][:1] * 2}, []]
    for b in bad:
        path.write_text(json.dumps(b))
        with pytest.raises(ValueError):
            GemmTable.load(path)
    path.write_text("{ not json")
    with pytest.raises(ValueError, match="cannot read"):
        GemmTable.load(path)
    path.write_text(json.dumps(record))
    monkeypatch.setenv("LAB_SERVE_GEMM_TABLE", str(path))
    choose.use_table(None)
    try:
        assert choose.active_table().entries == t.entries
    finally:
        choose.use_table(None)
        monkeypatch.delenv("LAB_SERVE_GEMM_TABLE")
        choose.active_table()


def test_decode_linear_serves_each_m_by_the_table(monkeypatch):
    """The module takes the table's path for each number of rows: the W8A16 kernel (spied) or impl.fp8's linear, and
    either gives x · Wᵀ of the dequantised weight; SwiGLU input equals silu(g) · u first."""
    import impl.serve.fp8_gemv as fg

    dense = DenseLinear(64, 48, torch.float32, DEVICE)
    dense.weight.data.normal_(0, 0.05, generator=torch.Generator(device=DEVICE).manual_seed(0))
    layer = DecodeFp8Linear(fp8_adapter.quantize_linear(dense).inner, use_kernel=True, table=synthetic_table())
    calls = []
    real = fg.gemv
    monkeypatch.setattr(fg, "gemv", lambda *a, **kw: calls.append(kw.get("pdl")) or real(*a, **kw))
    w = layer.inner.dequantized_weight().double()
    for rows, kernel in ((1, True), (3, False), (6, True), (20, True)):
        calls.clear()
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
        w8a8 = not kernel and backend.ON_GPU  # impl.fp8's path rounds activations to e4m3 on a GPU
        assert_matches(layer(x), x.double(), w, w8a8)
        assert bool(calls) == kernel, rows
        gu = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
        assert_matches(layer(gu, swiglu=True), swiglu64(gu.cpu()).to(DEVICE), w, w8a8)
    plain = fp8_adapter.quantize_linear(dense)  # on a CPU the default (use_kernel None) is impl.fp8's path
    gu = torch.randn(2, 96, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    small = DenseLinear(48, 48, torch.float32, DEVICE)
    small.weight.data.normal_(0, 0.05, generator=torch.Generator(device=DEVICE).manual_seed(1))
    small8 = fp8_adapter.quantize_linear(small)
    if backend.ON_GPU:  # the card's stored table picks the path for these rows: within that path's bound
        w_small = small8.inner.dequantized_weight().double()
        assert_matches(small8(gu, swiglu=True), swiglu64(gu.cpu()).to(DEVICE), w_small,
                       small8.takes_fp8_rows(gu.shape[0], gu.device))
    else:  # impl.fp8's path on silu(g) · u, bit for bit
        assert_close(small8(gu, swiglu=True), small8.inner(swiglu_torch(gu)), rtol=0, atol=0)
    assert "per GEMM table" in plain.path


@pytest.mark.slow  # ~10 s: two Triton compiles and ptxas in a subprocess
def test_kernel_compiles_for_hopper_with_16_byte_weight_loads():
    """Compiled for sm_90a (no GPU needed): the CUDA-core split-K kernel reads 16 FP8 codes per load, spills nothing,
    uses the split-K atomics, and with PDL waits on the grid dependency; the FP8-activation tiles use wgmma; a
    ``prefetch`` tile asks L2 for its codes before it waits or loads."""
    pytest.importorskip("triton.backends.nvidia")
    dot = {"m": 1, "dot": True, "block_n": 64, "block_k": 256, "num_warps": 8, "num_stages": 3, "splits": 2}
    cfgs = [{"block_n": 16, "block_k": 512, "splits": 4}, {"m": 128, "dot": True, "a8": True, "block_n": 128,
                                                           "block_k": 128, "num_warps": 8, "num_stages": 3},
            dot, {**dot, "bits": True},
            {"m": 1, "dot": True, "bits": True, "block_n": 64, "block_k": 128, "num_stages": 4, "splits": 4,
             "prefetch": 16}]  # the batch-1 tile the card chose, with the prefetch
    args = [sys.executable, "-m", "impl.serve.ptx_check", "--m", "1", "--pdl"]
    for c in cfgs:
        args += ["--config", json.dumps(c)]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": "."})
    except subprocess.TimeoutExpired:
        pytest.skip("compiling for sm_90a took over 300 s here")
    if "ptxas failed" in r.stderr or "No such file" in r.stderr:
        pytest.skip(f"no ptxas for sm_90a here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    fma, a8, dot, bits, pf = (json.loads(line) for line in r.stdout.splitlines()[-5:])
    assert fma["ld_global_v4"] >= 4 and fma["spill_bytes"] == 0 and fma["atom"] == 2 and fma["griddepcontrol"] == 2
    assert a8["wgmma"] > 0 and a8["spill_bytes"] == 0 and a8["shared_bytes"] <= 227 << 10
    # Triton's decoder goes through f16 (cvt e4m3x2); the bit decoder has none and one bf16x2 multiply per 2 codes
    assert dot["cvt_e4m3"] > 0 and dot["mul_bf16x2"] == 0
    assert bits["cvt_e4m3"] == 0 and bits["mul_bf16x2"] > 0 and bits["cp_async"] > 0
    assert bits["spill_bytes"] <= 16  # with PDL ptxas spills 12 bytes (3 registers) of this 8-warp tile
    # the L2 prefetch: one bulk prefetch per thread, issued before the PDL wait and before any load of the codes
    assert bits["prefetch_l2"] == 0 and pf["prefetch_l2"] == 1 and pf["tma"] == 0
    assert pf["prefetch_before_wait"] and pf["prefetch_before_loads"] and pf["spill_bytes"] == 0


def test_bit_decoder_twin_gives_every_e4m3_value():
    """The CPU twin of the PTX bit decoder gives every one of the 256 codes its e4m3 value (both zeros with their
    sign, subnormals, 448); the two NaN codes give +-480 (stated: weights hold no NaN)."""
    codes = np.arange(256, dtype=np.uint8)
    got = decode_bits_reference(codes)
    want = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).double().numpy()
    finite = ~np.isnan(want)
    assert np.array_equal(got[finite], want[finite])
    assert np.array_equal(np.signbit(got[finite]), np.signbit(want[finite]))
    assert sorted(got[~finite].tolist()) == [-480.0, 480.0]
    assert np.array_equal(decode_bits_reference(codes[::-1].copy()), got[::-1])  # position in the word is kept


def test_bit_decoder_assembly_uses_the_twins_constants():
    """The PTX and its twin share their constants: the selectors, the mask, and 2^120 as a bf16 pair."""
    asm = str(fp8_gemv._BITS_ASM.value if hasattr(fp8_gemv._BITS_ASM, "value") else fp8_gemv._BITS_ASM)
    for const in ("0x9180", "0xB3A2", "0x87F087F0", "0x7B807B80"):
        assert const in asm, const
    two120 = torch.tensor([0x7B80], dtype=torch.int16).view(torch.bfloat16).double().item()
    assert two120 == 2.0 ** fp8_gemv.BITS_EXPONENT_SHIFT
    with pytest.raises(ValueError, match="bits"):
        GemvConfig(bits=True)  # the bit decoder feeds tensor-core tiles only
    assert GemvConfig(dot=True, bits=True).name.startswith("dotb-")


def test_tensor_core_tiles_take_swiglu_from_silu_mul():
    """dot tiles with a SwiGLU input give exactly the product of silu_mul's output (one kernel before them)."""
    gen = torch.Generator().manual_seed(3)
    gu = torch.randn(3, 64, generator=gen).to(DEVICE)
    q, s = fp8_weight(16, 32, 5, False)
    cfg = GemvConfig(dot=True, block_n=16, block_k=16, splits=2)
    from impl.serve.fused import silu_mul

    torch.testing.assert_close(gemv(gu, q, s, cfg, swiglu=True), gemv(silu_mul(gu), q, s, cfg), rtol=0, atol=0)


@triton.jit
def _ranges_kernel(off_ptr, size_ptr, N, stride_wn, k_lo, k_hi, pf_bytes, BLOCK_N: tl.constexpr,
                   CHUNKS: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    off, size = prefetch_ranges(offs_n, offs_n < N, stride_wn, k_lo, k_hi, pf_bytes, CHUNKS)
    idx = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * CHUNKS + tl.arange(0, CHUNKS)[None, :]
    tl.store(off_ptr + idx, off)
    tl.store(size_ptr + idx, size)


@settings(max_examples=min(settings.default.max_examples, 25), deadline=None)
@given(n=st.integers(1, 40), k16=st.integers(1, 64), split=st.integers(0, 3), splits=st.integers(1, 4),
       pf16=st.integers(1, 80), block_n=st.sampled_from([16, 32, 64]), warps=st.sampled_from([4, 8]))
def test_prefetch_pieces_cover_each_rows_first_codes_exactly(n, k16, split, splits, pf16, block_n, warps):
    """The L2 prefetch's pieces (``prefetch_ranges``, run by the kernel before anything else): per row, 16-byte
    aligned pieces of a multiple of 16 bytes that tile [k_lo, k_lo + min(pf, k_hi - k_lo)) exactly, inside the row's
    slab; rows past N ask for nothing. (The kernel hands these to ``cp.async.bulk.prefetch.L2``, which needs exactly
    this; the interpreter has no inline assembly, so the pieces are checked here and the instruction by ptxas.)"""
    k = 16 * k16
    per = split_plan(k, splits, 16)[0]
    split = min(split, split_plan(k, splits, 16)[1] - 1)
    k_lo, k_hi = split * per, min(split * per + per, k)
    stride = k + 32  # padded rows: offsets must use the stride
    cfg = GemvConfig(dot=True, block_n=block_n, num_warps=warps, prefetch=1)
    chunks = prefetch_chunks(cfg)
    tiles = -(-n // block_n)
    off = torch.full((tiles * block_n * chunks,), -1, dtype=torch.int64, device=DEVICE)
    size = torch.full((tiles * block_n * chunks,), -1, dtype=torch.int32, device=DEVICE)
    _ranges_kernel[(tiles,)](off, size, n, stride, k_lo, k_hi, 16 * pf16, BLOCK_N=block_n, CHUNKS=chunks)
    off, size = off.cpu().reshape(-1, chunks).tolist(), size.cpu().reshape(-1, chunks).tolist()
    want = min(16 * pf16, k_hi - k_lo)
    for row in range(tiles * block_n):
        pieces = [(o, sz) for o, sz in zip(off[row], size[row]) if sz > 0]
        if row >= n:
            assert not pieces, row
            continue
        assert all(o % 16 == 0 and sz % 16 == 0 for o, sz in pieces), pieces
        pos = row * stride + k_lo
        for o, sz in sorted(pieces):
            assert o == pos, (row, pieces)
            pos += sz
        assert pos == row * stride + k_lo + want, (row, pieces, want)


def test_prefetch_bytes_stay_within_the_configured_mib():
    """``prefetch_row_bytes``: the call's prefetch (rows x bytes per row) fits in the config's MiB, in 16-byte
    units, at most a slab's K; nothing for bf16 weights, rows not 16-byte aligned or no ``prefetch``."""
    w = torch.zeros(6144, 4096, dtype=torch.uint8).view(torch.float8_e4m3fn)
    cfg = GemvConfig(dot=True, bits=True, block_n=64, block_k=128, splits=4, prefetch=16)
    slabs = (6144 // 64) * 4
    per_row = prefetch_row_bytes(cfg, slabs, 1024, w)
    assert per_row % 16 == 0 and 0 < per_row <= 1024
    assert slabs * 64 * per_row <= 16 << 20 < slabs * 64 * (per_row + 16) or per_row == 1024
    assert prefetch_row_bytes(replace(cfg, prefetch=48), 8, 1024, w) == 1024  # capped by the slab
    assert prefetch_row_bytes(replace(cfg, prefetch=0), slabs, 1024, w) == 0
    assert prefetch_row_bytes(cfg, slabs, 1024, torch.zeros(64, 4096, dtype=torch.bfloat16)) == 0
    assert prefetch_row_bytes(cfg, slabs, 1024, w[:, 8:]) == 0  # rows start 8 bytes off 16
    assert cfg.name.endswith("f16") and GemvConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="prefetch"):
        GemvConfig(prefetch=-1)
