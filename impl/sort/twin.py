"""The numpy twin of the CUDA C++ sort: runs a ``CudaPlan`` pass by pass, block by block, as ``bitonic.cu`` does.

Each pass gathers every active block's slots (``PassSpec`` coordinates; pads +inf), complements the flip half
(coset passes), applies the rounds' ops in order on all blocks at once (vectorised over blocks and slot pairs),
un-complements and scatters back the real slots only. Register/lane/warp layouts move no data, so the twin checks
them structurally (``check_pass``) instead. Keys are unsigned integers of any width (the tests give it uint32 or
uint64 order keys); ``~`` and the pad are taken at that width.
"""
from __future__ import annotations

import numpy as np

from impl.sort.plan import LANES0, CudaPlan, PassSpec, stage_masks


def slot_positions(spec: PassSpec, blocks: int) -> np.ndarray:
    """[blocks, 2^t] positions: x0(block) ^ XOR of the basis vectors selected by each slot's coordinates."""
    x0 = np.array([spec.x0(b) for b in range(blocks)], dtype=np.int64)
    s = np.arange(1 << spec.t, dtype=np.int64)
    g = np.zeros_like(s)
    for i, b in enumerate(spec.basis):
        g ^= np.where((s >> i) & 1, b, 0)
    return x0[:, None] ^ g[None, :]


def apply_ops(vals: np.ndarray, spec: PassSpec, positions: np.ndarray) -> None:
    """Run every op of every round in place on ``vals`` [blocks, 2^t] (complement domain for coset passes)."""
    s = np.arange(1 << spec.t)
    for rnd in spec.rounds:
        for op in rnd.ops:
            if op.kind == "xor":
                bit = np.zeros(positions.shape, dtype=bool)
                for c in (op.a, op.b):
                    if c >= 0:
                        bit ^= ((positions >> c) & 1).astype(bool)
                vals[bit] = ~vals[bit]
                continue
            lo = s[((s >> op.a) & 1) == 0]
            hi = lo | (1 << op.a)
            a, b = vals[:, lo].copy(), vals[:, hi].copy()
            if op.kind == "flip":
                vals[:, lo], vals[:, hi] = np.minimum(a, ~b), np.minimum(~a, b)
            else:
                vals[:, lo], vals[:, hi] = np.minimum(a, b), np.maximum(a, b)


def run_pass(spec: PassSpec, slots: np.ndarray, n: int, blocks: int | None = None) -> None:
    """One pass over ``slots`` (n real keys; positions ≥ n are never read or written) on its first ``blocks`` cosets
    (None: the ones it launches, ``active_blocks``)."""
    pad = np.iinfo(slots.dtype).max
    blocks = spec.active_blocks(n) if blocks is None else blocks
    if blocks == 0:
        return
    pos = slot_positions(spec, blocks)
    real = pos < n
    vals = np.full(pos.shape, pad, dtype=slots.dtype)
    vals[real] = slots[pos[real]]
    if spec.f >= 0:
        cpl = ((np.arange(1 << spec.t) >> spec.f) & 1).astype(bool)
        vals[:, cpl] = ~vals[:, cpl]
    apply_ops(vals, spec, pos & ((1 << spec.t) - 1) if spec.kind == "tile" else pos)
    if spec.f >= 0:
        vals[:, cpl] = ~vals[:, cpl]
    if not np.all(vals[~real] == pad):
        raise AssertionError(f"{spec.kind} pass {spec.key}: a real key reached a pad slot")
    slots[pos[real]] = vals[real]


def sort_twin(keys: np.ndarray, plan: CudaPlan) -> np.ndarray:
    """Sorted copy of unsigned integer ``keys`` through every pass of ``plan`` (plan.n must equal keys.size)."""
    if keys.size != plan.n:
        raise ValueError(f"plan is for n={plan.n}, got {keys.size} keys")
    out = keys.copy()
    for spec in plan.passes:
        run_pass(spec, out, plan.n)
    return out


def check_pass(spec: PassSpec) -> None:
    """Structural rules the kernel generator relies on; AssertionError naming the broken one."""
    t, e = spec.t, spec.e
    for rnd in spec.rounds:
        lay = rnd.layout
        assert sorted(lay.coords()) == list(range(t)), f"layout {lay} is not a permutation of {t} coordinates"
        assert len(lay.regs) == e and len(lay.lanes) == 5, f"layout {lay}: {e} registers and 5 lanes expected"
        for op in rnd.ops:
            if op.kind != "xor":
                assert op.a in lay.regs, f"op {op} runs on a coordinate that is not a register in {lay}"
            if op.kind == "flip":
                assert op.a == spec.f, f"flip op {op} is not on the flip coordinate {spec.f}"
    for which in (spec.rounds[0].layout, spec.rounds[-1].layout):
        assert which.lanes == LANES0, f"load/store layout {which} does not put lanes on coordinates 0..4"
        assert spec.f < 0 or spec.f in which.regs, f"load/store layout {which} lacks the flip coordinate"
    pivots = spec.pivots
    assert list(pivots) == sorted(set(pivots)), f"basis {spec.basis} is not in ascending distinct pivot order"
    for b in spec.basis:
        assert b == 1 << b.bit_length() - 1 or b == (1 << b.bit_length()) - 1, f"basis vector {b:#x} is neither"


def check_plan(plan: CudaPlan) -> None:
    """Every pass is well formed, the tile pass performs stages 1..S, and the merge passes perform exactly the
    flip-form steps of stages S+1..LOGN (S+1..runs for a plan that stops at sorted runs, and decodes nowhere)."""
    for spec in plan.passes:
        check_pass(spec)
    last = len(plan.passes[0].stages)
    assert plan.passes[0].stages == tuple(range(1, last + 1)) and last <= plan.passes[0].t
    want = [m for L in range(last + 1, plan.run_bits + 1) for m in stage_masks(L)]
    got = [m for spec in plan.passes[1:] for m in spec.masks]
    assert got == want, "merge passes do not perform the network's steps in order"
    assert plan.passes[0].encode and plan.passes[-1].decode == (plan.runs is None)
    assert sum(p.encode for p in plan.passes) == 1 and sum(p.decode for p in plan.passes) == (plan.runs is None)
