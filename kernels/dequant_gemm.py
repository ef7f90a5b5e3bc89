"""Prefill-regime fused dequantize-matmul (M > 16 rows): tiled tensor-core GEMM.

Triton's tutorial matmul (``03-matrix-multiplication.py``) with the B operand produced in registers:

* 1-D grid over ``[BLOCK_M, BLOCK_N]`` output tiles in grouped order (``GROUP_M`` row blocks share
  a column block so the packed weight and x stay in L2 across neighbouring programs);
* per K tile (``TILE_WORDS`` word rows = ``16 * P`` input features) one coalesced
  ``[TILE_WORDS, BLOCK_N]`` int32 load; for each pair of its P fields (``dequant_fields``, F = 2),
  shift + mask + one scale/zero row per field (tiled layout: a field lies inside one group) give a
  ``[32, BLOCK_N]`` weight block in the activation dtype, multiplied with the contiguous
  ``[BLOCK_M, 32]`` activation block by one ``tl.dot`` (fp32 accumulator; int3 and fp32
  activations: one field, K = 16, per dot). The dequantized weight only ever exists in registers /
  shared memory.
* no split-K: ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)`` tiles already fill the GPU for M > 16 on
  LLM-sized N, and atomics would cost determinism and an fp32 round trip.
* bias added in the epilogue; output stored once in ``x.dtype``.

fp16 activations with fp16 scales run ``dequant_gemm_f16x2`` instead (``plan`` picks): packed fp16x2
dequantization with the weight as the register operand of a swapped dot, no per-code shared-memory stores.

Under ``TRITON_INTERPRET`` a single config runs; on CUDA ``@triton.autotune`` chooses the tile shape
per (M bucket, N, K, BITS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataclasses import dataclass

from llmq.kernels._launch import autotune_bench, check_args, fp32_dot
from llmq.kernels.dequant_f16x2 import supports as supports_f16x2
from llmq.kernels.dequant_gemm_f16x2 import dequant_gemm_f16x2_kernel
from llmq.kernels.interpreter import interpreting
from llmq.kernels.dequant_tile import (TILE_WORDS, accumulate_dot, dequant_field,  # noqa: F401
                                       dequant_fields, dequant_matmul_reference, fields_per_dot)
from llmq.quant.packing import codes_per_word

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on CUDA.
# Every one compiles without register spills for sm_80 and sm_90a, every bit width and activation
# dtype (tests/kernels/test_aot_weight_kernels.py).
GPU_CONFIGS = [
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 4),
    (32, 128, 4, 4),
    (64, 256, 8, 3),  # 128x256 spills on sm_90a under triton 3.6 and 256x128 under 3.9; 64x256 under neither
]
GPU_CONFIGS_FP32 = GPU_CONFIGS[:-1]  # fp32 activations (tf32x3 dots): the largest tile spills
# fp16 activations and scales (dequant_gemm_f16x2, operands swapped: BLOCK_N is the wgmma's M side, a multiple
# of 64 rows per warpgroup); 128x256 at 8 warps spills on sm_80 (int3: 24-48 bytes of stack)
GPU_CONFIGS_F16X2 = [
    (32, 128, 4, 4),
    (64, 128, 4, 3),
    (64, 256, 8, 3),
    (128, 128, 8, 3),
]
CONFIGS = {"dot": GPU_CONFIGS, "dot-fp32": GPU_CONFIGS_FP32, "f16x2": GPU_CONFIGS_F16X2}
INTERPRETER_CONFIGS = [(32, 64, 4, 1)]
GROUP_M = 8


def configs(path: str) -> list[triton.Config]:
    rows = INTERPRETER_CONFIGS if interpreting() else CONFIGS[path]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


@triton.jit
def dequant_gemm_kernel(
    # pointers
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    # sizes
    M, N, K, group_size, num_groups, m_bucket,
    # strides (rows of x / out; qweight, scales, qzeros are contiguous [rows, N])
    stride_xm, stride_om,
    # meta
    BITS: tl.constexpr, P: tl.constexpr, TILE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, GROUP_M: tl.constexpr, F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grouped tile order (tutorial 03): consecutive programs walk GROUP_M row blocks of one column block
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_rows
    pid_n = (pid % pids_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_r = tl.arange(0, TILE)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if F > 1:
        # per tile, P / F steps of F fields each: one [F*TILE, BLOCK_N] block and one dot with K = F*TILE
        for j in range(0, tl.cdiv(K, TILE * P) * (P // F)):
            t = j // (P // F)
            f0 = (j - t * (P // F)) * F
            words = tl.load(qw_ptr + (t * TILE + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                            other=0)  # [TILE, BLOCK_N] int32; the P/F steps of a tile re-read it from L1
            w = dequant_fields(words, t, f0, s_ptr, z_ptr, offs_n, n_mask, N, group_size, num_groups,
                               BITS, P, F, TILE, HAS_ZEROS)  # [F * TILE, BLOCK_N] fp32
            offs_k = t * (TILE * P) + f0 * TILE + tl.arange(0, F * TILE)
            acc = accumulate_dot(acc, x_ptr, offs_m, m_mask, stride_xm, offs_k, K, w, FP32_DOT)
    else:
        # int3 (P = 10 fields per word): one step per (tile, field), field i of tile t holds
        # input features [16*j, 16*j + 16), j = t*P + i
        for j in range(0, tl.cdiv(K, TILE * P) * P):
            t = j // P
            words = tl.load(qw_ptr + (t * TILE + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                            other=0)  # [TILE, BLOCK_N] int32; the P steps of a tile re-read it from L1
            k0 = j * TILE
            w = dequant_field(words, j - t * P, s_ptr, z_ptr, offs_n, n_mask, k0, N, group_size, num_groups,
                              BITS, HAS_ZEROS)  # [TILE, BLOCK_N] fp32
            offs_k = k0 + offs_r
            acc = accumulate_dot(acc, x_ptr, offs_m, m_mask, stride_xm, offs_k, K, w, FP32_DOT)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# m_bucket (next power of two of M) keys the autotuner so every new prefill length does not retune.
_KEY = ["m_bucket", "N", "K", "BITS", "HAS_ZEROS"]
KERNELS = {"dot": dequant_gemm_kernel, "dot-fp32": dequant_gemm_kernel, "f16x2": dequant_gemm_f16x2_kernel}
_tuned = {path: triton.autotune(configs(path), key=_KEY, do_bench=autotune_bench)(kernel)
          for path, kernel in KERNELS.items()}


@dataclass(frozen=True)
class GemmPlan:
    """The kernel variant (``KERNELS[path]``, autotuned over ``CONFIGS[path]``) and every integer and
    constexpr argument by name (BLOCK_M / BLOCK_N come from the autotune config)."""

    path: str
    ints: dict
    constexprs: dict


def plan(m: int, n: int, k: int, bits: int, group_size: int, num_groups: int, act_dtype: torch.dtype,
         has_zeros: bool, has_bias: bool, stride_xm: int | None = None,
         scale_dtype: torch.dtype = torch.float16) -> GemmPlan:
    """How ``dequant_gemm_launch`` launches for ``x [m, k]`` and an ``n``-column weight. fp16 activations with
    fp16 scales run ``dequant_gemm_f16x2`` (packed dequantization, weight as the register operand), the rest
    the fp32-dequantizing kernel. Pure: the cost report compiles from it."""
    p = codes_per_word(bits)
    stride_xm = k if stride_xm is None else stride_xm
    if act_dtype == torch.float16 and scale_dtype == torch.float16 and supports_f16x2(bits):
        n_tiles = -(-k // (TILE_WORDS * p))
        ints = dict(M=m, N=n, K=k, num_groups=num_groups, m_bucket=triton.next_power_of_2(m), stride_xm=stride_xm,
                    stride_om=n)
        # one group (per channel): a multiple of P, so the rows load once per tile
        constexprs = dict(BITS=bits, P=p, TILE=TILE_WORDS, HAS_ZEROS=has_zeros, HAS_BIAS=has_bias,
                          GROUP_FIELDS=n_tiles * p if num_groups == 1 else -(-group_size // TILE_WORDS),
                          GROUP_M=GROUP_M, ASM=not interpreting())
        return GemmPlan("f16x2", ints, constexprs)
    ints = dict(M=m, N=n, K=k, group_size=group_size, num_groups=num_groups, m_bucket=triton.next_power_of_2(m),
                stride_xm=stride_xm, stride_om=n)
    fp32 = fp32_dot(act_dtype)
    constexprs = dict(BITS=bits, P=p, TILE=TILE_WORDS, HAS_ZEROS=has_zeros, HAS_BIAS=has_bias,
                      FP32_DOT=fp32, GROUP_M=GROUP_M, F=fields_per_dot(bits, fp32))
    return GemmPlan("dot-fp32" if fp32 else "dot", ints, constexprs)


# x        [M, K]        fp16 | bf16 | fp32, rows contiguous along K
# qweight  [R, N]        int32, tiled layout (kernels.dequant_tile), R = tiled_rows(K, bits)
# scales   [G, N]        float (any float dtype), G = ceil(K / group_size)
# qzeros   [G, N]        uint8 (integer zeros) or float (float zeros), or None (symmetric: 2**(bits-1))
# bias     [N]           float, or None
# out      [M, N]        x.dtype
def dequant_gemm_launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """``x @ dequant(W) + bias`` for any M (meant for M > 16), from tiled packed words.

    Arguments as ``dequant_gemv`` (without ``split_k``). Returns ``[M, N]`` in ``x.dtype``.
    """
    check_args(x, qweight, scales, qzeros, bias, bits, group_size, in_features)
    m, k = x.shape
    n = qweight.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    out = x.new_empty(m, n)
    if m == 0:
        return out

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    pl = plan(m, n, k, bits, group_size, scales.shape[0], x.dtype, qzeros is not None, bias is not None,
              x.stride(0), scales.dtype)
    _tuned[pl.path][grid](
        x, qweight, scales, qzeros if qzeros is not None else scales, bias if bias is not None else scales, out,
        **pl.ints, **pl.constexprs)
    return out


# the same launcher as a torch.library op (torch.compile, CUDA graphs); _launch.through_op says when
dequant_gemm = torch.library.custom_op("llmq::dequant_gemm", dequant_gemm_launch, mutates_args=())


@dequant_gemm.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size, in_features):
    return x.new_empty(x.shape[0], qweight.shape[1])
