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
from llmq.kernels.aot import compile_kernel, resource_usage
module, name, cases = json.loads(sys.argv[1])
kernel = getattr(importlib.import_module(module), name)
out = []
for sig, constexprs, cap, warps, stages in cases:
    u = resource_usage(compile_kernel(kernel, sig, constexprs, cap, num_warps=warps, num_stages=stages))
    out.append([u.registers, u.shared_bytes, u.local_bytes, u.stack_bytes])
print("AOT-RESULT" + json.dumps(out))
"""


def aot_usage(module: str, kernel: str, cases: list) -> list[dict]:
    """Compile ``module.kernel`` for each ``(signature, constexprs, capability, num_warps, num_stages)``."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([module, kernel, cases])],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"AOT compile of {module}.{kernel} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-RESULT"))
    keys = ("registers", "shared_bytes", "local_bytes", "stack_bytes")
    return [dict(zip(keys, r)) for r in json.loads(line[len("AOT-RESULT"):])]
