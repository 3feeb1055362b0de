"""L2 policies as objects any model can take: what to set (carve-out, window) and whether and how to prefetch.

A model that wants the policies gives: the byte span a persisting window should cover (``persist_span``: the bytes
read again and again), the span of its activation buffers (or None), and, for prefetching, the weight span each layer
of a request reads, in order (``Workload`` in ``serving.py``). A policy turns those and the device's limits into a
``PolicyPlan``:

  default             carve-out 0, persisting lines reset, no window: the hardware's own LRU-like policy
  persist_weights     carve-out = min(max carve-out, window bytes); window over the persist span with
                      hitRatio = carve-out / window bytes (so the persisting lines fit the carve-out; the other
                      accesses in the window get ``miss_prop``), hitProp persisting
  stream_activations  window over the activations with hitProp = missProp = streaming (evict first), so the
                      activations stop pushing the weights out; carve-out 0
  prefetch_stream     no window; before layer i runs, a side stream reads layer i+1's weights into L2 (``touch``),
                      forked from the main stream with an event and joined back with one at the end of the request
  prefetch_ahead      no window; before layer 0, one small kernel on the request's own stream issues
                      ``cp.async.bulk.prefetch.L2`` for the weights of every later layer and exits: DRAM fills L2
                      while the layers run (works for any model: its layers need not be this project's kernels)
  prefetch_kernel     no window; the kernels of layer i issue ``cp.async.bulk.prefetch.L2`` for layer i+1's weights
                      as they start (models whose layers are this project's GEMVs)
  persist_prefetch    persist_weights plus in-kernel prefetch where the model supports it, else prefetch_ahead; the
                      persisted span is never prefetched

Whichever plan applies, the kernels and their inputs are the same, so outputs are bit-identical to the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from impl.l2cache.arena import Span
from impl.l2cache.control import NO_WINDOW, AccessWindow, L2Limits
from impl.l2cache.prefetch import L2Prefetch, aligned_range, prefetch_l2
from impl.l2cache.touch import default_programs, touch

PREFETCH_MODES = ("", "stream", "ahead", "kernel", "auto")  # "": none; "auto": kernel where supported, else ahead


@dataclass(frozen=True)
class PolicyPlan:
    """The settings a policy asks for on one model (``applicable=False``: it cannot apply there; ``note`` says why).
    ``prefetch``: one of ``PREFETCH_MODES``."""

    policy: str
    carveout_bytes: int
    window: AccessWindow
    prefetch: str
    applicable: bool = True
    note: str = ""

    def effect(self) -> tuple:
        """What the plan does to the device and the requests: two policies with equal effects are one candidate."""
        if not self.applicable:
            return ("not applicable",)
        return (self.carveout_bytes, self.window, self.prefetch)


@dataclass(frozen=True)
class DefaultPolicy:
    name: str = "default"
    prefetch: str = ""

    def plan(self, weights: Span, activations: Span | None, limits: L2Limits) -> PolicyPlan:
        return PolicyPlan(self.name, 0, NO_WINDOW, "")


@dataclass(frozen=True)
class PersistWeights:
    """Window over the persist span, persisting as much of it as the carve-out holds."""

    name: str = "persist_weights"
    miss_prop: str = "streaming"
    carveout_bytes: int | None = None  # None: min(max carve-out, window bytes)
    prefetch: str = ""

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
    prefetch: str = ""

    def plan(self, weights: Span, activations: Span | None, limits: L2Limits) -> PolicyPlan:
        if activations is None or activations.nbytes == 0:
            return PolicyPlan(self.name, 0, NO_WINDOW, "", applicable=False,
                              note="the model has no single activation buffer to put a window on")
        nbytes = min(activations.nbytes, limits.max_window_bytes)
        return PolicyPlan(self.name, 0, AccessWindow(activations.ptr, nbytes, 1.0, "streaming", "streaming"), "")


@dataclass(frozen=True)
class Prefetch:
    """No window; prefetch the next layers' weights by ``prefetch`` (stream, ahead or kernel: see the module doc)."""

    name: str = "prefetch_kernel"
    prefetch: str = "kernel"

    def plan(self, weights: Span, activations: Span | None, limits: L2Limits) -> PolicyPlan:
        return PolicyPlan(self.name, 0, NO_WINDOW, self.prefetch)


@dataclass(frozen=True)
class PersistAndPrefetch:
    name: str = "persist_prefetch"
    prefetch: str = "auto"

    def plan(self, weights: Span, activations: Span | None, limits: L2Limits) -> PolicyPlan:
        p = PersistWeights().plan(weights, activations, limits)
        return PolicyPlan(self.name, p.carveout_bytes, p.window, self.prefetch, note=p.note)


POLICIES: dict[str, Any] = {p.name: p for p in (
    DefaultPolicy(), PersistWeights(), StreamActivations(), Prefetch("prefetch_stream", "stream"),
    Prefetch("prefetch_ahead", "ahead"), Prefetch("prefetch_kernel", "kernel"), PersistAndPrefetch())}
PREFETCH_POLICIES = tuple(n for n, p in POLICIES.items() if p.prefetch and not n.startswith("persist"))


def get_policy(name: str) -> Any:
    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r}; one of {sorted(POLICIES)}")
    return POLICIES[name]


# ---- per-layer hooks: the prefetcher ------------------------------------------------------------------------

class LayerHooks:
    """Called by a model's forward: ``before_layer(i)`` before layer i is enqueued, ``kernel_prefetch(i)`` by a
    layer whose kernels take a prefetch range (what they should pull into L2), ``finish()`` at the end."""

    def before_layer(self, i: int) -> None:
        pass

    def kernel_prefetch(self, i: int) -> L2Prefetch | None:
        return None

    def finish(self) -> None:
        pass


NO_HOOKS = LayerHooks()


@dataclass
class StreamPair:
    """The main stream a request runs on and the side stream that prefetches (None, None without a GPU)."""

    main: Any = None
    side: Any = None


AHEAD_PROGRAMS = 8  # programs of the in-stream prefetch kernel: a few SMs issue the instructions, then exit


@dataclass
class Prefetcher(LayerHooks):
    """Prefetch, for layer i, the weight spans of the layers after it, by ``mode``:

    * ``stream``: before layer i, read the next ``group`` layers' spans on the side stream (``touch``). Ordering: an
      event recorded on the main stream just before layer i is enqueued; the side stream waits for it, so the read
      starts together with layer i and never before earlier work; at ``finish`` the main stream waits for the side
      stream's last event, so a request (and a captured graph) ends with both streams joined.
    * ``ahead``: before layer i, one ``prefetch_kernel`` launch on the current stream for the next ``group`` layers'
      spans (``group`` None: before layer 0, every later layer's); it returns at once, DRAM fills L2 behind it.
    * ``kernel``: nothing before the layer; ``kernel_prefetch(i)`` hands layer i's kernels layer i+1's span.

    Spans equal to layer i's own, or inside ``skip`` (the persisted range), are not fetched; ``max_bytes`` caps one
    fetch (its start). Prefetches change no values, so outputs are those of the default. Without a GPU the stream
    reads run in line (same order) and the PTX prefetches run in their LOG mode; ``log`` lists (layer, offset,
    bytes) of every fetch, which is what the CPU tests check.
    """

    buffer: torch.Tensor
    spans: list[Span]
    mode: str = "stream"
    streams: StreamPair = field(default_factory=StreamPair)
    programs: int | None = None
    group: int | None = 1
    max_bytes: int | None = None
    skip: Span | None = None
    log: list[tuple[int, int, int]] = field(default_factory=list)
    _forked: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("stream", "ahead", "kernel"):
            raise ValueError(f"mode must be stream, ahead or kernel, got {self.mode!r}")
        if self.group is not None and self.group < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")
        if self.mode == "kernel" and self.group != 1:
            raise ValueError("an in-kernel prefetch fetches the next layer only (group 1)")
        if self.max_bytes is not None and self.max_bytes < 16:
            raise ValueError(f"max_bytes must be >= 16, got {self.max_bytes}")
        self.words = self.buffer.view(torch.int32)
        # allocated here, not in before_layer: that may run inside a CUDA-graph capture
        most = self._programs(Span(0, 0, max([s.offset + s.nbytes for s in self.spans] or [4])))
        self._scratch = torch.empty(most, dtype=torch.int32, device=self.buffer.device)
        self._ranges = {i: self._aligned(i) for i in range(len(self.spans))}
        self._requests = {i: L2Prefetch(self.buffer, *r) for i, r in self._ranges.items() if r is not None}

    def _programs(self, span: Span) -> int:
        return self.programs or default_programs(-(-span.nbytes // 4))

    def _skipped(self, s: Span) -> bool:
        k = self.skip
        return k is not None and k.ptr <= s.ptr and s.ptr + s.nbytes <= k.ptr + k.nbytes

    def read_before(self, i: int) -> Span | None:
        """The byte range fetched for layer i (None: nothing), before alignment."""
        group = self.group or len(self.spans)
        if i % group or i >= len(self.spans):
            return None
        nxt = [s for s in self.spans[i + 1:i + 1 + group] if s != self.spans[i] and not self._skipped(s)]
        if not nxt:
            return None
        lo, hi = min(s.offset for s in nxt), max(s.offset + s.nbytes for s in nxt)
        if self.max_bytes is not None:
            hi = min(hi, lo + self.max_bytes)
        return Span(nxt[0].base_ptr, lo, hi - lo)

    def _aligned(self, i: int) -> tuple[int, int] | None:
        span = self.read_before(i)
        if span is None:
            return None
        if self.mode == "stream":  # touch reads whole int32 words
            lo = span.offset // 4 * 4
            return lo, -(-(span.offset + span.nbytes - lo) // 4) * 4
        return aligned_range(self.buffer, span.offset, span.nbytes)

    def reads_per_request(self) -> int:
        return sum(r is not None for r in self._ranges.values())

    def before_layer(self, i: int) -> None:
        rng = self._ranges.get(i)
        if rng is None or self.mode == "kernel":
            return
        self.log.append((i, *rng))
        if self.mode == "ahead":
            prefetch_l2(self._requests[i], programs=AHEAD_PROGRAMS)
            return
        start, count = rng[0] // 4, rng[1] // 4
        programs = self._programs(Span(0, 0, rng[1]))
        if self.streams.main is None:
            touch(self.words, start, count, out=self._scratch, programs=programs)
            return
        fork = torch.cuda.Event()
        fork.record(self.streams.main)
        self.streams.side.wait_event(fork)
        with torch.cuda.stream(self.streams.side):
            touch(self.words, start, count, out=self._scratch, programs=programs)
        self._forked = True

    def kernel_prefetch(self, i: int) -> L2Prefetch | None:
        if self.mode != "kernel" or i not in self._requests:
            return None
        self.log.append((i, *self._ranges[i]))
        return self._requests[i]

    def finish(self) -> None:
        if self._forked and self.streams.main is not None:
            join = torch.cuda.Event()
            join.record(self.streams.side)
            self.streams.main.wait_event(join)
        self._forked = False
