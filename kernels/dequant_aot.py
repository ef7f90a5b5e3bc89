"""Every shipped GPU configuration of the dequantize-matmul kernels, compiled ahead of time.

``python -m llmq.kernels.dequant_aot`` compiles each autotune config of ``dequant_gemv`` (both
paths) and ``dequant_gemm`` for every bit width (fp16 activations) and for bf16 / fp32 activations
at 4 bits, and with float zero points at 4 and 3 bits, for each target in ``llmq.kernels.aot.TARGETS``, and prints one JSON object per config
(registers, shared memory, local/stack bytes, or the compile error). No GPU is needed.

Run it with ``TRITON_INTERPRET`` unset: under the interpreter, the ``@triton.jit`` functions of
``triton.language.standard`` that the kernels call (``tl.cdiv``, ``tl.sum``) are interpreter
objects the compiler cannot lower. ``tests/kernels/test_aot_weight_kernels.py`` runs this module
in a subprocess for that reason.
"""

from __future__ import annotations

import json
import os
import sys

from llmq.kernels import dequant_gemm, dequant_gemv
from llmq.kernels.aot import TARGETS, compile_kernel, resource_usage
from llmq.kernels.dequant_tile import fields_per_dot
from llmq.quant.packing import codes_per_word

ACT = {"fp16": ("*fp16", False), "bf16": ("*bf16", False), "fp32": ("*fp32", True)}
# (bits, activations, zero points): every bit width with fp16 activations and integer (uint8) zeros;
# the other activation dtypes at 4 bits; float (fp16) zeros, dequantized by another instruction sequence
# (dequant_tile.scale_codes), at 4 bits and at 3 bits (field-by-field dots)
COMBOS = ([(b, "fp16", "*u8") for b in (2, 3, 4, 8)] + [(4, "bf16", "*u8"), (4, "fp32", "*u8")]
          + [(4, "fp16", "*fp16"), (3, "fp16", "*fp16")])


def _signature(kernel: str, act: str, fp32_out: bool, zeros: str) -> dict[str, str]:
    x_type = ACT[act][0]
    sig = {"x_ptr": x_type, "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": zeros, "b_ptr": "*fp16",
           "out_ptr": "*fp32" if fp32_out else x_type, "M": "i32", "N": "i32", "K": "i32", "group_size": "i32",
           "num_groups": "i32", ("tiles_per_split" if kernel == "gemv" else "m_bucket"): "i32",
           "stride_xm": "i32", "stride_om": "i32"}
    if kernel == "gemv":
        sig["stride_os"] = "i32"
    return sig


def _gemv_out_modes(bits: int, act: str, zeros: str):
    """The default split-K epilogue (atomics) everywhere; the other two (one split, deterministic
    partials) differ only in the final store, checked at int4 fp16."""
    yield "atomic", dequant_gemv.ATOMIC_ADD
    if (bits, act, zeros) == (4, "fp16", "*u8"):
        yield "store", dequant_gemv.STORE
        yield "partials", dequant_gemv.PARTIALS


def cases():
    """(name, kernel, signature, constexprs, num_warps, num_stages) for every shipped config."""
    for bits, act, zeros in COMBOS:
        p = codes_per_word(bits)
        tag = act if zeros == "*u8" else f"{act} float-zeros"
        for block_m, path in ((1, "fma-int8" if bits == 8 else "fma"), (16, "dot-fp32" if ACT[act][1] else "dot")):
            block_n = dequant_gemv.DECODE_BLOCK_N
            for warps, stages in dequant_gemv.GPU_CONFIGS[path]:
                for out_name, mode in _gemv_out_modes(bits, act, zeros):
                    meta = dict(BITS=bits, P=p, TILE=16, HAS_ZEROS=True, HAS_BIAS=True, OUT_MODE=mode,
                                FP32_DOT=ACT[act][1], F=fields_per_dot(bits, ACT[act][1]), BLOCK_M=block_m,
                                BLOCK_N=block_n)
                    yield (f"gemv int{bits} {tag} BLOCK_M={block_m} BLOCK_N={block_n} {out_name} "
                           f"warps={warps} stages={stages}", dequant_gemv.dequant_gemv_kernel,
                           _signature("gemv", act, mode != dequant_gemv.STORE, zeros), meta, warps, stages)
        for bm, bn, warps, stages in (dequant_gemm.GPU_CONFIGS_FP32 if ACT[act][1] else dequant_gemm.GPU_CONFIGS):
            meta = dict(BITS=bits, P=p, TILE=16, HAS_ZEROS=True, HAS_BIAS=True, FP32_DOT=ACT[act][1],
                        GROUP_M=dequant_gemm.GROUP_M, F=fields_per_dot(bits, ACT[act][1]), BLOCK_M=bm, BLOCK_N=bn)
            yield (f"gemm int{bits} {tag} {bm}x{bn} warps={warps} stages={stages}", dequant_gemm.dequant_gemm_kernel,
                   _signature("gemm", act, False, zeros), meta, warps, stages)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run with TRITON_INTERPRET unset (see module docstring)", file=sys.stderr)
        return 2
    for target, capability in TARGETS:
        for name, kernel, sig, meta, warps, stages in cases():
            row = {"target": target, "config": name}
            try:
                compiled = compile_kernel(kernel, {**sig, **{k: "constexpr" for k in meta}}, meta, capability,
                                          warps, stages)
                u = resource_usage(compiled)
                row.update(registers=u.registers, shared_bytes=u.shared_bytes, local_bytes=u.local_bytes,
                           stack_bytes=u.stack_bytes)
            except Exception as e:  # noqa: BLE001 — every failing config is reported, not just the first
                row["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
