"""One flat device buffer holding many named tensors, so that one access-policy window can cover all of them.

An access-policy window is a single address range per stream; a model's parameters, allocated one by one, are
scattered. ``Arena`` lays tensors out back to back (each start aligned to 256 B) in one ``uint8`` buffer and hands
out typed views; ``Span`` is a byte range of it (with its device address, which is what a window takes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

ALIGN = 256


@dataclass(frozen=True)
class Span:
    """Bytes ``[offset, offset + nbytes)`` of a buffer whose first byte is at device address ``base_ptr``."""

    base_ptr: int
    offset: int
    nbytes: int

    @property
    def ptr(self) -> int:
        return self.base_ptr + self.offset


def _round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


class Arena:
    """Named tensors of given shapes and dtypes, laid out in order in one buffer (uninitialised until filled)."""

    def __init__(self, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], device: str | torch.device) -> None:
        if not specs:
            raise ValueError("an Arena needs at least one tensor")
        self.offsets: dict[str, int] = {}
        off = 0
        for name, (shape, dtype) in specs.items():
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r} has a negative dimension: {shape}")
            self.offsets[name] = off
            off = _round_up(off + _nbytes(shape, dtype))
        self.buffer = torch.zeros(max(off, ALIGN), dtype=torch.uint8, device=device)
        self.views: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in specs.items():
            start = self.offsets[name]
            self.views[name] = self.buffer[start:start + _nbytes(shape, dtype)].view(dtype).view(shape)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], device: str | torch.device,
                     dtype: torch.dtype | None = None) -> "Arena":
        """Copy ``tensors`` (converted to ``dtype`` if given) into a new arena on ``device``."""
        arena = cls({k: (tuple(t.shape), dtype or t.dtype) for k, t in tensors.items()}, device)
        with torch.no_grad():
            for k, t in tensors.items():
                arena.views[k].copy_(t.to(device=arena.buffer.device, dtype=arena.views[k].dtype))
        return arena

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.views[name]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def words(self) -> torch.Tensor:
        """The whole buffer as int32 words (its size is a multiple of 256 B)."""
        return self.buffer.view(torch.int32)

    def span(self, names: Iterable[str] | None = None) -> Span:
        """The byte range from the first to the end of the last of ``names`` (default: every tensor)."""
        names = list(self.views) if names is None else list(names)
        if not names:
            raise ValueError("span of no tensors")
        start = min(self.offsets[n] for n in names)
        end = max(self.offsets[n] + self.views[n].numel() * self.views[n].element_size() for n in names)
        return Span(self.buffer.data_ptr(), start, end - start)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class ArenaBacked:
    """Workload accessors for a model whose weights live in one ``Arena`` (``self.weights``) and whose activations,
    where the model owns them, live in another (``self.acts``).

    ``persist_span`` is what a persisting window should cover: the bytes read again and again (by default all the
    weights: a request reads them, and so does the next one). ``in_kernel_prefetch``: whether the model's layer
    kernels take a prefetch range (``LayerHooks.kernel_prefetch``); models running other kernels (cuDNN) do not."""

    weights: Arena
    in_kernel_prefetch = False
    sharing = "requests"  # what re-reads the weights: "layers" (ALBERT), "subnets" (once-for-all), "requests"

    @property
    def weight_bytes(self) -> int:
        return self.weights.nbytes

    def weight_span(self) -> Span:
        return self.weights.span()

    def persist_span(self) -> Span:
        return self.weights.span()

    def activation_span(self) -> Span | None:
        acts = getattr(self, "acts", None)
        return acts.span() if acts is not None else None

