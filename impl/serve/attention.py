"""Attention backends over the paged KV cache, the explicit choice between them, and the float64 reference.

Every backend computes, for each new query row t of sequence b at position pos(t) (its rows are the last q_len of the
sequence's seq_len K/V rows),

    out[t, h] = Σ_{j ≤ pos(t)} softmax_j(scale · q[t, h] · K[b, j, h // G]) · V[b, j, h // G]

from q [T, H, D] and one layer's caches [pages, page_size, KVH, D] (``kv_cache.AttentionMetadata`` says where).

- ``flashinfer``: flashinfer's paged prefill/decode wrappers (planned once per step, run per layer; not graph-safe:
  the plan runs on the host every step). Optional: ``python -m impl.serve.flashinfer_setup`` says how its wheels
  travel to the GPU machine; without it its tests skip and say so.
- ``triton``: our kernels in ``triton_attention.py`` (decode kernel when every sequence has one new token, prefill
  otherwise). CUDA-graph safe. Runs under TRITON_INTERPRET=1 in CI.
- ``sdpa``: gathers each sequence's pages and calls torch's scaled_dot_product_attention (host loop; not graph-safe).

``select_backend("auto")`` on a GPU: Triton, unless flashinfer imports, in which case both are timed on a small
paged cache with the model's head shapes (``measure_phases``) and each phase gets the faster one (``PhaseBackend``);
decode stays on a graph-safe backend when flashinfer's decode is faster only without CUDA graphs, and the reason says
so with the times. On a CPU: sdpa (Triton would be interpreted). The reason comes with the choice; engines report
both.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from impl import backend as lab_backend
from impl.serve.kv_cache import AttentionMetadata

BACKENDS = ("flashinfer", "triton", "sdpa")


class AttentionBackend(Protocol):
    name: str
    graph_safe: bool  # may run inside a captured CUDA graph (no host syncs, no data-dependent host work)

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, *, scale: float,
               k_scale: float = 1.0, v_scale: float = 1.0) -> Tensor: ...


def gather_kv(cache: Tensor, pages: list[int], length: int, kv_scale: float, dtype: torch.dtype) -> Tensor:
    """The first ``length`` rows [length, KVH, D] of one sequence, in ``dtype`` (FP8 pages scaled back)."""
    rows = cache[pages].reshape(-1, cache.shape[2], cache.shape[3])[:length]
    if rows.dtype == torch.float8_e4m3fn:
        return (rows.float() * kv_scale).to(dtype)
    return rows.to(dtype)


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """[q_len, kv_len] bool, True where key j is visible to query i (queries are the last q_len positions)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    return torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]


class TritonPagedAttention:
    name = "triton"
    graph_safe = True

    def __init__(self, prefill_tiles: Any = None, split_rule: Any = None, decode_block_n: int = 64) -> None:
        """Launch settings (defaults: ``triton_attention.PREFILL_TILES``, ``SPLIT_RULE``, 64 keys a decode step);
        other values are timing candidates (``flashinfer_check``)."""
        from impl.serve.triton_attention import PREFILL_TILES, SPLIT_RULE

        self.prefill_tiles = prefill_tiles or PREFILL_TILES
        self.split_rule, self.decode_block_n = split_rule or SPLIT_RULE, decode_block_n

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, *, scale: float,
               k_scale: float = 1.0, v_scale: float = 1.0) -> Tensor:
        from impl.serve.triton_attention import paged_decode, paged_prefill

        if meta.is_decode:
            return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale=scale,
                                k_scale=k_scale, v_scale=v_scale, block_n=self.decode_block_n, rule=self.split_rule)
        return paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.q_start, meta.seq_lens, meta.max_q_len,
                             scale=scale, k_scale=k_scale, v_scale=v_scale, tiles=self.prefill_tiles)


class TorchSDPAAttention:
    name = "sdpa"
    graph_safe = False

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, *, scale: float,
               k_scale: float = 1.0, v_scale: float = 1.0) -> Tensor:
        out = torch.empty_like(q)
        row = 0
        for q_len, kv_len, pages in zip(meta.q_lens, meta.seq_lens_host, meta.block_tables_host):
            k = gather_kv(k_cache, pages, kv_len, k_scale, q.dtype).transpose(0, 1)[None]  # [1, KVH, S, D]
            v = gather_kv(v_cache, pages, kv_len, v_scale, q.dtype).transpose(0, 1)[None]
            qb = q[row:row + q_len].transpose(0, 1)[None]  # [1, H, q_len, D]
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=causal_mask(q_len, kv_len, q.device),
                                               scale=scale, enable_gqa=True)
            out[row:row + q_len] = o[0].transpose(0, 1)
            row += q_len
        return out


def flashinfer_unavailable_reason() -> str | None:
    if not lab_backend.ON_GPU:
        return "flashinfer needs a CUDA GPU (this machine has none)"
    if importlib.util.find_spec("flashinfer") is None:
        return ("flashinfer is not installed (flashinfer-python JIT-compiles with nvcc and needs apache-tvm-ffi, "
                "cuda-tile and nvidia-cutlass-dsl; `python -m impl.serve.flashinfer_setup plan` lists the wheels)")
    return None


class FlashInferAttention:
    """flashinfer's paged wrappers; ``plan`` runs once per step (on the first layer), ``run`` per layer."""

    name = "flashinfer"
    graph_safe = False

    def __init__(self, workspace_bytes: int = 128 << 20) -> None:
        reason = flashinfer_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        import flashinfer

        ws = torch.empty(workspace_bytes, dtype=torch.uint8, device="cuda")
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        self._planned: AttentionMetadata | None = None

    def _plan(self, q: Tensor, k_cache: Tensor, meta: AttentionMetadata, scale: float) -> None:
        ps, dev = meta.page_size, q.device
        pages = [p for table in meta.block_tables_host for p in table]
        counts = [len(t) for t in meta.block_tables_host]
        indptr = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(dev)
        indices = torch.tensor(pages, dtype=torch.int32, device=dev)
        last = torch.tensor([(n - 1) % ps + 1 for n in meta.seq_lens_host], dtype=torch.int32, device=dev)
        heads, kv_heads, dim = q.shape[1], k_cache.shape[2], q.shape[2]
        if meta.is_decode:
            self._decode.plan(indptr, indices, last, heads, kv_heads, dim, ps, pos_encoding_mode="NONE",
                              sm_scale=scale, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
        else:
            self._prefill.plan(meta.q_start, indptr, indices, last, heads, kv_heads, dim, ps, causal=True,
                               sm_scale=scale, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
        self._planned = meta

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, *, scale: float,
               k_scale: float = 1.0, v_scale: float = 1.0) -> Tensor:
        if self._planned is not meta:
            self._plan(q, k_cache, meta, scale)
        wrapper = self._decode if meta.is_decode else self._prefill
        if k_cache.dtype == torch.float8_e4m3fn:
            return wrapper.run(q, (k_cache, v_cache), k_scale=k_scale, v_scale=v_scale)
        return wrapper.run(q, (k_cache, v_cache))


class PhaseBackend:
    """Decode through one backend, prefill (any step with more than one new token) through another."""

    def __init__(self, decode: AttentionBackend, prefill: AttentionBackend) -> None:
        self.decode, self.prefill = decode, prefill
        self.name = decode.name if decode.name == prefill.name else f"{decode.name}-decode+{prefill.name}-prefill"
        self.graph_safe = decode.graph_safe  # only decode steps are captured in graphs

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, *, scale: float,
               k_scale: float = 1.0, v_scale: float = 1.0) -> Tensor:
        b = self.decode if meta.is_decode else self.prefill
        return b.attend(q, k_cache, v_cache, meta, scale=scale, k_scale=k_scale, v_scale=v_scale)


def time_phases(backends: dict[str, AttentionBackend], heads: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device | str, batch: int = 16, context: int = 512,
                prompt: int = 256, reps: int = 10) -> dict[str, dict[str, float]]:
    """Median device time (µs) of one layer's decode step (``batch`` sequences of ``context`` tokens) and prefill
    (``batch // 4`` prompts of ``prompt`` tokens) per backend, on one paged cache (16-token pages)."""
    from impl.common.timing import time_fn
    from impl.serve.kv_cache import CacheConfig, PagedKVCache
    from impl.serve.model import ModelArgs

    args = ModelArgs(dim=heads * head_dim, n_layers=1, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                     ffn_dim=8, vocab_size=8)
    npre = max(1, batch // 4)
    cache = PagedKVCache(args, CacheConfig(batch * -(-context // 16) + npre * -(-prompt // 16) + 4, 16),
                         dtype=dtype, device=device)
    cache.k.normal_()
    cache.v.normal_()
    for b in range(batch):
        cache.reserve(b, context)
    for b in range(npre):
        cache.reserve(batch + b, prompt)
    dmeta = cache.metadata([(b, context - 1, 1) for b in range(batch)], device)
    pmeta = cache.metadata([(batch + b, 0, prompt) for b in range(npre)], device)
    qd = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    qp = torch.randn(npre * prompt, heads, head_dim, device=device, dtype=dtype)
    out: dict[str, dict[str, float]] = {}
    for name, be in backends.items():
        row = {}
        for phase, q, meta in (("decode", qd, dmeta), ("prefill", qp, pmeta)):
            fn = lambda: be.attend(q, cache.k[0], cache.v[0], meta, scale=head_dim ** -0.5)  # noqa: E731
            fn()  # plan (flashinfer) and compile outside the timed calls
            row[phase] = 1e3 * time_fn(fn, warmup=2, reps=reps, queue_ahead=True).median_ms
        out[name] = row
    return out


def choose_phases(times: dict[str, dict[str, float]], backends: dict[str, AttentionBackend],
                  graphs: bool = True) -> tuple[AttentionBackend, str]:
    """The faster backend per phase (decode restricted to graph-safe backends when ``graphs``) and why."""
    fmt = lambda phase: ", ".join(f"{n} {t[phase]:.1f} us" for n, t in times.items())  # noqa: E731
    prefill = min(times, key=lambda n: times[n]["prefill"])
    fastest = min(times, key=lambda n: times[n]["decode"])
    safe = [n for n in times if backends[n].graph_safe] if graphs else list(times)
    decode = min(safe or list(times), key=lambda n: times[n]["decode"])
    why = f"auto, measured per layer: decode {fmt('decode')} -> {decode}"
    if decode != fastest:
        why += f" ({fastest} is faster per kernel but cannot run in a CUDA graph)"
    why += f"; prefill {fmt('prefill')} -> {prefill}"
    return PhaseBackend(backends[decode], backends[prefill]), why


def make_backend(name: str) -> AttentionBackend:
    if name == "triton":
        return TritonPagedAttention()
    if name == "sdpa":
        return TorchSDPAAttention()
    if name == "flashinfer":
        return FlashInferAttention()
    raise ValueError(f"unknown attention backend {name!r}; one of {BACKENDS} or 'auto'")


def select_backend(name: str = "auto", device: torch.device | str | None = None,
                   shapes: tuple[int, int, int, torch.dtype] | None = None) -> tuple[AttentionBackend, str]:
    """The backend to use and why (``auto``: see the module doc; sdpa on a CPU, also for a CPU model on a GPU machine,
    where Triton could not read the tensors). ``device`` None: this machine's default. ``shapes`` (heads, KV heads,
    head dim, dtype) of the model, for auto's measurement when flashinfer is there (else 32/8/128 bf16)."""
    if name != "auto":
        return make_backend(name), "requested explicitly"
    cuda = lab_backend.ON_GPU if device is None else torch.device(device).type == "cuda"
    if not cuda:
        return make_backend("sdpa"), ("auto: torch SDPA on the CPU (Triton would run in its interpreter; ask for it by "
                                      "name)")
    why_not = flashinfer_unavailable_reason()
    if why_not is not None:
        return make_backend("triton"), f"auto: Triton paged attention ({why_not})"
    backends = {"triton": make_backend("triton"), "flashinfer": make_backend("flashinfer")}
    heads, kv_heads, head_dim, dtype = shapes or (32, 8, 128, torch.bfloat16)
    try:
        times = time_phases(backends, heads, kv_heads, head_dim, dtype, device or "cuda")
    except Exception as e:  # flashinfer imports but fails on these shapes: say so, serve with Triton
        return backends["triton"], f"auto: Triton paged attention (flashinfer failed its measurement: {e})"
    return choose_phases(times, backends)


def available_backends() -> dict[str, str | None]:
    """Backend name → None if it can run here, else the reason it cannot (for tests' explicit skips)."""
    return {"flashinfer": flashinfer_unavailable_reason(), "triton": None, "sdpa": None}


def paged_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, *,
                              scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> Tensor:
    """The definition above in float64 on the CPU, one sequence and head at a time: [T, H, D] float64."""
    qd = q.detach().cpu().double()
    out = torch.zeros_like(qd)
    group = q.shape[1] // k_cache.shape[2]
    row = 0
    for q_len, kv_len, pages in zip(meta.q_lens, meta.seq_lens_host, meta.block_tables_host):
        k = gather_kv(k_cache.cpu(), pages, kv_len, k_scale, torch.float64)
        v = gather_kv(v_cache.cpu(), pages, kv_len, v_scale, torch.float64)
        visible = causal_mask(q_len, kv_len, torch.device("cpu"))
        for h in range(q.shape[1]):
            s = scale * qd[row:row + q_len, h] @ k[:, h // group].T
            s = s.masked_fill(~visible, float("-inf"))
            out[row:row + q_len, h] = torch.softmax(s, dim=-1) @ v[:, h // group]
        row += q_len
    return out
