"""FP8 benches: dequantize/requantize bandwidth, FP8 vs bf16 GEMM over M, checkpoint loading.

- ``test_fp8_dequant[<scales>-<N>x<K>]``: fp8 + scales -> bf16 on a Llama-3-8B layer's matrices (gate or up
  14336x4096, gate+up fused 28672x4096, down 4096x14336, q/o 4096x4096, qkv fused 6144x4096); bytes = N*K (codes) +
  scales + 2*N*K (bf16 out). Target >= 92% of copy peak.
- ``test_fp8_requant[<scales>-<N>x<K>]``: bf16 -> fp8 with dynamic scales computed in the kernel; bytes (compulsory)
  = 2*N*K + N*K + scales. Per-tensor reads x twice (amax pass, then quantize pass): ``traffic_bytes`` counts both
  reads and ``pct_traffic_bw`` is the share of copy bandwidth against that two-read bound. Target >= 92% (per-tensor:
  >= 90% of the two-read bound). ``test_fp8_requant_delayed``: per-tensor with the previous call's scale (one read).
  Anchors: ``test_fp8_dequant_torch`` / ``test_fp8_requant_torch`` (eager torch, same math).
- ``test_fp8_copy[<N>x<K>]``: the card's own device-to-device copy (``Tensor.copy_``) of 1.5*N*K bytes, so it reads and
  writes the same 3*N*K bytes a kernel of that shape must move: the ceiling a kernel of that size can reach, beside
  the calibrated copy peak (measured on 256 MiB - 1 GiB, where ramp-up and the last wave cost nothing).
- ``test_fp8_stream[<mode>-<N>x<K>]``: the most a kernel of a dequantize's (``widen``: N*K bytes read, 2*N*K
  written) or a requantize's (``narrow``: 2*N*K read, N*K written) traffic mix reaches, with no arithmetic
  (``impl.fp8.ceiling``): the fastest of its launches after a short sweep (``stream_sweep_ms``), benched afresh. Write-
  heavy traffic is slower than a copy on HBM, so this, not the copy, is the ceiling of a dequantize.
- ``test_fp8_convert[<mix>-<N>x<K>]``: torch's elementwise conversion of an [N, K] matrix with a kernel's traffic
  mix (``Tensor.copy_`` across dtypes): ``widen`` uint8 -> int16 reads N*K and writes 2*N*K bytes (as dequantize
  does), ``narrow`` int16 -> uint8 reads 2*N*K and writes N*K (as requantize does). An anchor, not a ceiling: on
  the H200 it moves ~43% of the copy peak (the kernels here ~80-92%).
- ``test_fp8_gemm[<variant>-M<m>-N<n>-K<k>]``: variants ``bf16`` (torch matmul), ``fp8`` (``torch._scaled_mm``,
  per-tensor scales, operands pre-quantized: the tensor-core ratio), ``fp8-linear`` (``Fp8Linear`` with per-channel
  weights: per-token activation quantization included, what a model pays). Target fp8 >= 1.6x bf16 at 8192^3.
- ``test_fp8_load[<cache>-<staging>]``: a random FP8 checkpoint of two Llama-3-8B layers, disk -> device, GB/s and
  peak host memory (``staging.HostMemory``); ``cold`` evicts the files from the page cache before each round
  (``staging.evict``: posix_fadvise, else drop_caches, checked with mincore; skipped when neither works).
  ``test_fp8_disk_read[<cache>]``: the same files read plainly into one host buffer (the faster of one stream and
  the loader's parallel reads): the file system's own speed in the same run, the yardstick of the cold load.

The kernels launch with the configs ``impl.fp8.launch`` resolves (the tune run's stored table where one exists,
else built-in defaults), looked up for the shape's class; each kernel bench records them (``extra_info["launch"]``,
``["launch_class"]``, ``["launch_table"]``).
"""
from __future__ import annotations

import os
from dataclasses import asdict

import pytest
import torch

from impl import backend
from impl.backend import DEVICE, sized
from impl.common.shapes import LLAMA3_8B
from impl.common.timing import time_fn
from impl.fp8 import ceiling, launch, quant, staging
from impl.fp8.formats import E4M3, MIN_SCALE, get_group
from impl.fp8.linear import Fp8Linear, quantize_weight
from impl.fp8.loader import load_checkpoint
from impl.fp8.tiny import shape_config, tiny_config, write_random_fp8_checkpoint

HI = torch.bfloat16 if backend.ON_GPU else torch.float32  # no bf16 in the Triton interpreter
SHAPES = sized(gpu=LLAMA3_8B.kernel_matrices(), cpu=[(130, 96), (64, 200)])
DQ_GROUPS = ["tensor", "channel", "block"]
RQ_GROUPS = ["tensor", "channel", "group", "block"]


def _ids(groups, shapes):
    return [f"{g}-{n}x{k}" for g in groups for n, k in shapes]


def _cases(groups, shapes):
    return [(g, n, k) for g in groups for n, k in shapes]


def _scale_bytes(group: str, n: int, k: int) -> int:
    r, c = get_group(group).scale_shape(n, k)
    return 4 * r * c


def _launch_info(n: int, k: int, *keys: str) -> dict:
    """The launch configs the kernels of this bench take on an [n, k] matrix, its shape class (the table's entry
    for it, where the table holds one), and which table they come from."""
    return {"launch": {key: asdict(launch.config(key, n, k)) for key in keys},
            "launch_class": launch.shape_class(n, k), "launch_table": launch.active_table().describe()}


@pytest.mark.parametrize("group,n,k", _cases(DQ_GROUPS, SHAPES), ids=_ids(DQ_GROUPS, SHAPES))
def test_fp8_dequant(device_bench, group, n, k):
    q, s = quant.quantize(torch.randn(n, k, device=DEVICE, dtype=HI), group)
    out = torch.empty(n, k, device=DEVICE, dtype=HI)
    nbytes = n * k + _scale_bytes(group, n, k) + n * k * out.element_size()
    device_bench(lambda: quant.dequantize(q, s, group, out=out), bytes_moved=nbytes, n=n, k=k, scales=group,
                 dtype=str(HI).replace("torch.", ""), variant="triton",
                 **_launch_info(n, k, launch.dequant_key(get_group(group))))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("group,n,k", _cases(RQ_GROUPS, SHAPES), ids=_ids(RQ_GROUPS, SHAPES))
def test_fp8_requant(device_bench, benchmark, group, n, k):
    x = torch.randn(n, k, device=DEVICE, dtype=HI)
    out = torch.empty(n, k, device=DEVICE, dtype=torch.uint8)
    s_out = torch.empty(get_group(group).scale_shape(n, k), device=DEVICE, dtype=torch.float32)
    nbytes = n * k * x.element_size() + n * k + _scale_bytes(group, n, k)
    passes = 2 if group == "tensor" else 1
    traffic = nbytes + (passes - 1) * n * k * x.element_size()
    keys = ("amax",) * (passes - 1) + (launch.quant_key(get_group(group)),)
    device_bench(lambda: quant.quantize(x, group, out=out, scales_out=s_out), bytes_moved=nbytes, n=n, k=k,
                 scales=group, dtype=str(HI).replace("torch.", ""), variant="triton", passes=passes,
                 traffic_bytes=traffic, **_launch_info(n, k, *keys))
    _traffic_share(benchmark, nbytes, traffic)
    assert bool((s_out > 0).all())


def _traffic_share(benchmark, nbytes: int, traffic: int) -> None:
    """``pct_traffic_bw``: % of copy bandwidth counting the bytes the kernel really moves (two reads for per-tensor)."""
    info = benchmark.extra_info
    if "pct_peak_bw" in info:
        info["pct_traffic_bw"] = info["pct_peak_bw"] * traffic / nbytes


@pytest.mark.parametrize("n,k", SHAPES, ids=[f"tensor-{n}x{k}" for n, k in SHAPES])
def test_fp8_requant_delayed(device_bench, benchmark, n, k):
    x = torch.randn(n, k, device=DEVICE, dtype=HI)
    _, _, state = quant.quantize_delayed(x)  # first call: the scale of x itself (two reads)
    nbytes = n * k * x.element_size() + n * k + 4

    def run():
        return quant.quantize_delayed(x, state)

    q, s, _ = device_bench(run, bytes_moved=nbytes, n=n, k=k, scales="tensor", variant="triton-delayed",
                           dtype=str(HI).replace("torch.", ""), passes=1, traffic_bytes=nbytes,
                           **_launch_info(n, k, "requant-delayed"))
    _traffic_share(benchmark, nbytes, nbytes)
    ref_q, ref_s = quant.quantize(x, "tensor")  # same x every call: the previous scale is x's own
    assert torch.equal(s, ref_s) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_fp8_copy(device_bench, n, k):
    half = 3 * n * k // 2
    src = torch.randint(0, 256, (half,), device=DEVICE, dtype=torch.uint8)
    dst = torch.bitwise_not(src)  # every byte wrong until copied
    device_bench(lambda: dst.copy_(src), bytes_moved=2 * half, n=n, k=k, variant="torch-copy")
    assert torch.equal(dst, src)


@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("mode", sorted(ceiling.MODES))
def test_fp8_stream(device_bench, mode, n, k):
    src_dtype, dst_dtype = ceiling.MODES[mode]
    x = torch.randint(0, 256, (n, k), device=DEVICE, dtype=torch.int32).to(src_dtype)
    out = torch.empty(n, k, device=DEVICE, dtype=dst_dtype)
    cfg, sweep = _fastest_stream(x, mode, out)
    device_bench(lambda: ceiling.stream(x, mode, out=out, cfg=cfg), bytes_moved=ceiling.stream_bytes(mode, n, k),
                 n=n, k=k, variant=f"stream-{mode}", stream_config=asdict(cfg), stream_sweep_ms=sweep)
    assert torch.equal(out.cpu(), ceiling.stream_reference(x, mode))


def _fastest_stream(x, mode: str, out) -> tuple[launch.LaunchConfig, dict[str, float]]:
    """The launch of ``ceiling.sweep_configs`` with the lowest median over a few flushed rounds (the bench then times
    it afresh), and every launch's median; without a GPU the interpreter's launch, untimed."""
    if not backend.ON_GPU:
        return ceiling.CPU_CONFIG, {}
    ms = {cfg: time_fn(lambda: ceiling.stream(x, mode, out=out, cfg=cfg), warmup=2, reps=7, queue_ahead=True).median_ms
          for cfg in ceiling.sweep_configs(mode, *x.shape)}
    return min(ms, key=ms.get), {ceiling.label(c): t for c, t in ms.items()}


@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("mix", ["widen", "narrow"])
def test_fp8_convert(device_bench, mix, n, k):
    src = torch.randint(0, 256, (n, k), device=DEVICE, dtype=torch.uint8)
    if mix == "narrow":
        src = src.to(torch.int16) - 128
    dst = torch.empty(n, k, device=DEVICE, dtype=torch.int16 if mix == "widen" else torch.uint8)
    dst.fill_(-1 if mix == "widen" else 7)
    device_bench(lambda: dst.copy_(src), bytes_moved=3 * n * k, n=n, k=k, variant=f"torch-{mix}")
    assert torch.equal(dst, src.to(dst.dtype))


@pytest.mark.parametrize("n,k", [SHAPES[0]], ids=[f"channel-{SHAPES[0][0]}x{SHAPES[0][1]}"])
def test_fp8_dequant_torch(device_bench, n, k):
    q, s = quant.quantize(torch.randn(n, k, device=DEVICE, dtype=HI), "channel")
    device_bench(lambda: q.to(HI) * s.to(HI), bytes_moved=n * k * (1 + 2 * q.new_empty(0, dtype=HI).element_size())
                 + 4 * n, n=n, k=k, scales="channel", variant="torch-eager")


@pytest.mark.parametrize("n,k", [SHAPES[0]], ids=[f"channel-{SHAPES[0][0]}x{SHAPES[0][1]}"])
def test_fp8_requant_torch(device_bench, n, k):
    x = torch.randn(n, k, device=DEVICE, dtype=HI)

    def run():
        s = (x.abs().amax(dim=1, keepdim=True).float() / E4M3.max).clamp(min=MIN_SCALE)
        return (x / s).clamp(-E4M3.max, E4M3.max).to(E4M3.dtype), s

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
    cfg = shape_config(LLAMA3_8B, num_hidden_layers=2, vocab_size=32000, tie_word_embeddings=True) \
        if backend.ON_GPU else tiny_config()
    d = tmp_path_factory.mktemp("load")
    nbytes = write_random_fp8_checkpoint(d, cfg, "vllm-channel", shard_bytes=sized(1 << 30, 1 << 14))
    return d, nbytes


def _files(path) -> list:
    return sorted(path.glob("*.safetensors"))


def _evict_or_skip(path) -> dict:
    ev = staging.evict(_files(path))
    if not ev["ok"]:
        pytest.skip(f"cannot evict the checkpoint from the page cache here ({ev['method']}, resident "
                    f"{ev['resident_after']}): a cold load cannot be measured")
    return ev


@pytest.mark.parametrize("cache,staging_kind", [("cold", "pinned"), ("warm", "pinned"), ("warm", "pageable")],
                         ids=["cold-pinned", "warm-pinned", "warm-pageable"])
def test_fp8_load(device_bench, benchmark, big_checkpoint, cache, staging_kind):
    path, nbytes = big_checkpoint
    stats = {}
    ev = _evict_or_skip(path) if cache == "cold" else {}

    def run():
        ck = load_checkpoint(path, DEVICE, pinned=staging_kind == "pinned", progress=False)
        s = ck.stats
        stats.update(gbps_load=s.gbps, peak_host_bytes=s.peak_host_bytes, host_source=s.host_source,
                     rss_growth_bytes=s.rss_growth_bytes, staging_bytes=s.staging_bytes, pinned_bytes=s.pinned_bytes,
                     largest_tensor_bytes=s.largest_tensor_bytes, chunk_bytes=s.chunk_bytes, threads=s.threads)
        return ck

    ck = device_bench(run, bytes_moved=nbytes, clock="host", flush_l2=False, rounds=sized(11, 1), warmup=1,
                      setup=(lambda: staging.evict(_files(path))) if cache == "cold" else None, cache=cache,
                      staging=staging_kind, checkpoint_bytes=nbytes, evict_method=ev.get("method"))
    benchmark.extra_info.update(stats)  # the last round's loader stats
    if stats["peak_host_bytes"] is not None:  # None for a CPU load: the model itself is host memory there
        benchmark.extra_info.update(host_peak_over_largest=stats["peak_host_bytes"] / stats["largest_tensor_bytes"],
                                    host_peak_over_checkpoint=stats["peak_host_bytes"] / nbytes)
    assert ck.stats.bytes == nbytes


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_fp8_disk_read(device_bench, benchmark, big_checkpoint, cache):
    """The checkpoint's files read plainly (no parsing, no device): one 16 MiB stream or the loader's parallel reads
    (chosen in warm-up, the faster), the page cache evicted before each round when cold."""
    path, nbytes = big_checkpoint
    files = _files(path)
    threads = min(8, os.cpu_count() or 1)
    ev = _evict_or_skip(path) if cache == "cold" else {}
    evict = (lambda: staging.evict(files)) if cache == "cold" else None
    best = {}
    for t in sorted({1, threads}):
        if evict:
            evict()
        r = staging.plain_read(files, threads=t)
        if not best or r["gbps"] > best["gbps"]:
            best = r
    file_bytes = sum(f.stat().st_size for f in files)
    device_bench(lambda: staging.plain_read(files, threads=best["threads"]), bytes_moved=file_bytes, clock="host",
                 flush_l2=False, rounds=sized(11, 1), warmup=0, setup=evict, cache=cache, threads=best["threads"],
                 checkpoint_bytes=nbytes, evict_method=ev.get("method"), variant="plain read")
    benchmark.extra_info["single_stream_gbps" if best["threads"] == 1 else "parallel_gbps"] = best["gbps"]
