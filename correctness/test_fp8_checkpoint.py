"""The quantizer and the loader on tiny random Llama checkpoints.

- quantizer -> loader round trip in every layout (sharded output too): codes and scales equal the reference
  quantization of the original weights, the layout is recognised, the config reads as the published layouts do;
- hand-built checkpoints in each published layout (written here with safetensors, not by our quantizer) load to
  exactly the values they encode, static input scales included;
- fused q/k/v and gate/up equal the unfused shards exactly ("exact"), or within the e4m3 bound ("requant");
- malformed checkpoints are refused with a message naming the tensor and the problem.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from impl.fp8 import quantize as Q
from impl.fp8.formats import BLOCK128, CHANNEL, TENSOR, ScaleGroup
from impl.fp8.layouts import LAYOUTS, CheckpointError, ModelSpec
from impl.fp8.loader import load_checkpoint, staged_bytes
from impl.fp8.reference import dequantize_reference, quantize_reference
from impl.fp8.tiny import random_codes, tiny_config, write_dense_checkpoint

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A bf16 tiny Llama (hidden 80, q 80 rows, k/v 16 rows, mlp 144: nothing a multiple of 128) and its tensors."""
    d = tmp_path_factory.mktemp("dense")
    tensors = write_dense_checkpoint(d, tiny_config(), seed=1)
    return d, tensors


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_quantizer_then_loader_roundtrip(dense, tmp_path, layout):
    src, tensors = dense
    summary = Q.quantize_checkpoint(src, tmp_path / "q", layout, shard_mb=0.03, **QUIET)
    assert len(summary["files"]) > 1, "expected a sharded checkpoint at this shard size"
    assert (tmp_path / "q" / "model.safetensors.index.json").exists()
    ck = load_checkpoint(tmp_path / "q", "cpu")
    assert ck.layout_name == layout
    lay = LAYOUTS[layout]
    assert len(ck.linears) == 14 and ck.stats.tensors == 21 + 14
    for module, w in ck.linears.items():
        ref_q, ref_s = quantize_reference(tensors[f"{module}.weight"], lay.group)
        assert torch.equal(w.weight.view(torch.uint8), ref_q), module
        assert torch.equal(w.scale, ref_s), module
        assert w.group == lay.group
    for name, t in ck.dense.items():
        assert torch.equal(t, tensors[name]), name
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    if lay.family == "ct":
        weights = cfg["config_groups"]["group_0"]["weights"]
        assert cfg["quant_method"] == "compressed-tensors" and weights["strategy"] == lay.group.name.replace(
            "128x128", "block")
    else:
        assert cfg["quant_method"] == "fp8" and ("weight_block_size" in cfg) == (lay.group == BLOCK128)
        assert ("fmt" in cfg) == (layout == "deepseek-block")


def test_quantizer_cli_and_e5m2(dense, tmp_path, capsys):
    src, tensors = dense
    assert Q.main([str(src), str(tmp_path / "e5"), "--layout", "vllm-channel", "--fmt", "e5m2"]) == 0
    ck = load_checkpoint(tmp_path / "e5", "cpu")
    w = ck.linears["model.layers.1.mlp.down_proj"]
    assert w.weight.dtype == torch.float8_e5m2
    ref_q, _ = quantize_reference(tensors["model.layers.1.mlp.down_proj.weight"], CHANNEL, "e5m2")
    assert torch.equal(w.weight.view(torch.uint8), ref_q)
    assert Q.main([str(src), str(tmp_path / "e5"), "--layout", "vllm-channel"]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert Q.main([str(tmp_path / "e5"), str(tmp_path / "again"), "--layout", "vllm-tensor"]) == 2
    assert "already has a quantization_config" in capsys.readouterr().err


def test_quantizer_triton_backend_equals_torch_backend(dense, tmp_path):
    src, _ = dense
    Q.quantize_checkpoint(src, tmp_path / "t", "ct-block", backend_name="triton", **QUIET)
    Q.quantize_checkpoint(src, tmp_path / "r", "ct-block", backend_name="torch", **QUIET)
    a, b = load_file(str(tmp_path / "t" / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype.itemsize == 1 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype.itemsize == 1 else b[k]), k


# ---- hand-built checkpoints in the published layouts --------------------------------------------------------

def hand_built(dst, layout: str, *, static: bool = False, scale_dtype=torch.float32, seed: int = 0,
               edit=None, config_edit=None):
    """Write an FP8 checkpoint the way each publisher lays it out; returns {module: (codes, scale, group)}."""
    cfg = tiny_config(num_hidden_layers=1)
    spec = ModelSpec.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors, truth = {}, {}
    for name, shape in spec.dense.items():
        tensors[name] = torch.randn(shape, generator=g).to(torch.bfloat16)
    for module, (n, k) in spec.linears.items():
        codes = random_codes((n, k), generator=g)
        tensors[f"{module}.weight"] = codes
        if layout.endswith("tensor"):
            shape, group, sname = ((1,) if layout.startswith("ct") else ()), TENSOR, "weight_scale"
        elif layout.endswith("channel"):
            shape, group, sname = (n, 1), CHANNEL, "weight_scale"
        else:
            shape, group = (math.ceil(n / 128), math.ceil(k / 128)), BLOCK128
            sname = "weight_scale" if layout.startswith("ct") else "weight_scale_inv"
        scale = (0.01 + torch.rand(shape, generator=g)).to(scale_dtype)
        tensors[f"{module}.{sname}"] = scale
        if static:
            tensors[f"{module}.input_scale"] = torch.tensor(0.05 + torch.rand((), generator=g).item())
        truth[module] = (codes, scale.float().reshape(group.scale_shape(n, k)), group)
    qc = {"vllm-tensor": {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"},
          "vllm-channel": {"quant_method": "fp8", "activation_scheme": "dynamic"},
          "vllm-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
          "deepseek-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                             "weight_block_size": [128, 128]}}.get(layout)
    if qc is None:
        strategy = layout.split("-")[1]
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                  "num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
                  "block_structure": [128, 128] if strategy == "block" else None},
                  "input_activations": {"num_bits": 8, "type": "float", "dynamic": not static,
                                        "strategy": "tensor" if static else "token"}}}}
    cfg["quantization_config"] = qc
    if config_edit:
        config_edit(cfg)
    if edit:
        edit(tensors)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "model.safetensors"))
    return truth, tensors


@pytest.mark.parametrize("layout,static,scale_dtype", [
    ("vllm-tensor", True, torch.float32), ("vllm-tensor", False, torch.float32), ("vllm-channel", False, torch.float32),
    ("vllm-block", False, torch.float32), ("deepseek-block", False, torch.float32), ("ct-tensor", True, torch.bfloat16),
    ("ct-channel", False, torch.bfloat16), ("ct-block", False, torch.float32)])
def test_loader_reads_hand_built_layouts(tmp_path, layout, static, scale_dtype):
    truth, tensors = hand_built(tmp_path, layout, static=static, scale_dtype=scale_dtype)
    ck = load_checkpoint(tmp_path, "cpu")
    assert ck.layout_name == layout and ck.scheme.activation_scheme == ("static" if static else "dynamic")
    for module, (codes, scale, group) in truth.items():
        w = ck.linears[module]
        assert w.group == group and torch.equal(w.weight.view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(w.scale, scale) and w.scale.dtype == torch.float32
        if static:
            assert float(w.input_scale) == float(tensors[f"{module}.input_scale"])
        else:
            assert w.input_scale is None


@pytest.mark.parametrize("layout", ["vllm-tensor", "vllm-channel", "vllm-block", "ct-block"])
def test_fused_shards_equal_unfused(tmp_path, layout):
    hand_built(tmp_path, layout)
    plain = load_checkpoint(tmp_path, "cpu")
    fused = load_checkpoint(tmp_path, "cpu", fuse=True)
    for fname, parts in {"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")}.items():
        f = fused.linears[f"model.layers.0.{fname}"]
        prefix = "self_attn" if fname.startswith("self") else "mlp"
        shards = [plain.linears[f"model.layers.0.{prefix}.{p}_proj"] for p in parts]
        want = torch.cat([dequantize_reference(w.weight, w.scale, w.group, "e4m3", torch.float64) for w in shards])
        got = dequantize_reference(f.weight, f.scale, f.group, "e4m3", torch.float64)
        assert torch.equal(got, want), f"{fname} ({f.group.name})"
        assert [rows for _, rows in f.shards] == [w.shape[0] for w in shards]
    if layout == "vllm-tensor":
        rq = load_checkpoint(tmp_path, "cpu", fuse="requant").linears["model.layers.0.self_attn.qkv_proj"]
        assert rq.group == TENSOR
        wd = dequantize_reference(rq.weight, rq.scale, TENSOR, "e4m3", torch.float64)
        f = fused.linears["model.layers.0.self_attn.qkv_proj"]
        exact = dequantize_reference(f.weight, f.scale, f.group, "e4m3", torch.float64)
        err = (wd - exact).abs()
        assert bool((err <= exact.abs() / 16 + float(rq.scale) * 2.0 ** -10 + 1e-12).all())


# ---- malformed checkpoints -------------------------------------------------------------------------------------

W = "model.layers.0.self_attn.q_proj"


def _set(name, value):
    return lambda t: t.__setitem__(name, value)


MALFORMED = {
    "missing scale": (dict(edit=lambda t: t.pop(f"{W}.weight_scale")), f"{W}.weight_scale: missing"),
    "missing weight": (dict(edit=lambda t: t.pop("model.layers.0.mlp.up_proj.weight")),
                       "model.layers.0.mlp.up_proj.weight: missing"),
    "wrong scale shape": (dict(edit=_set(f"{W}.weight_scale", torch.ones(3, 1))),
                          rf"{W}.weight_scale: shape \[3, 1\]"),
    "bf16 weight": (dict(edit=lambda t: t.__setitem__(f"{W}.weight", t[f"{W}.weight"].to(torch.bfloat16))),
                    rf"{W}.weight: dtype bfloat16, expected float8_e4m3fn"),
    "wrong weight shape": (dict(edit=lambda t: t.__setitem__(f"{W}.weight", t[f"{W}.weight"][:40].clone())),
                           rf"{W}.weight: shape \[40, 80\], the config says \[80, 80\]"),
    "nan scale": (dict(edit=_set(f"{W}.weight_scale", torch.full((80, 1), float("nan")))),
                  f"{W}.weight_scale: contains NaN"),
    "inf scale": (dict(edit=_set(f"{W}.weight_scale", torch.full((80, 1), float("inf")))),
                  f"{W}.weight_scale: contains inf"),
    "zero scale": (dict(edit=_set(f"{W}.weight_scale", torch.zeros(80, 1))), f"{W}.weight_scale: contains a zero"),
    "negative scale": (dict(edit=_set(f"{W}.weight_scale", -torch.ones(80, 1))),
                       f"{W}.weight_scale: contains a negative"),
    "int scale": (dict(edit=_set(f"{W}.weight_scale", torch.ones(80, 1, dtype=torch.int32))),
                  rf"{W}.weight_scale: dtype int32"),
    "unexpected tensor": (dict(edit=_set(f"{W}.weight_zero_point", torch.zeros(1))),
                          f"{W}.weight_zero_point: unexpected tensor"),
    "stray input scale": (dict(edit=_set(f"{W}.input_scale", torch.ones(()))),
                          rf"{W}.input_scale: unexpected tensor \(activation_scheme is dynamic\)"),
    "nan codes": (dict(edit=lambda t: t[f"{W}.weight"].view(torch.uint8).__setitem__((3, 4), 0x7F)),
                  f"{W}.weight: contains NaN codes"),
    "unknown layout": (dict(config_edit=lambda c: c["quantization_config"].__setitem__("quant_method", "gptq")),
                       "quant_method: unknown layout 'gptq'"),
    "bad block size": (dict(config_edit=lambda c: c["quantization_config"].__setitem__("weight_block_size", [96, 128])),
                       "weight_block_size: scale group rows must be"),
    "unknown model": (dict(config_edit=lambda c: c.__setitem__("model_type", "gpt2")),
                      "model_type: 'gpt2' is not a supported"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_is_refused(tmp_path, case):
    kw, message = MALFORMED[case]
    hand_built(tmp_path, "vllm-channel", **kw)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path, "cpu")


def test_static_scheme_needs_input_scales(tmp_path):
    hand_built(tmp_path, "vllm-tensor", static=True, edit=lambda t: t.pop(f"{W}.input_scale"))
    with pytest.raises(CheckpointError, match=rf"{W}.input_scale: missing \(activation_scheme is static\)"):
        load_checkpoint(tmp_path, "cpu")


def test_block_scales_with_the_wrong_grid_are_refused(tmp_path):
    hand_built(tmp_path, "deepseek-block",
               edit=lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight_scale_inv", torch.ones(1, 1)))
    with pytest.raises(CheckpointError, match=r"down_proj.weight_scale_inv: shape \[1, 1\], layout deepseek-block "
                                              r"needs \[1, 2\]"):
        load_checkpoint(tmp_path, "cpu")


def test_missing_config_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_checkpoint(tmp_path, "cpu")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        load_checkpoint(tmp_path, "cpu")


def test_load_stats_are_reported(dense):
    src, tensors = dense
    ck = load_checkpoint(src, "cpu")
    assert ck.stats.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert ck.stats.tensors == len(tensors) and ck.stats.seconds > 0
    assert ck.stats.peak_host_bytes is None and "CPU" in ck.stats.host_source  # on the CPU the model is host memory
    assert ck.stats.largest_tensor_bytes == max(t.numel() * t.element_size() for t in tensors.values())
    wide = load_checkpoint(src, "cpu", dense_dtype=torch.float64)  # the staging buffers must hold converted tensors
    assert wide.stats.largest_tensor_bytes == max(t.numel() * 8 for t in tensors.values())
    assert staged_bytes("a.weight_scale", (3, 2), torch.bfloat16, torch.float64) == 24  # scales go to float32
    assert staged_bytes("a.weight", (3, 2), torch.float8_e4m3fn, torch.float64) == 6    # codes stay codes


def test_scale_groups_reject_bad_sizes():
    with pytest.raises(ValueError, match="power of two >= 16"):
        ScaleGroup(1, 8)


@pytest.mark.parametrize("layout,shapes", [
    ("vllm-tensor", [(), (1,)]), ("ct-tensor", [(1,), ()]), ("vllm-channel", [("n", 1), ("n",)])],
    ids=["vllm-tensor-[]-[1]", "ct-tensor-[1]-[]", "vllm-channel-[N,1]-[N]"])
def test_scale_shapes_seen_in_the_wild_give_the_same_weights(tmp_path, layout, shapes):
    """Every scale shape vLLM's loader accepts for a layout loads to the same scales, group and dequantized W."""
    got = []
    for i, shape in enumerate(shapes):
        def reshape(tensors, shape=shape):
            for name in [n for n in tensors if n.endswith(".weight_scale")]:
                n = tensors[name].numel()
                tensors[name] = tensors[name].reshape(tuple(n if d == "n" else d for d in shape))

        truth, _ = hand_built(tmp_path / str(i), layout, edit=reshape)
        ck = load_checkpoint(tmp_path / str(i), "cpu")
        got.append({m: (w.group, w.scale, dequantize_reference(w.weight, w.scale, w.group, "e4m3", torch.float64))
                    for m, w in ck.linears.items()})
        assert ck.layout_name == layout
    for module, (group, scale, wd) in got[0].items():
        assert got[1][module][0] == group and torch.equal(got[1][module][1], scale), module
        assert torch.equal(got[1][module][2], wd), module


def test_kept_blocks_are_recorded_in_the_checkpoint_and_load_dense(dense, tmp_path):
    """A quality variant's kept blocks, as its ``ignore`` list, written by the quantizer into quantization_config:
    the loader reads those blocks' linears dense and quantizes the rest."""
    from impl.fp8.quality import Variant, ignore_list

    src, tensors = dense
    ignore = ignore_list(Variant("channel", "w8a16", (1,), "top1"))
    Q.quantize_checkpoint(src, tmp_path, "ct-channel", ignore=ignore, log=lambda *a: None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["ignore"] == ignore
    ck = load_checkpoint(tmp_path, "cpu")
    for module, w in ck.linears.items():
        if module.startswith("model.layers.1."):
            assert isinstance(w, torch.Tensor) and torch.equal(w, tensors[f"{module}.weight"]), module
        else:
            assert w.group == CHANNEL and w.weight.dtype == torch.float8_e4m3fn, module


@pytest.mark.parametrize("layout", ["vllm-channel", "ct-channel"])
def test_kept_linears_are_recorded_in_the_checkpoint_by_name_and_load_dense(dense, tmp_path, layout):
    """A ``lin<k>`` variant's kept linears, by full module name in the ignore list: exactly those load dense (their
    siblings in the same block, and the same projection in the other block, are quantized)."""
    from impl.fp8.quality import Variant, ignore_list

    src, tensors = dense
    kept = ("layers.0.mlp.down_proj", "layers.1.self_attn.k_proj")
    ignore = ignore_list(Variant("channel", "w8a8", policy="lin2", keep_linears=kept))
    assert ignore == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"]
    Q.quantize_checkpoint(src, tmp_path, layout, ignore=ignore, log=lambda *a: None)
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert q.get("ignore", q.get("ignored_layers")) == ignore
    ck = load_checkpoint(tmp_path, "cpu")
    dense_ones = {m for m, w in ck.linears.items() if isinstance(w, torch.Tensor)}
    assert dense_ones == {f"model.{n}" for n in kept}
    for module in dense_ones:
        assert torch.equal(ck.linears[module], tensors[f"{module}.weight"]), module


def _moments(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """A correlated input second moment [K, K] per linear (low rank plus noise), as calibration would measure."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (_, k) in spec.linears.items():
        x = torch.randn(256, 6, generator=g) @ torch.randn(6, k, generator=g) + 0.1 * torch.randn(256, k, generator=g)
        out[module] = x.double().t() @ x.double() / 256
    return out


@pytest.mark.parametrize("layout", ["vllm-tensor", "ct-channel", "deepseek-block"])
def test_gptq_checkpoint_holds_gptq_codes_with_the_nearest_scales_and_records_its_recipe(dense, tmp_path, layout):
    """moments= rounds every code with GPTQ: the codes are ``gptq_quantize``'s, the scales and the config those of a
    round-to-nearest checkpoint (every loader reads it unchanged), and fp8_recipe.json says how they were made."""
    from impl.fp8.gptq import GptqConfig, gptq_quantize

    src, tensors = dense
    spec = load_checkpoint(src, "cpu").spec
    moments = _moments(spec, 3)
    cfg = GptqConfig(block=32)
    summary = Q.quantize_checkpoint(src, tmp_path / "g", layout, moments=moments, gptq=cfg,
                                    calibration={"text": "t.txt", "tokens": 256}, **QUIET)
    Q.quantize_checkpoint(src, tmp_path / "n", layout, **QUIET)
    assert summary["rounding"] == "gptq"
    lay = LAYOUTS[layout]
    ck = load_checkpoint(tmp_path / "g", "cpu")
    moved = 0
    for module, w in ck.linears.items():
        codes, scales = gptq_quantize(tensors[f"{module}.weight"].float(), moments[module], lay.group, cfg)
        assert torch.equal(w.weight.view(torch.uint8), codes), module
        assert torch.equal(w.scale, quantize_reference(tensors[f"{module}.weight"], lay.group)[1]), module
        moved += int(not torch.equal(codes, quantize_reference(tensors[f"{module}.weight"], lay.group)[0]))
    assert moved == len(ck.linears), "GPTQ moved no code of some linear: the test cannot tell it from nearest"
    read = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in ("g", "n")]
    assert read[0] == read[1]
    recipe = json.loads((tmp_path / "g" / Q.RECIPE).read_text())
    assert recipe["rounding"] == "gptq" and recipe["gptq"] == {"damp": 0.01, "block": 32, "act_order": True,
                                                               "inputs": "dense", "placements": 1}
    assert recipe["calibration"] == {"text": "t.txt", "tokens": 256} and recipe["layout"] == layout
    assert json.loads((tmp_path / "n" / Q.RECIPE).read_text())["rounding"] == "nearest"


@pytest.mark.parametrize("layout", ["vllm-tensor", "ct-channel", "deepseek-block"])
def test_gptq_checkpoint_with_grid_placements_holds_the_searched_codes_and_scales(dense, tmp_path, layout):
    """placements = J: each linear's codes and scales are ``gptq_quantize``'s with that config (per band of rows, the
    best of the scales times 2^(j/J)), in the layout's own format (the same quantization_config as round to nearest),
    and fp8_recipe.json records J."""
    from impl.fp8.gptq import GptqConfig, gptq_quantize

    src, tensors = dense
    moments = _moments(load_checkpoint(src, "cpu").spec, 3)
    cfg = GptqConfig(block=32, placements=4)
    Q.quantize_checkpoint(src, tmp_path / "g", layout, moments=moments, gptq=cfg, **QUIET)
    Q.quantize_checkpoint(src, tmp_path / "n", layout, **QUIET)
    lay = LAYOUTS[layout]
    ck = load_checkpoint(tmp_path / "g", "cpu")
    placed = 0
    for module, w in ck.linears.items():
        codes, scales = gptq_quantize(tensors[f"{module}.weight"].float(), moments[module], lay.group, cfg)
        assert torch.equal(w.weight.view(torch.uint8), codes) and torch.equal(w.scale, scales), module
        placed += int(not torch.equal(scales, quantize_reference(tensors[f"{module}.weight"], lay.group)[1]))
    assert placed, "every linear kept amax's scales: the test cannot tell the search from plain GPTQ"
    read = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in ("g", "n")]
    assert read[0] == read[1]
    assert json.loads((tmp_path / "g" / Q.RECIPE).read_text())["gptq"]["placements"] == 4


def test_gptq_checkpoint_is_the_same_whatever_the_batch(dense, tmp_path, monkeypatch):
    """The quantizer rounds a file's linears by GPTQ in batches of at most GPTQ_BATCH_BYTES: one linear per batch
    (every weight over the cap) and all in one give bit-identical checkpoints."""
    from impl.fp8.gptq import GptqConfig

    src, _ = dense
    moments = _moments(load_checkpoint(src, "cpu").spec, 5)
    for name, cap in (("one", 1), ("all", 1 << 40)):
        monkeypatch.setattr(Q, "GPTQ_BATCH_BYTES", cap)
        Q.quantize_checkpoint(src, tmp_path / name, "vllm-channel", moments=moments, gptq=GptqConfig(block=32),
                              **QUIET)
    one, every = (load_checkpoint(tmp_path / n, "cpu").linears for n in ("one", "all"))
    assert one.keys() == every.keys() and len(one) > 1
    for module in one:
        assert torch.equal(one[module].weight.view(torch.uint8), every[module].weight.view(torch.uint8)), module
        assert torch.equal(one[module].scale, every[module].scale), module


def test_gptq_without_moments_for_every_linear_is_refused_before_writing(dense, tmp_path, capsys):
    src, _ = dense
    spec = load_checkpoint(src, "cpu").spec
    moments = _moments(spec, 4)
    missing = dict(moments)
    del missing["model.layers.1.mlp.down_proj"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj: no input moments"):
        Q.quantize_checkpoint(src, tmp_path / "a", "vllm-channel", moments=missing, **QUIET)
    wrong = {**moments, "model.layers.0.self_attn.o_proj": torch.eye(3, dtype=torch.float64)}
    with pytest.raises(CheckpointError, match=r"o_proj: input moments of shape \[3, 3\], the weight needs \[80, 80\]"):
        Q.quantize_checkpoint(src, tmp_path / "b", "vllm-channel", moments=wrong, **QUIET)
    with pytest.raises(ValueError, match="GPTQ rounding writes e4m3 codes"):
        Q.quantize_checkpoint(src, tmp_path / "c", "vllm-channel", fmt="e5m2", moments=moments, **QUIET)
    assert not any((tmp_path / d).exists() for d in "abc")
    # ignored linears need no moments
    kept = {m: h for m, h in moments.items() if not m.startswith("model.layers.1.")}
    Q.quantize_checkpoint(src, tmp_path / "d", "vllm-channel", moments=kept, ignore=["lm_head", "re:.*layers\\.1\\..*"],
                          **QUIET)
    # the CLI: a calibration text for a checkpoint without a tokenizer is a clear error, not a traceback
    (tmp_path / "t.txt").write_text("some text " * 50)
    assert Q.main([str(src), str(tmp_path / "e"), "--layout", "vllm-channel", "--calibration",
                   str(tmp_path / "t.txt")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "e").exists()
