"""Quantizer: a bf16/fp32 Hugging Face checkpoint dir -> an FP8 checkpoint dir in any layout of ``layouts``.

    python -m impl.fp8.quantize SRC DST --layout vllm-tensor|vllm-channel|vllm-block|deepseek-block|
                                                 ct-tensor|ct-channel|ct-block [--fmt e4m3|e5m2] [--backend ...]
                                                 [--calibration TEXT [--calib-tokens N] [--smooth ALPHA|auto]]

Every projection of every decoder layer (q/k/v/o, gate/up/down) is quantized with dynamic scales of the layout's
group (amax / FMAX, see ``kernels``); everything else (embeddings, norms, lm_head) is copied unchanged. Tensors are
read one at a time (with GPTQ: one input file at a time, its linears rounded in batches) and written in shards of
``--shard-mb``, so host memory stays near one shard. Files other than weights and config.json (tokenizer,
generation config) are copied. ``--backend triton`` quantizes with the Triton kernels (the default on a GPU),
``torch`` with the CPU reference, which computes the same codes and scales.

Scales: amax / FMAX per group by default; ``--scales mse`` picks per group the candidate scale with the least squared
rounding error (``impl.fp8.scales``). Rounding: to nearest by default. With ``--calibration TEXT`` (or ``moments=``
from Python: one input second moment H [K, K] per quantized linear; ``--rounding nearest`` keeps round to nearest,
e.g. to smooth only) every code is chosen by GPTQ (``impl.fp8.gptq``:
the same format, the group's scales or, with ``--gptq-placements J``, those times the best of 2^(j/J) per band of
rows, so every loader reads the checkpoint unchanged); the model in SRC is run over the text's
first ``--calib-tokens`` tokens to measure H (``--gptq-inputs rounded``: with its decoder linears rounded to nearest
in the layout's group, each layer fitted to the inputs it meets once those before it are quantized; every decoder
linear is rounded there, ``--ignore``'d ones too). ``fp8_recipe.json`` in DST records how the codes were made (scales,
rounding, GPTQ settings, calibration), as llm-compressor keeps its recipe beside a checkpoint.

Smoothing (``--smooth ALPHA|auto`` with ``--calibration``; ``smooth=`` from Python): SmoothQuant's per-channel
factors (``impl.fp8.smooth``) from the inputs' channel amax over the calibration tokens, folded into the norms, the
up_proj rows and the consumers' weights before they are rounded (GPTQ's moments transformed alike); the folded norms
are written in the checkpoint's dtype, so every loader runs the smoothed model unchanged. For W8A8: the activations'
outlier channels move into the weights (whether that helps a model is measured by the quality run's ``...-smooth``
variants); ``auto`` takes, of no smoothing and ``quality.ALPHA_GRID``, the one whose W8A8 model (rounded to nearest
in the layout's group) has the least perplexity on the calibration tokens (``quality.Smoothing.choose``). The recipe
records alpha, how it was chosen, and the sites.

DST is built in a temporary folder beside it and swapped in when complete (a failed run leaves DST as it was);
``--overwrite`` replaces only a folder this tool wrote (its manifest lists every file), and a DST that is, contains or
lies inside SRC is refused.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from impl import backend
from impl.fp8.checkpoint_io import parse_config, read_config, read_headers, safetensors_files
from impl.fp8.formats import get_format
from impl.fp8.gptq import CALIB_TOKENS, INPUTS, PLACEMENTS, GptqConfig
from impl.fp8.layouts import LAYOUTS, CheckpointError, Layout, get_layout
from impl.fp8.reference import quantize_reference
from impl.fp8.scales import SCALE_CHOICES, choose_scales
from impl.fp8.smooth import Site, fold, fold_ops, prefixed, smoothed_moments

WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")
MANIFEST = ".fp8-quantize-manifest.json"  # the files a run wrote: what --overwrite may replace
RECIPE = "fp8_recipe.json"  # how the codes were made: rounding, GPTQ settings, calibration
GPTQ_BATCH_BYTES = 1 << 30  # float32 weights per batched GPTQ call (its work arrays are a few times this)


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) one at a time, in file order."""
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def quantize_tensor(w: torch.Tensor, layout: Layout, fmt: str, backend_name: str,
                    scales: str = "amax") -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight [N, K] on the CPU, float32 scales in the layout's stored shape); ``scales="mse"``: the scales
    ``impl.fp8.scales`` chooses, the codes the reference quantizer's with them."""
    n, k = w.shape
    if scales != "amax":
        codes, s = quantize_reference(w, layout.group, fmt, scales=choose_scales(w, layout.group, fmt, scales))
        q = codes.view(get_format(fmt).dtype)
    elif backend_name == "triton":
        from impl.fp8 import quant

        x = w.to(backend.DEVICE)
        if backend.INTERPRETED and x.dtype == torch.bfloat16:
            x = x.float()  # no bf16 in the interpreter; bf16 -> fp32 is exact
        q, s = quant.quantize(x, layout.group, fmt)
        q, s = q.cpu(), s.cpu()
    else:
        codes, s = quantize_reference(w, layout.group, fmt)
        q = codes.view(get_format(fmt).dtype)
    return q.contiguous(), s.reshape(layout.stored_scale_shape(n, k)).contiguous()


def quantize_tensors_gptq(weights: list[tuple[str, torch.Tensor, torch.Tensor]], layout: Layout, cfg: GptqConfig,
                          scales: str = "amax") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``quantize_tensor``'s output (e4m3) with GPTQ-rounded codes for each (name, w [N, K], input moments h
    [K, K]): {name: (codes, scales)}. Float work on the GPU when there is one, in batches of at most
    ``GPTQ_BATCH_BYTES`` of float32 weights, each batch through ``quality.quantize_weights_gptq`` (the weights of
    one shape share one column loop; each gets the codes it gets alone)."""
    from impl.fp8.quality import quantize_weights_gptq

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    batches: list[list[tuple[str, torch.Tensor, torch.Tensor]]] = [[]]
    size = 0
    for item in weights:
        if batches[-1] and size + 4 * item[1].numel() > GPTQ_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += 4 * item[1].numel()
    for batch in filter(None, batches):
        got = quantize_weights_gptq({name: w.to(backend.DEVICE, torch.float32) for name, w, _ in batch},
                                    layout.group, {name: h for name, _, h in batch}, scales, cfg)
        for name, w, _ in batch:
            out[name] = (got[name].weight.cpu().contiguous(),
                         got[name].scale.cpu().reshape(layout.stored_scale_shape(*w.shape)).contiguous())
    return out


def check_moments(moments: dict[str, torch.Tensor], spec, ignore: list[str]) -> None:
    """Every linear to quantize has an input moment [K, K]; CheckpointError naming the first that has not."""
    for module, (_, k) in spec.linears.items():
        if spec.is_ignored(module, ignore):
            continue
        h = moments.get(module)
        if h is None:
            raise CheckpointError(f"{module}: no input moments; GPTQ needs one [K, K] matrix per quantized linear")
        if tuple(h.shape) != (k, k):
            raise CheckpointError(f"{module}: input moments of shape {list(h.shape)}, the weight needs [{k}, {k}]")


@dataclass
class SmoothRecipe:
    """What ``quantize_checkpoint`` folds in: the sites and factors s by checkpoint name (``impl.fp8.smooth``)."""

    alpha: float | None  # None: chosen, and no smoothing won (nothing is folded)
    sites: list[Site]
    factors: dict[str, torch.Tensor]
    calib_ppl: dict[str, float] = field(default_factory=dict)  # per alpha tried ("none" too), where it was chosen

    def record(self) -> dict:
        from impl.fp8.quality import CHOSEN_BY

        return {"alpha": self.alpha, "chosen_by": CHOSEN_BY if self.calib_ppl else "given",
                **({"calib_ppl": self.calib_ppl} if self.calib_ppl else {}),
                "smoothed_linears": sum(len(s.consumers) for s in self.sites),
                "sites": [{"producer": s.producer, "kind": s.kind, "consumers": list(s.consumers)} for s in self.sites]}


@dataclass
class Calibration:
    """What a calibration text gave: GPTQ's input moments and/or the smoothing, by checkpoint name."""

    moments: dict[str, torch.Tensor] | None = None
    smoothing: SmoothRecipe | None = None


@torch.no_grad()
def calibrate(src: Path, text: str, tokens: int, window: int = 1024, *, moments: bool = True,
              through: str | None = None, smooth_alpha: float | str | None = None,
              group: str = "channel") -> Calibration:
    """Over the first ``tokens`` tokens of ``text``, the model in ``src`` (and its tokenizer, loaded with
    transformers; bf16 on a GPU, float32 on the CPU): the input moments of every decoder linear (``moments``;
    ``through`` a scale group ("tensor", "channel", "block"): measured with every decoder linear rounded to nearest
    in it, ``GptqConfig.inputs`` "rounded"; ``quality.input_moments``), and with ``smooth_alpha`` the smoothing
    factors from the sites' input channel amax (``quality.Smoothing``; "auto": alpha chosen for W8A8 in scale group
    ``group``); the moments are the unsmoothed model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from impl.fp8 import quality

    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(text, add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < min(tokens, window):
        raise ValueError(f"the calibration text has {len(ids)} tokens; at least {min(tokens, window)} needed")
    dtype = torch.bfloat16 if backend.DEVICE == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(backend.DEVICE).eval()
    bos = tok.bos_token_id if tok("x").input_ids[:1] == [tok.bos_token_id] else None
    ids, window = torch.tensor(ids), min(window, len(ids))
    out = Calibration()
    if moments:
        h = quality.input_moments(model, ids, window=window, bos=bos, through=through)
        out.moments = {f"model.{name}": m for name, m in h.items()}
    if smooth_alpha is not None:
        sm = quality.Smoothing.measure(model, ids, window=window, bos=bos)
        alpha, grid = (sm.choose(model, ids, group, window=window, batch=1, bos=bos) if smooth_alpha == "auto"
                       else (smooth_alpha, {}))
        sites, factors = prefixed(sm.sites, sm.factors(alpha), "model.") if alpha is not None else ([], {})
        out.smoothing = SmoothRecipe(alpha, sites, factors, calib_ppl=grid)
    return out


class ShardWriter:
    """Collects tensors and writes ``model-0000i-of-0000n.safetensors`` shards of about ``shard_bytes``."""

    def __init__(self, dst: Path, shard_bytes: int) -> None:
        self.dst, self.shard_bytes = dst, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        i = len(self.shards)
        save_file(self.pending, str(self.dst / f"shard-{i:05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, keys in enumerate(self.shards):
            (self.dst / f"shard-{i:05d}.tmp").rename(self.dst / names[i])
            weight_map.update({k: names[i] for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def check_folders(src: Path, dst: Path) -> None:
    """Refuse a DST that is SRC, contains it or lies inside it (symlinks resolved), or is not a folder."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise CheckpointError(f"DST {dst} is SRC {src}: write the FP8 checkpoint to another folder")
    if s.is_relative_to(d):
        raise CheckpointError(f"DST {dst} contains SRC {src}: write the FP8 checkpoint to a folder of its own")
    if d.is_relative_to(s):
        raise CheckpointError(f"DST {dst} lies inside SRC {src}: write the FP8 checkpoint outside the source")
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise FileExistsError(f"{dst} exists and is not a folder (a file or a symlink): give a folder's own path")


def written_by_us(dst: Path) -> set[str]:
    """Names the manifest of an earlier run in ``dst`` lists (empty when there is none or it is unreadable)."""
    try:
        names = json.loads((dst / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    if not isinstance(names, list):
        return set()
    return {n for n in names if isinstance(n, str)} | {MANIFEST}


def must_replace(dst: Path, overwrite: bool) -> bool:
    """True when ``dst`` holds an earlier output to replace; FileExistsError when it holds anything else."""
    present = sorted(p.name for p in dst.iterdir()) if dst.exists() else []
    if not present:
        return False
    if not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass overwrite=True (--overwrite)")
    foreign = [n for n in present if n not in written_by_us(dst) or (dst / n).is_dir()]
    if foreign:
        raise FileExistsError(f"{dst} holds {', '.join(foreign[:5])}{' and more' if len(foreign) > 5 else ''}, "
                              "which this tool did not write: --overwrite replaces only a folder written by "
                              "python -m impl.fp8.quantize (move those files or choose another DST)")
    return True


def quantize_checkpoint(src: str | Path, dst: str | Path, layout: str, *, fmt: str = "e4m3",
                        backend_name: str = "auto", shard_mb: float = 2048, ignore: list[str] | None = None,
                        overwrite: bool = False, moments: dict[str, torch.Tensor] | None = None,
                        gptq: GptqConfig | None = None, calibration: dict | None = None, scales: str = "amax",
                        smooth: SmoothRecipe | None = None, log=print) -> dict:
    """Write an FP8 checkpoint of ``src`` to ``dst`` in ``layout``; returns a summary (tensors, bytes, seconds).

    ``moments`` (module name -> input second moment [K, K]) selects GPTQ rounding (``gptq``: its settings; e4m3
    only); ``calibration`` (what the moments were measured on) is recorded in ``fp8_recipe.json`` beside them.
    ``scales``: "amax" (amax / FMAX per group) or "mse" (``impl.fp8.scales``), recorded there too. ``smooth``: the
    smoothing folded in before rounding (module doc); ``moments`` are then the *unsmoothed* model's, transformed
    here as the inputs are.

    The output is written into a temporary folder beside ``dst`` and swapped in when complete, so a failed run
    leaves ``dst`` as it was. ``overwrite`` replaces an earlier output of this tool (the files its manifest lists)
    and nothing else; a ``dst`` that is, contains or lies inside ``src`` is refused.
    """
    src, dst, lay = Path(src), Path(dst), get_layout(layout)
    get_format(fmt)
    if backend_name == "auto":
        backend_name = "triton" if backend.ON_GPU and not backend.INTERPRETED else "torch"
    if backend_name not in ("triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend_name!r}")
    check_folders(src, dst)
    config = read_config(src)
    if config.get("quantization_config"):
        raise CheckpointError(f"{src}/config.json already has a quantization_config: quantize a bf16/fp32 checkpoint")
    files = safetensors_files(src)
    entries = read_headers(files)
    spec, _ = parse_config(src / "config.json", config, entries)
    ignore = list(ignore if ignore is not None else ["lm_head"])
    if moments is not None:
        if get_format(fmt).name != "e4m3":
            raise ValueError(f"GPTQ rounding writes e4m3 codes, got fmt {fmt!r}")
        check_moments(moments, spec, ignore)
        gptq = gptq or GptqConfig()
    if scales not in SCALE_CHOICES:
        raise ValueError(f"scales must be one of {SCALE_CHOICES}, got {scales!r}")
    ops = fold_ops(smooth.sites, smooth.factors) if smooth is not None else {}
    for name in ops:  # every tensor the smoothing folds into, before writing anything
        if name not in entries and not name.endswith(".bias"):
            raise CheckpointError(f"{name}: the smoothing folds into it, but {src} has no such tensor")
    if smooth is not None and moments is not None:
        moments = smoothed_moments(moments, smooth.sites, smooth.factors)
    recipe = {"rounding": "nearest" if moments is None else "gptq", "scales": scales,
              **({"gptq": asdict(gptq)} if moments is not None else {}),
              **({"smooth": smooth.record()} if smooth is not None else {}),
              **({"calibration": calibration or {}} if moments is not None or smooth is not None else {})}
    for module, shape in spec.linears.items():  # every weight to quantize, from the headers, before writing anything
        e = entries.get(f"{module}.weight")
        if e is None:
            raise CheckpointError(f"{module}.weight: missing in {src}")
        if e.shape != shape or e.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise CheckpointError(f"{module}.weight: {str(e.dtype).replace('torch.', '')} {list(e.shape)} in "
                                  f"{e.file}; the config needs a float32/float16/bfloat16 {list(shape)}")
    replace = must_replace(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        summary = _write(src, tmp, files, spec, lay, fmt, backend_name, shard_mb, ignore, config, log,
                         moments, gptq, recipe, ops)
        if replace:
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
            dst.rename(old / dst.name)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            if dst.exists():
                dst.rmdir()  # empty (checked above)
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    smoothed = f"smoothed (alpha {smooth.alpha:g}), " if smooth is not None and smooth.alpha is not None else ""
    log(f"wrote {dst} ({lay.name}, {summary['quantized_linears']} FP8 linears, {smoothed}"
        f"{recipe['rounding']} rounding, {summary['bytes'] / 1e6:.1f} MB in {len(summary['files'])} file(s), "
        f"{summary['seconds']:.1f} s, backend {backend_name})")
    return summary


def _module_to_quantize(name: str, t: torch.Tensor, spec, ignore: list[str]) -> str | None:
    """The decoder linear whose weight tensor ``name`` is, if it is quantized, else None (CheckpointError if its shape
    is not the config's)."""
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    if module not in spec.linears or spec.is_ignored(module, ignore):
        return None
    if tuple(t.shape) != spec.linears[module]:
        raise CheckpointError(f"{name}: shape {tuple(t.shape)}, config says {spec.linears[module]}")
    return module


def _write(src: Path, out: Path, files: list[Path], spec, lay: Layout, fmt: str, backend_name: str, shard_mb: float,
           ignore: list[str], config: dict, log, moments: dict[str, torch.Tensor] | None, gptq: GptqConfig | None,
           recipe: dict, ops: dict[str, list]) -> dict:
    """The FP8 checkpoint into the (empty) folder ``out``, its manifest last; ``ops``: the smoothing's folds."""
    t0 = time.perf_counter()
    writer = ShardWriter(out, int(shard_mb * (1 << 20)))
    nq = 0
    for path in files:
        folded = ((name, fold(t, ops[name]) if name in ops else t) for name, t in iter_tensors([path]))
        tensors = ((name, t, _module_to_quantize(name, t, spec, ignore)) for name, t in folded)
        if moments is not None:  # GPTQ: the file's linears rounded in batches, so the file is held, not a tensor
            tensors = list(tensors)
            coded = quantize_tensors_gptq([(n, t, moments[m]) for n, t, m in tensors if m], lay, gptq,
                                          recipe["scales"])
        for name, t, module in tensors:
            if module is None:
                writer.add(name, t)
                continue
            q, s = coded[name] if moments is not None else quantize_tensor(t, lay, fmt, backend_name, recipe["scales"])
            writer.add(name, q)
            writer.add(f"{module}.{lay.scale_name}", s)
            nq += 1
            if nq % 20 == 0:
                log(f"  quantized {nq} linears ({time.perf_counter() - t0:.1f} s)")
    names = writer.close()
    for p in src.iterdir():
        if p.is_file() and p.name not in ("config.json", MANIFEST) and not any(p.match(g) for g in WEIGHT_FILES):
            shutil.copy2(p, out / p.name)
    config = {**config, "quantization_config": lay.quantization_config(fmt, ignore)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / RECIPE).write_text(json.dumps({"tool": "python -m impl.fp8.quantize", "layout": lay.name,
                                          "fmt": get_format(fmt).name, "ignore": ignore, **recipe}, indent=2) + "\n")
    written = sorted(p.name for p in out.iterdir())
    (out / MANIFEST).write_text(json.dumps({"tool": "python -m impl.fp8.quantize", "files": written}) + "\n")
    return {"layout": lay.name, "fmt": get_format(fmt).name, "backend": backend_name, "quantized_linears": nq,
            "rounding": recipe["rounding"],
            "bytes": writer.total, "files": names, "seconds": time.perf_counter() - t0}


def float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.fp8.quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="bf16/fp32 Hugging Face checkpoint dir (config.json + safetensors)")
    p.add_argument("dst", help="output dir")
    p.add_argument("--layout", required=True, choices=list(LAYOUTS))
    p.add_argument("--fmt", default="e4m3", choices=["e4m3", "e5m2"])
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--shard-mb", type=float, default=2048)
    p.add_argument("--ignore", nargs="*", default=None, help="modules kept unquantized (default: lm_head)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--calibration", type=Path, help="UTF-8 text: round the codes with GPTQ, moments measured on it")
    p.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS, help="tokens of --calibration used")
    p.add_argument("--gptq-inputs", default=GptqConfig().inputs, choices=list(INPUTS),
                   help="GPTQ's input moments: of the dense model, or of the model rounded to nearest")
    p.add_argument("--gptq-placements", type=int, default=PLACEMENTS, metavar="J",
                   help="GPTQ at J grid placements, each band of rows sharing scales keeping its best")
    p.add_argument("--scales", default="amax", choices=list(SCALE_CHOICES),
                   help="amax: amax / FMAX per group; mse: the candidate with the least squared rounding error")
    p.add_argument("--rounding", default="gptq", choices=["gptq", "nearest"],
                   help="with --calibration: GPTQ (default) or round to nearest (e.g. to smooth only)")
    p.add_argument("--smooth", metavar="ALPHA",
                   help="fold SmoothQuant's factors in, with this alpha (0..1) or 'auto' (chosen on the calibration "
                        "text for W8A8 in the layout's group); needs --calibration")
    a = p.parse_args(argv)
    try:
        cal = Calibration()
        calibration = None
        if a.smooth is not None and a.calibration is None:
            raise ValueError("--smooth needs --calibration: the factors come from the inputs' channel amax on it")
        smooth_alpha = a.smooth if a.smooth in (None, "auto") else float_or_nan(a.smooth)
        if smooth_alpha not in (None, "auto") and not 0 <= smooth_alpha <= 1:
            raise ValueError(f"--smooth takes an alpha in [0, 1] or 'auto', got {a.smooth!r}")
        if a.calibration is not None:
            if a.calib_tokens < 1:
                raise ValueError(f"--calib-tokens must be >= 1, got {a.calib_tokens}")
            from impl.fp8.quality import group_of

            group = group_of(LAYOUTS[a.layout])
            cal = calibrate(Path(a.src), a.calibration.read_text(encoding="utf-8"), a.calib_tokens,
                            moments=a.rounding == "gptq", through=group if a.gptq_inputs == "rounded" else None,
                            smooth_alpha=smooth_alpha, group=group)
            calibration = {"text": a.calibration.name, "tokens": a.calib_tokens}  # the inputs: the recipe's gptq
        quantize_checkpoint(a.src, a.dst, a.layout, fmt=a.fmt, backend_name=a.backend, shard_mb=a.shard_mb,
                            ignore=a.ignore, overwrite=a.overwrite, moments=cal.moments, calibration=calibration,
                            scales=a.scales, gptq=GptqConfig(inputs=a.gptq_inputs, placements=a.gptq_placements),
                            smooth=cal.smoothing)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
