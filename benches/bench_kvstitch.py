"""kvstitch benches: the stitch itself, prefill (TTFT) alone vs hybrid, one decode step of each model, and the
device-copy anchor for moving the stitched KV. Random weights of the real shapes (speed does not depend on values):
SmolLM2-135M (30 blocks, 3 KV heads x 64) -> pruned 20 blocks, 2 KV heads; Gemma-3-270M (18 blocks, 1 KV head x 256)
-> pruned 12 blocks (the recipe's largest decode sizes). bf16 models, float32 stitch weights. Tiny shapes on the CPU
(run once, as tests)."""
import pytest
import torch

from impl.backend import DEVICE, ON_GPU, sized
from impl.kvstitch.config import DECODE_SIZES, PruneConfig
from impl.kvstitch.hybrid import stitched_cache
from impl.kvstitch.models import (TinySpec, build_cache, empty_cache, forward, kv_layout, prefill, real_config,
                                  tiny_config)
from impl.kvstitch.prune import pruned_config, spread_plan
from impl.kvstitch.stitch import StitchBundle

SERIES = ("smollm2", "gemma3")
BATCH, TOKENS = sized(8, 2), sized(2048, 16)
ID = f"B{BATCH}-T{TOKENS}"


def real_configs(series: str):
    """(prefill config, decode config) with the real models' shapes: the decode model is the recipe's largest
    pruned size of the series (``DECODE_SIZES``), its blocks spread over depth."""
    parent = real_config(series)
    return parent, pruned_config(parent, spread_plan(parent, PruneConfig(**DECODE_SIZES[series][0])))


def tiny_configs(series: str):
    arch = "gemma3" if series == "gemma3" else "llama"
    return (tiny_config(TinySpec(layers=4, hidden=32, heads=4, kv_heads=2, head_dim=8, arch=arch)),
            tiny_config(TinySpec(layers=2, hidden=32, heads=2, kv_heads=1, head_dim=8, arch=arch)))


_CACHE: dict = {}


def setup(series: str):
    """Prefill model, decode model, stitch bundle (least-squares fitted on random tokens) and a prompt; cached."""
    if series in _CACHE:
        return _CACHE[series]
    from transformers import AutoModelForCausalLM

    cp, cq = real_configs(series) if ON_GPU else tiny_configs(series)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    torch.manual_seed(0)
    with torch.device(DEVICE):
        pm = AutoModelForCausalLM.from_config(cp).to(dtype).eval()
        qm = AutoModelForCausalLM.from_config(cq).to(dtype).eval()
    bundle = StitchBundle(cp, cq).to(DEVICE)
    ids = torch.randint(0, cp.vocab_size, (BATCH, TOKENS), device=DEVICE)
    _CACHE[series] = (pm, qm, bundle, ids)
    return _CACHE[series]


def kv_bytes(layout, tokens: int, batch: int) -> int:
    return layout.bytes_per_token() * tokens * batch


@pytest.mark.parametrize("series", SERIES)
def test_kvstitch_stitch(device_bench, series):
    pm, qm, bundle, ids = setup(series)
    kv = prefill(pm, ids)[0]
    dtype = kv[0][0].dtype
    src, dst = kv_layout(pm.config, dtype), kv_layout(qm.config, dtype)
    flops = sum(2 * 2 * BATCH * TOKENS * lay.k_map.in_features * lay.k_map.out_features for lay in bundle.layers)
    moved = kv_bytes(src, TOKENS, BATCH) * len(bundle.source_layers()) // src.num_layers + kv_bytes(dst, TOKENS, BATCH)
    with torch.no_grad():
        out = device_bench(lambda: bundle(kv, out_dtype=dtype), bytes_moved=moved, flops=flops, flops_dtype="fp32",
                           series=series, batch=BATCH, tokens=TOKENS, variant="stitch")
    want = prefill(qm, ids[:, :1])[0]
    assert [(k.shape[1], k.shape[3], k.dtype) for k, _ in out] == [(k.shape[1], k.shape[3], k.dtype) for k, _ in want]
    assert all(k.shape[2] == TOKENS for k, _ in out)


@pytest.mark.parametrize("variant", ["prefill_alone", "hybrid"])
@pytest.mark.parametrize("series", SERIES)
def test_kvstitch_ttft(device_bench, series, variant):
    """Time to first token on one GPU: prefill forward (+ stitch + decode-cache build for the hybrid)."""
    pm, qm, bundle, ids = setup(series)
    n = sum(p.numel() for p in pm.parameters())
    if variant == "prefill_alone":
        def run():
            return forward(pm, ids, empty_cache(pm.config), logits_to_keep=1).logits[:, -1].argmax(-1)
    else:
        def run():
            return stitched_cache(pm, qm, bundle, ids)[1]
    with torch.no_grad():
        first = device_bench(run, bytes_moved=2 * n, flops=2 * n * BATCH * TOKENS, series=series, batch=BATCH,
                             tokens=TOKENS, variant=variant)
    assert first.shape == (BATCH,) and int(first.max()) < pm.config.vocab_size


@pytest.mark.parametrize("model", ["prefill_model", "decode_model"])
@pytest.mark.parametrize("series", SERIES)
def test_kvstitch_decode_step(device_bench, series, model):
    """One greedy decode step over a cache of TOKENS tokens (the decode worker's inner loop)."""
    pm, qm, bundle, ids = setup(series)
    m = pm if model == "prefill_model" else qm
    kv = prefill(m, ids)[0]
    tok = ids[:, -1:]
    layout = kv_layout(m)
    n = sum(p.numel() for p in m.parameters())

    def run():  # a fresh cache each round: the step appends one token
        return forward(m, tok, build_cache(m.config, kv)).logits[:, -1].argmax(-1)

    with torch.no_grad():
        nxt = device_bench(run, bytes_moved=2 * n + kv_bytes(layout, TOKENS, BATCH), flops=2 * n * BATCH,
                           series=series, batch=BATCH, tokens=TOKENS, variant=model)
    assert nxt.shape == (BATCH,)


@pytest.mark.parametrize("series", SERIES)
def test_kvstitch_kv_copy_anchor(device_bench, series):
    """Anchor: a device-to-device copy of the decode-layout KV (what the stitched cache costs to move on one GPU)."""
    pm, qm, bundle, ids = setup(series)
    layout = kv_layout(qm)
    n_bytes = kv_bytes(layout, TOKENS, BATCH)
    src = torch.randn(n_bytes // 2, device=DEVICE).to(torch.bfloat16)
    dst = torch.empty_like(src)
    device_bench(lambda: dst.copy_(src), bytes_moved=2 * n_bytes, series=series, batch=BATCH, tokens=TOKENS,
                 variant="torch_copy")
    assert torch.equal(dst, src)
