"""The Llama decoder against Hugging Face transformers: RoPE (default, linear, llama3), whole-model logits on random
configs, config parsing, the safetensors loader (round trip and malformed checkpoints), and the FP8 adapter."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.oracle import assert_close
from fixtures.serve import tiny_model
from impl.serve import fp8_adapter
from impl.serve.model import ModelArgs, Transformer, apply_rope, rope_cos_sin, rope_inv_freq
from impl.serve.reference import ContiguousKV
from impl.serve.weights import load_model, save_hf_dir

transformers = pytest.importorskip("transformers", reason="the HF comparisons need transformers")


def hf_rope(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": theta, "rope_type": "default", **(scaling or {})}
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, rope_parameters=params,
                      max_position_embeddings=1 << 20)
    kind = params["rope_type"]
    if kind == "default":
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")[0]


@given(head_dim=st.sampled_from([8, 32, 64, 96, 128]), theta=st.sampled_from([1e4, 1e5, 5e5]),
       kind=st.sampled_from(["default", "linear", "llama3"]), factor=st.sampled_from([2.0, 8.0, 32.0]),
       low=st.sampled_from([1.0, 2.0]), high=st.sampled_from([4.0, 8.0]), old=st.sampled_from([256, 8192]))
def test_rope_frequencies_match_hf(head_dim, theta, kind, factor, low, high, old):
    scaling = {"default": None, "linear": {"rope_type": "linear", "factor": factor},
               "llama3": {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                          "original_max_position_embeddings": old}}[kind]
    assert_close(rope_inv_freq(head_dim, theta, scaling), hf_rope(head_dim, theta, scaling), rtol=1e-6, atol=0)


def test_rope_rotates_pairs_and_keeps_norms():
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(5), rope_inv_freq(16, 1e4), torch.float64)
    y = apply_rope(x, cos, sin)
    assert_close(y[0], x[0])  # position 0 is the identity
    pair_norm = lambda t: t[..., :8] ** 2 + t[..., 8:] ** 2  # noqa: E731  (dims i and i + d/2 rotate together)
    assert_close(pair_norm(y), pair_norm(x), rtol=1e-6, atol=1e-6)  # angles are float32, as in HF
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        rope_inv_freq(16, 1e4, {"rope_type": "yarn", "factor": 4.0})


def hf_logits(model_dir, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens[None]).logits[0]


def full_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    ctx = ContiguousKV(model, len(tokens))
    ctx.positions = torch.arange(len(tokens))
    with torch.no_grad():
        return model(tokens, ctx)


@pytest.mark.parametrize("overrides", [
    {}, {"tie_embeddings": True}, {"n_kv_heads": 6}, {"n_kv_heads": 1, "rope_scaling": None},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "head_dim": 10},
], ids=["gqa3-llama3", "tied", "mha", "mqa-default", "linear-hd10"])
def test_model_logits_match_hf_llama(tmp_path, overrides):
    model = tiny_model(seed=1, **overrides)
    save_hf_dir(model, tmp_path)
    tokens = torch.randint(0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(2))
    assert_close(full_forward(model, tokens), hf_logits(tmp_path, tokens), rtol=1e-4, atol=1e-4)


def test_loader_round_trip_and_dtype(tmp_path):
    model = tiny_model(seed=3)
    save_hf_dir(model, tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_model(tmp_path, dtype=dtype)
        assert loaded.args == model.args
        for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
            assert q.dtype == dtype and torch.equal(p.to(dtype), q), name


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(cfg)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_loader_refuses_malformed_checkpoints(tmp_path):
    src = save_hf_dir(tiny_model(seed=4), tmp_path / "ok")
    q = "model.layers.1.self_attn.k_proj.weight"
    cases = {
        "missing": (lambda t: t.pop(q), None, "missing"),
        "shape": (lambda t: t.__setitem__(q, t[q][:-1]), None, "has shape"),
        "extra": (lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight", t[q].clone()), None, "unexpected"),
        "dtype": (lambda t: t.__setitem__(q, t[q].to(torch.int32)), None, "dense checkpoint needs"),
        "model_type": (None, lambda c: c.__setitem__("model_type", "gpt2"), "unknown model layout"),
        "bias": (None, lambda c: c.__setitem__("attention_bias", True), "attention_bias"),
        "quant": (None, lambda c: c.__setitem__("quantization_config", {"quant_method": "awq"}), "unknown model"),
    }
    for name, (et, ec, message) in cases.items():
        bad = _rewrite(src, tmp_path / name, et, ec)
        with pytest.raises(ValueError, match=message):
            load_model(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nowhere")


def test_hf_config_parsing_both_generations():
    old = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": 131072, "eos_token_id": [128001, 128008, 128009],
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    assert ModelArgs.from_hf_config(old) == ModelArgs.from_name("llama-3.1-8b")
    new = {**old, "rope_parameters": {"rope_theta": 500000.0, **old.pop("rope_scaling")}}
    new.pop("rope_theta")
    assert ModelArgs.from_hf_config(new) == ModelArgs.from_name("llama-3.1-8b")
    with pytest.raises(ValueError, match="multiple"):
        ModelArgs(n_heads=6, n_kv_heads=4)


def test_presets_have_the_published_sizes():
    def count(a: ModelArgs) -> int:
        layer = a.dim * a.qkv_dim + a.n_heads * a.head_dim * a.dim + 3 * a.dim * a.ffn_dim + 2 * a.dim
        return a.n_layers * layer + a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + a.dim

    assert count(ModelArgs.from_name("llama-3-8b")) == 8_030_261_248
    assert count(ModelArgs.from_name("smollm2-135m")) == 134_515_008


@given(rows=st.integers(1, 9), cols=st.sampled_from([16, 48, 100]), seed=st.integers(0, 2**31 - 1),
       zero_row=st.booleans())
def test_fp8_linear_matches_float64_reference(rows, cols, seed, zero_row):
    gen = torch.Generator().manual_seed(seed)
    dense = tiny_model(seed=seed % 7).layers[0].feed_forward.w2
    dense.weight.data = torch.randn(rows, cols, generator=gen) * 3
    if zero_row:
        dense.weight.data[0] = 0
    w0 = dense.weight.data.clone()
    x = torch.randn(5, cols, generator=gen)
    fp8 = fp8_adapter.quantize_linear(dense)
    assert torch.equal(dense.weight.data, w0), "the dense weight was modified"
    q, s = fp8.inner.weight, fp8.inner.weight_scale.reshape(-1)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (rows,) and fp8.inner.path == "dequant-torch"
    assert float(q.float().abs().max()) <= 448
    w64 = q.double() * s.double()[:, None]
    assert_close(fp8(x).double(), x.double() @ w64.T, check_dtype=False, rtol=1e-5, atol=1e-5)
    # e4m3 keeps 3 mantissa bits: |W - s·q| <= 2^-4 |W| for normal values, plus the subnormal step s·2^-9
    err = (w64 - w0.double()).abs()
    assert bool((err <= w0.double().abs() / 16 + s.double()[:, None] * 2.0**-9 + 1e-30).all())


def test_fp8_quantised_model_halves_linear_memory():
    model = tiny_model("tiny-8b-shaped", dtype=torch.bfloat16, std=0.02)
    dense_linear = fp8_adapter.weight_bytes(model, linears_only=True)
    dense_total = fp8_adapter.weight_bytes(model)
    fp8_adapter.quantize_model_(model)
    paths = {"w8a16-triton-or-mma | dequant-torch | deferred per GEMM table": 4 * model.args.n_layers}
    assert fp8_adapter.linear_paths(model) == paths
    ratio = fp8_adapter.weight_bytes(model, linears_only=True) / dense_linear
    a = model.args
    scales = 4 * a.n_layers * (a.qkv_dim + a.dim + 2 * a.ffn_dim + a.dim)  # one fp32 scale per output channel
    assert ratio == pytest.approx(0.5 + scales / dense_linear)
    assert fp8_adapter.weight_bytes(model) < dense_total


@pytest.mark.parametrize("layout", ["vllm-tensor", "vllm-channel", "deepseek-block", "ct-channel"])
def test_fp8_checkpoints_load_into_the_right_layers(tmp_path, layout):
    """An FP8 checkpoint made by impl.fp8's quantizer serves as the dense model with the dequantized weights."""
    from impl.fp8.quantize import quantize_checkpoint

    model = tiny_model(seed=5)
    save_hf_dir(model, tmp_path / "dense")
    quantize_checkpoint(tmp_path / "dense", tmp_path / layout, layout, backend_name="torch", log=lambda *_: None)
    fp8 = load_model(tmp_path / layout, dtype=torch.float32)
    assert all("dequant-torch" in p for p in fp8_adapter.linear_paths(fp8))
    twin = tiny_model(seed=5)  # the same model, its linears replaced by the FP8 model's dequantized weights
    for mine, theirs in zip(twin.layers, fp8.layers):
        for path in fp8_adapter.QUANTIZED:
            part, child = path.split(".")
            layer = getattr(getattr(theirs, part), child)
            layer = getattr(layer, "inner", layer)  # per-tensor/channel layers come wrapped for decode
            getattr(getattr(mine, part), child).weight.data = layer.dequantized_weight()
    tokens = torch.randint(0, model.args.vocab_size, (30,), generator=torch.Generator().manual_seed(6))
    assert_close(full_forward(fp8, tokens), full_forward(twin, tokens), rtol=1e-5, atol=1e-5)


def test_fp8_checkpoint_errors_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from impl.fp8.quantize import quantize_checkpoint

    save_hf_dir(tiny_model(seed=5), tmp_path / "dense")
    dst = tmp_path / "fp8"
    quantize_checkpoint(tmp_path / "dense", dst, "vllm-channel", backend_name="torch", log=lambda *_: None)
    path = dst / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.1.mlp.down_proj.weight_scale"
    tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=f"{name}.*zero"):
        load_model(dst, dtype=torch.float32)


def test_llama_presets_take_their_sizes_from_the_shared_shape():
    from impl.common.shapes import LLAMA3_8B

    for name in ("llama-3-8b", "llama-3.1-8b"):
        a = ModelArgs.from_name(name)
        assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.vocab_size, a.rope_theta) == (
            4096, 32, 32, 8, 128, 14336, 128256, 500000.0)
    assert ModelArgs() == ModelArgs.from_shape(LLAMA3_8B)
