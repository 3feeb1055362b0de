"""Which stored verdicts were measured on code that has changed since: per system, each commit its claims were
measured at, and the commits after it (up to this checkout's HEAD) that touch the code those claims ran.

A system's code (``code_paths``): its package ``impl/<system>/``, its benches ``benches/bench_<system>*.py``, the
shared harness (``impl/common/``, ``impl/backend.py``, ``conftest.py``) and the packages of the other systems its
code imports (``impl.fp8`` for serve, found by reading its imports) -- less the files that only judge and draw what
was stored (``REPORT_SIDE``: the ledger, the report, claims and plots), which every rendering applies anew. For each
(system, measured commit):

    files   = git diff --name-only <commit> HEAD -- <code paths>
    changed = git rev-list --count <commit>..HEAD -- <code paths>

and whether the working tree holds uncommitted edits there. No file that differs means the verdicts stand for the
code checked out (commits that touched it and were undone leave it as measured: ``changed`` may then be above 0);
a file that differs means a GPU run of HEAD could give other figures (``Staleness.stale``). Printed by
``python -m impl report`` and ``python -m impl stale``; never written into a report file, which stays a pure function
of the stored results (``impl.common.report``) while this depends on the checkout's history.
"""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from impl.common.results import RESULTS, ROOT

SHARED = ("impl/common", "impl/backend.py", "conftest.py")
REPORT_SIDE = ("impl/common/ledger.py", "impl/common/report.py", "impl/common/plotting.py", "impl/common/tables.py",
               "impl/common/gate.py", "impl/common/freshness.py", "impl/*/claims.py", "impl/*/plots.py")
_IMPORT = re.compile(r"^\s*(?:from|import)\s+impl\.(\w+)", re.MULTILINE)


@dataclass
class Staleness:
    """The claims of one system measured at one commit, against the code at HEAD."""

    system: str
    commit: str
    claims: int
    changed: int | None = None  # commits since ``commit`` touching the system's code; None: unknown (``why``)
    files: list[str] = field(default_factory=list)  # that differ: the system's own first, the shared harness last
    dirty: bool = False  # uncommitted edits in the system's code
    why: str = ""

    @property
    def stale(self) -> bool:
        """The code differs from what was measured (committed or not); unknown counts as stale."""
        return self.changed is None or bool(self.files) or self.dirty


def code_paths(system: str, root: Path = ROOT) -> list[str]:
    """Git pathspecs (relative to ``root``) of the files whose changes can change ``system``'s measurements (module
    doc): the code's paths, then an exclusion for each of ``REPORT_SIDE``."""
    own = [f"impl/{system}", *sorted(p.relative_to(root).as_posix() for p in (root / "benches").glob(
        f"bench_{system}*.py"))]
    others = set()
    for path in [*(root / "impl" / system).rglob("*.py"), *(root / "benches").glob(f"bench_{system}*.py")]:
        others |= set(_IMPORT.findall(path.read_text(errors="replace")))
    deps = sorted(f"impl/{s}" for s in others - {system, "common"} if (root / "impl" / s).is_dir())
    return [*own, *SHARED, *deps, *(f":(exclude,glob){p}" for p in REPORT_SIDE)]


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or [f"git {args[0]} failed"])[-1])
    return done.stdout


def measure(system: str, commit: str, claims: int, root: Path = ROOT) -> Staleness:
    """``Staleness`` of ``claims`` claims of ``system`` measured at ``commit`` (a sha or its prefix)."""
    out = Staleness(system, commit, claims)
    paths = code_paths(system, root)
    try:
        _git(root, "cat-file", "-e", f"{commit}^{{commit}}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        out.why = f"commit {commit} is not in this checkout's history ({e})"
        return out
    try:
        out.changed = int(_git(root, "rev-list", "--count", f"{commit}..HEAD", "--", *paths))
        files = _git(root, "diff", "--name-only", commit, "HEAD", "--", *paths).split()
        own = (f"impl/{system}/", f"benches/bench_{system}")
        out.files = sorted(files, key=lambda f: (not f.startswith(own), f.startswith(SHARED), f))  # its own first
        out.dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no", "--", *paths).strip())
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        out.changed, out.why = None, str(e)
    return out


def of_slug(slug: str, root: Path = ROOT, results: Path = RESULTS) -> list[Staleness]:
    """One ``Staleness`` per (system, measured commit) of ``results/<slug>/claims.json`` (a claim built from several
    runs counts under each of their commits); [] if there is no such file."""
    path = Path(results) / slug / "claims.json"
    if not path.exists():
        return []
    counts: dict[tuple[str, str], int] = {}
    for row in json.loads(path.read_text()):
        commits = [p["commit"] for p in row.get("provenance") or [] if p.get("commit")] or \
            ([row["commit"]] if row.get("commit") and row["verdict"] != "not measured" else [])
        for c in dict.fromkeys(commits):
            counts[(row["system"], c)] = counts.get((row["system"], c), 0) + 1
    return [measure(system, commit, n, root) for (system, commit), n in counts.items()]


def describe(s: Staleness, shown: int = 3) -> str:
    """One line for a person: what was measured where, and what changed since."""
    head = f"{s.system}: {s.claims} claim{'s' if s.claims != 1 else ''} measured at {s.commit}"
    if s.changed is None:
        return f"{head}: unknown whether its code changed since ({s.why})"
    tail = " (and uncommitted edits)" if s.dirty else ""
    if not s.files:
        undone = (f" ({s.changed} commit{'s' if s.changed != 1 else ''} since touched it and left it as measured)"
                  if s.changed else "")
        return f"{head}: its code is unchanged since{undone}{tail}"
    more = f", +{len(s.files) - shown} more" if len(s.files) > shown else ""
    return (f"{head}: {s.changed} commit{'s' if s.changed != 1 else ''} since touch its code "
            f"({', '.join(s.files[:shown])}{more}){tail}")
