"""What every join operator shares: input checks, the result type, the key hash, the phase driver.

An inner equi-join of a build table (keys ``bk[i]``, row ids ``br[i]``) with a probe table (``pk[j]``, ``pr[j]``)
returns every pair ``(br[i], pr[j])`` with ``bk[i] == pk[j]``, as two 1-D tensors of equal length (the multiset of
pairs; the order is an implementation detail). Keys are int32 or int64 (both sides the same); row ids int32 or int64,
default ``arange(n)`` as int64; when the two sides' row-id dtypes differ both are widened to int64.

Every operator runs in three phases, so each can be timed on its own:
  ``build(keys, rows)``            -> a build state (hash table, sorted keys, partitions ...)
  ``probe(built, keys, rows)``     -> a probe state whose ``total`` (python int) is the exact output size
  ``materialize(probed, ob, op)``  writes the ``total`` pairs into ``ob``/``op`` (exact-size, caller-allocated)
``run_join`` drives them and allocates the exact-size outputs between the last two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from impl.common.timing import time_fn

KEY_DTYPES = (torch.int32, torch.int64)
ROW_DTYPES = (torch.int32, torch.int64)
MAX_ROWS = 2**31 - 2
PHASES = ("build", "probe", "materialize")


@dataclass(frozen=True)
class Tables:
    """Checked inputs: 1-D contiguous tensors on one device, keys of one dtype, rows of one dtype."""

    build_keys: torch.Tensor
    probe_keys: torch.Tensor
    build_rows: torch.Tensor
    probe_rows: torch.Tensor


@dataclass
class JoinResult:
    """The matching pairs ``(build_rows[m], probe_rows[m])`` as device tensors; phase times in ms if asked for."""

    build_rows: torch.Tensor
    probe_rows: torch.Tensor
    timings_ms: dict[str, float] | None = None

    def __len__(self) -> int:
        return int(self.build_rows.numel())

    def pairs(self) -> np.ndarray:
        """Host ``(total, 2)`` int64 array of (build_row, probe_row), sorted, for multiset comparison."""
        return sort_pairs(self.build_rows.cpu().numpy(), self.probe_rows.cpu().numpy())


class Probed(Protocol):
    total: int


class JoinOperator(Protocol):
    name: str

    def build(self, keys: torch.Tensor, rows: torch.Tensor) -> Any: ...

    def probe(self, built: Any, keys: torch.Tensor, rows: torch.Tensor) -> Probed: ...

    def materialize(self, probed: Any, out_build: torch.Tensor, out_probe: torch.Tensor) -> None: ...


def sort_pairs(build_rows: np.ndarray, probe_rows: np.ndarray) -> np.ndarray:
    pairs = np.stack([np.asarray(build_rows, np.int64), np.asarray(probe_rows, np.int64)], axis=1).reshape(-1, 2)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))] if len(pairs) else pairs


def _check_1d(name: str, t: Any, dtypes: tuple[torch.dtype, ...], what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if t.numel() > MAX_ROWS:
        raise ValueError(f"{name} has {t.numel()} rows; at most {MAX_ROWS} are supported")
    return t


def check_inputs(build_keys: Any, probe_keys: Any, build_rows: Any = None, probe_rows: Any = None, *,
                 default_rows: bool = True) -> Tables:
    """Validate a join's inputs (clear errors for type, dtype, rank, length, layout and device mismatches); never
    modifies them. Row ids not given become ``arange(n)`` int64, or stay ``None`` (positions) with
    ``default_rows=False``; when the two sides' row-id dtypes differ (or one side is positions) both are int64."""
    bk = _check_1d("build_keys", build_keys, KEY_DTYPES, "int32 or int64")
    pk = _check_1d("probe_keys", probe_keys, KEY_DTYPES, "int32 or int64")
    if bk.dtype != pk.dtype:
        raise TypeError(f"key dtypes differ: build_keys is {bk.dtype}, probe_keys is {pk.dtype}; cast one side first")
    if bk.device != pk.device:
        raise ValueError(f"keys live on different devices: build on {bk.device}, probe on {pk.device}")
    br = _rows("build", build_rows, bk, default_rows)
    pr = _rows("probe", probe_rows, pk, default_rows)
    if br is None or pr is None:  # positions are int64
        br, pr = (None if r is None else r.to(torch.int64) for r in (br, pr))
    elif br.dtype != pr.dtype:  # one output dtype for both columns: widen (copies; the inputs stay as they are)
        br, pr = br.to(torch.int64), pr.to(torch.int64)
    return Tables(bk, pk, br, pr)


def _rows(side: str, rows: Any, keys: torch.Tensor, default: bool) -> torch.Tensor | None:
    if rows is None:
        return torch.arange(keys.numel(), dtype=torch.int64, device=keys.device) if default else None
    r = _check_1d(f"{side}_rows", rows, ROW_DTYPES, "int32 or int64")
    if r.numel() != keys.numel():
        raise ValueError(f"{side}_rows has {r.numel()} entries but {side}_keys has {keys.numel()}: "
                         "row ids must match their keys one to one")
    if r.device != keys.device:
        raise ValueError(f"{side}_rows is on {r.device} but {side}_keys is on {keys.device}")
    return r


def free_bytes(device: torch.device, at_least: int | None = None) -> int:
    """Bytes an allocation on ``device`` can still get: free device memory plus the caching allocator's unused
    blocks on a GPU, MemAvailable on the host. With ``at_least``, a GPU's free device memory alone is returned once it
    reaches that many bytes: torch reads the allocator's unused blocks through ``memory_stats`` (~130 µs a call on
    the H200's host, against ~13 µs for the driver's figure), so a caller who only asks "does it fit" skips them."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if at_least is not None and free >= at_least:
            return int(free)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_output_fits(total: int, row_dtype: torch.dtype, device: torch.device, *, extra_bytes: int = 0,
                      what: str = "the join's output") -> None:
    """Refuse, before allocating, an output of ``total`` pairs (two columns of ``row_dtype``) plus ``extra_bytes``
    that cannot fit in the memory left on ``device``: a MemoryError naming the pair count and the bytes."""
    need = 2 * int(total) * row_dtype.itemsize + int(extra_bytes)
    free = free_bytes(device, at_least=need)
    if need > free:
        pairs = f" ({int(total):,} pairs as two {row_dtype} columns)" if total else ""
        raise MemoryError(f"{what} needs {need:,} bytes{pairs} but only {free:,} bytes are free on {device}; "
                          "refused before allocating anything")


def run_join(op: JoinOperator, build_keys: Any, probe_keys: Any, build_rows: Any = None, probe_rows: Any = None,
             *, timed: bool = False) -> JoinResult:
    """Check the inputs, run build -> probe -> allocate exact-size outputs -> materialize.

    With ``timed``, each phase is timed once with the suite's timer (CUDA events on a GPU), which synchronizes
    between phases; the split lands in ``JoinResult.timings_ms`` with keys build/probe/materialize/total.
    """
    t = check_inputs(build_keys, probe_keys, build_rows, probe_rows)
    if t.build_keys.device.type not in ("cpu", "cuda"):
        raise ValueError(f"joins run on cpu or cuda tensors, got {t.build_keys.device}")
    state: dict[str, Any] = {}

    def build() -> None:
        state["built"] = op.build(t.build_keys, t.build_rows)

    def probe() -> None:
        state["probed"] = op.probe(state["built"], t.probe_keys, t.probe_rows)

    def materialize() -> None:
        total = state["probed"].total
        check_output_fits(total, t.build_rows.dtype, t.build_keys.device)
        state["ob"] = torch.empty(total, dtype=t.build_rows.dtype, device=t.build_keys.device)
        state["op"] = torch.empty(total, dtype=t.probe_rows.dtype, device=t.build_keys.device)
        if total:
            op.materialize(state["probed"], state["ob"], state["op"])

    steps = {"build": build, "probe": probe, "materialize": materialize}
    timings = None
    if timed:
        timings = {name: time_fn(fn, warmup=0, reps=1, flush=False).median_ms for name, fn in steps.items()}
        timings["total"] = sum(timings.values())
    else:
        for fn in steps.values():
            fn()
    return JoinResult(state["ob"], state["op"], timings)


# ---- the key hash (the same arithmetic in numpy, numba, CUDA C++ and Triton) -----------------------------------

HASH_MUL = 0x45D9F3B  # < 2**27, so every product below stays inside int64 in every backend (no overflow anywhere)


def fold_key(k: np.ndarray, wide: bool) -> np.ndarray:
    """32 bits of a key, as int64 in [0, 2**32): the low word for int32, low ^ high word for int64."""
    k = np.asarray(k).astype(np.int64)
    return ((k ^ (k >> 32)) if wide else k) & 0xFFFFFFFF


def mix32_np(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer mixer (two xor-shift-multiply rounds), int64 in, int64 in [0, 2**32) out."""
    x = (((x >> 16) ^ x) * HASH_MUL) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * HASH_MUL) & 0xFFFFFFFF
    return (x >> 16) ^ x


def hash_keys(keys: np.ndarray, wide: bool) -> np.ndarray:
    """The reference hash: ``mix32(fold_key(k))``, in [0, 2**32)."""
    return mix32_np(fold_key(keys, wide))


def hash_keys_torch(keys: torch.Tensor, wide: bool) -> torch.Tensor:
    """``hash_keys`` in torch (int64 on the keys' device)."""
    k = keys.to(torch.int64)
    x = ((k ^ (k >> 32)) if wide else k) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * HASH_MUL) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * HASH_MUL) & 0xFFFFFFFF
    return (x >> 16) ^ x


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class Workspace:
    """Scratch tensors reused across calls (hash tables, counters, scan buffers), grown on demand.

    Allocation is cheap on the device but costs host time, and at 1M rows the joins are host-launch-bound, so each
    operator keeps its scratch here. ``get`` returns a view of exactly ``numel`` elements (cached, so a repeated
    request costs one dict lookup); ``zeros=True`` buffers are zero-filled once when (re)allocated and must be left
    at zero by whoever uses them (the scan counter resets itself). Not thread-safe: one workspace per operator.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device, *,
            zeros: bool = False) -> torch.Tensor:
        device = torch.device(device)  # "cpu" and torch.device("cpu") must find the same buffer
        key = (name, numel, dtype, device)
        view = self._views.get(key)
        if view is not None:
            return view
        numel = max(int(numel), 1)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            make = torch.zeros if zeros else torch.empty
            buf = make(numel if buf is None else max(numel, buf.numel()), dtype=dtype, device=device)
            self._bufs[name] = buf
            self._views = {k: v for k, v in self._views.items() if k[0] != name}  # views of the old buffer
        view = self._views[key] = buf[:numel]
        return view
