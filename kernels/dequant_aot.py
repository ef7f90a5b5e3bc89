"""Every shipped GPU configuration of the dequantize-matmul kernels, compiled ahead of time as launched.

``python -m llmq.kernels.dequant_aot`` compiles each autotune config of ``dequant_gemv`` (both
paths, and the three split-K epilogues at int4) and ``dequant_gemm`` for every bit width, for
symmetric weights (no zero points: what the benchmarks run), integer (uint8) and float (fp16) zero
points, fp16 activations, and bf16 / fp32 activations at 4 bits, for each target in
``llmq.kernels.aot.TARGETS``. It prints one JSON object per config (registers, shared memory,
local/stack bytes, or the compile error). No GPU is needed.

Each config is compiled from the launcher's own ``plan`` for a 4096 x 4096 layer (M = 1, 16, 512)
with the runtime's specialization (``llmq.kernels.sass.compile_as_launched``: divisibility-16 hints
on pointers and ints, ints equal to 1 folded). Without those hints the M = 1 kernel is another
kernel: 96 registers and a stack frame where the launched one has 64 and none (issue 15).

Run it with ``TRITON_INTERPRET`` unset: under the interpreter, the ``@triton.jit`` functions of
``triton.language.standard`` that the kernels call (``tl.cdiv``, ``tl.sum``) are interpreter
objects the compiler cannot lower. ``tests/kernels/test_aot_weight_kernels.py`` runs this module
in a subprocess for that reason.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from llmq.kernels import dequant_gemm, dequant_gemv
from llmq.kernels.aot import TARGETS
from llmq.kernels.cost_cases import Workload
from llmq.kernels.dequant_cost import SMS, mock_pointers
from llmq.kernels.sass import compile_as_launched, resource_usage

ZEROS = ("none", "int", "float")
# (bits, activations, zero points): every bit width with fp16 activations and each kind of zero point
# (each is another dequantization sequence: dequant_f16x2 for every bit width, in the decode kernel and the
# f16x2 GEMM); bf16 / fp32 activations at 4 bits with integer zeros (dequant_tile.scale_codes in the GEMM)
COMBOS = [(b, "fp16", z) for b in (2, 3, 4, 8) for z in ZEROS] + [(4, act, "int") for act in ("bf16", "fp32")]
# bf16 activations on the decode kernel: dequant_bf16x2 has its own sequence per bit width and zero kind
# (the GEMM's bf16 dequantization is scale_codes, covered above)
GEMV_ONLY = [(b, "bf16", z) for b in (2, 3, 4, 8) for z in ZEROS if (b, z) != (4, "int")]
SHAPE = (4096, 4096)  # (K, N): every int a multiple of 16, as in LLM layers


def _gemv_epilogues(bits: int, act: str, zeros: str):
    """(name, split_k, deterministic): the default split-K epilogue (atomics) everywhere; one split
    (plain store) and deterministic partials differ only in the final store, checked at int4 fp16."""
    yield "atomic", 0, False
    if (bits, act) == (4, "fp16"):
        yield "store", 1, False
        yield "partials", 0, True


def cases():
    """(name, kernel, args, num_warps, num_stages) for every shipped config."""
    k, n = SHAPE
    for bits, act, zeros in COMBOS + GEMV_ONLY:
        tag = f"int{bits} {act} zeros={zeros}"
        for m in (1, 16):
            for epi, split_k, det in _gemv_epilogues(bits, act, zeros):
                w = Workload(k, n, m, bits, 128, zeros, act, bias=True)
                pl = dequant_gemv.plan(m, n, k, bits, 128, k // 128, w.act_dtype, zeros != "none", True, SMS,
                                       split_k, det, float_zeros=zeros == "float")
                out = w.act_dtype if pl.mode == dequant_gemv.OUT_STORE else torch.float32
                args = {**mock_pointers(w, out), **pl.ints, **pl.constexprs}
                for warps, stages in dequant_gemv.GPU_CONFIGS[pl.path]:
                    yield (f"gemv {tag} M={m} {pl.path} {epi} warps={warps} stages={stages}",
                           dequant_gemv.dequant_gemv_kernel, args, warps, stages)
        if (bits, act, zeros) in GEMV_ONLY:
            continue
        w = Workload(k, n, 512, bits, 128, zeros, act, bias=True)
        pl = dequant_gemm.plan(512, n, k, bits, 128, k // 128, w.act_dtype, zeros != "none", True)
        for bm, bn, warps, stages in dequant_gemm.CONFIGS[pl.path]:
            args = {**mock_pointers(w, w.act_dtype), **pl.ints, **pl.constexprs, "BLOCK_M": bm, "BLOCK_N": bn}
            yield (f"gemm {tag} {pl.path} {bm}x{bn} warps={warps} stages={stages}", dequant_gemm.KERNELS[pl.path],
                   args, warps, stages)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run with TRITON_INTERPRET unset (see module docstring)", file=sys.stderr)
        return 2
    for target, capability in TARGETS:
        for name, kernel, args, warps, stages in cases():
            row = {"target": target, "config": name}
            try:
                row.update(resource_usage(compile_as_launched(kernel, args, capability, warps, stages)))
            except Exception as e:  # noqa: BLE001 — every failing config is reported, not just the first
                row["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
