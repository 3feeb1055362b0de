"""Which launch config each FP8 kernel runs with: a measured table where one exists, built-in defaults otherwise.

A kernel key (``KERNELS``) names one kernel as a workload uses it (``dequant_key`` / ``quant_key`` map a scale group
to it); a shape class (``shape_class``) names the kind of [N, K] matrix it runs on: "small" (at most
``SMALL_ELEMENTS`` elements: a fixed cost per call weighs most), "wide" (rows wider than ``WIDE_K``), "large" (the
rest). ``config(key, n, k)`` is the ``LaunchConfig`` it launches with, looked up per call:

  1. the active ``LaunchTable``'s entry for the key and the shape's class, where the table holds one;
  2. else the table's entry for the key (one config for every shape: tables written before shape classes);
  3. else the built-in default: ``GPU_CONFIGS`` on a GPU, ``CPU_CONFIGS`` under the interpreter.

The table comes from a tune run (``python -m impl.fp8.tune``): every candidate checked bit for bit against the
reference, then timed on a representative shape of each class; the fastest per kernel and class is kept and written
as ``results/<card>/fp8/launch_table.json``. Where
the active table comes from (``active_table``, loaded once per process): ``LAB_FP8_LAUNCH_TABLE`` (a path), else
this card's stored table (on a GPU; the one the last tune run wrote, or the committed one), else none (built-in
defaults only). ``use_table`` sets it (tests). ``describe`` says which table is in use; benches record it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from impl import backend
from impl.common.tables import ActiveTable, read_table
from impl.fp8.formats import ScaleGroup

FORMAT = "fp8-launch-table/2"  # written; /1 (no "classes") is still read
FORMATS = ("fp8-launch-table/1", FORMAT)
TABLE_RESULT = "launch_table"
ENV = "LAB_FP8_LAUNCH_TABLE"
WARPS = (1, 2, 4, 8, 16, 32)
EVICT = (0, 1, 2)  # LaunchConfig.evict: default L2 policy / loads evict_first / loads and stores evict_first


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


@dataclass(frozen=True)
class LaunchConfig:
    """How a kernel is launched: tiles of [bm, bk], ``warps`` warps, ``per_sm`` programs per SM striding over the
    tiles (0: one program per tile; never more than fit on an SM at once), and ``stages``: 2 makes those persistent
    programs load their next tile before converting the current one (the kernels' own two-stage pipeline; the
    dequantize, amax, per-tensor/static quantize, 1 x G group and one-pass block quantize kernels have it), 1 loads
    and converts one tile at a time. ``evict``: the L2 policy of the streamed data: 0 the default; 1 the input's
    loads (its last read) evict_first, so the stream recycles its own lines in L2 instead of evicting (and writing
    back) other work's; 2 the output's stores too."""

    bm: int
    bk: int
    warps: int = 4
    stages: int = 1
    per_sm: int = 0
    evict: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            if type(getattr(self, f.name)) is not int:
                raise TypeError(f"LaunchConfig.{f.name} must be an int, got {getattr(self, f.name)!r}")
        if not (_pow2(self.bm) and _pow2(self.bk)):
            raise ValueError(f"tile sides must be powers of two, got bm={self.bm}, bk={self.bk}")
        if self.warps not in WARPS or self.stages < 1 or self.per_sm < 0 or self.evict not in EVICT:
            raise ValueError(f"need warps in {WARPS}, stages >= 1, per_sm >= 0, evict in {EVICT}; got {self}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LaunchConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown launch config fields {sorted(unknown)}")
        return cls(**d)


# Built-in defaults (a tune run's table overrides them per key): the H200 tune's winners. Register counts are
# ptxas's for sm_90 with the arguments' divisibility by 16 the JIT specializes on (test_fp8_compile); what a kernel
# streams well is bytes of loads in flight per SM (~20-40 KB cover HBM latency at full bandwidth), i.e. elements a
# thread holds x resident programs. A persistent config (per_sm > 0) launches at
# most the programs that fit on the SMs at once (``quant.resident_programs``: a larger grid runs in two waves). A
# "requant-group" tile is bm * max(bk, G) values: that many whole 1 x G groups, consecutive in row-major order
# (``stages`` unused); bk of "requant-block" is ignored (the block's width) and bm is the rows per pass (a divisor of
# the block height: smaller reads each block twice, the second time from L1/L2; equal holds the block in registers).
GPU_CONFIGS: dict[str, LaunchConfig] = {
    "dequant-tensor": LaunchConfig(8, 512, warps=4),      # 32 registers: 16 programs an SM (the warp limit)
    "dequant-channel": LaunchConfig(16, 256, warps=4),    # per-row scales, and 1 x G groups
    "dequant-block": LaunchConfig(16, 512, warps=8),      # 128 x 128 blocks: one row group, [1, bk] scales per tile
    "quant-static": LaunchConfig(8, 512, warps=4),        # given scales, any group
    "amax": LaunchConfig(8, 1024, warps=8, per_sm=4),     # 59 registers: 4 programs of 8 warps resident
    "requant-tensor": LaunchConfig(8, 512, warps=4),      # the second pass of dynamic per-tensor
    "requant-delayed": LaunchConfig(1, 4096, warps=4, stages=2, per_sm=16),  # per-tensor, the previous call's amax
    "requant-channel": LaunchConfig(1, 2048, warps=4),    # rows wider than bk: amax pass + quantize pass (L1/L2)
    "requant-group": LaunchConfig(8, 1024, warps=4),      # 64 groups a tile: 64 values a thread, 89 registers
    "requant-block": LaunchConfig(32, 128, warps=8),      # 32-row passes, each block read twice (from L1/L2)
}
# the interpreter runs one program at a time with numpy: few, large tiles
CPU_CONFIGS: dict[str, LaunchConfig] = {
    "dequant-tensor": LaunchConfig(64, 128), "dequant-channel": LaunchConfig(64, 128),
    "dequant-block": LaunchConfig(32, 256), "quant-static": LaunchConfig(64, 128),
    "amax": LaunchConfig(32, 64, per_sm=2), "requant-tensor": LaunchConfig(32, 64, per_sm=2),
    "requant-delayed": LaunchConfig(32, 64, per_sm=2), "requant-channel": LaunchConfig(4, 4096),
    "requant-group": LaunchConfig(64, 128), "requant-block": LaunchConfig(32, 128),
}
KERNELS = tuple(GPU_CONFIGS)

# Shape classes of an [N, K] matrix (the 2-D view a kernel runs on), tested in this order; a table may hold a config
# per (kernel, class). A Llama-3-8B layer: 4096x4096, 6144x4096, 1024x4096 and any activation are "small",
# 4096x14336 (down projection) "wide", 14336x4096 and 28672x4096 "large".
SMALL_ELEMENTS = 1 << 25  # 32 Mi elements (64 MiB of bf16, about an L2's worth)
WIDE_K = 8192
SHAPE_CLASSES = ("large", "small", "wide")


def shape_class(n: int, k: int) -> str:
    """The class of an [n, k] matrix: "small" if n * k <= SMALL_ELEMENTS, else "wide" if k > WIDE_K, else
    "large"."""
    if n * k <= SMALL_ELEMENTS:
        return "small"
    return "wide" if k > WIDE_K else "large"


def describe_classes() -> dict[str, str]:
    """The rule of each class, as a table records it."""
    return {"small": f"n * k <= {SMALL_ELEMENTS}", "wide": f"n * k > {SMALL_ELEMENTS} and k > {WIDE_K}",
            "large": f"n * k > {SMALL_ELEMENTS} and k <= {WIDE_K}"}


def dequant_key(group: ScaleGroup) -> str:
    """The kernel key of dequantizing with scales of ``group``."""
    if group.gn == 0 and group.gk == 0:
        return "dequant-tensor"
    return "dequant-channel" if group.gn <= 1 else "dequant-block"


def quant_key(group: ScaleGroup) -> str:
    """The kernel key of quantizing with dynamic scales of ``group`` (per-tensor: its second pass; "amax" the first)."""
    if group.gn == 0 and group.gk == 0:
        return "requant-tensor"
    if group.gk == 0:
        return "requant-channel"
    return "requant-group" if group.gn == 1 else "requant-block"


@dataclass
class LaunchTable:
    """configs[key] = the measured ``LaunchConfig`` of kernel ``key`` for every shape (a subset of ``KERNELS``);
    classes[key][cls] = the one measured for shapes of class ``cls`` (``SHAPE_CLASSES``), taken before ``configs``."""

    configs: dict[str, LaunchConfig] = field(default_factory=dict)
    origin: str = "built-in defaults (no measured table)"
    selected_in_run: str | None = None  # the tune run that measured it
    classes: dict[str, dict[str, LaunchConfig]] = field(default_factory=dict)

    def get(self, key: str, cls: str | None = None) -> LaunchConfig | None:
        """The entry of ``key`` for shape class ``cls``, else for every shape, else None."""
        return self.classes.get(key, {}).get(cls) or self.configs.get(key)

    def describe(self) -> str:
        per_class = sum(len(v) for v in self.classes.values())
        return f"launch table: {self.origin} ({len(set(self.configs) | set(self.classes))} of {len(KERNELS)} " \
               f"kernels" + (f", {per_class} per-class entries)" if per_class else ")")

    def to_data(self) -> dict[str, Any]:
        return {"format": FORMAT, "origin": self.origin, "selected_in_run": self.selected_in_run,
                "kernels": {k: asdict(c) for k, c in sorted(self.configs.items())},
                "shape_classes": describe_classes(),
                "classes": {k: {c: asdict(v) for c, v in sorted(by.items())} for k, by in sorted(self.classes.items())}}

    @classmethod
    def from_data(cls, data: dict[str, Any], origin: str | None = None) -> "LaunchTable":
        """From ``to_data``'s dict or a stored result record holding it under ``data``."""
        if isinstance(data, dict) and "data" in data and "format" not in data:
            data = data["data"]
        if not isinstance(data, dict) or data.get("format") not in FORMATS:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not an FP8 launch table: expected format {' or '.join(map(repr, FORMATS))}, got {got!r}")
        kernels, by_class = data.get("kernels"), data.get("classes", {})
        if not isinstance(kernels, dict) or not isinstance(by_class, dict):
            raise ValueError(f"an FP8 launch table needs 'kernels' (and optional 'classes') mappings, got "
                             f"{type(kernels).__name__} / {type(by_class).__name__}")
        configs = {key: _entry(key, d) for key, d in kernels.items()}
        classes: dict[str, dict[str, LaunchConfig]] = {}
        for key, per in by_class.items():
            if not isinstance(per, dict):
                raise ValueError(f"FP8 launch table classes of {key!r} must map a shape class to a config, got {per}")
            for c, d in per.items():
                if c not in SHAPE_CLASSES:
                    raise ValueError(f"FP8 launch table names an unknown shape class {c!r} for {key!r}; known: "
                                     f"{', '.join(SHAPE_CLASSES)}")
                classes.setdefault(key, {})[c] = _entry(key, d)
        return cls(configs, origin or str(data.get("origin", "measured table")), data.get("selected_in_run"),
                   classes)

    @classmethod
    def load(cls, path: str | Path) -> "LaunchTable":
        data, origin = read_table(path, "FP8 launch table")
        return cls.from_data(data, origin=origin)


def _entry(key: str, d: Any) -> LaunchConfig:
    if key not in KERNELS:
        raise ValueError(f"FP8 launch table names an unknown kernel {key!r}; known: {', '.join(KERNELS)}")
    try:
        return LaunchConfig.from_dict(d)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"FP8 launch table entry {key!r} is malformed ({e}): {d}") from e


_TABLE = ActiveTable("fp8", TABLE_RESULT, ENV, LaunchTable.load, LaunchTable,
                     on_card=lambda: backend.ON_GPU and not backend.INTERPRETED)


def stored_table_path() -> Path | None:
    """``results/<card>/fp8/launch_table.json`` for the card in use (None without a GPU)."""
    return _TABLE.stored_path()


def active_table() -> LaunchTable:
    """The table ``config`` consults (module doc); loaded once per process."""
    return _TABLE.get()


def use_table(table: LaunchTable | None) -> None:
    """Make ``table`` the active one (None: load again as ``active_table`` says)."""
    _TABLE.use(table)


def builtin(key: str) -> LaunchConfig:
    """The built-in default of ``key`` on this backend."""
    if key not in KERNELS:
        raise KeyError(f"unknown FP8 kernel {key!r}; known: {', '.join(KERNELS)}")
    return (GPU_CONFIGS if backend.ON_GPU and not backend.INTERPRETED else CPU_CONFIGS)[key]


def config(key: str, n: int, k: int) -> LaunchConfig:
    """The launch config of kernel ``key`` on an [n, k] matrix: the active table's for the shape's class, else the
    table's for every shape, else the built-in default."""
    default = builtin(key)
    return active_table().get(key, shape_class(n, k)) or default
