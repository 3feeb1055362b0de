"""Bitonic sort and argsort on the GPU: host wrappers over the CUDA C++ passes (``impl.sort.cuda_sort``) and the
numba pass programs (``impl.sort.network``).

    sort(x)[i]    = the i-th smallest of x in numpy.sort's order (NaNs last); descending: reversed, NaNs first
    argsort(x)    = the permutation p with x[p] sorted and ties in index order = numpy.argsort(x, kind="stable")
                    (descending: larger first, NaNs first, ties still in index order, like torch.sort(stable=True))

x is 1-D, contiguous, of float16/float32/int32/uint32/int64 and any length n ≥ 0: a numpy array (sorted through the
device and returned on the host; any byte order: a big-endian array is sorted by value and returned in its own
dtype) or a device array in the machine's byte order (numba device array or any ``__cuda_array_interface__``
object; the result is a numba device array). Indices are int64. −0.0 and +0.0 compare equal in argsort (index order between
them); keys-only puts −0.0 before +0.0 and returns every NaN as one canonical quiet NaN (see ``impl.sort.keys``).
``x`` is never modified unless ``inplace=True`` (sort only).

Implementations: ``config`` picks one. A ``CudaSortConfig`` (or the default on a GPU with CuPy) runs the CUDA C++
passes of ``impl.sort.cuda_sort`` (on a CPU: the same source under its g++ emulation); a ``SortConfig`` (or the default
elsewhere) runs the numba kernels below (the simulator on a CPU) — they also give the global-only ablation.

``BitonicSorter`` is the numba sorter in its allocation-free form: programs uploaded and workspace allocated once for
(n, dtype, argsort, config), then ``sorter(d_src, d_out)`` launches only the passes (``CudaSorter`` likewise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import impl  # noqa: F401  (backend before numba)
import numpy as np
from numba import cuda

from impl.common.cudacheck import check_cuda
from impl.sort.cuda_sort import CudaSorter, slot_mode
from impl.sort.kernels import block_kernel_for, register_kernel_for
from impl.sort.keys import KeyFormat, key_format, native
from impl.sort.network import Plan, Program, SortConfig, build_plan, default_config, make_program
from impl.sort.plan import MODES, CudaSortConfig
from impl.sort.runtimes import CupyRuntime, cupy_unavailable_reason

MAX_N = (1 << 31) - 1  # argsort packs the index in 32 bits; positions are int64 either way


def device_free_bytes() -> float:
    """Free device memory in bytes (infinite under the simulator)."""
    return float(cuda.current_context().get_memory_info()[0])


@dataclass(frozen=True)
class Launch:
    """One pass ready to launch: its program on the device and its grid."""

    program: Program
    prog_d: Any
    grid: int
    block: int


class BitonicSorter:
    """Sort (or argsort) ``n`` keys of ``dtype`` on the device, over and over, without allocating.

    ``sorter(d_src, d_out, descending=False, stream=0)``: d_src is the 1-D input (never written unless it is d_out),
    d_out receives values of ``dtype`` (sort) or int64 indices (argsort). Workspace: n keys (+ n uint32 indices for
    argsort of int64).
    """

    def __init__(self, n: int, dtype, *, argsort: bool = False, config: SortConfig | None = None) -> None:
        self.n, self.fmt, self.argsort = int(n), key_format(dtype), argsort
        self.config = config or default_config()
        self.mode = "keys" if not argsort else ("pairs" if self.fmt.pairs else "composite")
        self.key_dtype = np.dtype(np.uint64) if self.mode != "keys" else self.fmt.key_dtype
        self.elem_bytes = {"keys": self.key_dtype.itemsize, "composite": 8, "pairs": 12}[self.mode]
        self.plan: Plan = build_plan(self.n, self.elem_bytes, self.config)
        check_fits(self.n, self.workspace_bytes + 2 * self.n * self.fmt.dtype.itemsize + 8 * self.n * argsort)
        self.keys = cuda.device_array(max(self.n, 1), dtype=self.key_dtype)
        self.vals = cuda.device_array(max(self.n, 1) if self.mode == "pairs" else 1, dtype=np.uint32)
        self.launches = [self._launch(p) for p in self.plan.passes] if self.n else []

    @property
    def workspace_bytes(self) -> int:
        return self.n * (self.key_dtype.itemsize + (4 if self.mode == "pairs" else 0))

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype(np.int64) if self.argsort else self.fmt.dtype

    def _launch(self, p) -> Launch:
        cfg, plan = self.config, self.plan
        prog = make_program(p, plan.tile, cfg.log_e)
        if p.kind == "register":
            threads = plan.n_slots >> len(p.steps)
            return Launch(prog, cuda.to_device(prog.array), -(-threads // cfg.global_threads), cfg.global_threads)
        blocks = -(-self.n // plan.tile) if p.kind == "tile" else plan.n_slots // plan.tile
        return Launch(prog, cuda.to_device(prog.array), blocks, plan.tile >> cfg.log_e)

    def bytes_per_pass(self) -> list[int]:
        """Bytes each pass reads and writes in global memory (inputs and outputs of the encode/decode passes)."""
        n, key = self.n, self.elem_bytes
        out = []
        for p in self.plan.passes:
            read = n * (self.fmt.dtype.itemsize if p.encode else key)
            write = n * (self.out_dtype.itemsize if p.decode else key)
            out.append(read + write)
        return out

    def __call__(self, d_src, d_out, *, descending: bool = False, stream=0, passes: slice = slice(None)):
        """Launch the passes (all, or a slice of them: the host pipeline launches the end passes per chunk)."""
        src, out = self.views(d_src, d_out)
        enc = self.encode_params(descending)
        for launch in self.launches[passes]:
            self.launch_one(launch, src, out, enc, stream)
        return d_out

    def views(self, d_src, d_out) -> tuple:
        """The unsigned bit views the kernels take of the input and (keys-only) output."""
        return _unsigned_view(d_src, self.fmt), d_out if self.argsort else _unsigned_view(d_out, self.fmt)

    def launch_one(self, launch: Launch, src, out, enc, stream, first_block: int = 0, blocks: int | None = None):
        cfg, prog = self.config, launch.program
        if prog.kind == "register":
            kernel = register_kernel_for(len(prog.gens), self.key_dtype, self.mode, cfg.global_threads)
            nthreads = self.plan.n_slots >> len(prog.gens)
            kernel[launch.grid, launch.block, stream](launch.prog_d, src, self.keys, self.vals, out, self.n, enc,
                                                      nthreads)
        else:
            kernel = block_kernel_for(self.plan.tile, cfg.log_e, self.key_dtype, self.mode)
            kernel[blocks or launch.grid, launch.block, stream](launch.prog_d, src, self.keys, self.vals, out,
                                                                self.n, enc, first_block)

    def encode_params(self, descending: bool) -> tuple:
        return self.fmt.params(descending=descending, canon_zero=self.argsort)

    @property
    def tile(self) -> int:
        return self.plan.tile

    def span_bits(self, i: int) -> int:
        """Every block of pass ``i`` lies in one aligned region of 2^span_bits slots (tile passes: one tile; the wide
        and register passes span the whole array)."""
        return self.tile.bit_length() - 1 if self.plan.passes[i].kind == "tile" else 63

    def block_bits(self, i: int) -> int:
        return self.tile.bit_length() - 1

    def pass_blocks(self, i: int) -> int:
        return self.launches[i].grid

    def launch_pass(self, i: int, src, out, *, descending: bool = False, stream=None, first_block: int = 0,
                    blocks: int | None = None) -> None:
        """Launch pass ``i`` (tile passes: ``blocks`` blocks from ``first_block``; what the host pipeline chunks)."""
        s, o = self.views(src, out)
        self.launch_one(self.launches[i], s, o, self.encode_params(descending), stream or 0, first_block, blocks)


class StreamGraph:
    """The work ``enqueue()`` puts on numba stream ``stream`` (and on the streams it forks from it through events, all
    joined back before it returns) captured once as a CUDA graph; ``graph(stream)`` replays it with one launch.

    Every kernel must have been loaded before (module loading is not allowed while capturing), and the buffers the
    work touches must outlive the graph (``keep`` holds them). Needs a GPU and ``cuda.bindings``."""

    def __init__(self, stream, enqueue, *, keep=(), relaxed: bool = False) -> None:
        from numba import config as numba_config

        if numba_config.ENABLE_CUDASIM:
            raise NotImplementedError("CUDA graphs need a GPU; the simulator launches kernels one by one")
        from cuda.bindings import driver as drv

        self._drv, self._keep, self._graph, self._exec = drv, keep, None, None
        modes = drv.CUstreamCaptureMode
        mode = modes.CU_STREAM_CAPTURE_MODE_RELAXED if relaxed else modes.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        handle = drv.CUstream(int(stream.handle))
        check_cuda(drv.cuStreamBeginCapture(handle, mode), "cuStreamBeginCapture")
        try:
            enqueue()
        finally:
            (graph,) = check_cuda(drv.cuStreamEndCapture(handle), "cuStreamEndCapture")  # always leave capture mode
        self._graph = graph
        (self._exec,) = check_cuda(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def __call__(self, stream=0) -> None:
        handle = int(stream.handle) if hasattr(stream, "handle") else int(stream)
        check_cuda(self._drv.cuGraphLaunch(self._exec, self._drv.CUstream(handle)), "cuGraphLaunch")

    def __del__(self) -> None:
        drv = getattr(self, "_drv", None)
        if drv is not None and getattr(self, "_exec", None) is not None:
            try:
                drv.cuGraphExecDestroy(self._exec)
                drv.cuGraphDestroy(self._graph)
            except Exception:  # interpreter shutdown: the driver module may already be gone
                pass


class SortGraph:
    """All passes of ``sorter(d_src, d_out, descending)`` captured once as a CUDA graph; ``graph(stream)`` replays them
    with one launch instead of one numba launch (~18 µs of host time each) per pass.

    The buffers and the direction are baked in. Capture runs on a private stream after a warm-up call has compiled
    and loaded every kernel. Needs a GPU and ``cuda.bindings``.
    """

    def __init__(self, sorter: BitonicSorter, d_src, d_out, *, descending: bool = False) -> None:
        from numba import config as numba_config

        if numba_config.ENABLE_CUDASIM:
            raise NotImplementedError("CUDA graphs need a GPU; the simulator launches kernels one by one")
        sorter(d_src, d_out, descending=descending)
        cuda.synchronize()
        stream = cuda.stream()
        self._replay = StreamGraph(stream, lambda: sorter(d_src, d_out, descending=descending, stream=stream),
                                   keep=(sorter, d_src, d_out))
        self.nodes = len(sorter.launches)

    def __call__(self, stream=0) -> None:
        self._replay(stream)


def _unsigned_view(d, fmt: KeyFormat):
    return d.view(fmt.bits_dtype) if d.dtype != fmt.bits_dtype else d


def check_fits(n: int, needed: int) -> None:
    """Refuse sizes the kernels cannot index or the device cannot hold, with the numbers."""
    if n > MAX_N:
        raise ValueError(f"n = {n} keys exceeds the supported maximum {MAX_N} (indices are packed in 32 bits)")
    free = device_free_bytes()
    if needed > free:
        raise MemoryError(f"sorting {n} keys needs {needed / 2**20:.1f} MiB of device memory but only "
                          f"{free / 2**20:.1f} MiB is free: the input is larger than device memory allows")


def validate(x) -> None:
    """Clear errors for inputs the sort does not take: not an array, not 1-D, unsupported dtype, not contiguous, a
    device array in a non-native byte order (host arrays in either byte order are sorted by value)."""
    if not (isinstance(x, np.ndarray) or hasattr(x, "copy_to_host") or hasattr(x, "__cuda_array_interface__")):
        raise TypeError(f"sort takes a numpy array or a CUDA device array, not {type(x).__name__}")
    shape = tuple(x.shape)
    if len(shape) != 1:
        raise ValueError(f"sort takes a 1-D array, got shape {shape}")
    key_format(x.dtype.newbyteorder("=") if isinstance(x, np.ndarray) else x.dtype)
    contiguous = x.flags.c_contiguous if isinstance(x, np.ndarray) else _device_contiguous(x)
    if not contiguous:
        raise ValueError("sort takes a contiguous array; this one is strided (copy it with np.ascontiguousarray)")


def _device_contiguous(x) -> bool:
    if hasattr(x, "is_c_contiguous"):
        return bool(x.is_c_contiguous())
    iface = getattr(x, "__cuda_array_interface__", {})
    strides = iface.get("strides")
    return strides is None or strides[0] == np.dtype(iface["typestr"]).itemsize


def _as_device(x):
    """(device array, is_host) for a numpy array or a device array / CUDA-array-interface object."""
    if isinstance(x, np.ndarray):
        return cuda.to_device(x), True
    if hasattr(x, "copy_to_host"):
        return x, False
    return cuda.as_cuda_array(x), False


def uses_cuda_cpp(config) -> bool:
    """Whether ``config`` selects the CUDA C++ passes (see the module doc)."""
    if isinstance(config, CudaSortConfig):
        return True
    if config is None:
        return cupy_unavailable_reason() is None
    if isinstance(config, SortConfig):
        return False
    raise TypeError(f"config must be a CudaSortConfig or a SortConfig, not {type(config).__name__}")


def make_sorter(n: int, dtype, *, argsort: bool = False, config=None, runs: int | None = None):
    """The sorter ``config`` selects (``CudaSorter`` or ``BitonicSorter``), after checking that n keys fit;
    ``runs``: the CUDA C++ passes up to sorted runs of 2^runs slots only (``build_cuda_plan``)."""
    if not uses_cuda_cpp(config):
        if runs is not None:
            raise ValueError("sorted runs (runs=) are a plan of the CUDA C++ passes; this config selects numba's")
        return BitonicSorter(n, dtype, argsort=argsort, config=config)
    fmt = key_format(dtype)
    check_fits(n, n * (MODES[slot_mode(fmt, argsort)] + 2 * fmt.dtype.itemsize + 8 * argsort))
    return CudaSorter(n, dtype, argsort=argsort, config=config if isinstance(config, CudaSortConfig) else None,
                      runs=runs)


def _run(x, *, argsort: bool, descending: bool, inplace: bool, config):
    validate(x)
    host = isinstance(x, np.ndarray)
    xn = native(x) if host else x  # host arrays in another byte order: sorted by value, returned in their dtype
    n = int(x.shape[0])
    sorter = make_sorter(n, xn.dtype, argsort=argsort, config=config)
    if isinstance(sorter, CudaSorter):
        got = _run_cuda(sorter, xn, host=host, descending=descending, inplace=inplace)
    else:
        d_x, _ = _as_device(xn)
        d_out = d_x if inplace else cuda.device_array(n, dtype=sorter.out_dtype)
        if n:
            sorter(d_x, d_out, descending=descending)
        got = d_out if not host else d_out.copy_to_host(xn) if inplace else d_out.copy_to_host()
    if not host:
        return got
    if inplace:
        if xn is not x:
            x[...] = xn
        return x
    return got if argsort else got.astype(x.dtype, copy=False)


def _run_cuda(sorter: CudaSorter, x, *, host: bool, descending: bool, inplace: bool):
    """Sort through the CUDA C++ passes: CuPy buffers on a GPU, the numpy/simulator arrays themselves under the
    emulation. Returns the host result (host input; written into x when in place) or the device result."""
    n = sorter.n
    if isinstance(sorter.runtime, CupyRuntime):
        cp = sorter.runtime.cupy
        d_x = cp.asarray(x) if host else x
        d_out = d_x if inplace else cp.empty(max(n, 1), dtype=sorter.out_dtype)[:n]
        if n:
            sorter(d_x, d_out, descending=descending)
        if host:
            return d_out.get(out=x) if inplace else d_out.get()
        return d_x if inplace else cuda.as_cuda_array(d_out)
    d_out = x if inplace else (np.empty(n, sorter.out_dtype) if host else cuda.device_array(n, sorter.out_dtype))
    if n:
        sorter(x, d_out, descending=descending)
    return d_out


def sort(x, *, descending: bool = False, inplace: bool = False, config=None):
    """Sorted copy of ``x`` (or ``x`` itself, sorted, with ``inplace=True``); see the module doc for the order."""
    if inplace and isinstance(x, np.ndarray) and not x.flags.writeable:
        raise ValueError("inplace=True needs a writeable array")
    return _run(x, argsort=False, descending=descending, inplace=inplace, config=config)


def argsort(x, *, descending: bool = False, config=None):
    """int64 permutation that sorts ``x``, ties broken by index (numpy.argsort(kind="stable") when ascending)."""
    return _run(x, argsort=True, descending=descending, inplace=False, config=config)
