"""Order keys: a map from each supported dtype to unsigned integers whose plain integer order is numpy's sort order.

    key(x) = bits(x)                     uint32
    key(x) = bits(x) ^ sign              int32, int64           (two's complement -> offset binary)
    key(x) = ~bits(x) if x < 0 else bits(x) | sign               float16, float32 (IEEE sign-magnitude)
    key(NaN) = all ones                  every NaN, any sign or payload: NaNs sort last, like numpy
    key(-0.0) = key(+0.0)                only for argsort (``canon_zero``): numpy calls them equal
    descending: key ^= all ones          reversed order; NaNs then come first (as in torch.sort(descending=True))

Keys are ``nbits`` wide (16, 32 or 64) and live in a uint32 container (16/32-bit dtypes) or uint64 (int64). A sort of
the keys is decoded back to values; argsort packs ``key << 32 | index`` into one uint64 for 16/32-bit dtypes (the
CUDA C++ passes hold ``key << 31 | index`` as the bits of a double, ``bitonic.cu``), so the index breaks ties
(stable, deterministic), and keeps a separate uint32 index array beside int64 keys ("pairs").

Keys-only consequences (documented behaviour, tested): all NaNs come out as one canonical quiet NaN (the payload and
sign are not kept), and −0.0 keys are smaller than +0.0 keys, so ascending output puts every −0.0 before every +0.0
(numpy leaves their relative order unspecified; descending puts +0.0 first).
"""
from __future__ import annotations

from dataclasses import dataclass

import impl  # noqa: F401  (backend before numba)
import numpy as np
from numba import cuda

UNSIGNED, SIGNED, FLOAT = 0, 1, 2
ENCODE, DECODE = 1, 2  # pass flags: the pass reads raw values (encode) / writes decoded output (decode)


@dataclass(frozen=True)
class KeyFormat:
    """How one dtype becomes an order key: the raw bit container, the key container, and the transform's constants."""

    dtype: np.dtype
    bits_dtype: np.dtype   # unsigned view of the input with the same width
    key_dtype: np.dtype    # container of keys-only sorting (uint32 or uint64)
    kind: int              # UNSIGNED / SIGNED / FLOAT
    nbits: int
    inf_bits: int = 0      # bit pattern of +inf (floats): magnitudes above it are NaN

    @property
    def sign(self) -> int:
        return 1 << (self.nbits - 1)

    @property
    def full(self) -> int:
        return (1 << self.nbits) - 1

    @property
    def pairs(self) -> bool:
        """argsort keeps a separate index array (the key already fills 64 bits)."""
        return self.nbits > 32

    def params(self, *, descending: bool, canon_zero: bool) -> tuple:
        """The kernels' ``enc`` argument: (kind, sign, full, inf, flip, canon_zero), typed as the kernels expect."""
        return (np.int64(self.kind), np.uint64(self.sign), np.uint64(self.full), np.uint64(self.inf_bits),
                np.uint64(self.full if descending else 0), np.int64(canon_zero))


FORMATS: dict[str, KeyFormat] = {
    "float16": KeyFormat(np.dtype("float16"), np.dtype("uint16"), np.dtype("uint32"), FLOAT, 16, 0x7C00),
    "float32": KeyFormat(np.dtype("float32"), np.dtype("uint32"), np.dtype("uint32"), FLOAT, 32, 0x7F800000),
    "int32": KeyFormat(np.dtype("int32"), np.dtype("uint32"), np.dtype("uint32"), SIGNED, 32),
    "uint32": KeyFormat(np.dtype("uint32"), np.dtype("uint32"), np.dtype("uint32"), UNSIGNED, 32),
    "int64": KeyFormat(np.dtype("int64"), np.dtype("uint64"), np.dtype("uint64"), SIGNED, 64),
}
SUPPORTED_DTYPES = tuple(FORMATS)


def key_format(dtype) -> KeyFormat:
    """The ``KeyFormat`` of ``dtype``; a clear TypeError for anything unsupported, including a non-native byte
    order (the kernels read raw bits in the machine's order: '>f4' would sort byte-swapped garbage)."""
    if hasattr(dtype, "is_floating_point"):  # a torch dtype (always native)
        name = str(dtype).replace("torch.", "")
    else:
        dt = np.dtype(dtype)
        if not dt.isnative:
            raise TypeError(f"unsupported byte order: dtype {dt.str!r} is not in the machine's byte order; convert "
                            f"it first, e.g. x.astype(x.dtype.newbyteorder('='))")
        name = dt.name
    if name not in FORMATS:
        raise TypeError(f"unsupported dtype {name}: the bitonic sort takes {', '.join(SUPPORTED_DTYPES)}")
    return FORMATS[name]


def native(x: np.ndarray) -> np.ndarray:
    """``x`` itself when its byte order is the machine's, else a copy in it (same values)."""
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


# ---- device functions (used inside the sort kernels) ----------------------------------------------------------

@cuda.jit(device=True, inline=True)
def encode_key(u, enc):
    """Raw bits ``u`` (uint64) -> order key (uint64, ``nbits`` wide) under ``enc = (kind, sign, full, inf, flip,
    canon_zero)``."""
    kind, sign, full, inf, flip, canon = enc
    if kind == 2:  # FLOAT
        mag = u & (full ^ sign)
        if mag > inf:
            key = full  # every NaN is one key, above +inf
        elif mag == np.uint64(0) and canon != 0:
            key = sign  # -0.0 -> key of +0.0
        elif (u & sign) != np.uint64(0):
            key = (~u) & full
        else:
            key = u | sign
    elif kind == 1:  # SIGNED
        key = u ^ sign
    else:
        key = u
    return key ^ flip


@cuda.jit(device=True, inline=True)
def decode_key(key, enc):
    """Inverse of ``encode_key`` for keys-only output (NaN keys decode to the quiet NaN with all payload bits set)."""
    kind, sign, full, inf, flip, canon = enc
    key = key ^ flip
    if kind == 2:
        if (key & sign) != np.uint64(0):
            return key ^ sign
        return (~key) & full
    if kind == 1:
        return key ^ sign
    return key


# ---- numpy twins (references for the tests and the network simulator) -----------------------------------------

def encode_np(x: np.ndarray, *, descending: bool = False, canon_zero: bool = False) -> np.ndarray:
    """Vectorised ``encode_key``: order keys of ``x`` as uint64 (same transform as the kernels)."""
    fmt = key_format(x.dtype)
    u = np.ascontiguousarray(x).view(fmt.bits_dtype).astype(np.uint64)
    sign, full = np.uint64(fmt.sign), np.uint64(fmt.full)
    if fmt.kind == FLOAT:
        mag = u & (full ^ sign)
        key = np.where((u & sign) != 0, ~u & full, u | sign)
        if canon_zero:
            key = np.where(mag == 0, sign, key)
        key = np.where(mag > np.uint64(fmt.inf_bits), full, key)
    elif fmt.kind == SIGNED:
        key = u ^ sign
    else:
        key = u
    return key ^ (full if descending else np.uint64(0))


def decode_np(keys: np.ndarray, dtype, *, descending: bool = False) -> np.ndarray:
    """Vectorised ``decode_key``: values of ``dtype`` from uint64 order keys."""
    fmt = key_format(dtype)
    sign, full = np.uint64(fmt.sign), np.uint64(fmt.full)
    k = keys.astype(np.uint64) ^ (full if descending else np.uint64(0))
    if fmt.kind == FLOAT:
        u = np.where((k & sign) != 0, k ^ sign, ~k & full)
    elif fmt.kind == SIGNED:
        u = k ^ sign
    else:
        u = k
    return u.astype(fmt.bits_dtype).view(fmt.dtype)
