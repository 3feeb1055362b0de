"""The engine on toy random-weight models: paged KV == contiguous KV, continuous batching == each request alone,
stop tokens and length limits, per-request errors, sampling, CUDA graphs (GPU) and the experiment's smoke run."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.oracle import assert_close
from fixtures.serve import fragmented_cache, tiny_model
from impl import backend
from impl.serve.engine import Engine, EngineConfig
from impl.serve.kv_cache import CacheConfig, PagedKVCache, PagedStep
from impl.serve.attention import make_backend
from impl.serve.reference import ContiguousKV, greedy_contiguous
from impl.serve.cuda_graphs import pack_decode_inputs
from impl.serve.sampling import SamplingParams, sample_checked, sample_one, top_p_filter

DEV = "cuda" if backend.ON_GPU else "cpu"
MODEL = tiny_model(device=DEV)
PROMPTS = [[5], [1, 2, 3, 4, 5, 6, 7], list(range(10, 33)), [96, 0, 96, 0, 42], list(range(60, 96))]


def alone(prompt, params, **cfg) -> list[int]:
    return Engine(MODEL, EngineConfig(**cfg)).generate([prompt], params)[0].tokens


@pytest.mark.parametrize("name,page_size", [("sdpa", 1), ("sdpa", 3), ("sdpa", 16), ("triton", 4)])
def test_paged_engine_equals_contiguous_decoding(name, page_size):
    prompts = PROMPTS if name == "sdpa" or backend.ON_GPU else PROMPTS[1:3]
    outs = Engine(MODEL, EngineConfig(page_size=page_size, attention=name, max_batch=4)).generate(
        prompts, SamplingParams(max_new_tokens=12, stop_token_ids=()))
    for prompt, out in zip(prompts, outs):
        want, _ = greedy_contiguous(MODEL, prompt, 12)
        assert out.tokens == want and out.finish_reason == "length", prompt


@pytest.mark.parametrize("name", ["sdpa", "triton"])
def test_paged_step_logits_equal_contiguous(name):
    """Prefill in two chunks, then three decode steps, through the paged path and the contiguous reference."""
    prompt = list(range(3, 24))
    cache = PagedKVCache(MODEL.args, CacheConfig(16, 4), dtype=MODEL.dtype, device=DEV)
    ref = ContiguousKV(MODEL, 40)
    chunks = [prompt[:13], prompt[13:], [7], [8], [9]]
    start = 0
    for chunk in chunks:
        cache.reserve(0, start + len(chunk))
        meta = cache.metadata([(0, start, len(chunk))], DEV)
        tokens = torch.tensor(chunk, device=DEV)
        with torch.no_grad():
            got = MODEL(tokens, PagedStep(cache, make_backend(name), meta, None))
            ref.positions = torch.arange(start, start + len(chunk), device=DEV)
            want = MODEL(tokens, ref)
        assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"chunk at {start}")
        start += len(chunk)


REQUESTS = [  # (prompt, max_new_tokens, arrival step, temperature, top_p)
    (PROMPTS[1], 9, 0, 0.0, 1.0), (PROMPTS[2], 3, 0, 0.9, 0.8), (PROMPTS[0], 12, 1, 0.0, 1.0),
    (PROMPTS[3], 1, 2, 1.3, 1.0), (PROMPTS[4], 7, 2, 0.7, 0.5), ([4, 4, 4], 10, 5, 0.0, 1.0),
]


@pytest.mark.parametrize("name", ["sdpa", "triton"])
def test_continuous_batching_equals_each_request_alone(name):
    """Requests arrive at different steps, queue behind max_batch, and leave at different lengths."""
    reqs = REQUESTS if name == "sdpa" or backend.ON_GPU else REQUESTS[:3]
    cfg = dict(attention=name, page_size=4, max_batch=3)
    params = [SamplingParams(max_new_tokens=n, temperature=t, top_p=p, seed=100 + i, stop_token_ids=())
              for i, (_, n, _, t, p) in enumerate(reqs)]
    engine = Engine(MODEL, EngineConfig(**cfg))
    ids, step = {}, 0
    while len(ids) < len(reqs) or engine.has_unfinished():
        for i, (prompt, _, arrival, _, _) in enumerate(reqs):
            if arrival == step:
                ids[i] = engine.add_request(prompt, params[i])
        engine.step()
        assert len(engine.running) <= 3
        step += 1
    for i, (prompt, n, *_rest) in enumerate(reqs):
        out = engine.done[ids[i]]
        assert out.tokens == alone(prompt, params[i], **cfg) and len(out.tokens) == n, i


def test_admit_every_groups_prefills_and_keeps_each_result():
    """With admit_every=3, arrivals while others decode wait for the third decode step since the last admission and
    prefill together there, and every result equals the request alone."""
    params = SamplingParams(max_new_tokens=8, stop_token_ids=())
    engine = Engine(MODEL, EngineConfig(attention="sdpa", page_size=4, max_batch=4, admit_every=3))
    first = engine.add_request(PROMPTS[1], params)
    engine.step()  # nothing running: admitted at once
    late = [engine.add_request(p, params) for p in (PROMPTS[0], PROMPTS[3])]
    waited = 0
    while any(r.id in late for r in engine.waiting):
        engine.step()
        waited += 1
    assert engine.stats["prefill_steps"] == 2 and waited == 2  # decode steps 1, 2 alone; step 3 admits both
    while engine.has_unfinished():
        engine.step()
    for rid, prompt in zip([first, *late], [PROMPTS[1], PROMPTS[0], PROMPTS[3]]):
        assert engine.done[rid].tokens == alone(prompt, params, attention="sdpa"), rid
    with pytest.raises(ValueError, match="admit_every"):
        EngineConfig(admit_every=0)


def test_stop_tokens_and_length_limits():
    free = alone(PROMPTS[1], SamplingParams(max_new_tokens=10, stop_token_ids=()))
    stop = free[4]
    first = free.index(stop)
    out = Engine(MODEL).generate([PROMPTS[1]], SamplingParams(max_new_tokens=10, stop_token_ids=(stop, 96)))[0]
    assert out.finish_reason == "stop" and out.tokens == free[: first + 1]
    # the context end: 20 prompt tokens in a 24-token context leave room for 4
    engine = Engine(MODEL, EngineConfig(max_seq_len=24))
    out = engine.generate([list(range(20))], SamplingParams(16, stop_token_ids=()))[0]
    assert out.finish_reason == "length" and len(out.tokens) == 4
    assert out.tokens == greedy_contiguous(MODEL, list(range(20)), 4)[0]


def test_errors_stay_with_their_request():
    engine = Engine(MODEL, EngineConfig(max_seq_len=32, num_pages=5, page_size=4))
    prompts = [PROMPTS[1], list(range(40)), [], [3, 97], list(range(20)), "text", PROMPTS[0], [1.5, 2]]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=5, stop_token_ids=()))
    errors = [o.error for o in outs]
    assert errors[0] is None and errors[6] is None
    assert "prompt has 40 tokens" in errors[1] and "context holds 32" in errors[1]
    assert "empty prompt" in errors[2]
    assert "token id 97" in errors[3]
    assert "needs 6 pages, the whole cache has 5" in errors[4]
    assert "tokenizer" in errors[5]
    assert "integer token ids" in errors[7]
    with pytest.raises(ValueError, match="max_batch"):
        EngineConfig(max_batch=0)
    assert outs[0].tokens == alone(PROMPTS[1], SamplingParams(5, stop_token_ids=()))
    assert outs[6].tokens == alone(PROMPTS[0], SamplingParams(5, stop_token_ids=()))


def test_running_out_of_pages_stops_only_the_request_that_needs_one():
    engine = Engine(MODEL, EngineConfig(num_pages=6, page_size=4, max_batch=4))
    long, short = SamplingParams(max_new_tokens=30, stop_token_ids=()), SamplingParams(6, stop_token_ids=())
    outs = engine.generate([PROMPTS[2][:10], PROMPTS[1]], [long, short])
    assert outs[0].finish_reason == "error" and "out of KV pages" in outs[0].error
    assert 0 < len(outs[0].tokens) < 30
    assert outs[0].tokens == alone(PROMPTS[2][:10], long)[: len(outs[0].tokens)]
    assert outs[1].error is None and outs[1].tokens == alone(PROMPTS[1], short)
    assert engine.cache.allocator.num_free == 6, "pages leaked"


@given(logits=st.lists(st.floats(-8, 8), min_size=1, max_size=40), p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_nucleus(logits, p):
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    kept = top_p_filter(probs, p)
    assert_close(kept.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    mask = kept > 0
    order = torch.sort(probs, descending=True, stable=True).indices
    n = int(mask.sum())
    assert bool(mask[order[:n]].all()), "the nucleus is not a prefix of the sorted tokens"
    assert float(probs[order[:n]].sum()) >= min(p, 1.0) - 1e-9 or n == len(logits)
    assert n == 1 or float(probs[order[: n - 1]].sum()) < p, "the nucleus is not the smallest one"


def test_sampling_is_seeded_and_degenerates_to_greedy():
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=7, stop_token_ids=())
    a, b = alone(PROMPTS[1], params), alone(PROMPTS[1], params)
    assert a == b
    tiny_nucleus = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3, stop_token_ids=())
    assert alone(PROMPTS[1], tiny_nucleus) == alone(PROMPTS[1], SamplingParams(8, stop_token_ids=()))
    logits = torch.tensor([0.0, 3.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    draws = [sample_one(logits, SamplingParams(temperature=1.0), gen) for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).double() / 3000
    assert_close(freq, torch.softmax(logits.double(), 0), rtol=0, atol=0.04)


def test_sampling_params_reject_bad_values():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0),
                dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_engine_reports_its_choices():
    d = Engine(MODEL, EngineConfig(attention="auto")).describe()
    assert d["attention_backend"] in ("flashinfer", "triton", "sdpa") and d["attention_reason"].startswith("auto")
    assert d["linear_paths"] == {"dense": 4 * MODEL.args.n_layers} and d["kv_dtype"] == "float32"


@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=9), page_size=st.sampled_from([1, 4, 16]),
       pad=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_packed_graph_inputs_equal_the_step_metadata(lengths, page_size, pad, seed):
    """The CUDA-graph step's host packing gives each live row what ``metadata`` (the eager path) gives it, and the
    bucket's padding rows token 0, position 0, slot 0 and length 0; rows past the bucket keep their poison."""
    cache = fragmented_cache(MODEL.args, lengths, page_size, seed=seed)
    seqs = [(b, n - 1, 1) for b, n in enumerate(lengths)]
    last = [(7 * b + 3) % MODEL.args.vocab_size for b in range(len(lengths))]
    rows, n = len(lengths) + pad, len(lengths) + pad + 2
    width = max(cache.pages_for(x) for x in lengths) + 1
    ids, lens_tables = np.full((3, n), -5, np.int64), np.full(n + n * width, -5, np.int32)
    pack_decode_inputs(seqs, last, cache.block_tables, page_size, rows, ids, lens_tables, n, width)
    meta = cache.metadata(seqs, "cpu")
    b = len(lengths)
    assert ids[0, :b].tolist() == last
    assert ids[1, :b].tolist() == meta.positions.tolist() and ids[2, :b].tolist() == meta.slot_mapping.tolist()
    assert lens_tables[:b].tolist() == meta.seq_lens.tolist()
    tables = lens_tables[n:].reshape(n, width)
    for i, t in enumerate(meta.block_tables_host):
        assert tables[i, :len(t)].tolist() == t and not tables[i, len(t):].any()
    assert not ids[:, b:rows].any() and not lens_tables[b:rows].any() and not tables[b:rows].any()
    assert (ids[:, rows:] == -5).all() and (lens_tables[rows:n] == -5).all() and (tables[rows:] == -5).all()


def test_packing_refuses_a_batch_larger_than_its_bucket():
    cache = fragmented_cache(MODEL.args, [5, 6], 4, seed=0)
    with pytest.raises(ValueError, match="bucket of 1 rows"):
        pack_decode_inputs([(0, 4, 1), (1, 5, 1)], [1, 2], cache.block_tables, 4, 1, np.zeros((3, 4), np.int64),
                           np.zeros(4 + 4 * 3, np.int32), 4, 3)


def test_checked_sampling_flags_non_finite_rows_in_one_read():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    logits[1, 4], logits[2, 0] = float("nan"), float("inf")
    params = [SamplingParams(), SamplingParams(), SamplingParams(), SamplingParams(temperature=0.7, seed=3)]
    gens = [None, None, None, torch.Generator().manual_seed(3)]
    tokens, finite = sample_checked(logits, params, gens)
    assert finite == [True, False, False, True]
    assert tokens[:3] == torch.argmax(logits[:3], dim=-1).tolist()
    assert tokens[3] == sample_one(logits[3], params[3], torch.Generator().manual_seed(3))


def test_step_profile_sums_kernel_time_and_counts_launches():
    from types import SimpleNamespace as NS

    from impl.serve.profile import summarize_events

    def ev(name, device, us=0.0, self_us=0.0):
        dt = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
        return NS(name=name, device_type=dt, time_range=NS(elapsed_us=lambda: us), self_cpu_time_total=self_us)

    events = [ev("gemv", True, 30.0), ev("gemv", True, 10.0), ev("attn", True, 20.0), ev("cudaLaunchKernel", False,
              self_us=5.0), ev("cudaGraphLaunch", False, self_us=7.0), ev("aten::argmax", False, self_us=3.0)]
    d = summarize_events(events, wall_s=120e-6)
    assert d["kernel_s"] == pytest.approx(60e-6) and d["busy"] == pytest.approx(0.5)
    assert d["launches"] == 2 and d["kernels"] == 3
    assert d["top_kernels"][0] == {"name": "gemv", "calls": 2, "s": pytest.approx(40e-6)}
    assert [o["name"] for o in d["top_host_ops"]] == ["cudaGraphLaunch", "cudaLaunchKernel", "aten::argmax"]


def test_profiled_steps_prefill_then_decode_and_leave_the_engine_idle():
    from impl.serve.profile import profile_steps

    engine = Engine(MODEL, EngineConfig(max_batch=4))
    params = SamplingParams(max_new_tokens=4, stop_token_ids=())
    keys = ("TEARDOWN_CUPTI", "DISABLE_CUPTI_LAZY_REINIT")
    env = {k: os.environ.get(k) for k in keys}
    d = profile_steps(engine, PROMPTS[:3], params)
    # CUPTI stays up between the two windows on a GPU (graphs); a CPU run leaves the environment alone
    assert [os.environ.get(k) for k in keys] == (["0", "1"] if backend.ON_GPU else [env[k] for k in keys])
    assert d["prompts"] == 3 and d["prompt_tokens"] == sum(len(p) for p in PROMPTS[:3])
    assert engine.stats["prefill_steps"] == 1 and not engine.has_unfinished() and not engine.done
    for step in ("first", "decode"):
        assert d[step]["wall_s"] > 0 and d[step]["top_host_ops"]
        assert (d[step]["kernel_s"] > 0) == backend.ON_GPU
    with pytest.raises(ValueError, match="max_new_tokens >= 3"):
        profile_steps(engine, PROMPTS[:1], SamplingParams(max_new_tokens=2))
    engine.add_request(PROMPTS[0], params)
    with pytest.raises(ValueError, match="idle engine"):
        profile_steps(engine, PROMPTS[:1], params)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype,fp8_linears", [(None, False), (torch.float8_e4m3fn, False), (None, True)],
                         ids=["kv-model-dtype", "kv-fp8", "fp8-linears-bf16"])
def test_cuda_graph_decode_equals_eager(kv_dtype, fp8_linears):
    from impl.serve import fp8_adapter

    model = MODEL
    if fp8_linears:
        model = fp8_adapter.quantize_model_(tiny_model("tiny-8b-shaped", device=DEV, dtype=torch.bfloat16, std=0.05))
        assert all(p.startswith("w8a16") for p in fp8_adapter.linear_paths(model))
    params = [SamplingParams(max_new_tokens=n, stop_token_ids=()) for n in (3, 17, 9, 12, 5)]
    cfg = dict(attention="triton", max_batch=8, page_size=16, kv_dtype=kv_dtype)
    eager = Engine(model, EngineConfig(cuda_graphs=False, **cfg)).generate(PROMPTS, params)
    graphed_engine = Engine(model, EngineConfig(cuda_graphs=True, **cfg))
    graphed = graphed_engine.generate(PROMPTS, params)
    assert [o.tokens for o in graphed] == [o.tokens for o in eager]
    assert graphed_engine.graphs.graphs, "no graph was captured"
    upfront = Engine(model, EngineConfig(cuda_graphs=True, **cfg))  # every bucket captured before the first step
    assert upfront.capture_graphs() == 4 and sorted(upfront.graphs.graphs) == [1, 2, 4, 8]
    assert upfront.capture_graphs() == 0
    assert [o.tokens for o in upfront.generate(PROMPTS, params)] == [o.tokens for o in eager]


def test_experiments_smoke_feeds_claims_and_plot(capsys, tmp_path):
    """The experiment runs on the CPU at toy size and writes nothing; its record evaluates the claims and plots."""
    import json

    from impl.common.ledger import ResultsView, clean_commit, evaluate
    from impl.common.results import RESULTS
    from impl.serve import claims, experiments, plots

    before = sorted(RESULTS.rglob("serve/*"))
    assert experiments.main(["--smoke"]) == 0
    assert sorted(RESULTS.rglob("serve/*")) == before
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["fp8"]["engine"]["linear_paths"] == {"w8a16-triton-or-mma | dequant-torch | deferred per GEMM table": 8}
    a = data["model_args"]  # e4m3 weights + one fp32 scale per output channel, over fp32 weights
    shapes = [(a["n_heads"] + 2 * a["n_kv_heads"]) * a["head_dim"], a["dim"], 2 * a["ffn_dim"], a["dim"]]
    ins = [a["dim"], a["n_heads"] * a["head_dim"], a["dim"], a["ffn_dim"]]
    want = sum(n * k + 4 * n for n, k in zip(shapes, ins)) / sum(4 * n * k for n, k in zip(shapes, ins))
    assert data["fp8_weight_mem_ratio"] == pytest.approx(want)
    (tmp_path / "fake" / "serve").mkdir(parents=True)
    record = {"device": "fake GPU", "commit": clean_commit(), "date": "2026-01-01", "data": data}
    (tmp_path / "fake" / "serve" / f"{claims.RESULT}.json").write_text(json.dumps(record))
    view = ResultsView("fake", root=tmp_path)
    rows = {c.id: evaluate(c, view) for c in claims.CLAIMS}
    assert rows["serve.fp8_weight_mem_ratio"]["verdict"] == "pass"
    lo, hi = data["fp8_decode_speedup_lo"]["1"], data["fp8_decode_speedup_hi"]["1"]
    assert lo <= data["fp8_decode_speedup"]["1"] <= hi  # the median ratio inside its bootstrap interval
    assert rows["serve.fp8_decode_speedup_b1"]["measured_value"] == pytest.approx(lo, rel=1e-5)
    assert rows["serve.bw_pct_b1"]["verdict"] == "not measured"  # no copy bandwidth on a CPU
    assert rows["serve.fp8_decode_speedup_b128"]["verdict"] == "not measured"  # the smoke run has batches 1 and 3
    assert data["complete"] and data["run_id"] and data["selected_in_run"] is None  # the rule: no tune run
    pngs = plots.plot_tokens_per_s(view, tmp_path)
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000
    assert plots.plot_tokens_per_s(ResultsView("none", root=tmp_path), tmp_path) == []


def test_http_completions_batch_concurrent_clients():
    """Concurrent /v1/completions clients share the engine; each gets what it would get alone; bad input -> 400."""
    import json
    import threading
    import urllib.error
    import urllib.request

    from impl.serve.server import make_server

    server = make_server(Engine(MODEL, EngineConfig(page_size=4, max_batch=4)), "tiny", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def post(body):
        req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        bodies = [{"prompt": p, "max_tokens": n, "temperature": 0} for p, n in zip(PROMPTS, (5, 9, 2, 7, 4))]
        bodies.append({"prompt": [[1, 2], [3, 97]], "max_tokens": 3})
        replies = [None] * len(bodies)
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, post(bodies[i])))
                   for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        for body, (code, reply) in zip(bodies[:-1], replies[:-1]):
            assert code == 200, reply
            want = alone(body["prompt"], SamplingParams(body["max_tokens"]), page_size=4)
            assert reply["choices"][0]["token_ids"] == want
            assert reply["usage"]["completion_tokens"] == len(want)
        code, reply = replies[-1]
        assert code == 400 and "token id 97" in reply["error"]["message"]
        assert post({"prompt": 3})[0] == 400
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["id"] == "tiny"
    finally:
        server.shutdown()
        server.loop.close()
        server.server_close()


def test_capturing_graphs_without_cuda_graphs_captures_none():
    engine = Engine(MODEL, EngineConfig(cuda_graphs=False))
    assert engine.capture_graphs() == 0 and engine.graphs is None
