"""Policies applied to models: outputs bit-identical to the default under every policy, the prefetcher's schedule,
the runner's restore-on-exception, any nn.Module as a workload, and the once-for-all MobileNetV3 supernet against
timm (full network) and against module surgery (sliced subnets)."""
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle import assert_close
from impl.backend import DEVICE
from impl.l2cache.arena import Span
from impl.l2cache.control import AccessWindow, L2Controller, L2Limits
from impl.l2cache.fake import FakeL2Driver
from impl.l2cache.nets import ChainConfig, ChainMLP, ConvNetConfig, MLPConfig, SharedConvNet, SharedMLP
from impl.l2cache.ofa import (SUBNETS, OfaConfig, OfaServing, OfaSupernet, SubnetConfig, create_timm_model,
                              keep_channels, materialize_subnet)
from impl.l2cache.policies import POLICIES, PolicyPlan, Prefetcher, get_policy
from impl.l2cache.prefetch import check_pieces
from impl.l2cache.serving import (ModuleWorkload, PolicyRunner, largest_run, lab_streams, measure, output_digest,
                                  outputs_by_kind, stream_handles)

pytestmark = pytest.mark.l2_state  # every test: the L2 state is checked (and put back) afterwards

SMALL_MODEL = "mobilenetv3_small_050"  # the interpreter is slow: CPU tests use timm's smallest MobileNetV3


@lru_cache(maxsize=None)
def timm_model(name: str = SMALL_MODEL, classes: int = 10):
    return create_timm_model(seed=0, name=name, num_classes=classes)


def tiny_ofa(noise: int = 0) -> OfaServing:
    cfg = OfaConfig("ofa_test", resolution=32, model=SMALL_MODEL, num_classes=10, dtype="float32", noise_bytes=noise)
    return OfaServing(cfg, model=timm_model())


def tiny_chain(shared: bool = True, own: int = 1, layers: int = 3) -> ChainMLP:
    return ChainMLP(ChainConfig("chain_t", 32, layers, own=own, shared=shared, dtype="float32"))


def tiny_module() -> ModuleWorkload:
    shared = torch.nn.Linear(16, 16)  # used twice: ALBERT-style sharing inside an arbitrary module
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), shared, torch.nn.ReLU(), shared,
                            torch.nn.Linear(16, 4)).to(DEVICE)
    return ModuleWorkload(m, torch.randn(2, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE), "seq")


WORKLOADS = {
    "mlp": lambda: SharedMLP(MLPConfig("mlp_t", 32, 3, dtype="float32")),
    "conv": lambda: SharedConvNet(ConvNetConfig("conv_t", 8, 4, 2, dtype="float32")),
    "module": tiny_module,
    "ofa": tiny_ofa,
    "hybrid": lambda: tiny_chain(layers=2),
    "stack": lambda: tiny_chain(shared=False),
}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_policy_leaves_outputs_bit_identical(name, l2_controller):
    wl = WORKLOADS[name]()
    digests = {}
    for policy in POLICIES.values():
        # on the CPU one small read per request (group 16, one program, 64 KB): the interpreter reads ~1 MB/s
        cpu = DEVICE == "cpu"
        with PolicyRunner(wl, policy, l2_controller, prefetch_group=16 if cpu else 1,
                          prefetch_programs=1 if cpu else None, prefetch_max_bytes=1 << 16 if cpu else None) as runner:
            outs = outputs_by_kind(runner)
            digests[policy.name] = [output_digest(o) for o in outs]
            assert all(torch.isfinite(o).all() for o in outs), "outputs must be finite to make the check meaningful"
    assert all(d == digests["default"] for d in digests.values()), digests
    if wl.kinds > 1:
        assert len(set(digests["default"])) == wl.kinds, "alternating subnets must give different outputs"


def test_runner_applies_the_plan_and_restores_afterwards():
    drv = FakeL2Driver()
    ctl = L2Controller(drv)
    wl = WORKLOADS["mlp"]()
    handles = stream_handles(lab_streams())
    before = ctl.snapshot(handles)
    with PolicyRunner(wl, get_policy("persist_weights"), ctl, graphs=False) as runner:
        span = wl.weight_span()
        w = drv.windows[handles[0]]
        assert (w.base_ptr, w.num_bytes, w.hit_prop) == (span.ptr, span.nbytes, "persisting")
        assert drv.windows[handles[1]] == w and drv.carveout == span.nbytes
        assert runner.info["policy"] == "persist_weights" and runner.info["hit_ratio"] == 1.0
    assert ctl.snapshot(handles) == before and drv.resets >= 2


@dataclass(frozen=True)
class ExplodingPolicy:
    name: str = "exploding"
    prefetch: str = ""

    def plan(self, weights, activations, limits):
        raise RuntimeError("plan failed")


@dataclass(frozen=True)
class HalfWindow:
    """A user's own policy: persist the first half of the weights, nothing else (any object with plan() works)."""

    name: str = "half"
    prefetch: str = ""

    def plan(self, weights, activations, limits):
        n = weights.nbytes // 2
        return PolicyPlan(self.name, n, AccessWindow(weights.ptr, n, 1.0, "persisting", "normal"), "")


def test_runner_restores_when_the_policy_or_the_body_raises():
    drv = FakeL2Driver()
    ctl = L2Controller(drv)
    handles = stream_handles(lab_streams())
    before = ctl.snapshot(handles)
    with pytest.raises(RuntimeError, match="plan failed"):
        with PolicyRunner(WORKLOADS["mlp"](), ExplodingPolicy(), ctl, graphs=False):
            pass
    assert ctl.snapshot(handles) == before
    with pytest.raises(ValueError, match="served"):
        with PolicyRunner(WORKLOADS["mlp"](), HalfWindow(), ctl, graphs=False):
            assert drv.carveout > 0 and drv.windows[handles[0]].num_bytes > 0
            raise ValueError("served, then failed")
    assert ctl.snapshot(handles) == before


def test_a_users_policy_object_applies_to_any_module():
    drv = FakeL2Driver()
    wl = tiny_module()
    with PolicyRunner(wl, HalfWindow(), L2Controller(drv), graphs=False) as runner:
        half = wl.weight_span().nbytes // 2
        assert drv.carveout == half and drv.windows[runner.handles[0]].num_bytes == half
        runner.request()
    assert drv.carveout != half


def test_module_workload_keeps_values_and_finds_shared_layers():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16)).to(DEVICE)
    x = torch.randn(3, 8).to(DEVICE)
    with torch.no_grad():
        expected = m(x).clone()
    wl = ModuleWorkload(m, x)
    assert torch.equal(wl.forward(), expected), "moving parameters into the arena changed the output"
    assert all(p.data_ptr() >= wl.weights.buffer.data_ptr() for p in m.parameters())
    shared = tiny_module()
    spans = shared.layer_spans()
    assert len(spans) == 4 and spans[1] == spans[2] and len(set(spans)) == 3
    with pytest.raises(ValueError, match="no parameters"):
        ModuleWorkload(torch.nn.ReLU(), x)


def test_prefetcher_reads_the_next_distinct_layer_before_each_layer():
    wl = tiny_module()
    spans = wl.layer_spans()
    buf = wl.weights.buffer
    pre = Prefetcher(buf, spans)
    wl.forward(hooks=pre)
    # layer 1 -> 2 share the weights: nothing to fetch before layer 1; the last layer has no successor
    assert pre.log == [(0, spans[1].offset, spans[1].nbytes), (2, spans[3].offset, spans[3].nbytes)]
    grouped = Prefetcher(buf, spans, group=2)
    wl.forward(hooks=grouped)
    lo = min(spans[1].offset, spans[2].offset)
    assert grouped.log[0] == (0, lo, max(s.offset + s.nbytes for s in spans[1:3]) - lo)
    assert [i for i, _, _ in grouped.log] == [0, 2]
    capped = Prefetcher(buf, spans, max_bytes=64)
    wl.forward(hooks=capped)
    assert capped.log == [(0, spans[1].offset, 64), (2, spans[3].offset, 64)]
    with pytest.raises(ValueError, match="group"):
        Prefetcher(buf, spans, group=0)
    with pytest.raises(ValueError, match="mode"):
        Prefetcher(buf, spans, mode="psychic")


def test_prefetch_ahead_issues_one_kernel_for_every_later_layer():
    wl = tiny_chain(shared=False)
    spans = wl.layer_spans()
    pre = Prefetcher(wl.weights.buffer, spans, "ahead", group=None)
    out = wl.forward(hooks=pre).clone()
    lo, hi = spans[1].offset, spans[-1].offset + spans[-1].nbytes
    assert [(i, off) for i, off, _ in pre.log] == [(0, lo)] and pre.log[0][2] >= hi - lo
    (req,) = pre._requests.values()
    (pieces,) = req.log  # the PTX prefetch ran in LOG mode: its pieces cover the range
    check_pieces(pieces, *pre._ranges[0])
    assert torch.equal(out, wl.forward()), "a prefetch must not change the output"


def test_prefetch_kernel_hands_each_gemv_the_next_layers_weights_and_skips_the_persisted():
    wl = tiny_chain(shared=True, own=1)  # W, U0, W, U1, W, U2
    spans = wl.layer_spans()
    pre = Prefetcher(wl.weights.buffer, spans, "kernel")
    plain = wl.forward().clone()
    assert torch.equal(wl.forward(hooks=pre), plain)
    assert [(i, off) for i, off, _ in pre.log] == [(i, spans[i + 1].offset) for i in range(len(spans) - 1)]
    for i, req in pre._requests.items():
        (pieces,) = req.log  # what the GEMV of layer i logged
        check_pieces(pieces, *pre._ranges[i])
    skip = Prefetcher(wl.weights.buffer, spans, "kernel", skip=wl.persist_span())
    wl.forward(hooks=skip)
    assert [i for i, _, _ in skip.log] == [0, 2, 4], "W's kernels fetch U_l; U_l's kernels skip the persisted W"
    with pytest.raises(ValueError, match="group 1"):
        Prefetcher(wl.weights.buffer, spans, "kernel", group=2)


def test_prefetch_modes_resolve_per_model():
    ctl = L2Controller(FakeL2Driver())
    with PolicyRunner(WORKLOADS["mlp"](), get_policy("prefetch_kernel"), ctl, graphs=False) as runner:
        assert not runner.info["applicable"] and "nothing to prefetch" in runner.info["note"]
    with PolicyRunner(WORKLOADS["mlp"](), get_policy("persist_prefetch"), ctl, graphs=False) as runner:
        assert runner.info["applicable"] and runner.info["window_bytes"] > 0  # the persist half still applies
        assert runner.info["prefetch"] == ""
    with PolicyRunner(tiny_module(), get_policy("prefetch_kernel"), ctl, graphs=False) as runner:
        assert not runner.info["applicable"] and "not kernels" in runner.info["note"]
    with PolicyRunner(tiny_module(), get_policy("persist_prefetch"), ctl, graphs=False) as runner:
        assert runner.info["prefetch"] == "" and runner.info["hit_ratio"] == 1.0, "all persisted: nothing to fetch"
    small = L2Controller(FakeL2Driver(limits_=L2Limits(1 << 20, 256, 1 << 20), carveout=0))
    with PolicyRunner(tiny_module(), get_policy("persist_prefetch"), small, graphs=False) as runner:
        assert runner.info["hit_ratio"] < 1.0  # part persists, so the rest is fetched ahead (no GEMVs here)
        assert runner.info["prefetch"] == "ahead" and runner.info["prefetch_reads_per_request"] == 1
    with PolicyRunner(tiny_chain(shared=True, own=1), get_policy("persist_prefetch"), ctl, graphs=False) as runner:
        assert runner.info["prefetch"] == "kernel" and runner.info["prefetch_reads_per_request"] == 3
    with PolicyRunner(tiny_module(), get_policy("prefetch_stream"), ctl, graphs=False) as runner:
        assert runner.info["applicable"] and runner.info["prefetch_reads_per_request"] == 2


def test_chain_presets_follow_the_cards_limits():
    from impl.l2cache.nets import chain_presets

    carve, l2 = 39_321_600, 62_914_560
    p = chain_presets(carve, l2)
    for name in ("albert_noisy", "hybrid1", "hybrid2"):
        assert 0.8 * carve < p[name].matrix_bytes <= 0.9 * carve and p[name].hidden % 64 == 0
    assert p["hybrid1"].matrix_bytes * 2 > l2, "W + U per layer must exceed L2, or LRU would keep W anyway"
    assert p["albert_noisy"].noise_bytes == 2 * l2 and not p["stack_noisy"].shared
    assert 12 * p["stack_noisy"].matrix_bytes <= 0.9 * carve
    assert p["mlp_big"].matrix_bytes > 1.5 * carve
    assert chain_presets(10 * carve, 10 * l2)["hybrid1"].hidden == 8 * 4 * 132, "one wave of GEMV programs"


def test_measure_times_every_request_and_alternates_kinds():
    wl = tiny_ofa()
    with PolicyRunner(wl, get_policy("default"), L2Controller(FakeL2Driver()), graphs=False) as runner:
        lat = measure(runner, reps=4, warmup=1).summary()
    assert lat["reps"] == 4 and len(lat["median_ms_per_kind"]) == 2 and lat["median_ms"] > 0


def test_noise_between_requests_writes_its_buffer():
    wl = tiny_ofa(noise=4096)
    wl.noise.zero_()
    wl.between_requests()
    assert bool((wl.noise == 1.0).all()) and wl.noise.numel() == 1024


def test_largest_run_merges_adjacent_segments():
    assert largest_run([]) is None
    got = largest_run([(3000, 100), (1000, 500), (1500, 500), (5000, 800)])
    assert got == Span(1000, 0, 1000)


# ---- the once-for-all supernet ------------------------------------------------------------------------------

@pytest.fixture
def exact_convs():
    """cuDNN may run float32 convolutions in TF32 on a GPU; the comparisons below need float32 (flag restored)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.usefixtures("exact_convs")
def test_full_subnet_equals_timms_own_forward():
    m = timm_model()
    net = OfaSupernet(m, DEVICE, torch.float32)
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        assert_close(net.forward(x, SUBNETS["max"]), m.to(DEVICE)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("exact_convs")
@settings(max_examples=8)
@given(depth=st.one_of(st.none(), st.integers(1, 3)), expand=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
       kernel=st.sampled_from([None, 3, 1]), res=st.sampled_from([32, 40]))
def test_sliced_subnets_equal_module_surgery(depth, expand, kernel, res):
    """First-k channels, centre-cropped kernels and skipped blocks, checked against timm's forward of a copy of
    the module cut down the same way (unfolded BatchNorm, so folding is checked too)."""
    m = timm_model()
    sub = SubnetConfig("h", depth, expand, kernel)
    net = OfaSupernet(m, DEVICE, torch.float32)
    x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        ref = materialize_subnet(m, sub).to(DEVICE)(x)
        assert_close(net.forward(x, sub), ref, rtol=1e-4, atol=1e-5)


def test_subnets_share_one_set_of_weights():
    wl = tiny_ofa()
    a, b = (set(wl.layer_spans(k)) for k in range(wl.kinds))
    assert b <= a, "the smaller subnet reads a subset of the larger one's weight spans"
    assert all(s.base_ptr == wl.weights.buffer.data_ptr() for s in a)
    assert len(wl.net.executed(SUBNETS["min"])) < len(wl.net.executed(SUBNETS["max"]))


def test_elastic_settings_are_validated():
    assert keep_channels(96, 0.5) == 48 and keep_channels(72, 0.75) == 56 and keep_channels(4, 0.25) == 4
    with pytest.raises(ValueError, match="expand"):
        keep_channels(64, 0.0)
    net = tiny_ofa().net
    with pytest.raises(ValueError, match="depth"):
        net.executed(SubnetConfig("bad", depth=0))
    with pytest.raises(ValueError, match="odd"):
        net.forward(torch.zeros(1, 3, 32, 32, device=DEVICE), SubnetConfig("bad", kernel=2))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mlp", "conv", "ofa"])
def test_gpu_graphs_stamp_the_window_and_match_eager(name, l2_controller):
    """On the GPU: graph replay == eager forward bit for bit, and the plan's window is on every kernel node."""
    wl = WORKLOADS[name]()
    with PolicyRunner(wl, get_policy("persist_weights"), l2_controller, graphs=False) as eager:
        ref = outputs_by_kind(eager)
    with PolicyRunner(wl, get_policy("persist_weights"), l2_controller) as runner:
        assert runner.info["graphs"] and runner.info["stamped_kernel_nodes"] > 0
        for g in runner.cuda_graphs:
            windows = l2_controller.driver.graph_windows(g.raw_cuda_graph())
            assert windows and all(w == runner.plan.window for w in windows)
        got = outputs_by_kind(runner)
    assert [output_digest(o) for o in got] == [output_digest(o) for o in ref]


@pytest.mark.gpu
def test_gpu_ofa_at_full_size_is_bit_identical_across_policies(l2_controller):
    wl = OfaServing(OfaConfig())
    digests = {}
    for policy in POLICIES.values():
        with PolicyRunner(wl, policy, l2_controller) as runner:
            digests[policy.name] = [output_digest(o) for o in outputs_by_kind(runner)]
    assert all(d == digests["default"] for d in digests.values()), digests

