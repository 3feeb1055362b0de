"""L2 prefetch issued from inside a kernel: Hopper's ``cp.async.bulk.prefetch.L2.global``.

``cp.async.bulk.prefetch.L2.global [addr], size`` asks the memory system to bring ``size`` bytes at ``addr`` into L2
and returns at once: no register waits for the data, nothing is written, so a kernel can issue it for bytes that a
LATER kernel will read (the next layer's weights) and carry on with its own work while DRAM fills L2. ``addr`` must be
16-byte aligned and ``size`` a multiple of 16; the SASS encodes size / 16 in 16 bits, so one instruction moves at most
1 MiB - 16 B.

How a grid shares a range ``[offset, offset + nbytes)`` (``plan_ranges`` is the same arithmetic in numpy, the CPU
twin): program p of P takes ``chunk = ceil16(ceil(nbytes / P))`` bytes from ``p · chunk``; inside it, lane j of
``LANES`` (one per thread: 32 · num_warps) takes ``sub = ceil16(ceil(chunk / LANES))`` bytes from
``p · chunk + j · sub``; every piece is clipped to the range, so the pieces tile it exactly, without overlap. A lane
whose piece is empty issues nothing.

Modes (``MODE: tl.constexpr``): ``NONE`` compiles the prefetch away; ``BULK`` issues the instruction (GPU only: the
Triton interpreter cannot run inline PTX); ``LOG`` issues nothing and writes each lane's (start, size) to a log
instead — how the interpreter, and the tests, check that the pieces cover exactly the intended bytes.

``issue_prefetch`` is the device function a layer kernel calls (``linear.gemv_kernel`` does, for the next layer's
weights); ``prefetch_kernel`` is a kernel that does only that (a tiny in-stream launch before a layer whose own kernels
are not ours, e.g. cuDNN's convolutions). ``compile_specs`` lists the variants that ``compile_check`` builds for sm_90.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import impl  # noqa: F401  (backend before triton)
import numpy as np
import torch
import triton
import triton.language as tl

from impl import backend

NONE, BULK, LOG = 0, 1, 2
MODES = {"none": NONE, "bulk": BULK, "log": LOG}
ALIGN = 16
MAX_PIECE = (1 << 20) - 16  # size / 16 must fit the instruction's 16-bit field
BULK_PREFETCH_PTX = "cp.async.bulk.prefetch.L2.global"


@triton.jit
def issue_prefetch(base_ptr, off, nbytes, log_ptr,  # uint8 buffer; bytes [off, off+nbytes); int64 log [P*LANES, 2]
                   MODE: tl.constexpr, LANES: tl.constexpr):
    """This program's share of the range, one piece per lane (see the module doc)."""
    if MODE != 0:
        pid = tl.program_id(0).to(tl.int64)
        nprog = tl.num_programs(0).to(tl.int64)
        chunk = tl.cdiv(tl.cdiv(nbytes, nprog), 16) * 16
        sub = tl.cdiv(tl.cdiv(chunk, LANES), 16) * 16
        lane = tl.arange(0, LANES).to(tl.int64)
        lo = pid * chunk + lane * sub
        hi = tl.minimum(tl.minimum(lo + sub, pid * chunk + chunk), nbytes)
        size = tl.maximum(hi - lo, 0)
        if MODE == 1:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r", [base_ptr + off + lo, size.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
        else:
            row = (pid * LANES + lane) * 2
            tl.store(log_ptr + row, off + lo)
            tl.store(log_ptr + row + 1, size)


@triton.jit
def prefetch_kernel(base_ptr, off, nbytes, log_ptr, MODE: tl.constexpr, LANES: tl.constexpr):
    issue_prefetch(base_ptr, off, nbytes, log_ptr, MODE, LANES)


@dataclass
class L2Prefetch:
    """Bytes ``[offset, offset + nbytes)`` of ``buffer`` (1-D uint8, e.g. an arena) for a kernel to pull into L2.

    ``log``: where LOG mode appends each launch's pieces as an int64 array [lanes, 2] of (start, size); LOG mode is
    used without a GPU (the interpreter cannot run the PTX) or when ``force_log`` is set."""

    buffer: torch.Tensor
    offset: int
    nbytes: int
    log: list[np.ndarray] = field(default_factory=list)
    force_log: bool = False

    def __post_init__(self) -> None:
        b = self.buffer
        if b.dtype != torch.uint8 or b.ndim != 1 or not b.is_contiguous():
            raise TypeError(f"buffer must be a contiguous 1-D uint8 tensor, got {b.dtype} {tuple(b.shape)}")
        if self.offset < 0 or self.nbytes < 0 or self.offset + self.nbytes > b.numel():
            raise ValueError(f"range [{self.offset}, {self.offset + self.nbytes}) is outside the {b.numel()} B buffer")
        if (b.data_ptr() + self.offset) % ALIGN or self.nbytes % ALIGN:
            raise ValueError(f"the range must start on a {ALIGN}-byte boundary and span a multiple of {ALIGN} bytes "
                             f"(cp.async.bulk.prefetch), got start {b.data_ptr() + self.offset:#x}, {self.nbytes} B")

    @property
    def mode(self) -> int:
        if self.nbytes == 0:
            return NONE
        return LOG if self.force_log or not backend.ON_GPU else BULK


def aligned_range(buffer: torch.Tensor, offset: int, nbytes: int) -> tuple[int, int]:
    """The smallest 16-byte aligned range of ``buffer`` (uint8) holding ``[offset, offset + nbytes)``."""
    base = buffer.data_ptr()
    lo = (base + offset) // ALIGN * ALIGN - base
    hi = min(buffer.numel(), -(-(base + offset + nbytes) // ALIGN) * ALIGN - base)
    if lo < 0 or (hi - lo) % ALIGN:
        raise ValueError(f"buffer at {base:#x} of {buffer.numel()} B cannot hold an aligned range around "
                         f"[{offset}, {offset + nbytes})")
    return lo, hi - lo


_PLACEHOLDERS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def placeholders(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 buffer and an int64 log that a launch without a prefetch (or without a log) passes, never read;
    allocated once per device (so not inside a CUDA-graph capture: the warm-up before it allocates them)."""
    key = str(torch.device(device))
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = (torch.zeros(16, dtype=torch.uint8, device=device),
                              torch.zeros((1, 2), dtype=torch.int64, device=device))
    return _PLACEHOLDERS[key]


def log_buffer(pf: L2Prefetch, programs: int, lanes: int) -> torch.Tensor:
    """The int64 [programs · lanes, 2] log a LOG-mode launch writes (the shared placeholder otherwise)."""
    if pf.mode != LOG:
        return placeholders(pf.buffer.device)[1]
    return torch.full((programs * lanes, 2), -1, dtype=torch.int64, device=pf.buffer.device)


def record_log(pf: L2Prefetch, log: torch.Tensor) -> None:
    if pf.mode == LOG:
        pf.log.append(log.cpu().numpy())


def plan_ranges(nbytes: int, programs: int, lanes: int) -> np.ndarray:
    """CPU twin of ``issue_prefetch``'s split: int64 [programs · lanes, 2] of (start, size), relative to the range."""
    chunk = -(-(-(-nbytes // programs)) // ALIGN) * ALIGN
    sub = -(-(-(-chunk // lanes)) // ALIGN) * ALIGN
    p = np.repeat(np.arange(programs, dtype=np.int64), lanes)
    j = np.tile(np.arange(lanes, dtype=np.int64), programs)
    lo = p * chunk + j * sub
    hi = np.minimum(np.minimum(lo + sub, p * chunk + chunk), nbytes)
    return np.stack([lo, np.maximum(hi - lo, 0)], axis=1)


def check_pieces(pieces: np.ndarray, start: int, nbytes: int) -> None:
    """Raise ``AssertionError`` unless the non-empty pieces tile ``[start, start + nbytes)`` exactly, each aligned,
    a multiple of 16 long and at most ``MAX_PIECE``."""
    live = pieces[pieces[:, 1] > 0]
    live = live[np.argsort(live[:, 0], kind="stable")]
    assert (live[:, 0] % ALIGN == 0).all() and (live[:, 1] % ALIGN == 0).all(), "a piece is not 16-byte aligned"
    assert (live[:, 1] <= MAX_PIECE).all(), f"a piece exceeds {MAX_PIECE} B"
    ends = live[:, 0] + live[:, 1]
    assert len(live) == 0 or (live[0, 0] == start and ends[-1] == start + nbytes), \
        f"pieces span [{live[0, 0]}, {ends[-1]}), wanted [{start}, {start + nbytes})"
    assert (live[1:, 0] == ends[:-1]).all(), "pieces overlap or leave a gap"
    assert len(live) > 0 or nbytes == 0, "nothing was prefetched"


def lanes_for(num_warps: int) -> int:
    return 32 * num_warps


def prefetch_l2(pf: L2Prefetch, programs: int = 4, num_warps: int = 4) -> None:
    """Launch ``prefetch_kernel``: ``programs`` programs pull ``pf``'s range into L2 and exit (no result)."""
    if programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    lanes = lanes_for(num_warps)
    if pf.nbytes > programs * lanes * MAX_PIECE:
        raise ValueError(f"{pf.nbytes} B needs more than {programs} programs of {lanes} lanes x {MAX_PIECE} B")
    if pf.mode == NONE:
        return
    log = log_buffer(pf, programs, lanes)
    prefetch_kernel[(programs,)](pf.buffer, pf.offset, pf.nbytes, log, MODE=pf.mode, LANES=lanes,
                                 num_warps=num_warps)
    record_log(pf, log)


def compile_specs() -> list[tuple[str, object, dict[str, str], dict[str, object], dict]]:
    """(name, kernel, signature, constexprs, attrs) of the prefetch kernels, for ``compile_check``."""
    sig = {"base_ptr": "*u8", "off": "i64", "nbytes": "i64", "log_ptr": "*i64", "MODE": "constexpr",
           "LANES": "constexpr"}
    attrs = {(0,): [["tt.divisibility", 16]], (3,): [["tt.divisibility", 16]]}
    return [(f"prefetch_kernel[{name}]", prefetch_kernel, sig, {"MODE": mode, "LANES": 128}, attrs)
            for name, mode in (("bulk", BULK), ("log", LOG))]
