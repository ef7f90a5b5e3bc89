"""Compile a Triton kernel exactly as its launcher would launch it, and count its hot loop's SASS.

No GPU is needed: ``compile_as_launched`` runs triton's own argument binder (the code the JIT runs
at every launch) on mock tensors and the launcher's real integer arguments, so the compiled kernel
gets the runtime's specialization — pointers and ints divisible by 16 carry ``tt.divisibility = 16``,
ints equal to 1 become constants — then compiles for ``GPUTarget("cuda", capability, 32)``.
``kernels/aot.py`` used to compile without those hints; that kernel was not the one that runs
(issue 15: 96 registers and a stack frame instead of 64 and none).

The SASS comes from the ``cuobjdump`` triton bundles (``backends/nvidia/bin``). ``loop_counts``
takes the hot loop — the largest range closed by a backward branch, including the loops nested in
it — and counts its instructions by class (``CLASSES``), with the bytes each thread moves through
global and shared memory per iteration. Straight-line counting: predicated-off instructions and
code branched around inside the loop count as executed (an upper bound).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import triton


@dataclass(frozen=True)
class MockPointer:
    """Stands for a tensor argument: its dtype and whether its address is 16-byte aligned
    (torch's allocator aligns every allocation to 256 bytes; slices may not be)."""

    dtype: object  # torch.dtype
    aligned: bool = True

    def data_ptr(self) -> int:
        return 0 if self.aligned else 2


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        inner = getattr(kernel, "fn", None)
        if inner is None:
            raise TypeError(f"{kernel!r} is not a Triton kernel")
        if not hasattr(inner, "fn") and not isinstance(inner, JITFunction):
            return JITFunction(inner)  # under TRITON_INTERPRET the wrapper holds the plain function
        kernel = inner
    return kernel


def specialize(kernel, args: dict, capability: int = 90, num_warps: int = 4, num_stages: int = 3):
    """``(signature, constexprs, attrs, options)`` exactly as triton's JIT derives them for a launch
    with ``args`` (every kernel parameter by name; tensors as ``MockPointer``)."""
    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:  # the binder moved between triton releases
        raise RuntimeError(f"triton {triton.__version__} has no runtime.jit.create_function_from_signature: "
                           "the cost report reproduces the launch specialization with triton >= 3.9's binder") from e
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    fn = _jit_function(kernel)
    missing = [p.name for p in fn.params if p.name not in args and not p.has_default]
    if missing:
        raise KeyError(f"no value for kernel argument(s) {missing} of {fn.__name__}")
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    bound, spec, _ = binder(**args, **opts)
    options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, spec, None)
    return signature, constexprs, attrs, options


def compile_as_launched(kernel, args: dict, capability: int = 90, num_warps: int = 4, num_stages: int = 3):
    """The compiled kernel (``CompiledKernel``: ``.asm["cubin"]``, ``.metadata``) a launch with ``args`` runs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, _ = specialize(kernel, args, capability, num_warps, num_stages)
    src = ASTSource(fn=_jit_function(kernel), signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cuobjdump(compiled, *flags: str) -> str:
    """``cuobjdump FLAGS`` of the compiled kernel's cubin (``-sass``, ``--dump-resource-usage``)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([_tool("cuobjdump"), *flags, path], capture_output=True, text=True, check=True).stdout


@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str  # "@P0", "@!P1" or ""
    opcode: str  # "LDG.E.128.CONSTANT"
    operands: str


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> list[Instr]:
    """Instructions of a ``cuobjdump -sass`` listing (one kernel), in address order."""
    return [Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip())
            for m in _LINE.finditer(text)]


# instruction classes, in report order; "other" collects anything not named here
CLASSES = ("global_load", "async_copy", "shared_load", "shared_store", "global_store", "local", "mma", "int",
           "convert", "fp32", "fp16x2", "mufu", "shuffle", "barrier", "move", "predicate", "uniform", "control",
           "other")
_BASE_CLASS = {
    **dict.fromkeys(("LDG",), "global_load"),
    **dict.fromkeys(("LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF", "LDGDEPBAR"), "async_copy"),
    **dict.fromkeys(("LDS", "LDSM"), "shared_load"),
    **dict.fromkeys(("STS", "STSM"), "shared_store"),
    **dict.fromkeys(("STG", "RED", "REDG", "ATOM", "ATOMG", "ATOMS", "UTMASTG"), "global_store"),
    **dict.fromkeys(("LDL", "STL"), "local"),
    **dict.fromkeys(("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BGMMA", "WGMMA"), "mma"),
    **dict.fromkeys(("IADD", "IADD3", "IADD32I", "IMAD", "IMUL", "IMUL32I", "IMNMX", "VIMNMX", "VIMNMX3", "VIADD",
                     "VIADDMNMX", "IABS", "LEA", "LOP", "LOP3", "LOP32I", "SHF", "SHL", "SHR", "BFE", "BFI",
                     "BMSK", "SGXT", "FLO", "POPC", "BREV", "IDP", "ISCADD", "PRMT"), "int"),
    **dict.fromkeys(("I2F", "I2FP", "F2I", "F2IP", "F2F", "F2FP", "FRND", "I2I", "I2IP"), "convert"),
    **dict.fromkeys(("FADD", "FMUL", "FFMA", "FADD2", "FMUL2", "FFMA2", "FMNMX", "FSEL", "FSET", "FSETP", "FCHK",
                     "FSWZADD"), "fp32"),
    **dict.fromkeys(("HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSET2", "HSETP2"), "fp16x2"),
    **dict.fromkeys(("MUFU",), "mufu"),
    **dict.fromkeys(("SHFL",), "shuffle"),
    **dict.fromkeys(("BAR", "SYNCS", "MEMBAR", "DEPBAR", "WARPSYNC", "ARRIVES", "FENCE", "WARPGROUP", "ERRBAR", "CCTL"),
                    "barrier"),
    **dict.fromkeys(("MOV", "MOV32I", "SEL", "S2R", "CS2R", "S2UR", "R2UR", "P2R", "R2P", "VOTE", "VOTEU", "MATCH",
                     "REDUX", "LDC"), "move"),
    **dict.fromkeys(("ISETP", "PLOP3", "PSETP"), "predicate"),
    **dict.fromkeys(("BRA", "BRX", "JMP", "EXIT", "BSSY", "BSYNC", "CALL", "RET", "YIELD", "NOP", "ELECT", "BREAK",
                     "PREEXIT", "ACQBULK"), "control"),
}


def classify(opcode: str) -> str:
    """The class (one of ``CLASSES``) of an opcode such as ``"LDG.E.128"`` or ``"HFMA2.MMA"``.

    ``HADD2.F32`` (fp16 → fp32) counts as a conversion, ``IMAD.MOV`` as a move; other uniform-datapath
    ``U*`` instructions (one per warp, off the vector pipes) as ``uniform``."""
    base = opcode.split(".")[0]
    if opcode.startswith("HADD2.F32"):
        return "convert"
    if opcode.startswith(("IMAD.MOV", "IMAD.SHL")) and base == "IMAD":
        return "move" if opcode.startswith("IMAD.MOV") else "int"
    if base in _BASE_CLASS:
        return _BASE_CLASS[base]
    if base.startswith("U"):
        return "uniform"
    return "other"


def access_bytes(opcode: str) -> int:
    """Bytes one thread moves with a load/store opcode (``.128`` → 16, ``.64`` → 8, ``.U16`` → 2, ...).
    ``LDSM`` (ldmatrix) moves 4 bytes per thread per matrix (``.M88.4`` = 4 matrices)."""
    parts = opcode.split(".")
    if parts[0] == "LDSM":
        n = next((int(p) for p in parts[2:] if p.isdigit()), 1)
        return 4 * n
    for p in parts[1:]:
        if p in ("128", "64", "32"):
            return int(p) // 8
        if p in ("U16", "S16"):
            return 2
        if p in ("U8", "S8"):
            return 1
    return 4


@dataclass(frozen=True)
class Loop:
    start: int  # index of the first instruction (the back edge's target)
    end: int  # index of the backward branch


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Loops = ranges closed by a backward branch (several back edges to one target: the widest). A branch
    to itself is the trap after ``EXIT`` that ends every kernel, not a loop."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    widest: dict[int, int] = {}
    for i, ins in enumerate(instrs):
        if ins.opcode.split(".")[0] != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", ins.operands)
        if m and int(m.group(1), 16) < ins.addr and int(m.group(1), 16) in index:
            s = index[int(m.group(1), 16)]
            widest[s] = max(widest.get(s, i), i)
    return [Loop(s, e) for s, e in sorted(widest.items())]


def hot_loop(instrs: list[Instr]) -> Loop | None:
    """The outermost loop with the most instructions (its nested loops included), or None."""
    loops = find_loops(instrs)
    outer = [lp for lp in loops if not any(o != lp and o.start <= lp.start and lp.end <= o.end for o in loops)]
    return max(outer, key=lambda lp: lp.end - lp.start, default=None)


@dataclass
class LoopCounts:
    """Instructions of one iteration of a loop (per thread; a warp issues each once)."""

    total: int = 0
    by_class: Counter = field(default_factory=Counter)
    by_opcode: Counter = field(default_factory=Counter)
    global_load_bytes: int = 0  # per thread: LDG + async copies (LDGSTS)
    shared_bytes: int = 0  # per thread: LDS / LDSM / STS
    load_widths: Counter = field(default_factory=Counter)  # bytes per thread per global load → count

    def per(self, units: float) -> float:
        return self.total / units if units else float("nan")


def count_range(instrs: list[Instr], start: int, end: int, inner_trips: int = 1,
                nested: list[Loop] = ()) -> LoopCounts:
    """Counts over ``instrs[start:end+1]``, NOPs excluded; instructions inside ``nested`` loops are
    counted ``inner_trips`` times (straight-line otherwise)."""
    c = LoopCounts()
    for i in range(start, end + 1):
        ins = instrs[i]
        if ins.opcode.startswith("NOP"):
            continue
        times = inner_trips if any(lp.start <= i <= lp.end for lp in nested) else 1
        cls = classify(ins.opcode)
        c.total += times
        c.by_class[cls] += times
        c.by_opcode[ins.opcode] += times
        if cls in ("global_load", "async_copy") and not ins.opcode.startswith(("LDGDEPBAR", "UTMAPF")):
            c.global_load_bytes += times * access_bytes(ins.opcode)
            c.load_widths[access_bytes(ins.opcode)] += times
        if cls in ("shared_load", "shared_store"):
            c.shared_bytes += times * access_bytes(ins.opcode)
    return c


def loop_counts(instrs: list[Instr], inner_trips: int = 1) -> tuple[LoopCounts, int, Loop | None]:
    """``(per-iteration counts of the hot loop, instructions outside it, the loop)``; a kernel
    without a loop counts as one iteration of its whole body."""
    loop = hot_loop(instrs)
    if loop is None:
        return count_range(instrs, 0, len(instrs) - 1), 0, None
    nested = [lp for lp in find_loops(instrs) if lp != loop and loop.start <= lp.start and lp.end <= loop.end]
    per_iter = count_range(instrs, loop.start, loop.end, inner_trips, nested)
    outside = sum(1 for i, ins in enumerate(instrs)
                  if not (loop.start <= i <= loop.end) and not ins.opcode.startswith("NOP"))
    return per_iter, outside, loop


def resource_usage(compiled) -> dict[str, int]:
    """``{"registers", "local_bytes", "stack_bytes", "shared_bytes"}`` of a compiled kernel."""
    out = cuobjdump(compiled, "--dump-resource-usage")

    def fld(name: str) -> int:
        m = re.search(rf"\b{name}:(\d+)", out)
        if m is None:
            raise RuntimeError(f"cuobjdump output has no {name} field:\n{out}")
        return int(m.group(1))

    return {"registers": fld("REG"), "local_bytes": fld("LOCAL"), "stack_bytes": fld("STACK"),
            "shared_bytes": int(compiled.metadata.shared)}
