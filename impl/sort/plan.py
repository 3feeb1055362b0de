"""Pass plan of the CUDA C++ bitonic sort (``bitonic.cu``): which slots each block holds, and what it does with them.

Network: the flip form of ``impl.sort.network``. N = 2^LOGN ≥ n virtual slots; stage L = 1..LOGN is the flip step
(XOR mask 2^L − 1) and the half-cleaners 2^(L−2), ..., 1; every comparator leaves the minimum at the lower slot, so
the +inf pads n..N−1 are never loaded or stored.

Passes (each reads and writes every key it can change once):
  tile   pass 0: a block of T = 2^t consecutive slots performs stages 1..S (S = t unless ``tile_stages`` asks for
         fewer: sorted runs of 2^S) with the standard-form network — stage L's comparators run descending where bit
         L of the slot is set, done by holding those keys complemented (``~key`` reverses the order), so every
         comparator is min-to-lower; pads inside the last tile are +inf. Its steps cost ALU time that grows as S²
         while its bytes stay one read and one write of every key: a smaller S moves steps into merge passes, where
         they share a pass's bytes with fewer steps.
  coset  a merge pass runs consecutive steps of stages S+1..LOGN. Its block holds a coset x0 ⊕ V of a t'-dimensional
         space V (t' ≥ t: ``merge_tile_bits``) spanned by the pass's masks plus filler bits (the lowest free bits:
         the coset is runs of ≥ 2^run_bits consecutive slots, coalesced). Fused plan: a pass may finish stage L and
         start stage L+1 as long as V stays t'-dimensional and holds one flip mask (~15 passes for 10M keys instead
         of ~19 with one tile pass per stage).
         A merge pass launches only the cosets its stages can change (``work_bound``): stage L leaves an aligned
         2^L block as it is when the block's real slots all lie in its lower half, which is what a partly filled
         last region holds in the late stages.

Coordinates. A block slot is s ∈ [0, 2^t); coordinate i ↔ basis vector b_i (ascending pivot = highest set bit):
position(s) = x0 ^ XOR_{s_i = 1} b_i, x0 = the block index with zeros inserted at the pivots. At most one basis
vector is a flip mask f = 2^M − 1; slots with s_f = 1 hold complemented keys during the pass, which makes every
half-cleaner comparator min-to-(s_j = 0) and the flip step (A at s_f = 0, B at s_f = 1) A' = min(A, ~B),
B' = min(~A, B). Addresses stay additive: position = x0 + G(s) where s_f = 0 and (x0 ^ f) − G(s) where s_f = 1,
G(s) = sum of the single-bit basis vectors selected by s.

Rounds. A thread holds E = 2^e slots that differ in its e register coordinates; a layout maps the t coordinates to
e register bits, 5 lane bits and the warp bits of the thread index. Steps run on register coordinates only
(compare-exchanges in registers); between rounds the keys go through shared memory (an exchange). The first layout
(load) and the last (store) have lanes on coordinates 0..4 (128-byte segments per warp) and the flip coordinate among
the registers. Shared slot s lives at s + (s >> 5) + (s >> 10): conflict-free when the lanes' coordinates differ
mod 5, and additive over disjoint coordinates (register offsets are immediates).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property

LANE_BITS = 5
LANES0 = tuple(range(LANE_BITS))
MODES = {"keys32": 4, "keys64": 8, "composite": 8, "pairs": 12}  # mode -> bytes per slot
MAX_SMEM = 232448  # opt-in dynamic shared memory per block on sm_90 (227 KiB)


def log2(x: int) -> int:
    return x.bit_length() - 1


def padded_bits(n: int) -> int:
    """LOGN: N = 2^LOGN ≥ n slots (0 for n ≤ 1)."""
    return max(n - 1, 0).bit_length()


def stage_masks(L: int) -> list[int]:
    """XOR masks of flip-form stage L: the flip 2^L − 1, then the half-cleaners 2^(L−2), ..., 1."""
    return [(1 << L) - 1] + [1 << p for p in range(L - 2, -1, -1)]


def block_range(lo: int, hi: int, block_bits: int, blocks: int) -> tuple[int, int]:
    """[first, last) of a pass's blocks (2^block_bits slots each, ``blocks`` active) inside the aligned slots [lo, hi):
    block b lies in aligned group b >> (k - block_bits) of 2^k slots for any k >= the pass's span, so lo and hi must
    be multiples of 2^span."""
    return lo >> block_bits, min(hi >> block_bits, blocks)


def slot_bytes(t: int, mode: str) -> int:
    """Shared memory of a block of 2^t ``mode`` slots (bank-conflict padding included)."""
    need = (pad_index((1 << t) - 1) + 1) * MODES[mode]
    if need > MAX_SMEM:
        raise ValueError(f"a block of 2^{t} {mode} slots needs {need} B of shared memory, more than {MAX_SMEM}")
    return need


def pad_index(s: int) -> int:
    """Shared-memory index of slot s (bank-conflict padding; additive over disjoint bits)."""
    return s + (s >> 5) + (s >> 10)


@dataclass(frozen=True)
class CudaSortConfig:
    """Sizes of the CUDA C++ sort, for 4-byte keys; 8- and 12-byte slots (int64 keys, argsort) use half the tile and
    half the keys per thread (the same threads per block and about the same shared memory)."""

    tile_bits: int = 15     # T = 2^15 keys per block (128 KiB of dynamic shared memory)
    items_bits: int = 6     # E = 64 keys per thread in registers (512 threads per block)
    run_bits: int = 5       # coset runs of >= 32 consecutive keys (128-byte segments)
    fuse: bool = True       # merge passes cross stage boundaries (False: wide passes, then one tile pass per stage)
    merge_items_bits: int | None = None  # keys per thread in the merge passes (None: items_bits): the tile pass and
                                         # the merges can trade registers for resident warps differently
    merge_tile_bits: int | None = None   # keys per block of the merge passes (None: tile_bits): larger cosets fuse
                                         # more steps per merge pass while the ALU-bound tile pass keeps its size
    overlap_bits: int = 0   # > 0: the graph runs the passes local to 2^overlap_bits aligned regions of the padded
                            # size on a stream per region, each region's tile pass after the one before it, so the
                            # later (ALU-bound) tile passes overlap the earlier (memory-bound) merges; 0: one stream
    tile_stages: int | None = None  # stages 1..S the tile pass performs (None: all of its tile's); the merge passes
                                    # run stages S+1.. (at a padded size within one tile, the tile pass runs them all)
    fma_max: int = 0        # 32-bit keys: of every 6 compare-exchanges of a tile-pass step, how many form the maximum
                            # as a + b - min in two integer multiply-adds (FMA pipe) instead of a max (ALU pipe,
                            # which the tile pass saturates); 0: all on the ALU pipe. Merge passes keep min/max: they
                            # are memory-bound, and the form costs some of them registers (48 -> 64 at 10M keys)

    def __post_init__(self) -> None:
        if self.merge_tile_bits is not None and not self.tile_bits <= self.merge_tile_bits <= 15:
            raise ValueError(f"merge_tile_bits must be in tile_bits..15 ({self.tile_bits}..15), "
                             f"got {self.merge_tile_bits}")
        for tile_name, tile, name, bits in (("tile_bits", self.tile_bits, "items_bits", self.items_bits),
                                            ("merge tile bits", self.merge_t, "merge_items_bits", self.merge_e)):
            if not 2 <= bits <= 7:
                raise ValueError(f"{name} must be in 2..7 (4 to 128 keys per thread), got {bits}")
            threads = tile - bits
            if not LANE_BITS <= threads <= 10:
                raise ValueError(f"{tile_name} - {name} = {threads}: a block needs 32..1024 threads")
        if not 1 <= self.run_bits <= self.tile_bits - 2:
            raise ValueError(f"run_bits must be in 1..tile_bits-2, got {self.run_bits}")
        if not 0 <= self.overlap_bits <= 4:
            raise ValueError(f"overlap_bits must be in 0..4 (1 to 16 regions), got {self.overlap_bits}")
        if self.tile_stages is not None and not LANE_BITS <= self.tile_stages <= self.tile_bits:
            # the next stage's flip coordinate (pivot S) must lie above the load layout's lanes (coordinates 0..4)
            raise ValueError(f"tile_stages must be in {LANE_BITS}..tile_bits ({LANE_BITS}..{self.tile_bits}), "
                             f"got {self.tile_stages}")
        if not 0 <= self.fma_max <= 6:
            raise ValueError(f"fma_max counts compare-exchanges of every 6 (0..6), got {self.fma_max}")
        if self.tile_bits > 15:
            raise ValueError(f"tile_bits must be <= 15 (shared-memory padding covers 15 coordinate bits), "
                             f"got {self.tile_bits}")

    @property
    def merge_e(self) -> int:
        return self.items_bits if self.merge_items_bits is None else self.merge_items_bits

    @property
    def merge_t(self) -> int:
        return self.tile_bits if self.merge_tile_bits is None else self.merge_tile_bits

    def shape(self, mode: str, merge: bool = False) -> tuple[int, int]:
        """(t, e) for ``mode``: log2 slots per block and log2 slots per thread (of the merge passes if ``merge``)."""
        wide = MODES[mode] > 4
        t = (self.merge_t if merge else self.tile_bits) - wide
        e = (self.merge_e if merge else self.items_bits) - wide
        if e < 1 or t - e < LANE_BITS:
            raise ValueError(f"config {self} is too small for {mode} slots (t={t}, e={e})")
        return t, e

    def smem_bytes(self, mode: str) -> int:
        """Dynamic shared memory of the larger block, the tile pass's or the merge passes'."""
        return max(slot_bytes(self.shape(mode, merge)[0], mode) for merge in (False, True))


GPU_CUDA_CONFIG = CudaSortConfig()
"""The design point (tile 2^15, 64 keys per thread, fused passes); ``python -m impl.sort.tune`` compares others."""
EMU_CUDA_CONFIG = CudaSortConfig(tile_bits=8, items_bits=2, run_bits=2)
"""CPU emulation: tiles of 256 keys (128 for 8-byte slots), 64 threads of 4 keys (2), many passes at n ~ 1000."""


# ---- one pass ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    """``step``: compare-exchange on coordinate ``a`` (min to a = 0); ``flip``: the flip step on the flip coordinate
    ``a``; ``xor``: complement the keys of slots whose bits ``a`` ^ ``b`` of the position are 1 (−1: no bit)."""

    kind: str
    a: int
    b: int = -1


@dataclass(frozen=True)
class Layout:
    regs: tuple[int, ...]    # coordinate of register bit k
    lanes: tuple[int, ...]   # coordinate of lane bit k (5)
    warps: tuple[int, ...]   # coordinate of warp bit k

    def coords(self) -> tuple[int, ...]:
        return self.regs + self.lanes + self.warps


@dataclass(frozen=True)
class Round:
    layout: Layout
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class PassSpec:
    """One pass as its kernel is generated (see the module doc). ``masks``: the flip-form steps it performs, in
    order (empty for the tile pass, which performs the standard-form stages 1..S of ``stages``)."""

    kind: str                   # "tile" or "coset"
    t: int
    e: int
    basis: tuple[int, ...]      # position mask of each coordinate, ascending pivots
    f: int                      # the flip mask's coordinate, −1 if none
    rounds: tuple[Round, ...]   # rounds[0].layout loads, rounds[-1].layout stores
    masks: tuple[int, ...] = ()
    encode: bool = False        # reads the raw input and makes keys
    decode: bool = False        # writes values (keys-only) or indices (argsort)
    stages: tuple[int, ...] = ()  # the stages it performs (flip-form stages of its masks; the tile pass: 1..S)
    fma: int = 0                # of every 6 register compare-exchanges, those with the maximum on the FMA pipe (tile)

    @cached_property
    def pivots(self) -> tuple[int, ...]:
        return tuple(log2(b) for b in self.basis)

    @property
    def exchanges(self) -> int:
        return len(self.rounds) - 1

    @property
    def steps(self) -> int:
        return sum(op.kind != "xor" for r in self.rounds for op in r.ops)

    @property
    def run(self) -> int:
        """Consecutive slots per run of the coset (2^t for a contiguous tile)."""
        r = 0
        while r < self.t and self.basis[r] == 1 << r:
            r += 1
        return 1 << r

    @property
    def contiguous(self) -> bool:
        """Blocks hold T consecutive slots (block b: [bT, (b+1)T)): the host pipeline can run this pass per chunk."""
        return self.basis == tuple(1 << i for i in range(self.t))

    def x0(self, block: int) -> int:
        """Coset representative of block ``block``: its index with zero bits inserted at the pivots."""
        v = block
        for p in self.pivots:
            v = ((v >> p) << (p + 1)) | (v & ((1 << p) - 1))
        return v

    def work_bound(self, n: int) -> int:
        """Slots at or above this bound are the same after the pass as before it (n for the tile pass and for a pass
        that encodes or decodes, which touch every real slot).

        Before stage L every aligned 2^(L−1) block is sorted and the pads (+inf) sit above n, so stage L changes
        nothing in an aligned 2^L block [a, a + 2^L) whose real slots all lie in its lower half (n ≤ a + 2^(L−1)):
        the flip pairs each of them with a pad and the half-cleaners meet a sorted half. The blocks it can change
        are those below R_L = ⌈(n − 2^(L−1)) / 2^L⌉ · 2^L. The bound is the largest R_L of the pass's stages rounded
        up to its span (every coset lies inside one aligned region of 2^(highest pivot + 1) slots), so the launched
        cosets hold exactly the real slots below it: the pass moves min(n, bound) slots."""
        if self.kind == "tile" or self.encode or self.decode or not self.stages:
            return n
        bound = max(-(-(n - (1 << L - 1)) >> L) << L for L in self.stages)
        span = max(self.pivots) + 1
        return min(n, -(-bound >> span) << span)

    def blocks_below(self, bound: int) -> int:
        """Blocks whose coset starts below ``bound`` (x0, the coset's smallest position, grows with the block)."""
        lo, hi = 0, max(bound, 1)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.x0(mid) < bound:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def active_blocks(self, n: int) -> int:
        """Blocks the pass launches: the cosets holding a slot below ``work_bound(n)`` (a prefix of the blocks)."""
        return self.blocks_below(self.work_bound(n))

    def positions(self, block: int) -> list[int]:
        """Position of every slot of block ``block`` (for tests and the numpy twin)."""
        x0 = self.x0(block)
        out = []
        for s in range(1 << self.t):
            p = x0
            for i, b in enumerate(self.basis):
                if (s >> i) & 1:
                    p ^= b
            out.append(p)
        return out

    def with_flags(self, *, encode: bool | None = None, decode: bool | None = None) -> "PassSpec":
        return replace(self, encode=self.encode if encode is None else encode,
                       decode=self.decode if decode is None else decode)

    @cached_property
    def key(self) -> str:
        """Stable short name of this pass's code (the kernel name's suffix)."""
        text = repr((self.kind, self.t, self.e, self.basis, self.f, self.rounds, self.encode, self.decode))
        text += f" fma {self.fma}" if self.fma else ""
        return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---- rounds and layouts -----------------------------------------------------------------------------------------

def _pick_lanes(free: list[int], wide: bool = False) -> tuple[int, ...]:
    """5 lane coordinates from ``free``: 0..4 when all are free (coalesced), else distinct residues mod 5 (no bank
    conflicts), else any.

    ``pad_index`` puts coordinate c on bank 2^(c mod 5) of 4-byte words. 8-byte slots (``wide``) are served per
    half-warp, and a slot spans two banks, so a coordinate of residue 4 lands on the same bank pair as residue 0
    (2 x 16 = 32 = 0 mod 32): lane bits 0..3 (one half-warp) take residues 0..3, one each, and lane bit 4 (which
    half) takes residue 4 where free (its 4-byte words, as in the value array of 12-byte slots, then stay
    conflict-free too), else any coordinate."""
    if all(c in free for c in LANES0):
        return LANES0
    if wide:
        half: list[int] = []
        for c in free:
            if len(half) < LANE_BITS - 1 and c % 5 != 4 and all(c % 5 != x % 5 for x in half):
                half.append(c)
        rest = [c for c in free if c not in half]
        if len(half) == LANE_BITS - 1 and rest:
            top = next((c for c in rest if c % 5 == 4), rest[0])
            return tuple(sorted(half)) + (top,)
    lanes: list[int] = []
    for c in free:
        if len(lanes) < LANE_BITS and all(c % 5 != x % 5 for x in lanes):
            lanes.append(c)
    for c in free:
        if len(lanes) < LANE_BITS and c not in lanes:
            lanes.append(c)
    return tuple(sorted(lanes))


def _layout(t: int, e: int, regs: list[int], lanes: tuple[int, ...] | None = None, wide: bool = False) -> Layout:
    rest = [c for c in range(t) if c not in regs]
    lanes = _pick_lanes(rest, wide) if lanes is None else lanes
    return Layout(tuple(regs), tuple(lanes), tuple(c for c in rest if c not in lanes))


def _fill(regs: list[int], e: int, t: int, avoid: tuple[int, ...]) -> list[int]:
    """Complete ``regs`` to e coordinates, highest unused first, keeping ``avoid`` (the store lanes) free."""
    for c in list(range(t - 1, -1, -1)):
        if len(regs) == e:
            break
        if c not in regs and c not in avoid:
            regs.append(c)
    for c in range(t):
        if len(regs) < e and c not in regs:
            regs.append(c)
    return regs


def _upcoming(ops: list[Op], start: int, e: int, exclude: tuple[int, ...] = ()) -> list[int]:
    """The first ≤ e distinct step coordinates from ops[start:], stopping at one in ``exclude``."""
    regs: list[int] = []
    for op in ops[start:]:
        if op.kind == "xor":
            continue
        if op.a in exclude:
            break
        if op.a not in regs:
            if len(regs) == e:
                break
            regs.append(op.a)
    return regs


def plan_rounds(t: int, e: int, ops: list[Op], f: int, wide: bool = False) -> tuple[Round, ...]:
    """Greedy rounds: each layout's registers are the next e distinct step coordinates; a round runs steps while
    their coordinate is a register. Load and store layouts have lanes 0..4 and (if any) f in the registers.
    ``wide``: slots of 8 bytes or more (lane choice, see ``_pick_lanes``)."""
    must = [f] if f >= 0 else []
    regs = _fill(list(dict.fromkeys(must + _upcoming(ops, 0, e, LANES0)))[:e], e, t, LANES0)
    layout = _layout(t, e, regs, LANES0)
    rounds: list[Round] = []
    cur: list[Op] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        if op.kind == "xor" or op.a in layout.regs:
            cur.append(op)
            i += 1
            continue
        rounds.append(Round(layout, tuple(cur)))
        regs = _upcoming(ops, i, e)
        if f >= 0 and f not in regs and len(regs) < e:
            regs.append(f)  # helps the last round double as the store layout
        layout = _layout(t, e, _fill(regs, e, t, LANES0), wide=wide)
        cur = []
    rounds.append(Round(layout, tuple(cur)))
    last = rounds[-1].layout
    if last.lanes != LANES0 or (f >= 0 and f not in last.regs):
        rounds.append(Round(_layout(t, e, _fill(list(must), e, t, LANES0), LANES0), ()))
    return tuple(rounds)


def tile_pass(t: int, e: int, wide: bool = False, stages: int | None = None) -> PassSpec:
    """Pass 0: stages 1..S (``stages``, default t) of the standard-form network on each tile of 2^t slots,
    complemented where bit L of the slot is set; it leaves ascending runs of 2^S."""
    last = t if stages is None else stages
    if not 1 <= last <= t:
        raise ValueError(f"a tile of 2^{t} slots performs stages 1..S with S in 1..{t}, got {last}")
    ops: list[Op] = []
    for L in range(1, last + 1):
        ops.append(Op("xor", L - 1 if L >= 2 else -1, L if L < last else -1))
        ops += [Op("step", p) for p in range(L - 1, -1, -1)]
    basis = tuple(1 << i for i in range(t))
    return PassSpec("tile", t, e, basis, -1, plan_rounds(t, e, ops, -1, wide), stages=tuple(range(1, last + 1)))


def coset_pass(masks: list[int], t: int, e: int, logn: int, wide: bool = False,
               stages: tuple[int, ...] = ()) -> PassSpec:
    """A merge pass performing ``masks`` (consecutive flip-form steps of ``stages``, distinct pivots) on cosets of
    t dimensions."""
    piv = {log2(m): m for m in masks}
    if len(piv) != len(masks):
        raise ValueError(f"masks {masks} repeat a pivot")
    for p in range(logn):
        if len(piv) == t:
            break
        piv.setdefault(p, 1 << p)  # fillers: the lowest free bits
    if len(piv) != t:
        raise ValueError(f"cannot complete masks {masks} to {t} dimensions below 2^{logn}")
    basis = tuple(piv[p] for p in sorted(piv))
    flips = [i for i, b in enumerate(basis) if b & (b - 1)]
    if len(flips) > 1:
        raise ValueError(f"masks {masks} hold more than one flip mask")
    f = flips[0] if flips else -1
    coord = {b: i for i, b in enumerate(basis)}
    ops = [Op("flip" if coord[m] == f else "step", coord[m]) for m in masks]
    return PassSpec("coset", t, e, basis, f, plan_rounds(t, e, ops, f, wide), tuple(masks), stages=tuple(stages))


# ---- the whole sort ---------------------------------------------------------------------------------------------

def _dims(masks: list[int], run_bits: int) -> int | None:
    """Dimensions a coset of ``masks`` needs (masks + low fillers), None if two masks share a pivot."""
    piv = {log2(m) for m in masks}
    if len(piv) != len(masks):
        return None
    return len(piv | set(range(run_bits)))


def merge_segments(tile: int, t: int, logn: int, run_bits: int, fuse: bool) -> list[list[tuple[int, int]]]:
    """The merge steps of stages tile+1..logn cut into passes of cosets of t ≥ tile dimensions (lists of (stage,
    mask))."""
    if not fuse:
        out: list[list[tuple[int, int]]] = []
        for L in range(tile + 1, logn + 1):
            masks = stage_masks(L)
            high = [m for m in masks if log2(m) >= t]
            if high:  # stages up to t hold none (merge cosets larger than the tile)
                count = -(-len(high) // (t - run_bits))
                q, r = divmod(len(high), count)
                i = 0
                for c in range(count):
                    out.append([(L, m) for m in high[i:i + q + (c < r)]])
                    i += q + (c < r)
            out.append([(L, m) for m in masks if log2(m) < t])
        return out
    segs: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    for L in range(tile + 1, logn + 1):
        for m in stage_masks(L):
            d = _dims([c for _, c in cur] + [m], run_bits)
            if d is None or d > t or (m & (m - 1) and any(c & (c - 1) for _, c in cur)):  # one flip per coset
                segs.append(cur)
                cur = []
            cur.append((L, m))
    if cur:
        segs.append(cur)
    return segs


@dataclass(frozen=True)
class CudaPlan:
    n: int
    mode: str
    config: CudaSortConfig
    logn: int
    passes: tuple[PassSpec, ...] = field(default_factory=tuple)
    runs: int | None = None  # the plan stops at sorted runs of 2^runs slots, still encoded (None: sorts all)

    @property
    def run_bits(self) -> int:
        """log2 of the sorted runs the plan leaves: logn for a whole sort."""
        return self.logn if self.runs is None else self.runs

    @property
    def tile(self) -> int:
        return 1 << self.passes[0].t

    @property
    def threads(self) -> int:
        """Threads per block of the tile pass (``pass_threads`` for any pass)."""
        return self.pass_threads(0)

    def pass_threads(self, i: int) -> int:
        return 1 << (self.passes[i].t - self.passes[i].e)

    def grids(self) -> list[int]:
        return [p.active_blocks(self.n) for p in self.passes]


def build_cuda_plan(n: int, mode: str, config: CudaSortConfig = GPU_CUDA_CONFIG, runs: int | None = None) -> CudaPlan:
    """Every pass that sorts n slots of ``mode`` (keys32, keys64, composite key+index, pairs).

    ``runs``: stop after stage ``runs`` (tile bits <= runs < logn): every aligned run of 2^runs slots sorted, the keys
    left encoded in the workspace (no pass decodes) for a merge to finish (``impl.sort.merge``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    t, e = config.shape(mode)
    tm, em = config.shape(mode, merge=True)
    logn = padded_bits(n)
    if runs is not None and not t <= runs < logn:
        raise ValueError(f"runs must be in tile bits..logn - 1 ({t}..{logn - 1}) for n = {n}, got {runs}")
    top = logn if runs is None else runs
    wide = MODES[mode] > 4
    s = t if config.tile_stages is None or top <= t else min(config.tile_stages, t)
    passes = [tile_pass(t, e, wide, s)]
    if tm > logn:  # a coset never spans more than the padded size
        tm = max(logn, t)
        em = min(em, tm - LANE_BITS)
    for seg in (merge_segments(s, tm, top, config.run_bits, config.fuse) if top > s else []):
        passes.append(coset_pass([m for _, m in seg], tm, em, logn, wide, tuple(sorted({L for L, _ in seg}))))
    passes[0] = passes[0].with_flags(encode=True)
    if runs is None:
        passes[-1] = passes[-1].with_flags(decode=True)
    if config.fma_max and mode == "keys32":  # wider slots have no FMA form of their exchange
        passes[0] = replace(passes[0], fma=config.fma_max)
    return CudaPlan(n, mode, config, logn, tuple(passes), runs)


def predicted_passes(n: int, mode: str, config: CudaSortConfig = GPU_CUDA_CONFIG) -> int:
    return len(build_cuda_plan(n, mode, config).passes)
