"""Weight-only FP8 GEMV on the tensor cores in CUDA C++ (``fp8_mma.cu``): y = (x · qᵀ) ⊙ s for decode batches.

    y[m, n] = bf16(s[n] · Σ_k x[m, k] · q[n, k])      x bf16 [M, K], q e4m3 [N, K], s float32 [N] or [1], y bf16 [M, N]

Why C++: at batch 1 the GEMV must keep enough weight bytes in flight to stream them at the card's bandwidth. Here
each lane issues ``unroll`` 16-byte loads of codes straight into registers before it uses any (no shared-memory
staging, no barrier in the loop), and feeds them to ``mma.m16n8k16`` as the B operand after an integer-op decode;
the Triton kernels (``fp8_gemv``) stage their tiles through shared memory and convert layouts for ``tl.dot``.
Its kernels (``fp8_mma.cu`` tells the lanes' layouts): tiles of 8 weight rows x 16 tokens whose warps split K and are
summed in warp order; and, for one token, a row kernel where each warp computes whole rows and one load instruction
reads 512 contiguous bytes of a row (with two register sets or not; in a W8A8 form that takes x as e4m3 codes with
its per-token scale and multiplies codes by codes on the tensor cores, nothing decoded), and a sweep kernel whose
blocks read their rows' bytes in address order. Each token's result depends only on its own row of x:
batch-invariant.

Served as ``GemvConfig(mma=True, num_warps=W, unroll=U[, row_run=R])`` (``fp8_gemv.gemv`` dispatches here; the
tune run measures them beside the Triton kernels and keeps the fastest per projection and M). On a GPU the kernel
is compiled by NVRTC through CuPy once per (W, U, token rows) and launched on torch's current stream (so CUDA graphs
record it); without one, ``mma_gemv_twin`` computes the same lanes, fragments and sums in numpy, so the CPU tests
check the layout logic the kernel runs. CI compiles the source for sm_90 with nvcc.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from impl import backend

SOURCE = Path(__file__).with_name("fp8_mma.cu")
KERNEL = "fp8_mma_gemv"
ROW_KERNEL = "fp8_mma_gemv_row"  # one token: a warp's own rows, 512 contiguous bytes of a row per load instruction
SWEEP_KERNEL = "fp8_mma_gemv_sweep"  # one token: a block's warps read its rows' bytes in address order
ROW_A8_KERNEL = "fp8_mma_gemv_row_a8"  # one token, W8A8: e4m3 x codes times e4m3 weight codes, nothing decoded
ROW_CHUNK = 512  # codes of one row the row kernel's warp reads per step (32 lanes x 16 bytes)
ROWS = 8  # weight rows per block (the mma's N)
CHUNK = 64  # codes of one row a warp reads per step (4 lanes x 16 bytes)


def token_rows(m: int) -> int:
    """A-operand rows the kernel fills: 8 (tokens g) when one tile of 8 covers M, else 16 (tokens g and g + 8)."""
    return 8 if m <= 8 else 16


def min_blocks(warps: int, unroll: int, tokens: int, row_run: int = 0, pipe: bool = False) -> int:
    """Blocks per SM the registers must allow (``__launch_bounds__``): a budget of 64 registers a thread (32 warps
    an SM) for up to 8 loads in flight a lane (4, two sets of 2, with ``pipe``) and one row group (8 token rows, or
    one row a warp), 128 above that (ptxas spills at 64 there)."""
    small = unroll <= (2 if pipe else 8) and (row_run == 1 if row_run else tokens == 8)
    return max(1, 65536 // ((64 if small else 128) * 32 * warps))


def compile_options(warps: int, unroll: int, tokens: int, row_run: int = 0, pipe: bool = False,
                    sweep: int = 0) -> tuple[str, ...]:
    """nvcc/NVRTC defines of one kernel shape (``sweep`` > 0: the sweep kernel's rows a block; its registers are the
    row kernel's with one row a warp)."""
    blocks = min_blocks(warps, unroll, tokens, 1 if sweep else row_run, pipe)
    return ("-std=c++17", f"-DMMA_WARPS={warps}", f"-DMMA_UNROLL={unroll}", f"-DMMA_TOKENS={tokens}",
            f"-DMMA_ROW_RUN={max(row_run, 1)}", f"-DMMA_PIPE={int(pipe)}", f"-DMMA_SWEEP_ROWS={max(sweep, 1)}",
            f"-DMMA_MIN_BLOCKS={blocks}")


def kernel_name(row_run: int = 0, sweep: int = 0, a8: bool = False) -> str:
    if a8:
        return ROW_A8_KERNEL
    return SWEEP_KERNEL if sweep else ROW_KERNEL if row_run else KERNEL


@functools.cache
def _kernel(warps: int, unroll: int, tokens: int, row_run: int = 0, pipe: bool = False, sweep: int = 0,
            a8: bool = False):
    import cupy

    opts = compile_options(warps, unroll, tokens, row_run, pipe, sweep)
    return cupy.RawModule(code=SOURCE.read_text(), options=opts).get_function(kernel_name(row_run, sweep, a8))


def check_mma_args(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, y: torch.Tensor,
                   sx: torch.Tensor | None = None) -> None:
    """The kernel's preconditions, each refused with its reason: bf16 x (e4m3 codes with a float32 [1] scale ``sx``
    for W8A8) and bf16 y, e4m3 codes, K a multiple of 16, rows of x and q starting 16-byte aligned (its vector
    loads)."""
    want_x = torch.bfloat16 if sx is None else torch.float8_e4m3fn
    if x.dtype != want_x or y.dtype != torch.bfloat16:
        what = "bf16 x" if sx is None else "e4m3 x codes (W8A8)"
        raise TypeError(f"the tensor-core FP8 GEMV (mma) takes {what} and returns bf16, got x {x.dtype} and y "
                        f"{y.dtype}")
    if sx is not None and (sx.dtype != torch.float32 or sx.numel() != x.shape[0]):
        raise ValueError(f"W8A8 x needs float32 scales, one a row: got {sx.dtype} [{sx.numel()}] for {x.shape[0]} rows")
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"the tensor-core FP8 GEMV (mma) needs e4m3 codes, got {q.dtype}")
    k = q.shape[1]
    if k % 16:
        raise ValueError(f"the tensor-core FP8 GEMV (mma) reads 16 codes at a time: K must be a multiple of 16, "
                         f"got {k}")
    x_row_bytes = x.stride(0) * x.element_size()
    if q.stride(0) % 16 or q.data_ptr() % 16 or x_row_bytes % 16 or x.data_ptr() % 16:
        raise ValueError("the tensor-core FP8 GEMV (mma) needs the rows of x and of the codes 16-byte aligned "
                         f"(x stride {x.stride(0)}, codes stride {q.stride(0)})")
    if s.dtype != torch.float32 or s.numel() not in (1, q.shape[0]):
        raise ValueError(f"scales must be float32 [1] or [{q.shape[0]}], got {s.dtype} [{s.numel()}]")


def mma_gemv(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, y: torch.Tensor, warps: int, unroll: int,
             pdl: bool = False, row_run: int = 0, pipe: bool = False, sweep: int = 0,
             sx: torch.Tensor | None = None) -> torch.Tensor:
    """y = bf16(x · (s ⊙ q)ᵀ) into ``y`` [M, N] (row-major); x [M, K] bf16 row-major, q [N, K] e4m3, s float32 [1 or
    N]. The kernel on a GPU, its twin on a CPU (the interpreters cannot run CUDA C++). ``pdl``: launched with
    programmatic dependent launch (``rawkernel.launch``): its first codes stream while the previous kernel finishes;
    it waits for that kernel before it reads x. ``row_run`` > 0 with one token: the row kernel (each warp that many
    whole rows; ``mma_row_twin``); with more tokens the tile kernel serves them. ``pipe`` (row kernel): two register
    sets, one's loads in flight while the other is used (the same sums in the same order). ``sweep`` > 0 with one
    token: the sweep kernel, blocks of that many rows read in address order (``mma_sweep_twin``). ``sx`` (W8A8, one
    token, row kernel only): x holds e4m3 codes and sx [1] their scale, y = bf16((sum of code products x sx) x s[n])
    (``mma_row_twin(..., sx=sx)``)."""
    check_mma_args(x, q, s, y, sx)
    (m, k), n = x.shape, q.shape[0]
    if row_run and sweep:
        raise ValueError(f"row_run and sweep choose different kernels: got both ({row_run}, {sweep})")
    if sx is not None and (m > 1 or not row_run or sweep):
        raise ValueError(f"W8A8 (sx given) is the one-token row kernel's: M 1 and row_run > 0, got M {m}, row_run "
                         f"{row_run}, sweep {sweep}")
    if m == 0 or n == 0:
        return y
    row_run, sweep = (row_run, sweep) if m == 1 else (0, 0)
    if not x.is_cuda or backend.INTERPRETED:
        if sweep:
            twin = mma_sweep_twin(x, q, s, warps, unroll, sweep)
        elif row_run:
            twin = mma_row_twin(x, q, s, warps, unroll, row_run, sx=sx)
        else:
            twin = mma_gemv_twin(x, q, s, warps, unroll)
        y.copy_(twin)
        return y
    from impl.common.rawkernel import launch

    if row_run or sweep:  # the one-token kernels: (x[, sx], q, s, y, N, K, ldw, per_tensor)
        blocks = -(-n // sweep) if sweep else -(-n // (warps * row_run))
        head = (x.data_ptr(),) if sx is None else (x.data_ptr(), sx.data_ptr())
        launch(_kernel(warps, unroll, 8, row_run, pipe, sweep, sx is not None), blocks, 32 * warps,
               head + (q.data_ptr(), s.data_ptr(), y.data_ptr(), np.int32(n), np.int32(k), np.int64(q.stride(0)),
                       np.int32(s.numel() == 1)), pdl=pdl)
        return y
    tokens = token_rows(m)
    m_tiles = -(-m // 16)
    blocks = m_tiles * -(-n // ROWS)
    launch(_kernel(warps, unroll, tokens), blocks, 32 * warps,
           (x.data_ptr(), q.data_ptr(), s.data_ptr(), y.data_ptr(), np.int32(m), np.int32(n), np.int32(k),
            np.int64(x.stride(0)), np.int64(q.stride(0)), np.int64(y.stride(0)), np.int32(s.numel() == 1),
            np.int32(m_tiles)), pdl=pdl)
    return y


# ---- the CPU twin ------------------------------------------------------------------------------------------------

def _decode_lanes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [..., 4c] -> float64, by the kernel's PRMT / shift / mask / x 2^120 steps (``decode_bits_reference``)."""
    from impl.serve.fp8_gemv import decode_bits_reference

    return decode_bits_reference(codes.reshape(-1)).reshape(codes.shape)


def mma_gemv_twin(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, warps: int, unroll: int) -> torch.Tensor:
    """The kernel's computation in numpy, lane by lane (``fp8_mma.cu``): per block of 8 weight rows and 16 tokens,
    per warp v its chunks v, v + W, ... in the kernel's order (``unroll`` groups them; the order is the same), per
    chunk the 16 codes each lane (g, t) loads and the x it loads, placed into the A (x: 16 tokens x 16 k slots) and B
    (codes: 16 k slots x 8 rows) fragments of four m16n8k16 steps as the PTX fragment layout puts registers, and D
    accumulated in float32 (each step's 16 products summed exactly, then rounded: the tensor cores' own internal
    order is not reproducible, so GPU tests compare the kernel with this within the W8A16 bound). Then the warps'
    partials in warp order, times the scale, rounded once to bf16. Returns y [M, N] bf16 on x's device."""
    if warps < 1 or unroll < 1:
        raise ValueError(f"warps and unroll must be >= 1, got {warps}, {unroll}")
    m, k = x.shape
    n = q.shape[0]
    tokens = token_rows(m)
    xs = x.detach().cpu().float().numpy().astype(np.float64)
    codes = q.detach().cpu().view(torch.uint8).numpy()
    scale = s.detach().cpu().float().numpy().reshape(-1)
    chunks = -(-k // CHUNK)
    nb = -(-n // ROWS)
    y = np.zeros((m, n), dtype=np.float32)
    g = np.arange(8)[:, None]  # lane = 4 g + t
    t = np.arange(4)[None, :]
    with np.errstate(invalid="ignore", over="ignore"):  # inf x 0 is NaN here as on the GPU
        for m0 in range(0, m, 16):
            part = np.zeros((warps, nb, 16, ROWS), dtype=np.float32)  # [warp, block, token, row]
            for v in range(warps):
                d = np.zeros((nb, 16, ROWS), dtype=np.float32)
                for c in range(v, chunks, warps):
                    kk = np.broadcast_to(c * CHUNK + 16 * t[..., None] + np.arange(16), (8, 4, 16))  # lane (g, t)'s k
                    in_k = kk < k
                    rows = np.arange(nb)[:, None, None] * ROWS + g[None]  # [nb, 8, 1]
                    row_ok = rows < n
                    w = np.zeros((nb, 8, 4, 16), dtype=np.uint8)  # the codes lane (g, t) of each block loads
                    ok = row_ok[..., None] & in_k[None]
                    w[ok] = codes[np.broadcast_to(rows[..., None], ok.shape)[ok], np.broadcast_to(kk, ok.shape)[ok]]
                    bw = _decode_lanes(w)  # [nb, 8, 4, 16]
                    xa = np.zeros((2, 8, 4, 16))  # [lo/hi, g, t, 16]: token m0 + g (lo) and m0 + g + 8 (hi)
                    for h in range(2 if tokens == 16 else 1):
                        tok = m0 + g + 8 * h  # [8, 1]
                        okx = (tok < m)[..., None] & in_k
                        xa[h][okx] = xs[np.broadcast_to(tok[..., None], okx.shape)[okx], kk[okx]]
                    for j in range(4):  # the 4 mma steps of the lanes' 16 codes: codes 4j..4j+3 -> slots 2t, 2t+1, +8, +9
                        A = np.zeros((16, 16))
                        B = np.zeros((nb, 16, ROWS))
                        for e in range(2):
                            for half, off in ((0, 0), (1, 8)):  # a0/a1 (slots 2t + e), a2/a3 (slots 2t + 8 + e)
                                slot = 2 * t[0] + off + e  # [4]
                                code = 4 * j + 2 * half + e
                                A[np.ix_(np.arange(8), slot)] = xa[0][:, :, code]  # rows g: a0 / a2
                                A[np.ix_(np.arange(8) + 8, slot)] = xa[1][:, :, code]  # rows g + 8: a1 / a3
                                B[:, slot, :] = np.moveaxis(bw[:, :, :, code], 1, 2)  # [nb, t, g]: b0 / b1, column g
                        d = (d + np.einsum("ms,bsr->bmr", A, B)).astype(np.float32)
                part[v] = d
            acc = part[0].copy()
            for v in range(1, warps):
                acc = (acc + part[v]).astype(np.float32)
            tile = acc.transpose(1, 0, 2).reshape(16, nb * ROWS)[:, :n]  # [token, n]
            sc = scale[0] if scale.size == 1 else scale[:n]
            y[m0:m0 + 16] = (tile * sc).astype(np.float32)[:min(16, m - m0)]
    return torch.from_numpy(y).to(torch.bfloat16).to(x.device)


def mma_row_twin(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, warps: int, unroll: int,
                 row_run: int, sx: torch.Tensor | None = None) -> torch.Tensor:
    """The row kernel (one token) in numpy, lane by lane: per weight row, per chunk of 512 codes, lane l = 4g + t
    loads codes and x at k = 512 c + 16 l; A's row g and B's column g are lane group g's, so each of four m16n8k16
    steps adds to D[g][g] the products of that group's 64 codes (only the diagonal is read); D accumulates in
    float32 per step; then the warp's butterfly (shuffle xor 16, 8, 4, 2, 1) over the lanes holding D[g][g] (lane
    (g, g / 2)), times the scale, rounded once to bf16. ``warps``, ``unroll`` and ``row_run`` do not change a row's
    arithmetic (they place rows and loads). With ``sx`` (W8A8): x holds e4m3 codes; each piece is two m16n8k32 steps,
    lane (g, t) giving A's row g and B's column g the same 8 codes a step (k slots 4t..4t+3, 16+4t..16+4t+3), each
    step's 32 products summed exactly then rounded to float32 (the tensor cores' own internal order is not
    reproducible), and y = bf16((sum x sx) x s). Returns y [1, N] bf16."""
    if warps < 1 or unroll < 1 or row_run < 1:
        raise ValueError(f"warps, unroll and row_run must be >= 1, got {warps}, {unroll}, {row_run}")
    return _pieces_twin(x, q, s, 1, lambda c, rows: np.zeros_like(rows), sx=sx)


def mma_sweep_twin(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, warps: int, unroll: int,
                   rows: int) -> torch.Tensor:
    """The sweep kernel (one token) in numpy: the row kernel's pieces, but piece c of row r belongs to warp
    ((r mod rows) P + c) mod W of its block (P pieces a row, W warps): each warp accumulates its pieces of the row in
    its own D (in piece order) and sums D's diagonal by the butterfly; the row is the sum of the W partial sums in warp
    order (float32; a warp without a piece of the row adds 0), times the scale, rounded once. ``unroll`` places loads
    only. Returns y [1, N] bf16."""
    if warps < 1 or unroll < 1 or rows < 1:
        raise ValueError(f"warps, unroll and rows must be >= 1, got {warps}, {unroll}, {rows}")
    pieces = -(-x.shape[1] // ROW_CHUNK)
    return _pieces_twin(x, q, s, warps, lambda c, r: ((r % rows) * pieces + c) % warps)


def _pieces_twin(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, groups: int, owner,
                 sx: torch.Tensor | None = None) -> torch.Tensor:
    """One token's rows computed piece by piece (512 codes, the lanes' layout of the row kernel): piece c of row r
    accumulates into the D of group ``owner(c, rows)[r]`` (float32 per mma step); each group's D diagonal is summed
    by the warp butterfly, the groups' sums added in group order, (times ``sx`` for W8A8 codes in x) times the scale,
    rounded once to bf16."""
    if x.shape[0] != 1:
        raise ValueError(f"the one-token kernels serve one token, got {x.shape[0]}")
    k, n = x.shape[1], q.shape[0]
    xs = x.detach().cpu().double().numpy()[0]  # (e4m3 codes convert exactly)
    codes = q.detach().cpu().view(torch.uint8).numpy()
    scale = s.detach().cpu().float().numpy().reshape(-1)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    rows = np.arange(n)
    d = np.zeros((n, groups, 8, 8), dtype=np.float32)  # D per row and group: [row, group, A row g, B column g']
    with np.errstate(invalid="ignore", over="ignore"):
        for c in range(-(-k // ROW_CHUNK)):
            own = owner(c, rows)
            kk = c * ROW_CHUNK + 16 * lane[:, None] + np.arange(16)  # [lane, 16]
            ok = kk < k
            xl = np.where(ok, xs[np.minimum(kk, k - 1)], 0.0)  # x each lane loads
            wl = np.where(ok[None], codes[:, np.minimum(kk, k - 1)], 0).astype(np.uint8)  # [n, lane, 16]
            bl = _decode_lanes(wl)
            for A, B in _mma_steps(xl, bl, g, t, n, 4 if sx is not None else 2):
                d[rows, own] = (d[rows, own] + np.einsum("gs,nsh->ngh", A, B)).astype(np.float32)
        # [n, group, lane]: D[g][g] at lane (g, g / 2), then the butterfly
        v = np.where(t == g // 2, d[:, :, g, g], np.float32(0)).astype(np.float32)
        for off in (16, 8, 4, 2, 1):
            v = (v + v[:, :, lane ^ off]).astype(np.float32)
        acc = v[:, 0, 0].copy()
        for grp in range(1, groups):
            acc = (acc + v[:, grp, 0]).astype(np.float32)
        if sx is not None:
            acc = (acc * np.float32(sx.detach().cpu().float().reshape(-1)[0])).astype(np.float32)
        sc = scale[0] if scale.size == 1 else scale[:n]
        y = (acc * sc).astype(np.float32)
    return torch.from_numpy(y.reshape(1, n)).to(torch.bfloat16).to(x.device)


def _mma_steps(xl: np.ndarray, bl: np.ndarray, g: np.ndarray, t: np.ndarray, n: int, per: int):
    """A piece's mma steps, ``per`` codes to a 32-bit register (2: bf16 m16n8k16, four steps; 4: e4m3 m16n8k32, two
    steps). Step j gives A (x, 8 x 8 per) and B (codes, [n, 8 per, 8]) the lane's codes 2 per j .. 2 per j + per - 1
    at k slots per t .. per t + per - 1 and the next ``per`` codes at those slots + 4 per, as the PTX fragments place
    a lane's two registers."""
    for j in range(16 // (2 * per)):
        A = np.zeros((8, 8 * per))
        B = np.zeros((n, 8 * per, 8))
        for e in range(per):
            for half in (0, 1):
                slot = per * t + 4 * per * half + e
                code = 2 * per * j + per * half + e
                A[g, slot] = xl[:, code]
                B[:, slot, g] = bl[:, :, code]
        yield A, B
