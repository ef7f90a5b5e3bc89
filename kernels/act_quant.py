"""Per-token (dynamic) and per-tensor (static) symmetric int8 quantization of activations.

Convention (same as ``llmq.quant.primitives`` with ``bits=8, symmetric=True``,
signed instead of unsigned codes)::

    scale[m] = max_k |x[m, k]| / 127.5        (dynamic, one per row; static: given)
    q[m, k]  = clamp(round(x[m, k] / scale[m]), -128, 127)    int8, round half to even
    x ~= q * scale                             |error| <= scale / 2 inside [-127.5, 127.5]*scale

``q + 128`` is the primitives' unsigned code with zero point 128; the int8 GEMM
(``llmq.kernels.int8_gemm``) wants the signed value. An all-zero row gets
``scale = 1`` (codes 0, no division by zero) and scales are floored at fp16's
smallest normal number, as for weights (``llmq.observers.base.scale_from_threshold``).

The Triton kernel is bit-exact with ``act_quant_reference`` (fp32 division, round
half to even, both IEEE) — the tests check ``torch.equal``.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from llmq.kernels._launch import through_op
from llmq.kernels.interpreter import interpreting

MIN_SCALE = torch.finfo(torch.float16).tiny
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter."""
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
            raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {t.device}; "
                             f"use the torch reference backend on this device")


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------

def per_token_scale_reference(x: torch.Tensor) -> torch.Tensor:
    """``[M]`` float32 scales of ``x [M, K]`` (row absmax / 127.5, all-zero rows -> 1)."""
    amax = x.float().abs().amax(dim=-1)
    # divide by a tensor, not the Python number: on CUDA, torch turns division by a scalar into
    # multiplication by its rounded reciprocal, which is not bit-identical to the kernel's IEEE division
    s = amax / torch.full_like(amax, 127.5)
    return torch.where(s > 0, s, torch.ones_like(s)).clamp(min=MIN_SCALE)


def act_quant_reference(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch quantization of ``x [M, K]`` (fp16/bf16/fp32).

    Args:
        scale: ``None`` for dynamic per-token scales, or a float32 scalar tensor
            (shape ``[]`` or ``[1]``) for a static per-tensor scale.

    Returns:
        q ``[M, K]`` int8, scale ``[M]`` float32 (dynamic) or the given scale as ``[1]``.
    """
    if scale is None:
        scale = per_token_scale_reference(x)
        s = scale[:, None]
    else:
        scale = scale.float().reshape(1)
        s = scale
    q = torch.round(x.float() / s).clamp(-128, 127).to(torch.int8)
    return q, scale


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def _act_quant_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes
    K,
    # strides
    stride_xm, stride_qm,
    # meta
    STATIC: tl.constexpr, MIN_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one program per row: pass 1 finds the row's absmax, pass 2 quantizes
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if STATIC:
        scale = tl.load(scale_ptr)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        # div_rn: IEEE division; plain `/` compiles to the approximate div.full.f32 on NVIDIA GPUs
        scale = tl.math.div_rn(tl.max(amax, axis=0), 127.5)
        scale = tl.where(scale > 0.0, scale, 1.0)
        scale = tl.maximum(scale, MIN_S)
        tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        # round half to even, built from floor (inlined: llmq.kernels.aot compiles the kernel
        # function alone, and libdevice rint differs between the interpreter and the GPU)
        v = tl.math.div_rn(x, scale)
        f = tl.floor(v)
        d = v - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        q = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(q_row + k0 + offs, q.to(tl.int8), mask=mask)


# x      [M, K]  fp16 | bf16 | fp32, row stride any, unit column stride
# q      [M, K]  int8, contiguous
# scale  [M]     fp32 (dynamic, written) | [1] fp32 (static, read)
def act_quant(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``act_quant_reference`` (same arguments and results, bit-exact).

    Args:
        x: ``[M, K]`` float16/bfloat16/float32 on CUDA (or CPU under the interpreter),
            unit stride along K.
        scale: ``None`` = dynamic per-token; else a float32 scalar (``[]``/``[1]``) static scale.
    """
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"act_quant: activations must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"act_quant: x must be 2-D [M, K], got shape {tuple(x.shape)}; flatten leading dims")
    if x.shape[1] > 0 and x.stride(1) != 1:
        x = x.contiguous()
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"act_quant: a static scale must hold one value, got shape {tuple(scale.shape)}")
    check_device(x, scale)
    return (_act_quant_op if through_op(x, scale) else _act_quant_launch)(x, scale)


def _act_quant_launch(x: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if scale is None:
        out_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    else:
        out_scale = scale.float().reshape(1).contiguous()
    if m == 0:
        return q, out_scale
    block = min(1024, max(16, triton.next_power_of_2(k)))
    _act_quant_kernel[(m,)](x, q, out_scale, k, x.stride(0), q.stride(0), STATIC=scale is not None,
                            MIN_S=MIN_SCALE, BLOCK_K=block, num_warps=4 if block >= 512 else 1)
    # the static scale is returned as a fresh tensor so the op's outputs never alias inputs
    return q, out_scale if scale is None else out_scale.clone()


# the same launcher as a torch.library op (torch.compile, CUDA graphs); _launch.through_op says when
_act_quant_op = torch.library.custom_op("llmq::act_quant", _act_quant_launch, mutates_args=())


@_act_quant_op.register_fake
def _(x: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    n_scale = m if scale is None else 1
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty((n_scale,), dtype=torch.float32)
