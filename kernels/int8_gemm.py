"""int8 x int8 -> int32 GEMM with a per-token x per-channel scale epilogue (W8A8 linear).

Computes ``y[m, n] = (sum_k a[m, k] * w[n, k]) * a_scale[m] * w_scale[n] (+ bias[n])``:

* ``a`` — activations quantized by ``llmq.kernels.act_quant`` (signed int8, one
  scale per token row, or one static scale for the whole tensor);
* ``w`` — weights in ``nn.Linear`` layout ``[N, K]``, signed int8 per output
  channel (``llmq.quant.primitives`` unsigned code - 128).

The int32 accumulator is exact (|sum| <= K * 128 * 128 < 2**31 for K < 131072).
The epilogue multiplies in float32 in the fixed order ``(acc * a_scale) * w_scale
+ bias`` — the reference below does the same, so under the interpreter the kernel
matches it bit for bit in fp32; on GPU FMA contraction may differ in the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmq.kernels._launch import autotune_bench, through_op
from llmq.kernels.act_quant import check_device
from llmq.kernels.interpreter import interpreting

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_K = 131071  # int32 accumulator bound: K * 2**14 < 2**31


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------

def int32_matmul_reference(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, K] int8 @ w[N, K].T`` as int32 ``[M, N]``.

    ``torch._int_mm`` where it runs (CPU and CUDA, M > 16 on CUDA, sizes multiples
    of 8); otherwise float64, exact because every partial sum is an integer below 2**53.
    """
    m, k = a.shape
    n = w.shape[0]
    if a.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0):
        try:
            return torch._int_mm(a.contiguous(), w.t())
        except RuntimeError:
            pass  # shape/layout the int8 BLAS does not take: the float64 path below is exact too
    return (a.double() @ w.double().t()).to(torch.int32)


def int8_gemm_reference(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Pure-torch ``int8_gemm`` (same arguments, same fp32 epilogue order)."""
    acc = int32_matmul_reference(a, w).float()
    a_s = a_scale.float().reshape(-1, 1)  # [M, 1] or [1, 1]
    y = acc * a_s * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per target; int8 MMA wants K tiles >= 32.
# Every entry compiles without register spills (tests/kernels/test_int8_gemm.py::test_aot...):
# on sm_80 the 128x256 tiles and 128x128 with 4 warps spill, so they are only in the sm_90a list.
GPU_CONFIGS = {
    80: (
        (128, 128, 64, 8, 3),
        (128, 128, 128, 8, 3),
        (64, 128, 128, 4, 3),
        (128, 64, 128, 4, 3),
        (64, 128, 64, 4, 4),
    ),
    90: (
        (128, 256, 128, 8, 3),
        (256, 128, 128, 8, 3),
        (128, 128, 128, 4, 4),
        (128, 128, 64, 4, 4),
        (64, 128, 128, 4, 4),
        (64, 64, 128, 4, 4),
        (32, 64, 128, 4, 4),  # decode-sized M
    ),
}


def _configs() -> list[triton.Config]:
    if interpreting():  # the interpreter runs one config (autotuning >1 fails there) and small tiles are faster
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8
    table = GPU_CONFIGS[90 if major >= 9 else 80]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in table]


@triton.autotune(configs=_configs(), key=["M", "N", "K"], do_bench=autotune_bench)
@triton.jit
def _int8_gemm_kernel(
    # pointers
    a_ptr, w_ptr, y_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_wn, stride_wk, stride_ym, stride_yn, stride_as,
    # meta
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped launch order (triton tutorial 03): GROUP_M row-blocks share W tiles in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m

    # 64-bit only in the per-program base offsets; tile offsets stay 32-bit (register pressure)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M - row0
    n_ok = rn < N - col0
    a_ptrs = a_ptr + row0.to(tl.int64) * stride_am + (rm[:, None] * stride_am + rk[None, :] * stride_ak)
    w_ptrs = w_ptr + col0.to(tl.int64) * stride_wn + (rk[:, None] * stride_wk + rn[None, :] * stride_wn)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & (rk[None, :] < k_left), other=0)
        w = tl.load(w_ptrs, mask=(rk[:, None] < k_left) & n_ok[None, :], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # epilogue: int32 -> fp32, (acc * a_scale) * w_scale + bias, cast to the output dtype
    a_s = tl.load(a_scale_ptr + (row0 + rm) * stride_as, mask=m_ok, other=0.0)  # stride 0 = one static scale
    w_s = tl.load(w_scale_ptr + col0 + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + col0 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + row0.to(tl.int64) * stride_ym + col0 * stride_yn + (rm[:, None] * stride_ym + rn[None, :] * stride_yn)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# a        [M, K]  int8   activations (any strides)
# w        [N, K]  int8   weight, nn.Linear layout (any strides; K-contiguous is fastest)
# a_scale  [M] | [1]  fp32  per-token | per-tensor scale
# w_scale  [N]     fp32   per-output-channel scale
# bias     [N]     float  optional
# y        [M, N]  out_dtype
def int8_gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``(a @ w.T) * a_scale[:, None] * w_scale[None, :] + bias`` with int32 accumulation (Triton).

    Args:
        a: ``[M, K]`` int8 signed activations.
        w: ``[N, K]`` int8 signed weight (``nn.Linear.weight`` orientation).
        a_scale: ``[M]`` float32 per-token scales, or one value (``[]``/``[1]``) per tensor.
        w_scale: ``[N]`` float32 per-output-channel scales.
        bias: optional ``[N]`` float.
        out_dtype: float16, bfloat16 or float32.

    Returns:
        ``[M, N]`` tensor of ``out_dtype``. All inputs on one CUDA device (or CPU under
        ``TRITON_INTERPRET=1``).
    """
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise ValueError(f"int8_gemm: a and w must be int8, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"int8_gemm: need a [M, K] and w [N, K] with the same K, got {tuple(a.shape)} and "
                         f"{tuple(w.shape)}")
    m, k = a.shape
    n = w.shape[0]
    if k > MAX_K:
        raise ValueError(f"int8_gemm: K={k} could overflow the int32 accumulator; K must be <= {MAX_K}")
    if a_scale.numel() not in (1, m) or a_scale.dtype != torch.float32:
        raise ValueError(f"int8_gemm: a_scale must be float32 with {m} (per-token) or 1 (per-tensor) values, got "
                         f"{a_scale.dtype} {tuple(a_scale.shape)}")
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"int8_gemm: w_scale must be float32 [{n}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"int8_gemm: bias must be [{n}], got {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"int8_gemm: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    for name, t in (("w", w), ("a_scale", a_scale), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise ValueError(f"int8_gemm: {name} is on {t.device} but a is on {a.device}")
    check_device(a)
    launch = _int8_gemm_op if through_op(a, w, a_scale, w_scale, bias) else _int8_gemm_launch
    return launch(a, w, a_scale.reshape(-1).contiguous(), w_scale.contiguous(), bias, out_dtype)


def _int8_gemm_launch(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    m, k = a.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
    bias_arg = bias if bias is not None else w_scale  # never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _int8_gemm_kernel[grid](
        a, w, y, a_scale, w_scale, bias_arg,
        m, n, k,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        0 if a_scale.numel() == 1 else 1,
        HAS_BIAS=bias is not None,
    )
    return y


# the same launcher as a torch.library op (torch.compile, CUDA graphs); _launch.through_op says when
_int8_gemm_op = torch.library.custom_op("llmq::int8_gemm", _int8_gemm_launch, mutates_args=())


@_int8_gemm_op.register_fake
def _(a, w, a_scale, w_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)
