"""The hash join's CUDA C++ kernels (``hash_join.cu``) launched through CuPy RawModule.

Why C++ here: at 1M x 1M the whole join is ~tens of µs of device work, and a numba-cuda launch costs ~18 µs of host
time, so the numba version is bound by its own launches. CuPy launches cost a few µs. The algorithm, table layout and
phases are exactly ``hash_numba``'s (its CPU twin, run by the same tests); see that module and the .cu file. On CPU
machines the .cu source is also compiled by nvcc/NVRTC for sm_90 and run as-is under a thin CUDA emulation
(``hash_join_emulated.cpp``, g++) against pandas.merge, by ``correctness/test_join*.py``.

Launch sequence per join: memset(table) -> build -> count (+ last-block scan) -> read the total (the one host sync)
-> allocate exact-size outputs -> write. ``speculative_join`` skips the sync before the write: it launches the write
into a buffer of ``n_probe`` pairs (enough whenever build keys are unique) and re-runs it exact-size if the total
turns out larger; the pairs it returns are exact-size views.

cupy is not installed on CPU machines: everything here then reports ``unavailable_reason()`` and the tests skip.
"""
from __future__ import annotations

import functools
from pathlib import Path

import impl  # noqa: F401
import torch

from impl import backend
from impl.join.common import EMPTY, JoinResult, Workspace, check_inputs, run_join
from impl.join.hash_numba import Built, HashConfig, Probed

SOURCE = Path(__file__).with_name("hash_join.cu")
KERNEL_NAMES = ("hash_build_cu_i32", "hash_build_cu_i64", "hash_count_cu_i32", "hash_count_cu_i64",
                "hash_write_cu_i32_r32", "hash_write_cu_i32_r64", "hash_write_cu_i64_r32", "hash_write_cu_i64_r64")
MAX_GRID = 65535

try:
    import cupy
except ImportError as _e:  # CPU machines: the numba twin covers the algorithm there
    cupy = None
    _CUPY_ERROR = f"cupy is not installed ({_e}); the CUDA C++ hash join needs it (the GPU machine has cupy 14.2)"
else:
    _CUPY_ERROR = None


def unavailable_reason() -> str | None:
    """Why the C++ join cannot run here, or None when it can."""
    if _CUPY_ERROR:
        return _CUPY_ERROR
    if backend.DEVICE != "cuda":
        return backend.NO_GPU_REASON
    return None


@functools.cache
def _module(threads: int, items: int):
    return cupy.RawModule(code=SOURCE.read_text(), options=(
        "-std=c++17", f"-DJOIN_THREADS={threads}", f"-DJOIN_ITEMS={items}"))


def _suffix(t: torch.Tensor) -> str:
    return "i32" if t.dtype == torch.int32 else "i64"


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()  # CuPy passes a Python int as 8 bytes (int64): exactly a T* parameter's by-value bytes


def _launch(fn, grid: int, block: int, args: tuple) -> None:
    stream = torch.cuda.current_stream().cuda_stream
    if stream == 0:  # torch's and cupy's default stream are the same legacy stream
        fn((grid,), (block,), args)
    else:
        with cupy.cuda.ExternalStream(stream):
            fn((grid,), (block,), args)


class HashJoinCuda:
    """CUDA hash join in CUDA C++ via CuPy (same phases, state and config as ``HashJoinNumba``)."""

    name = "hash-cuda"

    def __init__(self, config: HashConfig = HashConfig()) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.config = config
        self.ws = Workspace()
        self.mod = _module(config.threads, config.items)
        self.fns = {name: self.mod.get_function(name) for name in KERNEL_NAMES}

    def build(self, keys: torch.Tensor, rows: torch.Tensor) -> Built:
        cfg, n = self.config, keys.numel()
        cap = cfg.capacity(n)
        table = self.ws.get("table", 2 * cap + 2, keys.dtype, keys.device)
        cupy.cuda.runtime.memsetAsync(table.data_ptr(), 0xFF, table.numel() * table.element_size(),
                                      torch.cuda.current_stream().cuda_stream)  # every slot (-1, -1)
        nxt = self.ws.get("nxt", n, keys.dtype, keys.device)
        built = Built(table, nxt, rows, cap - 1, int(keys.dtype == torch.int64))
        if n:
            grid = min(-(-n // cfg.threads), MAX_GRID)
            _launch(self.fns[f"hash_build_cu_{_suffix(keys)}"], grid, cfg.threads,
                    (_ptr(keys), n, _ptr(table), _ptr(nxt), built.mask, built.wide))
        return built

    def _count(self, built: Built, keys: torch.Tensor, rows: torch.Tensor) -> tuple[Probed, int]:
        cfg, n, dev = self.config, keys.numel(), keys.device
        nblocks = cfg.probe_blocks(n)
        heads = self.ws.get("heads", n, keys.dtype, dev)
        tcounts = self.ws.get("thread_counts", nblocks * cfg.threads, torch.int64, dev)
        offsets = self.ws.get("offsets", nblocks + 1, torch.int64, dev)
        if n:
            bcounts = self.ws.get("block_counts", nblocks, torch.int64, dev)
            done = self.ws.get("done", 1, torch.int32, dev, zeros=True)
            _launch(self.fns[f"hash_count_cu_{_suffix(keys)}"], nblocks, cfg.threads,
                    (_ptr(keys), n, _ptr(built.table), _ptr(built.nxt), built.mask, built.wide, _ptr(heads),
                     _ptr(tcounts), _ptr(bcounts), _ptr(offsets), _ptr(done)))
        return Probed(built, heads, tcounts, offsets, rows, 0), nblocks

    def probe(self, built: Built, keys: torch.Tensor, rows: torch.Tensor) -> Probed:
        probed, nblocks = self._count(built, keys, rows)
        if keys.numel():
            probed.total = int(probed.offsets[nblocks].item())  # the one host sync: the output size
        return probed

    def materialize(self, probed: Probed, out_build: torch.Tensor, out_probe: torch.Tensor,
                    capacity: int | None = None) -> None:
        cfg, n = self.config, probed.heads.numel()
        name = f"hash_write_cu_{_suffix(probed.heads)}_r{32 if out_build.dtype == torch.int32 else 64}"
        _launch(self.fns[name], cfg.probe_blocks(n), cfg.threads,
                (_ptr(probed.heads), n, _ptr(probed.built.nxt), _ptr(probed.thread_counts), _ptr(probed.offsets),
                 _ptr(probed.built.rows), _ptr(probed.rows), _ptr(out_build), _ptr(out_probe),
                 out_build.numel() if capacity is None else capacity))

    def __call__(self, build_keys, probe_keys, build_rows=None, probe_rows=None, *, timed: bool = False):
        return run_join(self, build_keys, probe_keys, build_rows, probe_rows, timed=timed)

    def speculative_join(self, build_keys, probe_keys, build_rows=None, probe_rows=None) -> JoinResult:
        """Join without the host sync before the write (see the module doc); exact-size views of the pairs."""
        t = check_inputs(build_keys, probe_keys, build_rows, probe_rows)
        built = self.build(t.build_keys, t.build_rows)
        probed, nblocks = self._count(built, t.probe_keys, t.probe_rows)
        n, dev, rdt = t.probe_keys.numel(), t.probe_keys.device, t.build_rows.dtype
        ob, op = torch.empty(n, dtype=rdt, device=dev), torch.empty(n, dtype=rdt, device=dev)
        if n == 0:
            return JoinResult(ob, op)
        self.materialize(probed, ob, op, capacity=n)
        total = int(probed.offsets[nblocks].item())
        if total > n:  # many-to-many: the guess was short; write again, exact-size
            ob, op = torch.empty(total, dtype=rdt, device=dev), torch.empty(total, dtype=rdt, device=dev)
            self.materialize(probed, ob, op)
        return JoinResult(ob[:total], op[:total])


def hash_join_cuda(build_keys, probe_keys, build_rows=None, probe_rows=None, *, config: HashConfig = HashConfig(),
                   timed: bool = False):
    """Inner equi-join with the CUDA C++ hash join; returns a ``JoinResult``."""
    return HashJoinCuda(config)(build_keys, probe_keys, build_rows, probe_rows, timed=timed)


__all__ = ["HashJoinCuda", "hash_join_cuda", "unavailable_reason", "SOURCE", "KERNEL_NAMES", "EMPTY"]
