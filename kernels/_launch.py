"""Launcher plumbing shared by the kernels: argument checks, dtype rules, op-or-plain-call.

Kept apart from the kernels so each kernel file holds one kernel, its reference and its launcher.
"""

from __future__ import annotations


import torch

from llmq.kernels.dequant_tile import tiled_rows
from llmq.kernels.interpreter import interpreting

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# uint8: integer zero points (GPTQ/AWQ-style); floats: float zero points (HQQ-style)
ZERO_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


def autotune_bench(kernel_call, quantiles):
    """Timer for ``triton.autotune``: 5 ms warm-up, 25 ms of repeats per config.

    Triton's default (25 ms + 100 ms) makes the first call of every new shape cost ~0.13 s per config;
    our kernels run 10 µs – 10 ms, so 25 ms still averages over tens to thousands of launches.
    """
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def through_op(*tensors: torch.Tensor | None) -> bool:
    """Whether a launcher runs through its ``torch.library`` op (``True``) or as a plain Python call.

    The op is what ``torch.compile`` traces (through its fake implementation), what fake / functional
    tensors and other tensor subclasses dispatch through, and what raises a clear error when a gradient
    is asked for. So it is used while compiling, for any input that is not a plain ``torch.Tensor``, and
    for inputs that require grad with grad mode on. Everywhere else the plain launcher runs the same
    kernels without the dispatcher's round trip through Python, which costs ~6-8 µs per call
    (measured on the idle 2-core CPU box, 2026-11-26) — paid by every quantized Linear of every layer at
    every eager decode step.
    """
    if torch.compiler.is_compiling():
        return True
    grad = torch.is_grad_enabled()
    return any(t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)) for t in tensors)


def fp32_dot(dtype: torch.dtype) -> bool:
    """Whether the tile products run on fp32 operands for activations of ``dtype``.

    fp32 activations always do, with ``input_precision="tf32x3"`` (three TF32 tensor-core products
    per tile: ~fp32 accuracy, unlike plain TF32, without the register spills an IEEE fp32 dot
    causes in the tiled GEMM). bf16 does under the interpreter, whose bf16 arithmetic is wrong
    (DESIGN.md). fp16/bf16 on the GPU run tensor-core dots in the activation dtype, fp32 accumulation.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def check_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
               bias: torch.Tensor | None, bits: int, group_size: int, k: int) -> None:
    """Raise ``ValueError`` naming the problem for anything the kernels cannot run."""
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}; cast the input")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, K={k}], got {tuple(x.shape)}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported bits {bits}: the kernels run 2, 3, 4 or 8")
    if group_size % 16 != 0 and group_size != k:
        raise ValueError(f"group size {group_size} must be a multiple of 16 (or K for per-channel)")
    n = qweight.shape[1] if qweight.dim() == 2 else -1
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] != tiled_rows(k, bits):
        raise ValueError(f"qweight must be the tiled int32 layout [{tiled_rows(k, bits)}, N] "
                         f"(kernels.dequant_tile.repack_tiled), got {qweight.dtype} {tuple(qweight.shape)}")
    g = -(-k // group_size)
    if scales.shape != (g, n) or not scales.is_floating_point():
        raise ValueError(f"scales must be float [{g}, {n}], got {scales.dtype} {tuple(scales.shape)}")
    if qzeros is not None and (qzeros.shape != (g, n) or qzeros.dtype not in ZERO_DTYPES):
        raise ValueError(f"qzeros must be [{g}, {n}] uint8 (integer zero points) or float16/bfloat16/float32 "
                         f"(float zero points), got {qzeros.dtype} {tuple(qzeros.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", qzeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move the layer to the input's device")
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
