"""Disaggregated serving: a prefill worker and a decode worker, two processes joined by ``torch.distributed``.

Rank 0 (prefill) runs the prefill model over a request's prompt ``[B, T]``. A forward hook on every decoder block
sends that block's KV the moment the block finishes, K and V of a layer packed as one ``[2, B, H, T, D]`` message
(``isend``: the transfer overlaps the next blocks' compute; one message per layer, not two, because each NCCL message
costs a fixed setup that 8 MB messages do not hide: 40 of them ran at 70% of one message's bandwidth), then
it emits token 0 from its last logits. Rank 1 (decode) posts the matching ``irecv``s, builds the decode model's cache
and generates the remaining tokens greedily, which it returns to rank 0.

Where the stitch runs is a byte count (:func:`plan_transfer`): stitched on the prefill side, the wire carries the
decode model's KV, ``sum_j 2 B T H_q,j D_q,j`` elements; stitched on the decode side it carries every *used* prefill
layer, ``sum_{i in sources} 2 B T H_p,i D_p,i``. The pruned decode model has fewer layers and KV heads, so the prefill
side wins for both series (e.g. SmolLM2 30x3x64 -> 20x2x64 moves 2.25x fewer bytes); ``auto`` takes the smaller,
ties go to the prefill side so the decode GPU only decodes. Stitch compute is the same either way (a few small GEMMs).

Backends: ``nccl`` for two GPUs (one per rank); ``gloo`` on the CPU, or on one GPU shared by both ranks with KV staged
through host memory (NCCL refuses two ranks on one device). ``python -m impl.kvstitch.runtime --help`` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from impl.kvstitch.config import RuntimeConfig
from impl.kvstitch.models import KVLayout, build_cache, decoder_layers, empty_cache, forward
from impl.kvstitch.rope import positions_for


@dataclass(frozen=True)
class TransferPlan:
    """What crosses the wire for one request: ``side`` that stitches, and per prefill block the messages sent after
    it (``after[i]`` = list of (layer index, heads, head_dim)); layer index is a decode layer when side == prefill."""

    side: str
    after: tuple[tuple[tuple[int, int, int], ...], ...]
    elem_bytes: int

    def messages(self) -> list[tuple[int, int, int]]:
        return [m for group in self.after for m in group]

    def bytes(self, batch: int, tokens: int) -> int:
        return sum(2 * batch * tokens * h * d for _, h, d in self.messages()) * self.elem_bytes


def plan_transfer(bundle, dtype: torch.dtype, side: str = "auto") -> TransferPlan:
    """The cheaper side to stitch on (fewer bytes per token), or the forced ``side``."""
    src, dst = bundle.src, bundle.dst
    used = bundle.source_layers()
    elem = torch.finfo(dtype).bits // 8
    per_tok = {"prefill": KVLayout(dst.kv_heads, dst.head_dims, dtype).bytes_per_token(),
               "decode": KVLayout(src.kv_heads, src.head_dims, dtype).bytes_per_token(used)}
    if side == "auto":
        side = "prefill" if per_tok["prefill"] <= per_tok["decode"] else "decode"
    if side not in per_tok:
        raise ValueError(f"stitch side must be auto, prefill or decode, not {side!r}")
    if side == "prefill":
        after = tuple(tuple((j, dst.kv_heads[j], dst.head_dims[j]) for j in js) for js in bundle.ready_after())
    else:
        after = tuple(((i, src.kv_heads[i], src.head_dims[i]),) if i in used else () for i in range(src.num_layers))
    return TransferPlan(side, after, elem)


# ---- the two workers ---------------------------------------------------------------------------------------------

def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _wire(t: torch.Tensor, staged: bool) -> torch.Tensor:
    return t.contiguous().cpu() if staged else t.contiguous()


class PrefillWorker:
    """Rank 0: prefill model, (maybe) the stitches; sends KV block by block, then token 0."""

    def __init__(self, job: dict) -> None:
        from impl.kvstitch.models import load_model
        from impl.kvstitch.stitch import StitchBundle

        cfg: RuntimeConfig = job["cfg"]
        self.cfg, self.dev, self.dtype = cfg, cfg.prefill_device, _dtype(cfg.dtype)
        self.staged = cfg.backend == "gloo" and self.dev.startswith("cuda")
        self.ctrl = self.dev if cfg.backend == "nccl" else "cpu"  # NCCL moves device tensors only
        self.model = load_model(job["prefill"], self.dtype, self.dev, cfg.attn)
        self.bundle = StitchBundle.load(job["stitch"], self.dev)
        self.plan = plan_transfer(self.bundle, self.dtype, cfg.stitch_side)

    def serve(self, ids: torch.Tensor, dump: list | None) -> dict:
        b, t = ids.shape
        ids = ids.to(self.dev)
        t0 = time.monotonic()
        dist.send(torch.tensor([b, t, self.cfg.new_tokens, t0], dtype=torch.float64, device=self.ctrl), dst=1)
        tabs = self.bundle.tables(positions_for(b, 0, t, self.dev)) if self.plan.side == "prefill" else None
        cache, handles, sent = empty_cache(), [], []

        def after_block(i):
            def hook(*_):
                layer = cache.layers[i]
                for idx, _, _ in self.plan.after[i]:
                    if self.plan.side == "prefill":
                        src = {s: (cache.layers[s].keys, cache.layers[s].values) for s in self.bundle.pairing[idx]}
                        k, v = self.bundle.stitch_layer(idx, src, *tabs, self.dtype)
                    else:
                        k, v = layer.keys, layer.values
                    x = _wire(torch.stack((k, v)), self.staged)  # one message per layer (module doc)
                    sent.append(x)
                    handles.append(dist.isend(x, dst=1))
            return hook

        hooks = [blk.register_forward_hook(after_block(i)) for i, blk in enumerate(decoder_layers(self.model))]
        try:
            with torch.no_grad():
                first = forward(self.model, ids, cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        finally:
            for h in hooks:
                h.remove()
        _sync(self.dev)
        ttft = time.monotonic() - t0
        dist.send(first.to(self.ctrl), dst=1)
        for h in handles:
            h.wait()
        sent_s = time.monotonic() - t0
        toks = torch.empty(b, self.cfg.new_tokens, dtype=torch.long, device=self.ctrl)
        stats = torch.empty(3, dtype=torch.float64, device=self.ctrl)
        dist.recv(toks, src=1)
        dist.recv(stats, src=1)
        toks, stats = toks.cpu(), stats.cpu()
        if dump is not None:
            dump.append([x.cpu().clone() for x in sent])
        return {"batch": b, "tokens": t, "side": self.plan.side, "kv_bytes": self.plan.bytes(b, t),
                "ttft_s": ttft, "kv_sent_s": sent_s, "kv_ready_s": stats[0].item(), "decode_s": stats[1].item(),
                "decode_tokens_per_s": stats[2].item(), "generated": toks.tolist()}

    @torch.no_grad()
    def alone(self, ids: torch.Tensor) -> dict:
        """Prefill-model-alone baseline on this rank's device: TTFT and decode tokens/s."""
        from impl.kvstitch.hybrid import decode_loop

        ids = ids.to(self.dev)
        t0 = time.monotonic()
        cache = empty_cache(self.model.config)
        first = forward(self.model, ids, cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        _sync(self.dev)
        t1 = time.monotonic()
        toks = decode_loop(self.model, cache, first, self.cfg.new_tokens)
        _sync(self.dev)
        dec = time.monotonic() - t1
        n = ids.shape[0] * (self.cfg.new_tokens - 1)
        return {"ttft_s": t1 - t0, "decode_s": dec, "decode_tokens_per_s": n / dec if dec > 0 else float("nan"),
                "generated": toks.tolist()}


class DecodeWorker:
    """Rank 1: decode model, (maybe) the stitches; receives the KV, generates, returns the tokens."""

    def __init__(self, job: dict) -> None:
        from impl.kvstitch.models import load_model
        from impl.kvstitch.stitch import StitchBundle

        cfg: RuntimeConfig = job["cfg"]
        self.cfg, self.dev, self.dtype = cfg, cfg.decode_device, _dtype(cfg.dtype)
        self.staged = cfg.backend == "gloo" and self.dev.startswith("cuda")
        self.ctrl = self.dev if cfg.backend == "nccl" else "cpu"
        self.model = load_model(job["decode"], self.dtype, self.dev, cfg.attn)
        self.bundle = StitchBundle.load(job["stitch"], self.dev)
        self.plan = plan_transfer(self.bundle, self.dtype, cfg.stitch_side)

    def serve(self, dump: list | None) -> None:
        from impl.kvstitch.hybrid import decode_loop

        head = torch.empty(4, dtype=torch.float64, device=self.ctrl)
        dist.recv(head, src=0)
        head = head.cpu()
        b, t, n_new, t0 = int(head[0]), int(head[1]), int(head[2]), head[3].item()
        where = "cpu" if self.staged else self.dev
        bufs, handles = [], []
        for _, h, d in self.plan.messages():
            bufs.append(torch.empty(2, b, h, t, d, dtype=self.dtype, device=where))  # K and V of one layer
            handles.append(dist.irecv(bufs[-1], src=0))
        first = torch.empty(b, dtype=torch.long, device=self.ctrl)
        dist.recv(first, src=0)
        for h in handles:
            h.wait()
        kv = [(buf[0].to(self.dev), buf[1].to(self.dev)) for buf in bufs]
        if self.plan.side == "decode":
            src = {i: pair for (i, _, _), pair in zip(self.plan.messages(), kv)}
            tabs = self.bundle.tables(positions_for(b, 0, t, self.dev))
            kv = [self.bundle.stitch_layer(j, src, *tabs, self.dtype) for j in range(self.bundle.dst.num_layers)]
        with torch.no_grad():
            cache = build_cache(self.model.config, kv)
        _sync(self.dev)
        ready = time.monotonic() - t0
        t1 = time.monotonic()
        toks = decode_loop(self.model, cache, first.to(self.dev), n_new)
        _sync(self.dev)
        dec = time.monotonic() - t1
        tps = b * (n_new - 1) / dec if dec > 0 else float("nan")
        dist.send(toks.to(self.ctrl), dst=0)
        dist.send(torch.tensor([ready, dec, tps], dtype=torch.float64, device=self.ctrl), dst=0)
        if dump is not None:
            dump.append([x.cpu().clone() for x in bufs])


def _init(rank: int, job: dict) -> None:
    cfg: RuntimeConfig = job["cfg"]
    torch.set_num_threads(cfg.threads)
    dev = cfg.prefill_device if rank == 0 else cfg.decode_device
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
    kw = {"device_id": torch.device(dev)} if cfg.backend == "nccl" else {}
    dist.init_process_group(cfg.backend, init_method=f"file://{job['rendezvous']}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=cfg.timeout_s), **kw)


def _worker(rank: int, job: dict) -> None:
    import impl  # noqa: F401  (backend decided before anything else in the child)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    _init(rank, job)
    try:
        dump: list | None = [] if job.get("dump") else None
        if job["mode"] == "bandwidth":
            out = _bandwidth(rank, job)
        elif rank == 0:
            w = PrefillWorker(job)
            out = {"requests": [w.serve(ids, dump) for ids in job["requests"]], "plan": w.plan.side}
            if job["cfg"].baseline:
                out["alone"] = [w.alone(ids) for ids in job["requests"]]
        else:
            w = DecodeWorker(job)
            for _ in job["requests"]:
                w.serve(dump)
            out = {}
        if dump is not None:
            out["dump"] = dump
        torch.save(out, Path(job["outdir"]) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(job: dict) -> tuple[dict, dict]:
    """Run both ranks (spawned processes) on ``job``; returns what rank 0 and rank 1 saved."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="kvstitch_rt_") as tmp:
        job = {**job, "rendezvous": os.path.join(tmp, "rdzv"), "outdir": tmp}
        mp.start_processes(_worker, args=(job,), nprocs=2, join=True, start_method="spawn")
        return tuple(torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in (0, 1))


def serve(prefill: str, decode: str, stitch: str, requests: list[torch.Tensor], cfg: RuntimeConfig,
          dump: bool = False) -> tuple[dict, dict]:
    """Serve ``requests`` (each ``[B, T]`` int64) through the two-process runtime."""
    for r in requests:
        if r.dim() != 2 or r.dtype != torch.long or r.shape[1] < 1:
            raise ValueError(f"each request must be a non-empty [batch, tokens] int64 tensor, got {tuple(r.shape)}")
    if cfg.new_tokens < 1:
        raise ValueError("new_tokens must be >= 1")
    if cfg.backend == "nccl" and cfg.prefill_device == cfg.decode_device:
        raise ValueError("NCCL needs one GPU per rank; on one GPU use backend='gloo' (KV staged through host memory)")
    job = {"mode": "serve", "cfg": cfg, "prefill": str(prefill), "decode": str(decode), "stitch": str(stitch),
           "requests": [r.cpu() for r in requests], "dump": dump}
    return launch(job)


# ---- transfer bandwidth (two GPUs over NCCL, or anything else for a smoke run) ----------------------------------

def _bandwidth(rank: int, job: dict) -> dict:
    """Median GB/s of (1) one message of ``total`` bytes, (2) the request's KV as its per-layer messages."""
    cfg: RuntimeConfig = job["cfg"]
    dev = cfg.prefill_device if rank == 0 else cfg.decode_device
    dtype = _dtype(cfg.dtype)
    shapes = [tuple(s) for s in job["shapes"]]
    total = sum(torch.Size(s).numel() for s in shapes)
    big = torch.ones(total, dtype=dtype, device=dev)
    parts = [torch.ones(s, dtype=dtype, device=dev) for s in shapes]
    res: dict[str, list[float]] = {"single": [], "layered": []}
    for rep in range(job["warmup"] + job["reps"]):
        for name, tensors in (("single", [big]), ("layered", parts)):
            dist.barrier()
            _sync(dev)
            t0 = time.monotonic()
            if rank == 0:
                hs = [dist.isend(x, dst=1) for x in tensors]
            else:
                hs = [dist.irecv(x, src=0) for x in tensors]
            for h in hs:
                h.wait()
            _sync(dev)
            dt = torch.tensor([time.monotonic() - t0], dtype=torch.float64, device=dev)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the transfer is done when both sides are
            if rep >= job["warmup"]:
                res[name].append(dt.item())
    nbytes = total * torch.finfo(dtype).bits // 8
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"bytes": nbytes, "messages": len(shapes), "single_s": med["single"], "layered_s": med["layered"],
            "single_gbps": nbytes / med["single"] / 1e9, "layered_gbps": nbytes / med["layered"] / 1e9}


def measure_bandwidth(shapes: list[tuple[int, ...]], cfg: RuntimeConfig, reps: int = 20, warmup: int = 3) -> dict:
    """Both ranks move ``shapes`` (the KV messages of one request) rank 0 -> rank 1; ``pct`` = layered / single."""
    r0, _ = launch({"mode": "bandwidth", "cfg": cfg, "shapes": shapes, "reps": reps, "warmup": warmup})
    return {**r0, "pct_of_p2p": 100 * r0["layered_gbps"] / r0["single_gbps"], "backend": cfg.backend}


def kv_shapes(plan: TransferPlan, batch: int, tokens: int) -> list[tuple[int, ...]]:
    """The runtime's messages for one request: per layer, K and V packed as ``[2, B, H, T, D]``."""
    return [(2, batch, h, tokens, d) for _, h, d in plan.messages()]


def main(argv: list[str] | None = None) -> int:
    import impl  # noqa: F401

    p = argparse.ArgumentParser(prog="python -m impl.kvstitch.runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill", required=True)
    p.add_argument("--decode", required=True)
    p.add_argument("--stitch", required=True)
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--devices", default="cpu,cpu", help="prefill,decode devices, e.g. cuda:0,cuda:1")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--side", default="auto")
    a = p.parse_args(argv)
    dp, dd = a.devices.split(",")
    cfg = RuntimeConfig(backend=a.backend, prefill_device=dp, decode_device=dd, stitch_side=a.side,
                        new_tokens=a.new_tokens, dtype=a.dtype, baseline=True, threads=os.cpu_count() // 2 or 1)
    from impl.kvstitch.stitch import StitchBundle

    vocab = StitchBundle.load(a.stitch).prefill_config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.tokens), generator=torch.Generator().manual_seed(0))
    r0, _ = serve(a.prefill, a.decode, a.stitch, [ids, ids], cfg)
    show = {k: v for k, v in r0["requests"][-1].items() if k != "generated"}
    print(json.dumps({"config": asdict(cfg), "hybrid": show,
                      "alone": {k: v for k, v in r0["alone"][-1].items() if k != "generated"}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
