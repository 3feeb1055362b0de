"""Where the CUDA C++ sort's kernels run: the GPU through CuPy, or the CPU through ``bitonic_emulated.cpp``.

Both take the generated kernels of ``impl.sort.codegen`` and launch them with one argument list (``SORT_PARAMS``):

    rt = CupyRuntime()                  # or EmulatedRuntime()
    fns = rt.kernels(kernel_specs)      # compiled once per source (disk cache), loaded, by kernel name
    rt.launch(fns[name], grid, block, smem, (src_ptr, keys_ptr, vals_ptr, out_ptr, n, kind, canon, flip, block0),
              stream)

GPU kernels are compiled by nvcc (-arch=sm_<cc>, one cubin per kernel, in parallel; ``LAB_SORT_KERNELS`` or
``.carry/sort-kernels`` in the repository holds the cache, so cubins built on another machine can travel with the
tree) and loaded with ``cupy.RawModule(path=...)``; without nvcc, NVRTC through ``cupy.RawModule(code=...)``.
The emulated runtime builds one shared library per set of kernels with g++ and calls it through ctypes on numpy
arrays; it is the CPU twin that runs the .cu source itself.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from impl.sort.codegen import SOURCE, KernelSpec, module_source

ROOT = Path(__file__).resolve().parents[2]
NVCC_FLAGS = ("-std=c++17", "-cubin", "-Xptxas", "-v")


def kernel_cache() -> Path:
    """Folder of compiled kernels: ``$LAB_SORT_KERNELS``, else ``<repo>/.carry/sort-kernels`` (git-ignored)."""
    return Path(os.environ.get("LAB_SORT_KERNELS") or ROOT / ".carry" / "sort-kernels")


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in ("/usr/local/cuda/bin/nvcc",):
        if Path(cand).exists():
            return cand
    return None


def cubin_path(spec: KernelSpec, arch: str, cache: Path | None = None) -> Path:
    """Where the cubin of ``spec`` for ``sm_<arch>`` lives in the cache (named by a hash of its source text)."""
    src = module_source([spec])
    digest = hashlib.sha1(f"{arch}\n{NVCC_FLAGS}\n{src}".encode()).hexdigest()[:16]
    return (cache or kernel_cache()) / f"sm{arch}" / f"{spec.name}-{digest}.cubin"


def compile_cubin(spec: KernelSpec, arch: str, cache: Path | None = None, nvcc: str | None = None,
                  timeout: float = 900) -> tuple[Path, str]:
    """(cubin path, ptxas report) of one kernel for ``sm_<arch>``, compiled once per source text."""
    out = cubin_path(spec, arch, cache)
    log = out.with_suffix(".ptxas.txt")
    if out.exists() and log.exists():
        return out, log.read_text()
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH (nor /usr/local/cuda/bin): cannot compile the sort's kernels")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / f"{spec.name}.cu"
        cu.write_text(module_source([spec]))
        tmp = Path(d) / "k.cubin"
        res = subprocess.run([nvcc, f"-arch=sm_{arch}", *NVCC_FLAGS, "-o", str(tmp), str(cu)],
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed on {spec.name}:\n{res.stderr[-4000:]}")
        os.replace(tmp, out)
    log.write_text(res.stderr)
    return out, res.stderr


def compile_all(specs: list[KernelSpec], arch: str, jobs: int | None = None, cache: Path | None = None,
                deadline: float | None = None) -> dict[str, tuple[Path, str]]:
    """Compile every distinct kernel of ``specs`` in parallel (nvcc processes); name -> (cubin, ptxas report).
    ``deadline`` (``time.monotonic()`` value): no nvcc runs past it (TimeoutExpired is raised instead)."""
    import time

    uniq = {s.name: s for s in specs}
    jobs = jobs or max(1, min(len(uniq), os.cpu_count() or 1))

    def one(s: KernelSpec):
        left = 900.0 if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired("nvcc", 0)
        return s.name, compile_cubin(s, arch, cache, timeout=left)

    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, uniq.values()))


class CupyRuntime:
    """Kernels on the GPU through CuPy (the stream is a CuPy stream, a raw handle, or None for the current one)."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.arch = str(cupy.cuda.Device().compute_capability)  # e.g. '90'
        self.max_smem = int(cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["sharedMemPerBlockOptin"])
        self._fns: dict[str, Any] = {}
        self.compile_s = 0.0
        self.deadline: float | None = None  # time.monotonic() after which no compile starts (tune's budget)
        self._external: dict[int, Any] = {}

    def kernels(self, specs: list[KernelSpec], smem: int) -> dict[str, Any]:
        """Load (cached cubins), compile (nvcc in parallel; NVRTC without nvcc) and configure the kernels."""
        import time

        missing = [s for s in dict.fromkeys(specs) if s.name not in self._fns]
        if missing:
            t0 = time.perf_counter()
            cached = {s.name: p for s in missing if (p := cubin_path(s, self.arch)).exists()}
            rest = [s for s in missing if s.name not in cached]
            if rest and nvcc_path():
                built = compile_all(rest, self.arch, deadline=self.deadline)
                cached.update({name: path for name, (path, _) in built.items()})
                rest = []
            for s in missing:
                if s.name in cached:
                    self._fns[s.name] = self.cupy.RawModule(path=str(cached[s.name])).get_function(s.name)
            if rest:
                mod = self.cupy.RawModule(code=module_source(rest), options=("-std=c++17", "-default-device"))
                for s in rest:
                    self._fns[s.name] = mod.get_function(s.name)
            self.compile_s += time.perf_counter() - t0
        fns = {s.name: self._fns[s.name] for s in specs}
        if smem > self.max_smem:
            raise ValueError(f"the tile needs {smem} B of shared memory; this GPU allows {self.max_smem} per block")
        for fn in fns.values():
            if fn.max_dynamic_shared_size_bytes < smem:
                fn.max_dynamic_shared_size_bytes = smem
        return fns

    def stream_of(self, stream):
        """A CuPy stream for None (the current one), a CuPy stream, a torch stream, a numba stream or a handle."""
        if stream is None or (hasattr(stream, "ptr") and hasattr(stream, "use")):
            return stream
        if hasattr(stream, "cuda_stream"):
            handle = stream.cuda_stream
        elif hasattr(stream, "handle"):
            handle = getattr(stream.handle, "value", stream.handle)
        else:
            handle = stream
        if not handle:
            return None
        handle = int(handle)
        wrapped = self._external.get(handle)  # one wrapper per handle: a launch costs host time the pipeline waits on
        if wrapped is None:
            wrapped = self._external[handle] = self.cupy.cuda.ExternalStream(handle)
        return wrapped

    def launch(self, fn, grid: int, block: int, smem: int, args: tuple, stream=None) -> None:
        s = self.stream_of(stream)
        if s is None:
            fn((grid,), (block,), args, shared_mem=smem)
        else:
            with s:
                fn((grid,), (block,), args, shared_mem=smem)

    @staticmethod
    def ptr(a) -> int:
        return int(a.__cuda_array_interface__["data"][0])

    def empty(self, n: int, dtype) -> Any:
        return self.cupy.empty(max(n, 1), dtype=dtype)


class EmulatedRuntime:
    """The same kernels on the CPU: ``bitonic_emulated.cpp`` + the generated source, one g++ shared library per
    kernel set (cached by source hash under ``$LAB_SORT_KERNELS``/emulated), arrays are numpy arrays."""

    name = "emulated"
    max_smem = 1 << 20

    def __init__(self) -> None:
        self._libs: dict[str, tuple[Any, dict[str, int]]] = {}
        self._fns: dict[str, tuple[Any, int]] = {}
        self.compile_s = 0.0
        self.deadline: float | None = None  # time.monotonic() after which no build starts (tune's budget)

    @staticmethod
    def unavailable_reason() -> str | None:
        return None if shutil.which("g++") else "g++ is not on PATH: the CUDA C++ source cannot be emulated here"

    def build(self, specs: list[KernelSpec]) -> tuple[Any, dict[str, int]]:
        import time

        src = module_source(list(dict.fromkeys(specs)))
        emu = SOURCE.with_name("bitonic_emulated.cpp")
        digest = hashlib.sha1((src + emu.read_text()).encode()).hexdigest()[:16]
        if digest in self._libs:
            return self._libs[digest]
        t0 = time.perf_counter()
        folder = kernel_cache() / "emulated"
        folder.mkdir(parents=True, exist_ok=True)
        lib_path = folder / f"libsort-{digest}.so"
        if not lib_path.exists():
            gxx = shutil.which("g++")
            if gxx is None:
                raise RuntimeError(self.unavailable_reason())
            with tempfile.TemporaryDirectory() as d:
                gen = Path(d) / "generated.cu"
                gen.write_text(src)
                tmp = Path(d) / "lib.so"
                left = 900.0 if self.deadline is None else self.deadline - time.monotonic()
                if left <= 0:
                    raise subprocess.TimeoutExpired("g++", 0)
                res = subprocess.run([gxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC",
                                      f"-DSORT_SOURCE=\"{gen}\"", "-o", str(tmp), str(emu)],
                                     capture_output=True, text=True, timeout=left)
                if res.returncode != 0:
                    raise RuntimeError(f"g++ failed on the emulated sort:\n{res.stderr[-4000:]}")
                shutil.move(str(tmp), lib_path)
        lib = ctypes.CDLL(str(lib_path))
        lib.sort_emu_name.restype = ctypes.c_char_p
        lib.sort_emu_launch.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong,
                                        ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong, ctypes.c_uint]
        index = {lib.sort_emu_name(i).decode(): i for i in range(lib.sort_emu_count())}
        self._libs[digest] = (lib, index)
        self.compile_s += time.perf_counter() - t0
        return lib, index

    def kernels(self, specs: list[KernelSpec], smem: int) -> dict[str, Any]:
        missing = [s for s in specs if s.name not in self._fns]
        if missing:
            lib, index = self.build(missing)
            for s in missing:
                self._fns[s.name] = (lib, index[s.name])
        return {s.name: self._fns[s.name] for s in specs}

    def launch(self, fn, grid: int, block: int, smem: int, args: tuple, stream=None) -> None:
        lib, k = fn
        src, keys, vals, out, n, kind, canon, flip, block0 = args
        rc = lib.sort_emu_launch(k, grid, block, smem, src, keys, vals, out, int(n), int(kind), int(canon),
                                 int(flip), int(block0))
        if rc != 0:
            raise RuntimeError(f"emulated launch of kernel {k} failed (rc {rc})")

    @staticmethod
    def ptr(a) -> int:
        return int(getattr(a, "_ary", a).ctypes.data)  # numpy, or the numba simulator's array around one

    def empty(self, n: int, dtype) -> np.ndarray:
        return np.empty(max(n, 1), dtype=dtype)


def cupy_unavailable_reason() -> str | None:
    """Why kernels cannot run through CuPy here, or None."""
    from impl import backend

    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return f"cupy is not installed ({e}); the CUDA C++ sort needs it on a GPU (the GPU machine has cupy 14.2)"
    if not backend.ON_GPU:
        return backend.NO_GPU_REASON
    return None
