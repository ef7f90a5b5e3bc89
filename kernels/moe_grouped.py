"""Grouped dequantize-matmul for quantized MoE experts (decode and small batches).

The (token, slot) pairs of a batch are sorted by expert and each expert's run is padded to a
multiple of ``BLOCK_M`` (vLLM's ``moe_align_block_size`` idea, done with torch ops on the device,
no host sync)::

    pairs sorted by expert:  e0 e0 e0 | e2 | e3 e3        (e1: no tokens -> no block at all)
    blocks of BLOCK_M rows:  [e0 e0 e0 -]  [e2 - - -]  [e3 e3 - -]  [unused] …   expert_ids: 0 2 3 -1 …

One program per (block, BLOCK_N output columns): it reads its expert id, gathers its rows of the
input, and runs one dequantize-matmul over K against that expert's packed weight — no Python loop
over experts. The grid has an upper bound of blocks (``cdiv(pairs, BLOCK_M) + E``); programs of
unused blocks (expert id -1) run no K step.

Weights are read in the canonical ``QuantLinear`` layout per expert (``llmq.quant.packing``):
``qweight[e, k // P, n]`` bit field ``k % P``, so every bit width (2, 3, 4, 8) runs.

The K loop (per step, ``BLOCK_W`` packed word rows = ``BLOCK_W * P`` input features)::

    words [BLOCK_W, BLOCK_N]             one load per packed word
    for field i < P:                     feature k = r*P + i of word row r
        a_i  [BLOCK_M, BLOCK_W]          the pairs' activations at those features (stride-P gather)
        cz_i [BLOCK_W, BLOCK_N]          code - zero (exact integers; fp16 via 0x6400 | code)
        step += a_i @ cz_i               tensor cores
    acc += step * scale[group]           once per step, when the step lies inside one group

Groups smaller than a step (and int3's 10 fields) scale every code before the dot instead
(``plan`` decides; docs/moe.md has the cost report's numbers for both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmq.kernels.interpreter import interpreting
from llmq.quant.packing import codes_per_word

BLOCK_W = 16  # packed word rows per K step (tl.dot needs K >= 16): BLOCK_W * P input features


@triton.jit
def moe_grouped_kernel(
    # pointers
    a_ptr, sorted_ptr, expert_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    # sizes
    num_pairs, N, K, group_size, num_groups, packed_rows, a_div,
    # strides (a, out rows; the weight stacks are contiguous [E, rows, N])
    stride_am, stride_om,
    # meta
    BITS: tl.constexpr, P: tl.constexpr, ZERO_MODE: tl.constexpr, FP32_DOT: tl.constexpr, MAGIC_F16: tl.constexpr,
    SCALE_AFTER_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(expert_ptr + pid_m)
    used = e >= 0  # unused blocks (-1) run no K step and store nothing (an early return does not compile)
    e = tl.maximum(e, 0)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] flat pair index or num_pairs
    pairs = tl.where(used, pairs, num_pairs)  # (an unused block's entries are all padding anyway)
    m_mask = pairs < num_pairs
    a_rows = pairs // a_div  # gate_up reads the token's row (a_div = top_k); down its own pair's row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    e64 = e.to(tl.int64)
    qw_base = qw_ptr + e64 * packed_rows * N
    s_base = s_ptr + e64 * num_groups * N
    z_base = z_ptr + e64 * num_groups * N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    rows_end = tl.where(used, packed_rows, 0)
    for wb in range(0, tl.cdiv(rows_end, BLOCK_W)):
        # one load per packed word: BLOCK_W word rows = BLOCK_W * P input features
        offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
        words = tl.load(qw_base + offs_w[:, None] * N + offs_n[None, :],
                        mask=(offs_w < packed_rows)[:, None] & n_mask[None, :], other=0)  # [BLOCK_W, BLOCK_N]
        if SCALE_AFTER_DOT:  # the whole step lies in one group: one scale (and zero) row, applied to the dot
            g_row = (wb * BLOCK_W * P) // group_size * N + offs_n
            scale = tl.load(s_base + g_row, mask=n_mask, other=0.0).to(tl.float32)
            if ZERO_MODE == 0:
                zero = tl.full([BLOCK_N], 1 << (BITS - 1), tl.float32)
            else:
                zero = tl.load(z_base + g_row, mask=n_mask, other=0).to(tl.float32)
            step = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(P):
            offs_k = offs_w * P + i  # canonical layout: field i of word row r is input feature r*P + i
            k_mask = offs_k < K
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_W]
            field = (words >> (i * BITS)) & ((1 << BITS) - 1)
            if SCALE_AFTER_DOT:
                if MAGIC_F16:  # fp16 1024 + code from the exponent bits, minus (1024 + zero): code - zero, exact
                    h = (field | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                    cz = h - (zero + 1024.0).to(tl.float16)[None, :]
                else:  # code - zero is an integer of at most 9 bits: exact in fp16, bf16 and fp32
                    cz = (field.to(tl.float32) - zero[None, :]).to(a.dtype)
                if FP32_DOT:  # three-pass TF32 (~fp32 accuracy); an IEEE fp32 dot spills on sm_90a
                    step = tl.dot(a.to(tl.float32), cz.to(tl.float32), step, input_precision="tf32x3",
                                  out_dtype=tl.float32)
                else:
                    step = tl.dot(a, cz, step, out_dtype=tl.float32)
            else:  # groups smaller than a step (or int3's 10 fields): a scale row per word row
                gidx = (offs_k // group_size)[:, None] * N + offs_n[None, :]
                wk_mask = k_mask[:, None] & n_mask[None, :]
                sc = tl.load(s_base + gidx, mask=wk_mask, other=0.0).to(tl.float32)
                if ZERO_MODE == 0:  # symmetric: zero = 2**(bits-1)
                    z = (1 << (BITS - 1)) * 1.0
                else:  # uint8 integer or float zero points
                    z = tl.load(z_base + gidx, mask=wk_mask, other=0).to(tl.float32)
                w = (field.to(tl.float32) - z) * sc  # [BLOCK_W, BLOCK_N]
                if FP32_DOT:
                    acc = tl.dot(a.to(tl.float32), w, acc, input_precision="tf32x3", out_dtype=tl.float32)
                else:
                    acc = tl.dot(a, w.to(a.dtype), acc, out_dtype=tl.float32)
        if SCALE_AFTER_DOT:
            acc += step * scale[None, :]
    tl.store(out_ptr + pairs[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def align_block_size(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, each expert's run padded to whole ``block_m`` blocks (torch ops, no host sync).

    Args:
        top_k_index: ``[T, k]`` int; entries outside ``[0, E)`` are dropped.

    Returns:
        ``sorted_pairs`` ``[B * block_m]`` int32 flat pair indices (padding = ``T*k``) and
        ``expert_ids`` ``[B]`` int32 (-1 for unused blocks), ``B = cdiv(T*k, block_m) + E``.
    """
    flat = top_k_index.reshape(-1).long()
    num_pairs = flat.numel()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    blocks = (counts + block_m - 1) // block_m  # [E]
    block_start = torch.cumsum(blocks, 0) - blocks  # first block of each expert
    start = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    sorted_key = key[order]
    keep = sorted_key < num_experts
    e_of = sorted_key[keep]
    rank = torch.arange(num_pairs, device=flat.device)[keep] - start[e_of]
    n_blocks = -(-num_pairs // block_m) + num_experts
    sorted_pairs = torch.full((n_blocks * block_m,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[block_start[e_of] * block_m + rank] = order[keep].to(torch.int32)
    # block b belongs to the first expert whose blocks end after b (searchsorted: no host sync)
    ends = torch.cumsum(blocks, 0)
    expert_ids = torch.searchsorted(ends, torch.arange(n_blocks, device=flat.device), right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_pairs, expert_ids


# a            [A, K]           fp16 | bf16 | fp32 activations; pair p reads row p // a_div
# qweight      [E, ceil(K/P), N] int32, canonical QuantLinear layout per expert
# scales       [E, G, N]        float
# zeros        [E, G, N]        uint8 or float zero points, or None (symmetric)
# sorted_pairs [B * BLOCK_M]    int32, expert_ids [B] int32 (align_block_size)
# out          [T*k, N]         a.dtype; rows of pairs routed to no expert are 0
def moe_grouped_matmul(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       sorted_pairs: torch.Tensor, expert_ids: torch.Tensor, num_pairs: int, a_div: int, bits: int,
                       group_size: int, block_m: int) -> torch.Tensor:
    """``out[p] = a[p // a_div] @ dequant(W[expert(p)])`` for every routed pair ``p``.

    ``group_size`` is the effective group (K for per-channel). Raises ``ValueError`` on shapes,
    dtypes or devices the kernel cannot run.
    """
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32) or a.dim() != 2:
        raise ValueError(f"activations must be a 2-D float16/bfloat16/float32 tensor, got {a.dtype} {tuple(a.shape)}")
    e, rows, n = qweight.shape
    k = a.shape[1]
    p = codes_per_word(bits)
    if qweight.dtype != torch.int32 or rows != -(-k // p):
        raise ValueError(f"qweight must be int32 [E, {-(-k // p)}, N] for K={k} at {bits} bits, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    g = -(-k // group_size)
    if scales.shape != (e, g, n) or (zeros is not None and zeros.shape != (e, g, n)):
        raise ValueError(f"scales / zeros must be [{e}, {g}, {n}], got {tuple(scales.shape)} / "
                         f"{None if zeros is None else tuple(zeros.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and (t.device != a.device or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous and on {a.device}")
    out = torch.zeros(num_pairs, n, dtype=a.dtype, device=a.device)
    if num_pairs == 0:
        return out
    a = a.contiguous()
    zero_kind = "none" if zeros is None else "float" if zeros.is_floating_point() else "int"
    pl = plan(expert_ids.numel(), n, k, bits, group_size, a.dtype, zero_kind, block_m, interpreting())
    moe_grouped_kernel[pl.grid](
        a, sorted_pairs, expert_ids, qweight, scales, zeros if zeros is not None else scales, out,
        num_pairs, n, k, group_size, g, rows, a_div,
        a.stride(0), out.stride(0),
        **pl.constexprs,
    )
    return out


@dataclass(frozen=True)
class MoEPlan:
    """How ``moe_grouped_matmul`` launches: the grid and the kernel's constexprs (what the cost report
    compiles, so the two cannot drift)."""

    grid: tuple[int, int]  # (blocks, column tiles)
    constexprs: dict


def plan(blocks: int, n: int, k: int, bits: int, group_size: int, act_dtype: torch.dtype, zero_kind: str,
         block_m: int, interpret: bool = False) -> MoEPlan:
    """The launch for ``blocks`` row blocks (``align_block_size``'s ``expert_ids`` length) of an ``[*, K] @ [K, N]``
    grouped matmul with ``group_size`` groups (K per channel) and ``zero_kind`` ``"none" | "int" | "float"``.
    Pure: no tensors.

    * ``SCALE_AFTER_DOT`` where a K step (``BLOCK_W * P`` features) never straddles a group: the codes
      minus zero (exact small integers) go into the dot and the scale multiplies the step's [M, N] result,
      not every code;
    * ``MAGIC_F16`` for fp16 activations with integer zeros on that path: code - zero from the fp16
      exponent trick (``0x6400 | code`` is 1024 + code), no int→float conversion per code;
    * under the interpreter the column tile is narrower (speed) and bf16 takes the fp32 dot (the
      interpreter's bf16 dot rounds differently from the GPU's).
    """
    p = codes_per_word(bits)
    block_n = 32 if interpret else 64
    fp32 = act_dtype == torch.float32 or (act_dtype == torch.bfloat16 and interpret)
    after = group_size % (BLOCK_W * p) == 0 or group_size >= k
    magic = after and act_dtype == torch.float16 and zero_kind != "float" and not fp32
    return MoEPlan((blocks, triton.cdiv(n, block_n)),
                   dict(BITS=bits, P=p, ZERO_MODE=0 if zero_kind == "none" else 1, FP32_DOT=fp32, MAGIC_F16=magic,
                        SCALE_AFTER_DOT=after, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=BLOCK_W))


def moe_grouped_reference(a, qweight, scales, zeros, top_k_index, a_div, bits, group_size) -> torch.Tensor:
    """Pure-torch ``[T*k, N]``: each pair's row times its expert's dequantized weight (fp32, then a.dtype)."""
    from llmq.quant.packing import unpack

    flat = top_k_index.reshape(-1).long()
    e, _, n = scales.shape
    k = a.shape[1]
    out = torch.zeros(flat.numel(), n, dtype=a.dtype, device=a.device)
    for pair, ex in enumerate(flat.tolist()):
        if not 0 <= ex < e:
            continue
        codes = unpack(qweight[ex], bits, k).float()  # [K, N]
        idx = torch.arange(k, device=a.device) // group_size
        zero = zeros[ex].float()[idx] if zeros is not None else float(1 << (bits - 1))
        w = (codes - zero) * scales[ex].float()[idx]
        out[pair] = (a[pair // a_div].float() @ w).to(a.dtype)
    return out
