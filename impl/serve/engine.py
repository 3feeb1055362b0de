"""The serving engine: ``generate(prompts, sampling)`` with continuous batching over the paged KV cache.

Each ``step()``: (1) admit waiting requests in arrival order while the batch has room (``max_batch`` sequences,
``max_prefill_tokens`` prompt tokens) and the cache has pages, and prefill them together in one flat forward, which
samples each one's first token; (2) run one decode forward over every running sequence (one new token each, through a
captured CUDA graph when enabled); (3) retire requests that hit a stop token, ``max_new_tokens`` or the context end,
freeing their pages. Requests therefore join and leave the batch between decode steps.

Errors belong to one request: a prompt that is not text or one-dimensional integer token ids (any container, any
byte order), an empty prompt, a token id outside the vocabulary, a prompt that leaves no room in the context, a
prompt needing more pages than the whole cache, running out of pages while decoding, or non-finite logits end that
request with ``finish_reason="error"`` and a message; the others continue. ``prepare`` runs the prompt checks alone
(a server validates a whole batch with it before queueing any of it).
"""
from __future__ import annotations

import numbers
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from impl.serve.attention import select_backend
from impl.serve.kv_cache import CacheConfig, OutOfPages, PagedKVCache, PagedStep, last_token_rows
from impl.serve.model import Transformer
from impl.serve.sampling import SEED_LIMIT, SamplingParams, make_generator, sample_checked


@dataclass(frozen=True)
class EngineConfig:
    """Batching and cache limits. ``num_pages`` 0 = enough for ``max_batch`` full contexts, capped by
    ``kv_cache_bytes`` (0 = half the free GPU memory, or 512 MiB on a CPU). ``cuda_graphs`` None = on when the device
    is a GPU and the attention backend is graph-safe. ``admit_every``: while sequences are decoding, waiting requests
    are admitted (and prefilled together in one forward) only on every ``admit_every``-th decode step; with nothing
    running they are admitted at once. 1 prefills new arrivals before every decode step; larger values prefill fewer,
    bigger groups (fewer uncaptured forwards per generated token) and add at most that many decode steps to a
    request's time to first token."""

    page_size: int = 16
    num_pages: int = 0
    kv_cache_bytes: int = 0
    max_batch: int = 64
    max_prefill_tokens: int = 8192
    max_seq_len: int | None = None
    kv_dtype: torch.dtype | None = None
    attention: str = "auto"
    cuda_graphs: bool | None = None
    seed: int = 0
    admit_every: int = 1

    def __post_init__(self) -> None:
        if (self.max_batch < 1 or self.max_prefill_tokens < 1 or self.page_size < 1 or self.num_pages < 0
                or self.admit_every < 1):
            raise ValueError("max_batch, max_prefill_tokens, page_size and admit_every must be >= 1 and num_pages "
                             f">= 0: {self}")


@dataclass
class Completion:
    """The result of one request. ``tokens`` include the stop token when one ended it; ``text`` excludes it."""

    request_id: int
    prompt_tokens: list[int]
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    text: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    arrival: float
    output: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


class Engine:
    """Serve ``model`` (any dtype, dense or FP8 linears) with a paged KV cache and continuous batching."""

    def __init__(self, model: Transformer, cfg: EngineConfig = EngineConfig(), tokenizer: Any = None) -> None:
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.device = model.device
        self.max_seq_len = min(cfg.max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        pages = cfg.num_pages or self._default_pages()
        self.cache = PagedKVCache(model.args, CacheConfig(pages, cfg.page_size, cfg.kv_dtype),
                                  dtype=model.dtype, device=self.device)
        a = model.args
        self.backend, self.backend_reason = select_backend(cfg.attention, self.device,
                                                           (a.n_heads, a.n_kv_heads, a.head_dim, model.dtype))
        use_graphs = cfg.cuda_graphs if cfg.cuda_graphs is not None else (
            self.device.type == "cuda" and self.backend.graph_safe)
        if use_graphs and not (self.device.type == "cuda" and self.backend.graph_safe):
            raise ValueError(f"CUDA graphs need a CUDA model and a graph-safe backend, not {self.backend.name} on "
                             f"{self.device}")
        self.graphs = None
        if use_graphs:
            from impl.serve.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.cache, self.backend, cfg.max_batch, self.max_seq_len)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.done: dict[int, Completion] = {}
        self._next_id = 0
        self.stats = {"prefill_steps": 0, "decode_steps": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "generated_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0}
        self._steps_since_admit = 0

    def _default_pages(self) -> int:
        a, cfg = self.model.args, self.cfg
        item = 1 if cfg.kv_dtype == torch.float8_e4m3fn else self.model.dtype.itemsize
        page_bytes = 2 * a.n_layers * cfg.page_size * a.n_kv_heads * a.head_dim * item
        budget = cfg.kv_cache_bytes or (torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda"
                                        else 512 << 20)
        return max(1, min(cfg.max_batch * -(-self.max_seq_len // cfg.page_size), budget // page_bytes))

    def describe(self) -> dict[str, Any]:
        """The choices this engine made, for logs and results (nothing is chosen silently)."""
        from impl.serve.fp8_adapter import fp8_status, linear_paths

        return {"attention_backend": self.backend.name, "attention_reason": self.backend_reason,
                "cuda_graphs": self.graphs is not None, "fused_kernels": bool(getattr(self.model, "fused", False)),
                "page_size": self.cache.page_size,
                "num_pages": self.cache.cfg.num_pages, "kv_dtype": str(self.cache.store_dtype).replace("torch.", ""),
                "model_dtype": str(self.model.dtype).replace("torch.", ""),
                "linear_paths": linear_paths(self.model), **fp8_status(),
                "max_batch": self.cfg.max_batch, "max_seq_len": self.max_seq_len}

    # ---- requests ----------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams()) -> int:
        """Queue a prompt (text needs a tokenizer); returns its id. A bad request is finished at once with its error."""
        rid, self._next_id = self._next_id, self._next_id + 1
        seed = params.seed if params.seed is not None else (self.cfg.seed * 1_000_003 + rid) % SEED_LIMIT
        stop = params.stop_token_ids if params.stop_token_ids is not None else self.model.args.eos_token_ids
        ids: list[int] = []
        try:
            ids = self.prepare(prompt)
            gen = None if params.greedy else make_generator(seed, self.device)
        except (TypeError, ValueError) as e:
            req = Request(rid, ids, params, frozenset(stop), None, time.perf_counter())
            self._finish(req, "error", str(e))
        else:
            self.waiting.append(Request(rid, ids, params, frozenset(stop), gen, time.perf_counter()))
        return rid

    def prepare(self, prompt: str | Sequence[int]) -> list[int]:
        """The token ids of a prompt, checked against the vocabulary, the context and the cache; ValueError (or
        TypeError) naming the problem. Reads only the engine's fixed settings: safe from any thread."""
        ids = self._tokenize(prompt)
        err = self._check_prompt(ids)
        if err:
            raise ValueError(err)
        return ids

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError("a text prompt needs a tokenizer; pass token ids or give the engine a tokenizer")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"the prompt text is not valid Unicode ({e.reason} at character {e.start})") from None
            return [int(t) for t in self.tokenizer(prompt)["input_ids"]]
        what = type(prompt).__name__
        if isinstance(prompt, (torch.Tensor, np.ndarray)):
            if prompt.ndim != 1:
                raise ValueError(f"token ids must be one-dimensional, got a {what} of shape {tuple(prompt.shape)}")
            if isinstance(prompt, torch.Tensor):
                integer = not (prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool)
            else:
                integer = prompt.dtype.kind in "iu"
            if not integer:
                raise ValueError(f"a prompt must be text or a sequence of integer token ids, got a {what} of "
                                 f"{prompt.dtype}")
            return [int(t) for t in prompt.tolist()]  # tolist reads any byte order as its values
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
            raise ValueError(f"a prompt must be text or a sequence of integer token ids, got {what}")
        ids = list(prompt)
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, (bool, np.bool_)) for t in ids):
            raise ValueError("a prompt must be text or a sequence of integer token ids")
        return [int(t) for t in ids]

    def _check_prompt(self, ids: list[int]) -> str | None:
        vocab = self.model.args.vocab_size
        if not ids:
            return "empty prompt: at least one token is needed"
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary [0, {vocab})"
        if len(ids) >= self.max_seq_len:
            return (f"prompt has {len(ids)} tokens; the context holds {self.max_seq_len}, so at least one token "
                    "must be left to generate")
        need = self.cache.pages_for(len(ids) + 1)
        if need > self.cache.cfg.num_pages:
            return f"out of KV pages: the prompt needs {need} pages, the whole cache has {self.cache.cfg.num_pages}"
        return None

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.id in self.cache.block_tables:
            self.cache.release(req.id)
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode([t for t in req.output if t not in req.stop_ids], skip_special_tokens=True)
        now = time.perf_counter()
        self.done[req.id] = Completion(
            req.id, req.prompt, list(req.output), reason, error, text,
            None if req.first_token_at is None else req.first_token_at - req.arrival, now - req.arrival)

    def abort(self, rid: int, reason: str = "aborted") -> None:
        """Finish a waiting or running request now (its pages return to the free list)."""
        for queue in (self.waiting, self.running):
            for r in list(queue):
                if r.id == rid:
                    queue.remove(r)
                    self._finish(r, "error", reason)

    def _progress_mark(self) -> int:
        return self.stats["prefill_steps"] + self.stats["decode_steps"] + len(self.done)

    def capture_graphs(self) -> int:
        """Capture the decode graph of every batch bucket now (between steps); returns how many were new (0 without
        CUDA graphs)."""
        return self.graphs.capture_all() if self.graphs is not None else 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- steps -------------------------------------------------------------------------------------------------

    def step(self) -> list[int]:
        """One scheduling round (admit + prefill, then decode); returns the ids finished in it."""
        before = set(self.done)
        if not self.running or self._steps_since_admit + 1 >= self.cfg.admit_every:
            batch = self._admit()
            if batch:
                self._steps_since_admit = 0
                t0 = time.perf_counter()
                self._prefill(batch)
                self.stats["prefill_s"] += time.perf_counter() - t0
        if self.running:
            t0 = time.perf_counter()
            self._decode()
            self.stats["decode_s"] += time.perf_counter() - t0
            self._steps_since_admit += 1
        return sorted(set(self.done) - before)

    def _admit(self) -> list[Request]:
        batch: list[Request] = []
        budget = self.cfg.max_prefill_tokens
        while self.waiting and len(self.running) + len(batch) < self.cfg.max_batch:
            req = self.waiting[0]
            if batch and len(req.prompt) > budget:
                break  # a prompt longer than the budget is admitted alone
            try:
                self.cache.reserve(req.id, len(req.prompt))
            except OutOfPages:
                break  # wait for running requests to free pages (arrival order is kept)
            batch.append(self.waiting.popleft())
            budget -= len(req.prompt)
        return batch

    @torch.inference_mode()
    def _prefill(self, batch: list[Request]) -> None:
        if not batch:
            return
        meta = self.cache.metadata([(r.id, 0, len(r.prompt)) for r in batch], self.device)
        tokens = torch.tensor([t for r in batch for t in r.prompt], dtype=torch.int64, device=self.device)
        logits = self.model(tokens, PagedStep(self.cache, self.backend, meta, last_token_rows(meta)))
        self.stats["prefill_steps"] += 1
        self.stats["prefill_tokens"] += len(tokens)
        self.running.extend(batch)
        self._accept(batch, logits)

    @torch.inference_mode()
    def _decode(self) -> None:
        batch: list[Request] = []
        for r in list(self.running):
            try:
                self.cache.reserve(r.id, r.length)  # room for the last sampled token, written by this step
                batch.append(r)
            except OutOfPages as e:
                self.running.remove(r)
                self._finish(r, "error", f"{e} (request stopped after {len(r.output)} tokens)")
        if not batch:
            return
        seqs = [(r.id, r.length - 1, 1) for r in batch]
        last = [r.output[-1] for r in batch]
        if self.graphs is not None and self.graphs.fits(len(batch)):
            logits = self.graphs.run(seqs, last)
        else:
            meta = self.cache.metadata(seqs, self.device)
            tokens = torch.tensor(last, dtype=torch.int64, device=self.device)
            logits = self.model(tokens, PagedStep(self.cache, self.backend, meta, None))
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(batch)
        self._accept(batch, logits)

    def _accept(self, batch: list[Request], logits: torch.Tensor) -> None:
        """Sample one token per request from logits [B, V] and retire the finished ones."""
        tokens, finite = sample_checked(logits, [r.params for r in batch], [r.generator for r in batch])
        now = time.perf_counter()  # after the host read of the tokens, so the GPU work is done
        for r, tok, ok in zip(batch, tokens, finite):
            if not ok:
                self.running.remove(r)
                self._finish(r, "error", f"non-finite logits after {len(r.output)} tokens")
                continue
            r.output.append(tok)
            r.first_token_at = r.first_token_at or now
            self.stats["generated_tokens"] += 1
            reason = ("stop" if tok in r.stop_ids else "length" if len(r.output) >= r.params.max_new_tokens
                      or r.length >= self.max_seq_len else None)
            if reason:
                self.running.remove(r)
                self._finish(r, reason)

    # ---- the API -----------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 progress: Callable[[int, int, int], None] | None = None) -> list[Completion]:
        """Complete every prompt; results in prompt order. ``progress(finished, total, tokens_generated)``."""
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling settings for {len(prompts)} prompts")
        ids = [self.add_request(p, s) for p, s in zip(prompts, params)]
        while any(i not in self.done for i in ids):
            mark = self._progress_mark()
            self.step()
            if mark == self._progress_mark():
                raise RuntimeError("scheduler stalled: requests wait but no step could run (a bug)")
            if progress is not None:
                progress(sum(i in self.done for i in ids), len(ids), self.stats["generated_tokens"])
        return [self.done.pop(i) for i in ids]
