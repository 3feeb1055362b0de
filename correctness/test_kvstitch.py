"""Stitch layers over random tiny model pairs: RoPE inverse, shapes/dtypes the decode model expects, the float64
reference, least squares, and the identity oracle (hybrid == the model's own greedy output, token for token)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle import assert_close
from impl.kvstitch.config import StitchConfig
from impl.kvstitch.hybrid import generate_alone, generate_hybrid, stitched_cache
from impl.kvstitch.models import TinySpec, build_cache, forward, kv_layout, prefill, tiny_model
from impl.kvstitch.rope import Rope, positions_for, rotate, unrotate
from impl.kvstitch.stitch import StitchBundle, pair_layers, stitch_reference


@st.composite
def specs(draw, vocab: int = 64) -> TinySpec:
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    # transformers validates hidden % heads == 0 even with an explicit head_dim
    return TinySpec(layers=draw(st.integers(1, 4)), hidden=heads * draw(st.sampled_from([4, 8, 12])), heads=heads,
                    kv_heads=kv, head_dim=draw(st.sampled_from([4, 6, 8, 16])), intermediate=32, vocab=vocab,
                    arch=draw(st.sampled_from(["llama", "gemma3"])),
                    rope_theta=draw(st.sampled_from([1e4, 1e5])))


def prompt(batch: int, tokens: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@given(p=specs(), q=specs(), batch=st.integers(1, 3), tokens=st.integers(1, 20), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_stitched_kv_has_the_decode_models_layout(p, q, batch, tokens, seed, dtype):
    pm, qm = tiny_model(p, seed, dtype), tiny_model(q, seed + 1, dtype)
    ids = prompt(batch, tokens, p.vocab, seed)
    bundle = StitchBundle(pm.config, qm.config)
    kv_p, kv_q = prefill(pm, ids)[0], prefill(qm, ids)[0]
    kv_in = [(k.clone(), v.clone()) for k, v in kv_p]
    out = bundle(kv_p, out_dtype=dtype)
    assert len(out) == len(kv_q) == q.layers
    for (k, v), (tk, tv) in zip(out, kv_q):  # exactly what the decode model caches for the same tokens
        assert k.shape == tk.shape and v.shape == tv.shape and k.dtype == tk.dtype == v.dtype == dtype
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(kv_p, kv_in)), "input modified"
    cache = build_cache(qm.config, out)  # and the decode model runs on it
    logits = forward(qm, ids[:, -1:], cache).logits
    assert logits.shape == (batch, 1, q.vocab) and cache.get_seq_length() == tokens + 1


@given(p=specs(), q=specs(), tokens=st.integers(1, 12), start=st.integers(0, 50), seed=st.integers(0, 2**16))
def test_stitch_matches_float64_reference(p, q, tokens, start, seed):
    pm, qm = tiny_model(p, seed, torch.float64), tiny_model(q, seed + 1, torch.float64)
    bundle = StitchBundle(pm.config, qm.config, dtype=torch.float64)
    torch.manual_seed(seed)
    for prm in bundle.parameters():
        prm.data.normal_()
    kv = prefill(pm, prompt(2, tokens, p.vocab, seed))[0]
    with torch.no_grad():
        got, ref = bundle(kv, start=start), stitch_reference(bundle, kv, start=start)
    for (k, v), (rk, rv) in zip(got, ref):  # transformers computes RoPE angles in float32: keys agree to ~1e-7
        assert_close(k, rk, rtol=1e-5, atol=1e-5 * float(rk.abs().max()))
        assert_close(v, rv, rtol=1e-9, atol=1e-9)


@given(spec=specs(), tokens=st.integers(1, 30), start=st.integers(0, 3000), seed=st.integers(0, 2**16))
def test_unrotate_inverts_the_models_rope(spec, tokens, start, seed):
    cfg = tiny_model(spec, seed).config
    tabs = Rope(cfg).per_layer(positions_for(2, start, tokens, "cpu"), torch.float64)
    x = torch.randn(2, spec.kv_heads, tokens, spec.head_dim, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    for cos, sin in tabs:
        assert_close(unrotate(rotate(x, cos, sin), cos, sin).numpy(), x.numpy(), rtol=1e-12, atol=1e-12)
        # a rotation keeps norms (to float32: transformers builds cos/sin in float32)
        assert_close(rotate(x, cos, sin).norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-9)


def test_rope_matches_the_models_cached_keys():
    """Un-rotating the cached keys gives k_proj(x) exactly as the model computed it (llama: no k-norm)."""
    spec = TinySpec(layers=1, kv_heads=2, heads=4, head_dim=8)
    m = tiny_model(spec, 3, torch.float64)
    ids = prompt(1, 9, spec.vocab, 3)
    k_rot = prefill(m, ids)[0][0][0]
    x = m.model.layers[0].input_layernorm(m.model.embed_tokens(ids))
    k = m.model.layers[0].self_attn.k_proj(x).view(1, 9, 2, 8).transpose(1, 2)
    cos, sin = Rope(m.config).per_layer(positions_for(1, 0, 9, "cpu"), torch.float64)[0]
    assert_close(unrotate(k_rot, cos, sin).detach().numpy(), k.detach().numpy(), rtol=1e-10, atol=1e-12)


@settings(max_examples=10)
@given(spec=specs(), batch=st.integers(1, 2), tokens=st.integers(1, 16), n_new=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_identity_stitches_reproduce_the_models_own_greedy_output(spec, batch, tokens, n_new, seed):
    m = tiny_model(spec, seed, torch.float64)
    ids = prompt(batch, tokens, spec.vocab, seed)
    bundle = StitchBundle(m.config, m.config, dtype=torch.float64).init_identity()
    assert bundle.passthrough
    own = generate_alone(m, ids, n_new)
    hf = m.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)[:, tokens:]
    hybrid = generate_hybrid(m, m, bundle, ids, n_new)
    assert torch.equal(own, hf), "the greedy loop differs from transformers' generate"
    assert torch.equal(hybrid, own)
    bundle.passthrough = False  # the real map path (un-rotate, identity GEMM, re-rotate) in float64
    kv = prefill(m, ids)[0]
    with torch.no_grad():
        stitched = bundle(kv)
    for (k, v), (sk, sv) in zip(kv, stitched):
        assert_close(sk, k, rtol=1e-12, atol=1e-12)
        assert torch.equal(sv, v)


def test_passthrough_hybrid_gives_bit_identical_logits():
    m = tiny_model(TinySpec(layers=3, arch="gemma3"), 5)
    ids = prompt(2, 11, 96, 5)
    bundle = StitchBundle(m.config, m.config).init_identity()
    cache, first = stitched_cache(m, m, bundle, ids)
    own_cache = build_cache(m.config, prefill(m, ids)[0])
    a = forward(m, first[:, None], cache).logits
    b = forward(m, first[:, None], own_cache).logits
    assert torch.equal(a, b)


def test_least_squares_recovers_a_linear_map_exactly():
    """Decode model = prefill model with the last block's V projection mixed by a fixed matrix (earlier blocks and all
    keys unchanged): the least-squares init must find the mix for V and the identity everywhere else."""
    spec = TinySpec(layers=2, kv_heads=2, heads=2, head_dim=8)
    pm = tiny_model(spec, 0, torch.float64)
    qm = tiny_model(spec, 0, torch.float64)
    mix = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        qm.model.layers[-1].self_attn.v_proj.weight.copy_(mix @ pm.model.layers[-1].self_attn.v_proj.weight)
    ids = prompt(4, 24, spec.vocab, 2)
    bundle = StitchBundle(pm.config, qm.config, StitchConfig(ridge=0.0), dtype=torch.float64)
    resid = bundle.init_lstsq(prefill(pm, ids)[0], prefill(qm, ids)[0], positions_for(4, 0, 24, "cpu"))
    assert max(resid.values()) < 1e-8, resid
    eye = torch.eye(16, dtype=torch.float64)
    for j, layer in enumerate(bundle.layers):
        assert_close(layer.v_map.weight, mix if j == 1 else eye, rtol=1e-6, atol=1e-7)
        assert_close(layer.k_map.weight, eye, rtol=1e-6, atol=1e-7)


@given(n_p=st.integers(1, 40), n_q=st.integers(1, 40))
def test_depth_pairing_is_monotone_and_covers_both_ends(n_p, n_q):
    pairs = pair_layers(n_p, n_q)
    assert len(pairs) == n_q and all(1 <= len(p) <= 2 for p in pairs)
    assert all(0 <= i < n_p for p in pairs for i in p)
    assert all(max(a) <= min(b) or max(a) <= max(b) for a, b in zip(pairs, pairs[1:]))
    if n_q > 1:
        assert pairs[0] == (0,) and pairs[-1] == (n_p - 1,)
    if n_p == n_q:
        assert pairs == [(i,) for i in range(n_p)]


def test_save_load_roundtrip(tmp_path):
    pm = tiny_model(TinySpec(layers=3), 0)
    qm = tiny_model(TinySpec(layers=2, hidden=24, kv_heads=1, heads=3, arch="gemma3"), 1)
    b = StitchBundle(pm.config, qm.config)
    torch.manual_seed(0)
    for prm in b.parameters():
        prm.data.normal_()
    kv = prefill(pm, prompt(1, 5, 96, 0))[0]
    b2 = StitchBundle.load(b.save(tmp_path / "s"))
    assert b2.pairing == b.pairing and kv_layout(b2.decode_config, torch.float32) == b.dst
    with torch.no_grad():
        pairs = list(zip(b(kv), b2(kv)))
    for (k, v), (k2, v2) in pairs:
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_bad_inputs_are_named():
    pm = tiny_model(TinySpec(layers=2), 0)
    with pytest.raises(ValueError, match="share a tokenizer"):
        StitchBundle(pm.config, tiny_model(TinySpec(layers=2, vocab=50), 0).config)
    qm = tiny_model(TinySpec(layers=2, kv_heads=1, heads=2), 0)
    b = StitchBundle(pm.config, qm.config)
    kv = prefill(pm, prompt(1, 4, 96, 0))[0]
    with pytest.raises(ValueError, match="layers"):
        b(kv[:1])
    with pytest.raises(ValueError, match="kv_heads"):
        b([(k[:, :1], v[:, :1]) for k, v in kv])
    with pytest.raises(ValueError, match="identity"):
        b.init_identity()
    with pytest.raises(ValueError, match="int64"):
        generate_alone(pm, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        generate_alone(pm, torch.full((1, 3), 96), 2)
    with pytest.raises(ValueError, match="parent layers"):
        pair_layers(4, 2, parents=[0, 7])
    with pytest.raises(ValueError, match="multiple"):
        tiny_model(TinySpec(heads=3, kv_heads=2))


# ---- on a GPU: the same properties at real dtypes and larger sizes ---------------------------------------------

@pytest.mark.gpu
@settings(max_examples=20)
@given(p=specs(vocab=512), q=specs(vocab=512), tokens=st.integers(1, 700), seed=st.integers(0, 2**16))
def test_gpu_bf16_stitch_matches_float64_reference(p, q, tokens, seed):
    pm = tiny_model(p, seed, torch.bfloat16).cuda()
    qm = tiny_model(q, seed + 1, torch.bfloat16).cuda()
    bundle = StitchBundle(pm.config, qm.config).cuda()
    kv = prefill(pm, prompt(4, tokens, p.vocab, seed).cuda())[0]
    with torch.no_grad():
        got = bundle(kv, out_dtype=torch.bfloat16)
        ref = stitch_reference(bundle.cpu().double(), [(k.cpu(), v.cpu()) for k, v in kv])
    want = prefill(qm, prompt(4, tokens, p.vocab, seed).cuda())[0]
    for (k, v), (rk, rv), (wk, _) in zip(got, ref, want):
        assert k.dtype == wk.dtype == torch.bfloat16 and k.shape == wk.shape
        scale = float(rk.abs().max()) + 1e-6
        assert_close(k.float().cpu(), rk.float(), dtype="bfloat16", atol=2e-2 * scale, check_dtype=False)
        assert_close(v.float().cpu(), rv.float(), dtype="bfloat16", atol=2e-2 * scale, check_dtype=False)


@pytest.mark.gpu
def test_gpu_identity_hybrid_reproduces_greedy_output():
    spec = TinySpec(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, vocab=512, arch="gemma3")
    m = tiny_model(spec, 0, torch.bfloat16).cuda()
    ids = prompt(8, 600, 512, 0).cuda()  # longer than the sliding window (64) of the tiny Gemma-3
    bundle = StitchBundle(m.config, m.config).init_identity()
    assert torch.equal(generate_hybrid(m, m, bundle, ids, 16), generate_alone(m, ids, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("backend,devices", [("gloo", ("cuda:0", "cuda:0")),
                                             pytest.param("nccl", ("cuda:0", "cuda:1"), marks=pytest.mark.multi_gpu)])
def test_gpu_runtime_kv_arrives_bit_identical(tmp_path, backend, devices):
    from impl.kvstitch.config import RuntimeConfig
    from impl.kvstitch.runtime import serve

    p = tiny_model(TinySpec(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, vocab=512), 0)
    q = tiny_model(TinySpec(layers=2, hidden=64, heads=2, kv_heads=1, head_dim=32, vocab=512, arch="gemma3"), 1)
    p.save_pretrained(tmp_path / "p")
    q.save_pretrained(tmp_path / "q")
    StitchBundle(p.config, q.config).save(tmp_path / "s")
    reqs = [prompt(4, 300, 512, 1), prompt(2, 33, 512, 2)]
    cfg = RuntimeConfig(backend=backend, prefill_device=devices[0], decode_device=devices[1], dtype="bfloat16",
                        new_tokens=8, baseline=True)
    r0, r1 = serve(tmp_path / "p", tmp_path / "q", tmp_path / "s", reqs, cfg, dump=True)
    for sent, got in zip(r0["dump"], r1["dump"]):
        assert len(sent) == len(got) == 4
        assert all(a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(sent, got))
    assert all(len(r["generated"][0]) == 8 for r in r0["requests"])
