"""L2 policies as objects any model can take: what to set (carve-out, window) and whether to prefetch.

A model that wants the policies gives three things: the byte span of its shared weights, the span of its activation
buffers (or None), and, for prefetching, the weight span each layer of a request reads, in order
(``Workload`` in ``serving.py``). A policy turns those and the device's limits into a ``PolicyPlan``:

  default             carve-out 0, persisting lines reset, no window: the hardware's own LRU-like policy
  persist_weights     carve-out = min(max carve-out, weight bytes); window over the weights with
                      hitRatio = carve-out / window bytes (so the persisting lines fit the carve-out; the other
                      accesses in the window get ``miss_prop``), hitProp persisting
  stream_activations  window over the activations with hitProp = missProp = streaming (evict first), so the
                      activations stop pushing the weights out; carve-out 0
  prefetch            no window; before layer i runs, a side stream reads layer i+1's weights into L2 (``touch``),
                      forked from the main stream with an event and joined back with one at the end of the request
  persist_prefetch    both persist_weights and prefetch

Whichever plan applies, the kernels and their inputs are the same, so outputs are bit-identical to the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from impl.l2cache.arena import Span
from impl.l2cache.control import NO_WINDOW, AccessWindow, L2Limits
from impl.l2cache.touch import default_programs, touch


@dataclass(frozen=True)
class PolicyPlan:
    """The settings a policy asks for on one model (``applicable=False``: it cannot apply there; ``note`` says why)."""

    policy: str
    carveout_bytes: int
    window: AccessWindow
    prefetch: bool
    applicable: bool = True
    note: str = ""


@dataclass(frozen=True)
class DefaultPolicy:
    name: str = "default"
    prefetch: bool = False

    def plan(self, weights: Span, activations: Span | None, limits: L2Limits) -> PolicyPlan:
        return PolicyPlan(self.name, 0, NO_WINDOW, False)


@dataclass(frozen=True)
class PersistWeights:
    """Window over the shared weights, persisting as much of them as the carve-out holds."""

    name: str = "persist_weights"
    miss_prop: str = "streaming"
    carveout_bytes: int | None = None  # None: min(max carve-out, window bytes)
    prefetch: bool = False

    def plan(self, weights: Span, activations: Span | None, limits: L2Limits) -> PolicyPlan:
        nbytes = min(weights.nbytes, limits.max_window_bytes)
        carve = min(limits.max_persisting_bytes, nbytes) if self.carveout_bytes is None else self.carveout_bytes
        hit = min(1.0, carve / nbytes) if nbytes else 0.0
        note = "" if nbytes == weights.nbytes else f"window truncated to accessPolicyMaxWindowSize {nbytes} B"
        window = AccessWindow(weights.ptr, nbytes, hit, "persisting", self.miss_prop)
        return PolicyPlan(self.name, carve, window, self.prefetch, note=note)


@dataclass(frozen=True)
class StreamActivations:
    """Window over the activation buffers marked streaming, so they are evicted before the weights."""

    name: str = "stream_activations"
    prefetch: bool = False

    def plan(self, weights: Span, activations: Span | None, limits: L2Limits) -> PolicyPlan:
        if activations is None or activations.nbytes == 0:
            return PolicyPlan(self.name, 0, NO_WINDOW, False, applicable=False,
                              note="the model has no single activation buffer to put a window on")
        nbytes = min(activations.nbytes, limits.max_window_bytes)
        return PolicyPlan(self.name, 0, AccessWindow(activations.ptr, nbytes, 1.0, "streaming", "streaming"), False)


@dataclass(frozen=True)
class DynamicPrefetch:
    """A side stream reads the next layer's weights into L2 while the current layer computes."""

    name: str = "prefetch"
    prefetch: bool = True

    def plan(self, weights: Span, activations: Span | None, limits: L2Limits) -> PolicyPlan:
        return PolicyPlan(self.name, 0, NO_WINDOW, True)


@dataclass(frozen=True)
class PersistAndPrefetch:
    name: str = "persist_prefetch"
    prefetch: bool = True

    def plan(self, weights: Span, activations: Span | None, limits: L2Limits) -> PolicyPlan:
        p = PersistWeights().plan(weights, activations, limits)
        return PolicyPlan(self.name, p.carveout_bytes, p.window, True, note=p.note)


POLICIES: dict[str, Any] = {p.name: p for p in (DefaultPolicy(), PersistWeights(), StreamActivations(),
                                                DynamicPrefetch(), PersistAndPrefetch())}


def get_policy(name: str) -> Any:
    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r}; one of {sorted(POLICIES)}")
    return POLICIES[name]


# ---- per-layer hooks: the prefetcher ------------------------------------------------------------------------

class LayerHooks:
    """Called by a model's forward: ``before_layer(i)`` before layer i is enqueued, ``finish()`` at the end."""

    def before_layer(self, i: int) -> None:
        pass

    def finish(self) -> None:
        pass


NO_HOOKS = LayerHooks()


@dataclass
class StreamPair:
    """The main stream a request runs on and the side stream that prefetches (None, None without a GPU)."""

    main: Any = None
    side: Any = None


@dataclass
class Prefetcher(LayerHooks):
    """Before layer i, read layer i+1's weight span on the side stream (skipped when it is layer i's own span);
    with ``group`` g > 1, before every g-th layer read the spans of the next g layers as one range; with
    ``max_bytes``, only the first ``max_bytes`` of that range (a budget for the side stream's DRAM traffic).

    Ordering: an event recorded on the main stream just before layer i is enqueued; the side stream waits for it,
    so the read starts together with layer i and never before earlier work; at ``finish`` the main stream waits for
    the side stream's last event, so a request (and a captured graph) ends with both streams joined. The side
    stream's reads only load L2 lines: they change no values, so outputs are those of the default.
    Without a GPU the reads run in line (same order), which is what the CPU tests check via ``log``.
    """

    words: torch.Tensor
    spans: list[Span]
    streams: StreamPair = field(default_factory=StreamPair)
    programs: int | None = None
    group: int = 1  # prefetch the next `group` layers every `group` layers (fewer, larger reads)
    max_bytes: int | None = None  # read at most this much per prefetch (the start of the range); None: all
    log: list[tuple[int, int, int]] = field(default_factory=list)
    _forked: bool = False

    def __post_init__(self) -> None:
        if self.group < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")
        if self.max_bytes is not None and self.max_bytes < 4:
            raise ValueError(f"max_bytes must be >= 4 (one word), got {self.max_bytes}")
        most = self._programs(Span(0, 0, max([s.offset + s.nbytes for s in self.spans] or [4])))
        # allocated here, not in before_layer: that may run inside a CUDA-graph capture
        self._scratch = torch.empty(most, dtype=torch.int32, device=self.words.device)

    def _programs(self, span: Span) -> int:
        return self.programs or default_programs(-(-span.nbytes // 4))

    def read_before(self, i: int) -> Span | None:
        """The byte range read before layer i (None: nothing to read there)."""
        if i % self.group or i >= len(self.spans):
            return None
        # the weights of layers i+1 .. i+group that are not layer i's own (shared weights need no fetch)
        nxt = [s for s in self.spans[i + 1:i + 1 + self.group] if s != self.spans[i]]
        if not nxt:
            return None
        lo, hi = min(s.offset for s in nxt), max(s.offset + s.nbytes for s in nxt)
        if self.max_bytes is not None:
            hi = min(hi, lo + self.max_bytes)
        return Span(nxt[0].base_ptr, lo, hi - lo)

    def reads_per_request(self) -> int:
        return sum(self.read_before(i) is not None for i in range(len(self.spans)))

    def before_layer(self, i: int) -> None:
        span = self.read_before(i)
        if span is None:
            return
        start, count = span.offset // 4, -(-span.nbytes // 4)
        programs = self._programs(span)
        self.log.append((i, span.offset, span.nbytes))
        if self.streams.main is None:
            touch(self.words, start, count, out=self._scratch, programs=programs)
            return
        fork = torch.cuda.Event()
        fork.record(self.streams.main)
        self.streams.side.wait_event(fork)
        with torch.cuda.stream(self.streams.side):
            touch(self.words, start, count, out=self._scratch, programs=programs)
        self._forked = True

    def finish(self) -> None:
        if self._forked and self.streams.main is not None:
            join = torch.cuda.Event()
            join.record(self.streams.side)
            self.streams.main.wait_event(join)
        self._forked = False
