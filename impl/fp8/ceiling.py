"""Traffic-mix ceilings: streams that move a kernel's bytes in its read/write mix with no arithmetic.

A dequantize reads 1 byte and writes 2 per element; a requantize reads 2 and writes 1. HBM does not serve every mix
at the rate of a copy (1:1): a write-heavy stream turns the bus around more often. So the card's copy of the same
bytes is not the most a dequantize can reach, and a kernel that misses a bandwidth target by a little may be at its
mix's own limit. These streams say where that limit is:

  widen   y[i] = zero_extend(x[i])   x uint8 [N, K]  -> y int16 [N, K]    reads N·K bytes, writes 2·N·K
  narrow  y[i] = x[i] mod 256        x int16 [N, K]  -> y uint8 [N, K]    reads 2·N·K bytes, writes N·K

with a dequantize's tiling and launches: ``[BM, BK]`` tiles, column tile fastest, one program per tile or
``per_sm`` persistent programs striding over them (loading the next tile first with ``stages`` 2), the streamed data
in the L2 policy ``evict`` asks for -- every field of a ``LaunchConfig``, as the kernels read them. The bench
``test_fp8_stream`` times each launch of ``sweep_configs`` briefly (``CONFIGS``, and the launches the FP8 kernels of
that mix run with at that shape) and benches the fastest: the figure a kernel of that mix and size is read against
(``claims.same_size_ceilings``). Its best launch is not the ceiling of every possible kernel, but it has every launch
the kernels themselves use, and any arithmetic a real kernel adds only slows it.
"""
from __future__ import annotations

import impl  # noqa: F401  (backend before triton)
import torch
import triton
import triton.language as tl

from impl import backend
from impl.common.checks import require_tensor
from impl.fp8.kernels import load_tile, store_stream, tile_coords
from impl.fp8.launch import LaunchConfig, config
from impl.fp8.quant import check_device, launch_kernel, prefetches

MODES = {"widen": (torch.uint8, torch.int16), "narrow": (torch.int16, torch.uint8)}  # mode -> (input, output dtype)


# the launches the bench tries beside the kernels' own (``sweep_configs``): on an H100 the fastest widen of each
# Llama-3-8B matrix was one of the first eight (8 warps, tiles of 2k-16k elements; default L2 policy); then row-wide
# tiles, the layout of the fastest requantize (on 6144x4096 the channel requantize with 1 x 16384 tiles of 16 warps
# outran the first eight's narrow stream); then the built-in delayed requantize's persistent row-wide tiles with
# evict_first streams (its default leaves the L2 policy alone). The kernels' own launches matter most: on an H100
# the 6144x4096 channel requantize with evict_first loads (its table's 1 x 16384, 16 warps) moved 3381 GB/s, the best
# stream without an L2 policy 3234
CONFIGS = (*(LaunchConfig(bm, bk, 8) for bm in (4, 8, 16) for bk in (512, 1024, 2048) if bm * bk <= 16384),
           LaunchConfig(1, 4096, 4), LaunchConfig(2, 4096, 8), LaunchConfig(1, 8192, 8), LaunchConfig(1, 16384, 16),
           LaunchConfig(1, 4096, 4, stages=2, per_sm=16, evict=2),
           LaunchConfig(1, 4096, 4, stages=2, per_sm=4, evict=2))
CPU_CONFIG = LaunchConfig(4, 32, 4)  # small tiles under the interpreter: several programs and ragged edges
KERNELS = {"widen": ("dequant-tensor", "dequant-channel", "dequant-block"),  # the FP8 kernels of each mix
           "narrow": ("quant-static", "requant-tensor", "requant-delayed", "requant-channel", "requant-group",
                      "requant-block")}


def label(cfg: LaunchConfig) -> str:
    """A launch in a few characters: tile, warps, stages, programs per SM, L2 policy (``4x512w8s1p0e0``)."""
    return f"{cfg.bm}x{cfg.bk}w{cfg.warps}s{cfg.stages}p{cfg.per_sm}e{cfg.evict}"


def sweep_configs(mode: str, n: int, k: int) -> tuple[LaunchConfig, ...]:
    """``CONFIGS`` and then every launch the FP8 kernels of ``mode``'s mix run with on an [n, k] matrix
    (``launch.config``: the active table's, or the built-in defaults), each once."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    return tuple(dict.fromkeys((*CONFIGS, *(config(key, n, k) for key in KERNELS[mode]))))


@triton.jit
def stream_kernel(x_ptr, y_ptr, N, K, stride_x, stride_y,
                  WIDEN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                  PREFETCH: tl.constexpr,  # persistent: load the next tile before storing this one
                  EVICT: tl.constexpr):  # 1: loads evict_first in L2; 2: stores too
    """y = widen(x) (uint8 -> int16) or narrow(x) (int16 -> uint8, the low byte), one [BM, BK] tile per step;
    programs stride over the tiles (grid = tiles, or fewer: persistent), as the dequantize does."""
    tiles = tl.cdiv(N, BM) * tl.cdiv(K, BK)
    step = tl.num_programs(0)
    if PREFETCH:
        x = load_tile(x_ptr, tl.program_id(0), tiles, N, K, stride_x, BM, BK, EVICT)
    for t in range(tl.program_id(0), tiles, step):
        if PREFETCH:  # the next tile's loads in flight while this one is stored
            nx = load_tile(x_ptr, t + step, tiles, N, K, stride_x, BM, BK, EVICT)
            _store_tile(x, t, y_ptr, N, K, stride_y, WIDEN, BM, BK, EVICT)
            x = nx
        else:  # load, store: nothing more per tile than a one-program-a-tile kernel does
            _store_tile(load_tile(x_ptr, t, tiles, N, K, stride_x, BM, BK, EVICT), t, y_ptr, N, K, stride_y, WIDEN,
                        BM, BK, EVICT)


@triton.jit
def _store_tile(x, t, y_ptr, N, K, stride_y, WIDEN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                EVICT: tl.constexpr):
    _, _, rows, cols = tile_coords(t, K, BM, BK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    if WIDEN:
        y = x.to(tl.int16)
    else:
        y = (x & 0xFF).to(tl.uint8)
    store_stream(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y, mask, EVICT)


def stream(x: torch.Tensor, mode: str, *, out: torch.Tensor | None = None,
           cfg: LaunchConfig | None = None) -> torch.Tensor:
    """``mode`` ("widen" / "narrow") of a 2-D x with contiguous rows, into ``out`` (allocated when None)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    src, dst = MODES[mode]
    require_tensor(x, "x")
    if x.dtype != src:
        raise TypeError(f"{mode} reads {src}, got x of dtype {x.dtype}")
    if x.dim() != 2 or (x.numel() and x.stride(1) != 1):
        raise ValueError(f"x must be 2-D with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    if out is None:
        out = torch.empty(x.shape, dtype=dst, device=x.device)
    require_tensor(out, "out")
    if out.dtype != dst or out.shape != x.shape or out.device != x.device:
        raise ValueError(f"out must be {dst} of x's shape {tuple(x.shape)} on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if out.numel() and out.stride(1) != 1:
        raise ValueError(f"out must have contiguous rows, got strides {out.stride()}")
    check_device(x, out)
    n, k = x.shape
    if n * k == 0:
        return out
    cfg = cfg or (CONFIGS[0] if backend.ON_GPU else CPU_CONFIG)
    launch_kernel(stream_kernel, triton.cdiv(n, cfg.bm) * triton.cdiv(k, cfg.bk), cfg, x.device,
                  (x, out, n, k, x.stride(0), out.stride(0)),
                  dict(WIDEN=mode == "widen", BM=cfg.bm, BK=cfg.bk, PREFETCH=prefetches(cfg), EVICT=cfg.evict))
    return out


def stream_reference(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The same map in torch on the CPU: zero extension, or the low byte (two's complement)."""
    if mode == "widen":
        return x.cpu().to(torch.int16)
    if mode == "narrow":
        return (x.cpu().to(torch.int32) & 0xFF).to(torch.uint8)
    raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")


def stream_bytes(mode: str, n: int, k: int) -> int:
    """Bytes a stream of an [n, k] matrix reads and writes: 3·n·k in either mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    return 3 * n * k
