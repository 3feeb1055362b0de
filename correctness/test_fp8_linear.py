"""FP8 linear layers against a float64 reference, the explicit path choice, and Hugging Face module swapping.

The bound is ``linear_error_bound`` (impl/fp8/linear.py): rounding of inputs/weights to the compute dtype and the
fp32 sums on the dequantize paths; plus e4m3 activation quantization on the ``_scaled_mm`` paths.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.strategies import seeds
from impl import backend
from impl.backend import DEVICE
from impl.fp8 import hf
from impl.fp8.formats import activation_group, get_group
from impl.fp8.linear import Fp8Linear, Fp8Weight, linear_error_bound, linear_reference, quantize_weight
from impl.fp8.loader import load_checkpoint
from impl.fp8.quantize import quantize_checkpoint
from impl.fp8.reference import dequantize_reference
from impl.fp8.tiny import tiny_config, write_dense_checkpoint

GROUPS = ["tensor", "channel", "group", "block"]
PATHS_HERE = ["dequant-torch", "dequant-triton", "qdq-torch", "qdq-triton"] + (["auto"] if backend.ON_GPU else [])


def make_layer(n, k, group, seed, bias, static, path):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    fw = quantize_weight(w.to(DEVICE), group)
    if bias:
        fw.bias = torch.randn(n, generator=g).to(DEVICE)
    if static:
        fw.input_scale = torch.tensor(8.0 / 448, device=DEVICE)  # randn never reaches 8: no clipping
    return fw, Fp8Linear(fw, path=None if path == "auto" else path)


@given(m=st.sampled_from([1, 3, 16, 33]), n=st.sampled_from([16, 48, 130]), k=st.sampled_from([16, 64, 144]),
       group=st.sampled_from(GROUPS), path=st.sampled_from(PATHS_HERE), seed=seeds(), bias=st.booleans(),
       static=st.booleans(), batch3d=st.booleans(), bf16=st.booleans())
def test_fp8_linear_within_bound_of_float64_reference(m, n, k, group, path, seed, bias, static, batch3d, bf16):
    """bf16=True on the CPU: the GPU's compute dtype (bf16 activations, weight and bias) on the torch dequant path
    (the Triton interpreter has no bf16). On the GPU every path computes in bf16 anyway."""
    fw, layer = make_layer(n, k, group, seed, bias, static, path)
    bf16 = DEVICE == "cuda" or (bf16 and layer.path == "dequant-torch")
    if bf16 and DEVICE != "cuda":
        layer = Fp8Linear(fw, path=layer.path, compute_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((2, m, k) if batch3d else (m, k), generator=g)
    x = x.to(DEVICE, torch.bfloat16 if bf16 else torch.float32)
    x0 = x.clone()
    y = layer(x)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype
    ref = linear_reference(x, fw)
    bound = linear_error_bound(x, fw, layer.path, layer.compute_dtype)
    err = (y.cpu().double() - ref).abs()
    assert bool((err <= bound).all()), (f"path {layer.path}: max err {err.max():.3e}, worst err/bound "
                                        f"{(err / bound).max():.2f}")
    assert torch.equal(x, x0), "input modified"


@pytest.mark.parametrize("group", GROUPS)
def test_bf16_bound_holds_where_the_bias_cancels_the_product(group):
    """y = x W^T + b with b ~ -x W^T: the roundings of the product and of b dominate a tiny y (the case that broke a
    bound charging them to |y|, and one that took bf16's unit roundoff for 2^-9 instead of 2^-8)."""
    fw, _ = make_layer(4096, 16, group, 5, False, False, "dequant-torch")
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(6)).to(DEVICE, torch.bfloat16)
    fw.bias = (-linear_reference(x, fw)[0] + 1e-3 * torch.randn(4096, dtype=torch.float64)).float().to(DEVICE)
    layer = Fp8Linear(fw, path="dequant-torch", compute_dtype=torch.bfloat16)
    err = (layer(x).cpu().double() - linear_reference(x, fw)).abs()
    ratio = err / linear_error_bound(x, fw, layer.path, layer.compute_dtype)
    assert bool((ratio <= 1).all()), f"worst err/bound {ratio.max():.2f}"
    assert ratio.max() > 0.1, f"the bound is loose here (worst err/bound {ratio.max():.3f}): this case tests nothing"


def test_path_choice_is_explicit_and_checked():
    fw = quantize_weight(torch.randn(32, 64, device=DEVICE), "block")
    layer = Fp8Linear(fw)
    assert layer.path in ("dequant-torch", "dequant-triton") and layer.reason
    if not backend.ON_GPU:
        assert layer.path == "dequant-torch" and "CPU" in layer.reason
        with pytest.raises(ValueError, match="not available for this weight"):
            Fp8Linear(quantize_weight(torch.randn(32, 64), "tensor"), path="scaled_mm-tensor")
    with pytest.raises(ValueError, match="path must be one of"):
        Fp8Linear(fw, path="magic")
    with pytest.raises(TypeError, match="2-D FP8 tensor"):
        Fp8Linear(Fp8Weight(torch.zeros(4, 4), torch.ones(1, 1), get_group("tensor")))
    with pytest.raises(ValueError, match="takes 64"):
        layer(torch.zeros(2, 63, device=DEVICE))
    assert "path=" in repr(layer)


def test_modes_choose_weight_only_or_quantized_activations():
    """w8a16 never quantizes activations; w8a8 always does, per token or per 1x128 slice of a token
    (``activation_group``; qdq where no FP8 GEMM takes the scales)."""
    for group in GROUPS:
        fw = quantize_weight(torch.randn(32, 64, device=DEVICE), group)
        a16, a8 = Fp8Linear(fw, mode="w8a16"), Fp8Linear(fw, mode="w8a8")
        assert a16.path.startswith("dequant") and a16.mode == "w8a16"
        assert a8.path.startswith(("qdq", "scaled_mm-rowwise")), (group, a8.path)
        if not backend.ON_GPU:
            assert (a16.path, a8.path) == ("dequant-torch", "qdq-torch")
            x = torch.randn(5, 64)
            xq = a8.quantized_input(x)  # e4m3: each row's (or slice's) largest |x| maps to 448 * s, s = amax / 448
            assert torch.allclose(xq.abs().amax(dim=1), x.abs().amax(dim=1), rtol=1e-6, atol=0)
            assert not torch.equal(xq, x) and (xq - x).abs().max() <= x.abs().max() / 16
    with pytest.raises(ValueError, match="mode must be"):
        Fp8Linear(fw, mode="w4a4")


@pytest.mark.parametrize("path", ["qdq-torch", "qdq-triton"])
def test_w8a8_scales_activations_per_k_group_of_block_and_group_weights(path):
    """A token whose first 128 features hold one outlier (2^17) and whose others lie in [1, 2): with 1x128
    activation scales (block and group weights) the features past the first slice keep e4m3's relative precision
    (<= 2^-4); with one scale per token (channel and tensor weights) the scale is 2^17 / 448, so they land among
    e4m3's subnormals (x / s < 2^-8, steps of 2^-9) and some lose over 2^-3 of their value."""
    assert activation_group(get_group("block")) == activation_group(get_group("group")) == get_group("group")
    assert activation_group(get_group("channel")) == activation_group(get_group("tensor")) == get_group("token")
    g = torch.Generator().manual_seed(3)
    x = (1 + torch.rand(4, 320, generator=g)).to(DEVICE)
    x[:, 5] = 2.0 ** 17
    rest = slice(128, None)
    for group, per_slice in (("block", True), ("group", True), ("channel", False), ("tensor", False)):
        layer = Fp8Linear(quantize_weight(torch.randn(32, 320, device=DEVICE), group), path=path, mode="w8a8")
        xq = layer.quantized_input(x).cpu().double()
        rel = ((xq[:, rest] - x[:, rest].cpu().double()).abs() / x[:, rest].cpu().double()).max().item()
        assert xq[:, 5].eq(2.0 ** 17).all(), group
        if per_slice:
            assert rel <= 2.0 ** -4, (group, rel)
        else:
            assert rel > 2.0 ** -3, (group, rel)


@pytest.mark.gpu
def test_gpu_w8a8_uses_rowwise_tensor_cores_for_tensor_and_channel_weights():
    for group in ("tensor", "channel"):
        layer = Fp8Linear(quantize_weight(torch.randn(256, 512, device="cuda"), group), mode="w8a8")
        assert layer.path == "scaled_mm-rowwise", (group, layer.path)
        x = torch.randn(7, 512, device="cuda", dtype=torch.bfloat16)
        err = (layer(x).cpu().double() - linear_reference(x, layer_weight(layer))).abs()
        assert bool((err <= linear_error_bound(x, layer_weight(layer), layer.path, torch.bfloat16)).all())


def layer_weight(layer: Fp8Linear) -> Fp8Weight:
    return Fp8Weight(layer.weight, layer.weight_scale, layer.group)


@pytest.mark.gpu
def test_gpu_paths_use_fp8_tensor_cores_where_scales_allow():
    paths = {g: Fp8Linear(quantize_weight(torch.randn(256, 512, device="cuda"), g)).path for g in GROUPS}
    assert paths["tensor"] == "scaled_mm-tensor"
    if torch.cuda.get_device_capability() >= (9, 0):
        assert paths["channel"] == "scaled_mm-rowwise"
    assert paths["block"] == "dequant-triton" and paths["group"] == "dequant-triton"
    odd = Fp8Linear(quantize_weight(torch.randn(100, 72, device="cuda"), "tensor"))
    assert odd.path == "dequant-triton" and "divisible by 16" in odd.reason
    w = quantize_weight(torch.randn(80, 80, device="cuda"), "tensor")
    buf = torch.empty(80 * 80 + 3, dtype=torch.uint8, device="cuda")
    buf[3:].copy_(w.weight.view(torch.uint8).reshape(-1))
    unaligned = buf[3:].view(torch.float8_e4m3fn).reshape(80, 80)  # as a loader's view of its file buffer
    sbuf = torch.empty(2, device="cuda")
    sbuf[1:].copy_(w.scale.reshape(-1))
    layer = Fp8Linear(Fp8Weight(unaligned, sbuf[1:].reshape(w.scale.shape), w.group))  # a scale 4 bytes in
    x = torch.randn(48, 80, device="cuda")
    assert layer.weight.data_ptr() % 16 == 0
    assert torch.equal(layer.weight.view(torch.uint8), unaligned.view(torch.uint8))
    assert layer.weight_scale.data_ptr() % 16 == 0
    assert torch.equal(layer(x), Fp8Linear(w)(x))  # cuBLASLt refuses FP8 operands not aligned to 16 bytes


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_dense_checkpoint(d, tiny_config(), seed=3, dtype=torch.float32)
    return d


def test_unquantized_checkpoint_builds_the_same_model_as_transformers(tiny_dense):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    want = AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32)(input_ids=ids).logits
    model = hf.build_model(load_checkpoint(tiny_dense, "cpu"), dtype=torch.float32)
    assert torch.equal(model(input_ids=ids).logits, want)


@pytest.mark.parametrize("layout", ["vllm-tensor", "deepseek-block", "ct-channel"])
def test_hf_model_runs_on_swapped_fp8_linears(tiny_dense, tmp_path, layout):
    """Swapped-in Fp8Linears give the logits of the same model with the dequantized weights in nn.Linear."""
    from transformers import AutoModelForCausalLM

    quantize_checkpoint(tiny_dense, tmp_path, layout, log=lambda *a: None)
    loaded = load_checkpoint(tmp_path, DEVICE)
    model = hf.build_model(loaded, dtype=torch.float32, path="dequant-triton" if not backend.ON_GPU else None)
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 14
    assert sum(hf.linear_paths(model).values()) == 14
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32).to(DEVICE)
    for module, w in loaded.linears.items():
        wd = dequantize_reference(w.weight, w.scale, w.group, "e4m3", torch.float32)
        dense.get_submodule(module).weight.data = wd.to(DEVICE)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got, want = model(input_ids=ids).logits, dense(input_ids=ids).logits
    tol = 1e-4 if not backend.ON_GPU else 5e-2  # on a GPU the scaled_mm paths also quantize activations
    assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("bug", [None, "channel-scale", "k-tail"])
def test_serve_linear_bench_fails_on_an_injected_bug(monkeypatch, bug):
    """The FP8 linear bench's check (benches/bench_serve.py) is the float64 reference over the FP8 weights within a
    bound made of e4m3's unit roundoff and K (checked at the CPU's small shape): it passes the kernel as it is and
    fails where the kernel scales one output channel half an e4m3 step too high, or drops the last column of K --
    bugs that a loose tolerance (0.1 max|ref| + 0.1 |ref| against the bf16 weights) lets through."""
    import benches.bench_serve as bench
    from fixtures.oracle import assert_close
    from impl.serve import choose, fp8_adapter, fp8_gemv
    from impl.serve.choose import GemmChoice, GemmTable
    from impl.serve.fp8_gemv import GemvConfig

    real_gemv, real_quantize = fp8_gemv.gemv, fp8_adapter.quantize_linear
    seen = {}

    def buggy(x, q, s, cfg, **kw):
        seen["x"] = x
        if bug == "k-tail":
            x = x.clone()
            x[:, -1:] = 0
        y = real_gemv(x, q, s, cfg, **kw)
        if bug == "channel-scale":
            y[:, 0] *= 1 + 2.0 ** -4
        seen["y"] = y
        return y

    def quantize_linear(dense):
        seen["w"] = dense.weight.detach().clone()
        return real_quantize(dense)

    monkeypatch.setattr(fp8_gemv, "gemv", buggy)
    monkeypatch.setattr(fp8_adapter, "quantize_linear", quantize_linear)
    torch.manual_seed(11)  # the bench draws its weights and inputs from the global generator
    # the CPU's shape on every machine (at a GPU's K = 14336 the bound's K 2^-22 |x||W| term, the worst case of fp32
    # sums, is wider than these bugs), served by the W8A16 kernel whatever table the machine holds (an
    # FP8-activation path's bound is wider than a half-step scale error by design)
    monkeypatch.setitem(bench.LINEAR_SHAPES, "w2", (16, 80))
    choose.use_table(GemmTable({(16, 80): [(8, GemmChoice("w8a16", GemvConfig(), "pinned"))]}, origin="pinned W8A16"))
    try:
        if bug is None:
            bench.test_serve_linear(lambda fn, **kw: fn(), "fp8", "w2", 5)
            assert "y" in seen  # the kernel path ran (the GEMV under the interpreter)
            return
        with pytest.raises(AssertionError, match="off its float64 reference"):
            bench.test_serve_linear(lambda fn, **kw: fn(), "fp8", "w2", 5)
    finally:
        choose.use_table(None)
    ref = seen["x"].double() @ seen["w"].double().T  # the former check passes the same wrong output
    assert_close(seen["y"].double(), ref, check_dtype=False, rtol=0.1, atol=0.1 * float(ref.abs().max()))
