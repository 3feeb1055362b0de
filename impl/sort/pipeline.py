"""Host-to-host sort: pinned staging, copies in aligned regions overlapped with every pass that the arrived regions
allow.

    out = sort(x) for a host numpy array x (or argsort(x)), through the device. The input is cut into aligned regions
    of 2^k slots (k: the smallest with at most ``chunks`` regions, at least one tile). Every block of pass i lies in
    one aligned group of 2^span_bits(i) slots, so pass i runs on a region (span within it) or on the group of regions
    it fills as soon as all of them have arrived and run the
    passes before it (``steps()``). Streams by role, so that copies in one direction queue behind each other and
    never behind a kernel (and with ``lanes`` > 1, a region's passes need not queue behind passes on others):
      copy-in stream:  for each region c: (x[c] -> pinned[c] on the host) ; pinned[c] -> dev[c] ; event arrived[c]
      compute lanes:   for each region c: wait arrived[c] ; every pass now possible on c and on the groups it
                       completes ; after the last region: region 0 to its end (event sorted[0]), then region 1, ...
                       A pass runs on lane (its last region mod ``lanes``) after the last pass on each of its
                       regions (an event where that pass ran on another lane); with two lanes or more, region c's
                       own passes start on arrival while the merges of the regions before it still run.
      copy-out stream: for each region c as it is sorted: wait sorted[c] ; dev_out[c] -> pinned[c] ; event done[c]
      host:            for each region c in that order: wait done[c] ; (pinned[c] -> out[c])

Finish. The network's stages wider than a region can start only once every region they span has arrived, and its
last stage spans all 2^LOGN slots: after the last upload it runs over every key before any region is sorted.
Keys-only pipelines on the CUDA C++ passes stop the network earlier instead and finish with device merges
(``impl.sort.merge``), between the sorter's workspace and a scratch (the input's device buffer, free once its keys are
encoded): the passes leave sorted runs of 2^r slots, still encoded (``merge_plan``), and a tree of merges
(``merge_tree``) combines them pairwise level by level, each merge as soon as both of its runs are sorted; the root's
merge writes output region c — "sorted[c]" above — and decodes it, region 0 first, so the first download waits for
one region's merge, not for a pass over all keys. ``finish="merge"``: r = LOGN − 1, two halves and the root alone;
``finish="tree"``: r = the region bits, every region a run as it arrives (a merge moves its keys once where the stages
it replaces take about two passes each, but its merges are slower per key than the passes: an H200 sorted 10M keys
in 8 chunks in 1.681 ms with the halves, 1.732 ms with the tree, 1.805 ms with the bitonic finish, round trip 1.565;
results/h200/sort/pipeline.json). For 10M keys in five regions of 2^21 slots (``STAGED``), the first half's regions
run their stages 22 and 23 while region 4 (the second half, 1.6M keys) uploads; after the last upload, region 4's own
passes, the root's diagonals and region 0's merge stand before the first download, which then overlaps the rest.
Argsorts and numba's passes keep the bitonic finish.
``sort_staged()`` sorts keys already held in the pinned buffer ``stage_in`` into ``stage_out`` (no host copies: the
figure the host-to-host target is about); on a GPU its second and later calls replay the whole schedule as one CUDA
graph (one launch instead of one host call per copy, pass and event, each 20-40 µs of host time, which otherwise
leaves the copy engines waiting for the host). ``round_trip_staged()`` makes the same copies with no pass between
them, every download waiting for the last upload as a sort's must: the floor of ``sort_staged`` on that machine.
``pipe(x)`` adds the copies from and to ordinary numpy arrays, region by region, launched one by one so that the
host copies overlap the device's work. With ``pinned=False`` the staging buffer is ordinary (pageable) memory,
copies are synchronous and nothing overlaps: the naive baseline of the pinned-vs-pageable comparison. Buffers,
streams and graphs are made once per (n, dtype).

The passes are the CUDA C++ ones (``impl.sort.cuda_sort``) or numba's, as ``config`` selects (``impl.sort.bitonic``);
both sorters expose ``launch_pass(i, src, out, descending=, stream=, first_block=, blocks=)``, ``span_bits(i)``,
``block_bits(i)`` and ``pass_blocks(i)``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import impl  # noqa: F401  (backend before numba)
import numpy as np
from numba import config as numba_config
from numba import cuda

from impl.sort import choose
from impl.sort.bitonic import BitonicSorter, StreamGraph, make_sorter, uses_cuda_cpp, validate
from impl.sort.cuda_sort import slot_mode
from impl.sort.keys import key_format
from impl.sort.merge import default_merge_config, device_view, launch_merge, launch_partition, partition_slots
from impl.sort.plan import CudaSortConfig, block_range, padded_bits


FINISHES = ("merge", "tree", "bitonic")


@dataclass(frozen=True)
class PipelineConfig:
    chunks: int = 4        # at most this many aligned regions, each copied and locally sorted on its own
    streams: int = 3       # distinct streams for the roles copy-in, compute, copy-out (1: all in order on one)
    pinned: bool = True    # page-locked staging (async copies); False: pageable, synchronous, no overlap
    graph: bool = True     # sort_staged replays the schedule as one CUDA graph where a GPU allows it
    early: bool = True     # merge regions as soon as they arrive; False: a pass wider than a region waits for all
    lanes: int = 1         # compute streams (with streams=3): with 2+, a region's passes need not wait for another
                           # region's merges (no faster on an H100 at 10M keys in 8 chunks: the passes share the SMs)
    finish: str = "merge"  # "merge": passes up to two sorted halves, then their merge per output region; "tree":
                           # passes up to sorted regions, then a tree of merges (the slower: module doc); "bitonic":
                           # the network's wide stages (argsorts, numba's passes and n under two tiles always)

    def __post_init__(self) -> None:
        if self.chunks < 1 or not 1 <= self.streams <= 3 or not 1 <= self.lanes <= 8:
            raise ValueError(f"chunks must be >= 1, streams 1..3 and lanes 1..8, got {self.chunks}, {self.streams} "
                             f"and {self.lanes}")
        if self.finish not in FINISHES:
            raise ValueError(f"finish must be one of {FINISHES}, got {self.finish!r}")


NAIVE = PipelineConfig(chunks=1, streams=1, pinned=False, graph=False)
# Keys held in the pinned buffer (``sort_staged``): the graph replay costs no host time per launch, so more, smaller
# regions pay (``pipe(x)`` launches one by one: each extra launch costs host time, hence 4 there by default)
STAGED = PipelineConfig(chunks=8)


class HostSortPipeline:
    """``pipe(x)`` sorts (or argsorts) a host array of n keys of ``dtype``; see the module doc for the schedule.

    x may be in either byte order (the staging copy converts it); ``dtype`` itself must be native."""

    def __init__(self, n: int, dtype, *, argsort: bool = False, config=None,
                 pipeline: PipelineConfig = PipelineConfig()) -> None:
        self.fmt = key_format(dtype)
        runs = None
        if pipeline.finish != "bitonic":
            chunks = pipeline.chunks if pipeline.finish == "tree" else 1
            config, runs = merge_plan(int(n), self.fmt.dtype, argsort, config, chunks)
        self.sorter = make_sorter(n, self.fmt.dtype, argsort=argsort, config=config, runs=runs)
        self.finish = "bitonic" if runs is None else pipeline.finish
        if isinstance(self.sorter, BitonicSorter) and self.sorter.config.variant != "shared":
            raise ValueError("the host pipeline chunks the tile passes, so it needs the shared variant")
        self.passes = len(self.sorter.plan.passes)
        self.n, self.pipeline = int(n), pipeline
        alloc = cuda.pinned_array if pipeline.pinned else np.empty
        size = max(self.n, 1)
        self.stage_in = alloc(size, dtype=self.fmt.dtype)
        same = self.sorter.out_dtype == self.fmt.dtype
        self.stage_out = self.stage_in if same else alloc(size, dtype=self.sorter.out_dtype)
        self.d_src = cuda.device_array(size, dtype=self.fmt.dtype)
        self.d_out = cuda.device_array(size, dtype=self.sorter.out_dtype)
        if pipeline.pinned:
            made = [cuda.stream() for _ in range(pipeline.streams)]
            self.roles = tuple(made[min(r, len(made) - 1)] for r in range(3))
            extra = pipeline.lanes - 1 if pipeline.streams == 3 else 0
            self.lanes = (self.roles[1], *(cuda.stream() for _ in range(extra)))  # compute streams
        else:
            self.roles, self.lanes = (0, 0, 0), (0,)
        self.tree = merge_tree(self.n, runs) if runs is not None else []
        if runs is not None:  # the merges read the sorter's encoded workspace and a scratch, the root writes raw bits
            self.merge_config = default_merge_config()
            key_dtype = np.dtype(self.sorter.keys.dtype)
            scratch = (self.d_src.view(key_dtype) if key_dtype.itemsize == self.fmt.dtype.itemsize
                       else cuda.device_array(size, dtype=key_dtype))  # the input's slots are free once encoded
            self._merge_bufs = (device_view(self.sorter.keys), scratch)
            self._merge_out = self.d_out.view(self.fmt.bits_dtype)
            self._merge_diags = [cuda.device_array(partition_slots(m.hi - m.lo, self.merge_config), dtype=np.int64)
                                 for m in self.tree]
        self._graphs: dict[bool | str, StreamGraph] = {}  # sort_staged's per direction, "round_trip"
        self.graph_error: str | None = None  # why sort_staged launches one by one on a GPU, if capture failed

    @property
    def region_bits(self) -> int:
        """k: regions of 2^k slots, the fewest bits giving at most ``chunks`` regions, never less than pass 0's span."""
        return region_bits_for(self.n, self.pipeline.chunks, self.sorter.span_bits(0))

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """[lo, hi) of each region in upload order (aligned to 2^region_bits, so to tiles; the last may be partial)."""
        size = 1 << self.region_bits
        return [(lo, min(lo + size, self.n)) for lo in range(0, self.n, size)]

    def steps(self) -> list[tuple]:
        """The compute stream's order: ("arrive", c) waits for region c's upload, ("pass", i, c0, c1) runs pass i on
        regions c0..c1-1 (one region, or the aligned group of 2^span_bits(i) slots they fill), ("done", c) lets
        region c's download start.

        A pass runs on a group as soon as every region of the group has arrived and run the passes before it, so
        the merges of the early regions overlap the later uploads. Arrived neighbours at the same pass share one
        launch, except that after the last upload the first unfinished region runs alone, carried to its end first
        (its download then overlaps the rest). With a merge finish, ("node", j) runs tree merge j (``self.tree``;
        not the root) as soon as the regions of its runs have run every pass and the merges below it are enqueued,
        and ("merge", c) writes output region c (the root's merge) once every region has run every pass, and region
        c's download follows it."""
        regions, count = self.chunk_bounds(), self.passes
        done = [0] * len(regions)
        arrived, out = 0, []

        def group(i: int, c: int) -> range:
            s = self.sorter.span_bits(i)
            if s <= self.region_bits:
                return range(c, c + 1)
            if not self.pipeline.early:
                return range(len(regions))
            members = [d for d, (lo, _) in enumerate(regions) if lo >> s == regions[c][0] >> s]
            return range(members[0], members[-1] + 1)

        def advance() -> bool:
            for c in range(arrived):
                if done[c] == count:
                    continue
                i, members = done[c], group(done[c], c)
                if members.stop > arrived or any(done[d] != i for d in members):
                    continue
                first = next(d for d, v in enumerate(done) if v < count)
                if len(members) == 1 and (arrived < len(regions) or c > first):  # neighbours at pass i: one launch
                    while members.stop < arrived and done[members.stop] == i and len(group(i, members.stop)) == 1:
                        members = range(c, members.stop + 1)
                out.append(("pass", i, members.start, members.stop))
                for d in members:
                    done[d] += 1
                    if done[d] == count and not merge:
                        out.append(("done", d))
                return True
            return False

        merge = self.finish != "bitonic"
        waiting = list(range(len(self.tree) - 1))  # tree merges not yet enqueued (the root's come last)
        for c in range(len(regions)):
            out.append(("arrive", c))
            arrived = c + 1
            if not count:
                out.append(("done", c))
            while advance():
                pass
            for j in list(waiting):  # bottom-up: a merge after those of its runs, once its regions ran every pass
                node = self.tree[j]
                if all(done[d] == count for d in self._node_regions(node)) and not any(
                        self.tree[w].lo >= node.lo and self.tree[w].hi <= node.hi for w in waiting if w < j):
                    out.append(("node", j))
                    waiting.remove(j)
        if merge:
            for c in range(len(regions)):
                out += [("merge", c), ("done", c)]
        return out

    def _node_regions(self, node: MergeNode) -> range:
        """The regions holding the slots of a tree node."""
        return range(node.lo >> self.region_bits, ((node.hi - 1) >> self.region_bits) + 1)

    def exposed(self) -> tuple[int, int]:
        """(pass launches enqueued before the last upload arrives, those after it and before the first download)."""
        steps = self.steps()
        if not steps:
            return 0, 0
        last = max(j for j, st in enumerate(steps) if st[0] == "arrive")
        first = min(j for j, st in enumerate(steps) if st[0] == "done")
        launches = [j for j, st in enumerate(steps) if st[0] in ("pass", "node", "merge")]
        return sum(j < last for j in launches), sum(last < j < first for j in launches)

    @property
    def round_trip_graphed(self) -> bool:
        """Whether ``round_trip_staged`` replays a captured graph (after its first call)."""
        return "round_trip" in self._graphs

    @property
    def graphed(self) -> bool:
        """Whether ``sort_staged`` replays a captured graph (after its first call) rather than launching one by one."""
        return any(isinstance(key, bool) for key in self._graphs)

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None, *, descending: bool = False) -> np.ndarray:
        """Sort host array ``x`` into ``out`` (a new array by default), staging through the pinned buffers."""
        validate(x)
        if not isinstance(x, np.ndarray) or x.shape[0] != self.n or x.dtype.newbyteorder("=") != self.fmt.dtype:
            raise ValueError(f"this pipeline sorts host arrays of {self.n} {self.fmt.dtype}, got "
                             f"{type(x).__name__} {getattr(x, 'shape', None)} {getattr(x, 'dtype', None)}")
        out = np.empty(self.n, dtype=self.sorter.out_dtype) if out is None else out
        if self.n == 0:
            return out
        for (lo, hi), event in self._enqueue(descending, x):
            if event is not None:
                event.synchronize()
            out[lo:hi] = self.stage_out[lo:hi]
        return out

    def sort_staged(self, *, descending: bool = False) -> np.ndarray:
        """Sort the n keys held in ``stage_in`` into ``stage_out`` (the same buffer for keys-only) and return it.

        The first call per direction launches the schedule one by one (loading every kernel) and then captures it
        as a graph, which later calls replay; where capture is not possible, ``graph_error`` says why."""
        if not self.n:
            return self.stage_out[:0]
        self._run_staged(descending, lambda: [event for _, event in self._enqueue(descending, None)])
        return self.stage_out[: self.n]

    def round_trip_staged(self) -> np.ndarray:
        """Copy the n keys of ``stage_in`` to the device and back into ``stage_out``, region by region on the same
        streams as ``sort_staged`` and replayed as a graph likewise, with no pass in between: every download waits
        for the last upload, as a sort's must (no key can be written back before all have arrived). Its time is the
        floor of ``sort_staged``'s on this machine. Keys-only pipelines (an argsort writes 8-byte indices back)."""
        if self.sorter.out_dtype != self.fmt.dtype:
            raise ValueError("round_trip_staged copies the keys back: it needs a keys-only pipeline, not an argsort")
        if not self.n:
            return self.stage_out[:0]
        self._run_staged("round_trip", self._enqueue_round_trip)
        return self.stage_out[: self.n]

    def _run_staged(self, key: bool | str, work: Callable[[], list]) -> None:
        """Replay the graph captured for ``key``; else enqueue ``work()`` (which returns the events to wait for,
        None for a synchronous copy), wait, and capture it as that graph where a GPU allows."""
        graph = self._graphs.get(key)
        if graph is not None:
            graph(self.roles[0])
            self.roles[0].synchronize()
            return
        for event in work():
            if event is not None:
                event.synchronize()
        if not self.pipeline.pinned:
            cuda.synchronize()
        elif self.pipeline.graph and self.graph_error is None and not numba_config.ENABLE_CUDASIM:
            self._capture(key, work)

    def _capture(self, key: bool | str, work: Callable[[], object]) -> None:
        """``work()`` captured as the graph of ``key`` from the copy-in stream (the other roles forked from it and
        joined back); where capture fails, ``graph_error`` says why."""
        origin = self.roles[0]
        others = [s for s in dict.fromkeys((*self.roles[1:], *self.lanes[1:])) if s is not origin]

        def enqueue() -> None:
            fork = _record(origin)
            for s in others:
                fork.wait(s)
            work()
            for s in others:
                _record(s).wait(origin)

        cuda.synchronize()
        try:
            self._graphs[key] = StreamGraph(origin, enqueue, relaxed=True,
                                            keep=(self.sorter, self.d_src, self.d_out, self.stage_in, self.stage_out))
        except Exception as e:  # e.g. a driver without stream capture: stay on the launch-by-launch schedule
            self.graph_error = f"{type(e).__name__}: {e}"
        cuda.synchronize()

    def _enqueue(self, descending: bool, x: np.ndarray | None) -> list:
        """Enqueue ``steps()`` on the role streams and compute lanes; ((lo, hi), download event or None) per region,
        in the order the downloads were enqueued."""
        copy_in, _, copy_out = self.roles
        pinned = self.pipeline.pinned
        regions = self.chunk_bounds()
        last: dict[int, tuple] = {}  # region -> (stream, event) of the last copy or pass on it
        done = []
        for step in self.steps():
            if step[0] == "arrive":
                lo, hi = regions[step[1]]
                if x is not None:
                    self.stage_in[lo:hi] = x[lo:hi]
                self._upload(lo, hi, copy_in)
                if pinned:
                    last[step[1]] = (copy_in, _record(copy_in))
            elif step[0] == "pass":
                _, i, c0, c1 = step
                self._on_lane(range(c0, c1), last, lambda s: self._group_pass(i, s, regions, c0, c1, descending))
            elif step[0] == "node":
                node = self.tree[step[1]]
                self._on_lane(self._node_regions(node), last,
                              lambda s: self._node(node, self._merge_diags[step[1]], s))
            elif step[0] == "merge":
                lo, hi = regions[step[1]]
                self._on_lane(range(len(regions)), last, lambda s: self._merge(lo, hi, s, descending),
                              records=[step[1]])
            else:
                lo, hi = regions[step[1]]
                if pinned:
                    self._wait_for([step[1]], last, copy_out)
                self._download(lo, hi, copy_out)
                done.append(((lo, hi), _record(copy_out) if pinned else None))  # pageable copies are synchronous
        return done

    def _on_lane(self, members: range, last: dict, launch: Callable, records=None) -> None:
        """``launch(lane)`` on the compute lane of the last region of ``members``, after the last copy or pass on
        each of them (pinned staging); its event becomes the last work on ``records`` (default: ``members``)."""
        lane = self.lanes[(members.stop - 1) % len(self.lanes)]
        if self.pipeline.pinned:
            self._wait_for(members, last, lane)
        launch(lane)
        if self.pipeline.pinned:
            ran = (lane, _record(lane))
            last.update((c, ran) for c in (members if records is None else records))

    @staticmethod
    def _wait_for(members, last: dict, stream) -> None:
        """Make ``stream`` wait for the last copy or pass on each region of ``members`` (one wait per event; none for
        work already ahead of it on ``stream`` itself)."""
        events = {id(ev): ev for c in members for s, ev in [last[c]] if s is not stream}
        for event in events.values():
            event.wait(stream)

    def _enqueue_round_trip(self) -> list:
        """Every region's upload on the copy-in stream, then every region's download (of the uploaded keys) on the
        copy-out stream after the last upload; the events to wait for (none where copies are synchronous)."""
        copy_in, _, copy_out = self.roles
        pinned, regions = self.pipeline.pinned, self.chunk_bounds()
        for lo, hi in regions:
            self._upload(lo, hi, copy_in)
        if pinned:
            _record(copy_in).wait(copy_out)
        for lo, hi in regions:
            self._download(lo, hi, copy_out, self.d_src)
        return [_record(copy_out)] if pinned else []

    def _upload(self, lo: int, hi: int, stream) -> None:
        self.d_src[lo:hi].copy_to_device(self.stage_in[lo:hi], stream=stream)

    def _download(self, lo: int, hi: int, stream, src=None) -> None:
        """Region [lo, hi) of ``src`` (default: the sorted output) into ``stage_out``."""
        (self.d_out if src is None else src)[lo:hi].copy_to_host(self.stage_out[lo:hi], stream=stream)

    def _merge(self, lo: int, hi: int, stream, descending: bool) -> None:
        """The root merge's launches for output region [lo, hi): its two sorted runs merged into the output, decoded
        (``impl.sort.merge``), after the diagonals of every block (with the first region)."""
        root = self.tree[-1]
        a, b = self._runs(root)
        if lo == 0:
            launch_partition(a, root.mid, b, root.hi - root.mid, self._merge_diags[-1], stream=stream,
                             config=self.merge_config)
        launch_merge(a, root.mid, b, root.hi - root.mid, self._merge_diags[-1], self._merge_out,
                     self.fmt.params(descending=descending, canon_zero=False), lo=lo, hi=hi, stream=stream,
                     config=self.merge_config)

    def _node(self, node: MergeNode, diags, stream) -> None:
        """A tree level's merge: runs [lo, mid) and [mid, hi) into [lo, hi) of the other buffer, still encoded (the
        buffer-0 run copied to buffer 1 first where ``node.copy``)."""
        bufs = self._merge_bufs
        if node.copy:
            lo, hi = (node.lo, node.mid) if node.copy == "a" else (node.mid, node.hi)
            bufs[1][lo:hi].copy_to_device(bufs[0][lo:hi], stream=stream)
        a, b = self._runs(node)
        launch_partition(a, node.mid - node.lo, b, node.hi - node.mid, diags, stream=stream, config=self.merge_config)
        launch_merge(a, node.mid - node.lo, b, node.hi - node.mid, diags, bufs[node.out_buf][node.lo:node.hi], None,
                     stream=stream, config=self.merge_config)

    def _runs(self, node: MergeNode) -> tuple:
        """Views of a node's two input runs in their buffers."""
        bufs = self._merge_bufs
        return bufs[node.a_buf][node.lo:node.mid], bufs[node.b_buf][node.mid:node.hi]

    def _group_pass(self, i: int, stream, regions: list, c0: int, c1: int, descending: bool) -> None:
        """Pass ``i`` on the blocks of regions c0..c1-1 (neighbours, each holding whole groups of 2^span_bits(i)
        slots, or the regions filling one such group): block b of the pass lies in the aligned block of 2^k slots
        number b >> (k - block_bits(i)) for any k >= span_bits(i)."""
        if c0 == 0 and c1 == len(regions):
            self.sorter.launch_pass(i, self.d_src, self.d_out, descending=descending, stream=stream)
            return
        bits = max(self.region_bits, self.sorter.span_bits(i))
        first, last = block_range(regions[c0][0] >> bits << bits, (regions[c1 - 1][0] >> bits) + 1 << bits,
                                  self.sorter.block_bits(i), self.sorter.pass_blocks(i))
        if last > first:
            self.sorter.launch_pass(i, self.d_src, self.d_out, descending=descending, stream=stream,
                                    first_block=first, blocks=last - first)


def merge_plan(n: int, dtype, argsort: bool, config, chunks: int) -> tuple:
    """(config, sorted-run bits) of the merge finish: the CUDA C++ config (``choose``'s where none is given) and the
    bits r of the runs its passes leave — the regions' bits (``region_bits_for``), at most padded bits − 1 — where it
    applies: keys-only, the CUDA C++ passes, runs of at least a tile; elsewhere (``config``, None): the bitonic
    finish."""
    if argsort or not uses_cuda_cpp(config) or n < 2:
        return config, None
    mode = slot_mode(key_format(dtype), argsort)
    cfg = config if isinstance(config, CudaSortConfig) else choose.config_for(n, mode)
    tile = cfg.shape(mode)[0]
    runs = min(region_bits_for(n, chunks, tile), padded_bits(n) - 1)
    return (cfg, runs) if runs >= tile else (config, None)


def region_bits_for(n: int, chunks: int, least: int) -> int:
    """k: regions of 2^k slots, the fewest bits giving at most ``chunks`` regions of n keys, never less than
    ``least`` (the first pass's span)."""
    per = -(-n // chunks) if n else 1
    return max(least, (per - 1).bit_length())


@dataclass(frozen=True)
class MergeNode:
    """One merge of the finish's tree: runs [lo, mid) and [mid, hi) of slots (sorted, encoded, in buffers ``a_buf``
    and ``b_buf``: 0 the sorter's workspace, 1 the scratch) into [lo, hi) of buffer ``out_buf`` (−1 for the root:
    the output, decoded). ``copy``: "a" or "b", the input run first copied from buffer 0 to buffer 1 (its sibling
    sits there, and the output may overlap neither); "" none."""

    level: int
    lo: int
    mid: int
    hi: int
    a_buf: int
    b_buf: int
    out_buf: int
    copy: str = ""


def merge_tree(n: int, runs: int) -> list[MergeNode]:
    """The merges that turn the aligned sorted runs of 2^runs slots of [0, n) into one, bottom-up, the root last.

    Level h merges the runs of 2^(runs+h−1) slots pairwise into runs of 2^(runs+h); a run with no right neighbour
    moves up unmerged (it stays where it is). Every run starts in buffer 0 (the passes sort in place); a merge writes
    to the other buffer than its inputs', so that no launch reads what it writes (two inputs in different buffers:
    the one in buffer 0 is first copied to buffer 1, see ``MergeNode.copy``). The root writes the output."""
    where = {lo: 0 for lo in range(0, n, 1 << runs)}  # run start -> its buffer, at the current level
    nodes: list[MergeNode] = []
    level, size = 0, 1 << runs
    while len(where) > 1:
        level, size = level + 1, size * 2
        nxt = {}
        for lo in range(0, n, size):
            mid = lo + size // 2
            if mid >= n:
                nxt[lo] = where[lo]
                continue
            a, b = where[lo], where[mid]
            root = size >= n
            copy = "" if a == b or root else ("a" if a == 0 else "b")
            if copy:
                a = b = 1
            out = -1 if root else 1 - a
            nodes.append(MergeNode(level, lo, mid, min(lo + size, n), a, b, out, copy))
            nxt[lo] = out
        where = nxt
    return nodes


def _record(stream):
    event = cuda.event() if numba_config.ENABLE_CUDASIM else cuda.event(timing=False)  # the simulator takes no flag
    event.record(stream)
    return event
