"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks semantics but ignores registers,
shared memory and the compiler's tile-shape rules. Compiling each kernel
configuration for ``sm_80`` and ``sm_90a`` here catches compile errors, and
``cuobjdump --dump-resource-usage`` (shipped in triton's ``backends/nvidia/bin``)
reports registers and spills (``LOCAL``/``STACK`` bytes > 0 = spilled to local
memory).

Works whether or not ``TRITON_INTERPRET`` is set: an interpreted kernel is
re-wrapped as a ``JITFunction`` before compiling.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

# (name, compute capability) pairs compiled by the test suite.
TARGETS = (("sm_80", 80), ("sm_90a", 90))


@dataclass(frozen=True)
class ResourceUsage:
    registers: int
    shared_bytes: int  # dynamic shared memory Triton requests at launch
    local_bytes: int  # spills to local memory
    stack_bytes: int

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0


def _jit_function(kernel) -> JITFunction:
    # Autotuner / Heuristics wrappers hold the kernel in .fn; under the interpreter
    # the kernel is an InterpretedFunction whose .fn is the plain Python function.
    while not isinstance(kernel, JITFunction):
        inner = getattr(kernel, "fn", None)
        if inner is None:
            raise TypeError(f"cannot compile {kernel!r}: not a Triton kernel")
        if inspect.isfunction(inner):
            return JITFunction(inner)
        kernel = inner
    return kernel


def compile_kernel(kernel, signature: dict[str, str], constexprs: dict[str, object], capability: int,
                   num_warps: int = 4, num_stages: int = 3):
    """Compile ``kernel`` for ``GPUTarget("cuda", capability, 32)``; returns the compiled kernel.

    Args:
        signature: argument name → Triton type (``"*fp16"``, ``"*i32"``, ``"i32"``,
            ``"fp32"``, ``"constexpr"``), every argument of the kernel in order.
        constexprs: value of every ``constexpr`` argument.
    """
    src = ASTSource(fn=_jit_function(kernel), signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def resource_usage(compiled) -> ResourceUsage:
    """Registers / spills from ``cuobjdump --dump-resource-usage`` of the cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout

    def field(name: str) -> int:
        m = re.search(rf"\b{name}:(\d+)", out)
        if m is None:
            raise RuntimeError(f"cuobjdump output has no {name} field:\n{out}")
        return int(m.group(1))

    return ResourceUsage(field("REG"), int(compiled.metadata.shared), field("LOCAL"), field("STACK"))
