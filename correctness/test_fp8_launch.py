"""The FP8 kernels' launch table: measured configs are what the kernels and benches launch with.

A synthetic table (configs unlike the built-in defaults) is made active the way a GPU run gets the tune run's
table (``LAB_FP8_LAUNCH_TABLE`` / the stored file); a spy on the Triton launches shows which tile sizes and warps
each kernel really ran with.
"""
import json

import pytest
import torch

from impl.backend import DEVICE
from impl.common.timing import sm_count
from impl.fp8 import kernels as K
from impl.fp8 import launch, quant
from impl.fp8 import reference as R
from impl.fp8.launch import LaunchConfig, LaunchTable

SYNTHETIC = {"dequant-tensor": LaunchConfig(16, 64, warps=2), "requant-channel": LaunchConfig(2, 64, warps=8),
             "amax": LaunchConfig(8, 32, warps=1, per_sm=3), "requant-tensor": LaunchConfig(4, 128, warps=2, per_sm=1)}


class LaunchSpy:
    """Stands in for a Triton kernel: records each launch's grid and constexprs/options, then runs the real one."""

    def __init__(self, real):
        self.real, self.calls, self.__name__ = real, [], real.__name__

    def warmup(self, *args, **kw):  # the resident-program cap compiles through it
        return self.real.warmup(*args, **kw)

    def __getitem__(self, grid):
        def launch_(*args, **kw):
            self.calls.append({"grid": grid, **{k: kw[k] for k in ("BM", "BK", "num_warps", "num_stages") if k in kw}})
            return self.real[grid](*args, **kw)
        return launch_


@pytest.fixture
def synthetic_table(tmp_path, monkeypatch):
    """The synthetic table stored as a tune run writes it, made active through LAB_FP8_LAUNCH_TABLE."""
    path = tmp_path / "launch_table.json"
    table = LaunchTable(dict(SYNTHETIC), origin="synthetic")
    path.write_text(json.dumps({"commit": "abc", "data": table.to_data()}))
    monkeypatch.setenv(launch.ENV, str(path))
    launch.use_table(None)  # load again, as a fresh process would
    yield path
    launch.use_table(None)
    monkeypatch.delenv(launch.ENV)
    launch.use_table(None)


@pytest.fixture
def spies(monkeypatch):
    found = {}
    for name in ("dequant_kernel", "quant_rows_kernel", "amax_partials_kernel", "quant_static_kernel"):
        found[name] = LaunchSpy(getattr(K, name))
        monkeypatch.setattr(K, name, found[name])
    return found


def test_table_round_trips_and_refuses_what_is_not_a_table(tmp_path):
    t = LaunchTable(dict(SYNTHETIC), origin="x", selected_in_run="r1")
    back = LaunchTable.from_data({"data": t.to_data()})
    assert back.configs == SYNTHETIC and back.selected_in_run == "r1"
    bad = t.to_data()
    with pytest.raises(ValueError, match="unknown kernel 'dequant'"):
        LaunchTable.from_data({**bad, "kernels": {"dequant": {"bm": 8, "bk": 64}}})
    with pytest.raises(ValueError, match="powers of two"):
        LaunchTable.from_data({**bad, "kernels": {"amax": {"bm": 6, "bk": 64}}})
    with pytest.raises(ValueError, match="unknown launch config fields"):
        LaunchTable.from_data({**bad, "kernels": {"amax": {"bm": 8, "bk": 64, "wraps": 4}}})
    with pytest.raises(ValueError, match="expected format"):
        LaunchTable.from_data({"format": "serve-gemm-table/1", "entries": []})
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read the FP8 launch table"):
        LaunchTable.load(tmp_path / "broken.json")


def test_every_kernel_has_a_builtin_default_on_both_backends():
    assert set(launch.GPU_CONFIGS) == set(launch.CPU_CONFIGS) == set(launch.KERNELS)
    from impl.fp8 import tune

    assert set(tune.CANDIDATES) <= set(launch.KERNELS)


def test_kernels_take_the_active_tables_configs(synthetic_table, spies):
    assert "synthetic" not in launch.active_table().describe()  # loaded from the file, named by it
    assert "launch_table.json @abc" in launch.active_table().describe()
    assert launch.config("requant-block", 70, 150) == launch.builtin("requant-block")  # not in the table: built-in
    x = torch.randn(70, 150, generator=torch.Generator().manual_seed(0)).to(DEVICE)

    q, s = quant.quantize(x, "channel")
    rows = spies["quant_rows_kernel"].calls[-1]
    assert (rows["BM"], rows["num_warps"]) == (2, 8)  # rows wider than bk=64: chunked two-pass, BK = cfg.bk
    assert rows["BK"] == 64
    ref_q, ref_s = R.quantize_reference(x, "channel")
    assert torch.equal(q.view(torch.uint8).cpu(), ref_q) and torch.equal(s.cpu(), ref_s)

    quant.quantize(x, "tensor")
    amax, second = spies["amax_partials_kernel"].calls[-1], spies["quant_static_kernel"].calls[-1]
    assert (amax["BM"], amax["BK"], amax["num_warps"]) == (8, 32, 1)
    assert (second["BM"], second["BK"], second["num_warps"]) == (4, 128, 2)
    sms = sm_count(x.device.index or 0) if x.is_cuda else quant.SIM_SMS
    assert amax["grid"] == (min(9 * 5, 3 * sms),) and second["grid"] == (min(18 * 2, sms),)  # per_sm 3 and 1


def test_bench_launches_and_records_the_tables_config(synthetic_table, spies):
    """The dequantize bench runs the kernel with the table's config and says so in its extra_info."""
    import benches.bench_fp8 as bench

    info = {}

    class Benchmark:
        extra_info = info

    def device_bench(fn, **kw):
        info.update(kw)
        return fn()

    n, k = bench.SHAPES[0]
    bench.test_fp8_dequant(device_bench, "tensor", n, k)
    call = spies["dequant_kernel"].calls[-1]
    assert (call["BM"], call["BK"], call["num_warps"]) == (16, 64, 2)
    assert info["launch"] == {"dequant-tensor": {"bm": 16, "bk": 64, "warps": 2, "stages": 1, "per_sm": 0, "evict": 0}}
    assert info["launch_class"] == launch.shape_class(n, k)
    assert "launch_table.json" in info["launch_table"]
    bench.test_fp8_requant(device_bench, Benchmark, "tensor", n, k)
    assert set(info["launch"]) == {"amax", "requant-tensor"} and info["launch"]["amax"]["per_sm"] == 3


def test_without_a_table_the_builtin_defaults_launch(spies):
    """The spy tells the two apart: with no table the same call takes the built-in tile."""
    launch.use_table(LaunchTable())
    try:
        x = torch.randn(40, 96).to(DEVICE)
        q, s = quant.quantize(x, "tensor")
        quant.dequantize(q, s, "tensor", out_dtype=torch.float32)
        call = spies["dequant_kernel"].calls[-1]
        want = launch.builtin("dequant-tensor")
        assert (call["BM"], call["BK"]) == (want.bm, want.bk) != (16, 64)
    finally:
        launch.use_table(None)


def test_tune_writes_a_table_the_kernels_then_take(tmp_path, monkeypatch, spies):
    """tune -> launch_table.json -> active table -> the kernel's launch (the GPU run's order, at CPU size)."""
    from impl.fp8 import tune

    launch.use_table(LaunchTable())
    try:
        assert tune.main(["--out", str(tmp_path), "--budget-s", "60", "--kernels", "dequant-tensor", "--shapes",
                          "64x256", "--no-store"]) == 0
    finally:
        launch.use_table(None)
    rec = json.loads((tmp_path / "launch_table.json").read_text())
    won = LaunchConfig(**json.loads((tmp_path / "tune.json").read_text())["data"]["winners"]["dequant-tensor"]
                       ["config"])
    monkeypatch.setenv(launch.ENV, str(tmp_path / "launch_table.json"))
    launch.use_table(None)
    try:
        assert launch.active_table().configs == {"dequant-tensor": won} and rec["data"]["format"] == launch.FORMAT
        q, s = quant.quantize(torch.randn(20, 64).to(DEVICE), "tensor")
        quant.dequantize(q, s, "tensor", out_dtype=torch.float32)
        call = spies["dequant_kernel"].calls[-1]
        assert (call["BM"], call["BK"], call["num_warps"]) == (won.bm, won.bk, won.warps)
    finally:
        monkeypatch.delenv(launch.ENV)
        launch.use_table(None)


def test_resident_programs_follow_the_sm_limits():
    """Programs an SM holds at once: registers (allocated per warp in units of 256), warps, blocks, shared memory."""
    assert quant.resident_programs(80, 1024, 8) == 3  # 2560 registers a warp x 8 warps: 3 fit in 65536, not 4
    assert quant.resident_programs(89, 0, 4) == 5
    assert quant.resident_programs(73, 0, 4) == 6  # 2336 a warp rounds up to 2560 (unrounded: 7)
    assert quant.resident_programs(16, 0, 1) == 32  # the block limit
    assert quant.resident_programs(16, 0, 32) == 2  # the warp limit
    assert quant.resident_programs(32, 100_000, 4) == 2  # shared memory
    assert quant.resident_programs(255, 0, 32) == 1  # never 0: a launch always runs


def test_persistent_grids_stop_at_the_resident_programs(monkeypatch, spies):
    """A persistent config asks for per_sm programs an SM; the grid takes no more than fit at once (one wave), and
    the amax partials follow the grid actually launched. Results stay exact."""
    x = torch.randn(300, 600, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    sms = sm_count(x.device.index or 0) if x.is_cuda else quant.SIM_SMS
    cfg = LaunchConfig(8, 32, per_sm=3)  # 38 x 19 = 722 tiles
    want = min(722, 2 * sms)
    monkeypatch.setattr(quant, "_resident", lambda kernel, args, kw: 2)
    parts = quant.amax_partials(x, cfg)
    assert spies["amax_partials_kernel"].calls[-1]["grid"] == (want,) and parts.numel() == want
    assert float(parts.max()) == float(x.abs().max())
    pf = LaunchConfig(8, 32, stages=2, per_sm=5)
    q, s = quant.quantize(x, "tensor", cfg=pf, amax_cfg=cfg)
    assert spies["quant_static_kernel"].calls[-1]["grid"] == (want,)
    ref_q, ref_s = R.quantize_reference(x, "tensor")
    assert torch.equal(q.view(torch.uint8).cpu(), ref_q) and torch.equal(s.cpu(), ref_s)
    q, s, state = quant.quantize_delayed(x, cfg=pf)
    assert spies["quant_static_kernel"].calls[-1]["grid"] == (want,) and torch.equal(q.view(torch.uint8).cpu(), ref_q)
    monkeypatch.setattr(quant, "_resident", lambda kernel, args, kw: None)  # not known: per_sm as configured
    assert quant.amax_partials(x, cfg).numel() == min(722, 3 * sms)


@pytest.mark.gpu
def test_gpu_persistent_grid_is_capped_by_the_compiled_kernels_registers():
    """On the GPU the cap comes from the compiled kernel (registers, shared memory): a per_sm far beyond what fits
    launches one wave of resident programs, and amax stays exact. Fails if the compiled kernel cannot be inspected."""
    x = torch.randn(16384, 1024, device="cuda", dtype=torch.bfloat16)  # 2048 tiles: more than 8 programs an SM
    sms = sm_count()
    quant.RESIDENT_ERRORS.clear()
    parts = quant.amax_partials(x, LaunchConfig(8, 1024, warps=8, per_sm=64))
    assert not quant.RESIDENT_ERRORS, quant.RESIDENT_ERRORS
    assert parts.numel() % sms == 0 and 1 <= parts.numel() // sms <= 8  # 8 warps: at most 8 programs an SM
    assert float(parts.max()) == float(x.float().abs().max())


def test_rows_read_once_keep_the_configs_elements_per_thread(spies):
    """requant-channel: a row narrower than cfg.bk, read in one pass, launches with proportionally fewer warps."""
    x = torch.randn(6, 100, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    q, s = quant.quantize(x, "channel", cfg=LaunchConfig(1, 1024, warps=16))
    call = spies["quant_rows_kernel"].calls[-1]
    assert (call["BK"], call["num_warps"]) == (128, 2)  # 100 -> one pass of 128: 16 warps x 128 / 1024
    ref_q, ref_s = R.quantize_reference(x, "channel")
    assert torch.equal(q.view(torch.uint8).cpu(), ref_q) and torch.equal(s.cpu(), ref_s)


def test_shape_classes_of_a_llama_layer():
    """small: at most 2**25 elements; wide: rows wider than 8192; large: the rest (order matters: small first)."""
    got = {(n, k): launch.shape_class(n, k) for n, k in
           [(4096, 4096), (6144, 4096), (1024, 4096), (16, 14336), (14336, 4096), (28672, 4096), (4096, 14336),
            (8192, 4096), (8192, 4097), (4096, 8193), (4097, 8192)]}
    assert got == {(4096, 4096): "small", (6144, 4096): "small", (1024, 4096): "small", (16, 14336): "small",
                   (14336, 4096): "large", (28672, 4096): "large", (4096, 14336): "wide", (8192, 4096): "small",
                   (8192, 4097): "large", (4096, 8193): "wide", (4097, 8192): "large"}
    assert set(launch.describe_classes()) == set(launch.SHAPE_CLASSES)


# CPU-sized shape classes for the tests below: (16, 64) small, (16, 512) wide, (64, 128) large
SMALL, WIDE, LARGE = (16, 64), (16, 512), (64, 128)
BY_CLASS = {"dequant-tensor": {"small": LaunchConfig(16, 64, warps=2), "wide": LaunchConfig(8, 128, warps=1)},
            "requant-channel": {"wide": LaunchConfig(4, 128, warps=2)}}


@pytest.fixture
def small_classes(monkeypatch):
    monkeypatch.setattr(launch, "SMALL_ELEMENTS", 2048)
    monkeypatch.setattr(launch, "WIDE_K", 256)
    assert [launch.shape_class(*s) for s in (SMALL, WIDE, LARGE)] == ["small", "wide", "large"]


def test_kernels_take_the_entry_of_their_shape_class(small_classes, tmp_path, monkeypatch, spies):
    """Each call looks its shape's class up: the class's entry, else the table's entry for every shape, else the
    built-in default; results stay exact; the bench records the class and its config."""
    path = tmp_path / "launch_table.json"
    table = LaunchTable({"dequant-tensor": LaunchConfig(4, 32, warps=4)}, origin="classes", classes=BY_CLASS)
    path.write_text(json.dumps({"commit": "abc", "data": table.to_data()}))
    monkeypatch.setenv(launch.ENV, str(path))
    launch.use_table(None)
    try:
        assert launch.active_table().classes == BY_CLASS
        want = {SMALL: (16, 64, 2), WIDE: (8, 128, 1), LARGE: (4, 32, 4)}  # LARGE: no class entry, every shape's
        for (n, k), (bm, bk, warps) in want.items():
            x = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).to(DEVICE)
            q, s = quant.quantize(x, "tensor")
            y = quant.dequantize(q, s, "tensor", out_dtype=torch.float32)
            call = spies["dequant_kernel"].calls[-1]
            assert (call["BM"], call["BK"], call["num_warps"]) == (bm, bk, warps), (n, k)
            assert torch.equal(y.cpu(), R.dequantize_reference(q.cpu(), s.cpu(), "tensor", "e4m3", torch.float32))
            qc, sc = quant.quantize(x, "channel")
            rows = spies["quant_rows_kernel"].calls[-1]
            chan = BY_CLASS["requant-channel"]["wide"] if (n, k) == WIDE else launch.builtin("requant-channel")
            assert (rows["BM"], rows["BK"]) == (chan.bm, chan.bk if k > chan.bk else max(16, k)), (n, k)
            ref_q, ref_s = R.quantize_reference(x, "channel")
            assert torch.equal(qc.view(torch.uint8).cpu(), ref_q) and torch.equal(sc.cpu(), ref_s)
        import benches.bench_fp8 as bench

        info = bench._launch_info(*WIDE, "dequant-tensor", "requant-channel")
        assert info["launch_class"] == "wide" and info["launch"]["dequant-tensor"]["bm"] == 8
        assert info["launch"]["requant-channel"] == {"bm": 4, "bk": 128, "warps": 2, "stages": 1, "per_sm": 0,
                                                     "evict": 0}
    finally:
        monkeypatch.delenv(launch.ENV)
        launch.use_table(None)


def test_a_table_without_classes_applies_to_every_shape_and_classes_round_trip():
    old = {"format": "fp8-launch-table/1", "origin": "tune run", "selected_in_run": "r0",
           "kernels": {"amax": {"bm": 4, "bk": 512, "warps": 4, "stages": 1, "per_sm": 16, "evict": 0}}}
    t = LaunchTable.from_data({"data": old})
    assert t.classes == {} and all(t.get("amax", c) == LaunchConfig(4, 512, per_sm=16) for c in launch.SHAPE_CLASSES)
    assert t.get("requant-group", "small") is None
    new = LaunchTable(dict(SYNTHETIC), origin="x", classes=BY_CLASS)
    data = new.to_data()
    assert data["format"] == launch.FORMAT and set(data["shape_classes"]) == set(launch.SHAPE_CLASSES)
    back = LaunchTable.from_data(data)
    assert back.classes == BY_CLASS and back.configs == SYNTHETIC
    assert back.get("dequant-tensor", "wide") == LaunchConfig(8, 128, warps=1)
    assert back.get("dequant-tensor", "large") == SYNTHETIC["dequant-tensor"]
    with pytest.raises(ValueError, match="unknown shape class 'huge'"):
        LaunchTable.from_data({**data, "classes": {"amax": {"huge": {"bm": 8, "bk": 64}}}})
    with pytest.raises(ValueError, match="unknown kernel 'dequant'"):
        LaunchTable.from_data({**data, "classes": {"dequant": {"small": {"bm": 8, "bk": 64}}}})


def test_tune_picks_a_winner_per_shape_class(small_classes, tmp_path, monkeypatch, spies):
    """The sweep times every candidate on each class's shape and keeps the fastest per class; the kernels then take
    each class's winner. Times are made up (the interpreter's mean nothing): the candidate wins on the small
    shape, the built-in default on the wide one."""
    from impl.fp8 import tune

    default = launch.builtin("dequant-tensor")

    def fake_time(kernel, cfg, n, k, reps, setup=None):
        fast = (cfg == default) == (launch.shape_class(n, k) == "wide")
        return (1.0 if fast else 2.0), n * k * 5, n * k * 5

    monkeypatch.setattr(tune, "_time", fake_time)
    launch.use_table(LaunchTable())
    try:
        assert tune.main(["--out", str(tmp_path), "--kernels", "dequant-tensor", "--no-store", "--shapes",
                          f"{SMALL[0]}x{SMALL[1]}", f"{WIDE[0]}x{WIDE[1]}", f"{LARGE[0]}x{LARGE[1]}"]) == 0
    finally:
        launch.use_table(None)
    data = json.loads((tmp_path / "tune.json").read_text())["data"]
    assert data["class_shapes"] == {"small": list(SMALL), "wide": list(WIDE), "large": list(LARGE)}
    cands, protected = tune.candidates("dequant-tensor")
    assert protected == 1 and cands[0] == default and len(cands) >= 2
    timed = {(r["class"], tuple(r["config"].values())) for r in data["rows"]}
    assert len(timed) == 3 * len(cands)  # every config on the three class shapes
    table = LaunchTable.load(tmp_path / "launch_table.json")
    assert table.classes["dequant-tensor"] == {"small": cands[1], "wide": default, "large": cands[1]}
    assert table.configs["dequant-tensor"] == cands[1]  # the first shape's class: the entry for every shape
    launch.use_table(table)
    try:
        for (n, k), want in ((SMALL, cands[1]), (WIDE, default)):
            q, s = quant.quantize(torch.randn(n, k).to(DEVICE), "tensor")
            quant.dequantize(q, s, "tensor", out_dtype=torch.float32)
            call = spies["dequant_kernel"].calls[-1]
            assert (call["BM"], call["BK"], call["num_warps"]) == (want.bm, want.bk, want.warps)
    finally:
        launch.use_table(None)
