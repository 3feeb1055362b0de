"""Where results live and how they are written: ``results/<gpu-slug>/``, atomically, never silently overwritten.

Layout of ``results/<slug>/``:
  ``<machine-id>/NNNN_<commit>_<date>.json``  pytest-benchmark runs (``--benchmark-save``)
  ``calibration.json``                       measured peaks of the card (copy GB/s, bf16/fp8 TFLOP/s)
  ``<system>/<name>.json``                   experiment results written by ``write_result``
  ``claims.json``, ``REPORT.md``, ``*.png``   the evaluated ledger (``python -m impl report``)
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
import re
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

from impl import backend

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
CURRENT_CARD = "h200"  # the card lent now: its report is the one to read; other cards' reports are history
RUN_ID = os.environ.get("LAB_RUN_ID") or uuid.uuid4().hex[:12]
"""This process's run: stored in every record ``write_result`` writes. ``LAB_RUN_ID`` shares one id across the
processes of one run (a driver and its children); a fresh run has a fresh id (the "best of many" rule needs that)."""


def gpu_name() -> str:
    if not backend.ON_GPU:
        return "cpu"
    import torch

    return torch.cuda.get_device_name(torch.cuda.current_device())


def slugify_gpu(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'; 'cpu' stays 'cpu'."""
    name = re.sub(r"^(nvidia|amd)\s+", "", name.strip(), flags=re.I).lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def gpu_slug() -> str:
    """Folder name of this card's results. ``LAB_RESULTS_SLUG`` (set by tox's per-GPU envs) must match the card; on a
    machine without a GPU it may only say ``cpu`` (CPU numbers never land in a GPU's folder)."""
    detected = slugify_gpu(gpu_name())
    wanted = os.environ.get("LAB_RESULTS_SLUG")
    if wanted and wanted != detected:
        where = "this card is" if backend.ON_GPU else "this machine has no GPU, so its results go to"
        raise RuntimeError(f"LAB_RESULTS_SLUG={wanted!r} but {where} {detected!r}: its results would land in "
                           "another card's folder; unset it or use the tox env of this card")
    return detected


def results_dir(slug: str | None = None) -> Path:
    return RESULTS / (slug or gpu_slug())


def git_commit(short: bool = True) -> str:
    """HEAD of this checkout (``+dirty`` if impl/ or benches/ differ); ``LAB_COMMIT`` where it is set (the GPU
    machine receives a copy of the working tree whose .git may stop at an older commit), ``+dirty`` unless the files
    here are that commit's (``stated_tree_problem``)."""
    if os.environ.get("LAB_COMMIT"):
        sha = os.environ["LAB_COMMIT"]
        return (sha[:12] if short else sha) + ("+dirty" if stated_tree_problem() else "")
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "impl", "benches"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    sha = out.stdout.strip()
    return (sha[:12] if short else sha) + ("+dirty" if dirty else "")


RUN_OUTPUTS = ("results",)  # what runs write into the checkout: left out when its files are checked


def code_tree(commit: str | None = None) -> str | None:
    """git's hash of the checkout's tree without ``RUN_OUTPUTS``: of ``commit``'s files when one is named (it must
    be in this repository), else of the files on disk as they are (every file .gitignore does not exclude). Built
    in a scratch index, so the checkout's own index is untouched. None where git cannot say."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        # the files on disk are hashed into a scratch repository: a copy of the tree may come without .git
        git = ["git"] if commit else ["git", f"--git-dir={tmp}/scratch.git", f"--work-tree={ROOT}"]
        steps = [["read-tree", commit] if commit else ["add", "-A", "--", "."],
                 ["rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", *RUN_OUTPUTS], ["write-tree"]]
        try:
            if not commit:
                subprocess.run(["git", "init", "-q", "--bare", f"{tmp}/scratch.git"], check=True, capture_output=True,
                               timeout=60)
            for step in steps:
                out = subprocess.run([*git, *step], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
                if out.returncode != 0:
                    return None
        except (OSError, subprocess.SubprocessError):
            return None
    return out.stdout.strip() or None


@functools.cache
def stated_tree_problem() -> str | None:
    """Why the files here may not be ``LAB_COMMIT``'s, or None when they are: ``LAB_TREE`` must be that commit's
    ``code_tree`` (``python -m impl provenance <sha>`` prints both variables) and equal the ``code_tree`` of the files
    on disk. Checked once per process."""
    stated, commit = os.environ.get("LAB_TREE", ""), os.environ.get("LAB_COMMIT", "")
    if not stated:
        return (f"LAB_COMMIT={commit[:12]} comes without LAB_TREE, so nothing checks that these files are its: run "
                "`python -m impl provenance <sha>` where the commit is and pass both")
    here = code_tree()
    if here is None:
        return "git cannot hash the files here, so they cannot be checked against LAB_TREE"
    if here != stated:
        return (f"the files here (tree {here[:12]}) are not LAB_COMMIT={commit[:12]}'s (tree {stated[:12]}): "
                "edited or stale")
    return None


_KNOWN_COMMITS: dict[str, bool | None] = {}


def commit_exists(sha: str) -> bool | None:
    """Whether ``sha`` (short or full) names a commit of this repository's history: None where that cannot be told
    (no git, not a checkout, or a shallow clone whose history is cut)."""
    if sha not in _KNOWN_COMMITS:
        _KNOWN_COMMITS[sha] = _ask_git_for_commit(sha)
    return _KNOWN_COMMITS[sha]


def _ask_git_for_commit(sha: str) -> bool | None:
    if not re.fullmatch(r"[0-9a-f]{4,40}", sha):
        return False
    stated = os.environ.get("LAB_COMMIT", "")
    if stated:
        # A copy of the tree whose commit is stated (the GPU machine): any .git there may stop at an older commit,
        # so it cannot rule a newer one out. The stated commit vouches for itself; any other is undecidable here.
        return True if stated.startswith(sha) or sha.startswith(stated) else None
    try:
        shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=30)
        if shallow.returncode != 0 or shallow.stdout.strip() != "false":
            return None
        found = subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=ROOT, capture_output=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.returncode == 0


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def machine_info() -> dict[str, Any]:
    """GPU name, SMs, L2, driver, CUDA, library versions and host CPU: stored beside every result."""
    info: dict[str, Any] = {"host_cpu": _host_cpu(), "host_cores": os.cpu_count(), "python": platform.python_version(),
                            "backend": backend.describe()}
    info.update(_library_versions())
    if backend.ON_GPU:
        import torch

        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=p.name, gpu_slug=gpu_slug(), sm_count=p.multi_processor_count, l2_bytes=int(p.L2_cache_size),
                    gpu_memory_bytes=int(p.total_memory), compute_capability=f"{p.major}.{p.minor}",
                    cuda_runtime=torch.version.cuda, driver=_driver_version())
    else:
        info.update(gpu=None, gpu_slug="cpu")
    return info


def _library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("torch", "triton", "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda", "numpy"):
        try:
            out[pkg.replace("-cuda13x", "").replace("-cuda12x", "")] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out.setdefault(pkg.replace("-cuda13x", "").replace("-cuda12x", ""), None)
    return out


def _host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def atomic_write_text(path: Path, text: str, *, overwrite: bool = False) -> bool:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    An existing file with different content is replaced only when ``overwrite`` is true (and that is said on stdout);
    otherwise ``FileExistsError`` names it. Returns True when the file changed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        if path.read_text() == text:
            return False
        if not overwrite:
            raise FileExistsError(f"{path} exists with other content; pass overwrite=True (or a new name) to replace it")
        print(f"replacing {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def atomic_write_bytes(path: Path, data: bytes, *, overwrite: bool = False) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_bytes() == data:
        return False
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists with other content; pass overwrite=True to replace it")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


def write_result(system: str, name: str, data: dict[str, Any], *, slug: str | None = None,
                 overwrite: bool = False, root: Path = RESULTS) -> Path:
    """Store an experiment's result as ``<root>/<slug>/<system>/<name>.json`` with device, commit, date and run id.

    ``slug`` defaults to this machine's (``gpu_slug``). Without a GPU the only slug allowed under the suite's own
    ``results/`` is ``cpu``: a CPU number never lands in a GPU's folder; another ``root`` (a test's temporary
    folder) takes any slug. ``data["complete"]``, where the experiment sets it, says whether the run finished: the
    ledger reads a record with ``complete: false`` as not measured.
    """
    if not re.fullmatch(r"[a-z0-9_]+", system) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"bad result name {system!r}/{name!r}: use [a-z0-9_] for the system, [A-Za-z0-9_.-] for names")
    slug = slug or gpu_slug()
    if not backend.ON_GPU and slug != "cpu" and Path(root).resolve() == RESULTS.resolve():
        raise RuntimeError(f"write_result({system!r}, {name!r}, slug={slug!r}) on a machine without a GPU: CPU results "
                           "go to results/cpu/ only (pass root= a scratch folder to write elsewhere, as tests do)")
    record = {"system": system, "name": name, "device": gpu_name(), "commit": git_commit(), "date": now_iso(),
              "run_id": RUN_ID, "machine": machine_info(), "data": data}
    path = Path(root) / slug / system / f"{name}.json"
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, default=json_default) + "\n",
                      overwrite=overwrite)
    return path


def json_default(o: Any) -> Any:
    """``json.dumps``'s ``default`` for records: numpy/torch scalars and arrays as Python values, paths as text."""
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
