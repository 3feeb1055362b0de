"""Thin wrappers around ``kernels``: validate, allocate, pick tiles, launch.

  dequantize(q, scales, group, out_dtype)  -> y [N, K]             y = decode(q) * s
  quantize(x, group, fmt)                   -> (q [N, K], s [R, C]) dynamic scales computed in the kernel
  quantize(x, group, fmt, scales=s)         -> (q, s)               static scales (given)

Inputs may have any number of leading dimensions (flattened to rows); the last dimension must be contiguous. Inputs
are never modified. FP8 results are torch float8 tensors (views of the uint8 codes the kernels write); scales are
float32 in the canonical 2-D shape of ``formats.ScaleGroup.scale_shape``. Under the interpreter there is no bfloat16.
"""
from __future__ import annotations

import impl  # noqa: F401  (backend before triton)
import torch
import triton

from impl import backend
from impl.common.checks import require_tensor
from impl.fp8 import kernels as K
from impl.fp8.formats import MIN_SCALE, Fp8Format, ScaleGroup, get_format, get_group

HIGH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EMULATE = backend.INTERPRETED  # the interpreter's own fp8 conversion is wrong: use the bit codec there


def _tile_configs() -> list[triton.Config]:
    if not backend.ON_GPU or backend.INTERPRETED:
        return [triton.Config({"BM": 64}, num_warps=4)]
    return [triton.Config({"BM": bm}, num_warps=w) for bm, w in ((32, 4), (64, 4), (64, 8), (128, 8))]


_KEY = ["N", "K", "GN", "GK", "FMT"]
dequant_tuned = triton.autotune(configs=_tile_configs(), key=_KEY)(K.dequant_kernel)
quant_static_tuned = triton.autotune(configs=_tile_configs(), key=_KEY + ["FROM_AMAX"])(K.quant_static_kernel)
TUNE_MIN_ELEMENTS = 1 << 22  # smaller matrices take a fixed tile: autotuning every new shape costs more than it wins


def _elementwise(tuned, plain, n: int, k: int, bk: int, *args, **kwargs) -> None:
    """Launch an elementwise tile kernel: autotuned over BM/num_warps for big matrices on a GPU, fixed otherwise."""
    if backend.ON_GPU and not backend.INTERPRETED and n * k >= TUNE_MIN_ELEMENTS:
        tuned[lambda meta: (triton.cdiv(n, meta["BM"]), triton.cdiv(k, bk))](*args, BK=bk, **kwargs)
    else:
        bm = 64 if not backend.ON_GPU else 32
        plain[(triton.cdiv(n, bm), triton.cdiv(k, bk))](*args, BM=bm, BK=bk, num_warps=4, **kwargs)


def _check_device(*tensors: torch.Tensor) -> None:
    devs = {t.device.type for t in tensors}
    if len(devs) > 1:
        raise ValueError(f"tensors are on different devices: {sorted(devs)}")
    if backend.ON_GPU and not backend.INTERPRETED and devs != {"cuda"}:
        raise ValueError(f"the kernels run on the GPU: move the tensors to cuda (got {sorted(devs)})")


def _as_rows(t: torch.Tensor, what: str) -> torch.Tensor:
    """[..., K] -> [N, K] without copying; the last dimension must be contiguous."""
    if t.ndim == 0:
        raise ValueError(f"{what} must have at least one dimension, got a scalar")
    if t.ndim > 2:
        t = t.reshape(-1, t.shape[-1])  # a view when the leading dims are contiguous, a copy otherwise
    elif t.ndim == 1:
        t = t.reshape(1, -1)
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{what} must be contiguous in its last dimension (stride {t.stride(-1)})")
    return t


def _codes(q: torch.Tensor, fmt: str | Fp8Format | None) -> tuple[torch.Tensor, Fp8Format]:
    if q.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        f = get_format(q.dtype)
        if fmt is not None and get_format(fmt) != f:
            raise TypeError(f"q is {q.dtype} but fmt={fmt!r}")
        return q.view(torch.uint8), f
    if q.dtype == torch.uint8:
        if fmt is None:
            raise TypeError("q holds uint8 codes: pass fmt='e4m3' or 'e5m2'")
        return q, get_format(fmt)
    raise TypeError(f"q must be float8_e4m3fn, float8_e5m2 or uint8 codes, got {q.dtype}")


def _canonical_scales(scales: torch.Tensor, group: ScaleGroup, n: int, k: int) -> torch.Tensor:
    shape = group.scale_shape(n, k)
    if not scales.dtype.is_floating_point:
        raise TypeError(f"scales must be floating point, got {scales.dtype}")
    if scales.numel() != shape[0] * shape[1]:
        raise ValueError(f"scales has shape {tuple(scales.shape)}; a {group.name} scale group over a [{n}, {k}] "
                         f"matrix needs {shape[0] * shape[1]} scales, shape {list(shape)}")
    return scales.reshape(shape).to(torch.float32).contiguous()


def _check_out_dtype(dtype: torch.dtype) -> None:
    if dtype not in HIGH_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if dtype == torch.bfloat16 and backend.INTERPRETED:
        raise TypeError("bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1): use float32 "
                        "or float16 on the CPU")


def _bk(group: ScaleGroup, k: int) -> int:
    """Tile width: a power of two in [16, 128] that divides the group's columns."""
    cap = 128 if group.gk == 0 else min(128, group.gk)
    return max(16, min(cap, triton.next_power_of_2(max(k, 1))))


def dequantize(q: torch.Tensor, scales: torch.Tensor, group: str | ScaleGroup = "tensor", *,
               fmt: str | Fp8Format | None = None, out_dtype: torch.dtype = torch.bfloat16,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y = decode(q) * s per element (float32 product, one rounding to ``out_dtype``); shape of q."""
    require_tensor(q, "q")
    require_tensor(scales, "scales")
    if out is not None:
        require_tensor(out, "out")
    group = get_group(group)
    codes, f = _codes(q, fmt)
    _check_out_dtype(out_dtype if out is None else out.dtype)
    _check_device(codes, scales, *(() if out is None else (out,)))
    c2 = _as_rows(codes, "q")
    n, k = c2.shape
    s = _canonical_scales(scales, group, n, k)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device) if out is None else out
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    o2 = _as_rows(out, "out")
    if n * k == 0:
        return out
    _elementwise(dequant_tuned, K.dequant_kernel, n, k, _bk(group, k), c2, s, o2, n, k, c2.stride(0), s.stride(0),
                 o2.stride(0), GN=group.gn, GK=group.gk, FMT=f.code, EMULATE=EMULATE)
    return out


def quantize(x: torch.Tensor, group: str | ScaleGroup = "tensor", fmt: str | Fp8Format = "e4m3", *,
             scales: torch.Tensor | None = None, out: torch.Tensor | None = None,
             scales_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): FP8 codes of x with dynamic scales per ``group`` (or the given static ``scales``).

    Dynamic: s = max(amax / FMAX, MIN_SCALE) per group (1.0 for all-zero groups), amax over finite |x|; the scale
    is computed in the kernel. q = rne(clamp(x * (1/s), +-FMAX)); NaN stays NaN, +-inf saturates.
    ``out`` (uint8 or fp8, x's shape) and ``scales_out`` (float32, canonical shape) receive the results if given.
    """
    require_tensor(x, "x")
    if scales is not None:
        require_tensor(scales, "scales")
    group, f = get_group(group), get_format(fmt)
    if x.dtype not in HIGH_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    _check_out_dtype(x.dtype)
    _check_device(x, *(() if scales is None else (scales,)))
    x2 = _as_rows(x, "x")
    n, k = x2.shape
    shape = group.scale_shape(n, k)
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device) if out is None else out
    if q.shape != x.shape or q.dtype not in (torch.uint8, f.dtype):
        raise ValueError(f"out must be uint8 or {f.dtype} of shape {tuple(x.shape)}, got {q.dtype} {tuple(q.shape)}")
    q2 = _as_rows(q.view(torch.uint8), "out")
    if scales is not None:
        s = _canonical_scales(scales, group, n, k)
        if scales_out is not None:
            scales_out.copy_(s.view(scales_out.shape))
            s = scales_out
    else:
        s = torch.empty(shape, dtype=torch.float32, device=x.device) if scales_out is None else scales_out
        if tuple(s.shape) != shape or s.dtype != torch.float32 or not s.is_contiguous():
            raise ValueError(f"scales_out must be contiguous float32 of shape {list(shape)}, got {s.dtype} "
                             f"{tuple(s.shape)}")
    if n * k == 0:
        if scales is None:
            s.fill_(1.0)
        return q.view(f.dtype), s
    args = dict(FMT=f.code, FMAX=f.max, MIN_SCALE=MIN_SCALE, EMULATE=EMULATE)
    if scales is not None:
        _launch_static(x2, s, q2, s, group, from_amax=False, **args)
    elif group.gn == 0 and group.gk == 0:
        _launch_tensor(x2, q2, s, **args)
    elif group.gk == 0:
        if group.gn != 1:
            raise ValueError(f"dynamic scale groups spanning all columns need one row per group, got {group}")
        _launch_rows(x2, q2, s, **args)
    else:
        if group.gn == 0:
            raise ValueError(f"dynamic scale groups spanning all rows are not supported, got {group}")
        _launch_tiles(x2, q2, s, group, **args)
    return q.view(f.dtype), s


def _launch_static(x2, s, q2, so, group: ScaleGroup, *, from_amax: bool, **args) -> None:
    n, k = x2.shape
    _elementwise(quant_static_tuned, K.quant_static_kernel, n, k, _bk(group, k), x2, s, q2, so, n, k, x2.stride(0),
                 s.stride(0), q2.stride(0), GN=group.gn, GK=group.gk, FROM_AMAX=from_amax, **args)


def _launch_tensor(x2, q2, s, **args) -> None:
    """Per-tensor dynamic: an amax kernel (atomic max), then the quantizer derives s from it in-kernel."""
    n, k = x2.shape
    amax = torch.zeros(1, dtype=torch.float32, device=x2.device)
    bm, bk = 64, _bk(TENSOR_GROUP, k)
    K.amax_kernel[(triton.cdiv(n, bm), triton.cdiv(k, bk))](x2, amax, n, k, x2.stride(0), BM=bm, BK=bk,
                                                           num_warps=4)
    _launch_static(x2, amax, q2, s, TENSOR_GROUP, from_amax=True, **args)


def _launch_rows(x2, q2, s, **args) -> None:
    n, k = x2.shape
    one_pass = k <= 16384
    bk = max(16, triton.next_power_of_2(k)) if one_pass else 4096
    bm = max(1, min(64, 4096 // bk)) if not backend.ON_GPU else max(1, 8192 // bk)
    warps = 4 if bk <= 2048 else (8 if bk <= 4096 else 16)
    K.quant_rows_kernel[(triton.cdiv(n, bm),)](x2, q2, s, n, k, x2.stride(0), q2.stride(0), BM=bm, BK=bk,
                                               ONE_PASS=one_pass, num_warps=warps, **args)


def _launch_tiles(x2, q2, s, group: ScaleGroup, **args) -> None:
    n, k = x2.shape
    bk = group.gk
    bm = group.gn if group.gn > 1 else (32 if backend.ON_GPU else 64)
    warps = 8 if bm * bk >= 8192 else 4
    K.quant_tiles_kernel[(triton.cdiv(n, bm), triton.cdiv(k, bk))](x2, q2, s, n, k, x2.stride(0), q2.stride(0),
                                                                  s.stride(0), GN=group.gn, BM=bm, BK=bk,
                                                                  num_warps=warps, **args)


TENSOR_GROUP = ScaleGroup(0, 0)


def codec(codes: torch.Tensor, values: torch.Tensor, fmt: str | Fp8Format = "e4m3", *,
          emulate: bool = EMULATE) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode(codes) as float32, encode(saturate(values)) as uint8) through the kernels' codec; for tests."""
    require_tensor(codes, "codes")
    require_tensor(values, "values")
    f = get_format(fmt)
    if codes.dtype != torch.uint8 or values.dtype != torch.float32 or codes.shape != values.shape or codes.ndim != 1:
        raise ValueError("codes (uint8) and values (float32) must be 1-D of equal length")
    dec = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    enc = torch.empty(codes.shape, dtype=torch.uint8, device=codes.device)
    n = codes.numel()
    if n:
        K.codec_kernel[(triton.cdiv(n, 1024),)](codes, dec, values, enc, n, FMT=f.code, FMAX=f.max, EMULATE=emulate,
                                                BLOCK=1024)
    return dec, enc
