"""Which GEMM serves each FP8 projection at each batch size M: a measured table, loaded at start-up.

A ``GemmTable`` maps (N, K, M) to a ``GemmChoice``: ``w8a16`` (``fp8_gemv``'s kernel with one ``GemvConfig``),
``inner`` (impl.fp8's ``Fp8Linear`` path: W8A8 ``torch._scaled_mm`` with per-token activation scales on a GPU) or
``deferred`` (W8A8 ``torch._scaled_mm`` with unit scales, the scales applied by the kernel that consumes the output:
``fp8_gemv.unit_scaled_mm``). The
entries come from a tune run (``python -m impl.serve.tune``), which checks every candidate against float64 and keeps
the fastest measured one per (projection, M). Lookup rule for M rows of an (N, K) projection: the entry with the
smallest measured M' >= M (sizes between two measured ones take the larger one's choice, whose tiles cover them).
Beyond the largest measured M (prefill), and for a projection the table does not hold, the stated rule applies:
``w8a16`` with ``fp8_gemv.default_config`` up to ``RULE_MAX_M`` rows, ``inner`` above.

A table may also carry ``pdl`` (launch the W8A16 kernels with programmatic dependent launch: measured on or off as a
whole decode step, as is the L2 prefetch of the batch-1 entries' first codes, ``GemvConfig.prefetch``) and ``fixed``:
one configuration for every M and projection, which makes each row's result independent of the batch it is in (batch-
invariant serving: greedy outputs equal to running each prompt alone).

Where the table comes from (``active_table``): ``LAB_SERVE_GEMM_TABLE`` (a path), else the stored table of this card
``results/<card>/serve/gemm_table.json``, else the rule. ``describe`` says which, and engines report it.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from impl.common.tables import ActiveTable, read_table
from impl.serve.fp8_gemv import GemvConfig, default_config

PATHS = ("w8a16", "inner", "deferred")
RULE_MAX_M = 128
FORMAT = "serve-gemm-table/1"
TABLE_RESULT = "gemm_table"


@dataclass(frozen=True)
class GemmChoice:
    path: str
    config: GemvConfig | None = None
    source: str = "rule"

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"GEMM path must be one of {PATHS}, got {self.path!r}")
        if (self.path == "w8a16") != (self.config is not None):
            raise ValueError(f"a w8a16 choice needs a GemvConfig and an {self.path!r} choice none")

    @property
    def name(self) -> str:
        return self.config.name if self.config is not None else self.path


def rule_choice(n: int, k: int, m: int) -> GemmChoice:
    if m <= RULE_MAX_M:
        return GemmChoice("w8a16", default_config(m, n, k), "rule")
    return GemmChoice("inner", None, "rule")


@dataclass
class GemmTable:
    """entries[(n, k)] = [(m, choice), ...] sorted by m (see the module doc)."""

    entries: dict[tuple[int, int], list[tuple[int, GemmChoice]]] = field(default_factory=dict)
    pdl: bool = False
    origin: str = "rule (no measured table)"
    fixed: GemvConfig | None = None
    selected_in_run: str | None = None  # the tune run that measured the entries

    def lookup(self, n: int, k: int, m: int) -> GemmChoice:
        if self.fixed is not None:
            return GemmChoice("w8a16", self.fixed, "fixed")
        rows = self.entries.get((n, k))
        if not rows or m > rows[-1][0]:
            return rule_choice(n, k, m)
        return rows[bisect_left([r[0] for r in rows], m)][1]

    def describe(self) -> str:
        kind = f"fixed {self.fixed.name} (batch-invariant)" if self.fixed is not None else self.origin
        pf = sum(1 for lst in self.entries.values() for _, c in lst if c.config is not None and c.config.prefetch)
        prefetch = f", L2 prefetch in {pf} entries" if pf else ""
        return f"gemm table: {kind}, pdl {'on' if self.pdl else 'off'}{prefetch}"

    def to_data(self) -> dict[str, Any]:
        rows = [{"n": n, "k": k, "m": m, "path": c.path, "config": c.config.to_dict() if c.config else None}
                for (n, k), lst in sorted(self.entries.items()) for m, c in lst]
        return {"format": FORMAT, "pdl": self.pdl, "origin": self.origin, "selected_in_run": self.selected_in_run,
                "fixed": self.fixed.to_dict() if self.fixed else None, "entries": rows}

    @classmethod
    def from_data(cls, data: dict[str, Any], origin: str | None = None) -> "GemmTable":
        """From ``to_data``'s dict or a stored result record holding it under ``data`` (extra keys are ignored)."""
        if isinstance(data, dict) and "data" in data and "format" not in data:
            data = data["data"]
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a GEMM table: expected format {FORMAT!r}, got "
                             f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
        entries: dict[tuple[int, int], list[tuple[int, GemmChoice]]] = {}
        for i, row in enumerate(data.get("entries") or []):
            try:
                n, k, m = int(row["n"]), int(row["k"]), int(row["m"])
                cfg = GemvConfig.from_dict(row["config"]) if row.get("config") else None
                choice = GemmChoice(row["path"], cfg, "measured")
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"GEMM table entry {i} is malformed ({e}): {row}") from e
            if min(n, k, m) < 1:
                raise ValueError(f"GEMM table entry {i} has a non-positive size: {row}")
            entries.setdefault((n, k), []).append((m, choice))
        for lst in entries.values():
            lst.sort(key=lambda r: r[0])
            ms = [r[0] for r in lst]
            if len(set(ms)) != len(ms):
                raise ValueError(f"GEMM table holds M={ms} twice for one projection")
        fixed = GemvConfig.from_dict(data["fixed"]) if data.get("fixed") else None
        return cls(entries, bool(data.get("pdl", False)), origin or str(data.get("origin", "measured table")), fixed,
                   data.get("selected_in_run"))

    @classmethod
    def load(cls, path: str | Path) -> "GemmTable":
        data, origin = read_table(path, "GEMM table")
        return cls.from_data(data, origin=origin)


_TABLE = ActiveTable("serve", TABLE_RESULT, "LAB_SERVE_GEMM_TABLE", GemmTable.load, GemmTable)


def stored_table_path() -> Path | None:
    """``results/<card>/serve/gemm_table.json`` for the card in use (None without a GPU)."""
    return _TABLE.stored_path()


def active_table() -> GemmTable:
    """The table new FP8 linears use (module doc); loaded once per process."""
    return _TABLE.get()


def use_table(table: GemmTable | None) -> None:
    """Make ``table`` the one new FP8 linears take (None: load again as ``active_table`` says)."""
    _TABLE.use(table)


def set_model_table(model: Any, table: GemmTable) -> int:
    """Point every FP8 decode linear of ``model`` at ``table``; returns how many. (CUDA graphs captured before keep
    the kernels they captured: capture again after this.)"""
    from impl.serve.fp8_gemv import DecodeFp8Linear

    count = 0
    for mod in model.modules():
        if isinstance(mod, DecodeFp8Linear):
            mod.table = table
            count += 1
    return count


INVARIANT = GemvConfig(dot=True, block_m=64, block_n=64, block_k=64, num_stages=2)


def make_batch_invariant(model: Any, config: GemvConfig = INVARIANT, use_kernel: bool | None = None) -> int:
    """Serve every linear of ``model`` (FP8 ones and dense ones, the LM head included) through the GEMV kernel with
    one fixed configuration, so each row's result does not depend on the other rows of its batch: with the per-row
    kernels of the rest of the step (norms, RoPE, paged attention per sequence, sampling) a request's greedy tokens
    are the same alone or in any batch. The default tile is 64 rows: a prefill of T tokens decodes each weight tile
    ~T/64 times (a 16-row tile would do it 4x as often; prefill is bound by that decode), while a decode step of up to
    64 sequences is one M tile that reads the weights once (its padded rows cost tensor-core work, not bytes). Returns
    the number of linears changed. ``use_kernel`` True forces the kernel on a CPU (interpreter; tests)."""
    from impl.serve.fp8_gemv import DecodeFp8Linear
    from impl.serve.model import DenseLinear

    if config.block_m == 0:
        raise ValueError("a batch-invariant configuration needs a fixed block_m")
    fixed = GemmTable(fixed=config, origin=f"fixed {config.name}")
    count = 0
    for mod in model.modules():
        if isinstance(mod, DecodeFp8Linear):
            mod.table, mod.use_kernel = fixed, use_kernel if use_kernel is not None else mod.use_kernel
        elif isinstance(mod, DenseLinear):
            mod.gemv_config, mod.use_kernel = config, use_kernel
        else:
            continue
        count += 1
    return count
