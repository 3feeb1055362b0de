"""The hash join's host side, shared by the CUDA C++ (``hash_cuda``) and numba (``hash_numba``) kernels.

Table (see ``hash_join.cu`` for the kernels): ``B`` buckets of ``bucket_bytes`` bytes, ``S = bucket_bytes / slot``
slots each (slot = {key, tag}: 8 bytes for int32 keys, 16 for int64), ``B`` the first prime >= n_build /
(load_factor * S); every build row owns one slot. ``tag = epoch << shift | build position`` with ``shift =
bit_length(n_build - 1)``; a slot is empty iff its tag's epoch field differs from the join's epoch, so a join on the
same layout reuses the table without clearing it; the table is zeroed (epoch 0 = never live) when it is new, when the
epoch field would overflow (every ``2**(32 - shift) - 1`` joins) or every join with ``clear="memset"``.

Per join (``HashJoinBase.__call__``): build, count (+ the last block's scan of the tile totals, which publishes the
total), write into speculative outputs of ``spec_factor * n_probe`` pairs (enough whenever build keys are unique, or
when the output has at most that many pairs; ``spec_factor`` > 1 only where memory allows), then ONE host
sync reads the total; if it exceeds the speculative capacity (many-to-many), the write runs again exact-size after
the output is checked to fit in memory. The fused scheme does build/count/write in one cooperative launch.
The linear64 scheme (int32 keys, and int64 keys with ``linear_wide``; backends with ``linear_available``) keeps
the same table memory and epochs but probes linearly (a bucket's slots, then the next bucket) and needs no heads or
counts: its probe kernel counts and writes in one pass, so a join is build + probe (+ the probe again, exact-size,
when the output overflows the speculative buffer); its probe phase counts only. With ``slices`` > 1 (backends with
``sliced_available``) it builds and probes the table one slice at a time: lbuild and lprobe of the keys whose hash
falls in slice 0, then slice 1, ...; a key's first bucket grows with its hash, so each pair of launches works in one
slice of the table (at most half the L2: ``slice_count``), which stays in L2 while every key streams past it. With
``scatter`` both sides are first partitioned by slice (the partitioned scheme's pcount and pscatter), so each
slice's launches read only that slice's rows instead of every key. A sliced build phase only records the build side
and its probe phase builds and counts slice by slice; the exact-size rewrite probes the whole table. With ``chains``
(int32 keys, backends with ``chains_available``) every distinct build key owns one slot, heading a list of its rows
in a chain array of 2 ints per build row (the tag gives up one epoch bit for a MULTI flag): clusters then hold
distinct keys only, however many rows share a key.
The partitioned scheme (backends with ``partitioned_available``; the others run linear64 instead) needs no table:
pcount, pscatter and pjoin (``hash_join.cu``) cut both sides into ``P = 2**partition_bits(n_build, part_rows)``
partitions by the high bits of the key hash (about ``part_rows`` build rows each) and join each partition in a
shared-memory table; a join is those three launches (+ pjoin again, exact-size, when the output overflows the
speculative buffer). Its build phase only records the build side; its probe phase partitions both sides and counts.
The three phases are also exposed one by one (``build``/``probe``/``materialize``) for the per-phase benches.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from impl.join.common import JoinResult, Workspace, check_inputs, check_output_fits, mix32_np, next_pow2



HEAD_NONE, HEAD_MANY = -1, -2
STEP_SALT = 0x9E3779B9
SCHEMES = ("fused", "split", "linear64", "linear64-fused", "partitioned")
CLEARS = ("epoch", "memset")
READBACKS = ("pinned", "item")
BARRIER_TIMEOUT_NS = 2_000_000_000
ERRORS = {1: "a grid barrier timed out (blocks were not all resident)", 2: "the hash table had no free slot"}
WHOLE_TABLE = (32, 0)    # (slice_shift, slice) of a linear64 launch over every row: h >> 32 == 0 for a 32-bit hash
SLICES_MAX = 256
L2_OFF_GPU = 50 << 20    # off a GPU (the CPU emulation): an H100's L2, the smaller of the cards this project measures
PART_BITS_MAX = 13       # hash_join.cu's JOIN_PART_BITS_MAX: at most 2**13 partitions (a 32 KiB shared histogram)
PART_PAD = 32            # hash_join.cu's JOIN_PART_PAD: ints from one partition's write cursor to the next
PART_ROWS_MIN = 16
PART_ROWS_MAX = 3072     # the largest part_rows whose pjoin table for int64 keys fits SHARED_BYTES
SHARED_BYTES = 48 * 1024  # static shared memory a block may declare


def part_capacity(part_rows: int) -> int:
    """Build rows per pjoin round (the shared table's capacity, ``JOIN_PART_CAP``): ``part_rows`` + 25%, since
    partition sizes scatter around their mean (at most ``part_rows``)."""
    return part_rows + part_rows // 4


def part_table_bytes(part_rows: int, key_bytes: int) -> int:
    """Shared bytes of pjoin's table: ``S = next_pow2(2 * cap)`` 16-bit slots + ``cap`` keys."""
    cap = part_capacity(part_rows)
    return 2 * next_pow2(2 * cap) + key_bytes * cap


def partition_bits(n_build: int, part_rows: int) -> int:
    """The fewest partition bits p with ``n_build / 2**p <= part_rows``, at most ``PART_BITS_MAX`` (beyond it the
    partitions are larger and pjoin takes several rounds per partition)."""
    return min(PART_BITS_MAX, (max(1, math.ceil(n_build / part_rows)) - 1).bit_length())


@dataclass(frozen=True)
class HashConfig:
    """Table layout and launch parameters of the hash joins (the numba twin reads the table/tile fields only).

    Defaults: the fastest checked variant of ``impl.join.tune`` on the H200 (results/h200/join/tune.json):
    linear64 (int32 keys; packed 64-bit slots, linear probing, build + one probe kernel): 153 µs at 1M x 1M
    and 1.29 ms at 10M x 10M in the tune of 2945ae7, where split with 4 rows per thread read 180 µs and 1.41 ms (its
    t128 / lf0.35 / memset variants read 116-124 µs in the same run: within the tune's run-to-run spread).
    ``linear_wide`` (int64 keys on the linear kernels, 16-byte slots): 154 µs at 1M and 1.42 ms at 10M in the tune of
    fe3a9dd, where the split kernels read 227 µs and 1.55 ms for the same int64 joins."""

    load_factor: float = 0.5  # build rows / slots
    threads: int = 256        # threads per block (a power of two)
    items: int = 4            # probe (and build) rows per thread in flight
    bucket_bytes: int = 32    # one 32-byte sector per bucket, or 64
    scheme: str = "linear64"  # fused: one cooperative launch; split: build, count, write kernels; linear64 (int32
                              # keys; int64 keys with linear_wide, else split): linear probing, build +
                              # one probe kernel that counts and writes (``hash_join.cu``); linear64-fused: the
                              # two in one cooperative launch (C++ only; the numba twin runs linear64);
                              # partitioned: pcount, pscatter, pjoin (C++ only; the numba twin runs linear64)
    clear: str = "epoch"      # epoch: no clear per join; memset: zero the table before every build
    readback: str = "pinned"  # pinned: the kernel writes the total into pinned host memory; item: tensor.item()
    min_blocks: int = 1       # __launch_bounds__ minimum resident blocks per SM (caps registers)
    reconverge: bool = False  # C++ kernels: the warp's lanes meet before each of their build/count rows
    spec_factor: int = 1      # speculative output of spec_factor * n_probe pairs (one pass for joins with up to that
                              # many pairs; the result's tensors are views of the larger buffers)
    lrows: int = 1            # linear64 kernels: rows per thread per step, their loads (and the build's CASes) all
                              # issued before any result is used
    linear_wide: bool = True  # linear64 schemes: int64 keys take the linear kernels too (16-byte slots {key, tag,
                               # pad}: CAS the tag, then store the key) instead of the split kernels
    epoch_bits: int | None = None  # cap on the tag's epoch field (tests use 1-2 bits to force wraps)
    part_rows: int = 2048     # partitioned: build rows per partition at most on average (the partition count is the
                              # power of two that gets there); pjoin's shared table holds part_capacity(part_rows)
    part_probe: int = 8192    # partitioned: probe rows per pjoin work item at most (a partition that a hot probe key
                              # fills is shared by several blocks)
    slices: int = 1           # linear64: build and probe in table slices of at most half the L2 each, one after
                              # another, at most this many (a power of two; 1: the whole table at once)
    scatter: bool = False     # sliced linear64: partition both sides by slice first, each slice then reads its rows
    chains: bool = False      # linear64 on int32 keys (C++ only; the numba twin runs without): duplicate build keys
                              # share one slot heading a list of their rows (``hash_join.cu``), so clusters hold
                              # distinct keys and a many-to-many probe writes its pairs from the list

    def __post_init__(self) -> None:
        if not 0.0 < self.load_factor <= 0.9:
            raise ValueError(f"load_factor must be in (0, 0.9], got {self.load_factor}")
        if self.threads < 32 or self.threads > 1024 or self.threads & (self.threads - 1):
            raise ValueError(f"threads must be a power of two in [32, 1024], got {self.threads}")
        if not 1 <= self.items <= 32:
            raise ValueError(f"items must be in [1, 32], got {self.items}")
        if self.bucket_bytes not in (32, 64):
            raise ValueError(f"bucket_bytes must be 32 or 64, got {self.bucket_bytes}")
        for name, allowed in (("scheme", SCHEMES), ("clear", CLEARS), ("readback", READBACKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 1 <= self.spec_factor <= 16:
            raise ValueError(f"spec_factor must be in [1, 16], got {self.spec_factor}")
        if not 1 <= self.lrows <= 8:
            raise ValueError(f"lrows must be in [1, 8], got {self.lrows}")
        if self.min_blocks < 1:
            raise ValueError(f"min_blocks must be >= 1, got {self.min_blocks}")
        if self.epoch_bits is not None and not 1 <= self.epoch_bits <= 31:
            raise ValueError(f"epoch_bits must be in [1, 31], got {self.epoch_bits}")
        if self.part_probe < 1:
            raise ValueError(f"part_probe (probe rows per pjoin work item) must be >= 1, got {self.part_probe}")
        if self.slices < 1 or self.slices > SLICES_MAX or self.slices & (self.slices - 1):
            raise ValueError(f"slices must be a power of two in [1, {SLICES_MAX}], got {self.slices}")
        if self.slices > 1 and self.scheme != "linear64":
            raise ValueError(f"slices > 1 slices the linear64 table: it needs scheme 'linear64', got {self.scheme!r}")
        if self.scatter and self.slices == 1:
            raise ValueError("scatter partitions both sides by table slice: it needs slices > 1")
        if self.chains and not self.scheme.startswith("linear64"):
            raise ValueError(f"chains link the rows of a linear64 table: it needs a linear64 scheme, got "
                             f"{self.scheme!r}")
        if not PART_ROWS_MIN <= self.part_rows <= PART_ROWS_MAX:
            raise ValueError(f"part_rows must be in [{PART_ROWS_MIN}, {PART_ROWS_MAX}] (pjoin's shared table for "
                             f"int64 keys must fit {SHARED_BYTES} bytes), got {self.part_rows}")

    @property
    def tile(self) -> int:
        return self.threads * self.items

    @property
    def part_capacity(self) -> int:
        return part_capacity(self.part_rows)

    def tiles(self, n_probe: int) -> int:
        return math.ceil(n_probe / self.tile)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17):  # deterministic for n < 3.4e14
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(n: int) -> int:
    n = max(int(n), 2)
    while not is_prime(n):
        n += 1
    return n


@dataclass(frozen=True)
class Layout:
    """A table layout; a table is reused by the next join only when its layout is the same."""

    buckets: int
    slots: int        # per bucket
    slot_bytes: int   # 8 (int32 keys) or 16 (int64 keys)
    shift: int        # tag = epoch << shift | position (chains: epoch << shift | MULTI << (shift - 1) | position)
    max_epoch: int

    @property
    def nbytes(self) -> int:
        return self.buckets * self.slots * self.slot_bytes


@functools.lru_cache(maxsize=64)  # a join plans its table every call; the prime search alone costs ~10 µs of host time
def plan_layout(config: HashConfig, n_build: int, key_dtype: torch.dtype) -> Layout:
    slot_bytes = 16 if key_dtype == torch.int64 else 8
    slots = config.bucket_bytes // slot_bytes
    buckets = next_prime(max(3, math.ceil(n_build / (config.load_factor * slots))))
    shift = max(1, (max(n_build, 1) - 1).bit_length()) + int(config.chains and key_dtype == torch.int32)
    epoch_bits = 32 - shift if config.epoch_bits is None else min(config.epoch_bits, 32 - shift)
    return Layout(buckets, slots, slot_bytes, shift, (1 << epoch_bits) - 1)


def next_epoch(previous: Layout | None, layout: Layout, epoch: int, clear: str) -> tuple[int, bool]:
    """(the next join's epoch, whether the table must be zeroed first) after a join at ``epoch`` on ``previous``."""
    if previous != layout:
        return 1, True
    if epoch + 1 > layout.max_epoch or clear == "memset":
        return 1, True
    return epoch + 1, False


# ---- the hash arithmetic in numpy (the kernels' reference) -------------------------------------------------------

def first_bucket_np(h: np.ndarray, buckets: int) -> np.ndarray:
    return (np.asarray(h, np.uint64) * np.uint64(buckets)) >> np.uint64(32)


def bucket_step_np(h: np.ndarray, buckets: int) -> np.ndarray:
    salted = (np.asarray(h, np.int64) ^ STEP_SALT) & 0xFFFFFFFF
    return 1 + mix32_np(salted) % (buckets - 1)


def table_contents(table: torch.Tensor, layout: Layout, key_dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(keys, tags) of every slot as numpy arrays of shape (buckets, slots); tags as int64 in [0, 2**32)."""
    raw = table.cpu().numpy().view(np.int64 if key_dtype == torch.int64 else np.int32)
    pairs = raw.reshape(layout.buckets, layout.slots, 2)
    keys = pairs[:, :, 0].astype(np.int64)
    tags = pairs[:, :, 1].astype(np.int64) & 0xFFFFFFFF
    return keys, tags


# ---- the host protocol ---------------------------------------------------------------------------------------------

@dataclass
class Built:
    table: torch.Tensor  # raw bytes of the table (int32 / int64 words)
    layout: Layout
    epoch: int
    rows: torch.Tensor | None  # build row ids; None = positions
    row_dtype: torch.dtype
    n: int
    stamp: int           # which build of the operator made it (a later build makes it stale)
    pending: torch.Tensor | None = None  # sliced linear64: the build keys, inserted slice by slice by the probe
    slices: int = 1      # table slices of its build and probe (``HashJoinBase.slice_count``)
    scattered: tuple | None = None  # scatter: (starts, build keys, build rows, probe keys, probe rows) by slice
    chain: torch.Tensor | None = None  # chains: 2 int32 per build position (the row pushed before it, list length)

    @property
    def slot_rows(self) -> torch.Tensor | None:
        """Build row ids by the positions the table's slots hold: ``rows``, or their copy scattered by slice (a
        scattered build inserts the keys at their scattered positions)."""
        return self.rows if self.scattered is None else self.scattered[2]


@dataclass
class Parts:
    """partitioned: the build side, partitioned (together with the probe side) by the probe phase into
    ``2**bits`` partitions; ``buffers`` = the backend's partitioned buffers once that has run."""

    keys: torch.Tensor
    rows: torch.Tensor | None  # build row ids; None = positions
    row_dtype: torch.dtype
    n: int
    stamp: int
    bits: int
    buffers: tuple | None = None


@dataclass
class Probed:
    built: Built | Parts
    keys: torch.Tensor
    rows: torch.Tensor | None
    heads: torch.Tensor          # (n_probe,) int32: -1 none, >= 0 the one match's build position, -2 several
    thread_counts: torch.Tensor  # (tiles * threads,) int64
    tile_offsets: torch.Tensor   # (tiles,) int64 exclusive output offset of each tile
    total: int


class HashJoinBase:
    """The phases and the speculative one-sync join over backend kernels (``_launch_*``, see the subclasses)."""

    name = "hash"
    fused_available = False
    linear_available = False  # the backend has the linear64 kernels (lbuild, lprobe)
    partitioned_available = False  # the backend has the partitioned kernels (pcount, pscatter, pjoin)
    sliced_available = False  # the backend's linear64 kernels take one table slice a launch
    chains_available = False  # the backend's linear64 kernels link duplicate keys' rows (``HashConfig.chains``)

    def __init__(self, config: HashConfig = HashConfig()) -> None:
        self.config = config
        self.ws = Workspace()
        self.layout: Layout | None = None
        self.table: torch.Tensor | None = None
        self.epoch = 0
        self.stamp = 0
        self.launches = 0   # kernel launches (memsets included) by this operator, for the benches' extra_info
        self.syncs = 0      # host syncs by this operator

    # -- backend hooks --
    def _launch_build(self, keys: torch.Tensor, built: Built, state: torch.Tensor) -> None:
        raise NotImplementedError

    def _launch_count(self, keys: torch.Tensor, built: Built, probed: Probed, state: torch.Tensor) -> None:
        raise NotImplementedError

    def _launch_write(self, probed: Probed, out_b: torch.Tensor, out_p: torch.Tensor, capacity: int) -> None:
        raise NotImplementedError

    def _launch_fused(self, bkeys: torch.Tensor, built: Built, probed: Probed, out_b: torch.Tensor,
                      out_p: torch.Tensor, capacity: int, state: torch.Tensor) -> None:
        raise NotImplementedError

    def _launch_probe(self, keys: torch.Tensor, built: Built, rows: torch.Tensor | None, out_b: torch.Tensor | None,
                      out_p: torch.Tensor | None, capacity: int, state: torch.Tensor) -> None:
        """linear64: count every probe row's matches and write the pairs at offsets < capacity (0: count only)."""
        raise NotImplementedError

    def _launch_linear_fused(self, bkeys: torch.Tensor, built: Built, keys: torch.Tensor, rows: torch.Tensor | None,
                             out_b: torch.Tensor, out_p: torch.Tensor, capacity: int, state: torch.Tensor) -> None:
        """linear64-fused: build and probe (counting and writing) in one launch."""
        raise NotImplementedError

    def _launch_slices(self, bkeys: torch.Tensor, built: Built, keys: torch.Tensor, rows: torch.Tensor | None,
                       out_b: torch.Tensor | None, out_p: torch.Tensor | None, capacity: int,
                       state: torch.Tensor) -> int:
        """Sliced linear64: lbuild and lprobe (counting, and writing pairs at offsets < capacity) of each table slice
        in turn, the total published by the last; returns the launches."""
        raise NotImplementedError

    def _launch_partition(self, parts: Parts, keys: torch.Tensor, rows: torch.Tensor | None,
                          state: torch.Tensor) -> None:
        """partitioned: pcount and pscatter of both sides into the workspace's partitioned buffers
        (``parts.buffers``)."""
        raise NotImplementedError

    def _launch_part_join(self, parts: Parts, out_b: torch.Tensor | None, out_p: torch.Tensor | None, capacity: int,
                          state: torch.Tensor) -> None:
        """partitioned: pjoin over the partitioned buffers, writing pairs at offsets < capacity (0: count only)."""
        raise NotImplementedError

    def _partitioned(self) -> bool:
        """Whether joins use the partitioned kernels (a backend that has them)."""
        return self.config.scheme == "partitioned" and self.partitioned_available

    def _linear(self, key_dtype: torch.dtype) -> bool:
        """Whether joins on these keys use the linear64 kernels (int32 keys of a backend that has them; int64 keys
        too with ``linear_wide``); a backend without the partitioned kernels runs linear64 in their place."""
        scheme = self.config.scheme
        if scheme == "partitioned" and not self.partitioned_available:
            scheme = "linear64"
        wide_ok = key_dtype == torch.int32 or (key_dtype == torch.int64 and self.config.linear_wide)
        return scheme.startswith("linear64") and self.linear_available and wide_ok

    def _chains(self, key_dtype: torch.dtype) -> bool:
        """Whether joins on these keys link duplicate keys' rows (``HashConfig.chains``: int32 keys on the linear64
        kernels of a backend that has chains)."""
        return (self.config.chains and self.chains_available and key_dtype == torch.int32
                and self._linear(key_dtype))

    def slice_count(self, layout: Layout, key_dtype: torch.dtype) -> int:
        """Table slices a linear64 join builds and probes in turn, on a backend with the sliced kernels: the fewest
        (a power of two) that make one slice at most half the L2, at most ``slices``; 1 (the whole table at once)
        for a table within half the L2, and, without ``scatter``, where the slices would not fit in L2 (each would
        only read every key again)."""
        cfg = self.config
        if cfg.slices == 1 or not self.sliced_available or cfg.scheme != "linear64" or not self._linear(key_dtype):
            return 1
        from impl.common.timing import l2_bytes

        l2 = l2_bytes() or L2_OFF_GPU
        count = min(cfg.slices, next_pow2(-(-layout.nbytes // max(1, l2 // 2))))
        return 1 if count == 1 or (not cfg.scatter and layout.nbytes > count * l2) else count

    def _check_device(self, t: torch.Tensor) -> None:
        """Refuse tensors the backend cannot read (the CUDA join needs CUDA tensors)."""

    def _arm(self) -> None:
        """Before a join's first launch: reset whatever the kernels report the total through."""

    def _mark(self) -> Any:
        """After the launch that publishes the total: something ``_read_total`` can wait on (None: the stream)."""
        return None

    def _read_total(self, state: torch.Tensor, mark: Any = None) -> int:
        """Wait for the count and return the total (one host sync); raise on a device-side error."""
        self.syncs += 1
        total, err = (int(v) for v in state[:2].tolist())
        if err:
            self._reset_state()
            raise RuntimeError(f"{self.name}: {ERRORS.get(err, f'device error {err}')}")
        return total

    def _reset_state(self) -> None:
        self.ws.get("state", 8, torch.int64, self._device).zero_()

    # -- shared host logic --
    def _state(self, device: torch.device) -> torch.Tensor:
        self._device = device
        return self.ws.get("state", 8, torch.int64, device, zeros=True)

    def _prepare_table(self, n_build: int, key_dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, Layout]:
        layout = plan_layout(self.config, n_build, key_dtype)
        words = layout.nbytes // (8 if key_dtype == torch.int64 else 4)
        if self.table is None or self.table.device != device or self.table.dtype != key_dtype:
            self.layout = None
        self.epoch, clear = next_epoch(self.layout, layout, self.epoch, self.config.clear)
        if self.layout != layout:
            chains = 8 * max(n_build, 1) if self._chains(key_dtype) else 0  # the rows' chain entries beside it
            check_output_fits(0, torch.int32, device, extra_bytes=layout.nbytes + chains, what="the hash table")
            self.table = torch.zeros(words, dtype=key_dtype, device=device)
            self.layout = layout
        elif clear:
            self.table.zero_()
        self.launches += int(clear)
        return self.table, layout

    def _new_built(self, keys: torch.Tensor, rows: torch.Tensor | None) -> Built:
        """A table ready for ``keys`` (the next epoch, or cleared) and its build state; nothing launched yet."""
        table, layout = self._prepare_table(keys.numel(), keys.dtype, keys.device)
        chain = None
        if self._chains(keys.dtype):  # never cleared: a join reads only the entries its own build wrote
            chain = self.ws.get("chain", 2 * max(keys.numel(), 1), torch.int32, keys.device)
        self.stamp += 1
        return Built(table, layout, self.epoch, rows, rows.dtype if rows is not None else torch.int64, keys.numel(),
                     self.stamp, chain=chain)

    def _new_parts(self, keys: torch.Tensor, rows: torch.Tensor | None) -> Parts:
        """partitioned: the build side's state; nothing launched (the partitioning needs the probe side too)."""
        self.stamp += 1
        return Parts(keys, rows, rows.dtype if rows is not None else torch.int64, keys.numel(), self.stamp,
                     partition_bits(keys.numel(), self.config.part_rows))

    def build(self, keys: torch.Tensor, rows: torch.Tensor | None) -> Built | Parts:
        self._check_device(keys)
        if self._partitioned():
            return self._new_parts(keys, rows)
        built = self._new_built(keys, rows)
        built.slices = self.slice_count(built.layout, keys.dtype)
        if built.slices > 1:
            built.pending = keys  # inserted slice by slice, each slice just before its probe
        elif keys.numel():
            self._launch_build(keys, built, self._state(keys.device))
            self.launches += 1
        return built

    def _probe_state(self, built: Built, keys: torch.Tensor, rows: torch.Tensor | None) -> Probed:
        if built.stamp != self.stamp:
            raise RuntimeError(f"{self.name}: this build state is stale (the operator has built another table since)")
        cfg, n, dev = self.config, keys.numel(), keys.device
        tiles = cfg.tiles(n)
        return Probed(built, keys, rows, self.ws.get("heads", n, torch.int32, dev),
                      self.ws.get("thread_counts", tiles * cfg.threads, torch.int64, dev),
                      self.ws.get("tile_offsets", tiles, torch.int64, dev), 0)

    def probe(self, built: Built | Parts, keys: torch.Tensor, rows: torch.Tensor | None) -> Probed:
        self._check_device(keys)
        if isinstance(built, Parts):
            return self._part_probe(built, keys, rows)
        if self._linear(keys.dtype):
            return self._linear_probe(built, keys, rows)
        probed = self._probe_state(built, keys, rows)
        if keys.numel():
            state = self._state(keys.device)
            self._arm()
            self._launch_count(keys, built, probed, state)
            self.launches += 1
            probed.total = self._read_total(state, self._mark())
        return probed

    def materialize(self, probed: Probed, out_build: torch.Tensor, out_probe: torch.Tensor) -> None:
        if probed.built.stamp != self.stamp:
            raise RuntimeError(f"{self.name}: this probe state is stale (the operator has built another table since)")
        if probed.keys.numel() and isinstance(probed.built, Parts):
            self._launch_part_join(probed.built, out_build, out_probe, out_build.numel(),
                                   self._state(probed.keys.device))
            self.launches += 1
        elif probed.keys.numel() and self._linear(probed.keys.dtype):
            self._launch_probe(probed.keys, probed.built, probed.rows, out_build, out_probe, out_build.numel(),
                               self._state(probed.keys.device))
            self.launches += 1
        elif probed.keys.numel():
            self._launch_write(probed, out_build, out_probe, out_build.numel())
            self.launches += 1

    def _counting_probe(self, built: Built | Parts, keys: torch.Tensor, rows: torch.Tensor | None,
                        launch: Callable[[torch.Tensor], int]) -> Probed:
        """A probe phase that only counts (no heads: the materialize phase looks up again): ``launch(state)`` enqueues
        the kernels that publish the total and returns how many it launched; then the one host sync."""
        if built.stamp != self.stamp:
            raise RuntimeError(f"{self.name}: this build state is stale (the operator has built another table since)")
        dev = keys.device
        none = self.ws.get("linear_none", 0, torch.int64, dev)
        probed = Probed(built, keys, rows, self.ws.get("linear_heads", 0, torch.int32, dev), none, none, 0)
        if keys.numel():
            state = self._state(dev)
            self._arm()
            self.launches += launch(state)
            probed.total = self._read_total(state, self._mark())
        return probed

    def _linear_probe(self, built: Built, keys: torch.Tensor, rows: torch.Tensor | None) -> Probed:
        """linear64's probe phase: the probe kernel counting only (sliced: each slice's build, then its probe
        counting; the table is whole afterwards)."""
        def launch(state: torch.Tensor) -> int:
            if built.pending is not None:
                launched = self._launch_slices(built.pending, built, keys, rows, None, None, 0, state)
                built.pending = None
                return launched
            self._launch_probe(keys, built, rows, None, None, 0, state)
            return 1

        return self._counting_probe(built, keys, rows, launch)

    def _part_probe(self, parts: Parts, keys: torch.Tensor, rows: torch.Tensor | None) -> Probed:
        """partitioned's probe phase: pcount, pscatter, and pjoin counting only."""
        def launch(state: torch.Tensor) -> int:
            self._launch_partition(parts, keys, rows, state)
            self._launch_part_join(parts, None, None, 0, state)
            return 3

        return self._counting_probe(parts, keys, rows, launch)

    def __call__(self, build_keys: Any, probe_keys: Any, build_rows: Any = None, probe_rows: Any = None, *,
                 timed: bool = False) -> JoinResult:
        """Inner equi-join (``common`` module doc); one host sync. ``timed``: the three phases one by one."""
        t = check_inputs(build_keys, probe_keys, build_rows, probe_rows, default_rows=False)
        if timed:
            from impl.join.common import run_join

            return run_join(self, t.build_keys, t.probe_keys, t.build_rows, t.probe_rows, timed=True)
        return self.speculative_join(t.build_keys, t.probe_keys, t.build_rows, t.probe_rows)

    def speculative_join(self, bk: torch.Tensor, pk: torch.Tensor, br: torch.Tensor | None,
                         pr: torch.Tensor | None) -> JoinResult:
        rdt = br.dtype if br is not None else torch.int64
        n, dev = pk.numel(), pk.device
        self._check_device(bk)
        self._check_device(pk)
        cap = n * self.config.spec_factor
        try:
            check_output_fits(cap, rdt, dev, what="the speculative output")
        except MemoryError:  # no room for the larger buffer: one pair per probe row, or the clear refusal
            cap = n
            check_output_fits(cap, rdt, dev, what="the speculative output (one pair per probe row)")
        ob, op = torch.empty(cap, dtype=rdt, device=dev), torch.empty(cap, dtype=rdt, device=dev)
        if n == 0:
            return JoinResult(ob, op)
        state = self._state(dev)
        self._arm()
        if self._partitioned():  # pjoin writes the pairs: it is also the exact-size rewrite
            parts = self._new_parts(bk, br)
            self._launch_partition(parts, pk, pr, state)
            self._launch_part_join(parts, ob, op, cap, state)
            mark = self._mark()
            self.launches += 3

            def rewrite(out_b: torch.Tensor, out_p: torch.Tensor, capacity: int) -> None:
                self._launch_part_join(parts, out_b, out_p, capacity, state)
        elif self._linear(pk.dtype):  # the probe kernel writes the pairs: it is also the exact-size rewrite
            launched = 1
            if self.config.scheme == "linear64-fused" and self.fused_available:
                built = self._new_built(bk, br)
                self._launch_linear_fused(bk, built, pk, pr, ob, op, cap, state)
            else:
                built = self.build(bk, br)
                if built.pending is not None:  # sliced; the rewrite below probes the whole table, built by then
                    launched = self._launch_slices(built.pending, built, pk, pr, ob, op, cap, state)
                    built.pending = None
                else:
                    self._launch_probe(pk, built, pr, ob, op, cap, state)
            mark = self._mark()
            self.launches += launched

            def rewrite(out_b: torch.Tensor, out_p: torch.Tensor, capacity: int) -> None:
                self._launch_probe(pk, built, pr, out_b, out_p, capacity, state)
        else:
            fused = self.config.scheme == "fused" and self.fused_available
            built = self._new_built(bk, br) if fused else self.build(bk, br)
            probed = self._probe_state(built, pk, pr)
            if fused:
                self._launch_fused(bk, built, probed, ob, op, cap, state)
                mark = self._mark()
                self.launches += 1
            else:
                self._launch_count(pk, built, probed, state)
                mark = self._mark()  # the host can read the total while the write runs
                self._launch_write(probed, ob, op, cap)
                self.launches += 2
            rewrite = functools.partial(self._launch_write, probed)
        total = self._read_total(state, mark)
        if total > cap:  # many-to-many: the speculative buffer was short; write again, exact-size (no more syncs)
            check_output_fits(total, rdt, dev)
            ob, op = torch.empty(total, dtype=rdt, device=dev), torch.empty(total, dtype=rdt, device=dev)
            rewrite(ob, op, total)
            self.launches += 1
            return JoinResult(ob, op)
        return JoinResult(ob[:total], op[:total])
