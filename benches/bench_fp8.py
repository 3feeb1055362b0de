"""FP8 benches: dequantize/requantize bandwidth, FP8 vs bf16 GEMM over M, checkpoint loading.

- ``test_fp8_dequant[<scales>-<N>x<K>]``: fp8 + scales -> bf16 on Llama-3-8B matrices (gate/up 14336x4096,
  down 4096x14336, q/o 4096x4096); bytes = N*K (codes) + scales + 2*N*K (bf16 out). Target >= 85% of copy peak.
- ``test_fp8_requant[<scales>-<N>x<K>]``: bf16 -> fp8 with dynamic scales computed in the kernel; bytes = 2*N*K +
  N*K + scales (per-tensor reads x twice: amax pass then quantize pass; bytes count one read, ``passes`` says 2).
  Target >= 80%. Anchors: ``test_fp8_dequant_torch`` / ``test_fp8_requant_torch`` (eager torch, same math).
- ``test_fp8_gemm[<variant>-M<m>-N<n>-K<k>]``: variants ``bf16`` (torch matmul), ``fp8`` (``torch._scaled_mm``,
  per-tensor scales, operands pre-quantized: the tensor-core ratio), ``fp8-linear`` (``Fp8Linear`` with per-channel
  weights: per-token activation quantization included, what a model pays). Target fp8 >= 1.6x bf16 at 8192^3.
- ``test_fp8_load[<cache>-<staging>]``: a random FP8 checkpoint of two Llama-3-8B layers, disk -> device, GB/s and
  peak host memory; ``cold`` evicts the files from the page cache first (posix_fadvise DONTNEED).
"""
from __future__ import annotations

import os

import pytest
import torch

from impl import backend
from impl.backend import DEVICE, sized
from impl.fp8 import quant
from impl.fp8.formats import get_group
from impl.fp8.linear import Fp8Linear, quantize_weight
from impl.fp8.loader import load_checkpoint
from impl.fp8.tiny import LLAMA3_8B, tiny_config, write_random_fp8_checkpoint

HI = torch.bfloat16 if backend.ON_GPU else torch.float32  # no bf16 in the Triton interpreter
SHAPES = sized(gpu=[(14336, 4096), (4096, 14336), (4096, 4096)], cpu=[(130, 96), (64, 200)])
DQ_GROUPS = ["tensor", "channel", "block"]
RQ_GROUPS = ["tensor", "channel", "group", "block"]


def _ids(groups, shapes):
    return [f"{g}-{n}x{k}" for g in groups for n, k in shapes]


def _cases(groups, shapes):
    return [(g, n, k) for g in groups for n, k in shapes]


def _scale_bytes(group: str, n: int, k: int) -> int:
    r, c = get_group(group).scale_shape(n, k)
    return 4 * r * c


@pytest.mark.parametrize("group,n,k", _cases(DQ_GROUPS, SHAPES), ids=_ids(DQ_GROUPS, SHAPES))
def test_fp8_dequant(device_bench, group, n, k):
    q, s = quant.quantize(torch.randn(n, k, device=DEVICE, dtype=HI), group)
    out = torch.empty(n, k, device=DEVICE, dtype=HI)
    nbytes = n * k + _scale_bytes(group, n, k) + n * k * out.element_size()
    device_bench(lambda: quant.dequantize(q, s, group, out=out), bytes_moved=nbytes, n=n, k=k, scales=group,
                 dtype=str(HI).replace("torch.", ""), variant="triton")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("group,n,k", _cases(RQ_GROUPS, SHAPES), ids=_ids(RQ_GROUPS, SHAPES))
def test_fp8_requant(device_bench, group, n, k):
    x = torch.randn(n, k, device=DEVICE, dtype=HI)
    out = torch.empty(n, k, device=DEVICE, dtype=torch.uint8)
    s_out = torch.empty(get_group(group).scale_shape(n, k), device=DEVICE, dtype=torch.float32)
    nbytes = n * k * x.element_size() + n * k + _scale_bytes(group, n, k)
    device_bench(lambda: quant.quantize(x, group, out=out, scales_out=s_out), bytes_moved=nbytes, n=n, k=k,
                 scales=group, dtype=str(HI).replace("torch.", ""), variant="triton",
                 passes=2 if group == "tensor" else 1)
    assert bool((s_out > 0).all())


@pytest.mark.parametrize("n,k", [SHAPES[0]], ids=[f"channel-{SHAPES[0][0]}x{SHAPES[0][1]}"])
def test_fp8_dequant_torch(device_bench, n, k):
    q, s = quant.quantize(torch.randn(n, k, device=DEVICE, dtype=HI), "channel")
    device_bench(lambda: q.to(HI) * s.to(HI), bytes_moved=n * k * (1 + 2 * q.new_empty(0, dtype=HI).element_size())
                 + 4 * n, n=n, k=k, scales="channel", variant="torch-eager")


@pytest.mark.parametrize("n,k", [SHAPES[0]], ids=[f"channel-{SHAPES[0][0]}x{SHAPES[0][1]}"])
def test_fp8_requant_torch(device_bench, n, k):
    x = torch.randn(n, k, device=DEVICE, dtype=HI)

    def run():
        s = (x.abs().amax(dim=1, keepdim=True).float() / 448).clamp(min=2.0 ** -120)
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn), s

    device_bench(run, bytes_moved=n * k * (x.element_size() + 1) + 4 * n, n=n, k=k, scales="channel",
                 variant="torch-eager")


# ---- GEMM ----------------------------------------------------------------------------------------------------

GEMM_MS = sized(gpu=[1, 16, 64, 256, 1024, 4096, 8192], cpu=[1, 16])
GEMM_NK = sized(gpu=[4096, 8192], cpu=[64])
GEMM_CASES = [(v, m, nk) for v in ("bf16", "fp8", "fp8-linear") for nk in GEMM_NK for m in GEMM_MS]


@pytest.mark.parametrize("variant,m,nk", [
    pytest.param(v, m, nk, marks=[pytest.mark.gpu] if v == "fp8" else [], id=f"{v}-M{m}-N{nk}-K{nk}")
    for v, m, nk in GEMM_CASES])
def test_fp8_gemm(device_bench, variant, m, nk):
    n = k = nk
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(m, k, device=DEVICE, dtype=HI, generator=g)
    w = torch.randn(n, k, device=DEVICE, dtype=HI, generator=g)
    info = dict(m=m, n=n, k=k, variant=variant)
    if variant == "bf16":
        fn, wbytes, fdt = (lambda: x @ w.t()), 2 * n * k, "bf16"
        info["path"] = "torch.matmul"
    elif variant == "fp8":
        xq, sx = quant.quantize(x, "tensor")
        wq, sw = quant.quantize(w, "tensor")
        wt = wq.t()  # column-major operand
        fn = lambda: torch._scaled_mm(xq, wt, scale_a=sx.reshape(()), scale_b=sw.reshape(()),  # noqa: E731
                                      out_dtype=torch.bfloat16)
        wbytes, fdt = n * k, "fp8"
        info["path"] = "torch._scaled_mm per-tensor"
    else:
        layer = Fp8Linear(quantize_weight(w, "channel"))
        fn, wbytes, fdt = (lambda: layer(x)), n * k + 4 * n, "fp8"
        info["path"] = layer.path
    out = fn()
    device_bench(fn, bytes_moved=m * k * x.element_size() + wbytes + m * n * 2, flops=2 * m * n * k,
                 flops_dtype=fdt, **info)
    assert out.shape == (m, n) and torch.isfinite(out.float()).all()


# ---- loading ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """GPU: two Llama-3-8B layers in FP8 (per-channel) + a 32k-vocab bf16 embedding (~0.7 GB); CPU: tiny."""
    cfg = tiny_config(**{**LLAMA3_8B, "num_hidden_layers": 2, "vocab_size": 32000, "tie_word_embeddings": True}) \
        if backend.ON_GPU else tiny_config()
    d = tmp_path_factory.mktemp("load")
    nbytes = write_random_fp8_checkpoint(d, cfg, "vllm-channel", shard_bytes=sized(1 << 30, 1 << 14))
    return d, nbytes


def _evict(path) -> None:
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("cache,staging", [("cold", "pinned"), ("warm", "pinned"), ("warm", "pageable")],
                         ids=["cold-pinned", "warm-pinned", "warm-pageable"])
def test_fp8_load(device_bench, benchmark, big_checkpoint, cache, staging):
    path, nbytes = big_checkpoint
    stats = {}

    def run():
        ck = load_checkpoint(path, DEVICE, pinned=staging == "pinned")
        stats.update(gbps_load=ck.stats.gbps, peak_host_bytes=ck.stats.peak_host_bytes,
                     largest_tensor_bytes=ck.stats.largest_tensor_bytes)
        return ck

    ck = device_bench(run, bytes_moved=nbytes, clock="host", flush_l2=False, rounds=sized(5, 1), warmup=1,
                      setup=(lambda: _evict(path)) if cache == "cold" else None, cache=cache, staging=staging,
                      checkpoint_bytes=nbytes)
    # the last round's loader stats (same fixture instance as device_bench's)
    benchmark.extra_info.update(stats)
    if stats["peak_host_bytes"] is not None:  # None where the host gives no RssAnon (seen on the H100 machine)
        benchmark.extra_info.update(peak_host_over_largest=stats["peak_host_bytes"] / stats["largest_tensor_bytes"],
                                    peak_host_over_checkpoint=stats["peak_host_bytes"] / nbytes)
    assert ck.stats.bytes == nbytes
