"""l2cache benches: batch-1 request latency per workload × policy (the cache is the subject: no L2 flush between
rounds, a full reset between policies), and the kernels alone against torch anchors (cold L2: flushed per round).

The policy benches are a subset that fits the bench budget; the experiments (``python -m impl.l2cache.experiments``:
a selection run, then a verdict run) measure the candidates with intervals, the sweep and ncu. ``bytes_moved`` is
the compulsory bytes of a request (weights, input and output once); what it really reads (weights once per layer)
is ``traffic_bytes``.
"""
import contextlib
import itertools
from functools import lru_cache

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from fixtures.oracle import assert_close
from impl.backend import DEVICE, ON_GPU, sized
from impl.l2cache.conv import conv2d, conv_flops, pick_split_k
from impl.l2cache.linear import linear, linear_bytes
from impl.l2cache.policies import POLICIES, get_policy
from impl.l2cache.serving import PolicyRunner, output_digest, outputs_by_kind
from impl.l2cache.touch import default_programs, touch, touch_reference
from impl.l2cache.workloads import build_workload

pytestmark = pytest.mark.l2_state  # every test: the L2 state is checked (and put back) afterwards

WORKLOADS = sized(gpu=["mlp_16mb", "mlp_64mb", "conv_64mb", "ofa_alt_noisy"], cpu=["mlp_tiny", "conv_tiny"])
ROUNDS = sized(100, 1)


@lru_cache(maxsize=2)
def workload(name: str):
    return build_workload(name)


@lru_cache(maxsize=None)
def default_digests(name: str, controller) -> tuple[str, ...]:
    with PolicyRunner(workload(name), get_policy("default"), controller) as runner:
        return tuple(output_digest(o) for o in outputs_by_kind(runner))


def _traffic_bytes(wl) -> int:
    per = getattr(wl, "bytes_per_request", None)
    return per() if per else wl.weight_bytes


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name", WORKLOADS)
def test_l2cache_policy(device_bench, l2_controller, name, policy):
    wl = workload(name)
    expected = default_digests(name, l2_controller)
    with PolicyRunner(wl, get_policy(policy), l2_controller) as runner:
        digests = tuple(output_digest(o) for o in outputs_by_kind(runner))
        kinds = itertools.cycle(range(wl.kinds))
        stream = runner.streams.main
        # the bench's device events must be recorded on the stream the requests run on
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            device_bench(lambda: runner.request(next(kinds)), bytes_moved=wl.weight_bytes,
                         traffic_bytes=_traffic_bytes(wl),
                         flops=getattr(wl, "flops_per_request", lambda: 0)(), flops_dtype="bf16", flush_l2=False,
                         rounds=ROUNDS, warmup=sized(10, 0), setup=wl.between_requests, workload=name, policy=policy,
                         weight_bytes=wl.weight_bytes, applicable=runner.info["applicable"],
                         carveout_bytes=runner.info["carveout_bytes"], hit_ratio=runner.info["hit_ratio"])
    assert digests == expected, f"{policy} changed the outputs of {name}"


LINEAR = sized(gpu=[(1, 2880, 2880), (1, 5760, 5760), (16, 2880, 2880)], cpu=[(1, 64, 48), (16, 32, 40)])


@pytest.mark.parametrize("m,n,k", LINEAR, ids=lambda v: str(v))
@pytest.mark.parametrize("impl_", ["triton", "torch"])
def test_l2cache_linear(device_bench, m, n, k, impl_):
    dt = torch.float16 if ON_GPU else torch.float32
    x, w, b = (torch.randn(s, device=DEVICE, dtype=dt) for s in ((m, k), (n, k), (n,)))
    out = torch.empty((m, n), device=DEVICE, dtype=dt)
    fn = (lambda: linear(x, w, b, relu=True, out=out)) if impl_ == "triton" else (lambda: torch.relu(F.linear(x, w, b)))
    got = device_bench(fn, bytes_moved=linear_bytes(m, n, k, x.element_size()), flops=2 * m * n * k,
                       flops_dtype="bf16", m=m, n=n, k=k, dtype=str(dt), variant=impl_)
    assert_close(got, torch.relu(F.linear(x.float(), w.float(), b.float())).to(dt), rtol=2e-2, atol=2e-2)


CONV = sized(gpu=[(960, 8), (1920, 8)], cpu=[(8, 4)])


@pytest.mark.parametrize("c,s", CONV, ids=lambda v: str(v))
@pytest.mark.parametrize("impl_", ["triton", "torch"])
def test_l2cache_conv(device_bench, c, s, impl_):
    dt = torch.float16 if ON_GPU else torch.float32
    x = torch.randn((1, c, s, s), device=DEVICE, dtype=dt)
    w = torch.randn((c, c, 3, 3), device=DEVICE, dtype=dt) / (3 * c ** 0.5)
    split = pick_split_k(s * s, c, 9 * c) if ON_GPU else 2
    ws = torch.empty(split * s * s * c, device=DEVICE, dtype=torch.float32)
    out = torch.empty_like(x)
    if impl_ == "triton":
        def fn():
            return conv2d(x, w, padding=1, out=out, split_k=split, workspace=ws)
    else:
        def fn():
            return F.conv2d(x, w, padding=1)
    nbytes = (w.numel() + 2 * x.numel()) * x.element_size()
    got = device_bench(fn, bytes_moved=nbytes, flops=conv_flops(1, c, c, s, s, 3, 3), flops_dtype="bf16", c=c, size=s,
                       dtype=str(dt), split_k=split, variant=impl_)
    assert_close(got.float(), F.conv2d(x.float(), w.float(), padding=1), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("nbytes", [sized(16 << 20, 1 << 14)])
def test_l2cache_touch(device_bench, nbytes):
    words = torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=DEVICE)
    programs = default_programs(words.numel())
    out = device_bench(lambda: touch(words, 0, words.numel(), programs=programs), bytes_moved=nbytes, n=nbytes,
                       programs=programs, variant="triton")
    assert int(np.bitwise_xor.reduce(out[:programs].cpu().numpy())) == touch_reference(words, 0, words.numel())
