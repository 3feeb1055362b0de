"""The sort's host pipeline (pinned staging, chunks on streams), CUDA-graph replay, experiments and claims."""
import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from fixtures.sort import host_bits
from fixtures.strategies import arrays, make_array, max_size
from impl.common.ledger import ResultsView, clean_commit, evaluate
from impl.sort.bitonic import BitonicSorter, SortGraph
from impl.sort.keys import SUPPORTED_DTYPES
from impl.sort.network import default_config
from impl.sort.pipeline import NAIVE, STAGED, HostSortPipeline, PipelineConfig, merge_tree
from impl.sort.plan import EMU_CUDA_CONFIG, padded_bits
from impl.sort.reference import argsort_reference, sort_reference


@given(x=arrays(st.sampled_from(SUPPORTED_DTYPES), max_n=max_size(cpu=1500, gpu=1 << 21)),
       chunks=st.sampled_from([1, 2, 3, 8]), streams=st.sampled_from([1, 2, 3]), pinned=st.booleans(),
       argsort_=st.booleans(), descending=st.booleans(), cpp=st.booleans(),
       finish=st.sampled_from(["merge", "tree", "bitonic"]), early=st.booleans())
@settings(max_examples=25)
def test_pipeline_matches_numpy(x, chunks, streams, pinned, argsort_, descending, cpp, finish, early):
    """Any dtype, size, chunking, stream layout, staging, merge timing and finish (the merge where it applies:
    keys-only CUDA C++ passes), numba's passes or the CUDA C++ ones (emulated here), against numpy; output
    poisoned, input untouched."""
    keep = x.copy()
    pipe = HostSortPipeline(x.size, x.dtype, argsort=argsort_, config=EMU_CUDA_CONFIG if cpp else None,
                            pipeline=PipelineConfig(chunks=chunks, streams=streams, pinned=pinned, finish=finish,
                                                    early=early))
    tile_bits = EMU_CUDA_CONFIG.shape("keys64" if x.dtype.itemsize == 8 else "keys32")[0]
    merges = finish != "bitonic" and cpp and not argsort_ and padded_bits(x.size) - 1 >= tile_bits
    assert pipe.finish == (finish if merges else "bitonic")
    out = np.full(x.size, 7, dtype=pipe.sorter.out_dtype)  # poisoned: every element must be written
    got = pipe(x, out, descending=descending)
    assert got is out
    if argsort_:
        assert np.array_equal(got, argsort_reference(x, descending=descending))
    else:
        ref = sort_reference(x, descending=descending)
        same = (got == ref) | (np.isnan(got) & np.isnan(ref)) if x.dtype.kind == "f" else got == ref
        assert same.all(), f"{int((~same).sum())} wrong of {x.size}"
    assert np.array_equal(host_bits(x), host_bits(keep)), "the input was modified"


@pytest.mark.parametrize("dtype,chunks,finish", [("float32", 3, "tree"), ("int64", 8, "tree"), ("float16", 1, "merge"),
                                                 ("uint32", 3, "merge")])
def test_merge_finish_matches_the_bitonic_finish_and_numpy(dtype, chunks, finish):
    """The merge finishes (passes up to sorted runs — two halves, or a region each — a tree of merges, the root's
    merge per output region) give the bitonic finish's output bit for bit (NaNs canonical, −0.0 before +0.0) and
    numpy's values, both directions, on nasty keys at sizes just above and below a power of two and at 7 regions (a
    run moved between buffers before its merge); the output is poisoned first and the input never modified."""
    for n, seed in [(2049, 2), (4095, 3), (7 * 512 - 1, 4)]:
        x = make_array(n, dtype, "nasty", seed=seed)
        keep = x.copy()
        merged = HostSortPipeline(n, x.dtype, config=EMU_CUDA_CONFIG,
                                  pipeline=PipelineConfig(chunks=chunks, finish=finish))
        plain = HostSortPipeline(n, x.dtype, config=EMU_CUDA_CONFIG,
                                 pipeline=PipelineConfig(chunks=chunks, finish="bitonic"))
        assert (merged.finish, plain.finish) == (finish, "bitonic")
        runs = padded_bits(n) - 1 if finish == "merge" else min(merged.region_bits, padded_bits(n) - 1)
        assert merged.sorter.plan.run_bits == runs
        assert len(merged.tree) == -(-n >> runs) - 1  # L runs: L − 1 merges (the "merge" finish: 2 runs, 1 merge)
        assert not merged.sorter.plan.passes[-1].decode and merged.tree[-1].out_buf == -1
        for descending in (False, True):
            out = np.full(n, 7, dtype=x.dtype)
            got = merged(x, out, descending=descending)
            ref = sort_reference(x, descending=descending)
            same = (got == ref) | (np.isnan(got) & np.isnan(ref)) if x.dtype.kind == "f" else got == ref
            assert same.all(), f"n={n}: {int((~same).sum())} wrong"
            assert np.array_equal(host_bits(got), host_bits(plain(x, descending=descending)))
        assert np.array_equal(host_bits(x), host_bits(keep))


@pytest.mark.parametrize("runs", [1, 3])
def test_merge_tree_merges_every_run_once_and_never_reads_what_it_writes(runs):
    """Played on the host for every count of runs up to 40 (and a partial last run): each merge joins two adjacent
    sorted runs whose buffers it names correctly, writes a buffer that neither input occupies (the root: the output),
    and the last merge leaves one run of all n slots. A merge that wrote into its inputs' buffer, or a missed or
    repeated run, fails here."""
    size = 1 << runs
    for count in range(1, 41):
        for n in {count * size, count * size - (size // 2 or 1) + 1}:
            tree = merge_tree(n, runs) if count > 1 else []
            live = {lo: (min(lo + size, n), 0) for lo in range(0, n, size)}  # run start -> (end, buffer)
            for node in tree:
                (a_end, a_buf), (b_end, b_buf) = live.pop(node.lo), live.pop(node.mid)
                assert (a_end, b_end) == (node.mid, node.hi), f"n={n}: {node} does not join two adjacent runs"
                if node.copy:
                    assert {a_buf, b_buf} == {0, 1} and (a_buf if node.copy == "a" else b_buf) == 0
                    a_buf = b_buf = 1
                assert (node.a_buf, node.b_buf) == (a_buf, b_buf), f"n={n}: {node} reads the wrong buffer"
                assert node.out_buf not in (a_buf, b_buf), f"n={n}: {node} writes where it reads"
                live[node.lo] = (node.hi, node.out_buf)
            assert live == ({0: (n, -1)} if count > 1 else {0: (n, 0)}), f"n={n}: the runs are not merged into one"
            assert all(node.out_buf >= 0 for node in tree[:-1]) and (not tree or tree[-1].out_buf == -1)


@pytest.mark.parametrize("chunks", [2, 5])
@pytest.mark.parametrize("argsort_", [False, True], ids=["keys", "argsort"])
def test_pipeline_with_merge_blocks_larger_than_the_tile(chunks, argsort_):
    """Merge passes on cosets twice the tile pass's blocks (``merge_tile_bits``): their groups of regions still
    cover every block once, and the output is exact on the nasty keys (the emulated C++ kernels)."""
    n = 3000
    config = replace(EMU_CUDA_CONFIG, merge_tile_bits=EMU_CUDA_CONFIG.tile_bits + 1)
    pipe = HostSortPipeline(n, np.float32, argsort=argsort_, config=config, pipeline=PipelineConfig(chunks=chunks))
    assert any(p.t > pipe.sorter.plan.passes[0].t for p in pipe.sorter.plan.passes)
    x = make_array(n, "float32", "nasty", seed=chunks)
    out = np.full(n, 7, dtype=pipe.sorter.out_dtype)
    got = pipe(x, out)
    if argsort_:
        assert np.array_equal(got, argsort_reference(x))
    else:
        ref = sort_reference(x)
        assert ((got == ref) | (np.isnan(got) & np.isnan(ref))).all()


def test_pipeline_chunks_are_tile_aligned_and_cover_the_input():
    tile = HostSortPipeline(1, np.float32).sorter.plan.tile  # the tile differs between CPU and GPU configs
    n = 2 * tile + tile // 2  # chunks of ceil(n/3) round up to one tile: three chunks, the last one partial
    pipe = HostSortPipeline(n, np.float32, pipeline=PipelineConfig(chunks=3))
    bounds = pipe.chunk_bounds()
    assert pipe.sorter.plan.tile == tile
    assert bounds[0][0] == 0 and bounds[-1][1] == n and len(bounds) == 3
    assert all(lo % tile == 0 and hi > lo for lo, hi in bounds)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    x = make_array(n, "float32", "reverse", seed=2)
    assert np.array_equal(pipe(x), np.sort(x))


def test_pipeline_rejects_what_it_cannot_sort():
    pipe = HostSortPipeline(64, np.int32, pipeline=NAIVE)
    with pytest.raises(ValueError, match="64 int32"):
        pipe(np.zeros(65, np.int32))
    with pytest.raises(TypeError, match="unsupported dtype"):
        pipe(np.zeros(64, np.float64))
    with pytest.raises(ValueError, match="shared variant"):
        HostSortPipeline(64, np.int32, config=default_config("global"))
    with pytest.raises(ValueError, match="chunks"):
        PipelineConfig(chunks=0)
    with pytest.raises(ValueError, match="lanes"):
        PipelineConfig(lanes=0)


class _Timeline:
    """Records what the pipeline enqueues, per stream, and answers 'must a finish before b starts?' (stream order
    plus event waits), the device's only ordering guarantees."""

    def __init__(self, pipe: HostSortPipeline) -> None:
        self.pipe, self.ops, self.last = pipe, [], {}  # op: (stream, kind, detail, deps)
        self.k, self.regions, self.blocks = pipe.region_bits, len(pipe.chunk_bounds()), {}

    def add(self, stream, kind, detail, extra=()) -> int:
        deps = set(extra) | ({self.last[stream]} if stream in self.last else set())
        self.ops.append((stream, kind, detail, deps))
        self.last[stream] = len(self.ops) - 1
        return len(self.ops) - 1

    def record(self, stream):
        timeline, at = self, self.last.get(stream)

        class Event:
            def wait(self, other) -> None:
                if at is not None:
                    timeline.add(other, "wait", None, {at})
        return Event()

    def launch(self, i, src, out, *, descending=False, stream=None, first_block=0, blocks=None) -> None:
        """A pass on blocks [first, first + blocks): the regions holding them (block b lies in the aligned 2^k-slot
        block b >> (k - block_bits), k >= the pass's span; else the launch must be whole)."""
        sorter = self.pipe.sorter
        stop = sorter.pass_blocks(i) if blocks is None else first_block + blocks
        span, bits = sorter.span_bits(i), sorter.block_bits(i)
        if span > self.k:  # exactly one aligned group of 2^span slots: no less (wrong), no more (waits too long)
            group = first_block >> (span - bits)
            assert first_block == group << (span - bits) and stop == min((group + 1) << (span - bits),
                                                                        sorter.pass_blocks(i)), \
                f"pass {i} launched on blocks {first_block}..{stop}, not on one group of 2^{span} slots"
        regions = sorted({min((b << sorter.block_bits(i)) >> self.k, self.regions - 1)
                          for b in range(first_block, stop)})
        self.blocks.setdefault(i, []).extend(range(first_block, stop))
        self.add(stream, "pass", (i, tuple(regions)))

    def before(self, a: int, b: int) -> bool:
        seen, todo = set(), [b]
        while todo:
            for d in self.ops[todo.pop()][3]:
                if d == a:
                    return True
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return False

    def find(self, kind, detail) -> list[int]:
        return [j for j, op in enumerate(self.ops) if op[1] == kind and op[2] == detail]


@pytest.mark.parametrize("finish", ["merge", "tree", "bitonic"])
@pytest.mark.parametrize("lanes", [1, 2, 3])
@pytest.mark.parametrize("chunks", [1, 3, 4, 8])
def test_pipeline_schedule_orders_every_dependency_and_lets_copies_overlap(monkeypatch, chunks, lanes, finish):
    """On separate streams: each pass after the uploads and the previous pass of every region it touches, each
    download after the last pass on its region (the merge finishes: each tree merge after the last pass on every
    region it merges and after the merges of its runs, never after an upload it does not need; the root's merges
    after every pass and tree merge; each download after its region's merge); every block of every pass launched
    exactly once; no pass waits for the upload of a region it does not touch (merges of the first regions overlap the later uploads); no upload
    waits for a kernel (the copy engine never idles behind the host's or the device's work), which the graph replay
    relies on for its overlap; and with two compute lanes or more, no pass on the last region waits for a pass on
    the region before it (its own passes overlap the merges still running there)."""
    import impl.sort.pipeline as pipeline_module

    n = 3000
    pipe = HostSortPipeline(n, np.float32, argsort=finish == "bitonic", config=EMU_CUDA_CONFIG,
                            pipeline=PipelineConfig(chunks=chunks, lanes=lanes, finish=finish))
    assert len(pipe.lanes) == lanes and pipe.finish == finish
    t = _Timeline(pipe)
    pipe.roles = ("in", "compute", "out")
    pipe.lanes = ("compute",) + tuple(f"lane{j}" for j in range(1, lanes))
    monkeypatch.setattr(pipeline_module, "_record", t.record)
    monkeypatch.setattr(pipe, "_upload", lambda lo, hi, s: t.add(s, "h2d", lo))
    monkeypatch.setattr(pipe, "_download", lambda lo, hi, s: t.add(s, "d2h", lo))
    monkeypatch.setattr(pipe, "_merge", lambda lo, hi, s, descending: t.add(s, "merge", lo))
    monkeypatch.setattr(pipe, "_node", lambda node, diags, s: t.add(s, "node", pipe.tree.index(node)))
    monkeypatch.setattr(pipe.sorter, "launch_pass", t.launch)
    pipe._enqueue(False, None)
    regions = [lo for lo, _ in pipe.chunk_bounds()]
    assert len(regions) == min(chunks, 3 if chunks < 8 else 6)
    size = 1 << t.k
    uploads = [t.find("h2d", lo)[0] for lo in regions]
    touched = {}  # region index -> op index of the last pass on it
    ran = {r: [] for r in range(len(regions))}  # region -> the passes run on it, in enqueue order
    needs = {r: {r} for r in range(len(regions))}  # region -> the regions whose keys its slots now depend on
    for j, (_, kind, detail, _) in enumerate(t.ops):
        if kind != "pass":
            continue
        i, on = detail
        for r in on:
            assert t.before(uploads[r], j), f"pass {i} may start before region {r} is uploaded"
            if r in touched:
                assert t.before(touched[r], j), f"pass {i} on region {r} may overlap the previous pass there"
            touched[r] = j
            ran[r].append(i)
        data = set().union(*(needs[r] for r in on))
        assert not any(t.before(uploads[r], j) for r in range(max(data) + 1, len(regions))), \
            f"pass {i} on regions {on} waits for the upload of a later region its keys do not depend on"
        for r in on:
            needs[r] = data
    for r, done in ran.items():  # a pass's blocks are a prefix: it reaches the regions up to its last block's
        last = {i: min(((pipe.sorter.pass_blocks(i) - 1) << pipe.sorter.block_bits(i)) >> t.k, len(regions) - 1)
                for i in range(pipe.passes)}
        assert done == [i for i in range(pipe.passes) if r <= last[i]], f"region {r} misses a pass or runs one twice"
        assert done[0] == 0, f"region {r} is not encoded"
        assert done[-1] == pipe.passes - 1 or finish != "bitonic", f"region {r} is not decoded"  # else: the merge
    for i in range(pipe.passes):
        assert sorted(t.blocks[i]) == list(range(pipe.sorter.pass_blocks(i))), f"pass {i}: blocks not covered once"
    merges = [j for j, op in enumerate(t.ops) if op[1] == "merge"]
    assert [t.ops[j][2] for j in merges] == (regions if finish != "bitonic" else [])
    for j in merges:
        assert all(t.before(touched[r], j) for r in touched), "a merge may start before the last pass on a region"
    nodes = [j for j, op in enumerate(t.ops) if op[1] == "node"]
    assert sorted(t.ops[j][2] for j in nodes) == list(range(len(pipe.tree) - 1))
    assert len(nodes) == (max(len(regions), 2) - 2 if finish == "tree" else 0)  # L runs: L − 1 merges, the root
    for j in nodes:
        node = pipe.tree[t.ops[j][2]]
        covers = range(node.lo >> t.k, ((node.hi - 1) >> t.k) + 1)
        assert all(t.before(touched[r], j) for r in covers), "a tree merge may start before the last pass on its runs"
        assert not any(t.before(uploads[r], j) for r in range(covers.stop, len(regions))), \
            "a tree merge waits for the upload of a region it does not merge"
        for k in nodes:
            inner = pipe.tree[t.ops[k][2]]
            if inner.level < node.level and node.lo <= inner.lo and inner.hi <= node.hi:
                assert t.before(k, j), "a tree merge may start before the merge of one of its runs"
        assert all(t.before(j, m) for m in merges), "the root's merge may start before a tree merge below it"
    for r, lo in enumerate(regions):
        (down,) = t.find("d2h", lo)
        assert t.before(touched[r], down), f"region {r} may be downloaded before its last pass"
        if finish == "merge":
            assert t.before(t.find("merge", lo)[0], down), f"region {r} may be downloaded before its merge"
        assert not any(t.before(j, uploads[r]) for j, op in enumerate(t.ops) if op[1] == "pass"), \
            "an upload waits for a kernel"
    assert all(op[0] == "in" for op in t.ops if op[1] == "h2d")
    assert all(op[0] == "out" for op in t.ops if op[1] == "d2h")
    assert size * (len(regions) - 1) < n <= size * len(regions)
    if len(regions) >= lanes:  # every lane gets passes: region c's own run on lane c mod lanes
        assert {op[0] for op in t.ops if op[1] == "pass"} == set(pipe.lanes)
    if lanes > 1 and len(regions) > 1:
        last, prev = len(regions) - 1, len(regions) - 2
        passes = [(j, op[2][1]) for j, op in enumerate(t.ops) if op[1] == "pass"]
        first_own = min(j for j, on in passes if last in on)
        assert not any(t.before(j, first_own) for j, on in passes if prev in on and last not in on), \
            "the last region's first pass waits for a pass on the region before it"


def test_staged_pipeline_replays_what_it_captured(monkeypatch):
    """The capture path (fork the compute and copy-out streams from the copy-in stream, enqueue, join them back) with
    a stand-in graph that replays the captured calls; on a GPU the driver records them instead."""
    import impl.sort.pipeline as pipeline_module

    class Replay:
        def __init__(self, stream, enqueue, *, keep=(), relaxed=False):
            assert relaxed and stream is pipe.roles[0]
            self.enqueue, self.calls = enqueue, 0

        def __call__(self, stream=0):
            self.calls += 1
            self.enqueue()

    monkeypatch.setattr(pipeline_module, "StreamGraph", Replay)
    n = 2500
    pipe = HostSortPipeline(n, np.float32, config=EMU_CUDA_CONFIG, pipeline=PipelineConfig(chunks=4))
    pipe._capture(False, lambda: pipe._enqueue(False, None))
    assert pipe.graphed and pipe.graph_error is None
    for seed in range(2):
        x = make_array(n, "float32", "nasty", seed=seed)
        pipe.stage_in[:] = x
        got, ref = pipe.sort_staged(), sort_reference(x)
        assert ((got == ref) | (np.isnan(got) & np.isnan(ref))).all()
    assert pipe._graphs[False].calls == 2


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
def test_round_trip_brings_the_keys_back_unchanged(pinned):
    """The copies of ``sort_staged`` alone: every region up and back, bit for bit (NaN payloads, -0.0 included);
    an argsort pipeline (8-byte indices back) is refused."""
    n = 5000
    pipe = HostSortPipeline(n, np.float32, config=EMU_CUDA_CONFIG, pipeline=PipelineConfig(chunks=3, pinned=pinned))
    upload, uploads = pipe._upload, []

    def upload_then_poison(lo, hi, stream):  # the staging buffer is the output too: what comes back must be copied
        upload(lo, hi, stream)
        cuda.synchronize()
        pipe.stage_in[lo:hi] = np.float32(7.0)
        uploads.append((lo, hi))

    pipe._upload = upload_then_poison
    for seed in range(2):
        x = make_array(n, "float32", "nasty", seed=seed)
        pipe.stage_in[:] = x
        got = pipe.round_trip_staged()
        assert np.array_equal(host_bits(got), host_bits(x))
    assert uploads == pipe.chunk_bounds() * 2
    assert not pipe.round_trip_graphed  # the simulator launches one by one
    with pytest.raises(ValueError, match="keys-only"):
        HostSortPipeline(10, np.float32, argsort=True, config=EMU_CUDA_CONFIG).round_trip_staged()


@pytest.mark.gpu
@pytest.mark.parametrize("staged", [False, True], ids=["default", "staged"])
@pytest.mark.parametrize("argsort_", [False, True], ids=["keys", "argsort"])
def test_staged_pipeline_graph_replays_match_numpy(argsort_, staged):
    """sort_staged: first call launch by launch, later calls one graph replay; each on fresh keys, output poisoned."""
    n = 3_000_017
    pipe = HostSortPipeline(n, np.float32, argsort=argsort_, pipeline=STAGED if staged else PipelineConfig())
    for seed in range(3):
        x = make_array(n, "float32", "nasty", seed=seed)
        pipe.stage_in[:] = x
        if argsort_:
            pipe.stage_out[:] = -1
        assert pipe.graphed == (seed > 0)  # the first call captures the graph its successors replay
        got = pipe.sort_staged()
        assert pipe.graph_error is None and pipe.graphed
        if argsort_:
            assert np.array_equal(got, argsort_reference(x))
        else:
            ref = sort_reference(x)
            assert ((got == ref) | (np.isnan(got) & np.isnan(ref))).all()


def test_graph_replay_needs_a_gpu_and_says_so():
    from impl import backend

    if backend.ON_GPU:
        pytest.skip("on a GPU the graph is exercised by test_graph_replay_matches_direct_launches")
    sorter = BitonicSorter(10, np.float32)
    with pytest.raises(NotImplementedError, match="need a GPU"):
        SortGraph(sorter, cuda.to_device(np.zeros(10, np.float32)), cuda.device_array(10, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["shared", "global"])
@pytest.mark.parametrize("argsort_", [False, True], ids=["keys", "argsort"])
def test_graph_replay_matches_direct_launches(variant, argsort_):
    n = 3_000_017
    x = make_array(n, "float32", "nasty", seed=5)
    sorter = BitonicSorter(n, np.float32, argsort=argsort_, config=default_config(variant))
    d_x, d_out = cuda.to_device(x), cuda.device_array(n, dtype=sorter.out_dtype)
    graph = SortGraph(sorter, d_x, d_out)
    d_out.copy_to_device(np.zeros(n, dtype=sorter.out_dtype))
    graph()
    cuda.synchronize()
    got = d_out.copy_to_host()
    ref = argsort_reference(x) if argsort_ else sort_reference(x)
    same = got == ref if argsort_ else (got == ref) | (np.isnan(got) & np.isnan(ref))
    assert same.all()


@pytest.mark.gpu
def test_pipeline_at_full_size_on_gpu():
    n = 10_000_000
    x = make_array(n, "float32", "random", seed=9)
    for pc in (PipelineConfig(), PipelineConfig(finish="bitonic"), NAIVE):
        pipe = HostSortPipeline(n, np.float32, pipeline=pc)
        assert pipe.finish == pc.finish  # the CUDA C++ passes on a GPU: the merge finish applies
        assert np.array_equal(pipe(x), np.sort(x))
        assert np.array_equal(pipe(x, descending=True), np.sort(x)[::-1])


def test_experiments_smoke_runs_and_writes_nothing(tmp_path, monkeypatch):
    from impl.common import results
    from impl.sort import experiments, recipe

    written, runs = [], []
    monkeypatch.setattr(recipe, "write_result", lambda *a, **k: written.append(a))
    monkeypatch.setattr(experiments, "run", lambda **kw: runs.append(recipe.run(**kw)))
    assert experiments.main(["--smoke"]) == 0
    out = runs[0]
    assert set(out) == {"passes", "numba_tune", "transfers", "pipeline"} and written == []
    keys = out["passes"]["keys"]
    assert len(keys["passes"]) == len(BitonicSorter(300, np.float32).plan.passes)
    assert out["numba_tune"]["best"]["keys"] in {r["label"] for r in out["numba_tune"]["rows"]}
    assert not (results.RESULTS / "cpu" / "sort").exists()


def test_ncu_only_refuses_a_machine_without_a_gpu(capsys):
    from impl.sort import experiments

    assert experiments.main(["--ncu-only", "--smoke"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_ncu_csv_parsing():
    from impl.sort.recipe import parse_ncu_csv

    text = ('==PROF== Connected\n"ID","Process ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
            '"0","1","block_kernel","dram__bytes_read.sum","byte","40,000,000"\n'
            '"0","1","block_kernel","launch__registers_per_thread","register/thread","32"\n'
            '"1","1","block_kernel","dram__bytes_read.sum","byte","n/a"\n')
    rows = parse_ncu_csv(text)
    assert rows[0]["dram__bytes_read.sum"] == 40e6 and rows[0]["launch__registers_per_thread"] == 32
    assert rows[1]["dram__bytes_read.sum"] == "n/a"


def write_view(root, slug: str, benches: dict, results: dict | None = None, device: str = "NVIDIA H200"):
    """A results folder holding one stored GPU bench run (pytest-benchmark's format) and experiment results."""
    folder = root / slug
    (folder / "machine").mkdir(parents=True)
    entries = [{"name": name, "fullname": f"benches/bench_sort.py::{name}", "stats": {"median": b["median"]},
                "extra_info": {**b.get("extra_info", {}), "rounds_s": b.get("rounds", [])}}
               for name, b in benches.items()]
    run = {"commit_info": {"id": clean_commit()}, "datetime": "2026-11-28", "machine_info": {"gpu": device},
           "benchmarks": entries}
    (folder / "machine" / "0001_abc_x.json").write_text(json.dumps(run))
    for key, data in (results or {}).items():
        system, name = key.split("/")
        (folder / system).mkdir(exist_ok=True)
        record = {"data": data, "device": device, "commit": clean_commit(), "complete": True}
        (folder / system / f"{name}.json").write_text(json.dumps(record))
    return ResultsView(slug, root=root)


def _good_view(tmp_path):
    n = 10_000_000

    def b(median, **info):
        return {"median": median, "extra_info": info}

    keys = dict(n=n, dtype="float32", mode="keys")
    benches = {f"test_sort_bitonic[shared-keys-float32-{n}]": b(0.5e-3, variant="shared", **keys),
               f"test_sort_bitonic[shared-keys-float32-{10**6}]": b(0.06e-3, variant="shared", n=10**6,
                                                                     dtype="float32", mode="keys"),
               f"test_sort_bitonic[shared-kv-float32-{n}]": b(0.95e-3, variant="shared", n=n, dtype="float32",
                                                              mode="kv"),
               "test_sort_bitonic[shared-keys-float32-100000000]": b(6.5e-3, variant="shared", n=10**8,
                                                                     dtype="float32", mode="keys"),
               f"test_sort_bitonic[global-keys-float32-{n}]": b(9.9e-3, variant="global", **keys),
               f"test_sort_numpy[quicksort-float32-{n}]": b(83e-3, variant="numpy_quicksort", **keys),
               f"test_sort_cupy[keys-float32-{n}]": b(0.339e-3, variant="cupy", **keys),
               "test_sort_end_to_end[pinned_buffer]": b(1.9e-3, variant="e2e_pinned_buffer", **keys),
               "test_sort_h2d[pageable]": b(2.9e-3, variant="pageable"),
               "test_sort_h2d[pinned]": b(0.84e-3, variant="pinned")}
    passes = {"keys": {"passes": [{"kind": "tile", "pct_copy_bw": 76.0}, {"kind": "coset", "pct_copy_bw": 80.0}],
                       "total_ms": 0.5, "min_pct_copy_bw": 76.0}}
    return write_view(tmp_path, "h200-test", benches, {"sort/passes": passes})


def test_claims_evaluate_from_stored_benches_and_plots_draw(tmp_path):
    from impl.sort.claims import CLAIMS
    from impl.sort.plots import PLOTS

    view = _good_view(tmp_path)
    rows = {c.id: evaluate(c, view) for c in CLAIMS}
    assert rows["sort.time_10m_f32"]["measured_value"] == pytest.approx(0.5)
    assert rows["sort.speedup_vs_numpy"]["measured_value"] == pytest.approx(166)
    assert rows["sort.vs_cub"]["measured_value"] == pytest.approx(0.5 / 0.339, rel=1e-5)
    assert rows["sort.shared_vs_global"]["measured_value"] == pytest.approx(19.8)
    assert rows["sort.pinned_vs_pageable"]["measured_value"] == pytest.approx(2.9 / 0.84, rel=1e-5)
    assert rows["sort.slowest_pass_pct_copy"]["measured_value"] == pytest.approx(76)
    assert rows["sort.host_to_host_vs_numpy"]["measured_value"] == pytest.approx(83 / 1.9, rel=1e-5)
    assert {i: r["verdict"] for i, r in rows.items()} == {c.id: "pass" for c in CLAIMS}
    out = tmp_path / "png"
    out.mkdir()
    drawn = [p for plot in PLOTS for p in plot(view, out)]
    assert {p.name for p in drawn} == {"sort_time_vs_n.png", "sort_passes.png"}
    assert all(p.stat().st_size > 1000 for p in drawn)
    empty = ResultsView("nothing-here", root=tmp_path)
    assert [plot(empty, out) for plot in PLOTS] == [[], []]
    assert all(evaluate(c, empty)["verdict"] == "not measured" for c in CLAIMS)


def test_every_claim_has_a_failing_case_that_fails(tmp_path):
    """FAILING_CASES: stored results, written as one clean GPU run, on which each claim's verdict is "fail"."""
    from impl.sort.claims import CLAIMS, FAILING_CASES

    assert set(FAILING_CASES) == {c.id for c in CLAIMS}
    for i, claim in enumerate(CLAIMS):
        case = FAILING_CASES[claim.id]
        view = write_view(tmp_path / str(i), "h200-case", case.benches, case.results)
        row = evaluate(claim, view)
        assert row["verdict"] == "fail", f"{claim.id}: {row}"


def test_claim_statements_name_no_card():
    import re

    from impl.sort.claims import CLAIMS

    for c in CLAIMS:
        assert not re.search(r"\b(H100|H200|A100|L40S?|V100|RTX)\b", c.statement), c.statement


class RecordsView:
    """A ResultsView stand-in for sort's claim helpers: sort's records by name (None: not stored) and bench medians
    by name; a name the test did not give is a KeyError."""

    def __init__(self, records: dict, medians: dict | None = None):
        self.records, self.medians = records, medians or {}

    def result(self, system, name):
        assert system == "sort"
        return self.records[name]

    def bench(self, name):
        median = self.medians[name]
        return None if median is None else {"stats": {"median": median}}


def stored(key: str, value, date: str = "2026-12-03"):
    """A result record whose data holds ``{key: value}`` (value None: no record stored)."""
    return None if value is None else {"commit": "abc", "date": date, "data": {key: value}}


def test_host_to_host_claim_names_the_transfer_only_ceiling():
    """numpy's time over the staged pipeline's copies alone (its round trip in the bench's chunking) where
    sort/pipeline.json has it, else over the pinned 40 MB H2D + D2H copies; nothing where a record is missing."""
    from impl.sort.claims import N, NUMPY_QUICK, transfer_ceiling

    def View(rows, numpy_s, trips=None):
        return RecordsView({"transfers": stored("rows", rows), "pipeline": stored("rows", trips)},
                           {NUMPY_QUICK: numpy_s})

    rows = [{"memory": "pageable", "bytes": 4 * N, "h2d_ms": 3.0, "d2h_ms": 3.0},
            {"memory": "pinned", "bytes": 4 * N, "h2d_ms": 0.8, "d2h_ms": 0.8},
            {"memory": "pinned", "bytes": 4 * N // 10, "h2d_ms": 0.1, "d2h_ms": 0.1}]
    assert "= 40.0x" in transfer_ceiling(View(rows, 0.064), NUMPY_QUICK)
    assert transfer_ceiling(View(None, 0.064), NUMPY_QUICK) == ""
    assert transfer_ceiling(View(rows, None), NUMPY_QUICK) == ""
    assert transfer_ceiling(View(rows[:1], 0.064), NUMPY_QUICK) == ""
    trips = [{"n": N, "label": f"round_trip_chunks={c}", "round_trip": True, "chunks": c, "ms": ms}
             for c, ms in ((1, 2.0), (STAGED.chunks, 1.6))]
    trips.append({"n": N, "label": "staged_chunks=8", "chunks": 5, "ms": 1.0})  # a sort row, not a round trip
    text = transfer_ceiling(View(rows, 0.064, trips), NUMPY_QUICK)
    assert "round-trip ceiling" in text and "= 40.0x" in text and "1.600 ms" in text
    assert "round-trip" not in transfer_ceiling(View(rows, 0.064, trips[::2]), NUMPY_QUICK)  # not the bench's chunks
    assert transfer_ceiling(View(None, None, trips), NUMPY_QUICK) == ""


def test_slowest_pass_claim_names_the_tunes_bandwidth_plan():
    """Beside the slowest pass: the fastest 10M keys plan of the tune whose every pass clears the target, against the
    fastest plan; argsort rows, other sizes and rows without per-pass figures never count; where no plan clears it,
    the closest one is named; nothing without the record."""
    from impl.sort.claims import N, bandwidth_plan

    def View(rows):
        return RecordsView({"tune": stored("rows", rows, "2026-12-07")})

    def row(label, ms, slowest, n=N, argsort=False, passes=21):
        return {"label": f"{'argsort' if argsort else 'keys'} {label}", "n": n, "argsort": argsort,
                "launch": "graph", "ms": ms, "passes": passes, "slowest_pass_pct": slowest}

    rows = [row("fast", 0.40, 20.7), row("s5", 0.46, 88.0, passes=29), row("s6", 0.45, 74.9),
            row("kv", 0.30, 95.0, argsort=True), row("small", 0.05, 99.0, n=1_000_000),
            {**row("direct", 0.39, 80.0), "launch": "direct"}]
    text = bandwidth_plan(View(rows))
    assert "every pass >= 75%: s5 (29 passes, slowest 88.0%) at 0.460 ms" in text
    assert "against 0.400 ms for the fastest, fast (slowest pass 20.7%)" in text and "abc 2026-12-07" in text
    text = bandwidth_plan(View(rows[:1] + rows[2:]))
    assert "no 10M plan the tune timed keeps every pass >= 75% (closest: s6, slowest pass 74.9%" in text
    assert bandwidth_plan(View(None)) == "" and bandwidth_plan(View(rows[3:5])) == ""


def test_slowest_pass_claim_names_its_alu_ceiling():
    """The slowest pass's min/max instructions (steps x n / 32 warp-instructions) at the ALU pipe's peak rate from
    ncu bound its share of copy bandwidth; nothing where a record, a kernel or a metric is missing."""
    from impl.sort.claims import alu_ceiling

    def View(rows, kernels):
        return RecordsView({"passes": stored("keys", None if rows is None else {"passes": rows}),
                            "ncu": stored("kernels", kernels, "2026-12-05")})

    rows = [{"kind": "coset", "steps": 8, "ms": 0.025, "pct_copy_bw": 77.0},
            {"kind": "tile", "steps": 91, "ms": 0.094, "pct_copy_bw": 20.0}]
    alu = {"sm__inst_executed_pipe_alu.sum": 36.6e6, "gpu__time_duration.sum": 94000.0,
           "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active": 85.0}
    quiet = {**alu, "sm__inst_executed_pipe_alu.sum": 9e6}
    text = alu_ceiling(View(rows, [quiet, alu]))
    # min/max 91 x 1e7 / 32 = 28.4M; 0.094 ms x 0.85 x 28.4/36.6 = 62 us; 20% x 94 / 62 = 30%
    assert "pass 1 (tile, 91 network steps)" in text and "28.4M of its 36.6M" in text
    assert ">= 62 us" in text and "at most 30% of copy" in text
    assert alu_ceiling(View(rows, None)) == "" and alu_ceiling(View(None, [quiet, alu])) == ""
    assert alu_ceiling(View(rows, [alu])) == ""  # the profile does not cover every pass
    assert alu_ceiling(View(rows, [quiet, {"gpu__time_duration.sum": 94000.0}])) == ""  # an older profile
