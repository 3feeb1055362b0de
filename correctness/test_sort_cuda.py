"""Property tests of the CUDA C++ bitonic sort: plan (impl.sort.plan), numpy twin (impl.sort.twin), bitonic.cu.

On a CPU: the plan's structure at any n; its numpy twin running the GPU configuration's own passes; ``bitonic.cu``
itself, compiled with g++ under its thread emulation (``bitonic_emulated.cpp``), against numpy at sizes that cross
every tile and pass boundary of a small configuration (tiles of 256 keys: ~3000 keys take 12 passes); the source
compiles for sm_90 with nvcc without spilling. On a GPU: the same kernels through CuPy against cupy.sort / numpy.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from fixtures.nvcc import ptx_for_sm90
from fixtures.nvrtc import assert_compiles_with_nvrtc
from fixtures.oracle import assert_close, check_kernel
from fixtures.sort import host_bits
from fixtures.strategies import arrays, make_array, max_size, seeds, sizes
from impl.sort import bitonic
from impl.sort.bitonic import BitonicSorter, argsort, sort
from impl.sort.codegen import KernelSpec, module_source, pass_struct, plan_kernels
from impl.sort.cuda_sort import CudaSorter, emulated_runtime
from impl.sort.keys import SUPPORTED_DTYPES
from impl.sort.pipeline import HostSortPipeline, PipelineConfig
from impl.sort.plan import (EMU_CUDA_CONFIG, GPU_CUDA_CONFIG, MODES, CudaSortConfig, build_cuda_plan,
                            pad_index, padded_bits, slot_bytes)
from impl.sort.reference import argsort_reference, is_permutation, sort_reference
from impl.sort.runtimes import EmulatedRuntime, cupy_unavailable_reason
from impl.sort.twin import check_plan, run_pass, slot_positions, sort_twin

DTYPES = st.sampled_from(SUPPORTED_DTYPES)
PLAN_CONFIGS = [GPU_CUDA_CONFIG, EMU_CUDA_CONFIG, replace(GPU_CUDA_CONFIG, fuse=False),
                CudaSortConfig(tile_bits=14, items_bits=5), CudaSortConfig(tile_bits=13, items_bits=5, run_bits=6),
                CudaSortConfig(items_bits=7), CudaSortConfig(tile_bits=7, items_bits=2, run_bits=1),
                replace(EMU_CUDA_CONFIG, fuse=False), CudaSortConfig(tile_bits=13, items_bits=5, merge_items_bits=4),
                CudaSortConfig(tile_bits=13, items_bits=5, run_bits=4), CudaSortConfig(tile_bits=13, items_bits=5, run_bits=3),
                replace(EMU_CUDA_CONFIG, merge_items_bits=3),
                CudaSortConfig(tile_bits=14, items_bits=5, merge_tile_bits=15),
                replace(EMU_CUDA_CONFIG, merge_tile_bits=10, merge_items_bits=3),
                replace(EMU_CUDA_CONFIG, fuse=False, merge_tile_bits=9),
                CudaSortConfig(tile_bits=13, items_bits=5, tile_stages=6), replace(EMU_CUDA_CONFIG, tile_stages=6),
                replace(EMU_CUDA_CONFIG, tile_stages=5, merge_tile_bits=9, fuse=False)]
EMU_MAX_N = 3000
MIXED_EMU = replace(EMU_CUDA_CONFIG, merge_items_bits=3)  # tile pass: 4 keys per thread; merges: 8
MIXED_SIZES = (2049, 3000)
WIDE_MERGE_EMU = replace(EMU_CUDA_CONFIG, merge_tile_bits=9)  # tile pass: 256-slot blocks; merges: 512
STAGED_EMU = replace(EMU_CUDA_CONFIG, tile_stages=5)  # the tile pass runs stages 1..5 of its 256-slot tiles
# the FMA form of the tile pass's compare-exchange (2 pairs per step): on both pairs, or on the rank-0 pair only
FMA_EMU = (replace(EMU_CUDA_CONFIG, fma_max=6), replace(EMU_CUDA_CONFIG, fma_max=1))
NO_GXX = EmulatedRuntime.unavailable_reason()
CUPY_REASON = cupy_unavailable_reason()


# ---- the plan (pure Python: any n) ------------------------------------------------------------------------------

@given(n=st.one_of(sizes(max_n=1 << 20), st.integers(0, (1 << 31) - 1)), config=st.sampled_from(PLAN_CONFIGS),
       mode=st.sampled_from(sorted(MODES)))
@settings(max_examples=40, deadline=None)
def test_plan_is_well_formed_and_runs_every_merge_step_once(n, config, mode):
    plan = build_cuda_plan(n, mode, config)
    check_plan(plan)
    assert all(p.steps <= p.t or p.kind == "tile" for p in plan.passes), "a merge pass holds more steps than dims"
    for p in plan.passes:
        blocks, bound = p.active_blocks(n), p.work_bound(n)
        assert (blocks == 0) == (n == 0) and bound <= n
        if blocks:  # exactly the cosets starting below the bound are launched
            assert p.x0(blocks - 1) < bound <= p.x0(blocks)
        if p.kind == "tile" or p.decode:
            assert bound == n


@given(n=sizes(max_n=1 << 14), seed=seeds(), config=st.sampled_from(PLAN_CONFIGS),
       mode=st.sampled_from(sorted(MODES)))
@settings(max_examples=25, deadline=None)
def test_skipped_cosets_are_the_ones_a_pass_leaves_as_they_are(n, seed, config, mode):
    """Each pass run on every coset holding a real slot changes nothing that its launched cosets (those below
    ``work_bound``) leave out; each pass's model bytes are its real slots."""
    plan = build_cuda_plan(n, mode, config)
    keys = np.random.default_rng(seed).integers(0, max(n // 3, 1), n).astype(np.uint64)
    launched = keys.copy()
    for p in plan.passes:
        every = launched.copy()
        run_pass(p, every, n, blocks=p.blocks_below(n))
        run_pass(p, launched, n)
        assert np.array_equal(every, launched), f"pass with stages {p.stages} skipped a coset it changes"
        if p.blocks_below(n) > p.active_blocks(n):
            positions = slot_positions(p, p.active_blocks(n))
            assert np.count_nonzero(positions < n) == p.work_bound(n)
    assert np.array_equal(launched, np.sort(keys))


def test_late_stages_skip_the_partly_filled_last_region():
    """10M argsort slots (tile 2^13 of 8-byte slots): the passes of stages 22 and 23 leave the last 2^23-slot region
    (1.6M real slots) as it is and launch half the blocks; the model's bytes follow."""
    plan = build_cuda_plan(10_000_000, "composite", CudaSortConfig(tile_bits=14, items_bits=5, run_bits=3))
    late = [p for p in plan.passes if p.stages in ((22, 23), (23,))]
    assert late and all(p.work_bound(plan.n) == 1 << 23 for p in late)
    assert sum(p.blocks_below(plan.n) for p in late) > sum(p.active_blocks(plan.n) for p in late)


def test_pass_counts_of_the_design_point():
    """10M float32 keys, tile 2^15: one block sort + 14 fused merge passes (19 with one tile pass per stage); argsort
    (8-byte slots, tile 2^14) 18; 100M keys 21. The bandwidth model counts these."""
    counts = {(n, mode, fuse): len(build_cuda_plan(n, mode, replace(GPU_CUDA_CONFIG, fuse=fuse)).passes)
              for n, mode, fuse in [(10_000_000, "keys32", True), (10_000_000, "keys32", False),
                                    (10_000_000, "composite", True), (100_000_000, "keys32", True)]}
    assert counts == {(10_000_000, "keys32", True): 15, (10_000_000, "keys32", False): 19,
                      (10_000_000, "composite", True): 18, (100_000_000, "keys32", True): 21}
    plan = build_cuda_plan(10_000_000, "keys32")
    assert plan.tile == 1 << 15 and plan.threads == 512 and plan.passes[-1].contiguous
    assert GPU_CUDA_CONFIG.smem_bytes("keys32") <= 232448 and GPU_CUDA_CONFIG.smem_bytes("pairs") <= 232448


def _bank_degree(layout, wide: bool) -> int:
    """Worst shared-memory bank conflict degree of one layout's exchange accesses (one warp, every register):
    4-byte slots: the 32 lanes' words; 8-byte slots (the 8-byte array of 12-byte ones too): each half-warp's 16
    lanes x 2 words (a 64-bit access is served per half-warp). 1 = conflict-free."""
    from collections import Counter

    def slot(lane: int, reg: int) -> int:
        bits = [(reg >> k) & 1 for k in range(len(layout.regs))] + [(lane >> k) & 1 for k in range(5)]
        return sum(b << c for b, c in zip(bits, layout.regs + layout.lanes))

    worst = 1
    for reg in range(1 << len(layout.regs)):
        for group in ((range(16), range(16, 32)) if wide else (range(32),)):
            banks = Counter()
            for lane in group:
                w = pad_index(slot(lane, reg))
                banks.update([(2 * w) % 32, (2 * w + 1) % 32] if wide else [w % 32])
            worst = max(worst, max(banks.values()))
    return worst


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("n", [10_000_000, 100_000_000])
def test_shared_exchanges_are_bank_conflict_free(mode, n):
    """Every layout of every pass (what the exchanges store and load) hits each bank once per wavefront wherever the
    coordinates left to lanes allow it (lanes of distinct residues mod 5; 8-byte slots: residues 0..3 on the
    half-warp's lane bits), and at most twice where the registers hold every coordinate of a residue."""
    wide = MODES[mode] > 4
    need = {0, 1, 2, 3} if wide else {0, 1, 2, 3, 4}
    for config in (CudaSortConfig(13, 5, 5), CudaSortConfig(14, 5, 5), CudaSortConfig(14, 6, 5),
                   CudaSortConfig(15, 6, 5), CudaSortConfig(13, 5, 5, merge_items_bits=4), CudaSortConfig(13, 5, 4),
                   CudaSortConfig(13, 5, 3), CudaSortConfig(14, 5, 4)):
        layouts = {r.layout for p in build_cuda_plan(n, mode, config).passes for r in p.rounds}
        for lay in layouts:
            best = 1 if need <= {c % 5 for c in lay.lanes + lay.warps} else 2
            assert _bank_degree(lay, wide) <= best, f"{mode} {config}: lanes {lay.lanes} (registers {lay.regs})"


def test_config_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="items_bits"):
        CudaSortConfig(items_bits=9)
    with pytest.raises(ValueError, match="threads"):
        CudaSortConfig(tile_bits=15, items_bits=2)
    with pytest.raises(ValueError, match="tile_bits must be <= 15"):
        CudaSortConfig(tile_bits=16, items_bits=7)
    with pytest.raises(ValueError, match=r"merge_tile_bits must be in tile_bits\.\.15 \(13\.\.15\), got 12"):
        CudaSortConfig(tile_bits=13, items_bits=5, merge_tile_bits=12)
    with pytest.raises(ValueError, match="merge tile bits - merge_items_bits = 11"):
        CudaSortConfig(tile_bits=13, items_bits=5, merge_tile_bits=15, merge_items_bits=4)
    with pytest.raises(ValueError, match="mode"):
        build_cuda_plan(10, "keys16")


@given(n=sizes(max_n=1 << 15), seed=seeds(), config=st.sampled_from(PLAN_CONFIGS),
       mode=st.sampled_from(sorted(MODES)))
@settings(max_examples=25, deadline=None)
def test_numpy_twin_of_the_plan_sorts(n, seed, config, mode):
    """Every pass of the plan, executed as the kernels do (cosets, complemented flip halves), sorts any n and never
    moves a real key onto a pad slot."""
    dtype = np.uint32 if mode == "keys32" else np.uint64
    keys = np.random.default_rng(seed).integers(0, max(n // 3, 1), n).astype(dtype)
    assert np.array_equal(sort_twin(keys, build_cuda_plan(n, mode, config)), np.sort(keys))


@pytest.mark.parametrize("n", [200_003, 1 << 18])
def test_numpy_twin_at_the_design_point(n):
    """The GPU configuration's own passes (tile 2^15, several fused merge passes) on random 32-bit keys."""
    keys = np.random.default_rng(n).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    plan = build_cuda_plan(n, "keys32")
    assert len(plan.passes) > 4
    assert np.array_equal(sort_twin(keys, plan), np.sort(keys))


# ---- bitonic.cu itself on the CPU (g++ emulation) ---------------------------------------------------------------

def emulation_kernels(config: CudaSortConfig = EMU_CUDA_CONFIG, max_n: int = EMU_MAX_N) -> list[KernelSpec]:
    """Every kernel a sort of up to max_n keys of any supported dtype can launch (one shared library)."""
    specs: list[KernelSpec] = []
    for mode, raws in (("keys32", (16, 32)), ("composite", (16, 32)), ("keys64", (64,)), ("pairs", (64,))):
        for logn in range(0, padded_bits(max_n) + 1):
            for raw in raws:
                specs += plan_kernels(build_cuda_plan(max(1 << logn, 1), mode, config), raw)
    return list(dict.fromkeys(specs))


@pytest.fixture(scope="module")
def emu():
    if NO_GXX:
        pytest.skip(NO_GXX)
    rt = emulated_runtime()
    mixed = [k for n in MIXED_SIZES for mode in ("keys32", "composite")
             for config in (MIXED_EMU, WIDE_MERGE_EMU, STAGED_EMU)
             for k in plan_kernels(build_cuda_plan(n, mode, config), 32)]
    mixed += [k for config in FMA_EMU for raw in (16, 32) for n in (1, 300, 2049)
              for k in plan_kernels(build_cuda_plan(n, "keys32", config), raw)]
    rt.kernels(list(dict.fromkeys(emulation_kernels() + mixed)), 0)  # one g++ build for every kernel launched below
    return rt


def run_emulated(x: np.ndarray, *, argsort_: bool = False, descending: bool = False,
                 config: CudaSortConfig = EMU_CUDA_CONFIG) -> np.ndarray:
    """Sort ``x`` through the emulated kernels (poisoned output, two runs) against the numpy reference."""
    sorter = CudaSorter(x.size, x.dtype, argsort=argsort_, config=config, runtime=emulated_runtime())
    keep = x.copy()
    expected = (argsort_reference if argsort_ else sort_reference)(x, descending=descending)
    out = np.empty(x.size, dtype=sorter.out_dtype)
    check_kernel(lambda o: sorter(x, o, descending=descending), out, expected, rtol=0, atol=0)
    assert np.array_equal(host_bits(x), host_bits(keep)), "the input was modified"
    return out


@given(x=arrays(DTYPES, max_n=EMU_MAX_N), argsort_=st.booleans(), descending=st.booleans())
@settings(deadline=None)
def test_cuda_source_under_emulation_matches_numpy(emu, x, argsort_, descending):
    got = run_emulated(x, argsort_=argsort_, descending=descending)
    if argsort_:
        assert is_permutation(got, x.size)


@pytest.mark.parametrize("dtype,pattern,argsort_", [("float32", "nasty", False), ("float16", "nasty", True),
                                                     ("int32", "zipf", False), ("uint32", "few_distinct", True),
                                                     ("int64", "extremes", False), ("int64", "few_distinct", True),
                                                     ("float32", "reverse", True)])
def test_cuda_source_across_every_pass_boundary(emu, dtype, pattern, argsort_):
    """Sizes around 2^k, k = 8..11: the tile pass alone (256), then one more stage (and merge pass) at a time."""
    for n in (256, 257, 1023, 2049):
        run_emulated(make_array(n, dtype, pattern, seed=n), argsort_=argsort_, descending=n % 2 == 1)


@pytest.mark.parametrize("descending", [False, True])
def test_argsort_across_the_composite_double_boundary(emu, descending):
    """Argsort slots hold key << 31 | index as a double, negative below 2^62: keys on both sides of 2^31 (that
    boundary), the extremes of the dtype, duplicates across it and its complement (descending) sort by value."""
    rng = np.random.default_rng(7)
    edges = np.array([0, 1, 0x7FFFFFFE, 0x7FFFFFFF, 0x80000000, 0x80000001, 0xFFFFFFFE, 0xFFFFFFFF], dtype=np.uint32)
    x = rng.choice(edges, size=777).astype(np.uint32)
    run_emulated(x, argsort_=True, descending=descending)
    f = rng.choice(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38], np.float32), 515)
    run_emulated(f.astype(np.float32), argsort_=True, descending=descending)


@pytest.mark.parametrize("n", MIXED_SIZES)
@pytest.mark.parametrize("argsort_", [False, True], ids=["keys", "argsort"])
def test_merge_passes_with_other_keys_per_thread(emu, n, argsort_, monkeypatch):
    """``merge_items_bits``: the tile pass and the merge passes launch different block shapes (threads per block)."""
    sorter = CudaSorter(n, np.float32, argsort=argsort_, config=MIXED_EMU, runtime=emu)
    blocks: list[int] = []
    launch = emu.launch
    monkeypatch.setattr(emu, "launch", lambda fn, grid, block, *a, **k: (blocks.append(block), launch(fn, grid, block,
                                                                                                      *a, **k)))
    sorter(make_array(n, "float32", "random", seed=1), np.empty(n, sorter.out_dtype))
    tile_threads = 1 << (MIXED_EMU.tile_bits - MIXED_EMU.items_bits)  # the same for 4- and 8-byte slots
    assert blocks == [tile_threads] + [tile_threads // 2] * (len(sorter.plan.passes) - 1)
    monkeypatch.undo()
    run_emulated(make_array(n, "float32", "nasty", seed=n), argsort_=argsort_, config=MIXED_EMU)


@pytest.mark.parametrize("n", MIXED_SIZES)
@pytest.mark.parametrize("argsort_", [False, True], ids=["keys", "argsort"])
def test_merge_passes_on_larger_cosets(emu, n, argsort_, monkeypatch):
    """``merge_tile_bits``: the merge passes hold twice the tile pass's slots per block, with their own threads and
    shared memory per launch, and the sort stays exact on the nasty keys."""
    sorter = CudaSorter(n, np.float32, argsort=argsort_, config=WIDE_MERGE_EMU, runtime=emu)
    launches: list[tuple[int, int]] = []
    launch = emu.launch
    monkeypatch.setattr(emu, "launch", lambda fn, grid, block, smem, *a, **k: (launches.append((block, smem)),
                                                                               launch(fn, grid, block, smem, *a, **k)))
    sorter(make_array(n, "float32", "random", seed=2), np.empty(n, sorter.out_dtype))
    t, e = WIDE_MERGE_EMU.shape(sorter.mode)
    tile = (1 << t - e, slot_bytes(t, sorter.mode))
    merge = (1 << t + 1 - e, slot_bytes(t + 1, sorter.mode))
    assert launches[0] == tile and launches[1:] == [merge] * (len(sorter.plan.passes) - 1) and len(launches) > 2
    assert sorter.smem == merge[1] > tile[1]
    monkeypatch.undo()
    run_emulated(make_array(n, "float32", "nasty", seed=n + 1), argsort_=argsort_, config=WIDE_MERGE_EMU)


@pytest.mark.parametrize("n", MIXED_SIZES)
@pytest.mark.parametrize("argsort_", [False, True], ids=["keys", "argsort"])
def test_tile_pass_that_stops_early(emu, n, argsort_):
    """``tile_stages``: the tile pass leaves ascending runs of 2^5 (15 steps) and one merge pass per stage 6..8
    (flip-form steps on contiguous cosets) completes its tiles before the wide merges; exact on the nasty keys."""
    sorter = CudaSorter(n, np.float32, argsort=argsort_, config=STAGED_EMU, runtime=emu)
    first, merges = sorter.plan.passes[0], sorter.plan.passes[1:]
    assert first.kind == "tile" and first.stages == (1, 2, 3, 4, 5) and first.steps == 15
    assert [p.stages for p in merges[:3 - argsort_]] == [(L,) for L in range(6, 9 - argsort_)]
    run_emulated(make_array(n, "float32", "nasty", seed=n + 2), argsort_=argsort_, config=STAGED_EMU)


@pytest.mark.parametrize("config", FMA_EMU, ids=["fma-both-pairs", "fma-one-pair"])
@pytest.mark.parametrize("dtype", ["float32", "int32", "uint32", "float16"])
@pytest.mark.parametrize("n", [1, 300, 2049])
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_fma_exchanges_sort_like_min_max(emu, config, dtype, n, descending):
    """``fma_max``: exchanges whose maximum is a + b - min (two multiply-adds, wrapping modulo 2^32) sort exactly
    as min/max ones do, keys at both ends of the 32-bit range included (the nasty pattern: NaN, ±inf, ±0,
    extremes)."""
    sorter = CudaSorter(n, np.dtype(dtype), config=config, runtime=emu)
    assert [p.fma for p in sorter.plan.passes] == [config.fma_max] + [0] * (len(sorter.plan.passes) - 1)
    run_emulated(make_array(n, dtype, "nasty", seed=n + 3), descending=descending, config=config)


def test_fma_form_applies_to_32_bit_keys_only():
    """The FMA form exists for the tile pass of keys32 slots: it carries ``fma`` (a new kernel, whose pass struct
    says FMA), the merge passes keep theirs, and wider slots keep their exchange and their kernels."""
    config = replace(EMU_CUDA_CONFIG, fma_max=3)
    plain, fma = (build_cuda_plan(5000, "keys32", c) for c in (EMU_CUDA_CONFIG, config))
    assert [p.fma for p in fma.passes] == [3] + [0] * (len(fma.passes) - 1)
    assert fma.passes[0].key != plain.passes[0].key and fma.passes[1:] == plain.passes[1:]
    assert "FMA = 3;" in pass_struct(fma.passes[0]) and "FMA = 0;" in pass_struct(plain.passes[0])
    for mode in ("keys64", "composite", "pairs"):
        assert build_cuda_plan(5000, mode, config).passes == build_cuda_plan(5000, mode, EMU_CUDA_CONFIG).passes
    with pytest.raises(ValueError, match="fma_max"):
        CudaSortConfig(fma_max=7)


def test_fma_exchange_keeps_its_multiply_adds_in_ptx(tmp_path):
    """The multiplier of the FMA form is a register (1 at run time), so ptxas cannot fold the two multiply-adds
    into one ALU add: the keys32 tile pass's PTX holds mad.lo with a register multiplier, and fewer max.u32."""
    counts = {}
    for f in (0, 3):
        spec = plan_kernels(build_cuda_plan(1 << 13, "keys32", replace(EMU_CUDA_CONFIG, fma_max=f)), 32)[0]
        src = tmp_path / f"sort_f{f}.cu"
        src.write_text(module_source([spec]))
        ptx = ptx_for_sm90(src, ["-std=c++17"], tmp_path)
        mads = re.findall(r"\bmad\.lo\.[su]32\s+%r\d+, %r\d+, %r\d+", ptx)  # every operand a register
        counts[f] = (len(re.findall(r"\bmax\.u32\b", ptx)), len(mads))
    assert counts[3][0] < counts[0][0] and counts[3][1] >= counts[0][0] - counts[3][0] > 0, counts


def test_tile_stages_move_steps_from_the_tile_pass_to_merges():
    """10M keys, tile 2^13: stopping the tile pass at stage 7 leaves it 28 of 91 steps and adds one merge pass per
    stage 8..13 (27 passes instead of 21); a padded size within one tile ignores it; a value that would put the
    next flip on a lane coordinate (< 5) or beyond the tile is refused."""
    base = CudaSortConfig(tile_bits=13, items_bits=5)
    full, staged = (build_cuda_plan(10_000_000, "keys32", replace(base, tile_stages=s)) for s in (None, 7))
    assert [p.steps for p in full.passes[:2]] == [91, 8] and len(full.passes) == 21
    assert [p.steps for p in staged.passes[:7]] == [28, 8, 9, 10, 11, 12, 13] and len(staged.passes) == 27
    assert [p.stages for p in staged.passes[1:7]] == [(L,) for L in range(8, 14)]
    small = build_cuda_plan(5000, "keys32", replace(base, tile_stages=7))
    assert len(small.passes) == 1 and small.passes[0].steps == 91
    for bad in (0, 4, 14):
        with pytest.raises(ValueError, match="tile_stages"):
            replace(base, tile_stages=bad)


@pytest.mark.parametrize("overlap_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [257, 1000, 2049, 3000])
def test_region_schedule_covers_every_block_once_and_sorts(emu, n, overlap_bits):
    """The graph's schedule: each local pass's blocks split over the regions exactly once, in pass order within a
    region; run launch by launch (the emulated graph replay) it sorts and argsorts like numpy."""
    config = replace(EMU_CUDA_CONFIG, overlap_bits=overlap_bits)
    for argsort_ in (False, True):
        sorter = CudaSorter(n, np.float32, argsort=argsort_, config=config, runtime=emu)
        regions, rest = sorter.schedule()
        local = rest[0] if rest else len(sorter.plan.passes)
        assert rest == list(range(local, len(sorter.plan.passes)))
        if regions:
            assert len(regions) == -(-n // (1 << (padded_bits(n) - overlap_bits))) and local >= 1
        for i in range(local):
            covered = sorted(b for launches in regions for j, first, blocks in launches if j == i
                             for b in range(first, first + blocks))
            assert covered == list(range(sorter.pass_blocks(i))), f"pass {i}"
        for launches in regions:
            assert [j for j, _, _ in launches] == sorted(j for j, _, _ in launches)
        x = make_array(n, "float32", "nasty", seed=n + overlap_bits)
        out = np.full(n, -1 if argsort_ else np.nan, dtype=sorter.out_dtype)
        sorter.graph(x, out)()
        ref = (argsort_reference if argsort_ else sort_reference)(x)
        assert_close(out, ref, rtol=0, atol=0)


def test_chunked_first_and_last_passes_equal_whole_launches(emu):
    """The host pipeline launches the tile pass and the last pass block range by block range (``block0``)."""
    n = 2500
    x = make_array(n, "float32", "random", seed=4)
    sorter = CudaSorter(n, np.float32, config=EMU_CUDA_CONFIG, runtime=emu)
    whole = np.empty(n, np.float32)
    sorter(x, whole)
    out = np.full(n, np.nan, np.float32)
    last = len(sorter.plan.passes) - 1
    assert sorter.plan.passes[last].contiguous
    for i in range(last + 1):
        if i in (0, last):
            for b in range(0, sorter.grids[i], 3):
                sorter.launch_pass(i, x, out, first_block=b, blocks=3)
        else:
            sorter.launch_pass(i, x, out)
    assert np.array_equal(out, whole) and np.array_equal(out, np.sort(x))


def test_public_api_runs_the_cuda_source_with_a_cuda_config(emu):
    x = make_array(1500, "float32", "nasty", seed=8)
    assert_close(sort(x, config=EMU_CUDA_CONFIG), np.sort(x), rtol=0, atol=0)
    assert np.array_equal(argsort(x, descending=True, config=EMU_CUDA_CONFIG),
                          argsort_reference(x, descending=True))
    y = x.copy()
    assert sort(y, inplace=True, config=EMU_CUDA_CONFIG) is y and np.array_equal(host_bits(y), host_bits(sort(x)))
    d = cuda.to_device(x)
    got = argsort(d, config=EMU_CUDA_CONFIG)
    assert hasattr(got, "copy_to_host") and np.array_equal(got.copy_to_host(), np.argsort(x, kind="stable"))


def test_host_pipeline_runs_the_cuda_source(emu):
    n = 2100
    x = make_array(n, "int32", "random", seed=5)
    for pc in (PipelineConfig(chunks=3), PipelineConfig(chunks=8), PipelineConfig(chunks=8, early=False),
               PipelineConfig(chunks=8, lanes=2), PipelineConfig(chunks=2, pinned=False)):
        pipe = HostSortPipeline(n, np.int32, config=EMU_CUDA_CONFIG, pipeline=pc)
        assert np.array_equal(pipe(x), np.sort(x))
        pipe.stage_in[:] = x
        assert np.array_equal(pipe.sort_staged(), np.sort(x))


def test_host_pipeline_runs_each_pass_on_the_regions_it_can(emu):
    """Regions of 2^k slots: a pass within a region runs on it alone; a wider one on the aligned group of regions it
    spans, as soon as they have all arrived (regions 0 and 1 merge before region 2's upload, region 2 alone in its
    2^11 group); the last pass per region, region 0 first; the result is numpy's."""
    n = 3000  # 2^12 slots; regions of 2^10 (4 chunks -> 3 regions, the last partial)
    x = make_array(n, "float32", "nasty", seed=6)
    pipe = HostSortPipeline(n, np.float32, argsort=True, config=EMU_CUDA_CONFIG, pipeline=PipelineConfig(chunks=4))
    assert pipe.region_bits == 10 and pipe.chunk_bounds() == [(0, 1024), (1024, 2048), (2048, 3000)]
    steps = pipe.steps()
    span = pipe.sorter.span_bits
    wide = [i for i in range(pipe.passes) if span(i) == 11]
    assert wide and all(span(i) <= 12 for i in range(pipe.passes))
    assert steps.index(("pass", wide[0], 0, 2)) < steps.index(("arrive", 2)) < steps.index(("pass", wide[0], 2, 3))
    last = pipe.passes - 1
    assert steps[-6:] == [("pass", last, 0, 1), ("done", 0), ("pass", last, 1, 2), ("done", 1),
                          ("pass", last, 2, 3), ("done", 2)]
    assert pipe.exposed()[1] == pipe.passes  # every pass touches the last region: all follow its upload
    assert np.array_equal(pipe(x), argsort_reference(x))
    pipe.stage_in[:] = x
    assert np.array_equal(pipe.sort_staged(), argsort_reference(x))


# ---- byte order: every public entry point sorts a big-endian array by value or refuses it by name -----------------

BIG = [">f4", ">i4", ">u4", ">i8", ">f2"]


@pytest.mark.parametrize("dtype", BIG)
@pytest.mark.parametrize("config", [None, EMU_CUDA_CONFIG], ids=["default", "cuda-source"])
def test_big_endian_host_arrays_sort_by_value(emu, dtype, config):
    x = np.array([3.0, -1.0, 2.0, 0.5, 10.0, 2.0, -7.0]).astype(dtype)
    got = sort(x, config=config)
    assert got.dtype == x.dtype and np.array_equal(got, np.sort(x))
    assert np.array_equal(sort(x, descending=True, config=config), np.sort(x)[::-1])
    assert np.array_equal(argsort(x, config=config), np.argsort(x, kind="stable"))
    y = x.copy()
    assert sort(y, inplace=True, config=config) is y and y.dtype == x.dtype and np.array_equal(y, np.sort(x))
    pipe = HostSortPipeline(x.size, x.dtype.newbyteorder("="), argsort=True, config=config)
    assert np.array_equal(pipe(x), np.argsort(x, kind="stable"))


@pytest.mark.parametrize("dtype", BIG)
def test_big_endian_dtypes_are_refused_where_they_cannot_be_converted(dtype):
    with pytest.raises(TypeError, match="byte order"):
        BitonicSorter(8, dtype)
    with pytest.raises(TypeError, match="byte order"):
        CudaSorter(8, dtype, config=EMU_CUDA_CONFIG, runtime=emulated_runtime())
    with pytest.raises(TypeError, match="byte order"):
        HostSortPipeline(8, dtype)
    with pytest.raises(TypeError, match="byte order"):
        sort(cuda.to_device(np.zeros(8, dtype)))  # device memory is used as it is: refused, not swapped


# ---- nvcc for sm_90 ---------------------------------------------------------------------------------------------

def ptxas_rows(specs: list[KernelSpec], one_module: bool) -> list[dict]:
    from impl.sort.compile_check import compile_module, compile_report

    if one_module:
        return compile_module(specs)
    return compile_report(specs)  # cubins cached by source text: a hit is this very source, compiled


def test_cuda_source_compiles_for_sm90_without_spills():
    """Every kernel kind (tile pass, coset passes with and without the flip, encode/decode for every dtype width)
    of the small configuration, in every slot mode, through nvcc -arch=sm_90 and ptxas."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA C++ source cannot be compiled here")
    specs = emulation_kernels(max_n=1 << 11)
    rows = ptxas_rows(specs, one_module=True)
    assert {r["name"] for r in rows} == {s.name for s in specs}
    for r in rows:
        assert r["spill_stores"] == 0 and r["stack"] == 0, f"{r}: spills"
        assert r["registers"] * r["threads"] * r["min_blocks"] <= 65536, f"{r}: the blocks do not fit the SM's registers"


def test_cuda_source_compiles_with_nvrtc_like_cupy():
    """CuPy's fallback without nvcc: NVRTC on the generated source (no headers, C++17, sm_90; NVRTC takes the
    static_for lambdas for host code unless -default-device)."""
    specs = plan_kernels(build_cuda_plan(2049, "composite", EMU_CUDA_CONFIG), 16)
    assert_compiles_with_nvrtc(module_source(specs).encode(), "sort.cu",
                               [b"-std=c++17", b"-default-device", b"--gpu-architecture=sm_90"])  # lambdas: device


@pytest.mark.slow
def test_design_point_kernels_fit_an_sm90_block():
    """The GPU configuration's heaviest kernels (the block sort with encode, a fused merge pass with the flip, the
    decode pass; keys-only and argsort): at most 128 registers for 512 threads, no spills (ptxas -v)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA C++ source cannot be compiled here")
    specs = []
    for mode in ("keys32", "composite"):
        ks = plan_kernels(build_cuda_plan(10_000_000, mode), 32)
        specs += [ks[0], next(k for k in ks if k.spec.f >= 0 and k.spec.exchanges >= 3), ks[-1]]
    rows = ptxas_rows(specs, one_module=False)
    for r in rows:
        assert r["threads"] == 512 and r["min_blocks"] == 1 and r["registers"] <= 128, r
        assert r["spill_stores"] == 0 and r["stack"] == 0, f"{r}: spills"


@pytest.mark.parametrize("good_text, bad_text, config", [
    ("const V l = vmin(a, b), h = vmax(a, b);", "const V l = vmax(a, b), h = vmin(a, b);", EMU_CUDA_CONFIG),
    ("h = (a * one + b) - l * one;", "h = (a * one + b) - b * one;", FMA_EMU[1]),
], ids=["min-max-swapped", "fma-max-wrong"])
def test_a_wrong_comparator_is_caught(tmp_path, good_text, bad_text, config):
    """The emulated tests can fail: with min and max swapped in one mode's compare-exchange, or the FMA form's
    maximum taken wrongly on the tile pass's one pair in two that uses it, the sort differs."""
    if NO_GXX:
        pytest.skip(NO_GXX)
    from impl.sort import codegen

    good = codegen.SOURCE.read_text()
    bad = good.replace(good_text, bad_text, 1)
    assert bad != good
    broken = tmp_path / "bitonic.cu"
    broken.write_text(bad)
    original = codegen.SOURCE
    codegen.SOURCE = broken
    try:
        rt = EmulatedRuntime()
        x = make_array(700, "int32", "random", seed=1)
        sorter = CudaSorter(x.size, x.dtype, config=config, runtime=rt)
        out = np.empty_like(x)
        sorter(x, out)
    finally:
        codegen.SOURCE = original
    assert not np.array_equal(out, np.sort(x))


# ---- on a GPU: CuPy ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(CUPY_REASON is not None, reason=str(CUPY_REASON))
@pytest.mark.parametrize("n", [1 << 20, 10_000_001])
@pytest.mark.parametrize("dtype", ["float32", "int64", "float16"])
def test_cuda_sort_on_gpu_matches_numpy(n, dtype):
    x = make_array(n, dtype, "nasty" if dtype != "int64" else "extremes", seed=n)
    assert_close(sort(x), np.sort(x), rtol=0, atol=0)
    assert np.array_equal(argsort(x), np.argsort(x, kind="stable"))


@pytest.mark.gpu
@pytest.mark.skipif(CUPY_REASON is not None, reason=str(CUPY_REASON))
@given(x=arrays(DTYPES, max_n=max_size(cpu=64, gpu=1 << 20)), argsort_=st.booleans(), descending=st.booleans())
@settings(max_examples=40, deadline=None)
def test_cuda_sort_on_gpu_matches_numpy_property(x, argsort_, descending):
    """The default sort/argsort on a GPU (the CUDA C++ passes) at every size up to 2^20, every dtype, both orders."""
    got = (argsort if argsort_ else sort)(x, descending=descending)
    ref = (argsort_reference if argsort_ else sort_reference)(x, descending=descending)
    assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(CUPY_REASON is not None, reason=str(CUPY_REASON))
@pytest.mark.parametrize("argsort_", [False, True], ids=["keys", "argsort"])
def test_cuda_graph_replay_matches_direct_launches(argsort_):
    import cupy

    n = 3_000_017
    x = make_array(n, "float32", "nasty", seed=5)
    sorter = CudaSorter(n, np.float32, argsort=argsort_)
    d_x, d_out = cupy.asarray(x), cupy.empty(n, dtype=sorter.out_dtype)
    replay = sorter.graph(d_x, d_out)
    d_out.fill(0)
    replay()
    cupy.cuda.Device().synchronize()
    got = d_out.get()
    ref = argsort_reference(x) if argsort_ else sort_reference(x)
    assert_close(got, ref, rtol=0, atol=0)
    assert bitonic.uses_cuda_cpp(None)
