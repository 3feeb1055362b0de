"""The one mechanism behind sort's, serve's and fp8's measured tables: env path, else this card's stored table,
else the built-in; loaded once; ``use`` replaces it."""
import json

import pytest

from impl.common import results
from impl.common.tables import ActiveTable, read_table


def make(tmp_path, on_card=False):
    return ActiveTable("sys", "t", "LAB_TEST_TABLE", lambda p: ("loaded", read_table(p, "test table")[1]),
                       lambda: ("builtin", ""), on_card=lambda: on_card)


def test_the_env_path_wins_then_the_table_is_kept(tmp_path, monkeypatch):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"commit": "abc", "data": {}}))
    monkeypatch.setenv("LAB_TEST_TABLE", str(path))
    table = make(tmp_path)
    assert table.get() == ("loaded", "measured table mine.json @abc")
    path.unlink()
    assert table.get()[0] == "loaded", "loaded once per process"
    table.use(None)
    with pytest.raises(ValueError, match="cannot read the test table .*mine.json"):
        table.get()


def test_without_env_or_card_the_builtin_serves_and_use_replaces_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LAB_TEST_TABLE", raising=False)
    table = make(tmp_path)
    assert table.stored_path() is None and table.get() == ("builtin", "")
    table.use(("mine", ""))
    assert table.get() == ("mine", "")


def test_the_stored_table_of_this_card_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv("LAB_TEST_TABLE", raising=False)
    monkeypatch.setattr(results, "results_dir", lambda: tmp_path)
    table = make(tmp_path, on_card=True)
    assert table.stored_path() == tmp_path / "sys" / "t.json"
    assert table.get() == ("builtin", ""), "no stored file yet"
    (tmp_path / "sys").mkdir()
    (tmp_path / "sys" / "t.json").write_text("{}")
    table.use(None)
    assert table.get() == ("loaded", "measured table t.json")
