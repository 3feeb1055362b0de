"""Faults in checkpoint folders: the quantizer's output folder, and config/index/header bytes the loader reads.

- ``python -m impl.fp8.quantize SRC DST --overwrite`` refuses a DST that is, contains or lies inside SRC, replaces
  only a folder it wrote itself (built beside DST, then swapped), and leaves DST as it was when a run fails;
- every size read from a file is bounded by what the files hold (10**9 layers fail at once, allocating nothing);
- config, index.json and safetensors-header errors name the file and the key; layouts are named right; index.json
  entries that leave the checkpoint folder (``..``, absolute, a symlink) are refused;
- a bounded fuzz of config/index/header bytes: every case loads what the files hold or fails with a clear
  ``CheckpointError`` naming the file, within a time bound.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from impl.fp8 import quantize as Q
from impl.fp8.layouts import CheckpointError
from impl.fp8.loader import load_checkpoint
from impl.fp8.tiny import tiny_config, write_dense_checkpoint, write_random_fp8_checkpoint

QUIET = dict(log=lambda *a: None)
W = "model.layers.0.self_attn.q_proj"


def snapshot(root: Path) -> dict[str, str]:
    """Every file (and symlink) under root -> sha256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = f"link->{p.readlink()}"
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dense") / "ck"
    write_dense_checkpoint(d, tiny_config(), seed=1)
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A vllm-channel FP8 checkpoint in several files with a model.safetensors.index.json."""
    d = tmp_path_factory.mktemp("sharded") / "ck"
    d.mkdir()
    write_random_fp8_checkpoint(d, tiny_config(), "vllm-channel", shard_bytes=40_000)
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 2
    return d


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("single") / "ck"
    d.mkdir()
    write_random_fp8_checkpoint(d, tiny_config(), "vllm-channel")
    return d


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_config(d: Path, edit) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# ---- the quantizer's output folder -----------------------------------------------------------------------------

def test_quantize_refuses_a_dst_that_is_contains_or_lies_inside_src(tmp_path, dense, capsys):
    parent = tmp_path / "parent"
    src = copy(dense, parent / "src")
    (parent / "unrelated.txt").write_text("keep me")
    (tmp_path / "alias").symlink_to(src)
    before = snapshot(tmp_path)
    for dst in (src, tmp_path / "alias", src / ".", parent, tmp_path, src / "out", src / "a" / "b"):
        assert Q.main([str(src), str(dst), "--layout", "vllm-channel", "--overwrite"]) == 2, dst
        err = capsys.readouterr().err
        assert err.startswith("error:") and "SRC" in err, (dst, err)
        assert snapshot(tmp_path) == before, dst


def test_quantize_overwrite_replaces_only_a_folder_it_wrote(tmp_path, dense, monkeypatch):
    dst = tmp_path / "out"
    Q.quantize_checkpoint(dense, dst, "vllm-tensor", **QUIET)
    Q.quantize_checkpoint(dense, dst, "vllm-channel", overwrite=True, **QUIET)  # its own output: replaced
    assert load_checkpoint(dst, "cpu").layout_name == "vllm-channel"
    assert (dst / "tokenizer.json").read_text() == "{}"
    (dst / "notes.txt").write_text("mine")
    before = snapshot(dst)
    with pytest.raises(FileExistsError, match="notes.txt"):
        Q.quantize_checkpoint(dense, dst, "vllm-block", overwrite=True, **QUIET)
    assert snapshot(dst) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="data.bin"):
        Q.quantize_checkpoint(dense, other, "vllm-block", overwrite=True, **QUIET)
    assert (other / "data.bin").read_bytes() == b"x"
    (dst / "notes.txt").unlink()
    before = snapshot(dst)
    broken = copy(dense, tmp_path / "broken")  # refused from its headers, before anything is written
    t = load_file(broken / "model.safetensors")
    t["model.layers.1.mlp.down_proj.weight"] = t["model.layers.1.mlp.down_proj.weight"][:, :100].clone()
    save_file(t, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"down_proj.weight: bfloat16 \[80, 100\] in .*model.safetensors"):
        Q.quantize_checkpoint(broken, dst, "vllm-block", overwrite=True, **QUIET)
    calls = []

    def failing(*args, **kw):  # a run that fails half-way, after shards were written
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk full")
        return real(*args, **kw)

    real = Q.quantize_tensor
    monkeypatch.setattr(Q, "quantize_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        Q.quantize_checkpoint(dense, dst, "vllm-block", overwrite=True, shard_mb=0.01, **QUIET)
    monkeypatch.undo()
    assert snapshot(dst) == before, "a failed run changed the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "other", "out"], "a temporary folder was left"
    empty = tmp_path / "empty"
    empty.mkdir()
    Q.quantize_checkpoint(dense, empty, "ct-channel", **QUIET)  # an empty folder is filled without --overwrite
    assert load_checkpoint(empty, "cpu").layout_name == "ct-channel"


# ---- sizes bounded by the files --------------------------------------------------------------------------------

def _serve_load(d: Path):
    from impl.serve.weights import load_model

    return load_model(d, dtype=torch.float32)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [10**9, 10**30])
def test_a_layer_count_beyond_the_files_fails_at_once(tmp_path, dense, single, value, monkeypatch):
    import impl.serve.weights as weights

    def no_model(*a, **k):
        raise AssertionError("a model was allocated before the config was checked against the files")

    monkeypatch.setattr(weights, "Transformer", no_model)
    runs = {"fp8 load": (single, lambda d: load_checkpoint(d, "cpu")),
            "quantize": (dense, lambda d: Q.quantize_checkpoint(d, tmp_path / "q", "vllm-channel", **QUIET)),
            "serve dense": (dense, _serve_load), "serve fp8": (single, _serve_load)}
    for name, (src, run) in runs.items():
        d = edit_config(copy(src, tmp_path / name), lambda c: c.__setitem__("num_hidden_layers", value))
        tracemalloc.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(ValueError, match="num_hidden_layers") as e:
                run(d)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert str(d / "config.json") in str(e.value), (name, str(e.value))
        assert time.monotonic() - t0 < 10 and peak < 8 << 20, (name, time.monotonic() - t0, peak)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key,value", [("hidden_size", 10**5), ("intermediate_size", 10**9), ("vocab_size", 10**12),
                                       ("num_attention_heads", 10**6), ("head_dim", 2**40)])
def test_dimensions_beyond_the_files_fail_before_allocating(tmp_path, dense, key, value, monkeypatch):
    import impl.serve.weights as weights

    def no_model(*a, **k):
        raise AssertionError("a model was allocated before the config was checked against the files")

    monkeypatch.setattr(weights, "Transformer", no_model)
    d = edit_config(copy(dense, tmp_path / "d"), lambda c: c.update({key: value, "num_key_value_heads": 1}))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=key):
        _serve_load(d)
    with pytest.raises(CheckpointError):
        load_checkpoint(d, "cpu")
    assert time.monotonic() - t0 < 10


# ---- errors that name the file and the key ---------------------------------------------------------------------

def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _pop(key):
    return lambda c: c.pop(key)


def _qset(path, value):
    def edit(c):
        node = c["quantization_config"]
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


CONFIG_CASES = {  # name: (layout, edit, word the message must hold besides the file)
    "hidden_size abc": ("vllm-channel", _set("hidden_size", "abc"), "hidden_size"),
    "hidden_size null": ("vllm-channel", _set("hidden_size", None), "hidden_size"),
    "hidden_size 80.5": ("vllm-channel", _set("hidden_size", 80.5), "hidden_size"),
    "hidden_size true": ("vllm-channel", _set("hidden_size", True), "hidden_size"),
    "hidden_size -80": ("vllm-channel", _set("hidden_size", -80), "hidden_size"),
    "vocab missing": ("vllm-channel", _pop("vocab_size"), "vocab_size"),
    "layers as text": ("vllm-channel", _set("num_hidden_layers", "2"), "num_hidden_layers"),
    "zero heads": ("vllm-channel", _set("num_attention_heads", 0), "num_attention_heads"),
    "zero kv heads": ("vllm-channel", _set("num_key_value_heads", 0), "num_key_value_heads"),
    "kv heads not dividing": ("vllm-channel", _set("num_key_value_heads", 2), "num_key_value_heads"),
    "head_dim as text": ("vllm-channel", _set("head_dim", "16"), "head_dim"),
    "no head_dim, heads too many": ("vllm-channel", lambda c: c.update(head_dim=None, num_attention_heads=160,
                                                                        num_key_value_heads=160), "head_dim"),
    "quantization_config list": ("vllm-channel", _set("quantization_config", [1]), "quantization_config"),
    "ignored_layers text": ("vllm-channel", _qset(["ignored_layers"], "lm_head"), "ignored_layers"),
    "block size text": ("vllm-block", _qset(["weight_block_size"], "128"), "weight_block_size"),
    "ct groups as list": ("ct-channel", lambda c: c["quantization_config"].__setitem__(
        "config_groups", list(c["quantization_config"]["config_groups"].values())), "config_groups"),
    "ct group as list": ("ct-channel", _qset(["config_groups", "group_0"], [1]), "group_0"),
    "ct weights as list": ("ct-channel", _qset(["config_groups", "group_0", "weights"], [8]), "weights"),
    "ct activations as list": ("ct-channel", _qset(["config_groups", "group_0", "input_activations"], [1]),
                               "input_activations"),
    "ct ignore text": ("ct-channel", _qset(["ignore"], "lm_head"), "ignore"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_errors_name_the_file_and_the_key(tmp_path, case):
    layout, edit, word = CONFIG_CASES[case]
    d = tmp_path / "ck"
    d.mkdir()
    write_random_fp8_checkpoint(d, tiny_config(), layout)
    edit_config(d, edit)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, "cpu")
    assert str(d / "config.json") in str(e.value) and word in str(e.value), str(e.value)


@pytest.mark.parametrize("text,word", [("[1, 2]", "JSON object"), ('"llama"', "JSON object"), ("{", "not valid JSON"),
                                       ("", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON"),
                                       ('{"hidden_size": NaN}', "hidden_size")])
def test_a_config_that_is_not_an_object_is_named(tmp_path, single, text, word):
    d = copy(single, tmp_path / "ck")
    (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    for run in (lambda: load_checkpoint(d, "cpu"), lambda: Q.quantize_checkpoint(d, tmp_path / "q", "ct-block",
                                                                                 **QUIET)):
        with pytest.raises(CheckpointError) as e:
            run()
        assert str(d / "config.json") in str(e.value) and word in str(e.value), str(e.value)


INDEX_CASES = {
    "not JSON": ("{", "not valid JSON"), "a list": ("[]", "JSON object"), "no weight_map": ('{"metadata": {}}',
                                                                                              "weight_map"),
    "weight_map a list": ('{"weight_map": []}', "weight_map"),
    "a file name that is a number": ('{"weight_map": {"a": 3}}', "weight_map"),
    "a missing file": ('{"weight_map": {"a": "nope.safetensors"}}', "nope.safetensors"),
    "a folder": ('{"weight_map": {"a": "sub"}}', "sub"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_index_errors_name_the_index_and_the_key(tmp_path, sharded, case):
    text, word = INDEX_CASES[case]
    d = copy(sharded, tmp_path / "ck")
    (d / "sub").mkdir()
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, "cpu")
    assert str(d / "model.safetensors.index.json") in str(e.value) and word in str(e.value), str(e.value)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlink-no-index"])
def test_files_outside_the_checkpoint_folder_are_refused(tmp_path, sharded, single, how):
    """A shard named through the index (or a *.safetensors symlink) that resolves outside the folder is not read,
    even when it holds exactly the right tensors."""
    outside = tmp_path / "elsewhere.safetensors"
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(sharded / first, outside)
    if how == "symlink-no-index":
        d = copy(single, tmp_path / "ck")
        (d / "model.safetensors").rename(tmp_path / "real.safetensors")
        (d / "model.safetensors").symlink_to(tmp_path / "real.safetensors")
    else:
        d = copy(sharded, tmp_path / "ck")
        (d / first).unlink()
        name = {"dotdot": "../elsewhere.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}[how]
        if how == "symlink":
            (d / "link.safetensors").symlink_to(outside)
        index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_checkpoint(d, "cpu")


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _first_tensor(h: dict) -> str:
    return sorted(k for k in h if k != "__metadata__")[0]


HEADER_CASES = {
    "empty file": lambda p: p.write_bytes(b""),
    "shorter than the length prefix": lambda p: p.write_bytes(b"\x01\x02"),
    "header length 2**62": lambda p: p.write_bytes(struct.pack("<Q", 2**62) + p.read_bytes()[8:]),
    "header length past the end": lambda p: p.write_bytes(struct.pack("<Q", p.stat().st_size) + p.read_bytes()[8:]),
    "header not JSON": lambda p: p.write_bytes(p.read_bytes()[:8] + b"x" + p.read_bytes()[9:]),
    "header not an object": lambda p: _rewrite_bytes_header(p, b"[]"),
    "header not UTF-8": lambda p: _rewrite_bytes_header(p, b'{"\xff": 1}'),
    "truncated data": lambda p: p.write_bytes(p.read_bytes()[:-10]),
    "trailing bytes": lambda p: p.write_bytes(p.read_bytes() + b"\0" * 16),
    "no dtype": lambda p: _rewrite_header(p, lambda h: h[_first_tensor(h)].pop("dtype")),
    "unknown dtype": lambda p: _rewrite_header(p, lambda h: h[_first_tensor(h)].__setitem__("dtype", "Q8")),
    "dtype a list": lambda p: _rewrite_header(p, lambda h: h[_first_tensor(h)].__setitem__("dtype", ["F32"])),
    "negative dim": lambda p: _rewrite_header(p, lambda h: h[_first_tensor(h)].__setitem__("shape", [-1, 80])),
    "bool dim": lambda p: _rewrite_header(p, lambda h: h[_first_tensor(h)].__setitem__("shape", [True, 80])),
    "shape beyond its bytes": lambda p: _rewrite_header(p, lambda h: h[_first_tensor(h)]["shape"].__setitem__(
        0, 10**12)),
    "offsets past the end": lambda p: _rewrite_header(p, lambda h: h[_first_tensor(h)].__setitem__(
        "data_offsets", [10**9, 10**9 + 2])),
    "offsets overlap": lambda p: _rewrite_header(p, _overlap),
    "metadata not text": lambda p: _rewrite_header(p, lambda h: h.__setitem__("__metadata__", {"format": 3})),
    "entry a list": lambda p: _rewrite_header(p, lambda h: h.__setitem__(_first_tensor(h), [1])),
}


def _rewrite_bytes_header(path: Path, text: bytes) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _overlap(h: dict) -> None:
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = names[0], names[1]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    h[b]["shape"], h[b]["dtype"] = list(h[a]["shape"]), h[a]["dtype"]


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_a_corrupted_safetensors_file_is_named(tmp_path, single, case):
    d = copy(single, tmp_path / "ck")
    HEADER_CASES[case](d / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, "cpu")
    assert str(d / "model.safetensors") in str(e.value), str(e.value)


def test_vllm_channel_files_are_described_as_vllm_channel(tmp_path, single):
    d = copy(single, tmp_path / "bf16")
    t = load_file(d / "model.safetensors")
    t[f"{W}.weight"] = t[f"{W}.weight"].to(torch.bfloat16)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layout vllm-channel stores FP8 weights") as e:
        load_checkpoint(d, "cpu")
    assert "model.safetensors" in str(e.value)
    d = copy(single, tmp_path / "extra")
    t = load_file(d / "model.safetensors")
    t[f"{W}.weight_zero_point"] = torch.zeros(1)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layout vllm-channel has no such tensor"):
        load_checkpoint(d, "cpu")


# ---- fuzz: mutated config / index / header bytes ---------------------------------------------------------------

LITERALS = [b"0", b"-1", b"1e400", b"10000000000", b"true", b"null", b'"x"', b"[]", b"{}", b"NaN", b"1.5",
            b"340282366920938463463374607431768211456", b'"../x.safetensors"', b'"/etc/passwd"']


@st.composite
def mutations(draw):
    target = draw(st.sampled_from(["config", "index", "header", "prefix"]))
    op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "literal"]))
    return target, op, draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(0, 255)), \
        draw(st.sampled_from(LITERALS)), draw(st.integers(0, 2**64 - 1))


def _mutate(data: bytes, op: str, where: float, byte: int, literal: bytes) -> bytes:
    if not data:
        return bytes([byte])
    i = int(where * len(data))
    if op == "flip":
        return data[:i] + bytes([data[i] ^ (1 << (byte % 8))]) + data[i + 1:]
    if op == "set":
        return data[:i] + bytes([byte]) + data[i + 1:]
    if op == "delete":
        return data[:i] + data[i + 1:]
    if op == "insert":
        return data[:i] + bytes([byte]) + data[i:]
    if op == "truncate":
        return data[:i]
    j = i  # literal: replace the JSON value starting at the next digit, quote or bracket from i
    while j < len(data) and data[j:j + 1] not in (b'"', b"[", b"{") and not data[j:j + 1].isdigit():
        j += 1
    k = j + 1
    while k < len(data) and data[k:k + 1] not in (b",", b"}", b"]"):
        k += 1
    return data[:j] + literal + data[k:]


def apply(d: Path, target: str, op: str, where: float, byte: int, literal: bytes, length: int) -> None:
    if target == "config":
        p = d / "config.json"
        p.write_bytes(_mutate(p.read_bytes(), op, where, byte, literal))
    elif target == "index":
        p = d / "model.safetensors.index.json"
        p.write_bytes(_mutate(p.read_bytes(), op, where, byte, literal))
    else:
        p = sorted(d.glob("*.safetensors"))[int(where * 3) % 3]
        raw = p.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        if target == "prefix":
            p.write_bytes(struct.pack("<Q", [0, n - 1, n + 1, len(raw), length][byte % 5]) + raw[8:])
        else:
            header = _mutate(raw[8:8 + n], op, where, byte, literal)
            keep_prefix = byte % 2 == 0
            p.write_bytes(struct.pack("<Q", n if keep_prefix else len(header)) + header + raw[8 + n:])


def check_loaded(d: Path, ck) -> None:
    """A checkpoint that loads must hold what an independent reader finds in the files."""
    raw = {}
    for p in d.glob("*.safetensors"):
        raw.update(load_file(p))
    for module, w in ck.linears.items():
        assert torch.equal(w.weight.view(torch.uint8), raw[f"{module}.weight"].view(torch.uint8)), module
        assert torch.equal(w.scale.reshape(-1), raw[f"{module}.weight_scale"].float().reshape(-1)), module
    for name, t in ck.dense.items():
        assert torch.equal(t, raw[name]), name


@pytest.mark.timeout(300)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(m=mutations())
def test_fuzz_loader_loads_or_names_the_file(sharded, m):
    with tempfile.TemporaryDirectory() as tmp:
        d = copy(sharded, Path(tmp) / "ck")
        apply(d, *m)
        names = [str(d), "config.json", "model.safetensors.index.json", *(p.name for p in sharded.iterdir())]
        t0 = time.monotonic()
        try:
            ck = load_checkpoint(d, "cpu")
        except CheckpointError as e:
            msg = str(e)
            assert "\n" not in msg and any(n in msg for n in names), msg
        else:
            check_loaded(d, ck)
        assert time.monotonic() - t0 < 15, m
