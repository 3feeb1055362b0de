"""Sort-merge join in plain torch: the GPU baseline (``torch.sort`` + ``searchsorted`` + duplicate expansion).

  build:        sorted_keys, perm = sort(build_keys)
  probe:        lo = searchsorted(sorted_keys, pk, left), hi = ... right; cnt = hi - lo; offsets = cumsum(cnt)
  materialize:  probe index of every output m by repeat_interleave(arange(np), cnt); its rank within the row
                r = m - start[row]; build position perm[lo[row] + r]; gather both row ids.
Output order: probe order, and within a probe row, sorted build keys' order (stable sort: build order).
"""
from __future__ import annotations

from dataclasses import dataclass

import impl  # noqa: F401
import torch

from impl.join.common import run_join


@dataclass
class SortedBuild:
    keys: torch.Tensor  # sorted build keys
    perm: torch.Tensor  # int64 build position of each sorted key
    rows: torch.Tensor


@dataclass
class SortProbed:
    built: SortedBuild
    lo: torch.Tensor      # first match in the sorted build keys, per probe row
    cnt: torch.Tensor     # matches per probe row
    start: torch.Tensor   # exclusive output offset per probe row
    rows: torch.Tensor
    total: int


class SortMergeJoin:
    name = "sortmerge-torch"

    def build(self, keys: torch.Tensor, rows: torch.Tensor) -> SortedBuild:
        sorted_keys, perm = torch.sort(keys, stable=True)
        return SortedBuild(sorted_keys, perm, rows)

    def probe(self, built: SortedBuild, keys: torch.Tensor, rows: torch.Tensor) -> SortProbed:
        lo = torch.searchsorted(built.keys, keys, side="left")
        cnt = torch.searchsorted(built.keys, keys, side="right") - lo
        ends = torch.cumsum(cnt, 0)
        total = int(ends[-1].item()) if ends.numel() else 0  # the one host sync: the output size
        return SortProbed(built, lo, cnt, ends - cnt, rows, total)

    def materialize(self, probed: SortProbed, out_build: torch.Tensor, out_probe: torch.Tensor) -> None:
        total, dev = probed.total, probed.cnt.device
        row = torch.repeat_interleave(torch.arange(probed.cnt.numel(), device=dev), probed.cnt, output_size=total)
        rank = torch.arange(total, device=dev) - probed.start[row]
        pos = probed.built.perm[probed.lo[row] + rank]
        torch.index_select(probed.built.rows, 0, pos, out=out_build)
        torch.index_select(probed.rows, 0, row, out=out_probe)

    def __call__(self, build_keys, probe_keys, build_rows=None, probe_rows=None, *, timed: bool = False):
        return run_join(self, build_keys, probe_keys, build_rows, probe_rows, timed=timed)


def sortmerge_join(build_keys, probe_keys, build_rows=None, probe_rows=None, *, timed: bool = False):
    """Inner equi-join by sort + binary search in torch; returns a ``JoinResult``."""
    return SortMergeJoin()(build_keys, probe_keys, build_rows, probe_rows, timed=timed)
