"""Thin wrappers around ``kernels``: validate, allocate, pick tiles, launch.

  dequantize(q, scales, group, out_dtype)  -> y [N, K]             y = decode(q) * s
  quantize(x, group, fmt)                   -> (q [N, K], s [R, C]) dynamic scales computed in the kernel
  quantize(x, group, fmt, scales=s)         -> (q, s)               static scales (given)
  quantize_delayed(x, state)                -> (q, s, state)        per-tensor, scale from the previous call's x

Inputs may have any number of leading dimensions (flattened to rows); the last dimension must be contiguous. Inputs
are never modified. FP8 results are torch float8 tensors (views of the uint8 codes the kernels write); scales are
float32 in the canonical 2-D shape of ``formats.ScaleGroup.scale_shape``. Under the interpreter there is no bfloat16.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import impl  # noqa: F401  (backend before triton)
import torch
import triton

from impl import backend
from impl.common.checks import require_tensor
from impl.common.timing import sm_count
from impl.fp8 import kernels as K
from impl.fp8.formats import MIN_SCALE, Fp8Format, ScaleGroup, get_format, get_group
from impl.fp8.launch import CPU_CONFIGS, GPU_CONFIGS, LaunchConfig, config, dequant_key, quant_key  # noqa: F401
from impl.fp8.reference import scales_from_amax

HIGH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EMULATE = backend.INTERPRETED  # the interpreter's own fp8 conversion is wrong: use the bit codec there


SIM_SMS = 4  # "SMs" of the interpreter, for per_sm grids (several programs, so the strided loops are exercised)


def _grid(tiles: int, cfg: LaunchConfig, device: torch.device, resident: int | None = None) -> int:
    """Programs to launch: one per tile, or ``per_sm`` per SM striding over the tiles (never more than tiles, and
    never more per SM than ``resident``: a persistent grid larger than what fits on the SMs at once runs in two
    waves, the second starting only when first-wave programs finish all their tiles)."""
    if cfg.per_sm <= 0:
        return max(tiles, 1)
    sms = sm_count(device.index) if device.type == "cuda" else SIM_SMS
    per_sm = cfg.per_sm if resident is None else max(1, min(cfg.per_sm, resident))
    return max(1, min(tiles, per_sm * sms))


# sm_90 (and sm_80) per-SM limits: registers, warps, resident blocks, shared memory (bytes usable by blocks)
SM_REGS, SM_WARPS, SM_BLOCKS, SM_SHARED, BLOCK_SHARED_RESERVED = 65536, 64, 32, 233472, 1024


def resident_programs(regs: int, shared: int, warps: int) -> int:
    """Programs of ``warps`` warps that fit on one SM at once with ``regs`` registers a thread and ``shared`` bytes
    of shared memory a program (registers are allocated per warp in units of 256)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM_REGS // (per_warp * warps)
    by_warps = SM_WARPS // warps
    by_shared = SM_SHARED // (shared + BLOCK_SHARED_RESERVED)
    return max(1, min(by_regs, by_warps, by_shared, SM_BLOCKS))


_RESIDENT: dict[tuple, int | None] = {}
RESIDENT_ERRORS: list[str] = []  # why a compiled kernel could not be inspected (the tune prints them)


def _resident(kernel, args: tuple, kw: dict) -> int | None:
    """Programs of ``kernel`` (compiled for these arguments) resident per SM, from its compiled register and shared
    memory use; None under the interpreter or where the compiled kernel cannot be inspected (the grid then takes
    ``per_sm`` as given)."""
    if backend.INTERPRETED or not backend.ON_GPU:
        return None
    key = (getattr(kernel, "__name__", id(kernel)),
           tuple(a.dtype if isinstance(a, torch.Tensor) else type(a).__name__ for a in args),
           tuple(sorted((k, v) for k, v in kw.items())))
    if key not in _RESIDENT:
        try:
            ck = kernel.warmup(*args, grid=(1,), **kw)
            ck._init_handles()
            _RESIDENT[key] = resident_programs(int(ck.n_regs), int(ck.metadata.shared), int(ck.metadata.num_warps))
        except Exception as e:  # noqa: BLE001  (a Triton without warmup/n_regs: launch per_sm as configured)
            RESIDENT_ERRORS.append(f"{key[0]}: {type(e).__name__}: {e}")
            _RESIDENT[key] = None
    return _RESIDENT[key]


def _plan(kernel, tiles: int, cfg: LaunchConfig, device: torch.device, args: tuple, kw: dict) -> int:
    """The grid ``launch_kernel`` gives ``kernel`` over ``tiles`` tiles with ``cfg`` (persistent: capped at the programs
    that fit on the SMs at once)."""
    return _grid(tiles, cfg, device, _resident(kernel, args, {**kw, **_launch_kw(cfg)}) if cfg.per_sm > 0 else None)


def launch_kernel(kernel, tiles: int, cfg: LaunchConfig, device: torch.device, args: tuple, kw: dict) -> int:
    """Launch ``kernel`` over ``tiles`` tiles with ``cfg`` (grid: ``_plan``); returns the number of programs."""
    grid = _plan(kernel, tiles, cfg, device, args, kw)
    kernel[(grid,)](*args, **kw, **_launch_kw(cfg))
    return grid


def _launch_kw(cfg: LaunchConfig) -> dict:
    return {"num_warps": cfg.warps, "num_stages": 1}  # the kernels have no loop Triton pipelines: see prefetches


def prefetches(cfg: LaunchConfig) -> bool:
    """``stages`` > 1 on a persistent grid: each program loads its next tile before converting the current one (a
    two-stage software pipeline written in the kernels, so its loads stay in flight during the math and stores)."""
    return cfg.per_sm > 0 and cfg.stages > 1


def check_device(*tensors: torch.Tensor) -> None:
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
    if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:  # an empty tensor's strides mean nothing
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


def dequantize(q: torch.Tensor, scales: torch.Tensor, group: str | ScaleGroup = "tensor", *,
               fmt: str | Fp8Format | None = None, out_dtype: torch.dtype = torch.bfloat16,
               out: torch.Tensor | None = None, cfg: LaunchConfig | None = None) -> torch.Tensor:
    """y = decode(q) * s per element (float32 product, one rounding to ``out_dtype``); shape of q."""
    require_tensor(q, "q")
    require_tensor(scales, "scales")
    if out is not None:
        require_tensor(out, "out")
    group = get_group(group)
    codes, f = _codes(q, fmt)
    _check_out_dtype(out_dtype if out is None else out.dtype)
    check_device(codes, scales, *(() if out is None else (out,)))
    c2 = _as_rows(codes, "q")
    n, k = c2.shape
    s = _canonical_scales(scales, group, n, k)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device) if out is None else out
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    o2 = _as_rows(out, "out")
    if n * k == 0:
        return out
    cfg = cfg or config(dequant_key(group), n, k)
    tiles = triton.cdiv(n, cfg.bm) * triton.cdiv(k, cfg.bk)
    launch_kernel(K.dequant_kernel, tiles, cfg, q.device, (c2, s, o2, n, k, c2.stride(0), s.stride(0), o2.stride(0)),
                  dict(GN=group.gn, GK=group.gk, FMT=f.code, EMULATE=EMULATE, BM=cfg.bm, BK=cfg.bk,
                       PREFETCH=prefetches(cfg), EVICT=cfg.evict))
    return out


def quantize(x: torch.Tensor, group: str | ScaleGroup = "tensor", fmt: str | Fp8Format = "e4m3", *,
             scales: torch.Tensor | None = None, out: torch.Tensor | None = None,
             scales_out: torch.Tensor | None = None, cfg: LaunchConfig | None = None,
             amax_cfg: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): FP8 codes of x with dynamic scales per ``group`` (or the given static ``scales``).

    Dynamic: s = max(amax / FMAX, MIN_SCALE) per group (1.0 for all-zero groups), amax over finite |x|; the scale
    is computed in the kernel. q = rne(clamp(x * (1/s), +-FMAX)); NaN stays NaN, +-inf saturates.
    ``out`` (uint8 or fp8, x's shape) and ``scales_out`` (float32, canonical shape) receive the results if given.
    ``cfg`` overrides the launch config (``amax_cfg``: the amax pass of dynamic per-tensor); for tuning.
    """
    require_tensor(x, "x")
    if scales is not None:
        require_tensor(scales, "scales")
    group, f = get_group(group), get_format(fmt)
    if x.dtype not in HIGH_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    _check_out_dtype(x.dtype)
    check_device(x, *(() if scales is None else (scales,)))
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
        _launch_static(x2, s, q2, group, cfg, **args)
    elif group.gn == 0 and group.gk == 0:
        _launch_tensor(x2, q2, s, amax_cfg, cfg, **args)
    elif group.gk == 0:
        if group.gn != 1:
            raise ValueError(f"dynamic scale groups spanning all columns need one row per group, got {group}")
        _launch_rows(x2, q2, s, cfg, **args)
    else:
        if group.gn == 0:
            raise ValueError(f"dynamic scale groups spanning all rows are not supported, got {group}")
        _launch_tiles(x2, q2, s, group, cfg, **args)
    return q.view(f.dtype), s


def _launch_static(x2, s, q2, group: ScaleGroup, cfg: LaunchConfig | None = None, **args) -> None:
    n, k = x2.shape
    cfg = cfg or config("quant-static", n, k)
    tiles = triton.cdiv(n, cfg.bm) * triton.cdiv(k, cfg.bk)
    launch_kernel(K.quant_static_kernel, tiles, cfg, x2.device,
                  (x2, s, q2, s, s, s, n, k, x2.stride(0), s.stride(0), q2.stride(0), 1),
                  dict(GN=group.gn, GK=group.gk, FROM_PARTS=False, NEXT_AMAX=False, PARTS=1, BM=cfg.bm, BK=cfg.bk,
                       PREFETCH=prefetches(cfg), EVICT=cfg.evict, REVERSE=False, **args))


def amax_partials(x2: torch.Tensor, cfg: LaunchConfig | None = None) -> torch.Tensor:
    """float32 [P]: the amax of finite |x| over each program's share of the tiles (max of them: the tensor's)."""
    n, k = x2.shape
    cfg = cfg or config("amax", n, k)
    tiles = triton.cdiv(n, cfg.bm) * triton.cdiv(k, cfg.bk)
    parts = torch.empty(_grid(tiles, cfg, x2.device), dtype=torch.float32, device=x2.device)  # at most this many
    grid = launch_kernel(K.amax_partials_kernel, tiles, cfg, x2.device, (x2, parts, n, k, x2.stride(0)),
                         dict(BM=cfg.bm, BK=cfg.bk, PREFETCH=prefetches(cfg), EVICT=cfg.evict))
    return parts[:grid]


def _from_parts(x2, parts, q2, s, cfg: LaunchConfig, parts_pow2: int, nxt=None, clear=None,
                **args) -> tuple[tuple, dict]:
    """(args, constexprs) of quantizing with s = max(parts) / FMAX (written to ``s``); with ``nxt`` (one float, 0 on
    entry), also max-ing x's amax into it and zeroing ``clear``. Without ``nxt`` (the second read of dynamic
    per-tensor) the tiles go last first: the amax pass has just read x forward, so its last tiles come from L2."""
    n, k = x2.shape
    nxt_, clear_ = (parts, parts) if nxt is None else (nxt, clear)
    return ((x2, parts, q2, s, nxt_, clear_, n, k, x2.stride(0), 0, q2.stride(0), parts.numel()),
            dict(GN=0, GK=0, FROM_PARTS=True, NEXT_AMAX=nxt is not None, PARTS=parts_pow2, BM=cfg.bm, BK=cfg.bk,
                 PREFETCH=prefetches(cfg), EVICT=cfg.evict, REVERSE=nxt is None, **args))


def _launch_tensor(x2, q2, s, amax_cfg: LaunchConfig | None = None, cfg: LaunchConfig | None = None,
                   **args) -> None:
    """Per-tensor dynamic: per-program amax partials, then the quantizer reduces them (from L2) to the scale. x is
    read twice, the second time last tile first (its tail, just read by the amax pass, is still in L2: so the amax
    pass keeps the default L2 policy whatever its config says); no atomics and no zeroed buffer."""
    n, k = x2.shape
    parts = amax_partials(x2, replace(amax_cfg or config("amax", n, k), evict=0))
    cfg = cfg or config("requant-tensor", n, k)
    a, kw = _from_parts(x2, parts, q2, s, cfg, triton.next_power_of_2(parts.numel()), **args)
    launch_kernel(K.quant_static_kernel, triton.cdiv(n, cfg.bm) * triton.cdiv(k, cfg.bk), cfg, x2.device, a, kw)


def _launch_rows(x2, q2, s, cfg: LaunchConfig | None = None, **args) -> None:
    """One scale per row; rows up to ``cfg.bk`` wide are read once, wider ones in ``cfg.bk`` chunks twice. A row
    read once that is narrower than ``cfg.bk`` gets proportionally fewer warps (the elements a thread holds stay
    those of the config: (1, 16384, 16) runs 4096-wide rows with 4 warps, 16384-wide ones with 16)."""
    n, k = x2.shape
    cfg = cfg or config("requant-channel", n, k)
    one_pass = triton.next_power_of_2(k) <= cfg.bk
    bk = max(16, triton.next_power_of_2(k)) if one_pass else cfg.bk
    if bk < cfg.bk:
        cfg = replace(cfg, warps=max(1, cfg.warps * bk // cfg.bk))
    launch_kernel(K.quant_rows_kernel, triton.cdiv(n, cfg.bm), cfg, x2.device,
                  (x2, q2, s, n, k, x2.stride(0), q2.stride(0)),
                  dict(BM=cfg.bm, BK=bk, ONE_PASS=one_pass, EVICT=cfg.evict, **args))


# a 1 x G group is read as chunks of this many columns: Triton lays a chunk of bf16 out as 2 lanes of 16 values, so 2
# lanes share a group and the lanes of a warp hold 16 different groups (``quant_groups_kernel``)
GROUP_CHUNK = 32


def _launch_tiles(x2, q2, s, group: ScaleGroup, cfg: LaunchConfig | None = None, **args) -> None:
    """1 x G groups: tiles of cfg.bm * max(cfg.bk, G) values, whole groups consecutive in row-major order
    (``quant_groups_kernel``); GN x G blocks: cfg.bm rows a pass (``quant_blocks_kernel``)."""
    n, k = x2.shape
    cfg = cfg or config(quant_key(group), n, k)
    a = (x2, q2, s, n, k, x2.stride(0), q2.stride(0), s.stride(0))
    if group.gn == 1:
        r = cfg.bm * max(cfg.bk, group.gk) // group.gk
        launch_kernel(K.quant_groups_kernel, triton.cdiv(n * triton.cdiv(k, group.gk), r), cfg, x2.device, a,
                      dict(R=r, GW=group.gk, CW=min(group.gk, GROUP_CHUNK), EVICT=cfg.evict, **args))
    else:
        bm = min(cfg.bm, group.gn)
        launch_kernel(K.quant_blocks_kernel, triton.cdiv(n, group.gn) * triton.cdiv(k, group.gk), cfg, x2.device, a,
                      dict(GN=group.gn, BM=bm, BK=group.gk, PREFETCH=bm == group.gn and prefetches(cfg),
                           EVICT=cfg.evict, **args))


TENSOR_GROUP = ScaleGroup(0, 0)


@dataclass
class DelayedScale:
    """State of per-tensor quantization with the previous call's amax (delayed scaling, as vLLM's static activation
    scales or Transformer Engine's amax history of length 1). ``amax`` holds three slots that rotate with ``calls``:
    slot ``calls % 3`` the previous input's amax (this call's scale comes from it), slot ``(calls + 1) % 3`` (zero)
    receives this input's, and this call zeroes slot ``(calls + 2) % 3``, the one the next call max-es into."""

    amax: torch.Tensor  # float32 [3]
    calls: int = 0

    def slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(read, max into, zero) for the next call, each a float32 [1] view."""
        c = self.calls
        return tuple(self.amax[(c + i) % 3:(c + i) % 3 + 1] for i in range(3))


def quantize_delayed(x: torch.Tensor, state: DelayedScale | None = None, fmt: str | Fp8Format = "e4m3", *,
                     cfg: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, DelayedScale]:
    """(q, s, state): per-tensor FP8 with s = max(amax of the previous call's x / FMAX, MIN_SCALE), x read once.

    Values beyond FMAX * s (x grew since the last call) saturate to +-FMAX. The first call (``state=None``) takes
    the amax of x itself (a second read), so it equals ``quantize(x, "tensor")``. Pass the returned state to the
    next call, of any shape (a batch of activations may change size); a state lives on the device of its first
    call's x.
    """
    f = get_format(fmt)
    if x.dtype not in HIGH_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    _check_out_dtype(x.dtype)
    if state is not None and state.amax.device != x.device:
        raise ValueError(f"state lives on {state.amax.device}, x on {x.device}: start a new state (state=None)")
    x2 = _as_rows(x, "x")
    n, k = x2.shape
    cfg = cfg or config("requant-delayed", n, k)
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    s = torch.empty(1, 1, dtype=torch.float32, device=x.device)
    if state is None:  # the first call's scale is x's own amax
        state = DelayedScale(torch.zeros(3, dtype=torch.float32, device=x.device))
        if n * k:
            state.amax[0] = amax_partials(x2, cfg).max()
    read, into, clear = state.slots()
    if n * k == 0:  # no values: the scale of the previous amax, and an amax of 0 for the next call
        s.copy_(scales_from_amax(read, f).view(1, 1))
        into.zero_()
        clear.zero_()
        state.calls += 1
        return q.view(f.dtype), s, state
    args = dict(FMT=f.code, FMAX=f.max, MIN_SCALE=MIN_SCALE, EMULATE=EMULATE)
    a, kw = _from_parts(x2, read, _as_rows(q, "out"), s, cfg, 1, nxt=into, clear=clear, **args)
    launch_kernel(K.quant_static_kernel, triton.cdiv(n, cfg.bm) * triton.cdiv(k, cfg.bk), cfg, x.device, a, kw)
    state.calls += 1
    return q.view(f.dtype), s, state


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
