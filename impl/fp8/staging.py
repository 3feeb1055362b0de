"""The loader's data path: a safetensors file's data section, read in large parallel chunks, onto the device.

A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensors' bytes back to back
(``data_offsets`` relative to the data section). ``Stager.read_file`` reads that section in chunks of
``chunk_bytes`` with ``threads`` parallel ``preadv`` calls (the GIL is released while the kernel copies) into one
of ``buffers`` reused host buffers -- pinned for a CUDA device -- and copies each chunk to its place in one device
buffer on a side stream while the next chunk is read. Host memory is therefore ``buffers x chunk_bytes`` whatever
the model size; tensors are views of the device buffer (a copy where an offset is not aligned to the element).
On a CPU device the section is read straight into the destination (no staging).

``HostMemory`` measures what the load costs the host: resident memory (VmRSS) sampled after every chunk, minus its
value before, and the staging bytes the stager itself allocated (pinned memory need not show in RSS, and some
machines report no RSS at all); its ``peak`` is the larger of the two. ``evict`` drops files from the page cache
(``posix_fadvise(DONTNEED)``, else ``/proc/sys/vm/drop_caches``) and says, from ``mincore``, whether it worked;
``plain_read`` is the same file system's own sequential read speed, the yardstick of a cold load.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

# parallel reads at most, by default: on the H200 machine (16 cores; .ci/gpu/load_probe.py, 0.7 GB checkpoint, 64 MiB
# chunks) 8 threads loaded warm at 21.1 GB/s and cold at 2.13 GB/s, 16 at 23.5 and 1.63, and the plain read ran
# fastest with 8 (warm 23.7 GB/s, 17.4 with 16)
READ_THREADS = 8
ALIGN = 1 << 20  # thread sub-ranges of a chunk: at least 1 MiB, on 1 MiB boundaries


def data_section(path: Path) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(start of the data section, its length, {name: (begin, end)} relative to it) from a file's header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: shorter than a safetensors header")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"{path.name}: header length {n} exceeds the file ({size} bytes)")
        header = json.loads(f.read(n))
    ranges = {k: (int(v["data_offsets"][0]), int(v["data_offsets"][1])) for k, v in header.items()
              if k != "__metadata__"}
    start = 8 + n
    length = max((e for _, e in ranges.values()), default=0)
    if start + length > size:
        raise ValueError(f"{path.name}: tensor data ends at {start + length}, past the file's {size} bytes")
    return start, length, ranges


def rss_bytes() -> int | None:
    """Resident memory of this process (VmRSS), or None where /proc gives none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                value = int(line.split()[1]) * 1024
                return value or None
    except OSError:
        pass
    return None


@dataclass
class HostMemory:
    """Host memory a load needs beyond what the process held before it (see the module doc)."""

    base_rss: int | None = field(default_factory=rss_bytes)
    rss_growth: int | None = None   # max over samples of VmRSS - base (None: no RSS on this machine)
    staging_bytes: int = 0          # pinned / pageable chunk buffers the stager allocated
    pinned_bytes: int = 0

    def sample(self) -> None:
        now = rss_bytes()
        if now is not None and self.base_rss is not None:
            self.rss_growth = max(self.rss_growth or 0, now - self.base_rss)

    @property
    def peak(self) -> int:
        return max(self.rss_growth or 0, self.staging_bytes)

    @property
    def source(self) -> str:
        if self.rss_growth is None:
            return "staging buffers counted (no VmRSS here)"
        return "VmRSS growth" if (self.rss_growth or 0) >= self.staging_bytes else "staging buffers counted"


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read at offset {offset + done}")
        done += got


class Stager:
    """Reads safetensors data sections onto ``device`` through reused chunk buffers (module doc)."""

    def __init__(self, device: torch.device, *, chunk_bytes: int = 64 << 20, buffers: int = 2,
                 threads: int | None = None, pinned: bool = True, memory: HostMemory | None = None,
                 progress=None, staged: bool | None = None, min_read: int = ALIGN) -> None:
        """``staged``: through the chunk buffers (default: on a CUDA device only); ``min_read``: the smallest
        share of a chunk one thread reads (tests make it small to split small files)."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.pinned = self.cuda and pinned
        self.staged = self.cuda if staged is None else (staged or self.cuda)
        self.min_read = max(1, min_read)
        self.chunk = max(self.min_read, chunk_bytes)
        self.threads = max(1, threads or min(READ_THREADS, os.cpu_count() or 1))
        self.memory = memory or HostMemory()
        self.progress = progress
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.bufs: list[torch.Tensor] = []
        self.events: list = []
        if self.staged:
            self.stream = torch.cuda.Stream(device) if self.cuda else None
            for _ in range(max(1, buffers)):
                self.bufs.append(torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.pinned))
                self.events.append(torch.cuda.Event() if self.cuda else None)
            self.memory.staging_bytes += self.chunk * len(self.bufs)
            self.memory.pinned_bytes += self.chunk * len(self.bufs) if self.pinned else 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.bufs.clear()

    def _read(self, fd: int, dst: memoryview, offset: int) -> None:
        """Fill ``dst`` from the file at ``offset`` with up to ``threads`` parallel reads of >= 1 MiB each."""
        n = len(dst)
        parts = min(self.threads, max(1, n // self.min_read))
        if parts == 1 or self.pool is None:
            _read_exact(fd, dst, offset)
            return
        step = -(-n // parts // self.min_read) * self.min_read
        jobs = [self.pool.submit(_read_exact, fd, dst[a: min(a + step, n)], offset + a) for a in range(0, n, step)]
        for j in jobs:
            j.result()

    def read_file(self, path: Path) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
        """(uint8 device buffer holding the data section, {name: (begin, end)})."""
        start, length, ranges = data_section(path)
        out = torch.empty(length, dtype=torch.uint8, device=self.device)
        fd = os.open(path, os.O_RDONLY)
        try:
            if not self.staged:
                if length:
                    self._read(fd, memoryview(out.numpy()), start)
                self._tick(length)
                return out, ranges
            for i, a in enumerate(range(0, length, self.chunk)):
                n = min(self.chunk, length - a)
                slot = i % len(self.bufs)
                buf = self.bufs[slot]
                if not self.cuda:
                    self._read(fd, memoryview(buf.numpy())[:n], start + a)
                    out[a: a + n].copy_(buf[:n])
                    self._tick(n)
                    continue
                self.events[slot].synchronize()  # the copy that last read this buffer is done
                self._read(fd, memoryview(buf.numpy())[:n], start + a)
                with torch.cuda.stream(self.stream):
                    out[a: a + n].copy_(buf[:n], non_blocking=True)
                    self.events[slot].record(self.stream)
                self._tick(n)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
                out.record_stream(self.stream)
        finally:
            os.close(fd)
        return out, ranges

    def _tick(self, n: int) -> None:
        self.memory.sample()
        if self.progress is not None:
            self.progress.update(n)


def tensor_view(buf: torch.Tensor, begin: int, end: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The bytes [begin, end) of ``buf`` as a tensor of ``dtype`` and ``shape`` (a view when aligned, else a copy)."""
    raw = buf[begin:end]
    if begin % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


# ---- the page cache and the disk's own speed ----------------------------------------------------------------------

def resident_fraction(path: Path) -> float | None:
    """Share of a file's pages in the page cache (``mincore`` on a fresh mapping), or None where that cannot be
    asked."""
    size = path.stat().st_size
    if size == 0 or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    except (OSError, AttributeError):
        return None
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            rc = libc.mincore(addr, size, vec)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages if rc == 0 else None


def evict(paths: list[Path]) -> dict:
    """Drop the files from the page cache; {"method", "resident_after" (worst file), "ok"}."""
    method = "posix_fadvise(DONTNEED)"
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    resident = _worst_resident(paths)
    if resident not in (None, 0.0):
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            method = "drop_caches (posix_fadvise left pages resident)"
        except OSError as e:
            method = f"posix_fadvise(DONTNEED); drop_caches refused ({e.strerror or e})"
        resident = _worst_resident(paths)
    return {"method": method, "resident_after": resident, "ok": resident == 0.0}


def _worst_resident(paths: list[Path]) -> float | None:
    fr = [resident_fraction(p) for p in paths]
    return None if any(f is None for f in fr) else max(fr, default=0.0)


def plain_read(paths: list[Path], *, threads: int = 1, chunk_bytes: int = 16 << 20) -> dict:
    """Read the files start to end into one reused host buffer, ``threads`` reads at a time: {"bytes", "seconds",
    "gbps"}. No parsing, no device: the file system's own sequential read speed."""
    buf = memoryview(bytearray(chunk_bytes))
    total = 0
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    t0 = time.perf_counter()
    try:
        for p in paths:
            size = p.stat().st_size
            fd = os.open(p, os.O_RDONLY)
            try:
                for a in range(0, size, chunk_bytes):
                    n = min(chunk_bytes, size - a)
                    if pool is None:
                        _read_exact(fd, buf[:n], a)
                    else:
                        step = -(-n // threads)
                        for j in [pool.submit(_read_exact, fd, buf[b: min(b + step, n)], a + b)
                                  for b in range(0, n, step)]:
                            j.result()
                    total += n
            finally:
                os.close(fd)
    finally:
        if pool is not None:
            pool.shutdown()
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "gbps": total / seconds / 1e9 if seconds else 0.0,
            "threads": threads, "chunk_bytes": chunk_bytes}
