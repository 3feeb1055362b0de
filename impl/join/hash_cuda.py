"""The hash join's CUDA C++ kernels (``hash_join.cu``) launched through CuPy RawModule.

Why C++ here: at 1M x 1M the whole join is tens of µs of device work, and a numba-cuda launch costs ~18 µs of host
time; CuPy launches cost a few µs, and the fused scheme needs a cooperative launch. Table, phases and host protocol are
``hash_table``'s (``hash_numba`` is the CPU twin, run by the same tests); on CPU machines the .cu source is also
compiled by nvcc/NVRTC for sm_90 and run as-is under a thin CUDA emulation (``hash_join_emulated.cpp``, g++).

Per join (``config.scheme``):
  fused     one cooperative launch (build | grid barrier | count | barrier + scan | write), grid = resident blocks;
  split     build, count (+ last-block scan), write: three launches;
  linear64  (int32 keys; int64 keys too with ``linear_wide``, else split) lbuild, then lprobe, which counts and writes
            in one pass (blocks reserve their output ranges with one atomic add each): two launches, ``lrows`` rows
            per thread in flight, grid-stride loops;
  linear64-fused  the same in one cooperative launch (lbuild | grid barrier | lprobe), grid = resident blocks;
  linear64 with ``chains`` (int32 keys)  the same launches, compiled with JOIN_CHAINS=1 and given a chain array from
            the workspace: duplicate build keys' rows on one slot's list, so a many-to-many probe finds its key's
            one slot, counts from the list's length and writes by walking the list;
  linear64 with ``slices`` > 1  lbuild and lprobe of table slice 0, then of slice 1, ... (slices of at most half
            the L2: ``slice_count``): 2 per slice, and with ``scatter`` pcount and pscatter first;
  partitioned  pcount (both sides' partition histograms; the last block scans them into partition starts),
            pscatter (both sides' (key, row id) pairs into their partitions), pjoin (one block per work item: a
            partition's build rows in a shared-memory table, at most ``part_probe`` of its probe rows streamed
            through it, pairs written as in lprobe): three launches; the partitioned buffers, counts, starts and
            cursors live in the workspace.
All write into speculative outputs of n_probe pairs; the kernel that scans the tile totals writes the total into a
mapped pinned host word (``readback="pinned"``), on which the host spins (the one sync); a total above n_probe
re-runs the write exact-size (one more launch, no more syncs; partitioned: pjoin alone). The epoch-tagged table needs
no clear per join (``hash_table``).

cupy is not installed on CPU machines: everything here then reports ``unavailable_reason()`` and the tests skip.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import impl  # noqa: F401
import torch

from impl import backend
from impl.common.rawkernel import launch as _launch
from impl.common.timing import sm_count
from impl.join.hash_table import (BARRIER_TIMEOUT_NS, ERRORS, PART_BITS_MAX, PART_PAD, WHOLE_TABLE, Built,
                                  HashConfig, HashJoinBase, Parts, Probed)

SOURCE = Path(__file__).with_name("hash_join.cu")
KEY_SUFFIXES = ("i32", "i64")
ROW_SUFFIXES = ("i32_r32", "i32_r64", "i64_r32", "i64_r64")
KEY_KINDS = ("build", "count", "lbuild", "pcount")  # kernels compiled per key dtype only
KERNEL_NAMES = tuple([f"join_{k}_{s}" for k in ("build", "count") for s in KEY_SUFFIXES]
                     + [f"join_{k}_{s}" for k in ("write", "fused") for s in ROW_SUFFIXES]
                     + [f"join_lbuild_{s}" for s in KEY_SUFFIXES]
                     + [f"join_{k}_{s}" for k in ("lprobe", "lfused") for s in ROW_SUFFIXES]
                     + [f"join_pcount_{s}" for s in KEY_SUFFIXES]
                     + [f"join_{k}_{s}" for k in ("pscatter", "pjoin") for s in ROW_SUFFIXES])
MAX_GRID = 65535
PCOUNT_BLOCKS_PER_SM = 4  # pcount's grid: every block adds its histograms with up to 2 * P atomics, so few blocks

try:
    import cupy
except ImportError as _e:  # CPU machines: the numba twin and the C++ emulation cover the algorithm there
    cupy = None
    _CUPY_ERROR = f"cupy is not installed ({_e}); the CUDA C++ hash join needs it (the GPU machine has cupy 14.2)"
else:
    _CUPY_ERROR = None


def unavailable_reason() -> str | None:
    """Why the C++ join cannot run here, or None when it can."""
    if _CUPY_ERROR:
        return _CUPY_ERROR
    if backend.DEVICE != "cuda":
        return backend.NO_GPU_REASON
    return None


def compile_options(config: HashConfig) -> tuple[str, ...]:
    return ("-std=c++17", f"-DJOIN_THREADS={config.threads}", f"-DJOIN_ITEMS={config.items}",
            f"-DBUCKET_BYTES={config.bucket_bytes}", f"-DJOIN_MIN_BLOCKS={config.min_blocks}",
            f"-DJOIN_RECONVERGE={int(config.reconverge)}", f"-DJOIN_LROWS={config.lrows}",
            f"-DJOIN_PART_CAP={config.part_capacity}", f"-DJOIN_PART_PROBE={config.part_probe}",
            f"-DJOIN_PART_BITS_MAX={PART_BITS_MAX}", f"-DJOIN_PART_PAD={PART_PAD}",
            f"-DJOIN_CHAINS={int(config.chains)}")


@functools.cache
def _module(options: tuple[str, ...], cooperative: bool):
    """One compiled module per option set; the cooperative copy launches its kernels with cuLaunchCooperativeKernel
    (CuPy's cache key ignores that flag, so the second copy loads the first one's cubin)."""
    return cupy.RawModule(code=SOURCE.read_text(), options=options, enable_cooperative_groups=cooperative)


def _bits(dtype: torch.dtype) -> int:
    return 32 if dtype in (torch.int32,) else 64


@functools.cache  # looked up on every launch: the option strings and the module lookup once per combination
def kernel(config: HashConfig, kind: str, keys: torch.dtype, rows: torch.dtype):
    """The compiled ``join_<kind>_...`` kernel for these key and row-id dtypes (one module per pair: less to
    compile)."""
    opts = compile_options(config) + (f"-DJOIN_KEY_BITS={_bits(keys)}", f"-DJOIN_ROW_BITS={_bits(rows)}")
    suffix = f"i{_bits(keys)}" if kind in KEY_KINDS else f"i{_bits(keys)}_r{_bits(rows)}"
    return _module(opts, kind in ("fused", "lfused")).get_function(f"join_{kind}_{suffix}")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()  # CuPy passes a Python int as 8 bytes: a T* parameter's by-value bytes


def wait_for_total(words, mark, check_every: int = 256) -> None:
    """Spin until the kernels publish the total in ``words[0]`` (armed at -1) or ``mark`` (an event recorded after the
    publishing launch) completes, querying it every ``check_every`` polls.

    The last block writes the total just before its kernel exits, so the host learns it without waiting for the
    kernel's completion to come back through the event; every later launch on the stream still runs after the
    kernel. A launch that publishes nothing (a fault, a bug) ends the wait through the event."""
    polls = 0
    while words[0] == -1:
        polls += 1
        if polls % check_every == 0 and mark.query():
            return


class PinnedWords:
    """Two int64 words of mapped pinned host memory the kernels write (total, error); read after a sync."""

    def __init__(self) -> None:
        rt = cupy.cuda.runtime
        self.host = rt.hostAlloc(16, rt.hostAllocMapped)
        self.device = rt.pointerGetAttributes(self.host).devicePointer
        self.words = (ctypes.c_longlong * 2).from_address(self.host)

    def arm(self) -> None:
        self.words[0], self.words[1] = -1, 0

    def __del__(self) -> None:
        if cupy is not None and getattr(self, "host", None):
            cupy.cuda.runtime.freeHost(self.host)


class HashJoinCuda(HashJoinBase):
    """CUDA hash join in CUDA C++ via CuPy (same table, phases and state as ``HashJoinNumba``; plus the fused
    single-launch schemes and the partitioned scheme)."""

    name = "hash-cuda"
    fused_available = True
    linear_available = True
    partitioned_available = True
    sliced_available = True
    chains_available = True

    def __init__(self, config: HashConfig = HashConfig()) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        super().__init__(config)
        self.pinned = PinnedWords() if config.readback == "pinned" else None
        self.bar_base = 0  # state[2] (grid-barrier arrivals) before the next fused launch
        self._event = torch.cuda.Event()
        self._resident: dict[tuple, int] = {}

    def _check_device(self, t: torch.Tensor) -> None:
        if not t.is_cuda:
            raise ValueError(f"{self.name} needs CUDA tensors, got a tensor on {t.device}")
        if t.device.index != torch.cuda.current_device():
            raise ValueError(f"{self.name} runs on the current CUDA device (cuda:{torch.cuda.current_device()}), "
                             f"got a tensor on {t.device}; use torch.cuda.device({t.device.index})")

    def _host(self) -> int:
        return 0 if self.pinned is None else self.pinned.device

    def _arm(self) -> None:
        if self.pinned is not None:
            self.pinned.arm()

    def _mark(self) -> torch.cuda.Event:
        self._event.record()
        return self._event

    def _read_total(self, state: torch.Tensor, mark: torch.cuda.Event | None = None) -> int:
        if self.pinned is None:
            return super()._read_total(state)
        wait_for_total(self.pinned.words, mark or self._mark())  # the one host sync
        self.syncs += 1
        total, err = int(self.pinned.words[0]), int(self.pinned.words[1])
        if err or total < 0:
            self._reset_state()
            self.bar_base = 0
            raise RuntimeError(f"{self.name}: {ERRORS.get(err, 'the kernels did not publish a total')}")
        return total

    def _table_args(self, built: Built) -> tuple:
        lay = built.layout
        return (_ptr(built.table), lay.buckets, lay.shift, built.epoch)

    def _linear_table_args(self, built: Built) -> tuple:
        """The linear64 kernels' table arguments: ``_table_args`` and the chain array (0: no chains)."""
        return (*self._table_args(built), _ptr(built.chain))

    def _launch_build(self, keys: torch.Tensor, built: Built, state: torch.Tensor,
                      part: tuple[int, int] = WHOLE_TABLE, bounds: torch.Tensor | None = None, rows: int = 0) -> None:
        """The build kernel; linear64 over the rows of table slice ``part`` = (slice_shift, slice) only, or with
        ``bounds`` over rows bounds[slice] .. bounds[slice + 1] - 1 (about ``rows`` of them: the grid's size)."""
        if self._linear(keys.dtype):  # lrows rows per thread, grid-stride beyond MAX_GRID blocks
            grid = min(max(1, -(-(rows or keys.numel()) // (self.config.threads * self.config.lrows))), MAX_GRID)
            _launch(kernel(self.config, "lbuild", keys.dtype, built.row_dtype), grid, self.config.threads,
                    (_ptr(keys), keys.numel(), *self._linear_table_args(built), _ptr(state), self._host(), *part,
                     _ptr(bounds)))
            return
        grid = min(-(-keys.numel() // self.config.tile), MAX_GRID)
        _launch(kernel(self.config, "build", keys.dtype, built.row_dtype), grid, self.config.threads,
                (_ptr(keys), keys.numel(), *self._table_args(built), _ptr(state), self._host()))

    def _launch_probe(self, keys: torch.Tensor, built: Built, rows: torch.Tensor | None, out_b: torch.Tensor | None,
                      out_p: torch.Tensor | None, capacity: int, state: torch.Tensor,
                      part: tuple[int, int] = WHOLE_TABLE, publish: bool = True, bounds: torch.Tensor | None = None,
                      n_rows: int = 0) -> None:
        """lprobe over the rows of table slice ``part`` (with ``bounds``: rows bounds[slice] ..
        bounds[slice + 1] - 1, about ``n_rows``); ``publish``: the last block publishes the total (else the pair
        counter goes on into the next slice's launch)."""
        grid = min(max(1, -(-(n_rows or keys.numel()) // (self.config.threads * self.config.lrows))), MAX_GRID)
        rdt = out_b.dtype if out_b is not None else built.row_dtype
        _launch(kernel(self.config, "lprobe", keys.dtype, rdt), grid, self.config.threads,
                (_ptr(keys), keys.numel(), *self._linear_table_args(built), _ptr(built.slot_rows), _ptr(rows),
                 _ptr(out_b), _ptr(out_p), capacity, _ptr(state), self._host(), *part, int(publish), _ptr(bounds)))

    def _launch_slices(self, bkeys: torch.Tensor, built: Built, keys: torch.Tensor, rows: torch.Tensor | None,
                       out_b: torch.Tensor | None, out_p: torch.Tensor | None, capacity: int,
                       state: torch.Tensor) -> int:
        slices = built.slices
        bits = slices.bit_length() - 1
        if not self.config.scatter:
            for q in range(slices):
                if bkeys.numel():
                    self._launch_build(bkeys, built, state, (32 - bits, q))
                self._launch_probe(keys, built, rows, out_b, out_p, capacity, state, (32 - bits, q),
                                   publish=q == slices - 1)
            return slices * (1 + (bkeys.numel() > 0))
        # both sides by slice (the partitions are the slices: the same high bits of the hash), then slice by slice
        parts = Parts(bkeys, built.rows, built.row_dtype, bkeys.numel(), built.stamp, bits)
        self._launch_partition(parts, keys, rows, state)
        starts, bpk, _, ppk, ppr = built.scattered = parts.buffers
        nb, npb = -(-bkeys.numel() // slices), -(-keys.numel() // slices)
        for q in range(slices):
            self._launch_build(bpk, built, state, WHOLE_TABLE[:1] + (q,), bounds=starts, rows=nb)
            self._launch_probe(ppk, built, ppr, out_b, out_p, capacity, state, WHOLE_TABLE[:1] + (q,),
                               publish=q == slices - 1, bounds=starts[slices + 1:], n_rows=npb)
        return 2 + 2 * slices

    def _launch_linear_fused(self, bkeys: torch.Tensor, built: Built, keys: torch.Tensor, rows: torch.Tensor | None,
                             out_b: torch.Tensor, out_p: torch.Tensor, capacity: int, state: torch.Tensor) -> None:
        threads = self.config.threads
        step = threads * self.config.lrows
        work = max(-(-keys.numel() // step), -(-bkeys.numel() // step), 1)
        grid = min(self.resident_blocks(keys.dtype, out_b.dtype, "lfused"), work)
        _launch(kernel(self.config, "lfused", keys.dtype, out_b.dtype), grid, threads,
                (_ptr(bkeys), bkeys.numel(), _ptr(keys), keys.numel(), *self._linear_table_args(built),
                 _ptr(built.rows), _ptr(rows), _ptr(out_b), _ptr(out_p), capacity, _ptr(state), self._host(),
                 self.bar_base, BARRIER_TIMEOUT_NS))
        self.bar_base += grid

    def _launch_count(self, keys: torch.Tensor, built: Built, probed: Probed, state: torch.Tensor) -> None:
        cfg = self.config
        tiles = cfg.tiles(keys.numel())
        totals = self.ws.get("tile_totals", tiles, torch.int64, keys.device)
        _launch(kernel(cfg, "count", keys.dtype, built.row_dtype), tiles, cfg.threads,
                (_ptr(keys), keys.numel(), *self._table_args(built), _ptr(probed.heads), _ptr(probed.thread_counts),
                 _ptr(totals), _ptr(probed.tile_offsets), _ptr(state), self._host()))

    def _launch_write(self, probed: Probed, out_b: torch.Tensor, out_p: torch.Tensor, capacity: int) -> None:
        cfg, keys = self.config, probed.keys
        _launch(kernel(cfg, "write", keys.dtype, out_b.dtype), cfg.tiles(keys.numel()), cfg.threads,
                (_ptr(keys), keys.numel(), *self._table_args(probed.built), _ptr(probed.heads),
                 _ptr(probed.thread_counts), _ptr(probed.tile_offsets), _ptr(probed.built.rows), _ptr(probed.rows),
                 _ptr(out_b), _ptr(out_p), capacity))

    def _launch_partition(self, parts: Parts, keys: torch.Tensor, rows: torch.Tensor | None,
                          state: torch.Tensor) -> None:
        cfg, ws, dev, n = self.config, self.ws, keys.device, keys.numel()
        nparts, rdt = 1 << parts.bits, parts.row_dtype
        if rows is not None and rows.dtype != rdt:
            raise ValueError(f"{self.name}: probe row ids are {rows.dtype} but build row ids are {rdt}; "
                             "give both sides one row-id dtype")
        counts = ws.get("part_counts", 2 << PART_BITS_MAX, torch.int32, dev, zeros=True)  # pcount leaves it zero
        starts = ws.get("part_starts", 3 * nparts + 3, torch.int32, dev)  # build, probe starts; pjoin's items
        cursors = ws.get("part_cursors", 2 * nparts * PART_PAD, torch.int32, dev)
        bpk, bpr = ws.get("part_bkeys", parts.n, keys.dtype, dev), ws.get("part_brows", parts.n, rdt, dev)
        ppk, ppr = ws.get("part_pkeys", n, keys.dtype, dev), ws.get("part_prows", n, rdt, dev)
        steps = -(-max(parts.n, n) // cfg.tile)
        grid = max(1, min(steps, PCOUNT_BLOCKS_PER_SM * sm_count()))
        _launch(kernel(cfg, "pcount", keys.dtype, rdt), grid, cfg.threads,
                (_ptr(parts.keys), parts.n, _ptr(keys), n, parts.bits, _ptr(counts), _ptr(starts), _ptr(cursors),
                 _ptr(state)))
        chunks = -(-parts.n // cfg.tile) + -(-n // cfg.tile)
        _launch(kernel(cfg, "pscatter", keys.dtype, rdt), max(1, min(chunks, MAX_GRID)), cfg.threads,
                (_ptr(parts.keys), _ptr(parts.rows), parts.n, _ptr(keys), _ptr(rows), n, parts.bits, _ptr(cursors),
                 _ptr(bpk), _ptr(bpr), _ptr(ppk), _ptr(ppr)))
        parts.buffers = (starts, bpk, bpr, ppk, ppr)

    def _launch_part_join(self, parts: Parts, out_b: torch.Tensor | None, out_p: torch.Tensor | None, capacity: int,
                          state: torch.Tensor) -> None:
        starts, bpk, bpr, ppk, ppr = parts.buffers
        items = (1 << parts.bits) + -(-ppk.numel() // self.config.part_probe)  # >= pjoin's work items
        _launch(kernel(self.config, "pjoin", bpk.dtype, parts.row_dtype), min(items, MAX_GRID),
                self.config.threads, (_ptr(starts), parts.bits, _ptr(bpk), _ptr(bpr), _ptr(ppk), _ptr(ppr),
                                      _ptr(out_b), _ptr(out_p), capacity, _ptr(state), self._host()))

    def resident_blocks(self, keys: torch.dtype, rows: torch.dtype, kind: str = "fused") -> int:
        """Blocks of a cooperative kernel (fused, lfused) that fit on the device at once (its grid's limit)."""
        key = (keys, rows, kind)
        if key not in self._resident:
            fn = kernel(self.config, kind, keys, rows)
            per_sm = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, self.config.threads, 0)
            sms = sm_count()
            self._resident[key] = max(1, per_sm) * sms
        return self._resident[key]

    def _launch_fused(self, bkeys: torch.Tensor, built: Built, probed: Probed, out_b: torch.Tensor,
                      out_p: torch.Tensor, capacity: int, state: torch.Tensor) -> None:
        cfg, keys = self.config, probed.keys
        work = max(cfg.tiles(keys.numel()), cfg.tiles(bkeys.numel()), 1)
        grid = min(self.resident_blocks(keys.dtype, out_b.dtype), work)
        totals = self.ws.get("tile_totals", cfg.tiles(keys.numel()), torch.int64, keys.device)
        _launch(kernel(cfg, "fused", keys.dtype, out_b.dtype), grid, cfg.threads,
                (_ptr(bkeys), bkeys.numel(), _ptr(keys), keys.numel(), *self._table_args(built), _ptr(probed.heads),
                 _ptr(probed.thread_counts), _ptr(totals), _ptr(probed.tile_offsets), _ptr(built.rows),
                 _ptr(probed.rows), _ptr(out_b), _ptr(out_p), capacity, _ptr(state), self._host(), self.bar_base,
                 BARRIER_TIMEOUT_NS))
        self.bar_base += 2 * grid


def hash_join_cuda(build_keys, probe_keys, build_rows=None, probe_rows=None, *, config: HashConfig = HashConfig(),
                   timed: bool = False):
    """Inner equi-join with the CUDA C++ hash join; returns a ``JoinResult``."""
    return HashJoinCuda(config)(build_keys, probe_keys, build_rows, probe_rows, timed=timed)


__all__ = ["HashJoinCuda", "hash_join_cuda", "unavailable_reason", "wait_for_total", "compile_options", "kernel",
           "SOURCE", "KERNEL_NAMES"]
