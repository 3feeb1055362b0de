"""seam benches: forward latency of every configuration of the ResNet34/ResNet50 family at batch 1 and 256.

Inference as served: eval mode, bf16 autocast, channels_last, Fashion-MNIST-sized inputs (1x28x28) on a GPU; random
weights (speed does not depend on their values). Anchors: the plain timm models (no family dispatch) and the serving
path (``SeamServer.serve`` from uint8 images to labels). FLOPs are ``torch.utils.flop_counter``'s per image times the
batch; bytes are the compulsory ones: every parameter read once in fp32 plus the input read and the logits written.
Timing is the harness's queued device time, so batch 1 measures the GPU's work rather than Python's launches.
Every candidate stitch in both directions is timed (a superset of the recipe's family).
On the CPU (no GPU): channels / 4 and 16x16 inputs, batch 2 for "b256", each bench run once.
"""
from __future__ import annotations

import pytest
import torch

from impl import backend
from impl.backend import sized
from impl.seam.measure import count_flops
from impl.seam.models import AnchorConfig, build_anchor
from impl.seam.family import build_family
from impl.seam.serve import SeamServer
from impl.seam.train import autocast

pytestmark = pytest.mark.one_cpu_thread  # tiny CPU convs (fixtures/seam.py)
DEV = "cuda" if backend.ON_GPU else "cpu"
SIZE = sized(gpu=28, cpu=16)
WIDTH_DIV = sized(gpu=1, cpu=4)
BATCHES = {"b1": 1, "b256": sized(gpu=256, cpu=2)}
POINTS = range(1, 16)
CONFIGS = ["r34", "r50"] + [f"{a}_to_{b}_p{p:02d}" for a, b in (("r34", "r50"), ("r50", "r34")) for p in POINTS]


@pytest.fixture(scope="module")
def family():
    torch.manual_seed(0)
    fam = build_family([AnchorConfig(arch=a, width_div=WIDTH_DIV) for a in ("resnet34", "resnet50")])
    fam = fam.to(DEV).eval()
    return fam.to(memory_format=torch.channels_last) if backend.ON_GPU else fam


def images(batch: int) -> torch.Tensor:
    x = torch.randn(batch, 1, SIZE, SIZE, device=DEV)
    return x.contiguous(memory_format=torch.channels_last) if backend.ON_GPU else x


def forward_bytes(params: int, batch: int, classes: int = 10) -> int:
    return 4 * params + 4 * batch * SIZE * SIZE + 4 * batch * classes


@pytest.mark.parametrize("batch_id", list(BATCHES))
@pytest.mark.parametrize("name", CONFIGS)
def test_seam_latency(device_bench, family, name, batch_id):
    batch = BATCHES[batch_id]
    cfg = family.config(name)
    x = images(batch)
    flops = count_flops(family, cfg, (1, SIZE, SIZE), DEV) * batch
    out = {}

    def run():
        with torch.no_grad(), autocast(DEV):
            out["y"] = family(x, cfg)

    device_bench(run, bytes_moved=forward_bytes(family.num_params(cfg), batch), flops=flops, flops_dtype="bf16",
                 n=batch, variant=name, config=name, front=cfg.front, back=cfg.back, point=cfg.point,
                 params=family.num_params(cfg), image=SIZE)
    assert out["y"].shape == (batch, 10) and torch.isfinite(out["y"].float()).all()


@pytest.mark.parametrize("batch_id", list(BATCHES))
@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])
def test_seam_timm_anchor(device_bench, arch, batch_id):
    """The plain timm network: what the family's anchor path costs without the family around it."""
    batch = BATCHES[batch_id]
    torch.manual_seed(0)
    net = build_anchor(AnchorConfig(arch=arch, width_div=WIDTH_DIV)).to(DEV).eval()
    if backend.ON_GPU:
        net = net.to(memory_format=torch.channels_last)
    x = images(batch)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x[:1])
    params = sum(p.numel() for p in net.parameters())
    out = {}

    def run():
        with torch.no_grad(), autocast(DEV):
            out["y"] = net(x)

    device_bench(run, bytes_moved=forward_bytes(params, batch), flops=fc.get_total_flops() * batch,
                 flops_dtype="bf16", n=batch, variant=f"timm-{arch}", params=params, image=SIZE)
    assert out["y"].shape == (batch, 10)


@pytest.mark.parametrize("name", ["r34", "r34_to_r50_p07", "r50"])
def test_seam_serve(device_bench, family, name):
    """``SeamServer.serve``: uint8 images on the device -> labels on the host (preprocess, forward, argmax, copy)."""
    batch = BATCHES["b256"]
    rows = [{"name": c.name, "is_anchor": c.is_anchor, "flops": 1, "acc_val": 1.0, "n_val": 100}
            for c in family.configs]
    server = SeamServer(family, rows, (0.286,), (0.353,), 1, DEV, channels_last=backend.ON_GPU, image_size=SIZE)
    cfg = server.use(name)
    u8 = torch.randint(0, 256, (batch, 1, SIZE, SIZE), dtype=torch.uint8, device=DEV)
    flops = count_flops(family, cfg, (1, SIZE, SIZE), DEV) * batch
    out = {}
    served_bytes = 4 * family.num_params(cfg) + batch * SIZE * SIZE + 8 * batch  # uint8 in, int64 labels out
    device_bench(lambda: out.update(y=server.serve(u8)), bytes_moved=served_bytes,
                 flops=flops, flops_dtype="bf16", n=batch, variant=f"serve-{name}", config=name, image=SIZE)
    assert out["y"].shape == (batch,)
