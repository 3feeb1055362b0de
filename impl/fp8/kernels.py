"""Triton kernels: FP8 dequantize and requantize (static and dynamic scales) for every scale group.

Math (one scale group G of an [N, K] matrix; see ``formats``):
  dequantize   y = round_out(decode(q) * s)                                   float32 product, one rounding to out
  requantize   amax = max over G of |x| (finite values only; 0 if none)
               s    = amax / FMAX  (IEEE division), clamped to >= MIN_SCALE; 1.0 when amax == 0
               q    = encode(clamp(x * (1 / s), -FMAX, FMAX))                 RNE; NaN stays NaN; +-inf -> +-FMAX
Every step is float32 with correctly rounded division (``tl.math.div_rn``: Triton's ``/`` is approximate on NVIDIA),
so ``reference.py`` reproduces the codes and scales bit for bit.

FP8 travels as uint8 codes. On the GPU they are bitcast to Triton's fp8 types and converted by the hardware
(``cvt`` with round-to-nearest-even). Under ``TRITON_INTERPRET=1`` that conversion is wrong (checked with triton
3.8: codes 0x7F/0xFF decode to +-480 instead of NaN, e5m2 infinities to finite values, and fp32 -> fp8 truncates
instead of rounding and mishandles subnormals), so there ``EMULATE=True`` selects an exact bit-level codec written
with integer ops (``_decode_bits``/``_encode_bits``); a GPU test checks the codec against the hardware on all codes.

Tiles are [BM, BK] of a row-major matrix (column stride 1), numbered with the column tile varying fastest, so the
programs in flight at one time stream consecutive bytes of the same rows. A launch has one program per tile, or
fewer that stride over the tiles (persistent: ``quant.LaunchConfig.per_sm``; with ``PREFETCH`` such a program loads
its next tile before converting the current one, so its loads stay in flight during the math and the stores).
``_apply_scales`` reads a tile's scales in the cheapest shape its position in the scale groups allows (one value,
one per row, one per column, or one per element). Per-tensor dynamic scales come from per-program amax partials
that every quantizing program reduces itself (no atomics, no zeroed buffer); the delayed variant quantizes with the
previous call's amax (one float) and max-es this call's into another with one atomic a program, so it reads its input
once at any grid (three slots rotate: the one read, the one max-ed into, and the one zeroed for the next call); the
second read of the dynamic variant goes last tile first (``REVERSE``), so the tail the amax pass has just read comes
from L2. ``EVICT`` gives the streamed data the L2 policy evict_first (``_ld``/``store_stream``): a stream that is read
or written once then recycles its own lines in L2 instead of evicting other work's (and writing back that work's dirty
lines inside its own time).

At the copy bandwidth a 16-bit -> FP8 requantize leaves about 20 issued instructions an element (H200: 132 SMs x 4
schedulers x ~1.9 GHz x 32 lanes over 3 bytes an element at ~4.3 TB/s), so the kernels keep the work an element
small: maxima in x's own 16-bit type as packed pairs (``_finite_abs``), the hardware conversion's own saturation
(``_encode``), and 1 x G groups laid out so that 2 lanes share a group instead of 16
(``quant_groups_kernel``: a group's scale arithmetic is repeated by every lane holding part of it).
"""
from __future__ import annotations

import impl  # noqa: F401  (backend before triton)
import triton
import triton.language as tl

# ---- the FP8 codec -------------------------------------------------------------------------------------------


@triton.jit
def _decode_bits(b, FMT: tl.constexpr):
    """uint8 FP8 codes -> float32, exactly, with integer ops only (NaN, inf, subnormals, -0.0 included)."""
    b = b.to(tl.int32)
    if FMT == 0:  # e4m3fn: bias 7, 3 mantissa bits, S.1111.111 is NaN, no infinities
        e = (b >> 3) & 0xF
        m = b & 0x7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2^-9
        mag = tl.where((b & 0x7F) == 0x7F, float("nan"), mag)
    else:  # e5m2: bias 15, 2 mantissa bits, IEEE specials
        e = (b >> 2) & 0x1F
        m = b & 0x3
        normal = (((e + 112) << 23) | (m << 21)).to(tl.float32, bitcast=True)
        mag = tl.where(e == 0, m.to(tl.float32) * 0.0000152587890625, normal)  # subnormal: m * 2^-16
        mag = tl.where(e == 31, tl.where(m == 0, float("inf"), float("nan")), mag)
    # OR the sign bit in (a select of -mag would lose -0.0 on the GPU compiler)
    return (mag.to(tl.int32, bitcast=True) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _encode_bits(y, FMT: tl.constexpr):
    """float32 already inside [-FMAX, FMAX] (or NaN) -> uint8 FP8 codes, round to nearest even."""
    if FMT == 0:
        MAN = 3
        BIAS = 7
        MIN_NORMAL = 0.015625  # 2^-6
        SUB_SCALE = 512.0  # 2^9: one subnormal step is 2^-9
    else:
        MAN = 2
        BIAS = 15
        MIN_NORMAL = 0.00006103515625  # 2^-14
        SUB_SCALE = 65536.0  # 2^16
    SHIFT = 23 - MAN
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    ay = a.to(tl.float32, bitcast=True)
    # normal range: round the float32 mantissa to MAN bits (ties to even); a carry bumps the exponent, as it must
    r = (a + ((1 << (SHIFT - 1)) - 1) + ((a >> SHIFT) & 1)) >> SHIFT
    normal = r - ((127 - BIAS) << MAN)
    # subnormal range: k = rne(|y| / step); 2^23 + t - 2^23 rounds t to an integer, ties to even, for 0 <= t < 2^22
    t = tl.where(ay < MIN_NORMAL, ay, 0.0) * SUB_SCALE  # (NaN -> 0: no float->int cast of NaN)
    k = ((t + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(ay < MIN_NORMAL, k, normal)
    code = tl.where(y != y, 0x7F, code) | sign
    return code.to(tl.uint8)


@triton.jit
def _decode(b, FMT: tl.constexpr, EMULATE: tl.constexpr):
    if EMULATE:
        return _decode_bits(b, FMT)
    if FMT == 0:
        return b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return b.to(tl.float8e5, bitcast=True).to(tl.float32)


@triton.jit
def _saturate(y, FMAX: tl.constexpr):
    """Clamp to [-FMAX, FMAX]; comparisons with NaN are false, so NaN passes through."""
    y = tl.where(y > FMAX, FMAX, y)
    return tl.where(y < -FMAX, -FMAX, y)


@triton.jit
def _encode(y, FMT: tl.constexpr, FMAX: tl.constexpr, EMULATE: tl.constexpr):
    """FP8 codes of float32 y clamped to [-FMAX, FMAX] (+-inf -> +-FMAX, NaN stays NaN), round to nearest even. The
    hardware conversion clamps by itself (``cvt.rn.satfinite``), so only the bit codec is given clamped values: two
    float32 compares and selects an element fewer on the GPU."""
    if EMULATE:
        return _encode_bits(_saturate(y, FMAX), FMT)
    if FMT == 0:
        return y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    return y.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)


@triton.jit
def _scale_from_amax(amax, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    s = tl.math.div_rn(amax, FMAX)
    s = tl.where(s < MIN_SCALE, MIN_SCALE, s)
    return tl.where(amax > 0, s, 1.0)


@triton.jit
def _max_finite_abs(acc, x):
    """acc (x's type) maxed element by element with x's finite |x| (``_finite_abs``; maximum is maxnum, so a NaN
    from inf leaves acc as it was)."""
    return tl.maximum(acc, _finite_abs(x)).to(acc.dtype)


@triton.jit
def _finite_abs(x):
    """|x| where x is finite, NaN where it is not (x * 0 + |x|: inf * 0 is NaN). Maxima ignore NaN (``tl.max`` and
    ``tl.maximum`` are maxnum), so a maximum over these is the amax of the finite values: NaN only if the group has
    none, which ``_scale_from_amax`` maps to scale 1 as it does 0. In x's own type: one packed fma a pair of 16-bit
    values (|x| is an operand modifier), where a compare and two selects of each value would replace them by 0."""
    return x * 0.0 + tl.abs(x)


# ---- tiles and scale groups ----------------------------------------------------------------------------------


@triton.jit
def tile_coords(t, K, BM: tl.constexpr, BK: tl.constexpr):
    """Tile number t -> (first row, first column, its rows [BM], its columns [BK]). The column tile varies fastest, so
    the programs that run at the same time read consecutive bytes of the same rows (whole DRAM pages), not one narrow
    column of many rows."""
    nk = tl.cdiv(K, BK)
    m0, k0 = (t // nk) * BM, (t % nk) * BK
    return m0, k0, m0 + tl.arange(0, BM), k0 + tl.arange(0, BK)


@triton.jit
def _ld(ptrs, mask, EVICT: tl.constexpr):
    """Load of streamed data (read once), 0 where masked; EVICT > 0: with the L2 policy evict_first, so the stream
    replaces its own lines in L2 rather than other data (dirty lines of earlier work, which would be written back)."""
    if EVICT > 0:
        return tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def store_stream(ptrs, value, mask, EVICT: tl.constexpr):
    """Store of a streamed result; EVICT == 2: with the L2 policy evict_first (written back before other lines)."""
    if EVICT == 2:
        tl.store(ptrs, value, mask=mask, eviction_policy="evict_first")
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def load_tile(ptr, t, tiles, N, K, stride, BM: tl.constexpr, BK: tl.constexpr, EVICT: tl.constexpr):
    """Tile t [BM, BK] of a row-major [N, K] matrix with row stride ``stride``, 0 outside it; all 0 (nothing read)
    when t is not in [0, tiles) (the prefetch past a program's last tile)."""
    m0, k0, rows, cols = tile_coords(t, K, BM, BK)
    mask = (rows < N)[:, None] & (cols < K)[None, :] & (t < tiles) & (t >= 0)
    return _ld(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask, EVICT)


@triton.jit
def _order(i, tiles, REVERSE: tl.constexpr):
    """The tile a program's i-th position in the grid-stride order covers: i, or REVERSE: tiles - 1 - i (last tile
    first; may be negative past the end, which ``load_tile`` reads as nothing)."""
    if REVERSE:
        return tiles - 1 - i
    return i


@triton.jit
def _apply_scales(y, s_ptr, rows, m0, k0, cols, N, K, stride_s,
                  GN: tl.constexpr, GK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, INVERT: tl.constexpr):
    """y * s (INVERT: y * (1 / s), the reciprocal correctly rounded) with s the scale of each element's group.

    The scales are read in the cheapest shape the tile allows: one scalar (per-tensor), one per row ([BM, 1]: rows
    of a group, or a tile inside one column group), one per column ([1, BK]: a tile inside one row group spanning
    several column groups), else one per element."""
    if GN == 0 and GK == 0:
        s = tl.load(s_ptr)
    elif GK == 0 or BK <= GK:
        r = (rows // GN).to(tl.int64) if GN > 0 else (rows * 0).to(tl.int64)
        c = 0 if GK == 0 else k0 // GK
        s = tl.load(s_ptr + r * stride_s + c, mask=rows < N, other=1.0)[:, None]
    elif GN == 0 or GN >= BM:
        r0 = 0 if GN == 0 else (m0 // GN).to(tl.int64)  # BM divides GN: the tile is in one row group
        s = tl.load(s_ptr + r0 * stride_s + cols // GK, mask=cols < K, other=1.0)[None, :]
    else:
        r = (rows // GN).to(tl.int64)
        m = (rows < N)[:, None] & (cols < K)[None, :]
        s = tl.load(s_ptr + r[:, None] * stride_s + (cols // GK)[None, :], mask=m, other=1.0)
    if INVERT:
        s = tl.math.div_rn(1.0, s)
    return y * s


# ---- dequantize ----------------------------------------------------------------------------------------------


@triton.jit
def _dequant_tile(b, t, s_ptr, out_ptr, N, K, stride_s, stride_o,
                  GN: tl.constexpr, GK: tl.constexpr, FMT: tl.constexpr, EMULATE: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr, EVICT: tl.constexpr):
    """Store tile t of y = decode(b) * s (b: its codes, already loaded)."""
    m0, k0, rows, cols = tile_coords(t, K, BM, BK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    y = _apply_scales(_decode(b, FMT, EMULATE), s_ptr, rows, m0, k0, cols, N, K, stride_s, GN, GK, BM, BK, False)
    store_stream(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask,
                 EVICT)


@triton.jit
def dequant_kernel(q_ptr,          # uint8 codes [N, K], row stride stride_q
                   s_ptr,          # float32 scales [R, C], row stride stride_s
                   out_ptr,        # [N, K] float32/float16/bfloat16, row stride stride_o
                   N, K, stride_q, stride_s, stride_o,
                   GN: tl.constexpr, GK: tl.constexpr,          # scale group (0 = whole dimension)
                   FMT: tl.constexpr, EMULATE: tl.constexpr,    # 0 e4m3fn / 1 e5m2; bit codec under the interpreter
                   BM: tl.constexpr, BK: tl.constexpr,
                   PREFETCH: tl.constexpr,    # persistent: load the next tile before converting this one
                   EVICT: tl.constexpr):  # 1: streamed loads evict_first in L2; 2: stores too
    """One [BM, BK] tile per step; programs stride over the tiles (grid = tiles, or fewer: persistent)."""
    tiles = tl.cdiv(N, BM) * tl.cdiv(K, BK)
    step = tl.num_programs(0)
    if PREFETCH:
        b = load_tile(q_ptr, tl.program_id(0), tiles, N, K, stride_q, BM, BK, EVICT)
        for t in range(tl.program_id(0), tiles, step):
            nb = load_tile(q_ptr, t + step, tiles, N, K, stride_q, BM, BK, EVICT)
            _dequant_tile(b, t, s_ptr, out_ptr, N, K, stride_s, stride_o, GN, GK, FMT, EMULATE, BM, BK, EVICT)
            b = nb
    else:
        for t in range(tl.program_id(0), tiles, step):
            b = load_tile(q_ptr, t, tiles, N, K, stride_q, BM, BK, EVICT)
            _dequant_tile(b, t, s_ptr, out_ptr, N, K, stride_s, stride_o, GN, GK, FMT, EMULATE, BM, BK, EVICT)


# ---- requantize with given scales (static), or a per-tensor scale from an amax ---------------------------------


@triton.jit
def amax_partials_kernel(x_ptr,      # [N, K] input, row stride stride_x
                         part_ptr,   # float32 [num_programs] out: the amax of the tiles each program read
                         N, K, stride_x,
                         BM: tl.constexpr, BK: tl.constexpr,
                         PREFETCH: tl.constexpr,  # load the program's next tile before reducing this one
                         EVICT: tl.constexpr):  # 1 or 2: the loads evict_first in L2
    """Per-program amax of finite |x| over a strided share of the tiles; no atomics, no zeroed buffer needed."""
    acc = tl.zeros((BM, BK), dtype=x_ptr.dtype.element_ty)  # maxima are exact in x's type: packed 16-bit pairs
    tiles = tl.cdiv(N, BM) * tl.cdiv(K, BK)
    step = tl.num_programs(0)
    if PREFETCH:
        x = load_tile(x_ptr, tl.program_id(0), tiles, N, K, stride_x, BM, BK, EVICT)
        for t in range(tl.program_id(0), tiles, step):
            nx = load_tile(x_ptr, t + step, tiles, N, K, stride_x, BM, BK, EVICT)
            acc = _max_finite_abs(acc, x)
            x = nx
    else:
        for t in range(tl.program_id(0), tiles, step):
            x = load_tile(x_ptr, t, tiles, N, K, stride_x, BM, BK, EVICT)
            acc = _max_finite_abs(acc, x)
    tl.store(part_ptr + tl.program_id(0), tl.max(tl.max(acc, axis=1), axis=0).to(tl.float32))


@triton.jit
def _tensor_scale(part_ptr, n_parts, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr, PARTS: tl.constexpr):
    """The per-tensor scale from the per-program amax partials (a few KB, read from L2 by every program)."""
    i = tl.arange(0, PARTS)
    return _scale_from_amax(tl.max(tl.load(part_ptr + i, mask=i < n_parts, other=0.0), axis=0), FMAX, MIN_SCALE)


@triton.jit
def _quant_tile(xin, t, acc, s_ptr, q_ptr, inv, N, K, stride_s, stride_q,
                GN: tl.constexpr, GK: tl.constexpr, FROM_PARTS: tl.constexpr, NEXT_AMAX: tl.constexpr,
                FMT: tl.constexpr, FMAX: tl.constexpr, EMULATE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                EVICT: tl.constexpr):
    """Store the codes of tile t (xin: its values, already loaded); returns acc, with NEXT_AMAX max-ed with |x|."""
    m0, k0, rows, cols = tile_coords(t, K, BM, BK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    x = xin.to(tl.float32)
    if NEXT_AMAX:
        acc = _max_finite_abs(acc, xin)
    if FROM_PARTS:
        y = x * inv
    else:
        y = _apply_scales(x, s_ptr, rows, m0, k0, cols, N, K, stride_s, GN, GK, BM, BK, True)
    store_stream(q_ptr + rows.to(tl.int64)[:, None] * stride_q + cols[None, :], _encode(y, FMT, FMAX, EMULATE), mask,
                 EVICT)
    return acc


@triton.jit
def quant_static_kernel(x_ptr,      # [N, K] float32/float16/bfloat16, row stride stride_x
                        s_ptr,      # float32 scales [R, C] (FROM_PARTS: float32 amax partials [n_parts])
                        q_ptr,      # uint8 codes out [N, K], row stride stride_q
                        so_ptr,     # FROM_PARTS: float32 [1] out, receives the per-tensor scale
                        next_ptr,   # NEXT_AMAX: float32 [1], 0 on entry: atomically max-ed with this input's amax
                        clear_ptr,  # NEXT_AMAX: float32 [1], set to 0 (the slot the next call's amax goes to)
                        N, K, stride_x, stride_s, stride_q, n_parts,
                        GN: tl.constexpr, GK: tl.constexpr,
                        FROM_PARTS: tl.constexpr,   # scale = max(partials) / FMAX (dynamic or delayed per-tensor)
                        NEXT_AMAX: tl.constexpr,    # also record this input's amax (delayed scaling: next call's scale)
                        PARTS: tl.constexpr,        # power of two >= n_parts
                        FMT: tl.constexpr, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr, EMULATE: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr,
                        PREFETCH: tl.constexpr,  # load the program's next tile before converting this one
                        EVICT: tl.constexpr,     # 1: streamed loads evict_first in L2; 2: stores too
                        REVERSE: tl.constexpr):  # last tile first (a second read right after a forward first one)
    """Quantize with given scales (or one from amax partials). REVERSE serves the second read of dynamic per-tensor:
    the amax pass has just streamed x forward, so x's last tiles are still in L2 and are converted first.
    NEXT_AMAX: each program max-es its share's amax into one float (an atomic a program: any grid, one value for the
    next call to read), and program 0 zeroes the slot the next call max-es into (no other program touches it)."""
    inv = 1.0
    if FROM_PARTS:
        s = _tensor_scale(s_ptr, n_parts, FMAX, MIN_SCALE, PARTS)
        inv = tl.math.div_rn(1.0, s)
        if tl.program_id(0) == 0:
            tl.store(so_ptr, s)
    acc = tl.zeros((BM, BK), dtype=x_ptr.dtype.element_ty)
    tiles = tl.cdiv(N, BM) * tl.cdiv(K, BK)
    step = tl.num_programs(0)
    if PREFETCH:
        x = load_tile(x_ptr, _order(tl.program_id(0), tiles, REVERSE), tiles, N, K, stride_x, BM, BK, EVICT)
        for i in range(tl.program_id(0), tiles, step):
            nx = load_tile(x_ptr, _order(i + step, tiles, REVERSE), tiles, N, K, stride_x, BM, BK, EVICT)
            acc = _quant_tile(x, _order(i, tiles, REVERSE), acc, s_ptr, q_ptr, inv, N, K, stride_s, stride_q, GN, GK,
                              FROM_PARTS, NEXT_AMAX, FMT, FMAX, EMULATE, BM, BK, EVICT)
            x = nx
    else:
        for i in range(tl.program_id(0), tiles, step):
            t = _order(i, tiles, REVERSE)
            x = load_tile(x_ptr, t, tiles, N, K, stride_x, BM, BK, EVICT)
            acc = _quant_tile(x, t, acc, s_ptr, q_ptr, inv, N, K, stride_s, stride_q, GN, GK, FROM_PARTS, NEXT_AMAX,
                              FMT, FMAX, EMULATE, BM, BK, EVICT)
    if NEXT_AMAX:
        tl.atomic_max(next_ptr, tl.max(tl.max(acc, axis=1), axis=0).to(tl.float32))
        if tl.program_id(0) == 0:
            tl.store(clear_ptr, 0.0)


# ---- requantize with dynamic scales computed in the kernel ---------------------------------------------------


@triton.jit
def _row_amax(x):
    """Per-row amax of finite |x| as float32, reduced in x's own type (exact: a maximum selects one value), so a
    program holds its loaded tile at 2 bytes an element between the amax and the conversion, not 4."""
    return tl.max(_finite_abs(x), axis=1).to(tl.float32)


@triton.jit
def quant_rows_kernel(x_ptr, q_ptr, s_ptr,   # [N, K] in, uint8 [N, K] out, float32 [N, 1] scales out
                      N, K, stride_x, stride_q,
                      FMT: tl.constexpr, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr, EMULATE: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr, ONE_PASS: tl.constexpr,
                      EVICT: tl.constexpr):  # 1: loads read once evict_first in L2; 2: the code stores too
    """One scale per row (per output channel of a weight, per token of an activation); programs stride over blocks
    of BM rows. ONE_PASS: the row fits in one [BM, BK] tile and x is read once; else a pass for the amax and a
    second (from L1/L2) to quantize."""
    for rb in range(tl.program_id(0), tl.cdiv(N, BM), tl.num_programs(0)):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < N
        r64 = rows.to(tl.int64)[:, None]
        cols = tl.arange(0, BK)
        if ONE_PASS:
            mask = rmask[:, None] & (cols < K)[None, :]
            x = _ld(x_ptr + r64 * stride_x + cols[None, :], mask, EVICT)
            s = _scale_from_amax(_row_amax(x), FMAX, MIN_SCALE)
            y = x.to(tl.float32) * tl.math.div_rn(1.0, s)[:, None]
            store_stream(q_ptr + r64 * stride_q + cols[None, :], _encode(y, FMT, FMAX, EMULATE), mask, EVICT)
        else:
            acc = tl.zeros((BM, BK), dtype=x_ptr.dtype.element_ty)
            for k0 in range(0, K, BK):
                mask = rmask[:, None] & ((k0 + cols) < K)[None, :]
                x = tl.load(x_ptr + r64 * stride_x + (k0 + cols)[None, :], mask=mask, other=0.0)
                acc = _max_finite_abs(acc, x)
            s = _scale_from_amax(tl.max(acc, axis=1).to(tl.float32), FMAX, MIN_SCALE)
            inv = tl.math.div_rn(1.0, s)[:, None]
            for k0 in range(0, K, BK):  # the second read, from L2: the last use of these lines
                mask = rmask[:, None] & ((k0 + cols) < K)[None, :]
                x = _ld(x_ptr + r64 * stride_x + (k0 + cols)[None, :], mask, EVICT).to(tl.float32)
                store_stream(q_ptr + r64 * stride_q + (k0 + cols)[None, :], _encode(x * inv, FMT, FMAX, EMULATE),
                             mask, EVICT)
        tl.store(s_ptr + rows, s, mask=rmask)


@triton.jit
def quant_groups_kernel(x_ptr, q_ptr, s_ptr,   # [N, K] in, uint8 [N, K] out, float32 [N, cdiv(K, GW)] scales out
                        N, K, stride_x, stride_q, stride_s,
                        FMT: tl.constexpr, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr, EMULATE: tl.constexpr,
                        R: tl.constexpr,     # groups a tile
                        GW: tl.constexpr,    # the group's width (a power of two)
                        CW: tl.constexpr,    # a group is read as GW / CW chunks of CW columns (CW <= GW)
                        EVICT: tl.constexpr):  # 1: loads evict_first in L2; 2: the code stores too
    """One scale per 1 x GW group. Groups are numbered row-major (group g: row g // G, columns from (g % G) * GW;
    G = cdiv(K, GW) groups a row) and a tile is R consecutive groups, viewed as [GW / CW, R, CW]. Triton lays such a
    tile out with the chunk's columns fastest (a 32-column bf16 chunk: 2 lanes of 16 values), then the groups across
    the lanes, and the chunks in each thread's registers: 2 lanes share a group, not the 16 of a [R, GW] view. The
    amax reduces mostly in registers, and a group's scale arithmetic (two correctly rounded divisions) is repeated by
    2 lanes instead of 16 (sm_90: 10 instructions an element for R = 64 over 4 warps, against 21 for [4, 1024] tiles
    of groups)."""
    G = tl.cdiv(K, GW)
    tiles = tl.cdiv(N * G, R)
    chunk = (tl.arange(0, GW // CW) * CW)[:, None, None] + tl.arange(0, CW)[None, None, :]  # [GW / CW, 1, CW]
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        g = t * R + tl.arange(0, R)
        row = (g // G).to(tl.int64)
        gc = g % G
        cols = (gc * GW)[None, :, None] + chunk
        mask = ((g < N * G)[None, :, None]) & (cols < K)
        x = _ld(x_ptr + row[None, :, None] * stride_x + cols, mask, EVICT)
        amax = tl.max(tl.max(_finite_abs(x), axis=2), axis=0).to(tl.float32)
        s = _scale_from_amax(amax, FMAX, MIN_SCALE)
        tl.store(s_ptr + row * stride_s + gc, s, mask=g < N * G)
        y = x.to(tl.float32) * tl.math.div_rn(1.0, s)[None, :, None]
        store_stream(q_ptr + row[None, :, None] * stride_q + cols, _encode(y, FMT, FMAX, EMULATE), mask, EVICT)


@triton.jit
def _quant_block_tile(xin, t, q_ptr, s_ptr, N, K, stride_q, stride_s,
                      FMT: tl.constexpr, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr, EMULATE: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr, EVICT: tl.constexpr):
    """Codes and the one scale of tile t, a whole BM x BK block (xin: its values, already loaded)."""
    m0, k0, rows, cols = tile_coords(t, K, BM, BK)
    s = _scale_from_amax(tl.max(_row_amax(xin), axis=0), FMAX, MIN_SCALE)
    tl.store(s_ptr + (m0 // BM) * stride_s + k0 // BK, s)
    y = xin.to(tl.float32) * tl.math.div_rn(1.0, s)
    store_stream(q_ptr + rows.to(tl.int64)[:, None] * stride_q + cols[None, :], _encode(y, FMT, FMAX, EMULATE),
                 (rows < N)[:, None] & (cols < K)[None, :], EVICT)


@triton.jit
def quant_blocks_kernel(x_ptr, q_ptr, s_ptr,   # [N, K] in, uint8 [N, K] out, float32 [cdiv(N, GN), cdiv(K, BK)] out
                        N, K, stride_x, stride_q, stride_s,
                        GN: tl.constexpr,      # the block's rows
                        FMT: tl.constexpr, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr, EMULATE: tl.constexpr,
                        BM: tl.constexpr,      # rows a pass (BM divides GN)
                        BK: tl.constexpr,      # the block's columns
                        PREFETCH: tl.constexpr,  # BM == GN, persistent: load the next block before converting this
                        EVICT: tl.constexpr):  # 1: loads read for the last time evict_first in L2; 2: stores too
    """One scale per GN x BK block. A block of BM == GN rows is read once and held in registers (in x's own type)
    between its amax and its conversion; a taller block is read in GN / BM slices twice: once for its amax, once
    (from L1/L2) to quantize, so a program holds only a [BM, BK] slice."""
    tiles = tl.cdiv(N, GN) * tl.cdiv(K, BK)
    step = tl.num_programs(0)
    if PREFETCH and BM == GN:
        x = load_tile(x_ptr, tl.program_id(0), tiles, N, K, stride_x, BM, BK, EVICT)
        for t in range(tl.program_id(0), tiles, step):
            nx = load_tile(x_ptr, t + step, tiles, N, K, stride_x, BM, BK, EVICT)
            _quant_block_tile(x, t, q_ptr, s_ptr, N, K, stride_q, stride_s, FMT, FMAX, MIN_SCALE, EMULATE, BM, BK,
                              EVICT)
            x = nx
    else:
        for t in range(tl.program_id(0), tiles, step):
            if BM == GN:
                x = load_tile(x_ptr, t, tiles, N, K, stride_x, BM, BK, EVICT)
                _quant_block_tile(x, t, q_ptr, s_ptr, N, K, stride_q, stride_s, FMT, FMAX, MIN_SCALE, EMULATE, BM, BK,
                                  EVICT)
            else:
                m0, k0, rows, cols = tile_coords(t, K, GN, BK)
                cmask = (cols < K)[None, :]
                acc = tl.zeros((BM, BK), dtype=x_ptr.dtype.element_ty)
                for i in range(0, GN, BM):
                    sub = m0 + i + tl.arange(0, BM)
                    mask = (sub < N)[:, None] & cmask
                    x = tl.load(x_ptr + sub.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
                    acc = _max_finite_abs(acc, x)
                s = _scale_from_amax(tl.max(tl.max(acc, axis=1), axis=0).to(tl.float32), FMAX, MIN_SCALE)
                tl.store(s_ptr + (m0 // GN) * stride_s + k0 // BK, s)
                inv = tl.math.div_rn(1.0, s)
                for i in range(0, GN, BM):  # the second read, from L2: the last use of these lines
                    sub = m0 + i + tl.arange(0, BM)
                    mask = (sub < N)[:, None] & cmask
                    r64 = sub.to(tl.int64)[:, None]
                    x = _ld(x_ptr + r64 * stride_x + cols[None, :], mask, EVICT).to(tl.float32)
                    store_stream(q_ptr + r64 * stride_q + cols[None, :], _encode(x * inv, FMT, FMAX, EMULATE), mask,
                                 EVICT)


# ---- the codec alone (tests compare the emulated codec with the hardware on a GPU) ----------------------------


@triton.jit
def codec_kernel(b_ptr, f_ptr, x_ptr, c_ptr, n,   # codes in -> float32 out; float32 in -> codes out
                 FMT: tl.constexpr, FMAX: tl.constexpr, EMULATE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(f_ptr + offs, _decode(tl.load(b_ptr + offs, mask=mask, other=0), FMT, EMULATE), mask=mask)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(c_ptr + offs, _encode(x, FMT, FMAX, EMULATE), mask=mask)
