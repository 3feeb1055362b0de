"""The traffic-mix streams (``impl.fp8.ceiling``) against their CPU reference: every element written, bit-exact, for
both mixes, every launch the bench tries (on the CPU a few of them, under the interpreter), ragged and degenerate
shapes, strided rows; bad input refused with a message naming the problem, the input never modified."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.oracle import check_kernel
from fixtures.strategies import seeds
from impl import backend
from impl.backend import DEVICE
from impl.fp8 import ceiling as C


def _input(mode: str, n: int, k: int, seed: int) -> torch.Tensor:
    """uint8 codes or int16 values spanning the whole dtype, extremes included."""
    g = torch.Generator().manual_seed(seed)
    if mode == "widen":
        x = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
        extremes = torch.tensor([0, 255, 128, 127], dtype=torch.uint8)
    else:
        x = torch.randint(-32768, 32768, (n, k), generator=g, dtype=torch.int32).to(torch.int16)
        extremes = torch.tensor([-32768, 32767, -1, 0, 255, 256, -256], dtype=torch.int16)
    flat = x.view(-1)
    flat[: min(flat.numel(), extremes.numel())] = extremes[: flat.numel()]
    return x.to(DEVICE)


# on the CPU: one program a tile, and persistent programs (the interpreter's SM count) with and without the
# next-tile prefetch, evict_first on loads and stores
LAUNCHES = C.CONFIGS if backend.ON_GPU else (C.CPU_CONFIG, C.LaunchConfig(2, 64, 2),
                                             C.LaunchConfig(2, 64, 2, stages=2, per_sm=1, evict=2),
                                             C.LaunchConfig(4, 32, 4, per_sm=1, evict=1))


@pytest.mark.parametrize("mode", sorted(C.MODES))
@pytest.mark.parametrize("cfg", LAUNCHES, ids=C.label)
@given(n=st.integers(1, 37), k=st.integers(1, 300), seed=seeds())
def test_stream_matches_reference(mode, cfg, n, k, seed):
    x = _input(mode, n, k, seed)
    before = x.clone()
    out = torch.empty(n, k, dtype=C.MODES[mode][1], device=DEVICE)
    check_kernel(lambda o: C.stream(x, mode, out=o, cfg=cfg), out, C.stream_reference(x, mode), rtol=0, atol=0)
    assert torch.equal(x, before), "the input was modified"


@pytest.mark.parametrize("mode", sorted(C.MODES))
@pytest.mark.parametrize("n,k", [(0, 5), (5, 0), (1, 1), (3, 1), (1, 1025)])
def test_stream_degenerate_shapes(mode, n, k):
    x = _input(mode, n, k, 7) if n * k else torch.empty(n, k, dtype=C.MODES[mode][0], device=DEVICE)
    y = C.stream(x, mode)
    assert y.shape == (n, k) and y.dtype == C.MODES[mode][1]
    assert torch.equal(y.cpu(), C.stream_reference(x, mode))


@pytest.mark.parametrize("mode", sorted(C.MODES))
def test_stream_strided_rows(mode):
    """Rows of a wider buffer in and out: only the view's columns are read and written."""
    wide = _input(mode, 9, 70, 3)
    x = wide[:, 3:53]
    out_buf = torch.full((9, 64), 7, dtype=C.MODES[mode][1], device=DEVICE)
    out = out_buf[:, 5:55]
    C.stream(x, mode, out=out)
    assert torch.equal(out.cpu(), C.stream_reference(x, mode))
    assert bool((out_buf[:, :5] == 7).all()) and bool((out_buf[:, 55:] == 7).all()), "wrote outside out's columns"


def test_stream_narrow_keeps_the_low_byte():
    x = torch.tensor([[-1, 256, 257, -32768, 32767, 0x1234]], dtype=torch.int16, device=DEVICE)
    assert C.stream(x, "narrow").cpu().tolist() == [[255, 0, 1, 0, 255, 0x34]]


@pytest.mark.parametrize("mode", sorted(C.MODES))
def test_sweep_has_every_launch_of_the_mix_kernels(mode):
    """The sweep holds ``CONFIGS`` and the launch each FP8 kernel of the mix runs with at that shape (so the stream
    is timed with every launch the kernels themselves use), each once."""
    from impl.fp8 import launch

    for n, k in ((4096, 4096), (28672, 4096), (4096, 14336)):
        got = C.sweep_configs(mode, n, k)
        assert got[:len(C.CONFIGS)] == C.CONFIGS and len(set(got)) == len(got)
        assert {launch.config(key, n, k) for key in C.KERNELS[mode]} <= set(got)
        assert set(C.KERNELS[mode]) <= set(launch.KERNELS)
    with pytest.raises(ValueError, match="mode must be one of"):
        C.sweep_configs("copy", 4, 4)


def test_label_tells_every_launch_field_apart():
    labels = {C.label(c) for c in C.CONFIGS}
    assert len(labels) == len(C.CONFIGS) and C.label(C.LaunchConfig(1, 4096, 4, 2, 16, 2)) == "1x4096w4s2p16e2"


def test_stream_bytes_counts_three_per_element():
    assert C.stream_bytes("widen", 3, 5) == C.stream_bytes("narrow", 3, 5) == 45
    with pytest.raises(ValueError, match="mode must be one of"):
        C.stream_bytes("copy", 1, 1)


@pytest.mark.parametrize("call,error,match", [
    (lambda: C.stream(torch.zeros(2, 2, dtype=torch.uint8, device=DEVICE), "copy"), ValueError, "mode must be one"),
    (lambda: C.stream(torch.zeros(2, 2, dtype=torch.int16, device=DEVICE), "widen"), TypeError,
     "widen reads torch.uint8"),
    (lambda: C.stream(torch.zeros(2, 2, dtype=torch.uint8, device=DEVICE), "narrow"), TypeError,
     "narrow reads torch.int16"),
    (lambda: C.stream(torch.zeros(4, dtype=torch.uint8, device=DEVICE), "widen"), ValueError, "2-D"),
    (lambda: C.stream(torch.zeros(4, 4, dtype=torch.uint8, device=DEVICE).t(), "widen"), ValueError,
     "contiguous rows"),
    (lambda: C.stream(torch.zeros(2, 2, dtype=torch.uint8, device=DEVICE), "widen",
                      out=torch.zeros(2, 3, dtype=torch.int16, device=DEVICE)), ValueError, "out must be"),
    (lambda: C.stream(torch.zeros(2, 2, dtype=torch.uint8, device=DEVICE), "widen",
                      out=torch.zeros(2, 2, dtype=torch.uint8, device=DEVICE)), ValueError, "out must be"),
    (lambda: C.stream(torch.zeros(4, 4, dtype=torch.uint8, device=DEVICE), "widen",
                      out=torch.zeros(4, 4, dtype=torch.int16, device=DEVICE).t()), ValueError, "contiguous rows"),
    (lambda: C.stream([[1, 2]], "widen"), TypeError, "x must be a torch.Tensor"),
    (lambda: C.LaunchConfig(3, 64), ValueError, "powers of two"),
    (lambda: C.LaunchConfig(4, 64, 3), ValueError, "warps"),
])
def test_stream_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not backend.ON_GPU, reason="host tensors are the interpreter's own input: no GPU here")
def test_stream_refuses_host_tensors_on_a_gpu():
    with pytest.raises(ValueError, match="move the tensors to cuda"):
        C.stream(torch.zeros(2, 2, dtype=torch.uint8), "widen", out=torch.zeros(2, 2, dtype=torch.int16))


COMPILE = r"""
import os, sys
import impl  # the backend switch, then the interpreter off: the kernel as the GPU compiler sees it
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
knobs.runtime.interpret = False
from impl.fp8 import ceiling as C
from impl.fp8.quant import prefetches
fn = C.stream_kernel
assert not hasattr(fn, "interpreter_builder") and type(fn).__name__ == "JITFunction", type(fn)
for widen, src, dst in ((True, "*u8", "*i16"), (False, "*i16", "*u8")):
    for cfg in C.CONFIGS:
        consts = {"WIDEN": widen, "BM": cfg.bm, "BK": cfg.bk, "PREFETCH": prefetches(cfg),
                  "EVICT": cfg.evict}
        sig = {"x_ptr": src, "y_ptr": dst, "N": "i32", "K": "i32", "stride_x": "i32", "stride_y": "i32"}
        attrs = {(list(fn.arg_names).index(a),): [["tt.divisibility", 16]] for a in sig}
        src_ = triton.compiler.ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                                         constexprs=consts, attrs=attrs)
        triton.compile(src_, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.warps})
print("compiled", 2 * len(C.CONFIGS))
"""


@pytest.mark.slow
def test_stream_kernel_compiles_for_sm90_at_every_launch():
    """The GPU compiler sees what the interpreter does not (a variable defined under one constexpr branch, a
    persistent loop's types): every launch of ``CONFIGS``, both mixes, compiled for sm_90."""
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Triton's NVIDIA backend is missing ({e})")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(LAB_BACKEND="cpu", PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=900,
                       cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"compiled {2 * len(C.CONFIGS)}"
