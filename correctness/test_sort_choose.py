"""The sort's measured defaults (impl.sort.choose): table lookup, selection from a tune run, loading, and that
sorters without a config take the table's choice; ``python -m impl gpu`` runs the declared tune step first."""
from __future__ import annotations

import json

import numpy as np
import pytest

from impl.__main__ import tune_step_args
from impl.sort import choose
from impl.sort.choose import BUILTIN, SortTable, config_name, select
from impl.sort.cuda_sort import CudaSorter, emulated_runtime
from impl.sort.plan import EMU_CUDA_CONFIG, CudaSortConfig
from impl.sort.runtimes import EmulatedRuntime

A, B, C = CudaSortConfig(13, 5), CudaSortConfig(14, 5), CudaSortConfig(15, 6)


def row(mode, n, config, ms, **kw):
    r = {"label": f"{mode} {config_name(config)}", "mode": mode, "n": n, "config": vars(config).copy(), "ms": ms,
         "launch": "graph", "correct": True, "correct_after_timing": True}
    return {**r, **kw}


def test_lookup_takes_the_smallest_measured_n_at_or_above():
    table = SortTable({"keys32": [(1_000_000, A), (10_000_000, B), (100_000_000, C)]}, "test")
    assert table.config_for(1, "keys32") == A
    assert table.config_for(1_000_000, "keys32") == A
    assert table.config_for(1_000_001, "keys32") == B
    assert table.config_for(10_000_000, "keys32") == B
    assert table.config_for(50_000_000, "keys32") == C
    assert table.config_for(2_000_000_000, "keys32") == C  # beyond the largest: the largest's
    assert table.config_for(10, "composite") == BUILTIN["composite"]  # a mode not measured: built-in
    assert table.source_for("keys32") == "test" and table.source_for("pairs") == "built-in defaults"
    with pytest.raises(ValueError, match="mode"):
        table.config_for(10, "keys16")


def test_builtin_default_is_the_first_runs_fastest_keys_config():
    assert config_name(BUILTIN["keys32"]) == "t13e5r5"
    assert SortTable().config_for(10_000_000, "keys32") == BUILTIN["keys32"]


def test_select_keeps_the_fastest_correct_graph_row_per_mode_and_size():
    rows = [row("keys32", 10, A, 0.5), row("keys32", 10, B, 0.4), row("keys32", 10, C, 0.3, correct=False),
            row("keys32", 10, C, 0.2, correct_after_timing=False), row("keys32", 10, C, 0.1, launch="direct"),
            row("keys32", 100, C, 5.0), row("composite", 10, A, 1.2), row("composite", 10, B, 1.3),
            {"label": "keys t9", "n": 10, "launch": "graph", "skipped": "budget"},
            {"label": "keys t9", "n": 10, "launch": "graph", "error": "RuntimeError: nvcc"}]
    table = select(rows)
    assert table.entries == {"keys32": [(10, B), (100, C)], "composite": [(10, A)]}


def test_table_round_trips_through_a_stored_record_and_refuses_bad_ones(tmp_path):
    table = SortTable({"keys32": [(10, A), (100, B)], "composite": [(10, C)]}, "test")
    record = {"system": "sort", "name": "config_table", "commit": "abc123", "data": table.to_data()}
    path = tmp_path / "config_table.json"
    path.write_text(json.dumps(record))
    loaded = SortTable.load(path)
    assert loaded.entries == table.entries and "abc123" in loaded.origin
    bad = table.to_data()
    bad["entries"].append(dict(bad["entries"][0]))
    with pytest.raises(ValueError, match="twice"):
        SortTable.from_data(bad)
    with pytest.raises(ValueError, match="format"):
        SortTable.from_data({"entries": []})
    with pytest.raises(ValueError, match="malformed"):
        SortTable.from_data({"format": choose.FORMAT, "entries": [{"mode": "keys32", "n": 5}]})
    with pytest.raises(ValueError, match="cannot read"):
        SortTable.load(tmp_path / "missing.json")


def test_env_table_is_the_active_one(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(SortTable({"keys32": [(64, B)]}).to_data()))
    monkeypatch.setenv("LAB_SORT_TABLE", str(path))
    choose.use_table(None)
    try:
        assert choose.config_for(50, "keys32") == B and "t.json" in choose.active_table().describe()
    finally:
        choose.use_table(None)
        monkeypatch.delenv("LAB_SORT_TABLE")
        choose.use_table(None)


@pytest.mark.skipif(EmulatedRuntime.unavailable_reason() is not None,
                    reason=str(EmulatedRuntime.unavailable_reason()))
def test_sorter_without_config_takes_the_tables_choice():
    small = CudaSortConfig(tile_bits=7, items_bits=2, run_bits=2)
    choose.use_table(SortTable({"keys32": [(100, EMU_CUDA_CONFIG), (1000, small)]}, "test"))
    try:
        rt = emulated_runtime()
        a = CudaSorter(90, np.float32, runtime=rt)
        b = CudaSorter(700, np.float32, runtime=rt)
        assert a.config == EMU_CUDA_CONFIG and b.config == small
        x = np.random.default_rng(3).standard_normal(700).astype(np.float32)
        out = np.empty_like(x)
        b(x, out)
        assert np.array_equal(out, np.sort(x))
    finally:
        choose.use_table(None)


def test_gpu_command_runs_the_sort_tune_step_first():
    from impl.sort import tune

    assert tune_step_args("sort") == tune.GPU_STEP_ARGS
    assert tune_step_args("join") is None  # no tune module


def test_tune_dry_run_outputs_give_a_loadable_table(tmp_path):
    """tune's writer (the CPU path: only into --out) stores every row and a table ``SortTable.load`` reads back."""
    from impl.sort import tune

    report = {"device": "cpu", "commit": "abc", "complete": True,
              "rows": [row("keys32", 10, A, 0.5), row("keys32", 10, B, 0.4), row("composite", 10, C, 1.0)]}
    paths = tune.write_outputs(report, tmp_path, dry=True)
    assert {p.name for p in paths} == {"tune.json", "config_table.json"}
    table = SortTable.load(tmp_path / "config_table.json")
    assert table.entries == {"keys32": [(10, B)], "composite": [(10, C)]}
    assert report["table"] == [{"mode": "composite", "n": 10, "label": "t15e6r5"},
                               {"mode": "keys32", "n": 10, "label": "t14e5r5"}]
    assert json.loads((tmp_path / "tune.json").read_text())["rows"][1]["ms"] == 0.4


def test_a_run_keeps_the_stored_entries_it_measured_nothing_for(tmp_path):
    """A run cut short by its budget: (mode, n) it timed take its winner; the stored table's other entries stay,
    named with the commit they were measured at, and load back."""
    from impl.sort import tune

    stored = SortTable({"keys32": [(10, A), (100, A)], "composite": [(10, A)]})
    report = {"device": "cpu", "commit": "new", "complete": False, "rows": [row("keys32", 10, B, 0.4)]}
    tune.write_outputs(report, tmp_path, dry=True, previous=stored, previous_commit="old")
    table = SortTable.load(tmp_path / "config_table.json")
    assert table.entries == {"keys32": [(10, B), (100, A)], "composite": [(10, A)]}
    assert report["table"] == [{"mode": "keys32", "n": 10, "label": "t14e5r5"},
                               {"mode": "keys32", "n": 100, "label": "t13e5r5", "kept_from": "old"},
                               {"mode": "composite", "n": 10, "label": "t13e5r5", "kept_from": "old"}]


def test_the_stored_entries_are_timed_first():
    """The stored table's entries at the main size lead the run (before the built-in defaults), its others follow the
    defaults, and no (label, n, launch) is timed twice."""
    from impl.sort import tune

    n_main, n_big = tune.N_MAIN, tune.N_BIG
    stored = SortTable({"composite": [(n_main, tune.ARG_CONFIGS["t13e5r4"]), (n_big, tune.ARG_CONFIGS["t14e5r5"])],
                        "keys32": [(n_main, tune.KEY_CONFIGS["t13e5r5"])]})
    got = [(v.label, v.n, v.launch, v.dtype) for v in tune.variants(False, stored)]
    assert [g[:3] for g in got[:5]] == [("keys t13e5r5", n_main, "graph"), ("argsort t13e5r4", n_main, "graph"),
                                        ("argsort t14e6r5", n_main, "graph"), ("keys t13e5r5", n_main, "direct"),
                                        ("argsort t14e5r5", n_big, "graph")]
    assert len(got) == len(set(got))
    assert [(v.label, v.n) for v in tune.variants(False)][:2] == [("keys t13e5r5", n_main), ("argsort t14e6r5", n_main)]


def test_session_prebuild_covers_every_config_the_table_can_choose():
    """compile_check --session builds every config tune can put in the table, for every n the lookup gives it."""
    from impl.sort.compile_check import session_configs
    from impl.sort.tune import ARG_CONFIGS, GRID, KEY_CONFIGS

    configs = session_configs()
    sizes = sorted(n for n, _, _ in GRID)
    for n, keys, args in GRID:
        serves_from = 0 if n < sizes[-1] else sizes[-2] + 1  # the largest size's entry serves above the next one
        for mode, labels, table in (("keys32", keys, KEY_CONFIGS), ("composite", args, ARG_CONFIGS)):
            for label in labels:
                assert configs[mode][table[label]] <= serves_from, (mode, label, n)
    assert all(configs[mode][c] == 0 for mode, c in BUILTIN.items())
