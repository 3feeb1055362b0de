"""Streaming, validating loader: FP8 checkpoint dir -> weights on the device in the kernels' layout.

Order of work:
  1. config.json, index.json and the safetensors headers read and bounded by ``checkpoint_io`` (no data; the files
     confined to the folder), then config.json -> ``ModelSpec`` (every tensor and shape, its sizes bounded by what
     the files hold) and ``QuantScheme`` (layout, format, activations);
  2. every header name, shape and dtype checked against them: missing and unexpected tensors, wrong shapes, wrong
     dtypes, scale shapes of the layout; all before a byte of data is read;
  3. each file's data section read in large parallel chunks through two reused pinned buffers, each chunk copied to
     the device while the next is read (``staging``), so host memory is two chunks, never the model; tensors are
     views of the device copy; values checked on the device with one sync at the end (scales finite and > 0, FP8
     weights free of NaN codes); a progress bar on stderr for loads that take over a second;
  4. optionally fused: q/k/v -> qkv_proj and gate/up -> gate_up_proj, with per-shard scales kept exactly (per-tensor
     shards -> per-channel scales; block shards whose rows don't align to the block -> 1 x bk row groups) or, with
     ``fuse="requant"``, per-tensor shards requantized to their largest scale (vLLM's choice, one scale per matrix).

Every refusal is a ``CheckpointError`` whose message starts with the tensor (or the file and config key), says the
problem and names the file (or, for a missing tensor, the folder).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from impl import backend
from impl.fp8.checkpoint_io import Entry, parse_config, read_config, read_headers, safetensors_files
from impl.fp8.formats import CHANNEL, TENSOR, ScaleGroup, get_format
from impl.fp8.layouts import FUSED, CheckpointError, ModelSpec, QuantScheme
from impl.fp8.linear import Fp8Weight
from impl.fp8.staging import HostMemory, Stager, data_section, tensor_view

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class LoadStats:
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    largest_tensor_bytes: int = 0
    peak_host_bytes: int | None = None  # staging.HostMemory.peak for a device load; None on the CPU (the model
    host_source: str = ""               # itself is host memory there)
    rss_growth_bytes: int | None = None
    staging_bytes: int = 0
    pinned_bytes: int = 0
    chunk_bytes: int = 0
    threads: int = 0
    staging: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


@dataclass
class LoadedCheckpoint:
    """Weights on the device: FP8 linears as ``Fp8Weight`` (dense ``torch.Tensor`` for unquantized ones)."""

    path: Path
    config: dict[str, Any]
    spec: ModelSpec
    scheme: QuantScheme
    layout_name: str
    linears: dict[str, Fp8Weight | torch.Tensor] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: LoadStats = field(default_factory=LoadStats)


# ---- step 2: names, shapes, dtypes from the headers (read and bounded by ``checkpoint_io``) -----------------------

def _folder(entries: dict[str, Entry]) -> str:
    """' in <checkpoint folder>', for messages about a tensor that is not in any file."""
    return f" in {next(iter(entries.values())).file.parent}" if entries else ""


def _scale_group(scheme: QuantScheme, name: str, e: Entry, n: int, k: int) -> ScaleGroup:
    """The scale group a stored scale tensor encodes; CheckpointError if its shape fits no layout."""
    lay, shape = scheme.layout, e.shape
    assert lay is not None
    if scheme.vllm_scales_from_tensors:  # vLLM "fp8" without weight_block_size: per-tensor or per-channel
        if math.prod(shape) == 1 and len(shape) <= 1:
            return TENSOR
        if shape in ((n, 1), (n,)):
            return CHANNEL
        raise CheckpointError(f"{name}: shape {list(shape)} is neither per-tensor ([] or [1]) nor per-channel "
                              f"([{n}, 1]) for a [{n}, {k}] weight (in {e.file})")
    want = lay.stored_scale_shape(n, k)
    ok = shape == want or (lay.group == TENSOR and math.prod(shape) == 1 and len(shape) <= 1)
    if not ok:
        raise CheckpointError(f"{name}: shape {list(shape)}, layout {lay.name} needs {list(want)} for a [{n}, {k}] "
                              f"weight ({lay.group.name} scales, in {e.file})")
    return lay.group


def _layout_label(scheme: QuantScheme, entries: dict[str, Entry], sname: str, n: int, k: int) -> str:
    """The layout's name as the stored scale shows it (vLLM "fp8" files say tensor or channel only by shape)."""
    assert scheme.layout is not None
    if not scheme.vllm_scales_from_tensors:
        return scheme.layout.name
    if sname in entries:
        try:
            return f"vllm-{_scale_group(scheme, sname, entries[sname], n, k).name}"
        except CheckpointError:
            pass
    return "vllm-tensor or vllm-channel"


def plan(spec: ModelSpec, scheme: QuantScheme, entries: dict[str, Entry]) -> dict[str, Any]:
    """Check every header against the spec; returns the scale group of each quantized linear (by module name)."""
    expected: dict[str, str] = {}
    groups: dict[str, ScaleGroup] = {}
    fp8 = get_format(scheme.fmt).dtype
    for name, shape in {**spec.dense, **spec.biases}.items():
        _expect(entries, name, shape, FLOAT_DTYPES)
        expected[name] = "dense"
    for module, (n, k) in spec.linears.items():
        wname = f"{module}.weight"
        quantized = scheme.layout is not None and not spec.is_ignored(module, scheme.ignore)
        if not quantized:
            _expect(entries, wname, (n, k), FLOAT_DTYPES)
            expected[wname] = "dense"
            continue
        sname = f"{module}.{scheme.layout.scale_name}"
        label = _layout_label(scheme, entries, sname, n, k)
        _expect(entries, wname, (n, k), (fp8,), hint=f"layout {label} stores FP8 weights")
        if sname not in entries:
            raise CheckpointError(f"{sname}: missing (layout {label} needs a scale for {wname}){_folder(entries)}")
        _expect(entries, sname, None, FLOAT_DTYPES)
        groups[module] = _scale_group(scheme, sname, entries[sname], n, k)
        expected[wname], expected[sname] = "weight", "scale"
        iname = f"{module}.input_scale"
        if scheme.activation_scheme == "static":
            if iname not in entries:
                raise CheckpointError(f"{iname}: missing (activation_scheme is static){_folder(entries)}")
            _expect(entries, iname, None, FLOAT_DTYPES)
            if math.prod(entries[iname].shape) != 1:
                raise CheckpointError(f"{iname}: shape {list(entries[iname].shape)}, a static input scale is one "
                                      f"value (in {entries[iname].file})")
            expected[iname] = "input_scale"
    extra = sorted(set(entries) - set(expected))
    if extra:
        why = ("activation_scheme is dynamic" if extra[0].endswith(".input_scale")
               else f"layout {_layout_name(scheme, groups)} has no such tensor")
        raise CheckpointError(f"{extra[0]}: unexpected tensor ({why}) in {entries[extra[0]].file}; {len(extra)} "
                              "unexpected in all")
    return groups


def _expect(entries: dict[str, Entry], name: str, shape: tuple[int, ...] | None, dtypes: tuple, hint: str = "") -> None:
    if name not in entries:
        raise CheckpointError(f"{name}: missing{_folder(entries)}")
    e = entries[name]
    if shape is not None and e.shape != tuple(shape):
        raise CheckpointError(f"{name}: shape {list(e.shape)}, the config says {list(shape)} (in {e.file})")
    if e.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise CheckpointError(f"{name}: dtype {str(e.dtype).replace('torch.', '')}, expected {want}"
                              + (f" ({hint})" if hint else "") + f" (in {e.file})")


# ---- step 3: stream to the device ----------------------------------------------------------------------------

def staged_bytes(name: str, shape: tuple[int, ...], dtype: torch.dtype, dense_dtype: torch.dtype | None) -> int:
    """Bytes a tensor takes on its way to the device, after the loader's conversion (scales to float32, float
    weights to ``dense_dtype``): what the pinned staging buffers must hold."""
    if name.endswith((".weight_scale", ".weight_scale_inv", ".input_scale")):
        dtype = torch.float32
    elif dense_dtype is not None and dtype in FLOAT_DTYPES:
        dtype = dense_dtype
    return math.prod(shape) * dtype.itemsize


def _check_scale_values(name: str, s: torch.Tensor) -> None:
    sf = s.float()
    if torch.isnan(sf).any():
        raise CheckpointError(f"{name}: contains NaN")
    if torch.isinf(sf).any():
        raise CheckpointError(f"{name}: contains inf")
    if (sf <= 0).any():
        bad = sf.reshape(-1)[(sf.reshape(-1) <= 0).nonzero()[0]].item()
        raise CheckpointError(f"{name}: contains a {'zero' if bad == 0 else 'negative'} scale ({bad})")


def load_checkpoint(path: str | Path, device: str | torch.device | None = None, *, fuse: bool | str = False,
                    dense_dtype: torch.dtype | None = None, pinned: bool = True, check_weights: bool = True,
                    threads: int | None = None, chunk_bytes: int | None = None,
                    progress: bool | None = None) -> LoadedCheckpoint:
    """Load, validate and place a checkpoint (FP8 in any layout of ``layouts``, or unquantized).

    ``fuse``: False, True/"exact" (per-shard scales kept exactly) or "requant" (per-tensor shards requantized to
    their largest scale). ``dense_dtype`` casts unquantized tensors (default: as stored). ``check_weights`` scans
    FP8 weights for NaN codes on the device. ``threads`` parallel reads of ``chunk_bytes`` chunks (default: up to
    ``staging.READ_THREADS``; half the largest tensor, between 1 and 64 MiB); ``progress``: True/False, or None for a
    bar on stderr when the load takes over a second.
    """
    path = Path(path)
    device = torch.device(device or backend.DEVICE)
    config = read_config(path)
    entries = read_headers(safetensors_files(path))
    spec, scheme = parse_config(path / "config.json", config, entries)
    groups = plan(spec, scheme, entries)
    stats = LoadStats(staging="pinned" if device.type == "cuda" and pinned else
                      ("pageable" if device.type == "cuda" else "none (CPU)"))
    stats.largest_tensor_bytes = max((staged_bytes(n, e.shape, e.dtype, dense_dtype) for n, e in entries.items()),
                                     default=0)
    files = sorted({e.file for e in entries.values()})
    placed, flags = _stream(files, entries, device, stats, dense_dtype=dense_dtype, pinned=pinned,
                            check_weights=check_weights, threads=threads, chunk_bytes=chunk_bytes,
                            progress=progress, label=path.name)
    bad = torch.stack([f for _, f in flags]).cpu().tolist() if flags else []
    for (name, _), flag in zip(flags, bad):
        if flag:
            if name.endswith((".weight_scale", ".weight_scale_inv", ".input_scale")):
                _check_scale_values(name, placed[name])
            raise CheckpointError(f"{name}: contains NaN codes (FP8 weights must be finite)")
    loaded = LoadedCheckpoint(path, config, spec, scheme, _layout_name(scheme, groups), stats=stats)
    for name in {**spec.dense, **spec.biases}:
        loaded.dense[name] = placed.pop(name)
    for module in spec.linears:
        if module not in groups:
            loaded.linears[module] = placed.pop(f"{module}.weight")
            continue
        lay = scheme.layout
        inp = placed.pop(f"{module}.input_scale", None)
        loaded.linears[module] = Fp8Weight(placed.pop(f"{module}.weight"),
                                           placed.pop(f"{module}.{lay.scale_name}").reshape(
                                               groups[module].scale_shape(*spec.linears[module])),
                                           groups[module], inp, loaded.dense.get(f"{module}.bias"))
    if fuse:
        fuse_linears(loaded, "requant" if fuse == "requant" else "exact")
    return loaded


SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale")


def _stream(files: list[Path], entries: dict[str, Entry], device: torch.device, stats: LoadStats, *,
            dense_dtype: torch.dtype | None, pinned: bool, check_weights: bool, threads: int | None,
            chunk_bytes: int | None, progress: bool | None, label: str):
    """Every file's tensors onto the device (``staging.Stager``); returns ({name: tensor}, [(name, bad flag)]):
    the flags are device booleans (a scale not finite and > 0, an FP8 weight with NaN codes), read after one sync."""
    memory = HostMemory()
    chunk = chunk_bytes or min(64 << 20, max(1 << 20, stats.largest_tensor_bytes // 2))
    total = sum(data_section(f)[1] for f in files)
    bar = _progress_bar(total, label, progress)
    stager = Stager(device, chunk_bytes=chunk, threads=threads, pinned=pinned, memory=memory, progress=bar)
    placed: dict[str, torch.Tensor] = {}
    flags: list[tuple[str, torch.Tensor]] = []
    t0 = time.perf_counter()
    try:
        for file in files:
            buf, ranges = stager.read_file(file)
            for name, (begin, end) in sorted(ranges.items(), key=lambda kv: kv[1]):
                e = entries[name]
                t = tensor_view(buf, begin, end, e.dtype, e.shape)
                stats.tensors += 1
                stats.bytes += end - begin
                if name.endswith(SCALE_SUFFIXES):
                    t = t.to(torch.float32)
                    flags.append((name, ~(torch.isfinite(t) & (t > 0)).all()))
                elif dense_dtype is not None and t.dtype in FLOAT_DTYPES:
                    t = t.to(dense_dtype)
                if check_weights and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    flags.append((name, _nan_codes(t)))
                placed[name] = t
            del buf
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        stager.close()
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t0
    memory.sample()
    stats.rss_growth_bytes, stats.staging_bytes, stats.pinned_bytes = memory.rss_growth, memory.staging_bytes, \
        memory.pinned_bytes
    stats.chunk_bytes, stats.threads = stager.chunk, stager.threads
    if device.type == "cuda":
        stats.peak_host_bytes, stats.host_source = memory.peak, memory.source
    else:
        stats.host_source = "CPU load: the model itself is host memory"
    return placed, flags


def _progress_bar(total: int, label: str, progress: bool | None):
    """tqdm on stderr over bytes; with ``progress=None`` it appears only once the load has taken a second."""
    if progress is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {label}", file=sys.stderr,
                delay=0 if progress else 1.0, leave=False)


def _nan_codes(w: torch.Tensor) -> torch.Tensor:
    """Whether an FP8 tensor holds a NaN code (a device boolean). On the CPU one histogram pass (bincount) is
    several times faster than the elementwise test."""
    b = w.view(torch.uint8).reshape(-1)
    nan = (0x7F, 0xFF) if w.dtype == torch.float8_e4m3fn else (0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF)
    if b.device.type == "cpu":
        return torch.bincount(b, minlength=256)[list(nan)].any()
    b = b & 0x7F
    if w.dtype == torch.float8_e4m3fn:
        return (b == 0x7F).any()
    return (b > 0x7C).any()  # e5m2: exponent all ones with a mantissa (0x7C is inf, allowed by the format)


def _layout_name(scheme: QuantScheme, groups: dict[str, ScaleGroup]) -> str:
    if scheme.layout is None:
        return "unquantized"
    if scheme.vllm_scales_from_tensors:
        kinds = {g.name for g in groups.values()}
        return f"vllm-{kinds.pop()}" if len(kinds) == 1 else "vllm-mixed"
    return scheme.layout.name


# ---- step 4: fused projections -------------------------------------------------------------------------------

def fuse_linears(loaded: LoadedCheckpoint, mode: str = "exact") -> None:
    """Replace q/k/v by qkv_proj and gate/up by gate_up_proj in ``loaded.linears`` (see the module doc)."""
    for i in range(int(loaded.config["num_hidden_layers"])):
        p = f"model.layers.{i}"
        for fused, parts in FUSED.items():
            names = [f"{p}.{s}" for s in parts]
            ws = [loaded.linears.pop(n) for n in names]
            loaded.linears[f"{p}.{fused}"] = fuse_weights(names, ws, mode)


def fuse_weights(names: list[str], ws: list, mode: str = "exact") -> Fp8Weight | torch.Tensor:
    """One weight whose rows are the shards' rows in order; scales kept exact or requantized (``mode``)."""
    if all(isinstance(w, torch.Tensor) for w in ws):
        return torch.cat(ws, dim=0)
    if not all(isinstance(w, Fp8Weight) for w in ws):
        raise CheckpointError(f"{names[0]}: cannot fuse quantized with unquantized shards ({', '.join(names)})")
    shards = tuple((n, w.shape[0]) for n, w in zip(names, ws))
    groups = {w.group for w in ws}
    inputs = [w.input_scale for w in ws if w.input_scale is not None]
    inp = torch.stack([s.reshape(()) for s in inputs]).max() if inputs else None
    bias = None if ws[0].bias is None else torch.cat([w.bias for w in ws])
    weight = torch.cat([w.weight for w in ws], dim=0)
    if groups == {TENSOR} and mode == "requant":
        return _requant_to_max(ws, shards, inp, bias)
    if len(groups) == 1 and groups <= {TENSOR, CHANNEL}:
        scale = torch.cat([w.scale.reshape(1, 1).expand(w.shape[0], 1) if w.group == TENSOR else w.scale
                           for w in ws])
        return Fp8Weight(weight, scale.contiguous(), CHANNEL, inp, bias, shards)
    if len(groups) == 1 and next(iter(groups)).gn > 1:
        g = next(iter(groups))
        if all(w.shape[0] % g.gn == 0 for w in ws):
            return Fp8Weight(weight, torch.cat([w.scale for w in ws]), g, inp, bias, shards)
        rows = ScaleGroup(1, g.gk)  # a block's scale repeated on each of its rows: exact for any shard sizes
        scale = torch.cat([w.scale.repeat_interleave(g.gn, dim=0)[: w.shape[0]] for w in ws])
        return Fp8Weight(weight, scale.contiguous(), rows, inp, bias, shards)
    raise CheckpointError(f"{names[0]}: shards with scale groups {sorted(g.name for g in groups)} cannot be fused")


def _requant_to_max(ws: list[Fp8Weight], shards, inp, bias) -> Fp8Weight:
    """vLLM's fused per-tensor: dequantize each shard and requantize it with the largest shard scale."""
    from impl.fp8 import quant

    smax = torch.stack([w.scale.reshape(()) for w in ws]).max().reshape(1, 1)
    fmt = get_format(ws[0].weight.dtype)
    parts = []
    for w in ws:
        if torch.equal(w.scale.reshape(()), smax.reshape(())):
            parts.append(w.weight)
            continue
        # the kernels run where impl.backend says; the loader's tensors may still be on the host
        hi = quant.dequantize(w.weight.to(backend.DEVICE), w.scale.to(backend.DEVICE), TENSOR, out_dtype=torch.float32)
        parts.append(quant.quantize(hi, TENSOR, fmt, scales=smax.to(backend.DEVICE))[0].to(w.weight.device))
    return Fp8Weight(torch.cat(parts, dim=0), smax, TENSOR, inp, bias, shards)


__all__ = ["CheckpointError", "LoadedCheckpoint", "LoadStats", "load_checkpoint", "fuse_linears", "fuse_weights"]
