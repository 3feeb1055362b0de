"""Every system folder has the same files for the same jobs (README "Layout of a system"), read from the source.

The allow-lists below are empty: every system follows the layout. An entry would be a permission (a system exempt
from that check while it is being moved), never a requirement.
"""
import ast
import importlib
import re
from pathlib import Path

import pytest

from impl.common import ledger

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ledger.discover_systems()

# exemptions while a system is moved (none now)
PYTEST_IN_IMPL: set[str] = set()  # pytest fixtures inside the product
TESTING_IN_IMPL: set[str] = set()  # test helpers in impl/<system>/testing.py instead of fixtures/
FIGURES_IN_CLAIMS: set[str] = set()  # PLOTS/TABLES in claims.py instead of plots.py
NO_EXPORTS: set[str] = set()  # __init__.py describes files but exports nothing
MAIN_NOT_EXIT_CODE: set[str] = set()  # experiments.main returns something else
WORDS_ALLOWED: set[str] = set()  # an issue number in a docstring


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _module_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_no_module_under_impl_imports_pytest():
    offenders = sorted(_rel(p) for p in (ROOT / "impl").rglob("*.py") if "pytest" in _imports(_tree(p)))
    assert set(offenders) <= PYTEST_IN_IMPL, f"pytest imported from the product: {offenders}; fixtures belong in " \
                                             "fixtures/<system>.py (loaded by conftest.py's pytest_plugins)"


def test_the_pytest_check_sees_an_import_inside_a_function():
    tree = ast.parse("def f():\n    import pytest\n\nfrom pytest import fixture\n")
    assert _imports(tree) == {"pytest"}


def test_test_helpers_live_under_fixtures():
    found = {s for s in SYSTEMS if (ROOT / "impl" / s / "testing.py").exists()}
    assert found <= TESTING_IN_IMPL, f"test helpers in impl/<system>/testing.py: {sorted(found - TESTING_IN_IMPL)}"


@pytest.mark.parametrize("system", SYSTEMS)
def test_claims_hold_only_claims_and_figures_live_in_plots(system):
    claims = ROOT / "impl" / system / "claims.py"
    if system in FIGURES_IN_CLAIMS or not claims.exists():
        return
    names = _module_names(_tree(claims))
    assert {"CLAIMS", "FAILING_CASES"} <= names
    assert not names & {"PLOTS", "TABLES"}, f"{system}: PLOTS/TABLES belong in impl/{system}/plots.py"
    assert "matplotlib" not in _imports(_tree(claims)) and "plotting" not in claims.read_text()
    plots = ROOT / "impl" / system / "plots.py"
    if plots.exists():
        assert _module_names(_tree(plots)) & {"PLOTS", "TABLES"}
        assert dict(ledger.report_modules((system,)))[system].__name__ == f"impl.{system}.plots"


@pytest.mark.parametrize("system", sorted(set(SYSTEMS) - NO_EXPORTS))
def test_each_system_exports_what_a_user_calls(system):
    mod = importlib.import_module(f"impl.{system}")
    assert f"from impl.{system} import" in (mod.__doc__ or ""), f"impl/{system}/__init__.py: no usage example"
    assert mod.__all__, f"impl/{system}/__init__.py exports nothing"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"impl.{system}.__all__ names what it does not define: {missing}"
    modules = {p.stem for p in (ROOT / "impl" / system).glob("*.py")}
    shadowing = sorted(set(mod.__all__) & modules)
    assert not shadowing, f"impl.{system} exports {shadowing}, hiding its submodules of the same name"


@pytest.mark.parametrize("system", sorted(set(SYSTEMS) - MAIN_NOT_EXIT_CODE))
def test_experiments_main_returns_an_exit_code(system):
    path = ROOT / "impl" / system / "experiments.py"
    if not path.exists():
        return
    mains = [n for n in _tree(path).body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains, f"{_rel(path)} has no main()"
    assert ast.unparse(mains[0].returns) == "int", f"{_rel(path)}: main() must return an exit code (-> int)"


def test_no_issue_numbers_or_development_paths_in_the_code():
    issue, machine = re.compile(r"\bissue #?\d", re.IGNORECASE), "/" + "work/"
    files = [p for d in ("impl", "benches", "correctness", "fixtures") for p in (ROOT / d).rglob("*.py")]
    found = [f"{_rel(p)}:{i}" for p in files + [ROOT / "conftest.py"] if _rel(p) not in WORDS_ALLOWED
             for i, line in enumerate(p.read_text().splitlines(), 1) if issue.search(line) or machine in line]
    assert not found, f"history or machine paths in code: {found}"
