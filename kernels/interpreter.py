"""Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

Launchers ask this to pick a single autotune config (several fail under the
interpreter) and to compute in fp32 where the interpreter gets bf16 arithmetic wrong.
"""

from __future__ import annotations

import os

import torch
import triton


# a constant while torch.compile traces (backend choice asks it; triton reads the knob through a C
# extension that dynamo cannot trace)
@torch.compiler.assume_constant_result
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
