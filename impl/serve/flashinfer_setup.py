"""Bring flashinfer to the GPU machine, which has no network: the wheels travel in pieces, then install there.

  plan                                  the wheels, their sizes and why each is needed (what the image lacks)
  download --out .carry/flashinfer      here: ``pip download`` of exactly those wheels (cp312, manylinux x86_64)
  split    --src .carry/flashinfer --out .carry/fiparts [--chunk-mb 40]
                                        here: tar + cut into fi_part_NN/blob pieces, one per device call
  install  --parts /tmp/lab_parts --target /tmp/fisite
                                        there: join the fi_part_* pieces, ``pip install --no-index --no-deps``
                                        into --target, then import flashinfer (``site.addsitedir``: the CuTe
                                        DSL's .pth file must run; ``flashinfer_check --site`` does the same)

On the device, one call per piece: ``bash .ci/gpu/stash_part.sh .carry/fiparts/fi_part_NN`` (carrying that piece;
the machine keeps /tmp only while it stays warm, ~30 s between calls); the last call installs and measures
(``python3 -m impl.serve.flashinfer_check``). The ``fi_`` prefix keeps these pieces apart from kvstitch's ``part_*``
in the same stash folder. Dependencies of flashinfer-python 0.7.4 the GPU image already has (torch, numpy, click,
einops, ninja, nvidia-ml-py, packaging, requests, tabulate, tqdm, cuda-bindings, jinja2, filelock) are not carried;
nccl4py and nccl-extensions serve flashinfer's communication kernels only (not imported by ``import flashinfer`` nor
by its attention wrappers), so they stay behind; if the import asks for one, the install step prints which.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from impl.kvstitch.prepare import PIECE_MB

# (requirement, wheel file name, bytes): pip download --no-deps --only-binary=:all: --python-version 3.12
WHEELS = (
    ("flashinfer-python==0.7.4", "flashinfer_python-0.7.4-py3-none-any.whl", 101_294_319),
    ("nvidia-cutlass-dsl-libs-cu13==4.8.1",
     "nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl", 91_954_433),
    ("nvidia-cudnn-frontend==1.32.0",
     "nvidia_cudnn_frontend-1.32.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", 11_619_860),
    ("apache-tvm-ffi==0.1.15.post2",
     "apache_tvm_ffi-0.1.15.post2-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", 3_312_304),
    ("nvidia-cutlass-dsl-libs-base==4.8.1",
     "nvidia_cutlass_dsl_libs_base-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl", 3_050_567),
    ("nvidia-cutlass-dsl-libs-core==4.8.1", "nvidia_cutlass_dsl_libs_core-4.8.1-py3-none-any.whl", 1_635_096),
    ("cuda-tile==1.7.0", "cuda_tile-1.7.0-cp312-cp312-manylinux2014_x86_64.whl", 426_980),
    ("nvidia-cutlass-dsl==4.8.1", "nvidia_cutlass_dsl-4.8.1-py3-none-any.whl", 10_510),
)
WHY = {
    "flashinfer-python": "the library (pure Python + CUDA sources it JIT-compiles with nvcc on first use)",
    "nvidia-cutlass-dsl-libs-cu13": "the CuTe DSL's MLIR runtime for CUDA 13 (``import flashinfer`` imports cutlass)",
    "nvidia-cudnn-frontend": "``cudnn``, imported at module level by flashinfer.gemm",
    "apache-tvm-ffi": "flashinfer's FFI to its compiled kernels",
    "nvidia-cutlass-dsl-libs-base": "the ``cutlass`` Python package",
    "nvidia-cutlass-dsl-libs-core": "required by libs-base",
    "cuda-tile": "a declared dependency (cuTile kernels)",
    "nvidia-cutlass-dsl": "the meta package whose .pth puts the DSL packages on the path",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux2014_x86_64",
             "manylinux_2_17_x86_64")
PREFIX = "fi_"


def plan_lines() -> list[str]:
    total = sum(b for _, _, b in WHEELS)
    lines = [f"{req:40} {b / 2**20:7.1f} MiB  {WHY[req.split('==')[0]]}" for req, _, b in WHEELS]
    pieces = -(-total // (PIECE_MB << 20))
    lines.append(f"{'total':40} {total / 2**20:7.1f} MiB ({total} bytes): {pieces} pieces of <= {PIECE_MB} MiB, "
                 "one per device call, plus the call that installs and measures")
    return lines


def download(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           *[a for p in PLATFORMS for a in ("--platform", p)], "--platform", "any", "-d", str(out),
           *[req for req, _, _ in WHEELS]]
    subprocess.run(cmd, check=True)
    missing = [name for _, name, _ in WHEELS if not (out / name).exists()]
    if missing:
        raise FileNotFoundError(f"pip download did not produce {missing}")
    return [out / name for _, name, _ in WHEELS]


def split(src: Path, out: Path, chunk_mb: int) -> list[Path]:
    """kvstitch's tar + cut, with the pieces named fi_part_NN."""
    from impl.kvstitch.prepare import split as cut

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        parts = cut(src, Path(tmp), chunk_mb)
        out.mkdir(parents=True, exist_ok=True)
        named = []
        for p in parts:
            dst = out / f"{PREFIX}{p.name}"
            p.rename(dst)
            named.append(dst)
    return named


def install(parts: Path, target: Path) -> Path:
    """Join the fi_part_* pieces under ``parts`` and pip-install the wheels into ``target`` (no index, no deps)."""
    from impl.kvstitch.prepare import join

    pieces = sorted(p for p in parts.glob(f"{PREFIX}part_*") if (p / "blob").exists())
    if not pieces:
        raise FileNotFoundError(f"no {PREFIX}part_NN/blob under {parts}")
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / "parts"
        view.mkdir()
        for p in pieces:  # kvstitch's join reads part_NN: link the pieces under those names
            (view / p.name[len(PREFIX):]).symlink_to(p.resolve())
        joined = join(view, Path(tmp) / "wheels")
        wheels = sorted(joined.rglob("*.whl"))
        have = {w.name for w in wheels}
        missing = [name for _, name, _ in WHEELS if name not in have]
        if missing:
            raise FileNotFoundError(f"the joined pieces lack {missing} (a piece missing or out of order?)")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(target), *map(str, wheels)], check=True)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.serve.flashinfer_setup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan")
    d = sub.add_parser("download")
    d.add_argument("--out", default=".carry/flashinfer")
    s = sub.add_parser("split")
    s.add_argument("--src", default=".carry/flashinfer")
    s.add_argument("--out", default=".carry/fiparts")
    s.add_argument("--chunk-mb", type=int, default=PIECE_MB)
    i = sub.add_parser("install")
    i.add_argument("--parts", default="/tmp/lab_parts")
    i.add_argument("--target", default="/tmp/fisite")
    a = p.parse_args(argv)
    if a.cmd == "plan":
        print("\n".join(plan_lines()))
    elif a.cmd == "download":
        print("\n".join(str(w) for w in download(Path(a.out))))
    elif a.cmd == "split":
        parts = split(Path(a.src), Path(a.out), a.chunk_mb)
        print(f"{len(parts)} pieces; carry one per call: " + " ".join(str(x) for x in parts))
    else:
        target = install(Path(a.parts), Path(a.target))
        import site

        site.addsitedir(str(target))  # also runs its .pth files (the CuTe DSL puts its packages on the path so)
        try:
            import flashinfer

            print(f"installed into {target}: flashinfer {flashinfer.__version__}")
        except Exception as e:  # say exactly what the import lacks; the measurement records the same
            print(f"installed into {target}, but `import flashinfer` fails: {type(e).__name__}: {e}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
