"""Which ``CudaSortConfig`` sorts n slots of a mode: a measured table, loaded once per process.

A ``SortTable`` maps a slot mode (``keys32``, ``keys64``, ``composite``, ``pairs``; see ``impl.sort.cuda_sort``) to
entries ``(n, config)``: the fastest correct configuration a tune run (``python -m impl.sort.tune``) measured at n
keys. Lookup rule for n keys: the entry with the smallest measured n' >= n; beyond the largest measured n, the
largest's. A mode the table does not hold takes the built-in default (``BUILTIN``: the fastest configurations of the
first measured run, tile 2^13 x 32 keys per thread for 4-byte keys).

Where the table comes from (``active_table``): ``LAB_SORT_TABLE`` (a path), else this card's stored table
``results/<card>/sort/config_table.json`` (written by the tune run, which ``python -m impl gpu sort`` runs before the
tests and benches), else the built-in defaults. ``describe`` says which; benches record it.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from impl.common.tables import ActiveTable, read_table
from impl.sort.plan import MODES, CudaSortConfig

FORMAT = "sort-config-table/1"
TABLE_RESULT = "config_table"
BUILTIN: dict[str, CudaSortConfig] = {
    "keys32": CudaSortConfig(tile_bits=13, items_bits=5, run_bits=5),
    "keys64": CudaSortConfig(tile_bits=14, items_bits=6, run_bits=5),
    "composite": CudaSortConfig(tile_bits=14, items_bits=6, run_bits=5),
    "pairs": CudaSortConfig(tile_bits=14, items_bits=6, run_bits=5),
}


def config_name(c: CudaSortConfig) -> str:
    """Short label, e.g. ``t13e5r5`` (``M14``: 2^14 keys per block in the merge passes; ``m4``: 2^4 keys per thread
    in them; ``s7``: the tile pass performs stages 1..7 only; ``o2``: the graph on a stream per region of 2^2, see
    ``CudaSortConfig.overlap_bits``; ``f3``: 3 of every 6 compare-exchanges of the tile pass of 32-bit keys take
    their maximum on the FMA pipe, see ``CudaSortConfig.fma_max``; ``-staged``: merge passes do not cross stages)."""
    tile = "" if c.merge_tile_bits in (None, c.tile_bits) else f"M{c.merge_tile_bits}"
    merge = "" if c.merge_items_bits in (None, c.items_bits) else f"m{c.merge_items_bits}"
    overlap = "" if c.overlap_bits == CudaSortConfig.overlap_bits else f"o{c.overlap_bits}"
    stages = "" if c.tile_stages is None else f"s{c.tile_stages}"
    fma = f"f{c.fma_max}" if c.fma_max else ""
    return (f"t{c.tile_bits}e{c.items_bits}r{c.run_bits}{tile}{merge}{stages}{overlap}{fma}"
            + ("" if c.fuse else "-staged"))


@dataclass
class SortTable:
    """entries[mode] = [(n, config), ...] sorted by n (see the module doc)."""

    entries: dict[str, list[tuple[int, CudaSortConfig]]] = field(default_factory=dict)
    origin: str = "built-in defaults"

    def config_for(self, n: int, mode: str) -> CudaSortConfig:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
        rows = self.entries.get(mode)
        if not rows:
            return BUILTIN[mode]
        i = bisect_left([r[0] for r in rows], n)
        return rows[min(i, len(rows) - 1)][1]

    def source_for(self, mode: str) -> str:
        return self.origin if self.entries.get(mode) else "built-in defaults"

    def describe(self) -> str:
        held = ", ".join(f"{m}: " + " ".join(f"{n}->{config_name(c)}" for n, c in rows)
                         for m, rows in sorted(self.entries.items()))
        return f"{self.origin}" + (f" ({held})" if held else "")

    def to_data(self) -> dict[str, Any]:
        return {"format": FORMAT, "entries": [{"mode": m, "n": n, "config": asdict(c)}
                                              for m, rows in sorted(self.entries.items()) for n, c in rows]}

    @classmethod
    def from_data(cls, data: dict[str, Any], origin: str = "measured table") -> "SortTable":
        """A table from ``to_data`` output (also inside a stored result record's ``data``)."""
        if isinstance(data, dict) and "data" in data and "entries" not in data:
            data = data["data"]
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a sort config table (format {FORMAT!r} expected)")
        entries: dict[str, list[tuple[int, CudaSortConfig]]] = {}
        for i, row in enumerate(data.get("entries", [])):
            try:
                mode, n, config = row["mode"], int(row["n"]), CudaSortConfig(**row["config"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"sort table entry {i} is malformed ({e}): {row}") from e
            if mode not in MODES or n < 1:
                raise ValueError(f"sort table entry {i} has an unknown mode or a non-positive n: {row}")
            config.shape(mode)  # raises if the config cannot hold this mode's slots
            entries.setdefault(mode, []).append((n, config))
        for mode, rows in entries.items():
            rows.sort(key=lambda r: r[0])
            ns = [r[0] for r in rows]
            if len(set(ns)) != len(ns):
                raise ValueError(f"sort table holds n={ns} twice for mode {mode}")
        return cls(entries, origin)

    @classmethod
    def load(cls, path: str | Path) -> "SortTable":
        data, origin = read_table(path, "sort config table")
        return cls.from_data(data, origin=origin)


def select(rows: list[dict[str, Any]]) -> SortTable:
    """The table of a tune run: per (mode, n), the fastest timed whole-sort row that was correct before and after
    timing (graph launches; every other row is ignored)."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("launch") != "graph" or "ms" not in r or not (r.get("correct") and r.get("correct_after_timing")):
            continue
        key = (r["mode"], int(r["n"]))
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    entries: dict[str, list[tuple[int, CudaSortConfig]]] = {}
    for (mode, n), r in sorted(best.items()):
        entries.setdefault(mode, []).append((n, CudaSortConfig(**r["config"])))
    return SortTable(entries, "measured table (this run)")


_TABLE = ActiveTable("sort", TABLE_RESULT, "LAB_SORT_TABLE", SortTable.load, SortTable)


def stored_table_path() -> Path | None:
    """``results/<card>/sort/config_table.json`` for the card in use (None without a GPU)."""
    return _TABLE.stored_path()


def active_table() -> SortTable:
    """The table sorts without an explicit config use (module doc); loaded once per process."""
    return _TABLE.get()


def use_table(table: SortTable | None) -> None:
    """Make ``table`` the one new sorters take (None: load again as ``active_table`` says)."""
    _TABLE.use(table)


def config_for(n: int, mode: str) -> CudaSortConfig:
    return active_table().config_for(n, mode)
