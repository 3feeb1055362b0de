"""Public entry points of fp8 and kvstitch given the wrong kind of array: numpy arrays (in either byte order), wrong
dtypes and shapes are refused with a message that says what was expected; nothing is computed from misread bytes.
(The serving engine's prompts are covered in test_faults_serve.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from impl import backend
from impl.fp8 import linear, quant
from impl.fp8.reference import dequantize_reference, quantize_reference

DEV = backend.DEVICE
ARRAYS = [np.ones((2, 16), dtype="<f4"), np.ones((2, 16), dtype=">f4"), np.ones((2, 16), dtype=">f2")]


@pytest.mark.parametrize("x", ARRAYS, ids=lambda a: a.dtype.str)
def test_fp8_entry_points_refuse_numpy_arrays(x):
    codes = torch.zeros(2, 16, dtype=torch.uint8, device=DEV)
    scales = torch.ones(1, dtype=torch.float32, device=DEV)
    calls = {"quantize": lambda: quant.quantize(x), "quantize_weight": lambda: linear.quantize_weight(x),
             "dequantize codes": lambda: quant.dequantize(x.view(np.uint8)[:, :16], scales, fmt="e4m3"),
             "dequantize scales": lambda: quant.dequantize(codes, np.ones(1, dtype=">f4"), fmt="e4m3"),
             "static scales": lambda: quant.quantize(torch.ones(2, 16, device=DEV), scales=np.ones(1, dtype=">f4")),
             "quantize_reference": lambda: quantize_reference(x),
             "dequantize_reference": lambda: dequantize_reference(x.view(np.uint8)[:, :16], torch.ones(1))}
    for name, call in calls.items():
        with pytest.raises(TypeError, match="torch.Tensor") as e:
            call()
        assert "numpy" in str(e.value), name


def test_fp8_reference_refuses_wrong_dtypes_and_shapes():
    with pytest.raises(TypeError, match="floating"):
        quantize_reference(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        quantize_reference(torch.ones(2, 3, 16))
    with pytest.raises(TypeError, match="codes"):
        dequantize_reference(torch.ones(2, 16), torch.ones(1))


def test_fp8_linear_refuses_numpy_activations():
    w = linear.quantize_weight(torch.randn(8, 16, device=DEV))
    layer = linear.Fp8Linear(w, compute_dtype=torch.float32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(np.ones((2, 16), dtype=">f4"))
    with pytest.raises(ValueError, match="16"):
        layer(torch.ones(2, 15, device=w.weight.device))


def test_kvstitch_entry_points_refuse_numpy_and_wrong_dtypes():
    from impl.kvstitch.hybrid import check_prompt, generate_alone
    from impl.kvstitch.models import TinySpec, prefill, tiny_model
    from impl.kvstitch.stitch import StitchBundle

    m = tiny_model(TinySpec(layers=1, vocab=32))
    ids = np.array([[1, 2, 3]], dtype=">i8")
    with pytest.raises(TypeError, match="torch.Tensor"):
        generate_alone(m, ids, 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_prompt(ids, 32)
    with pytest.raises(ValueError, match="int64"):
        check_prompt(torch.tensor([[1.0, 2.0]]), 32)
    bundle = StitchBundle(m.config, m.config)
    kv = prefill(m, torch.tensor([[1, 2, 3]]))[0]
    bad = [(k.numpy().astype(">f4"), v) for k, v in kv]
    with pytest.raises(TypeError, match="torch.Tensor"):
        bundle(bad)
    with pytest.raises(TypeError, match="floating"):
        bundle([(k.to(torch.int32), v) for k, v in kv])
    assert len(bundle(kv)) == 1


def test_a_stitch_bundle_with_a_dtype_that_is_not_one_is_refused(tmp_path):
    import json

    from impl.kvstitch.models import TinySpec, tiny_model
    from impl.kvstitch.stitch import StitchBundle

    m = tiny_model(TinySpec(layers=1, vocab=32))
    d = StitchBundle(m.config, m.config).save(tmp_path / "s")
    assert StitchBundle.load(d).layers[0].k_map.weight.dtype == torch.float32
    meta = json.loads((d / "stitch.json").read_text())
    for bad in ("torch.load", "int64", "nonsense"):
        (d / "stitch.json").write_text(json.dumps({**meta, "dtype": bad}))
        with pytest.raises(ValueError, match="stitch.json: dtype"):
            StitchBundle.load(d)
