"""Linear layer y = act(x · Wᵀ + b) in Triton: a GEMV path for batch-1 requests and a GEMM path (``tl.dot``).

Shapes: x [M, K], W [N, K] (row-major, as torch.nn.Linear stores it), b [N] or None, y [M, N]; x, W, b and y share
dtype float16 or float32; accumulation is float32 in a fixed order (no atomics), so a result is bit-reproducible.
act is identity or ReLU. Bytes: (M·K + N·K + N + M·N)·itemsize. FLOPs: 2·M·N·K.

GEMV (M < 16): a program owns BLOCK_N rows of W and one row of x and walks K in BLOCK_K steps, accumulating
w·x elementwise in a [BLOCK_N, BLOCK_K] float32 tile that is summed once at the end; for batch 1 this reads W exactly
once, which is what makes the layer memory-bound and its latency a question of where W lives (DRAM or L2). It can
also pull another byte range into L2 as it starts (``prefetch=``: the next layer's weights; see ``prefetch.py``);
that changes no value it computes. GEMM (M >= 16): BLOCK_M × BLOCK_N tiles with ``tl.dot``.
"""
from __future__ import annotations

import impl  # noqa: F401  (backend before triton)
import numpy as np
import torch
import triton
import triton.language as tl

from impl.l2cache.prefetch import (MAX_PIECE, NONE, L2Prefetch, issue_prefetch, lanes_for, log_buffer, placeholders,
                                   record_log)

DTYPES = (torch.float16, torch.float32)


# K is specialised (divisible by 16 or not): a row start of W is then known to be 16-byte aligned and the loads of a
# thread are 128-bit vectors instead of one 2-byte load per value
@triton.jit(do_not_specialize=["N", "pf_off", "pf_bytes"])
def gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr,  # x [M, K], W [N, K], b [N], y [M, N], all contiguous
                N, K,
                pf_ptr, pf_off, pf_bytes, pf_log_ptr,  # bytes to pull into L2 for a later kernel (prefetch.py)
                HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PF_MODE: tl.constexpr, PF_LANES: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    if m == 0:  # one row of programs issues the prefetch, first, so DRAM fills L2 while this layer runs
        issue_prefetch(pf_ptr, pf_off, pf_bytes, pf_log_ptr, PF_MODE, PF_LANES)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # a 2-D accumulator, reduced once after the loop: no cross-thread reduction inside it, so every iteration is
    # just loads and FMAs and the loads of successive iterations overlap
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K  # the last K step may run past the row
        x = tl.load(x_ptr + m * K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if RELU:
        out = tl.maximum(out, 0.0)
    tl.store(y_ptr + m * N + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit(do_not_specialize=["M", "N", "K"])
def gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr,  # x [M, K], W [N, K], b [N], y [M, N], all contiguous
                M, N, K,
                HAS_BIAS: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _check_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None) -> None:
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"x must be [M, K] and W [N, K], got shapes {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"inner dimensions differ: x has K={x.shape[1]}, W has K={w.shape[1]}")
    if x.dtype not in DTYPES or w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError(f"x, W and b must share dtype float16 or float32, got {x.dtype}, {w.dtype}, "
                        f"{None if b is None else b.dtype}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"b must be [N] = [{w.shape[0]}], got {tuple(b.shape)}")
    tensors = [t for t in (x, w, b, out) if t is not None]
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("x, W, b and out must be contiguous")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if out is not None:
        if tuple(out.shape) != (x.shape[0], w.shape[0]) or out.dtype != x.dtype:
            raise ValueError(f"out must be [{x.shape[0]}, {w.shape[0]}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")
        if _overlaps(out, x) or _overlaps(out, w) or (b is not None and _overlaps(out, b)):
            raise ValueError("out must not overlap x, W or b (the kernel reads them while writing out)")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    return a.numel() > 0 and b.numel() > 0 and a0 < b1 and b0 < a1


def _precision(dtype: torch.dtype, wanted: str) -> str:
    # input precision only means something for float32 operands; float16 dots use the default
    return wanted if dtype == torch.float32 else "tf32"


GEMV_WARPS = 4


def gemv_blocks(dtype: torch.dtype, k: int | None = None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the GEMV: 16 KB of W per program per step (64 values per thread of 4 warps), BLOCK_K
    cut to K's next power of two for short rows."""
    block_k = 1024 if dtype == torch.float16 else 512
    if k is not None:
        block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    return 8, block_k


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, relu: bool = False,
           out: torch.Tensor | None = None, path: str = "auto", precision: str = "ieee",
           prefetch: L2Prefetch | None = None) -> torch.Tensor:
    """Return act(x · Wᵀ + b) (see the module doc). ``path``: 'auto' (GEMV below M=16), 'gemv' or 'gemm';
    ``precision`` is tl.dot's input precision for float32 on the GEMM path ('ieee' exact, 'tf32' fast);
    ``prefetch``: a byte range the GEMV's programs pull into L2 as they start (ignored on the GEMM path)."""
    _check_linear(x, w, b, out)
    if path not in ("auto", "gemv", "gemm"):
        raise ValueError(f"path must be 'auto', 'gemv' or 'gemm', not {path!r}")
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0:
        return out
    bias = b if b is not None else out  # placeholder pointer, never read when HAS_BIAS is False
    if path == "gemv" or (path == "auto" and M < 16):
        block_n, block_k = gemv_blocks(x.dtype, K)
        grid = (triton.cdiv(N, block_n), M)
        pf, lanes = prefetch, lanes_for(GEMV_WARPS)
        if pf is None:
            u8, i64 = placeholders(x.device)
            pf_args, mode = (u8, 0, 0, i64), NONE  # never read: NONE mode compiles the prefetch away
        else:
            if pf.nbytes > grid[0] * lanes * MAX_PIECE:
                raise ValueError(f"a {pf.nbytes} B prefetch needs more than {grid[0]} programs × {lanes} lanes × "
                                 f"{MAX_PIECE} B (the instruction's largest piece)")
            pf_args, mode = (pf.buffer, pf.offset, pf.nbytes, log_buffer(pf, grid[0], lanes)), pf.mode
        gemv_kernel[grid](x, w, bias, out, N, K, *pf_args, HAS_BIAS=b is not None, RELU=relu, BLOCK_N=block_n,
                          BLOCK_K=block_k, PF_MODE=mode, PF_LANES=lanes, num_warps=GEMV_WARPS)
        if pf is not None:
            record_log(pf, pf_args[3])
    else:
        bm = 16 if M <= 16 else 32 if M <= 32 else 64
        prec = _precision(x.dtype, precision)
        gemm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, 64))](x, w, bias, out, M, N, K, HAS_BIAS=b is not None,
                                                               RELU=relu, PRECISION=prec, BLOCK_M=bm, BLOCK_N=64,
                                                               BLOCK_K=32, num_warps=4)
    return out


def gemv_programs(n: int, dtype: torch.dtype) -> int:
    """How many programs the GEMV launches for N = ``n`` at batch 1 (each issues its share of a prefetch)."""
    return triton.cdiv(n, gemv_blocks(dtype)[0])


def compile_specs() -> list[tuple[str, object, dict[str, str], dict[str, object], dict]]:
    """(name, kernel, signature, constexprs, attrs) of the GEMV variants the networks launch, for ``compile_check``;
    attrs: 16-byte aligned pointers and K divisible by 16, as Triton specialises them at launch for these nets."""
    from impl.l2cache.prefetch import BULK, LOG

    specs = []
    for dt, tri in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        bn, bk = gemv_blocks(dt)
        sig = {"x_ptr": f"*{tri}", "w_ptr": f"*{tri}", "b_ptr": f"*{tri}", "y_ptr": f"*{tri}", "N": "i32", "K": "i32",
               "pf_ptr": "*u8", "pf_off": "i64", "pf_bytes": "i64", "pf_log_ptr": "*i64",
               **{k: "constexpr" for k in ("HAS_BIAS", "RELU", "BLOCK_N", "BLOCK_K", "PF_MODE", "PF_LANES")}}
        for name, mode in (("none", NONE), ("bulk", BULK), ("log", LOG)):
            const = {"HAS_BIAS": True, "RELU": True, "BLOCK_N": bn, "BLOCK_K": bk, "PF_MODE": mode,
                     "PF_LANES": lanes_for(GEMV_WARPS)}
            aligned = [i for i, k in enumerate(sig) if k.endswith("_ptr") or k == "K"]
            attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
            specs.append((f"gemv_kernel[{tri}-{name}]", gemv_kernel, sig, const, attrs))
    return specs


def linear_reference(x, w, b=None, relu: bool = False) -> np.ndarray:
    """float64 reference on the CPU: act(x · Wᵀ + b)."""
    from fixtures.oracle import to_numpy

    y = to_numpy(x).astype(np.float64) @ to_numpy(w).astype(np.float64).T
    if b is not None:
        y = y + to_numpy(b).astype(np.float64)[None, :]
    return np.maximum(y, 0.0) if relu else y


def linear_bytes(m: int, n: int, k: int, itemsize: int, bias: bool = True) -> int:
    return (m * k + n * k + (n if bias else 0) + m * n) * itemsize
