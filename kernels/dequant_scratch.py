"""Prefill regime for large M: dequantize the whole weight into a reused scratch buffer, then cuBLAS.

At large M the matmul is bound by tensor-core throughput, where cuBLAS is far ahead of a fused Triton
GEMM that dequantizes in its inner loop (BENCHMARKS.md run 1: 0.27x cuBLAS at M = 4096). Writing the
fp16 weight once costs ~2.5 bytes per weight of extra traffic (read 0.5 at 4 bits, write 2) plus the
matmul's own read of it: ~15 µs for 8192 x 28672 on an H200, next to ~2.5 ms of matmul at M = 4096.
``dequant_matmul`` picks this regime from the crossover table (``kernels/crossover.py``).

The scratch buffer is one per (device, dtype), grown to the largest weight seen and reused by every
layer (layers run one after another on a stream), so a model pays at most one dense copy of its
largest layer, never one per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmq.kernels._launch import check_args
from llmq.kernels.dequant_f16x2 import ZERO_FLOAT, ZERO_INT, ZERO_NONE, dequant_field_f16, field_offset, supports
from llmq.kernels.dequant_tile import TILE_WORDS, dequant_field
from llmq.kernels.interpreter import interpreting
from llmq.quant.packing import codes_per_word

BLOCK_N = 128
NUM_WARPS = 4


@triton.jit
def dequant_scratch_kernel(
    # pointers
    qw_ptr, s_ptr, z_ptr, w_ptr,
    # sizes
    N, K, group_size, num_groups,
    # meta
    BITS: tl.constexpr, P: tl.constexpr, TILE: tl.constexpr, HAS_ZEROS: tl.constexpr, PACKED: tl.constexpr,
    ASM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One tile (``TILE`` word rows) x ``BLOCK_N`` columns of tiled words → ``W[k, n]`` rows
    ``t·TILE·P .. +TILE·P`` (masked past K) in ``w_ptr``'s dtype."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, TILE)
    words = tl.load(qw_ptr + (t * TILE + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    if not HAS_ZEROS:
        kind: tl.constexpr = ZERO_NONE
    elif z_ptr.dtype.element_ty == tl.uint8:
        kind: tl.constexpr = ZERO_INT
    else:
        kind: tl.constexpr = ZERO_FLOAT
    for i in tl.static_range(P):
        k0 = (t * P + i) * TILE
        offs_k = k0 + offs_r
        if PACKED:
            grp = tl.minimum(k0 // group_size, num_groups - 1)
            s = tl.load(s_ptr + grp * N + offs_n, mask=n_mask, other=0.0)[None, :]
            if HAS_ZEROS:
                z = tl.load(z_ptr + grp * N + offs_n, mask=n_mask, other=0)[None, :]
            else:
                z = tl.zeros_like(s)
            nzs = (-(z.to(tl.float32) * s.to(tl.float32))).to(tl.float16)
            w = dequant_field_f16(words, i, s, field_offset(z, i, BITS, kind), nzs, BITS, kind, ASM)
        else:
            w = dequant_field(words, i, s_ptr, z_ptr, offs_n, n_mask, k0, N, group_size, num_groups, BITS,
                              HAS_ZEROS)
        tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=(offs_k < K)[:, None] & n_mask[None, :])


_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``numel``-element buffer of ``dtype`` on ``device``, shared by every call (grown, never shrunk)."""
    key = (device, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)  # free the old one before allocating the larger
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def plan(n: int, k: int, bits: int, group_size: int, num_groups: int, out_dtype: torch.dtype, has_zeros: bool,
         scale_dtype: torch.dtype = torch.float16) -> tuple[tuple[int, int], dict, dict]:
    """``(grid, ints, constexprs)`` of the dequantize-to-scratch launch (pure; the cost report compiles it)."""
    p = codes_per_word(bits)
    grid = (-(-k // (TILE_WORDS * p)), -(-n // BLOCK_N))
    packed = out_dtype == torch.float16 and scale_dtype == torch.float16 and supports(bits) and not (
        bits == 2 and group_size < 64)
    ints = dict(N=n, K=k, group_size=group_size, num_groups=num_groups)
    constexprs = dict(BITS=bits, P=p, TILE=TILE_WORDS, HAS_ZEROS=has_zeros, PACKED=packed, ASM=not interpreting(),
                      BLOCK_N=BLOCK_N)
    return grid, ints, constexprs


# qweight  [R, N] int32 tiled; scales/qzeros [G, N]; out W [K, N] in x.dtype (a view of the scratch buffer)
def dequantize_tiled(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int,
                     group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[K, N]`` weight ``(code - zero) · scale`` in ``dtype``, written into the shared scratch
    buffer (valid until the next call on this device and dtype)."""
    n = qweight.shape[1]
    w = scratch(in_features * n, dtype, qweight.device).view(in_features, n)
    grid, ints, constexprs = plan(n, in_features, bits, group_size, scales.shape[0], dtype, qzeros is not None,
                                  scales.dtype)
    dequant_scratch_kernel[grid](qweight, scales, qzeros if qzeros is not None else scales, w, **ints, **constexprs,
                                 num_warps=NUM_WARPS)
    return w


def dequant_scratch_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           qzeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                           in_features: int) -> torch.Tensor:
    """``x @ dequant(W) + bias`` as dequantize-to-scratch then ``torch.matmul`` (cuBLAS on CUDA).

    Arguments as ``dequant_gemm``. The weight is rounded to ``x.dtype`` (as the fused kernels' dots do);
    the matmul accumulates in fp32 (cuBLAS) and rounds once. Returns ``[M, N]`` in ``x.dtype``."""
    check_args(x, qweight, scales, qzeros, bias, bits, group_size, in_features)
    w = dequantize_tiled(qweight, scales, qzeros, bits, group_size, in_features, x.dtype)
    y = torch.matmul(x, w)
    if bias is not None:
        y += bias.to(y.dtype)
    return y
