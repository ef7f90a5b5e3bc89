"""The kernel-preferred ("tiled") weight layout, its pure-torch reference, and the Triton helper
that dequantizes one field of a tile. Shared by ``dequant_gemv`` and ``dequant_gemm``.

Why a second layout
-------------------
The canonical layout (``llmq.quant.packing``) puts codes ``k = r*P + i`` in field ``i`` of word
row ``r``. A kernel that unpacks field ``i`` of a block of word rows then needs the activation
columns ``r*P + i`` — a stride-``P`` gather — and, for small groups or int3 (``P = 10`` does not
divide any group size), a different scale row for every word row.

The tiled layout permutes K inside tiles of ``TILE_WORDS * P`` codes so that field ``i`` of the
``TILE_WORDS`` word rows of tile ``t`` holds the *contiguous* codes::

    tiled word (t*TILE_WORDS + r), field i  =  code k = t*TILE_WORDS*P + i*TILE_WORDS + r
                                                        (r < TILE_WORDS, i < P)

so one field of one tile is a ``[TILE_WORDS, BLOCK_N]`` block of ``TILE_WORDS`` consecutive input
features: the matching activations are one contiguous ``[BLOCK_M, TILE_WORDS]`` load, and because
every group size (32..256, or K per channel) is a multiple of ``TILE_WORDS = 16`` and tiles start
at multiples of 16, the block lies inside one group — one scale row (and one zero row) per field,
for every bit width including int3. K is padded with zero-point codes up to whole tiles
(``tiled_rows(K, bits)`` rows, at most ``TILE_WORDS - 1`` words more than canonical); kernels mask
those codes through the activations (loaded as 0 past K).

Checkpoints keep the canonical layout; a ``QuantLinear`` converts its ``qweight`` to this one in
place (``repack_tiled``) before the Triton backend first runs, on the layer's device, and back
(``unrepack_tiled``) for ``state_dict`` (``llmq.nn.layouts``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmq.quant.packing import codes_per_word, pack, unpack

TILE_WORDS = 16  # word rows per tile; = K of every tl.dot (>= 16 keeps the GPU compiler happy)


def tile_codes(bits: int) -> int:
    """Input features covered by one tile (``TILE_WORDS * P``)."""
    return TILE_WORDS * codes_per_word(bits)


FIELDS_PER_DOT = 2  # fields dequantized as one block (dequant_fields): one tl.dot with K = 32


def fields_per_dot(bits: int, fp32_dot: bool = False) -> int:
    """Fields per ``tl.dot`` in the dot kernels: ``FIELDS_PER_DOT`` for 2, 4 and 8 bits (P = 16, 8, 4);
    1 (``dequant_field``, K = 16) for int3, whose P = 10 fields per word are not a multiple of 2, and for
    fp32 activations, whose three-pass tf32x3 dots spilled registers with K = 64 blocks (K = 32 not tried)."""
    p = codes_per_word(bits)
    return FIELDS_PER_DOT if p % FIELDS_PER_DOT == 0 and not fp32_dot else 1


def tiled_rows(k: int, bits: int) -> int:
    """Word rows of the tiled layout for K input features."""
    return -(-k // tile_codes(bits)) * TILE_WORDS


def repack_tiled(qweight: torch.Tensor, bits: int, k: int, chunk_n: int = 2048) -> torch.Tensor:
    """Canonical ``[ceil(K/P), N]`` int32 → tiled ``[tiled_rows(K, bits), N]`` int32 (layout above).

    Vectorized (unpack, one permute, pack) over ``chunk_n`` output columns at a time, so the
    temporary int64 codes stay at ``K * chunk_n * 8`` bytes even for 28672-wide layers. Padding codes
    are ``2**(bits-1)``. Bit-exact inverse: ``unrepack_tiled``.
    """
    n = qweight.shape[1]
    if n > chunk_n:
        return torch.cat([repack_tiled(qweight[:, j:j + chunk_n], bits, k, chunk_n) for j in range(0, n, chunk_n)],
                         dim=1)
    p, t = codes_per_word(bits), tile_codes(bits)
    codes = unpack(qweight, bits, k)  # [K, N] uint8, canonical order
    n_tiles = -(-k // t)
    pad = n_tiles * t - k
    if pad:
        codes = torch.cat([codes, codes.new_full((pad, n), 1 << (bits - 1))])
    # k = tile*T + i*TILE_WORDS + r  →  order (tile, r, i) so that pack() puts field i of row (tile, r) at k
    codes = codes.reshape(n_tiles, p, TILE_WORDS, n).permute(0, 2, 1, 3).reshape(n_tiles * t, n)
    return pack(codes, bits)


def unrepack_tiled(tiled: torch.Tensor, bits: int, k: int, chunk_n: int = 2048) -> torch.Tensor:
    """Inverse of ``repack_tiled``: tiled words → canonical ``[ceil(K/P), N]`` int32 (``chunk_n``
    output columns at a time, as there)."""
    p, t = codes_per_word(bits), tile_codes(bits)
    rows, n = tiled.shape
    if rows != tiled_rows(k, bits):
        raise ValueError(f"tiled weight has {rows} rows but K={k} {bits}-bit codes need {tiled_rows(k, bits)}")
    if n > chunk_n:
        return torch.cat([unrepack_tiled(tiled[:, j:j + chunk_n], bits, k, chunk_n) for j in range(0, n, chunk_n)],
                         dim=1)
    n_tiles = rows // TILE_WORDS
    codes = unpack(tiled, bits, n_tiles * t).reshape(n_tiles, TILE_WORDS, p, n).permute(0, 2, 1, 3)
    return pack(codes.reshape(n_tiles * t, n)[:k], bits, pad_code=0)


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                         bits: int, group_size: int, k: int) -> torch.Tensor:
    """Float32 ``[K, N]`` weight from *canonical* packed words (pure torch, the kernels' reference).

    ``group_size`` is the effective group length (K for per-channel).
    """
    codes = unpack(qweight, bits, k).to(torch.int32)  # [K, N]
    gidx = torch.arange(k, device=codes.device) // group_size
    if qzeros is None:
        zeros = float(1 << (bits - 1))
    elif qzeros.is_floating_point():  # float zero points (HQQ-style)
        zeros = qzeros.float()[gidx]
    else:
        zeros = qzeros.to(torch.int32)[gidx].float()
    return (codes.float() - zeros) * scales.float()[gidx]


def dequant_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             qzeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                             group_size: int, k: int) -> torch.Tensor:
    """``x @ dequant(W) + bias`` computed in float32, returned in ``x.dtype`` (canonical weights).

    x ``[..., K]``; result ``[..., N]``. This is what the kernels approximate: fp32 accumulation of
    the exact dequantized weights, one rounding to the activation dtype at the end.
    """
    y = x.float() @ dequantize_reference(qweight, scales, qzeros, bits, group_size, k)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# Codes become floats without an int->float conversion: on an H200 the first version's time followed
# the number of codes unpacked, not the bytes read, and the conversion instruction runs at a fraction of
# the FMA rate (whether it was *the* bottleneck is not measured: the weight kernels are untimed since, and
# the same change did not speed up the KV kernel). OR-ing a code c < 2**23 into the bits of 2.0**23 gives
# the float 2**23 + c exactly, and one subtraction of (2**23 + zero) leaves (c - zero) exactly.
MAGIC_BITS = tl.constexpr(0x4B000000)  # bit pattern of 8388608.0 (2**23)
MAGIC_FLOAT = tl.constexpr(8388608.0)


@triton.jit
def codes_minus_zero(codes, zero_f):
    """``float32(codes - zero)`` for int32 ``codes`` in [0, 2**23) and float ``zero_f`` (broadcastable)."""
    return (codes | MAGIC_BITS).to(tl.float32, bitcast=True) - (zero_f + MAGIC_FLOAT)


@triton.jit
def scale_codes(codes, zero_f, scale, FLOAT_ZEROS: tl.constexpr):
    """``float32((codes - zero) * scale)``; ``zero_f`` and ``scale`` are rows broadcast over ``codes``.

    Integer zeros fold into the magic-number subtraction. Float zeros (HQQ-style) cannot — ``zero +
    2**23`` would round them to an integer — so the weight is ``code * scale - zero * scale`` with the
    product ``zero * scale`` formed once per row: per weight still one subtraction and one
    multiply-add. (``(code - zero) * scale`` per weight costs one more instruction and, under triton
    3.6, spilled the M = 1 kernel to the stack.)"""
    if FLOAT_ZEROS:
        w = codes_minus_zero(codes, 0.0) * scale - zero_f * scale
    else:
        w = codes_minus_zero(codes, zero_f) * scale
    return w


@triton.jit
def dequant_field(words, i, s_ptr, z_ptr, offs_n, n_mask, k0, N, group_size, num_groups,
                  BITS: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """Field ``i`` of a tiled word block → float32 weights ``[TILE_WORDS, BLOCK_N]``.

    ``words`` [TILE_WORDS, BLOCK_N] int32 of one tile; ``k0`` = first input feature of the field
    (a multiple of 16, so the whole field sits in group ``k0 // group_size``); scales/zeros are
    ``[num_groups, N]`` row-major. Padded features past K may index group ``num_groups``: clamp.
    """
    # arithmetic shift may smear the sign bit into high bits; the mask drops them
    codes = (words >> (i * BITS)) & ((1 << BITS) - 1)
    grp = tl.minimum(k0 // group_size, num_groups - 1)
    s = tl.load(s_ptr + grp * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + grp * N + offs_n, mask=n_mask, other=0).to(tl.float32)
    else:
        z = tl.full([1], 1 << (BITS - 1), tl.float32)
    return scale_codes(codes, z[None, :], s[None, :], HAS_ZEROS and z_ptr.dtype.element_ty != tl.uint8)


@triton.jit
def dequant_fields(words, t, f0, s_ptr, z_ptr, offs_n, n_mask, N, group_size, num_groups,
                   BITS: tl.constexpr, P: tl.constexpr, F: tl.constexpr, TILE: tl.constexpr,
                   HAS_ZEROS: tl.constexpr):
    """Fields ``f0 .. f0+F-1`` of tile ``t`` → float32 weights ``[F * TILE, BLOCK_N]`` in input-feature order.

    Row ``j * TILE + r`` is field ``f0 + j`` of word row ``r`` = input feature
    ``t * TILE * P + (f0 + j) * TILE + r`` (the tiled layout), so the block multiplies ``F * TILE``
    contiguous activation columns in one ``tl.dot`` (K = 32 for F = 2) instead of F dots with K = 16.
    ``F`` must be a power of two. Larger blocks spill registers: F = P (the whole tile, [128, BLOCK_N]
    fp32 at 4 bits) on both targets, F = 4 on sm_80 under triton 3.9; F = 2 does not
    (tests/kernels/test_aot_weight_kernels.py).
    """
    offs_f = f0 + tl.arange(0, F)
    codes = (words[None, :, :] >> (offs_f * BITS)[:, None, None]) & ((1 << BITS) - 1)  # [F, TILE, BLOCK_N]
    grp = tl.minimum((t * TILE * P + offs_f * TILE) // group_size, num_groups - 1)  # group of each field
    s_off = grp[:, None] * N + offs_n[None, :]
    s = tl.load(s_ptr + s_off, mask=n_mask[None, :], other=0.0).to(tl.float32)  # [F, BLOCK_N]
    if HAS_ZEROS:
        z = tl.load(z_ptr + s_off, mask=n_mask[None, :], other=0).to(tl.float32)
    else:
        z = tl.full([F, 1], 1 << (BITS - 1), tl.float32)
    w = scale_codes(codes, z[:, None, :], s[:, None, :], HAS_ZEROS and z_ptr.dtype.element_ty != tl.uint8)
    return tl.reshape(w, (F * TILE, words.shape[1]))


@triton.jit
def accumulate_dot(acc, x_ptr, offs_m, m_mask, stride_xm, offs_k, K, w, FP32_DOT: tl.constexpr):
    """``acc + x[offs_m, offs_k] @ w`` with fp32 accumulation.

    ``w``: a dequantized float32 weight block ``[len(offs_k), BLOCK_N]`` for input features ``offs_k``;
    the matching ``[BLOCK_M, len(offs_k)]`` activations are loaded here (0 past K or M). fp32
    activations use three-pass TF32 dots (``tf32x3``, ~fp32 accuracy); fp16/bf16 dot in their own dtype.
    """
    xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                 mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
    if FP32_DOT:
        acc = tl.dot(xt.to(tl.float32), w, acc, input_precision="tf32x3", out_dtype=tl.float32)
    else:
        acc = tl.dot(xt, w.to(xt.dtype), acc, out_dtype=tl.float32)
    return acc
