"""Checkpoint I/O: what a Hugging Face checkpoint folder says about itself, read with bounds and checked.

  config.json         a JSON object (at most ``MAX_JSON_BYTES``); its sizes are parsed by ``layouts.llama_dims``
                      and bounded by what the safetensors files hold (``check_sizes``) before anything is built
                      from them: 10**9 layers fail at once instead of building a spec of 10**10 entries.
  index.json          ``model.safetensors.index.json``: a JSON object whose ``weight_map`` maps tensor names to file
                      names; every file must resolve (symlinks followed) to a regular file inside the folder.
  safetensors header  an 8-byte little-endian length n (n <= file size - 8 and <= ``MAX_HEADER_BYTES``), then n
                      bytes of UTF-8 JSON: tensor name -> {dtype, shape, data_offsets} (+ optional ``__metadata__``
                      of text -> text). Every shape x dtype size equals its byte range, and the ranges tile the data
                      section exactly: no gap, no overlap, nothing past the end (as the safetensors format requires).

No tensor data is read here. Every refusal is a ``CheckpointError`` naming the file (and the key or tensor).
"""
from __future__ import annotations

import json
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from impl.fp8.layouts import CheckpointError, LlamaDims, ModelSpec, QuantScheme, llama_dims, parse_quantization_config

INDEX_NAME = "model.safetensors.index.json"
MAX_JSON_BYTES = 64 << 20
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
TENSORS_PER_LAYER = 9  # two norms and seven projections: the fewest a Llama decoder layer stores
ST_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16,
             "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "U8": torch.uint8, "I8": torch.int8,
             "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


@dataclass(frozen=True)
class Entry:
    """One tensor as its file's header describes it."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", type(None): "null"}.get(
        type(v), f"a {type(v).__name__}")


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Prefix the CheckpointErrors raised inside with the file they are about."""
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value of a file of at most ``max_bytes`` bytes."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointError(f"{path}: {size} bytes, more than the {max_bytes} a checkpoint's JSON file may have")
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_config(src: str | Path) -> dict[str, Any]:
    """``src/config.json`` as a dict."""
    path = Path(src) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint dir has config.json)")
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {_kind(config)}")
    return config


def _inside(src: Path, name: str, where: str) -> Path:
    """``src / name`` if it resolves to a regular file inside ``src``; ``where`` starts the error message."""
    if Path(name).is_absolute():
        raise CheckpointError(f"{where}: an absolute path, outside the checkpoint folder {src}")
    real, root = (src / name).resolve(), src.resolve()
    if not real.is_relative_to(root):
        raise CheckpointError(f"{where}: resolves to {real}, outside the checkpoint folder {src}")
    if not real.exists():
        raise CheckpointError(f"{where}, which is missing")
    if not real.is_file():
        raise CheckpointError(f"{where}, which is not a file")
    return src / name


def safetensors_files(src: str | Path) -> list[Path]:
    """The checkpoint's weight files: those named by model.safetensors.index.json if present, else every
    ``*.safetensors``; each confined to the folder."""
    src = Path(src)
    index = src / INDEX_NAME
    if index.exists():
        data = read_json(index)
        if not isinstance(data, dict):
            raise CheckpointError(f"{index}: expected a JSON object, got {_kind(data)}")
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: weight_map: expected a non-empty object of tensor name -> file name, "
                                  f"got {_kind(wm) if wm != {} else 'an empty object'}")
        for tensor, name in wm.items():
            if not isinstance(name, str) or not name:
                raise CheckpointError(f"{index}: weight_map[{tensor!r}]: expected a file name, got {name!r}")
        return [_inside(src, n, f"{index}: weight_map names {n!r}") for n in sorted(set(wm.values()))]
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no *.safetensors files")
    return [_inside(src, p.name, str(p)) for p in files]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: Path) -> dict[str, Entry]:
    """Tensor name -> Entry from one safetensors file's header (checked as the module doc says; no data read)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (it starts with an "
                                      "8-byte header length)")
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} is more than the {min(size - 8, MAX_HEADER_BYTES)} "
                                      "bytes a header of this file can have (corrupted or truncated)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is {_kind(header)}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__: expected an object of text values, got {meta!r:.80}")
    data_len = size - 8 - n
    entries: dict[str, Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{name}: header entry in {path} is {_kind(info)}, expected an object with dtype, "
                                  "shape and data_offsets")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(code, str) or code not in ST_DTYPES:
            raise CheckpointError(f"{name}: unsupported dtype {code!r} in {path} (supported: {', '.join(ST_DTYPES)})")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise CheckpointError(f"{name}: shape {shape!r:.80} in {path} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{name}: data_offsets {offsets!r:.80} in {path} are not [begin, end] with "
                                  "0 <= begin <= end")
        nbytes = math.prod(shape) * ST_DTYPES[code].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{name}: shape {shape} of {code} is {nbytes} bytes, but its data_offsets {offsets} "
                                  f"in {path} span {offsets[1] - offsets[0]}")
        if offsets[1] > data_len:
            raise CheckpointError(f"{name}: data_offsets {offsets} run past the end of {path} (its data section has "
                                  f"{data_len} bytes: truncated?)")
        spans.append((offsets[0], offsets[1], name))
        entries[name] = Entry(path, tuple(shape), ST_DTYPES[code])
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{name}: data_offsets [{begin}, {stop}] in {path} "
                                  f"{'overlap another tensor' if begin < end else f'leave a gap after byte {end}'}")
        end = stop
    if end != data_len:
        raise CheckpointError(f"{path}: the data section has {data_len} bytes but its tensors cover {end}")
    return entries


def read_headers(files: list[Path]) -> dict[str, Entry]:
    """Every tensor of every file (a name stored in two files is refused)."""
    entries: dict[str, Entry] = {}
    for path in files:
        for name, e in read_header(path).items():
            if name in entries:
                raise CheckpointError(f"{name}: stored twice ({entries[name].file} and {path})")
            entries[name] = e
    return entries


def check_sizes(config_path: Path, config: dict[str, Any], entries: dict[str, Entry]) -> LlamaDims:
    """The config's sizes, bounded by the files: at least ``TENSORS_PER_LAYER`` tensors per layer, and no more
    parameters than twice the values the files hold (room for mismatched tensors, which the per-tensor checks name)."""
    with naming(config_path):
        dims = llama_dims(config)
    if dims.layers * TENSORS_PER_LAYER > len(entries):
        raise CheckpointError(f"{config_path}: num_hidden_layers is {dims.layers}, but the safetensors files hold "
                              f"{len(entries)} tensors (a layer has at least {TENSORS_PER_LAYER})")
    stored = sum(math.prod(e.shape) for e in entries.values())
    if dims.n_params() > 2 * stored + (1 << 20):
        raise CheckpointError(f"{config_path}: the config describes {dims.n_params():.3g} parameters "
                              f"({dims.describe()}), but the safetensors files hold {stored} values")
    return dims


def parse_config(config_path: Path, config: dict[str, Any],
                 entries: dict[str, Entry]) -> tuple[ModelSpec, QuantScheme]:
    """The model spec and quantization scheme of a config whose sizes fit the files (errors name config.json)."""
    check_sizes(config_path, config, entries)
    with naming(config_path):
        return ModelSpec.from_config(config), parse_quantization_config(config)


__all__ = ["CheckpointError", "Entry", "ST_DTYPES", "check_sizes", "naming", "parse_config", "read_config",
           "read_header", "read_headers", "read_json", "safetensors_files"]
