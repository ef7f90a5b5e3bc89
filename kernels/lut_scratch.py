"""Prefill regime of the lookup-table matmul: dequantize the whole weight into the shared scratch buffer
(``dequant_scratch.scratch``), then ``torch.matmul`` (cuBLAS on CUDA).

At M > 16 the matmul turns compute bound; cuBLAS on a dense weight beats a fused Triton GEMM there, and
writing the weight once costs ~2.5 bytes per weight of extra traffic (read the packed codes, write fp16).
Each program dequantizes one tile (``16·P`` input features) of ``BLOCK_N`` columns: per field, the codes
index the codebook through an L1-cached gather and are multiplied by the fp32 scale, rounded once to the
activation dtype (``w = round(entry · scale)``: exact product for fp16 tables and scales).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmq.kernels.dequant_scratch import scratch
from llmq.kernels.dequant_tile import TILE_WORDS
from llmq.kernels.lut_gemv import group_of
from llmq.kernels.lut_lookup import check_lut_args, lut_matmul_reference  # noqa: F401  (reference)
from llmq.quant.packing import codes_per_word

BLOCK_N = 128
NUM_WARPS = 4


@triton.jit
def lut_scratch_kernel(qw_ptr, cb_ptr, s_ptr, w_ptr, N, K, num_groups, BITS: tl.constexpr, P: tl.constexpr,
                       TILE: tl.constexpr, PER_COLUMN: tl.constexpr, GROUP_FIELDS: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Tile ``program_id(0)`` x ``BLOCK_N`` columns of tiled codes → rows ``t·TILE·P ..`` of ``W [K, N]``."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, TILE)
    S: tl.constexpr = 1 << BITS
    if PER_COLUMN:
        cb_row = cb_ptr + (offs_n * S)[None, :]
    else:
        cb_row = cb_ptr + tl.zeros([1, BLOCK_N], tl.int32)
    words = tl.load(qw_ptr + (t * TILE + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    for f in tl.static_range(P):
        codes = (words >> (f * BITS)) & (S - 1)
        entry = tl.load(cb_row + codes, mask=n_mask[None, :], other=0.0)
        g = group_of(t, f, P, GROUP_FIELDS, num_groups)
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)[None, :]
        offs_k = (t * P + f) * TILE + offs_r
        tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :],
                 (entry.to(tl.float32) * s.to(tl.float32)).to(w_ptr.dtype.element_ty),
                 mask=(offs_k < K)[:, None] & n_mask[None, :])


def plan(n: int, k: int, bits: int, group_size: int, num_groups: int, per_column: bool):
    """``(grid, ints, constexprs)`` of the dequantization launch (pure; the cost report compiles it)."""
    p = codes_per_word(bits)
    grid = (-(-k // (TILE_WORDS * p)), -(-n // BLOCK_N))
    ints = dict(N=n, K=k, num_groups=num_groups)
    constexprs = dict(BITS=bits, P=p, TILE=TILE_WORDS, PER_COLUMN=per_column,
                      GROUP_FIELDS=-(-group_size // TILE_WORDS), BLOCK_N=BLOCK_N)
    return grid, ints, constexprs


def dequantize_lut_tiled(qweight: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor, bits: int,
                         group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[K, N]`` weight in ``dtype`` from tiled codes, in the shared scratch buffer (valid until
    the next scratch call on this device and dtype)."""
    n = qweight.shape[1]
    w = scratch(in_features * n, dtype, qweight.device).view(in_features, n)
    grid, ints, constexprs = plan(n, in_features, bits, group_size, scales.shape[0], codebook.shape[0] != 1)
    lut_scratch_kernel[grid](qweight, codebook, scales, w, **ints, **constexprs, num_warps=NUM_WARPS)
    return w


def lut_scratch_matmul(x: torch.Tensor, qweight: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """``x [M, K] @ W + bias`` → ``[M, N]`` in ``x.dtype``: dequantize to scratch, then ``torch.matmul``."""
    check_lut_args(x, qweight, codebook, scales, bias, bits, group_size, in_features)
    w = dequantize_lut_tiled(qweight, codebook, scales, bits, group_size, in_features, x.dtype)
    y = torch.matmul(x, w)
    if bias is not None:
        y += bias.to(y.dtype)
    return y
