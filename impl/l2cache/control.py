"""L2 control: the persisting carve-out, per-stream access-policy windows and the persisting-line reset.

The device state is three things: the carve-out ``cudaLimitPersistingL2CacheSize`` (bytes of L2 that persisting
lines may occupy; context-wide), one access-policy window per stream (accesses to ``[base_ptr, base_ptr + num_bytes)``
get ``hit_prop`` with probability ``hit_ratio`` and ``miss_prop`` otherwise), and the persisting lines themselves
(``cudaCtxResetPersistingL2Cache`` demotes them to normal). A kernel captured into a CUDA graph carries its own window
(a kernel-node attribute), so ``stamp_graph`` writes the window onto every kernel node of a captured graph.

Everything goes through a driver object: ``CudaRuntimeDriver`` calls ``cuda.bindings.runtime`` and checks every
return code; ``impl.l2cache.fake.FakeL2Driver`` keeps the same state in memory with the device's rules, so the CPU
tests run every path of ``L2Controller``. ``L2Controller.applied`` is the context manager that always puts the
previous carve-out and windows back, exceptions included (from the body or from the driver itself), and Ctrl-C:
while it puts them back, SIGINT/SIGTERM are held and delivered afterwards (``interrupts_deferred``).
"""
from __future__ import annotations

import contextlib
import signal
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

from impl.common.cudacheck import CudaError, check_cuda

PROPS = ("normal", "streaming", "persisting")


def _as_float32(x: float) -> float:
    # the device stores hitRatio as a C float: round here so read-backs compare equal
    return struct.unpack("f", struct.pack("f", float(x)))[0]


@dataclass(frozen=True)
class AccessWindow:
    """Accesses to ``[base_ptr, base_ptr + num_bytes)`` get ``hit_prop`` with probability ``hit_ratio``, else
    ``miss_prop``. ``num_bytes == 0`` means no window. ``miss_prop`` may not be ``persisting`` (CUDA's rule)."""

    base_ptr: int = 0
    num_bytes: int = 0
    hit_ratio: float = 0.0
    hit_prop: str = "normal"
    miss_prop: str = "normal"

    def __post_init__(self) -> None:
        if self.base_ptr < 0 or self.num_bytes < 0:
            raise ValueError(f"window base_ptr and num_bytes must be >= 0, got {self.base_ptr}, {self.num_bytes}")
        if not 0.0 <= self.hit_ratio <= 1.0:
            raise ValueError(f"window hit_ratio must be in [0, 1], got {self.hit_ratio}")
        if self.hit_prop not in PROPS or self.miss_prop not in PROPS:
            raise ValueError(f"hit_prop/miss_prop must be one of {PROPS}, got {self.hit_prop!r}/{self.miss_prop!r}")
        if self.miss_prop == "persisting":
            raise ValueError("miss_prop may be 'normal' or 'streaming', not 'persisting'")
        object.__setattr__(self, "hit_ratio", _as_float32(self.hit_ratio))

    @property
    def active(self) -> bool:
        return self.num_bytes > 0


NO_WINDOW = AccessWindow()


@dataclass(frozen=True)
class L2Limits:
    """What the device allows: L2 size, the largest carve-out, the largest window (bytes)."""

    l2_bytes: int
    max_persisting_bytes: int
    max_window_bytes: int


@dataclass(frozen=True)
class L2State:
    """A snapshot: the carve-out and the window of each listed stream (handle -> window)."""

    carveout_bytes: int
    windows: dict[int, AccessWindow] = field(default_factory=dict)

    def describe(self) -> str:
        ws = ", ".join(f"stream {s:#x}: {w}" for s, w in sorted(self.windows.items()))
        return f"carve-out {self.carveout_bytes} B; {ws or 'no streams'}"


class L2Error(CudaError):
    """A CUDA call of the L2 control failed, or the device refused a setting."""


class L2Driver(Protocol):
    def limits(self) -> L2Limits: ...
    def get_carveout(self) -> int: ...
    def set_carveout(self, nbytes: int) -> None: ...
    def get_window(self, stream: int) -> AccessWindow: ...
    def set_window(self, stream: int, window: AccessWindow) -> None: ...
    def reset_persisting(self) -> None: ...
    def stamp_graph(self, graph: int, window: AccessWindow) -> int: ...


# ---- the real driver --------------------------------------------------------------------------------------------

def _check(result: Any, call: str) -> tuple:
    return check_cuda(result, call, L2Error)


def _member(enum: Any, names: tuple[str, ...]) -> Any:
    for n in names:
        if hasattr(enum, n):
            return getattr(enum, n)
    raise L2Error(f"{enum.__name__} has none of {names}: unsupported cuda-bindings version")


class CudaRuntimeDriver:
    """The L2 controls of one device through ``cuda.bindings.runtime`` (same primary context as torch)."""

    def __init__(self, device: int | None = None) -> None:
        import torch
        from cuda.bindings import runtime as rt

        if not torch.cuda.is_available():
            raise L2Error("CudaRuntimeDriver needs a CUDA device; use impl.l2cache.fake.FakeL2Driver without one")
        torch.cuda.init()  # the primary context exists before the runtime bindings attach to it
        self.rt = rt
        self.device = torch.cuda.current_device() if device is None else device
        _check(rt.cudaSetDevice(self.device), "cudaSetDevice")
        self._limit = rt.cudaLimit.cudaLimitPersistingL2CacheSize
        # CUDA 12+ aliases the stream/kernel-node attribute enums to cudaLaunchAttributeID; accept either name
        names = ("cudaStreamAttributeAccessPolicyWindow", "cudaLaunchAttributeAccessPolicyWindow")
        self._stream_attr = _member(rt.cudaStreamAttrID, names)
        self._node_attr = _member(rt.cudaKernelNodeAttrID, ("cudaKernelNodeAttributeAccessPolicyWindow", names[1]))
        self._props = {"normal": rt.cudaAccessProperty.cudaAccessPropertyNormal,
                       "streaming": rt.cudaAccessProperty.cudaAccessPropertyStreaming,
                       "persisting": rt.cudaAccessProperty.cudaAccessPropertyPersisting}
        self._names = {int(v): k for k, v in self._props.items()}
        self._limits: L2Limits | None = None

    def _attr(self, attr: Any) -> int:
        result = self.rt.cudaDeviceGetAttribute(attr, self.device)
        return int(_check(result, f"cudaDeviceGetAttribute({attr.name})")[0])

    def limits(self) -> L2Limits:
        if self._limits is None:
            a = self.rt.cudaDeviceAttr
            self._limits = L2Limits(self._attr(a.cudaDevAttrL2CacheSize),
                                    self._attr(a.cudaDevAttrMaxPersistingL2CacheSize),
                                    self._attr(a.cudaDevAttrMaxAccessPolicyWindowSize))
        return self._limits

    def get_carveout(self) -> int:
        return int(_check(self.rt.cudaDeviceGetLimit(self._limit), "cudaDeviceGetLimit(PersistingL2CacheSize)")[0])

    def set_carveout(self, nbytes: int) -> None:
        _check(self.rt.cudaDeviceSetLimit(self._limit, int(nbytes)),
                   f"cudaDeviceSetLimit(PersistingL2CacheSize, {nbytes})")

    def get_window(self, stream: int) -> AccessWindow:
        (value,) = _check(self.rt.cudaStreamGetAttribute(self.rt.cudaStream_t(stream), self._stream_attr),
                              "cudaStreamGetAttribute(AccessPolicyWindow)")
        return self._window(value)

    def _window(self, value: Any) -> AccessWindow:
        w = value.accessPolicyWindow
        return AccessWindow(int(w.base_ptr), int(w.num_bytes), float(w.hitRatio), self._names[int(w.hitProp)],
                            self._names[int(w.missProp)])

    def _value(self, window: AccessWindow, cls: Any) -> Any:
        value = cls()
        w = value.accessPolicyWindow
        w.base_ptr, w.num_bytes, w.hitRatio = window.base_ptr, window.num_bytes, window.hit_ratio
        w.hitProp, w.missProp = self._props[window.hit_prop], self._props[window.miss_prop]
        return value

    def set_window(self, stream: int, window: AccessWindow) -> None:
        value = self._value(window, self.rt.cudaStreamAttrValue)
        _check(self.rt.cudaStreamSetAttribute(self.rt.cudaStream_t(stream), self._stream_attr, value),
                   f"cudaStreamSetAttribute(AccessPolicyWindow, {window})")

    def reset_persisting(self) -> None:
        _check(self.rt.cudaCtxResetPersistingL2Cache(), "cudaCtxResetPersistingL2Cache")

    def _kernel_nodes(self, graph: int) -> list[Any]:
        rt = self.rt
        g = rt.cudaGraph_t(init_value=graph)
        _, count = _check(rt.cudaGraphGetNodes(g, 0), "cudaGraphGetNodes(count)")
        nodes, _ = _check(rt.cudaGraphGetNodes(g, count), "cudaGraphGetNodes")
        kernel = rt.cudaGraphNodeType.cudaGraphNodeTypeKernel
        return [n for n in nodes or [] if _check(rt.cudaGraphNodeGetType(n), "cudaGraphNodeGetType")[0] == kernel]

    def stamp_graph(self, graph: int, window: AccessWindow) -> int:
        """Set ``window`` on every kernel node of the (not yet instantiated) graph; return how many were set."""
        value = self._value(window, self.rt.cudaKernelNodeAttrValue)
        nodes = self._kernel_nodes(graph)
        for node in nodes:
            _check(self.rt.cudaGraphKernelNodeSetAttribute(node, self._node_attr, value),
                       "cudaGraphKernelNodeSetAttribute(AccessPolicyWindow)")
        return len(nodes)

    def graph_windows(self, graph: int) -> list[AccessWindow]:
        """The window on each kernel node of a graph (to check what ``stamp_graph`` or a capture left there)."""
        out = []
        for node in self._kernel_nodes(graph):
            (value,) = _check(self.rt.cudaGraphKernelNodeGetAttribute(node, self._node_attr),
                                  "cudaGraphKernelNodeGetAttribute(AccessPolicyWindow)")
            out.append(self._window(value))
        return out


# ---- the controller ---------------------------------------------------------------------------------------------

class L2Controller:
    """Snapshot, apply and restore L2 settings through a driver (real or fake)."""

    def __init__(self, driver: L2Driver) -> None:
        self.driver = driver

    @property
    def limits(self) -> L2Limits:
        return self.driver.limits()

    def snapshot(self, streams: Iterable[int]) -> L2State:
        return L2State(self.driver.get_carveout(), {int(s): self.driver.get_window(int(s)) for s in streams})

    def validate(self, carveout: int | None, window: AccessWindow | None) -> None:
        """Refuse settings the device would refuse, with the reason (before touching anything)."""
        lim = self.limits
        if carveout is not None and not 0 <= carveout <= lim.max_persisting_bytes:
            raise L2Error(f"carve-out {carveout} B is outside [0, {lim.max_persisting_bytes}] "
                          "(persistingL2CacheMaxSize)")
        if window is not None and window.num_bytes > lim.max_window_bytes:
            raise L2Error(f"window of {window.num_bytes} B exceeds accessPolicyMaxWindowSize {lim.max_window_bytes} B")

    def apply(self, streams: Iterable[int], *, carveout: int | None = None, window: AccessWindow | None = None,
              reset_persisting: bool = False) -> None:
        """Set the carve-out (if given), the same window on every stream (if given), then optionally reset lines."""
        self.validate(carveout, window)
        if carveout is not None:
            self.driver.set_carveout(carveout)
        if window is not None:
            for s in streams:
                self.driver.set_window(int(s), window)
        if reset_persisting:
            self.driver.reset_persisting()

    def restore(self, state: L2State) -> None:
        """Put every window and the carve-out back; try all of them, then raise the first failure.

        Nothing stops it half-way: a Ctrl-C that arrives during the calls is held until they are done (see
        ``interrupts_deferred``) and one that a driver call raises itself is re-raised after the other calls."""
        with interrupts_deferred():
            errors = self._restore_all(state)
        _raise_first(errors, "restoring the L2 state")

    def _restore_all(self, state: L2State) -> list[BaseException]:
        calls = [(lambda s=s, w=w: self.driver.set_window(s, w)) for s, w in state.windows.items()]
        return _try_all(calls + [lambda: self.driver.set_carveout(state.carveout_bytes)])

    @contextlib.contextmanager
    def applied(self, streams: Iterable[int], *, carveout: int | None = None, window: AccessWindow | None = None,
                reset_persisting: bool = True) -> Iterator[L2State]:
        """Apply a setting for the body; on the way out (always: exceptions, Ctrl-C and driver failures included)
        restore the snapshot taken on the way in and, with ``reset_persisting``, demote the persisting lines the body
        created. Yields the snapshot."""
        streams = [int(s) for s in streams]
        before = self.snapshot(streams)
        try:
            self.apply(streams, carveout=carveout, window=window, reset_persisting=reset_persisting)
            yield before
        finally:
            self.unwind(before, reset_persisting)

    def unwind(self, before: L2State, reset_persisting: bool = True) -> None:
        """The exit path of ``applied``: reset the persisting lines (optionally), then restore ``before``; every
        call is tried even when an earlier one fails or Ctrl-C arrives, and the first failure is raised after."""
        with interrupts_deferred():
            errors = _try_all([self.driver.reset_persisting]) if reset_persisting else []
            errors += self._restore_all(before)
        _raise_first(errors, "restoring the L2 state")

    def full_reset(self, streams: Iterable[int]) -> None:
        """The state a policy starts from: carve-out 0, no windows, no persisting lines, L2 flushed."""
        from impl.common.timing import flush_l2

        self.apply(list(streams), carveout=0, window=NO_WINDOW, reset_persisting=True)
        flush_l2()

    def stamp_graph(self, graph: int, window: AccessWindow) -> int:
        self.validate(None, window)
        return self.driver.stamp_graph(graph, window)


def _try_all(calls: list[Any]) -> list[BaseException]:
    """Run every call; collect what they raise. A call stopped by Ctrl-C (``KeyboardInterrupt`` raised inside it,
    e.g. off the main thread, where signals cannot be held) is run once more: the setters are idempotent."""
    errors: list[BaseException] = []
    for call in calls:
        for attempt in range(2):
            try:
                call()
                break
            except Exception as e:
                errors.append(e)
                break
            except BaseException as e:  # KeyboardInterrupt / SystemExit: remember it, finish the job first
                errors.append(e)
    return errors


def _raise_first(errors: list[BaseException], what: str) -> None:
    """Re-raise a Ctrl-C or exit among ``errors`` as itself (after all calls were tried); else wrap the first
    failure in ``L2Error`` saying how many calls failed."""
    if not errors:
        return
    for e in errors:
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: the caller's stop request wins
            raise e
    raise L2Error(f"{what} failed ({len(errors)} call(s)): {errors[0]}") from errors[0]


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) and SIGTERM for the body, then deliver them as they would have been.

    Only the main thread receives signals in Python, so elsewhere this does nothing. A signal that arrives in the
    body is recorded; when the body is done the previous handler is put back and called with it (by default:
    ``KeyboardInterrupt`` for SIGINT). Used around the calls that put the device back, so a Ctrl-C cannot leave the
    carve-out or a window set half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, lambda signum, frame: pending.append((signum, frame)))
        except (ValueError, OSError):  # a handler this process may not replace
            continue
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum, frame in pending[:1]:
            handler = old.get(signum)
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL and signum == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def diff_states(before: L2State, after: L2State) -> list[str]:
    """What differs between two snapshots, in words (empty when equal)."""
    out = []
    if before.carveout_bytes != after.carveout_bytes:
        out.append(f"carve-out {before.carveout_bytes} B -> {after.carveout_bytes} B")
    for s in sorted(set(before.windows) | set(after.windows)):
        a, b = before.windows.get(s), after.windows.get(s)
        if a != b:
            out.append(f"stream {s:#x} window {a} -> {b}")
    return out
