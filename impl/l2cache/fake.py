"""An in-memory L2 driver with the H100's limits and CUDA's rules, for tests without a GPU.

It keeps the carve-out, one window per stream handle, a count of persisting-line resets, the windows stamped on
graphs, and a log of every call. Injected faults, each once per listed call name, test that the controller restores
state whatever happens half-way: ``fail_on`` makes the call raise ``L2Error`` (the driver failed);
``interrupt_on`` makes it raise ``KeyboardInterrupt`` (Ctrl-C arrived inside the call); ``signal_on`` sends this
process a real SIGINT at the start of the call (Ctrl-C arrived between Python statements) and then completes it.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from impl.l2cache.control import NO_WINDOW, AccessWindow, L2Error, L2Limits

H100_LIMITS = L2Limits(l2_bytes=52_428_800, max_persisting_bytes=32_768_000, max_window_bytes=134_217_728)
H100_DEFAULT_CARVEOUT = 9_830_400


@dataclass
class FakeL2Driver:
    limits_: L2Limits = H100_LIMITS
    carveout: int = H100_DEFAULT_CARVEOUT
    windows: dict[int, AccessWindow] = field(default_factory=dict)
    resets: int = 0
    stamped: dict[int, AccessWindow] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    fail_on: set[str] = field(default_factory=set)
    interrupt_on: set[str] = field(default_factory=set)
    signal_on: set[str] = field(default_factory=set)

    def _call(self, name: str) -> None:
        self.log.append(name)
        if name in self.signal_on:
            self.signal_on.discard(name)
            os.kill(os.getpid(), signal.SIGINT)  # delivered at the next bytecode boundary, as a real Ctrl-C is
        if name in self.interrupt_on:
            self.interrupt_on.discard(name)
            raise KeyboardInterrupt(f"{name}: injected Ctrl-C (FakeL2Driver.interrupt_on)")
        if name in self.fail_on:
            self.fail_on.discard(name)
            raise L2Error(f"{name} failed: injected failure (FakeL2Driver.fail_on)")

    def limits(self) -> L2Limits:
        return self.limits_

    def get_carveout(self) -> int:
        self._call("get_carveout")
        return self.carveout

    def set_carveout(self, nbytes: int) -> None:
        self._call("set_carveout")
        if not 0 <= nbytes <= self.limits_.max_persisting_bytes:
            raise L2Error(f"cudaDeviceSetLimit(PersistingL2CacheSize, {nbytes}) failed: cudaErrorInvalidValue")
        self.carveout = int(nbytes)

    def get_window(self, stream: int) -> AccessWindow:
        self._call("get_window")
        return self.windows.get(stream, NO_WINDOW)

    def set_window(self, stream: int, window: AccessWindow) -> None:
        self._call("set_window")
        if window.num_bytes > self.limits_.max_window_bytes:
            raise L2Error("cudaStreamSetAttribute(AccessPolicyWindow) failed: cudaErrorInvalidValue")
        self.windows[stream] = window

    def reset_persisting(self) -> None:
        self._call("reset_persisting")
        self.resets += 1

    def stamp_graph(self, graph: int, window: AccessWindow) -> int:
        self._call("stamp_graph")
        self.stamped[graph] = window
        return 1
