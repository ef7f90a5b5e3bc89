"""Split-K (flash-decoding) attention of one query token over a quantized KV cache.

One decode step of one layer: every query head attends over ``T = n_quant + n_res``
cached tokens, of which the first ``n_quant`` are stored as packed int2/4/8 codes
with fp16 scales (and uint8 zeros), the last ``n_res`` (the residual window) in
full precision. The kernel reads the codes directly — nothing is dequantized to
memory — which is the point: at long context a decode step is bound by how many
bytes of KV cache it reads.

A split kernel per (batch, KV head, split) and a reduce kernel over the splits: the diagram is in
``kernels/kv_attention_kernel.py``. This module holds the cache record, the reference, the launch
plan and the launcher.

Why fields: the codes are packed along the tokens (``llmq.quant.kv``), so field f of a
block of words is a ``[BLOCK_W, D]`` tile reached by a shift and a mask, and the exact codes
go into the dots as they are: scales and zeros act on q, on the scores or on p (the diagram),
never on a ``[BLOCK_W, D]`` tile. The first version packed along D, rebuilt ``[BLOCK_N, D]``
tiles with a ``[BLOCK_N, D/P, P]`` reshape and dequantized every code; on an H200 its time
followed the number of codes unpacked, not the bytes read (BENCHMARKS.md). The second made each
16-token field a whole online-softmax step (115 barriers and 200 shuffles per 128 int4 tokens on
sm_90a); this one takes one step per FIELDS_PER_STEP fields. Untimed on a GPU since; its SASS and
the model's prediction: ``scripts/kernel_cost.py --kv`` (``kernels/kv_cost.py``, docs/kv_cache.md).

Grouped-query attention: the ``n_rep = H_q / H_kv`` query heads sharing a KV head
are the rows of one ``[BLOCK_H, D]`` tile (padded to 16 for ``tl.dot``), so each
K/V tile is read once per KV head, not once per query head.

Layout of the packed cache: see ``llmq.quant.kv`` (codes ``[.., T/P, D]`` packed along the
tokens, per-token scales ``[.., T, D/g]``, per-channel key scales ``[.., T/g, D]``).

The launcher is the ``torch.library`` custom op ``llmq::kv_decode_attention`` (with a fake
implementation, so ``torch.compile(fullgraph=True)`` and CUDA graphs trace through it);
``kv_decode_attention(q, kv, ...)`` unpacks a ``PackedKV`` into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmq.quant.kv import QuantizedKVBlock, dequantize_kv
from llmq.kernels._launch import through_op
from llmq.kernels.interpreter import interpreting
from llmq.kernels.kv_attention_kernel import _kv_decode_reduce_kernel, _kv_decode_split_kernel


@dataclass
class PackedKV:
    """Everything the decode kernel reads for one layer.

    Attributes:
        k_codes, v_codes: ``[B, H_kv, cap // P, D]`` int32, codes packed along the tokens (first
            ``n_quant`` tokens valid, ``n_quant`` a multiple of ``P``; same shape and strides for K and V).
        k_scales: ``[B, H_kv, cap, D // g]`` fp16 (per-token keys) or ``[B, H_kv, cap // g, D]``
            (per-channel keys); ``k_zeros`` the same shape in uint8, or ``None`` when symmetric.
        v_scales / v_zeros: ``[B, H_kv, cap, D // g]`` fp16 / uint8 (or ``None``).
        n_quant: number of valid quantized tokens.
        k_res, v_res: ``[B, H_kv, n_res, D]`` fp16/bf16/fp32, the residual window (newest tokens).
        bits, group_size, key_per_channel, symmetric: the KV recipe.
    """

    k_codes: torch.Tensor
    k_scales: torch.Tensor
    k_zeros: torch.Tensor | None
    v_codes: torch.Tensor
    v_scales: torch.Tensor
    v_zeros: torch.Tensor | None
    n_quant: int
    k_res: torch.Tensor
    v_res: torch.Tensor
    bits: int
    group_size: int
    key_per_channel: bool
    symmetric: bool


def dequantized_kv(kv: PackedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Full float32 keys and values ``[B, H_kv, T, D]`` (quantized part dequantized, then the residual)."""
    k = dequantize_kv(QuantizedKVBlock(kv.k_codes, kv.k_scales, kv.k_zeros), kv.bits, kv.group_size,
                      kv.key_per_channel, kv.n_quant)
    v = dequantize_kv(QuantizedKVBlock(kv.v_codes, kv.v_scales, kv.v_zeros), kv.bits, kv.group_size, False,
                      kv.n_quant)
    return torch.cat([k, kv.k_res.float()], dim=2), torch.cat([v, kv.v_res.float()], dim=2)


def kv_decode_attention_reference(q: torch.Tensor, kv: PackedKV, sm_scale: float,
                                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch reference (and the CPU path): ``q [B, H_q, D]`` → ``[B, H_q, D]`` in ``q.dtype``.

    ``mask``: optional ``[B, T]`` bool, False = do not attend (left padding).
    """
    k, v = dequantized_kv(kv)  # [B, H, T, D] fp32
    b, h, t, d = k.shape
    rep = q.shape[1] // h
    qf = q.float().reshape(b, h, rep, d)
    s = torch.einsum("bhrd,bhtd->bhrt", qf, k) * sm_scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    o = torch.einsum("bhrt,bhtd->bhrd", torch.softmax(s, dim=-1), v)
    return o.reshape(b, h * rep, d).to(q.dtype)



_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def default_num_splits(batch: int, kv_heads: int, n_tokens: int, sms: int | None,
                       min_tokens_per_split: int = 256) -> int:
    """Enough programs to fill the GPU (~2 per SM; 8 without one) without splits shorter than
    ``min_tokens_per_split``. ``sms``: the device's multiprocessor count, None off a GPU."""
    target = 2 * sms if sms else 8
    return max(1, min(triton.cdiv(target, batch * kv_heads), triton.cdiv(n_tokens, min_tokens_per_split)))


# Launch defaults. For the first kernel (codes packed along D) (block_n 32, 4 warps, 3 stages) timed 2x
# faster than (32, 8, 2) for int4 at 32k tokens, batch 8, on an H200 (``scripts/bench_kv_attention.py
# --sweep``, BENCHMARKS.md). The current kernel (codes packed along the tokens) has not been timed on a GPU.
# 2 stages: the quantized loop compiles the same with 3 (its loads are not pipelined); the fp16-cache
# specialization (HAS_QUANT false) is predicted at its DRAM floor with 2 and NUM_WARPS = 8
# (docs/benchmarks/kv_cost_h200.json).
BLOCK_N = 32
NUM_WARPS = 8
NUM_STAGES = 2
# Per bit width: tile rows per quantized step (BLOCK_W: the N of the score dot and the K of the value dot, so
# at least 16), fields per online-softmax step (their score tiles stay in registers between the step's max and
# its exponentials), warps of a program with quantized tokens, and ROW_FIELDS = J: tile row i holds word row
# w0 + i // J, fields i % J, i % J + J, ... (BLOCK_W // J word rows, BLOCK_W * P / J tokens per step), so a
# 16-row tile covers one 64-token key group at int4 and int2 (one score dot per field, not one per group).
# Chosen on the cost report (sm_90a, 7B shape, 32k, B = 8; docs/kv_cache.md) among the configs that compile
# without spills for sm_80 and sm_90a under triton 3.9 and 3.6 without the launch's hints
# (tests/kernels/test_kv_attention_aot.py). Warps: a [16, 16] score tile is 2 n8 MMA tiles wide, so of 8 warps
# 4 pairs computed the same scores and softmax. int4: 4.47x its DRAM floor at 8 warps (16, 4), 3.06x at 4,
# 2.86x at 4 with J = 2 (2 warps: 2.0-2.4x, but spills with 3.6); int8 1.65x at 8 warps (32, 2), 1.18x at 2
# warps (16, 1); int2 11.9x at J = 1, 8.63x at J = 4 (5.7x at 4 warps, but spills). Untimed on a GPU.
BLOCK_W = {8: 16, 4: 16, 2: 16}
FIELDS_PER_STEP = {8: 1, 4: 4, 2: 2}
QUANT_WARPS = {8: 2, 4: 4, 2: 8}
ROW_FIELDS = {8: 1, 4: 2, 2: 4}


@dataclass(frozen=True)
class KVPlan:
    """One launch of the split kernel and the reduce kernel, as ``kv_decode_attention_launch`` makes it.

    ``ints``: the split kernel's size arguments (strides excluded: they come from the tensors);
    ``constexprs``: every constexpr of the split kernel; ``reduce_constexprs`` those of the reduce kernel.
    """

    grid: tuple[int, int]  # (B * H_kv, n_splits)
    ints: dict
    constexprs: dict
    reduce_constexprs: dict
    num_warps: int
    num_stages: int
    quant_tokens_per_iter: int  # tokens one iteration of the quantized loop covers


def plan(batch: int, q_heads: int, kv_heads: int, head_dim: int, n_quant: int, n_res: int, bits: int,
         group_size: int, key_per_channel: bool, symmetric: bool, has_mask: bool, dtype: torch.dtype,
         sms: int | None, interpret: bool = False, num_splits: int | None = None, block_n: int = BLOCK_N,
         num_warps: int | None = None, num_stages: int = NUM_STAGES) -> KVPlan:
    """The launch arithmetic of ``kv_decode_attention_launch`` (pure: no tensors, no device queries), so the
    cost report (``kernels/kv_cost.py``) compiles exactly what the launcher launches.

    ``sms``: multiprocessor count of the GPU (None: not on a GPU); ``interpret``: Triton's CPU interpreter
    (dots in fp32: its bf16 arithmetic is wrong). Other arguments as ``kv_decode_attention_launch``.
    """
    total = n_quant + n_res
    if num_warps is None:
        num_warps = QUANT_WARPS[bits] if n_quant > 0 else NUM_WARPS
    if num_splits is None:
        num_splits = default_num_splits(batch, kv_heads, total, sms)
    # splits start on whole quantized steps (and residual blocks): both are powers of two
    step = max(block_n, BLOCK_W[bits] // ROW_FIELDS[bits] * (32 // bits))
    tokens_per_split = triton.cdiv(triton.cdiv(total, num_splits), step) * step
    num_splits = triton.cdiv(total, tokens_per_split)
    rep = q_heads // kv_heads
    ints = dict(n_quant=n_quant, n_res=n_res, n_kv_heads=kv_heads, n_rep=rep, tokens_per_split=tokens_per_split,
                n_splits=num_splits)
    constexprs = dict(BITS=bits, GROUP=group_size, KEY_PER_CHANNEL=key_per_channel, SYMMETRIC=symmetric,
                      HAS_MASK=has_mask, HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_W=BLOCK_W[bits],
                      BLOCK_H=max(16, triton.next_power_of_2(rep)),
                      DOT_DTYPE=tl.float32 if interpret else _DOT_DTYPES[dtype],
                      FIELDS_PER_STEP=FIELDS_PER_STEP[bits], HAS_QUANT=n_quant > 0,
                      ROW_FIELDS=ROW_FIELDS[bits])
    return KVPlan((batch * kv_heads, num_splits), ints, constexprs,
                  dict(HEAD_DIM=head_dim, BLOCK_S=max(2, triton.next_power_of_2(num_splits))), num_warps,
                  num_stages, BLOCK_W[bits] // ROW_FIELDS[bits] * (32 // bits))


# The custom op takes the PackedKV fields flattened (a torch.library op takes tensors and scalars only):
# q        [B, H_q, D]              fp16 / bf16 / fp32 (any strides; copied if the last dim is not contiguous)
# k_codes  [B, H_kv, cap/P, D]      int32, P = 32/bits codes per word along the tokens; first n_quant valid
# v_codes  same shape and strides as k_codes
# k_scales [B, H_kv, cap, D/g] fp16 (per-token keys) or [B, H_kv, cap/g, D] fp16 (key_per_channel)
# k_zeros  same shape as k_scales, uint8; None when symmetric (zero = 2**(bits-1))
# v_scales [B, H_kv, cap, D/g]      fp16;  v_zeros same shape uint8, or None when symmetric
# k_res    [B, H_kv, n_res, D]      q.dtype, the residual window (newest tokens, full precision)
# v_res    same shape and strides as k_res
# mask     [B, n_quant + n_res]     bool (False = masked out), or None
# out      [B, H_q, D]              q.dtype, contiguous (a new tensor: the op mutates and aliases nothing)
def kv_decode_attention_launch(q: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor,
                               k_zeros: torch.Tensor | None, v_codes: torch.Tensor, v_scales: torch.Tensor,
                               v_zeros: torch.Tensor | None, k_res: torch.Tensor, v_res: torch.Tensor,
                               mask: torch.Tensor | None, n_quant: int, bits: int, group_size: int,
                               key_per_channel: bool, symmetric: bool, sm_scale: float,
                               num_splits: int | None = None, block_n: int = BLOCK_N, num_warps: int | None = None,
                               num_stages: int = NUM_STAGES) -> torch.Tensor:
    """The launcher, on the flattened ``PackedKV`` (shapes above); also ``torch.ops.llmq.kv_decode_attention``.

    Call it through ``kv_decode_attention(q, kv, ...)``; the arguments are those of ``PackedKV`` and of
    ``kv_decode_attention`` (same names, same meaning). Returns ``[B, H_q, D]`` in ``q.dtype``.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim] (one decode token), got {tuple(q.shape)}")
    if q.dtype not in _DOT_DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported: use float16, bfloat16 or float32")
    b, hq, d = q.shape
    _, hkv, n_res, dr = k_res.shape
    if d != dr or d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 and match the cache, got q {d}, cache {dr}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if k_codes.shape[-1] != d:
        raise ValueError(f"codes must be [batch, kv_heads, tokens / (32 // bits), head_dim] (packed along the "
                         f"tokens, llmq.quant.kv), got {tuple(k_codes.shape)} for head_dim {d}")
    if k_codes.stride() != v_codes.stride() or k_res.stride() != v_res.stride():
        raise ValueError("K and V codes (and K and V residuals) must share shape and strides")
    if not symmetric and (k_zeros is None or v_zeros is None):
        raise ValueError("an asymmetric cache needs k_zeros and v_zeros (None only when symmetric)")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16 (tl.dot tile), got {block_n}")
    total = n_quant + n_res
    if total == 0:
        raise ValueError("the cache is empty: nothing to attend to")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_res.stride(-1) != 1 or k_res.stride() != v_res.stride():
        k_res, v_res = k_res.contiguous(), v_res.contiguous()
    if mask is not None:
        if mask.shape != (b, total):
            raise ValueError(f"mask must be [batch, n_tokens] = {(b, total)}, got {tuple(mask.shape)}")
        mask = mask.to(torch.int8).contiguous()

    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" else None
    pl = plan(b, hq, hkv, d, n_quant, n_res, bits, group_size, key_per_channel, symmetric, mask is not None, q.dtype,
              sms, interpreting(), num_splits, block_n, num_warps, num_stages)
    num_splits = pl.grid[1]
    o_part = torch.empty(b * hq, num_splits, d, device=q.device, dtype=torch.float32)
    m_part = torch.empty(b * hq, num_splits, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    out = torch.empty(b, hq, d, device=q.device, dtype=q.dtype)
    # zeros pointers must be valid tensors even when unused (symmetric)
    kz = k_zeros if k_zeros is not None else k_scales
    vz = v_zeros if v_zeros is not None else v_scales
    mask_t = mask if mask is not None else o_part
    _kv_decode_split_kernel[pl.grid](
        q, k_codes, k_scales, kz, v_codes, v_scales, vz, k_res, v_res, mask_t, o_part, m_part, l_part,
        *pl.ints.values(), float(sm_scale),
        q.stride(0), q.stride(1),
        k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        k_scales.stride(0), k_scales.stride(1), k_scales.stride(2),
        v_scales.stride(0), v_scales.stride(1), v_scales.stride(2),
        k_res.stride(0), k_res.stride(1), k_res.stride(2),
        mask.stride(0) if mask is not None else 0,
        **pl.constexprs, num_warps=pl.num_warps, num_stages=pl.num_stages,
    )
    _kv_decode_reduce_kernel[(b * hq,)](
        o_part, m_part, l_part, out, num_splits, hq, out.stride(0), out.stride(1), **pl.reduce_constexprs,
        num_warps=4,
    )
    return out


# the same launcher as a torch.library op (torch.compile, CUDA graphs); _launch.through_op says when
kv_decode_attention_op = torch.library.custom_op("llmq::kv_decode_attention", kv_decode_attention_launch,
                                                 mutates_args=())


@kv_decode_attention_op.register_fake
def _(q, k_codes, k_scales, k_zeros, v_codes, v_scales, v_zeros, k_res, v_res, mask, n_quant, bits, group_size,
      key_per_channel, symmetric, sm_scale, num_splits=None, block_n=BLOCK_N, num_warps=None,
      num_stages=NUM_STAGES):
    return q.new_empty(q.shape)  # contiguous, like the real output (q itself may be strided)


def kv_decode_attention(q: torch.Tensor, kv: PackedKV, sm_scale: float, mask: torch.Tensor | None = None,
                        num_splits: int | None = None, block_n: int = BLOCK_N, num_warps: int | None = None,
                        num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Triton decode attention of ``q [B, H_q, D]`` over a quantized cache ``kv`` (shapes above).

    Unpacks ``kv`` into the custom op ``torch.ops.llmq.kv_decode_attention`` while ``torch.compile``
    traces (``fullgraph=True``; CUDA graphs) or a gradient is asked for, else into the plain launcher
    (the same kernels without the dispatcher's per-call cost; ``llmq.kernels._launch.through_op``).

    Args:
        q: ``[B, H_q, D]`` fp16/bf16/fp32, one decode token per row; H_q a multiple of H_kv.
        kv: the packed cache (``PackedKV``), residual in ``q.dtype``.
        sm_scale: softmax scale (``1/sqrt(D)`` for Llama).
        mask: ``[B, T]`` bool, False = masked out (left padding); ``None`` = attend to all.
        num_splits: programs per (batch, KV head) along the sequence; default ``default_num_splits``.
        block_n: tokens per step over the full-precision residual window (power of two >= 16); the quantized
            part steps over ``BLOCK_W[bits]`` word rows (``BLOCK_W[bits] * 32 // bits`` tokens).
        num_warps, num_stages: launch options (defaults: see ``BLOCK_N`` / ``QUANT_WARPS`` (``NUM_WARPS`` without
            quantized tokens) / ``NUM_STAGES``).
    Returns:
        ``[B, H_q, D]`` in ``q.dtype``, contiguous.
    Raises:
        ValueError: shapes, dtypes, strides or launch options the kernel cannot run.
    """
    tensors = (q, mask, kv.k_codes, kv.k_scales, kv.k_zeros, kv.v_codes, kv.v_scales, kv.v_zeros, kv.k_res, kv.v_res)
    launch = kv_decode_attention_op if through_op(*tensors) else kv_decode_attention_launch
    return launch(
        q, kv.k_codes, kv.k_scales, kv.k_zeros, kv.v_codes, kv.v_scales, kv.v_zeros, kv.k_res, kv.v_res, mask,
        kv.n_quant, kv.bits, kv.group_size, kv.key_per_channel, kv.symmetric, sm_scale, num_splits, block_n,
        num_warps, num_stages)
