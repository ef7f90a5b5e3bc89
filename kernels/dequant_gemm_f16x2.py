"""Middle-range fused GEMM on the packed fp16x2 dequantization, operands swapped (``outᵀ = Wᵀ · xᵀ``).

The fused GEMM of ``dequant_gemm`` dequantizes in fp32 and hands the weight to ``tl.dot`` as its B
operand; on sm_90a a wgmma reads B from shared memory, so every dequantized code went back to shared
memory (16 ``STS.U16`` per thread per K step, ~15 SASS instructions per code). Here the weight is the
**A** operand: per field ``i`` of a tile the ``[BLOCK_N, 16]`` block ``Wᵀ`` (``dequant_field_f16`` on
the transposed word block: ``PRMT``, ``LOP3``, ``HFMA2``, ``HMUL2`` per pair of codes) multiplies the
``[16, BLOCK_M]`` activations ``xᵀ`` (B, from shared memory through the async-copy pipeline) into an fp32
``[BLOCK_N, BLOCK_M]`` accumulator: wgmma takes A from registers, so the dequantized codes never touch
shared memory. The result is stored transposed (``out[m, n] = acc[n, m]``).

fp16 activations and fp16 scales only (``dequant_f16x2``: 2/3/4/8 bits, every zero kind); other dtypes
keep ``dequant_gemm``'s kernel. Under the interpreter the fp16x2 twin runs (``ASM = False``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmq.kernels.dequant_f16x2 import ZERO_FLOAT, ZERO_INT, ZERO_NONE, dequant_field_f16, field_offset


@triton.jit
def _rows_t(s_ptr, z_ptr, grp, offs_n, n_mask, N, ZERO_KIND: tl.constexpr):
    """Scale, zero and ``-round16(zero·scale)`` columns ``[BLOCK_N, 1]`` of group ``grp``."""
    s = tl.load(s_ptr + grp * N + offs_n, mask=n_mask, other=0.0)[:, None]
    if ZERO_KIND == ZERO_NONE:
        z = tl.zeros_like(s)
    else:
        z = tl.load(z_ptr + grp * N + offs_n, mask=n_mask, other=0)[:, None]
    nzs = (-(z.to(tl.float32) * s.to(tl.float32))).to(tl.float16)
    return s, z, nzs


@triton.jit
def dequant_gemm_f16x2_kernel(
    # pointers
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    # sizes
    M, N, K, num_groups, m_bucket,
    # strides (rows of x / out; qweight, scales, qzeros are contiguous [rows, N])
    stride_xm, stride_om,
    # meta
    BITS: tl.constexpr, P: tl.constexpr, TILE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP_FIELDS: tl.constexpr, GROUP_M: tl.constexpr, ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out [M, N] = x [M, K] @ dequant(W) + bias`` for fp16 ``x`` and scales, tiled words ``[R, N]``."""
    if not HAS_ZEROS:
        ZERO_KIND: tl.constexpr = ZERO_NONE
    elif z_ptr.dtype.element_ty == tl.uint8:
        ZERO_KIND: tl.constexpr = ZERO_INT
    else:
        ZERO_KIND: tl.constexpr = ZERO_FLOAT
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
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for t in range(0, tl.cdiv(K, TILE * P)):
        # the tile's words transposed: [BLOCK_N, TILE], row n = column n of the weight
        words = tl.load(qw_ptr + (t * TILE + offs_r)[None, :] * N + offs_n[:, None], mask=n_mask[:, None], other=0)
        for i in tl.static_range(P):
            if i == 0 or (P % GROUP_FIELDS == 0 and i % GROUP_FIELDS == 0) or (P % GROUP_FIELDS != 0 and
                                                                               GROUP_FIELDS % P != 0):
                s, z, nzs = _rows_t(s_ptr, z_ptr, tl.minimum((t * P + i) // GROUP_FIELDS, num_groups - 1), offs_n,
                                    n_mask, N, ZERO_KIND)
            w = dequant_field_f16(words, i, s, field_offset(z, i, BITS, ZERO_KIND), nzs, BITS, ZERO_KIND, ASM)
            offs_k = (t * P + i) * TILE + offs_r
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                         mask=m_mask[None, :] & (offs_k < K)[:, None], other=0.0)  # [TILE, BLOCK_M]
            acc = tl.dot(w, xt, acc, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])
