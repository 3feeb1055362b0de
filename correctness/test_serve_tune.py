"""The measuring tools at toy size on the CPU: the tune run and its table, batch-invariant serving, the endpoint load
test, auto's per-phase attention choice, and flashinfer's carry-and-install path."""
import json
import os
import zipfile

import pytest
import torch

from fixtures.serve import host_matmul_rows_invariant, tiny_model
from impl import backend
from impl.serve import choose, flashinfer_setup, fp8_adapter, tune
from impl.serve.attention import PhaseBackend, choose_phases, make_backend
from impl.serve.kv_cache import CacheConfig, PagedKVCache, PagedStep, last_token_rows

pytestmark = pytest.mark.skipif(backend.ON_GPU, reason="toy-size CPU runs of the GPU tools")


@pytest.mark.slow  # ~10-15 s: a whole tune run in the interpreter
def test_tune_smoke_checks_times_and_writes_a_loadable_table(tmp_path, capsys):
    assert tune.main(["--smoke", "--out", str(tmp_path), "--no-decode-step"]) == 0
    data = json.loads((tmp_path / "tune.json").read_text())["data"]
    assert data["complete"] and not data["skipped"]
    for pair in data["pairs"]:
        kinds = {r["kind"] for r in pair["candidates"]}
        assert {"bf16", "inner", "w8a16", "deferred"} <= kinds, pair["projection"]
        anchors = [r for r in pair["candidates"] if r["kind"] == "anchor"]
        want = ["read_anchor", "stream_anchor"] if pair["m"] == 1 else []
        assert [r["candidate"] for r in anchors] == want, pair["m"]
        assert all(r["median_us"] > 0 and r["weight_gbps"] > 0 for r in anchors)
        served = [r for r in pair["candidates"] if r["kind"] != "anchor"]
        for r in served:  # every candidate passed its float64 check before it was timed
            assert r["check"]["ok"] and r["check"]["worst_of_bound"] < 0.5 and r["median_us"] > 0, r
        assert pair["best"] == min((r for r in served if r["kind"] != "bf16"),
                                   key=lambda r: r["median_us"])["candidate"]  # the read anchor never serves
    assert {p["projection"] for p in data["pairs"] if p["swiglu"]} == {"w2"}  # w2 measured as the model calls it
    table = choose.GemmTable.load(tmp_path / "gemm_table.json")
    assert table.selected_in_run == data["run_id"]
    shapes = data["shapes"]
    for name, (n, k) in shapes.items():
        assert {m for m, _ in table.entries[(n, k)]} == set(data["config"]["ms"]), name
    assert "best FP8" in capsys.readouterr().out


def test_decode_step_keeps_the_fastest_variant_with_the_same_logits():
    """The decode-step comparison: the batch-1 W8A16 entries get the L2 prefetch (other M and ``inner`` unchanged);
    the fastest variant whose logits equal the plain table's bit for bit serves, with its PDL flag and entries; a
    faster variant with other logits is refused; no measurement keeps PDL off."""
    from impl.serve.fp8_gemv import GemvConfig

    cfg = GemvConfig(dot=True, bits=True, block_n=64, block_k=128, splits=4, num_stages=4)
    tile = choose.GemmChoice("w8a16", cfg)
    table = choose.GemmTable({(4096, 4096): [(1, tile), (8, tile)], (6144, 4096): [(1, choose.GemmChoice("inner"))]},
                             selected_in_run="r1")
    pf = tune.prefetch_batch1(table, 16)
    assert [c.config.prefetch for _, c in pf.entries[(4096, 4096)]] == [16, 0]
    assert pf.entries[(6144, 4096)][0][1].path == "inner" and table.entries[(4096, 4096)][0][1].config.prefetch == 0
    steps = {"fp8_table": {"decode_step_ms": 3.2}, "fp8_table_pdl": {"decode_step_ms": 3.3},
             "fp8_table_pdl_f16": {"decode_step_ms": 2.9}, "fp8_table_pdl_f32": {"decode_step_ms": 2.5},
             "fp8_table_f16": {"decode_step_ms": 3.0}}
    same = torch.zeros(3)
    logits = {"fp8_table": same, "fp8_table_pdl": same.clone(), "fp8_table_pdl_f16": same.clone(),
              "fp8_table_pdl_f32": same + 1, "fp8_table_f16": same.clone(), "fp8_rule": same + 2}
    picked = tune.pick_variant(steps, logits)
    assert picked["decode_choice"] == "fp8_table_pdl_f16" and picked["pdl_chosen"]
    assert picked["bitwise_equal"] == {"fp8_table_pdl": True, "fp8_table_pdl_f16": True, "fp8_table_pdl_f32": False,
                                       "fp8_table_f16": True}
    decode = {**picked, "variant_tables": {"fp8_table": table.to_data(),
                                           "fp8_table_pdl_f16": tune.replace(pf, pdl=True).to_data()}}
    chosen = tune.chosen_table(table, decode)
    assert chosen.pdl and chosen.selected_in_run == "r1"
    assert chosen.lookup(4096, 4096, 1).config.prefetch == 16 and chosen.lookup(4096, 4096, 8).config.prefetch == 0
    assert tune.pick_variant({**steps, "fp8_table": {"decode_step_ms": 2.0}}, logits)["decode_choice"] == "fp8_table"
    no_pdl = tune.pick_variant({**steps, "fp8_table_f16": {"decode_step_ms": 2.0}}, logits)
    assert no_pdl["decode_choice"] == "fp8_table_f16" and not no_pdl["pdl_chosen"]
    tie = {name: {"decode_step_ms": 3.2 * (1 - tune.MARGIN / 2)} for name in steps}
    assert tune.pick_variant({**tie, "fp8_table": {"decode_step_ms": 3.2}}, logits)["decode_choice"] == "fp8_table"
    assert not tune.chosen_table(table, {}).pdl and not tune.chosen_table(tune.replace(table, pdl=True), {}).pdl


def test_error_bound_catches_a_wrong_scale():
    """The tune run's check is not vacuous: a result off by one scale step of one channel exceeds the bound."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    ref, a = tune.reference(x, w)
    assert bool(((ref - ref).abs() <= tune.error_bound("w8a16", ref, a, 64)).all())
    bad = ref.clone()
    bad[:, 3] *= 1.0625
    assert not bool(((bad - ref).abs() <= tune.error_bound("w8a16", ref, a, 64)).all())


def test_w2_is_checked_against_the_swiglu_product_it_serves():
    """The tune run times w2 on gu = [gate | up] as serving calls it; a candidate that skipped SwiGLU would fail the
    float64 check (the check is against silu_mul(gu), not gu's first half)."""
    sub = tune.make_subject("w2", 16, 32, torch.float32, "cpu", seed=0, swiglu=True)
    pair = tune.measure_pair(sub, 2, tune.SMOKE, seed=1)
    assert pair["swiglu"] and all(r["check"]["ok"] for r in pair["candidates"]), pair["candidates"]
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    from impl.serve.fused import silu_mul

    ref, a = tune.reference(silu_mul(x), sub.fp8.inner.weight, sub.fp8.inner.weight_scale)
    wrong = sub.fp8.inner(x[:, :32]).double()  # the gate half, no SwiGLU
    assert not bool(((wrong - ref).abs() <= tune.error_bound("inner", ref, a, 32)).all())


def test_kernel_groups_sum_device_time_per_step():
    """The step profile groups kernels by what they do and divides by the number of steps traced."""
    from impl.serve.experiments import group_kernels, kernel_group

    assert kernel_group("gemv_kernel") == "gemv" and kernel_group("paged_decode_kernel") == "attention"
    assert kernel_group("nvjet_tst_128x64_64x8") == "cublas" and kernel_group("void foo<bar>") == "other"
    ev = [{"name": "gemv_kernel", "dur": 10.0, "args": {"grid": [1, 768, 1]}}] * 4 + \
         [{"name": "rmsnorm_kernel", "dur": 2.0, "args": {"grid": [1, 1, 1]}}] * 2
    out = group_kernels(ev, steps=2)
    assert out["group_us"] == {"gemv": 20.0, "norm": 2.0} and out["sum_us"] == 22.0
    assert out["top"][0] == {"kernel": "gemv_kernel grid=[1, 768, 1]", "us_per_step": 20.0, "calls_per_step": 2}


def test_batch_invariant_model_gives_each_prompt_the_same_logits_alone_or_batched(monkeypatch):
    """Every linear through the fixed-tile kernel: logits of a batched prefill equal each prompt's alone, bit for bit
    (natively, and under the interpreter where the host's float32 matmul rounds a row the same wherever it sits in
    its tile; elsewhere to 1e-5, which a batch-dependent scale or tile, off by ~1e-2, still fails)."""
    import impl.serve.fp8_gemv as fg

    model = fp8_adapter.quantize_model_(tiny_model(seed=3))
    assert choose.make_batch_invariant(model, choose.INVARIANT, use_kernel=True) == 4 * model.args.n_layers + 1
    calls = []
    real = fg.gemv
    monkeypatch.setattr(fg, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    prompts = [[5, 9, 2], list(range(10, 17)), [40, 41, 42, 43, 44]]

    def logits(batch):
        cache = PagedKVCache(model.args, CacheConfig(32, 4), dtype=model.dtype, device="cpu")
        for i, p in enumerate(batch):
            cache.reserve(i, len(p))
        meta = cache.metadata([(i, 0, len(p)) for i, p in enumerate(batch)], "cpu")
        tokens = torch.tensor([t for p in batch for t in p])
        with torch.no_grad():
            return model(tokens, PagedStep(cache, make_backend("sdpa"), meta, last_token_rows(meta)))

    together = logits(prompts)
    exact = not backend.INTERPRETED or host_matmul_rows_invariant()
    for i, p in enumerate(prompts):
        alone = logits([p])[0]
        if exact:
            assert torch.equal(alone, together[i]), i
        else:
            torch.testing.assert_close(alone, together[i], rtol=1e-5, atol=1e-5, msg=f"prompt {i}")
    assert calls, "the kernel never ran"
    with pytest.raises(ValueError, match="fixed block_m"):
        choose.make_batch_invariant(model, fg.GemvConfig())


@pytest.mark.slow  # ~10 s: two servers, four client processes
def test_loadtest_smoke_serves_both_modes_and_compares_greedy_tokens(capsys):
    from impl.serve import loadclient, loadtest

    assert loadtest.main(["--smoke", "--requests", "6", "--concurrency", "3", "--max-batch", "3"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["complete"] and data["compared"] == 6 and data["greedy_identical"] == 1.0
    for mode in ("continuous", "one_at_a_time"):
        m = data["modes"][mode]
        assert m["ok"] == 6 and m["tokens_per_s"] > 0 and len(m["ttfts_s"]) == 6
        assert m["latency_p50_s"] <= m["latency_p99_s"]
        st, th = m["steps"], m["engine_thread_s"]  # the measured load's steps only (warm-up excluded)
        assert st["generated_tokens"] == m["completion_tokens"] and st["prefill_steps"] >= 1
        assert 0 < st["decode_s"] + st["prefill_s"] <= th["step"] <= m["wall_s"] and th["other"] >= 0
    alone = data["modes"]["engine_alone"]
    assert alone["completion_tokens"] == data["modes"]["continuous"]["completion_tokens"] and not alone["errors"]
    assert alone["profile"]["prompts"] == 3 and alone["profile"]["decode"]["wall_s"] > 0
    assert data["modes"]["one_at_a_time"]["max_batch"] == 1 and data["batching_gain"] > 0
    assert loadclient.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and loadclient.percentile([], 50) is None


def test_load_client_builds_one_opener_ignores_proxies_and_records_send_times(monkeypatch):
    """A stand-in endpoint on 127.0.0.1; a proxy in the environment that does not exist must not be used, and the
    whole load shares the one opener built before its clock starts."""
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from impl.serve import loadclient

    class Endpoint(BaseHTTPRequestHandler):
        def do_POST(self):
            prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
            body = json.dumps({"choices": [{"token_ids": prompt[::-1], "finish_reason": "length"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    built = []
    real = urllib.request.build_opener
    monkeypatch.setattr(urllib.request, "build_opener", lambda *h: built.append(h) or real(*h))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # the discard port: a request sent there fails
    try:
        out, wall = loadclient.drive(f"http://127.0.0.1:{server.server_address[1]}", [[1, 2], [3], [4, 5, 6]] * 3,
                                     concurrency=4, max_tokens=2, timeout_s=10, budget_s=30)
    finally:
        server.shutdown()
        server.server_close()
    assert len(built) == 1
    assert [r["status"] for r in out] == [200] * 9, [r.get("error") for r in out]
    assert [r["tokens"] for r in out[:3]] == [[2, 1], [3], [6, 5, 4]]
    assert all(0 <= r["sent_s"] <= wall and r["latency_s"] > 0 for r in out)


def test_auto_takes_the_faster_backend_per_phase_and_keeps_decode_graph_safe():
    tri, sd = make_backend("triton"), make_backend("sdpa")  # sdpa stands in for a faster, graph-unsafe backend
    chosen, why = choose_phases({"triton": {"decode": 50.0, "prefill": 300.0}, "sdpa": {"decode": 10.0,
                                                                                        "prefill": 100.0}},
                                {"triton": tri, "sdpa": sd})
    assert isinstance(chosen, PhaseBackend) and chosen.decode is tri and chosen.prefill is sd and chosen.graph_safe
    assert "cannot run in a CUDA graph" in why and "prefill" in why
    chosen, _ = choose_phases({"triton": {"decode": 5.0, "prefill": 80.0}, "sdpa": {"decode": 10.0,
                                                                                    "prefill": 100.0}},
                              {"triton": tri, "sdpa": sd})
    assert chosen.name == "triton"


def test_flashinfer_pieces_join_and_install_with_the_pinned_wheels(tmp_path, monkeypatch):
    """split -> fi_part_NN pieces (apart from kvstitch's part_NN) -> install joins them and pip-installs exactly the
    planned wheels, offline; a missing piece is refused."""
    src = tmp_path / "flashinfer"
    src.mkdir()
    for _, name, _ in flashinfer_setup.WHEELS:
        with zipfile.ZipFile(src / name, "w") as z:  # incompressible: the pieces really are 1 MiB each
            z.writestr("x.bin", os.urandom(300_000))
    parts = flashinfer_setup.split(src, tmp_path / "parts", chunk_mb=1)
    (tmp_path / "parts" / "part_00").mkdir()  # a kvstitch piece in the same stash folder is left alone
    assert all(p.name.startswith("fi_part_") for p in parts) and len(parts) >= 1
    ran = []
    monkeypatch.setattr(flashinfer_setup.subprocess, "run", lambda cmd, check: ran.append(cmd))
    flashinfer_setup.install(tmp_path / "parts", tmp_path / "site")
    cmd = ran[0]
    assert "--no-index" in cmd and "--no-deps" in cmd
    assert sorted(c.rsplit("/", 1)[-1] for c in cmd if c.endswith(".whl")) == sorted(
        n for _, n, _ in flashinfer_setup.WHEELS)
    assert any("203.4 MiB" in line for line in flashinfer_setup.plan_lines())
    assert len(parts) >= 3
    (parts[1] / "blob").unlink()
    with pytest.raises(Exception):
        flashinfer_setup.install(tmp_path / "parts", tmp_path / "site2")
