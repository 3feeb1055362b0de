"""kvstitch benches: the stitch itself, prefill (TTFT) alone vs hybrid, one decode step of each model, and the
device-copy anchor for moving the stitched KV. Random weights of the real shapes (speed does not depend on values):
SmolLM2-135M (30 blocks, 3 KV heads x 64) -> pruned 20 blocks, 2 KV heads; Gemma-3-270M (18 blocks, 1 KV head x 256)
-> pruned 12 blocks. bf16 models, float32 stitch weights. Tiny shapes on the CPU (run once, as tests)."""
import pytest
import torch

from impl.backend import DEVICE, ON_GPU, sized
from impl.kvstitch.hybrid import stitched_cache
from impl.kvstitch.models import TinySpec, build_cache, empty_cache, forward, kv_layout, prefill, tiny_config
from impl.kvstitch.stitch import StitchBundle

SERIES = ("smollm2", "gemma3")
BATCH, TOKENS = sized(8, 2), sized(2048, 16)
ID = f"B{BATCH}-T{TOKENS}"


def real_configs(series: str):
    """(prefill config, pruned decode config) with the real models' shapes."""
    from transformers import Gemma3TextConfig, LlamaConfig

    if series == "smollm2":
        base = dict(vocab_size=49152, hidden_size=576, head_dim=64, max_position_embeddings=8192,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e5}, tie_word_embeddings=True)
        return (LlamaConfig(**base, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                            intermediate_size=1536),
                LlamaConfig(**base, num_hidden_layers=20, num_attention_heads=6, num_key_value_heads=2,
                            intermediate_size=1152))
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
    base = dict(vocab_size=262144, hidden_size=640, head_dim=256, num_attention_heads=4, num_key_value_heads=1,
                query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                 "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    keep = [0, 1, 2, 4, 5, 6, 8, 10, 11, 13, 15, 17]
    return (Gemma3TextConfig(**base, num_hidden_layers=18, intermediate_size=2048, layer_types=types),
            Gemma3TextConfig(**base, num_hidden_layers=12, intermediate_size=1536,
                             layer_types=[types[i] for i in keep]))


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
