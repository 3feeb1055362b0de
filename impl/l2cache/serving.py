"""Serve a workload's batch-1 requests under one L2 policy, and time them with the cache as the subject.

A ``Workload`` (duck-typed; ``nets.SharedMLP``, ``nets.SharedConvNet``, ``ofa.OfaServing``, ``ModuleWorkload``) has
``name``, ``kinds`` (request kinds served in turn), ``weights`` (an ``Arena``), ``weight_span()``,
``activation_span()`` (or None), ``layer_spans(kind)``, ``forward(kind, hooks) -> Tensor`` (enqueues one request on
the current stream) and ``between_requests()``.

``PolicyRunner`` is the context manager that serves it: on entry it snapshots the L2 state, resets it fully
(carve-out 0, no window, no persisting lines, L2 flushed), runs each request kind once (compiles kernels), on a GPU
captures one CUDA graph per kind (with the prefetcher's side stream inside, when the policy prefetches), then applies
the policy's plan: carve-out, the window on the main and side streams, and the same window stamped on every kernel
node of the graphs (a captured kernel keeps its own window). On exit, always, the snapshot is restored.
Without a GPU the same logic runs on the fake driver and the kernels run eagerly under the interpreter.
"""
from __future__ import annotations

import contextlib
import hashlib
import statistics
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from impl import backend
from impl.common.timing import flush_l2, time_fn
from impl.l2cache.arena import Arena, ArenaBacked, Span
from impl.l2cache.control import NO_WINDOW, L2Controller
from impl.l2cache.policies import NO_HOOKS, LayerHooks, PolicyPlan, Prefetcher, StreamPair

FAKE_STREAMS = (0x51, 0x52)  # stand-in handles for the main and side streams without a GPU
_STREAMS: StreamPair | None = None


def use_graphs() -> bool:
    return backend.ON_GPU and backend.DEVICE == "cuda"


def lab_streams() -> StreamPair:
    """The two streams every l2cache run uses (created once; their windows are what the test guard checks)."""
    global _STREAMS
    if _STREAMS is None:
        _STREAMS = StreamPair(torch.cuda.Stream(), torch.cuda.Stream()) if use_graphs() else StreamPair()
    return _STREAMS


def stream_handles(streams: StreamPair) -> tuple[int, int]:
    if streams.main is None:
        return FAKE_STREAMS
    return int(streams.main.cuda_stream), int(streams.side.cuda_stream)


def _main_stream_ctx(streams: StreamPair):
    return torch.cuda.stream(streams.main) if streams.main is not None else contextlib.nullcontext()


def largest_run(segments: list[tuple[int, int]]) -> Span | None:
    """The longest run of adjacent (address, size) segments, as a Span (None when there are none)."""
    runs: list[list[int]] = []
    for addr, size in sorted(segments):
        if runs and runs[-1][0] + runs[-1][1] == addr:
            runs[-1][1] += size
        else:
            runs.append([addr, size])
    if not runs:
        return None
    start, size = max(runs, key=lambda r: r[1])
    return Span(start, 0, size)


def pool_span(pool: Any) -> Span | None:
    """Where a CUDA graph's activations live: the largest run of adjacent segments of its memory pool."""
    try:
        segs = [(s["address"], s["total_size"]) for s in torch.cuda.memory_snapshot()
                if tuple(s.get("segment_pool_id", ())) == tuple(pool)]
    except Exception:  # an allocator without snapshots: the policy then reports itself not applicable
        return None
    return largest_run(segs)


@dataclass
class PolicyRunner:
    """Serve ``workload`` under ``policy`` (see the module doc); ``request(kind)`` runs one request."""

    workload: Any
    policy: Any
    controller: L2Controller
    graphs: bool | None = None
    prefetch_programs: int | None = None
    prefetch_group: int | None = None  # None: each prefetch mode's own default (stream/kernel 1, ahead: all)
    prefetch_max_bytes: int | None = None
    plan: PolicyPlan | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.graphs = use_graphs() if self.graphs is None else self.graphs
        self.streams = lab_streams()
        self.handles = stream_handles(self.streams)
        self._stack = contextlib.ExitStack()
        self._graphs: list[Any] = []
        self._outputs: list[torch.Tensor] = []
        self.hooks: list[LayerHooks] = []

    def __enter__(self) -> "PolicyRunner":
        try:
            self._stack.enter_context(self.controller.applied(self.handles, carveout=0, window=NO_WINDOW,
                                                              reset_persisting=True))
            flush_l2()
            self.plan = self._plan(self.workload.activation_span())
            self.hooks = [self._hooks_for(k, self.plan) for k in range(self.workload.kinds)]
            self._warm_up()
            if self.graphs:
                self._capture()
            if self._graphs and self.workload.activation_span() is None and not self.plan.applicable:
                self.plan = self._plan(pool_span(self._graphs[0].pool()))  # activations live in the graph's pool
            self._apply(self.plan)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._graphs.clear()
        self._stack.close()

    def _plan(self, activations: Span | None) -> PolicyPlan:
        plan = self.policy.plan(persist_span(self.workload), activations, self.controller.limits)
        mode = plan.prefetch
        kernel_ok = bool(getattr(self.workload, "in_kernel_prefetch", False))
        if mode == "auto":
            plan = replace(plan, prefetch="kernel" if kernel_ok else "ahead")
        elif mode == "kernel" and not kernel_ok:
            plan = replace(plan, applicable=False, note="the model's layers are not kernels that take a prefetch range")
        if plan.prefetch and plan.applicable and not any(self._reads(k, plan) for k in range(self.workload.kinds)):
            why = "nothing to prefetch: every layer reads the same weights (or the persisted ones)"
            plan = replace(plan, prefetch="", applicable=plan.window.active,
                           note="; ".join(filter(None, [plan.note, why])))
        return plan

    def _prefetcher(self, kind: int, plan: PolicyPlan) -> Prefetcher:
        skip = persist_span(self.workload) if plan.window.active and plan.window.hit_ratio >= 1.0 else None
        group = self.prefetch_group if self.prefetch_group is not None else (None if plan.prefetch == "ahead" else 1)
        return Prefetcher(self.workload.weights.buffer, self.workload.layer_spans(kind), plan.prefetch, self.streams,
                          self.prefetch_programs, 1 if plan.prefetch == "kernel" else group, self.prefetch_max_bytes,
                          skip)

    def _reads(self, kind: int, plan: PolicyPlan) -> int:
        return self._prefetcher(kind, plan).reads_per_request()

    def _hooks_for(self, kind: int, plan: PolicyPlan) -> LayerHooks:
        if not plan.prefetch or not plan.applicable:
            return NO_HOOKS
        return self._prefetcher(kind, plan)

    def _warm_up(self) -> None:
        with _main_stream_ctx(self.streams):
            for k in range(self.workload.kinds):
                self.workload.forward(k, self.hooks[k])
        if self.streams.main is not None:
            torch.cuda.synchronize()

    def _capture(self) -> None:
        pool = None
        for k in range(self.workload.kinds):
            try:
                g = torch.cuda.CUDAGraph(keep_graph=True)  # keep the graph so its kernel nodes can be stamped
            except TypeError:  # torch < 2.7: no way to stamp windows on captured kernels; serve eagerly instead
                self.graphs = False
                self.info["note_graphs"] = "torch without CUDAGraph(keep_graph=True): eager requests"
                return
            with torch.cuda.graph(g, pool=pool, stream=self.streams.main):
                out = self.workload.forward(k, self.hooks[k])
            pool = g.pool()
            self._graphs.append(g)
            self._outputs.append(out)

    def _apply(self, plan: PolicyPlan) -> None:
        window = plan.window if plan.applicable else NO_WINDOW
        self.controller.apply(self.handles, carveout=plan.carveout_bytes if plan.applicable else 0, window=window)
        stamped = 0
        for g in self._graphs:
            if window.active:
                stamped += self.controller.stamp_graph(g.raw_cuda_graph(), window)
            g.instantiate()
        reads = [h.reads_per_request() for h in self.hooks if isinstance(h, Prefetcher)]
        self.info.update(policy=plan.policy, applicable=plan.applicable, note=plan.note, prefetch=plan.prefetch,
                         carveout_bytes=plan.carveout_bytes, window_ptr=window.base_ptr, window_bytes=window.num_bytes,
                         hit_ratio=window.hit_ratio, hit_prop=window.hit_prop, miss_prop=window.miss_prop,
                         graphs=bool(self._graphs), stamped_kernel_nodes=stamped,
                         prefetch_reads_per_request=sum(reads) / len(reads) if reads else 0)
        if self.streams.main is not None:
            torch.cuda.synchronize()

    @property
    def cuda_graphs(self) -> list[Any]:
        """The captured graphs, one per request kind (empty when requests run eagerly)."""
        return list(self._graphs)

    def request(self, kind: int = 0) -> torch.Tensor:
        """Run one request of ``kind`` on the main stream; returns its output buffer (reused by later requests)."""
        with _main_stream_ctx(self.streams):
            if self._graphs:
                self._graphs[kind].replay()
                return self._outputs[kind]
            return self.workload.forward(kind, self.hooks[kind])


def persist_span(workload: Any) -> Span:
    """The bytes a persisting window covers for ``workload`` (its ``persist_span``, else all its weights)."""
    fn = getattr(workload, "persist_span", None)
    return fn() if fn is not None else workload.weight_span()


@dataclass
class Latency:
    """Per-request device times (ms) of a run alternating over ``kinds``; medians overall and per kind."""

    times_ms: list[float]
    kinds: int

    def summary(self) -> dict[str, Any]:
        per_kind = [statistics.median(self.times_ms[k::self.kinds]) for k in range(self.kinds)
                    if self.times_ms[k::self.kinds]]
        t = sorted(self.times_ms)
        return {"median_ms": statistics.median(t), "p10_ms": t[len(t) // 10], "p90_ms": t[(9 * len(t)) // 10],
                "mean_ms": statistics.fmean(t), "reps": len(t), "median_ms_per_kind": per_kind}


def measure(runner: PolicyRunner, reps: int, warmup: int = 10) -> Latency:
    """Batch-1 latency: each request bracketed by device events, no L2 flush between requests (the cache is the
    subject); ``between_requests`` (other tenants' work) runs before each request, outside the timed interval.
    Timed queued (``time_fn(queue_ahead=True)``): the interval is the GPU's time for the request, without the host's
    graph-launch latency, which no L2 policy changes."""
    kinds = runner.workload.kinds
    warmup = -(-warmup // kinds) * kinds  # whole cycles, so rep i is kind i mod kinds
    counter = iter(range(10**12))

    def one() -> None:
        runner.request(next(counter) % kinds)

    with _main_stream_ctx(runner.streams):
        timing = time_fn(one, warmup=warmup, reps=reps, flush=False, setup=runner.workload.between_requests,
                         queue_ahead=True)
    return Latency(timing.times_ms, kinds)


def output_digest(t: torch.Tensor) -> str:
    """A hash of the output's bytes: equal digests mean bit-identical outputs."""
    data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def outputs_by_kind(runner: PolicyRunner) -> list[torch.Tensor]:
    """One request of each kind, outputs copied out (for bit-identity checks across policies)."""
    with _main_stream_ctx(runner.streams):  # copy on the stream that wrote the output, before the next request
        outs = [runner.request(k).detach().clone() for k in range(runner.workload.kinds)]
    if runner.streams.main is not None:
        torch.cuda.synchronize()
    return [o.cpu() for o in outs]


# ---- any torch module as a workload -------------------------------------------------------------------------

class ModuleWorkload(ArenaBacked):
    """Any ``nn.Module`` served on one fixed input, so the policies apply to it.

    Its parameters are moved (values unchanged) into one ``Arena``; a layer is a module that owns parameters
    directly, in the order a first forward calls them (a module called twice, weights shared, is two layers with
    the same span); forward pre-hooks call the policy's hooks before each layer.
    """

    kinds = 1

    def __init__(self, module: torch.nn.Module, example: torch.Tensor, name: str = "module") -> None:
        self.module, self.name, self.x = module, name, example
        params = dict(module.named_parameters())
        if not params:
            raise ValueError("the module has no parameters: there is nothing for an L2 policy to keep")
        self.weights = Arena.from_tensors({n: p.detach() for n, p in params.items()}, example.device)
        for n, p in params.items():
            p.data = self.weights[n]  # same values, now inside the arena
        owner = {id(p): n for n, p in params.items()}
        self._names: dict[torch.nn.Module, list[str]] = {}
        for m in module.modules():
            own = [owner[id(p)] for p in m.parameters(recurse=False)]
            if own:
                self._names[m] = own
                m.register_forward_pre_hook(self._pre_hook)
        self._hooks: LayerHooks = NO_HOOKS
        self._order: list[torch.nn.Module] = []
        self._recording, self._i = True, 0
        with torch.no_grad():
            module(example)
        self._recording = False

    def _pre_hook(self, m: torch.nn.Module, args: Any) -> None:
        if self._recording:
            self._order.append(m)
            return
        self._hooks.before_layer(self._i)
        self._i += 1

    def activation_span(self) -> Span | None:
        return None

    def layer_spans(self, kind: int = 0) -> list[Span]:
        return [self.weights.span(self._names[m]) for m in self._order]

    def forward(self, kind: int = 0, hooks: LayerHooks = NO_HOOKS) -> torch.Tensor:
        self._hooks, self._i = hooks, 0
        with torch.no_grad():
            out = self.module(self.x)
        hooks.finish()
        self._hooks = NO_HOOKS
        return out

    def between_requests(self) -> None:
        pass

