"""The bitonic network, cut into passes over memory, and the per-pass programs the kernels execute.

Network (the "flip" form, every comparator ascending). For N = 2^L ≥ n virtual slots, stage k = 2, 4, ..., N is
one flip step with XOR mask k−1 (slot i meets its mirror i ^ (k−1) inside its k-block) followed by half-cleaner steps
with masks k/4, k/8, ..., 1. A step with mask m compares slots i and i ^ m and leaves the smaller key at the smaller
slot. Because every comparator sends the minimum to the lower slot, slots n..N−1 (virtual +inf pads) never receive a
real key, so they are never loaded or stored: any n ≥ 0 costs passes over n keys only, not over N.

Passes. A pass is a set of consecutive steps done in one read and one write of the keys:
  tile      a block holds T contiguous keys in shared memory and runs every step with mask < T (the first pass: all
            stages k ≤ T; after that, the T/2, ..., 1 half-cleaners that end each stage k > T);
  wide      a block holds a *coset* x0 ^ span(g_1..g_h) ⊕ [0, R) of T keys (h wide masks, runs of R = T/2^h
            consecutive keys, R ≥ min_run for coalescing) and runs those h steps in shared memory;
  register  a thread holds 2^F keys x ^ span(g_1..g_F) in registers and runs those F steps (no shared memory).
Inside a block, steps run in *rounds*: a thread takes a coset of E = 2^e slots of the tile into registers, does up to
e steps there, writes back, and the block syncs once per round instead of once per step.

A program (int64 array) tells a kernel everything about one pass; ``run_program_np`` executes the same arrays in numpy
(the CPU twin of the kernels, used by the tests at sizes the simulator cannot reach).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from impl import backend

GMAX = 16  # most wide masks one program holds
H_NROUNDS, H_H, H_R, H_FLAGS, H_LOWMASK = 0, 1, 2, 3, 4
H_GENS = 6
H_GPIVS = H_GENS + GMAX
H_ROUNDS = H_GPIVS + GMAX
VARIANTS = ("shared", "global")


@dataclass(frozen=True)
class SortConfig:
    """Kernel sizes. ``variant="global"`` is the ablation: every pass is a register pass straight from global memory."""

    variant: str = "shared"      # "shared" (tiles in shared memory) or "global" (no shared memory)
    shared_bytes: int = 32768    # shared memory per block: the tile is the largest power of two of keys that fits
    items_per_thread: int = 8    # E = 2^e keys a thread holds per round; e steps per round
    min_run: int = 32            # wide passes read runs of at least this many consecutive keys
    wide: str = "shared"         # strides wider than a tile: "shared" (coset tiles) or "registers"
    fused_strides: int = 4       # F: steps per register pass (wide="registers" and the global variant)
    global_threads: int = 256    # threads per block of register passes

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {self.variant!r}")
        if self.wide not in ("shared", "registers"):
            raise ValueError(f"wide must be 'shared' or 'registers', not {self.wide!r}")
        for name in ("items_per_thread", "min_run", "global_threads"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {v}")
        if self.items_per_thread < 2:
            raise ValueError("items_per_thread must be at least 2")
        if not 1 <= self.fused_strides <= 6:
            raise ValueError(f"fused_strides must be in 1..6 (2^F keys per thread), got {self.fused_strides}")

    def tile(self, elem_bytes: int) -> int:
        """Keys per block for ``elem_bytes`` bytes of shared memory per key (4 keys, 8 composite, 12 pairs)."""
        t = 1 << ((self.shared_bytes // elem_bytes).bit_length() - 1) if self.shared_bytes >= elem_bytes else 0
        if t < 2 * self.items_per_thread or t < 2 * self.min_run:
            raise ValueError(f"shared_bytes={self.shared_bytes} holds a tile of {t} keys of {elem_bytes} B: too small "
                             f"for items_per_thread={self.items_per_thread} and min_run={self.min_run}")
        if t // self.items_per_thread > 1024:
            raise ValueError(f"tile {t} / items_per_thread {self.items_per_thread} = {t // self.items_per_thread} "
                             "threads per block; CUDA allows 1024")
        return t

    @property
    def log_e(self) -> int:
        return self.items_per_thread.bit_length() - 1


GPU_CONFIG = SortConfig(wide="registers", items_per_thread=16)
"""The numba sorter's default, chosen by its tune experiment (10M float32, one graph, same run): wide strides in register
passes (3.27 ms vs 4.98 ms for coset tiles in shared memory), 16 keys per thread in the tile rounds (3.07 vs 3.27 ms;
key-value 3.85 vs 3.99 ms): fewer rounds and barriers in the shared-memory passes, which dominate (ncu: 76% of time)."""
CPU_CONFIG = SortConfig(shared_bytes=1024, items_per_thread=16, min_run=8, fused_strides=3, global_threads=32)
"""Small tiles (256 32-bit keys, 16 threads) so the simulator, one OS thread per CUDA thread, stays fast."""
TINY_CONFIG = SortConfig(shared_bytes=128, items_per_thread=4, min_run=4, fused_strides=2, global_threads=16)
"""32-key tiles: several wide passes per stage already at n ~ 1000 (tests of the multi-pass paths)."""


def default_config(variant: str = "shared") -> SortConfig:
    """The GPU configuration on a GPU, the tiny one under the simulator; ``variant="global"`` gives the ablation
    (one step per pass, the textbook global-memory bitonic sort)."""
    base = backend.sized(GPU_CONFIG, CPU_CONFIG)
    return base if variant == "shared" else replace(base, variant="global", fused_strides=1)


# ---- the network ----------------------------------------------------------------------------------------------

def log2(x: int) -> int:
    return x.bit_length() - 1


def padded_size(n: int) -> int:
    """N: the power of two the network runs on (1 for n ≤ 1)."""
    return 1 << max(n - 1, 0).bit_length()


def stage_steps(k: int) -> list[int]:
    """XOR masks of stage k: the flip k−1, then the half-cleaners k/4, ..., 1."""
    return [k - 1] + [k >> s for s in range(2, log2(k) + 1)]


def network_steps(n_slots: int) -> list[int]:
    """Every step of the bitonic network on ``n_slots`` (a power of two) slots, in order."""
    return [m for L in range(1, log2(n_slots) + 1) for m in stage_steps(1 << L)]


# ---- passes ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pass:
    kind: str                 # "tile", "wide" or "register"
    steps: tuple[int, ...]    # XOR masks, in network order
    encode: bool = False      # first pass: reads raw values and makes keys
    decode: bool = False      # last pass: writes values (keys-only) or indices (argsort)


@dataclass(frozen=True)
class Plan:
    """All passes of one sort of n keys, with the sizes the launcher needs."""

    n: int
    n_slots: int
    tile: int
    config: SortConfig
    passes: tuple[Pass, ...] = field(default_factory=tuple)

    @property
    def steps(self) -> list[int]:
        return [m for p in self.passes for m in p.steps]


def _chunks(steps: list[int], most: int) -> list[list[int]]:
    """Split ``steps`` into the fewest runs of at most ``most``, as even as possible (longer runs first)."""
    if not steps:
        return []
    count = -(-len(steps) // most)
    q, r = divmod(len(steps), count)
    out, i = [], 0
    for c in range(count):
        size = q + (c < r)
        out.append(steps[i:i + size])
        i += size
    return out


def build_plan(n: int, elem_bytes: int, config: SortConfig) -> Plan:
    """The passes that sort n keys of ``elem_bytes`` bytes each (4 keys, 8 composite key+index, 12 key+index pair)."""
    N = padded_size(n)
    T = config.tile(elem_bytes) if config.variant == "shared" else 0
    passes: list[Pass] = []
    if config.variant == "global":
        for L in range(1, log2(N) + 1):
            passes += [Pass("register", tuple(c)) for c in _chunks(stage_steps(1 << L), config.fused_strides)]
        passes = passes or [Pass("register", ())]  # n ≤ 1: one pass still encodes and decodes
    else:
        passes.append(Pass("tile", tuple(network_steps(min(N, T)))))
        h_max = log2(T // config.min_run)
        for L in range(log2(T) + 1, log2(N) + 1):
            steps = stage_steps(1 << L)
            wide = [m for m in steps if m >= T]
            if config.wide == "shared":
                passes += [Pass("wide", tuple(c)) for c in _chunks(wide, h_max)]
            else:
                passes += [Pass("register", tuple(c)) for c in _chunks(wide, config.fused_strides)]
            passes.append(Pass("tile", tuple(m for m in steps if m < T)))
    passes[0] = replace(passes[0], encode=True)
    passes[-1] = replace(passes[-1], decode=True)
    return Plan(n, N, T, config, tuple(passes))


# ---- programs -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Round:
    count: int                  # active steps (the first ``count`` masks); the rest only shape the coset
    smasks: tuple[int, ...]     # e masks in the block's slot space (shared index or, for register passes, global)
    gpivs: tuple[int, ...]      # pivot bit (highest set bit) of each mask's global counterpart
    deps: tuple[int, ...]       # deps[i] bit j: global mask j has bit gpivs[i] set (decides which slot is lower)
    spivs: tuple[int, ...]      # pivot bits of the slot-space masks, ascending (zeros of a coset representative)


def _make_round(active: list[int], log_slots: int, log_e: int, global_of) -> Round:
    pivots = {log2(m) for m in active}
    fillers = [1 << b for b in range(log_slots) if b not in pivots][: log_e - len(active)]
    masks = active + fillers
    g = [global_of(m) for m in masks]
    gpivs = [log2(x) for x in g]
    deps = [sum(((g[j] >> gpivs[i]) & 1) << j for j in range(len(masks)) if j != i) for i in range(len(masks))]
    return Round(len(active), tuple(masks), tuple(gpivs), tuple(deps), tuple(sorted(log2(m) for m in masks)))


def _rounds(smasks: list[int], log_slots: int, log_e: int, global_of) -> list[Round]:
    """Greedy rounds: consecutive steps while their pivots are distinct and at most e of them."""
    rounds, cur = [], []
    for m in smasks:
        if len(cur) == log_e or log2(m) in {log2(c) for c in cur}:
            rounds.append(_make_round(cur, log_slots, log_e, global_of))
            cur = []
        cur.append(m)
    if cur:
        rounds.append(_make_round(cur, log_slots, log_e, global_of))
    return rounds


@dataclass(frozen=True)
class Program:
    """One pass as the kernel sees it; ``array`` is what is uploaded."""

    kind: str
    gens: tuple[int, ...]   # wide/register masks (global), empty for tile passes
    r: int                  # log2 of the run length (block kernels); 0 for register passes
    lowmask: int            # a block/thread whose x0 & ~lowmask >= n holds only pads and exits
    rounds: tuple[Round, ...]
    log_e: int
    encode: bool
    decode: bool

    @property
    def array(self) -> np.ndarray:
        e = self.log_e
        a = np.zeros(H_ROUNDS + len(self.rounds) * (1 + 4 * e), dtype=np.int64)
        a[H_NROUNDS], a[H_H], a[H_R] = len(self.rounds), len(self.gens), self.r
        a[H_FLAGS] = (1 if self.encode else 0) | (2 if self.decode else 0)
        a[H_LOWMASK] = self.lowmask
        a[H_GENS:H_GENS + len(self.gens)] = self.gens
        a[H_GPIVS:H_GPIVS + len(self.gens)] = sorted(log2(g) for g in self.gens)
        for i, rd in enumerate(self.rounds):
            b = H_ROUNDS + i * (1 + 4 * e)
            a[b] = rd.count
            a[b + 1:b + 1 + 4 * e] = rd.smasks + rd.gpivs + rd.deps + rd.spivs
        return a


def make_program(p: Pass, tile: int, log_e: int) -> Program:
    """Translate one pass into slot-space rounds for its kernel (see the module doc)."""
    if len(p.steps) > GMAX and p.kind != "tile":
        raise ValueError(f"a {p.kind} pass holds at most {GMAX} masks, got {len(p.steps)}")
    flip = [m for m in p.steps if (m & (m + 1)) == 0]  # k−1 masks: their positions stay inside one k-block
    lowmask = max(flip) if (flip and p.kind != "tile") else 0
    if p.kind == "tile":
        rounds = _rounds(list(p.steps), log2(tile), log_e, lambda m: m)
        return Program("tile", (), log2(tile), 0, tuple(rounds), log_e, p.encode, p.decode)
    if p.kind == "register":
        f = len(p.steps)
        rd = _make_round(list(p.steps), 64, f, lambda m: m) if f else Round(0, (), (), (), ())
        return Program("register", p.steps, 0, lowmask, (rd,), f, p.encode, p.decode)
    h = len(p.steps)
    r = log2(tile) - h
    gens = p.steps

    def global_of(m: int) -> int:
        b = log2(m)
        return m if b < r else gens[b - r]

    rounds = _rounds([1 << (r + g) for g in range(h)], log2(tile), log_e, global_of)
    return Program("wide", gens, r, lowmask, tuple(rounds), log_e, p.encode, p.decode)


# ---- the numpy twin of the kernels ----------------------------------------------------------------------------

def deposit_zeros(v: np.ndarray, pivots) -> np.ndarray:
    """Insert a zero bit at each (ascending) bit position of ``pivots`` into ``v``."""
    v = v.astype(np.int64)
    for p in pivots:
        v = ((v >> p) << (p + 1)) | (v & ((1 << p) - 1))
    return v


def slot_position(x0: np.ndarray, s: np.ndarray, prog: Program) -> np.ndarray:
    """Global position of slot ``s`` of the coset with representative ``x0``: x0 ^ G(s >> r) ^ (s mod 2^r)."""
    pos = x0 ^ (s & ((1 << prog.r) - 1))
    for j, g in enumerate(prog.gens):
        pos = pos ^ np.where((s >> (prog.r + j)) & 1, g, 0)
    return pos


def _round_np(vals: np.ndarray, rd: Round, ords: np.ndarray) -> None:
    """Run one round in place on ``vals[..., c]`` (the 2^e slots of each coset); ``ords`` = position of slot 0."""
    E = vals.shape[-1]
    for i in range(rd.count):
        for c in range(E):
            if (c >> i) & 1:
                continue
            d = c | (1 << i)
            c_low = (((ords >> rd.gpivs[i]) & 1) ^ (bin(c & rd.deps[i]).count("1") & 1)) == 0
            a, b = vals[..., c].copy(), vals[..., d].copy()
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            vals[..., c] = np.where(c_low, lo, hi)
            vals[..., d] = np.where(c_low, hi, lo)


def run_program_np(prog: Program, slots: np.ndarray, tile: int) -> None:
    """Execute one pass on ``slots`` (all N keys, pads included, any integer dtype) exactly as the kernel does."""
    N = slots.size
    if prog.kind == "register":
        f = len(prog.gens)
        rd = prog.rounds[0]
        x = deposit_zeros(np.arange(N >> f), rd.spivs)
        pos = np.stack([x ^ _xor_of(prog.gens, c) for c in range(1 << f)], axis=-1)
        vals = slots[pos]
        _round_np(vals, rd, x)
        slots[pos] = vals
        return
    e = prog.log_e
    gpivs = sorted(log2(g) for g in prog.gens)
    x0 = deposit_zeros(np.arange(max(N // tile, 1)) << prog.r, gpivs)[:, None]
    tile_vals = slots[slot_position(x0, np.arange(tile)[None, :], prog)]
    for rd in prog.rounds:
        s0 = deposit_zeros(np.arange(tile >> e), rd.spivs)
        s = np.stack([s0 ^ _xor_of(rd.smasks, c) for c in range(1 << e)], axis=-1)  # [P, E] slot indices
        vals = tile_vals[:, s]
        _round_np(vals, rd, slot_position(x0, s0[None, :], prog))
        tile_vals[:, s] = vals
    slots[slot_position(x0, np.arange(tile)[None, :], prog)] = tile_vals


def _xor_of(masks, c: int) -> int:
    out = 0
    for j, m in enumerate(masks):
        if (c >> j) & 1:
            out ^= m
    return out


def sort_keys_np(keys: np.ndarray, plan: Plan) -> np.ndarray:
    """Sort integer keys by running every program of ``plan`` in numpy on a padded copy; returns the first n."""
    big = np.iinfo(keys.dtype).max
    slots = np.full(plan.n_slots if plan.config.variant == "global" else max(plan.n_slots, plan.tile), big,
                    dtype=keys.dtype)
    slots[: keys.size] = keys
    for p in plan.passes:
        run_program_np(make_program(p, plan.tile, plan.config.log_e), slots, plan.tile)
        if np.any(slots[keys.size:] != big):
            raise AssertionError("a real key reached a pad slot: the min-to-lower invariant is broken")
    return slots[: keys.size]
