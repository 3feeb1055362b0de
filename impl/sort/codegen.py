"""CUDA C++ source of a sort plan: ``bitonic.cu`` plus one generated ``extern "C"`` kernel per pass.

A pass becomes a struct of its constants (T, E, F, basis) and a kernel body that is a straight sequence of template
calls (load, compare-exchange steps on register bits, exchanges between layouts, store), e.g.

    extern "C" __global__ void __launch_bounds__(512, 1) sort_keys32_32_1a2b3c4d5e6f(SORT_PARAMS) {
        typedef Block<Pass_1a2b3c4d5e6f, Keys32, u32, true, false> B;
        typedef Layout<Seq<9, 10, 11, 12, 13, 14>, Seq<0, 1, 2, 3, 4>, Seq<5, 6, 7, 8>> L0;
        ...
        const B b(SORT_ARGS);
        B::V r[B::E];
        b.template load<L0>(r);
        b.template exchange<L0, L1, false>(r);
        b.template cx<0>(r);
        ...
        b.template store<L7>(r);
    }

Kernels that neither encode nor decode do not depend on the input dtype and are shared by all dtypes of a mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from impl.sort.plan import MODES, CudaPlan, Layout, PassSpec, pad_index

SOURCE = Path(__file__).with_name("bitonic.cu")
MODE_TYPES = {"keys32": "Keys32", "keys64": "Keys64", "composite": "Composite", "pairs": "Pairs"}
RAW_TYPES = {16: "u16", 32: "u32", 64: "u64"}
SM_SMEM, SM_REGS, SM_THREADS = 228 * 1024, 65536, 2048  # per multiprocessor (sm_90); 1 KiB reserved per block


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: a pass of a plan for a slot mode; ``raw_bits`` matters only to encode/decode passes."""

    spec: PassSpec
    mode: str
    raw_bits: int

    @property
    def raw(self) -> int:
        return self.raw_bits if (self.spec.encode or self.spec.decode) else 0

    @property
    def name(self) -> str:
        return f"sort_{self.mode}_{self.raw or 'x'}_{self.spec.key}"

    @property
    def threads(self) -> int:
        return 1 << (self.spec.t - self.spec.e)

    @property
    def min_blocks(self) -> int:
        """Blocks per multiprocessor the kernel is compiled for (``__launch_bounds__``): as many as shared memory
        and threads allow, while each thread keeps registers for its slots (1-3 words each) plus 32."""
        smem = (pad_index((1 << self.spec.t) - 1) + 1) * MODES[self.mode] + 1024
        words = -(-MODES[self.mode] // 4)
        regs = (1 << self.spec.e) * words + 32
        return max(1, min(SM_SMEM // smem, SM_THREADS // self.threads, SM_REGS // (self.threads * regs)))


def plan_kernels(plan: CudaPlan, raw_bits: int) -> list[KernelSpec]:
    return [KernelSpec(p, plan.mode, raw_bits) for p in plan.passes]


def _seq(values) -> str:
    return f"Seq<{', '.join(map(str, values))}>"


def _layout(lay: Layout) -> str:
    return f"Layout<{_seq(lay.regs)}, {_seq(lay.lanes)}, {_seq(lay.warps)}>"


def pass_struct(spec: PassSpec) -> str:
    basis = ", ".join(f"{b:#x}u" for b in spec.basis)
    return (f"struct Pass_{spec.key} {{  // {spec.kind}: {len(spec.rounds)} rounds, {spec.steps} steps\n"
            f"    static constexpr int T = {spec.t}, E = {spec.e}, F = {spec.f}, FMA = {spec.fma};\n"
            f"    SORT_HD static constexpr u32 basis(int i) {{\n"
            f"        const u32 v[] = {{{basis}}};\n"
            f"        return v[i];\n"
            f"    }}\n}};\n")


def kernel_source(k: KernelSpec) -> str:
    spec = k.spec
    raw = RAW_TYPES.get(k.raw, "u32")
    lines = [f"extern \"C\" __global__ void __launch_bounds__({k.threads}, {k.min_blocks}) {k.name}(SORT_PARAMS) {{",
             f"    typedef Block<Pass_{spec.key}, {MODE_TYPES[k.mode]}, {raw}, {str(spec.encode).lower()}, "
             f"{str(spec.decode).lower()}> B;"]
    names: dict[Layout, str] = {}
    for rnd in spec.rounds:
        if rnd.layout not in names:
            names[rnd.layout] = f"L{len(names)}"
            lines.append(f"    typedef {_layout(rnd.layout)} {names[rnd.layout]};")
    lines += ["    const B b(SORT_ARGS);", "    typename B::V r[B::E];",
              f"    b.template load<{names[spec.rounds[0].layout]}>(r);"]
    prev = None
    exchanges = 0
    for rnd in spec.rounds:
        lay = names[rnd.layout]
        if prev is not None:
            lines.append(f"    b.template exchange<{prev}, {lay}, {str(exchanges > 0).lower()}>(r);")
            exchanges += 1
        for op in rnd.ops:
            if op.kind == "xor":
                lines.append(f"    b.template xr<{lay}, {op.a}, {op.b}>(r);")
            else:
                k = rnd.layout.regs.index(op.a)
                if spec.kind == "coset":  # flip form: the steps that skip pad-only work (Block::mcx)
                    lines.append(f"    b.template {'mfx' if op.kind == 'flip' else 'mcx'}<{lay}, {k}>(r);")
                else:
                    lines.append(f"    b.template cx<{k}>(r);")
        prev = lay
    lines += [f"    b.template store<{prev}>(r);", "}"]
    return "\n".join(lines) + "\n"


def module_source(kernels: list[KernelSpec]) -> str:
    """``bitonic.cu``, then the pass structs and kernels (each once), then the emulator's kernel table."""
    uniq = list(dict.fromkeys(kernels))
    structs = list(dict.fromkeys(pass_struct(k.spec) for k in uniq))
    names = list(dict.fromkeys(k.name for k in uniq))
    bodies = list(dict.fromkeys(kernel_source(k) for k in uniq))
    table = ",\n".join(f"    {{\"{n}\", {n}}}" for n in names)
    return (SOURCE.read_text() + "\n// ---- generated: impl/sort/codegen.py ----\n\n" + "\n".join(structs) + "\n"
            + "\n".join(bodies)
            + f"\n#ifdef SORT_HOST_EMULATION\nstatic const SortEmuKernel sort_emu_kernels[] = {{\n{table}\n}};\n"
            f"static const int sort_emu_kernel_count = {len(names)};\n#endif\n")
