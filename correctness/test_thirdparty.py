"""The third-party private names the suite relies on (all in ``impl.thirdparty``) exist in the installed versions:
a library upgrade that renamed one fails here, by name, instead of somewhere inside a bench or a simulator run."""
from __future__ import annotations

import ast
from pathlib import Path

from impl import thirdparty

ROOT = Path(__file__).resolve().parents[1]
PRIVATE_OWNERS = {"_mode", "_make_stats", "_timer", "_precisions", "_current_profile", "_allocations"}


def test_every_private_name_exists_in_the_installed_versions():
    assert thirdparty.check_private_names() == []


def test_no_other_module_touches_those_private_names():
    """They are used in impl/thirdparty.py only (one adapter, one test)."""
    offenders = []
    for path in [*ROOT.glob("impl/**/*.py"), *ROOT.glob("fixtures/*.py"), ROOT / "conftest.py",
                 *ROOT.glob("benches/*.py")]:
        if path.name == "thirdparty.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_OWNERS:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert offenders == []


def test_a_missing_name_is_reported_with_library_and_version(monkeypatch):
    from pytest_benchmark.fixture import BenchmarkFixture

    monkeypatch.delattr(BenchmarkFixture, "_make_stats")
    (line,) = thirdparty.check_private_names()
    assert line.startswith("pytest-benchmark ") and line.endswith("BenchmarkFixture._make_stats")
