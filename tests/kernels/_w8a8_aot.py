"""Run ``llmq.kernels.aot`` in a fresh process with the interpreter off.

Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` helper of ``triton.language``
(e.g. the combine function behind ``tl.max``) is an interpreted function; when
the real compiler inlines one (seen for ``sm_90a``) it re-patches
``triton.language`` with interpreter builtins and compilation fails. A child
process with ``TRITON_INTERPRET=0`` compiles the same kernel normally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_SCRIPT = r"""
import json, sys, importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmq.kernels.aot import _jit_function, resource_usage
module, name, cases = json.loads(sys.argv[1])
kernel = _jit_function(getattr(importlib.import_module(module), name))
out = []
for sig, constexprs, cap, warps, stages, aligned in cases:
    # what the JIT specializes at launch: 16-divisible pointers/ints get tt.divisibility
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": warps, "num_stages": stages})
    u = resource_usage(compiled)
    out.append([u.registers, u.shared_bytes, u.local_bytes, u.stack_bytes])
print("AOT-RESULT" + json.dumps(out))
"""


def aot_usage(module: str, kernel: str, cases: list) -> list[dict]:
    """Compile ``module.kernel`` for each ``(signature, constexprs, capability, num_warps, num_stages, aligned)``.

    ``aligned``: argument names the JIT would see as divisible by 16 at a real launch
    (pointers from the caching allocator, strides of K/N multiples of 16) — without
    them the compiler cannot vectorize loads and the register count is meaningless.
    Unit strides should be passed as constexpr 1, as the JIT specializes them.
    """
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([module, kernel, cases])],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"AOT compile of {module}.{kernel} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-RESULT"))
    keys = ("registers", "shared_bytes", "local_bytes", "stack_bytes")
    return [dict(zip(keys, r)) for r in json.loads(line[len("AOT-RESULT"):])]
