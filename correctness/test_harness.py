"""Tests of the shared harness itself: backend choice, oracle, strategies, results storage, ledger and report."""
import json
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from numba import cuda  # a module global: the simulator swaps it for its fake inside kernels

from fixtures.oracle import assert_close, poison_, tolerance_for
from fixtures.strategies import PATTERNS, make_array, sizes
from impl import backend
from impl.common import ledger, report, results
from impl.common.benchkit import derived_metrics


def test_backend_sets_interpreters_without_gpu():
    if backend.ON_GPU:
        pytest.skip("on a GPU the interpreters stay off unless asked for")
    assert os.environ["TRITON_INTERPRET"] == "1" and os.environ["NUMBA_ENABLE_CUDASIM"] == "1"
    from numba import config

    assert config.ENABLE_CUDASIM, "numba must run CUDA kernels in its simulator here"
    assert backend.DEVICE == "cpu"


@pytest.mark.skipif(not backend.SIMULATED, reason="checks a fix to numba's CUDA simulator, which only runs without a GPU")
def test_simulator_gives_every_thread_of_a_block_the_same_shared_array(monkeypatch):
    """The simulator's shared-array lookup is check-then-insert; make allocation slow so the threads of a block all
    miss at once: without the lock in impl.backend they get private arrays and read back values nobody wrote."""
    import time
    import types

    from numba.cuda.simulator import kernelapi

    def slow_empty(*args, **kwargs):
        time.sleep(0.02)  # let the block's other threads reach the lookup before this allocation lands
        return np.empty(*args, **kwargs)

    monkeypatch.setattr(kernelapi, "np", types.SimpleNamespace(**{**vars(np), "empty": slow_empty}))

    @cuda.jit
    def reverse_through_shared(out):
        s = cuda.shared.array(16, np.int32)
        t = cuda.threadIdx.x
        s[t] = t
        cuda.syncthreads()
        out[t] = s[15 - t]

    out = np.full(16, -1, np.int32)
    reverse_through_shared[1, 16](out)
    assert np.array_equal(out, np.arange(15, -1, -1)), f"threads saw different shared arrays: {out}"
    assert getattr(kernelapi.FakeCUDAShared.array, "lab_thread_safe", False), "impl.backend's simulator fix is off"


def test_oracle_reports_shape_dtype_nan_and_value_mismatches():
    a = np.array([1.0, 2.0, np.nan], np.float32)
    assert_close(a, a.copy())
    with pytest.raises(AssertionError, match="shape"):
        assert_close(a, a[:2])
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(a, a.astype(np.float64))
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(a, np.array([1.0, 2.0, 3.0], np.float32))
    with pytest.raises(AssertionError, match="values outside"):
        assert_close(a, np.array([1.0, 2.001, np.nan], np.float32))
    with pytest.raises(AssertionError, match="infinities"):
        assert_close(np.array([np.inf]), np.array([-np.inf]))
    with pytest.raises(AssertionError, match="zeros"):
        assert_close(np.array([-0.0]), np.array([0.0]), signed_zero=True)
    with pytest.raises(AssertionError, match="values differ"):
        assert_close(np.array([1, 2], np.int32), np.array([1, 3], np.int32))


def test_tolerances_follow_dtype():
    assert tolerance_for(torch.bfloat16).rtol > tolerance_for(np.float32).rtol > tolerance_for(np.float64).rtol
    assert tolerance_for(np.int64).rtol == 0
    with pytest.raises(KeyError):
        tolerance_for("complex64")


@pytest.mark.parametrize("make", [lambda: np.zeros(5, np.float32), lambda: np.zeros(5, np.int32),
                                  lambda: torch.zeros(5), lambda: torch.zeros(5, dtype=torch.int64)])
def test_poison_overwrites_every_element(make):
    for pattern in ("nan", "max"):
        x = make()
        poison_(x, pattern)
        arr = x.numpy() if hasattr(x, "numpy") else x
        assert not np.any(arr == 0)


@given(n=sizes(max_n=300), pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["float32", "float16", "int32", "uint32", "int64"]))
def test_make_array_is_deterministic_and_sized(n, pattern, seed, dtype):
    a, b = make_array(n, dtype, pattern, seed), make_array(n, dtype, pattern, seed)
    assert a.shape == (n,) and a.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(a, b)
    if pattern == "sorted" and dtype.startswith("int") and n:
        assert np.all(a[1:] >= a[:-1])  # not np.diff: differences of int64 extremes overflow


def test_nasty_pattern_contains_special_floats():
    a = np.concatenate([make_array(512, "float32", "nasty", s) for s in range(8)])
    assert np.isnan(a).any() and np.isposinf(a).any() and np.isneginf(a).any()
    assert (np.signbit(a) & (a == 0)).any()


def test_check_cuda_returns_the_outputs_or_raises_naming_the_call_and_error():
    from cuda.bindings import driver, runtime

    from impl.common.cudacheck import CudaError, check_cuda

    assert check_cuda((runtime.cudaError_t.cudaSuccess, 42), "cudaDeviceGetLimit") == (42,)
    assert check_cuda(driver.CUresult.CUDA_SUCCESS, "cuInit") == ()
    with pytest.raises(CudaError, match=r"cudaDeviceSetLimit\(x\) failed: cudaErrorInvalidValue \(invalid argument\)"):
        check_cuda((runtime.cudaError_t.cudaErrorInvalidValue,), "cudaDeviceSetLimit(x)")
    with pytest.raises(CudaError, match="cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY"):
        check_cuda((driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY, None), "cuMemAlloc")

    class MyError(CudaError):
        pass

    with pytest.raises(MyError, match="cudaErrorInvalidDevice"):
        check_cuda(runtime.cudaError_t.cudaErrorInvalidDevice, "cudaSetDevice", MyError)


def test_logger_prefixes_name_and_time_and_flushes(capsys):
    from impl.common.log import logger

    logger("sys")("one")
    logger("sys.tool", to_stderr=True)("two")
    out, err = capsys.readouterr()
    assert re.fullmatch(r"\[sys \d\d:\d\d:\d\d\] one\n", out)
    assert re.fullmatch(r"\[sys\.tool \d\d:\d\d:\d\d\] two\n", err)


def test_llama3_8b_shape_gives_the_projections_of_one_block():
    from impl.common.shapes import LLAMA3_8B, DecoderShape

    assert LLAMA3_8B.linear_shapes() == {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096),
                                         "w2": (4096, 14336)}
    assert LLAMA3_8B.kernel_matrices() == [(14336, 4096), (4096, 4096), (6144, 4096), (4096, 14336), (28672, 4096)]
    cfg = LLAMA3_8B.hf_config()
    assert cfg["num_attention_heads"] * cfg["head_dim"] == cfg["hidden_size"] and cfg["intermediate_size"] == 14336
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        DecoderShape(64, 1, 6, 4, 16, 128, 100, 1e4)


def test_lazy_exports_resolve_on_first_use_and_refuse_unknown_names():
    import json.decoder

    from impl.common.exports import lazy_exports

    names, getattr_ = lazy_exports("json", {"decoder": ("JSONDecodeError",), "encoder": ("JSONEncoder",)})
    assert names == ["JSONDecodeError", "JSONEncoder"]
    assert getattr_("JSONDecodeError") is json.decoder.JSONDecodeError
    with pytest.raises(AttributeError, match="module 'json' has no attribute 'loads_fast'"):
        getattr_("loads_fast")


def test_gpu_slug():
    assert results.slugify_gpu("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert results.slugify_gpu("NVIDIA H200") == "h200"


def test_atomic_write_refuses_silent_overwrite(tmp_path):
    p = tmp_path / "a" / "r.json"
    assert results.atomic_write_text(p, "one")
    assert not results.atomic_write_text(p, "one")
    with pytest.raises(FileExistsError, match="exists"):
        results.atomic_write_text(p, "two")
    assert results.atomic_write_text(p, "two", overwrite=True) and p.read_text() == "two"
    assert not list(p.parent.glob(".*tmp"))


def test_derived_metrics():
    m = derived_metrics(1e-3, 3_000_000_000, 2_000_000_000, {"copy_gbps": 3000.0, "bf16_tflops": 800.0})
    assert m["gbps"] == pytest.approx(3000.0) and m["pct_peak_bw"] == pytest.approx(100.0)
    assert m["tflops"] == pytest.approx(2.0) and m["pct_peak_flops"] == pytest.approx(0.25)


def _store_run(root, slug, device, benches, number=1):
    run = {"machine_info": {"gpu": device}, "commit_info": {"id": ledger.clean_commit()},
           "datetime": f"2026-11-28T0{number}:00:00", "benchmarks": benches}
    path = root / slug / "Linux-CPython-3.12-64bit" / f"{number:04d}_abc_run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))


def _bench(name, median, **extra):
    return {"name": name, "fullname": f"benches/bench_x.py::{name}", "stats": {"median": median}, "extra_info": extra}


def _claim(measure, comparison=">=", target=2.0, needs_gpu=True):
    return ledger.Claim(id="examples.t", system="examples", statement="s", unit="x", comparison=comparison,
                        target=target, measure=measure, needs_gpu=needs_gpu)


def test_ledger_verdicts(tmp_path):
    _store_run(tmp_path, "h100", "NVIDIA H100", [_bench("fast", 1.0, pct=90.0), _bench("slow", 3.0)])
    view = ledger.ResultsView("h100", tmp_path)
    row = ledger.evaluate(_claim(ledger.BenchRatio("slow", "fast")), view)
    assert row["verdict"] == "pass" and row["measured_value"] == 3.0 and row["commit"] == ledger.clean_commit()[:12]
    assert ledger.evaluate(_claim(ledger.BenchRatio("fast", "slow")), view)["verdict"] == "fail"
    assert ledger.evaluate(_claim(ledger.ExtraInfo("fast", "pct"), target=80), view)["verdict"] == "pass"
    missing = ledger.evaluate(_claim(ledger.BenchStat("nope")), view)
    assert missing["verdict"] == "not measured" and "nope" in missing["reason"]


def test_ledger_newer_run_wins_and_cpu_cannot_pass(tmp_path):
    _store_run(tmp_path, "h100", "NVIDIA H100", [_bench("a", 1.0)], number=1)
    _store_run(tmp_path, "h100", "NVIDIA H100", [_bench("a", 5.0)], number=2)
    assert ledger.ResultsView("h100", tmp_path).bench("a")["stats"]["median"] == 5.0
    _store_run(tmp_path, "cpu", None, [_bench("a", 5.0)])
    row = ledger.evaluate(_claim(ledger.BenchStat("a")), ledger.ResultsView("cpu", tmp_path))
    assert row["verdict"] == "not measured" and "CPU" in row["reason"] and row["measured_value"] == 5.0


def test_result_value_measure(tmp_path):
    rec = {"device": "NVIDIA H100", "commit": ledger.clean_commit(), "date": "d", "data": {"a": {"b": 0.95}}}
    (tmp_path / "h100" / "examples").mkdir(parents=True)
    (tmp_path / "h100" / "examples" / "r.json").write_text(json.dumps(rec))
    view = ledger.ResultsView("h100", tmp_path)
    assert ledger.evaluate(_claim(ledger.ResultValue("examples", "r", "a.b"), target=0.9), view)["verdict"] == "pass"
    assert "no key" in ledger.evaluate(_claim(ledger.ResultValue("examples", "r", "a.c")), view)["reason"]


def test_claim_rejects_bad_records():
    with pytest.raises(ValueError, match="comparison"):
        _claim(ledger.NotYet("x"), comparison="~")
    with pytest.raises(ValueError, match="must start"):
        ledger.Claim(id="sort.x", system="join", statement="", unit="", comparison=">=", target=1,
                     measure=ledger.NotYet("x"))


def test_report_renders_every_claim_with_required_keys(tmp_path):
    _store_run(tmp_path, "h100", "NVIDIA H100", [_bench("test_examples_axpy[67108864]", 1e-3, pct_peak_bw=91.0)])
    summary = report.render("h100", root=tmp_path)
    rows = json.loads((tmp_path / "h100" / "claims.json").read_text())
    assert len(rows) == summary["claims"] == len(ledger.load_claims(ledger.discover_systems()))
    keys = {"id", "system", "statement", "seed_value", "measured_value", "unit", "comparison", "target", "verdict",
            "reason", "device", "commit", "date"}
    assert all(keys <= set(r) for r in rows)
    assert {r["id"]: r["verdict"] for r in rows}["examples.axpy_bandwidth"] == "pass"
    assert all(r["reason"] for r in rows if r["verdict"] == "not measured")
    md = (tmp_path / "h100" / "REPORT.md").read_text()
    assert "examples.axpy_bandwidth" in md and "✅ pass" in md
    first = (tmp_path / "h100" / "claims.json").read_text()
    report.render("h100", root=tmp_path)
    assert (tmp_path / "h100" / "claims.json").read_text() == first, "re-rendering must be deterministic"


def test_time_fn_returns_the_last_result_and_one_time_per_rep():
    from impl.common.timing import time_fn

    calls = []
    t = time_fn(lambda: calls.append(len(calls)) or len(calls), warmup=2, reps=5, setup=lambda: calls.append(-1))
    assert len(t.times_ms) == 5 and all(ms >= 0 for ms in t.times_ms)
    assert t.result == len(calls) and calls.count(-1) == 7  # setup before every warmup call and every rep
    with pytest.raises(ValueError, match="reps"):
        time_fn(lambda: None, reps=0)


def test_record_rounds_hands_our_times_to_pytest_benchmark(benchmark):
    from impl.common.benchkit import record_rounds

    with pytest.raises(ValueError, match="non-negative"):
        record_rounds(benchmark, [])
    record_rounds(benchmark, [3e-3, 1e-3, 2e-3, 5e-3])
    assert benchmark.stats.stats.rounds == 4 and benchmark.stats.stats.median == pytest.approx(2.5e-3)
    assert benchmark.stats.stats.min == pytest.approx(1e-3)
    with pytest.raises(RuntimeError, match="already used"):
        record_rounds(benchmark, [1e-3])


def test_ledger_says_when_a_bench_was_timed_eager(tmp_path):
    from impl.common.benchkit import TIMING_EAGER, TIMING_QUEUED

    _store_run(tmp_path, "h100", "NVIDIA H100", [_bench("old", 1.0), _bench("queued", 1.0, timing=TIMING_QUEUED),
                                                 _bench("eager", 1.0, timing=TIMING_EAGER)])
    view = ledger.ResultsView("h100", tmp_path)
    source = {n: ledger.evaluate(_claim(ledger.BenchStat(n), target=0), view)["source"]
              for n in ("old", "queued", "eager")}
    assert "before the queued timer" in source["old"]
    assert "launch latency" in source["eager"] and "before" not in source["eager"]
    assert "eager" not in source["queued"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flush_l2 acts only on a CUDA GPU (a no-op here)")
def test_flush_l2_reads_twice_the_l2_and_writes_nothing_of_it():
    """The flush must leave clean lines: its buffer (>= 2x L2) is read, never written (still all ones after)."""
    from impl.common import timing

    timing.flush_l2()
    timing.flush_l2()
    buf = timing._FLUSH_BUFFER
    assert timing.L2_FLUSH == "read" and buf.numel() * buf.element_size() >= 2 * timing.l2_bytes()
    assert bool((buf == 1).all())
