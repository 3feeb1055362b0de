"""The loader's data path (impl/fp8/staging.py): chunked parallel reads give every tensor's bytes exactly, host
memory is measured (and accounted where the machine reports none), page-cache eviction is checked with mincore,
the plain read reads every byte, and the progress bar appears when asked."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fixtures.strategies import seeds
from impl.fp8 import staging
from impl.fp8.loader import load_checkpoint
from impl.fp8.tiny import tiny_config, write_dense_checkpoint

DTYPES = [torch.uint8, torch.float8_e4m3fn, torch.bfloat16, torch.float32, torch.float64, torch.int16]


def random_file(path, seed: int, count: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(count):
        dt = DTYPES[int(torch.randint(0, len(DTYPES), (1,), generator=g))]
        shape = tuple(int(v) for v in torch.randint(0, 40, (int(torch.randint(1, 3, (1,), generator=g)),),
                                                    generator=g))
        raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dt.itemsize,), dtype=torch.uint8,
                            generator=g)
        t = raw[: torch.Size(shape).numel() * dt.itemsize].view(dt).reshape(shape)
        if dt.is_floating_point and dt != torch.float8_e4m3fn:
            t = torch.nan_to_num(t)
        tensors[f"t{i}"] = t.clone()
    save_file(tensors, str(path))
    return tensors


@settings(deadline=None, max_examples=25)
@given(seed=seeds(), count=st.integers(1, 12), chunk=st.sampled_from([16, 64, 100, 1000, 1 << 16]),
       threads=st.integers(1, 3), staged=st.booleans(), buffers=st.integers(1, 3))
def test_stager_reads_every_tensor_exactly(tmp_path_factory, seed, count, chunk, threads, staged, buffers):
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    want = random_file(path, seed, count)
    mem = staging.HostMemory()
    stager = staging.Stager(torch.device("cpu"), chunk_bytes=chunk, threads=threads, staged=staged,
                            buffers=buffers, min_read=16, memory=mem)
    try:
        buf, ranges = stager.read_file(path)
    finally:
        stager.close()
    assert set(ranges) == set(want)
    for name, t in want.items():
        got = staging.tensor_view(buf, *ranges[name], t.dtype, tuple(t.shape))
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    assert mem.staging_bytes == (max(16, chunk) * buffers if staged else 0)


def test_unaligned_offsets_are_copied_not_misread():
    buf = torch.arange(40, dtype=torch.uint8)
    t = staging.tensor_view(buf, 3, 11, torch.float32, (2,))
    assert torch.equal(t.view(torch.uint8), buf[3:11]) and t.data_ptr() % 4 == 0


def test_truncated_data_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    random_file(path, 0, 4)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(ValueError, match="past the file"):
        staging.data_section(path)


def test_host_memory_is_measured_or_accounted(monkeypatch):
    mem = staging.HostMemory()
    if mem.base_rss is not None:
        import mmap

        keep = mmap.mmap(-1, 16 << 20)  # a fresh anonymous mapping (not heap the process already holds resident)
        for off in range(0, len(keep), mmap.PAGESIZE):  # every page touched: 16 MiB resident
            keep[off] = 1
        mem.sample()
        assert mem.rss_growth >= 12 << 20 and mem.peak >= mem.rss_growth
        keep.close()
    monkeypatch.setattr(staging, "rss_bytes", lambda: None)  # a machine whose /proc reports no RSS
    blind = staging.HostMemory()
    blind.staging_bytes = 3 << 20
    blind.sample()
    assert blind.rss_growth is None and blind.peak == 3 << 20 and "counted" in blind.source


def test_eviction_is_checked_and_plain_read_reads_everything(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    assert staging.plain_read([path], threads=1, chunk_bytes=1 << 20)["bytes"] == 3 << 20
    assert staging.plain_read([path], threads=3, chunk_bytes=1 << 20)["bytes"] == 3 << 20
    before = staging.resident_fraction(path)
    if before is None:
        pytest.skip("mincore is not available here")
    assert before > 0.5  # just read
    ev = staging.evict([path])
    assert ev["resident_after"] is not None and ev["ok"] == (ev["resident_after"] == 0.0)
    if not ev["ok"]:
        pytest.skip(f"this file system keeps the pages ({ev['method']})")


def test_progress_bar_on_request(tmp_path, capfd):
    write_dense_checkpoint(tmp_path, tiny_config(), dtype=torch.float32)
    load_checkpoint(tmp_path, "cpu", progress=True)
    assert "loading" in capfd.readouterr().err
    load_checkpoint(tmp_path, "cpu", progress=False)
    load_checkpoint(tmp_path, "cpu")  # a fast load shows none
    assert "loading" not in capfd.readouterr().err


def test_loader_views_equal_safetensors(tmp_path):
    tensors = write_dense_checkpoint(tmp_path, tiny_config(), dtype=torch.bfloat16)
    ck = load_checkpoint(tmp_path, "cpu", threads=2, chunk_bytes=1 << 20)
    ref = load_file(str(tmp_path / "model.safetensors"))
    for name, t in ref.items():
        got = ck.dense.get(name)
        if got is None:
            got = ck.linears[name[: -len(".weight")]]
        assert torch.equal(got, t), name
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama" and tensors
