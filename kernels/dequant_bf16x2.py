"""Packed bf16 dequantization for bf16 activations (the ``0x4300`` exponent trick, two codes per 32-bit op).

The weights are ``W = bf16((code - zero) · scale)`` with the layer's fp16 scales, rounded once — the
fp32 reference's weight rounded to the activation dtype, as the other bf16 paths compute it — and the
decode kernel multiplies them with tensor-core dots (fp32 accumulation) for every M ≤ 16, M = 1
included (``decode_tiles_bf16x2``): a bf16 ``x · w`` chain rounds 8x coarser than fp16's.

2-, 3- and 4-bit codes (``tl.inline_asm_elementwise(pack=2)``: two words of one column pair)::

    PRMT  t = [src0.byte(b), -, src1.byte(b), -]        the byte holding field i, both columns
    LOP3  a = (t & (MASK << sh) x2) | 0x43004300       bf16 128 + code·2^sh, exactly (code·2^sh < 128)
    HFMA2 d = a · 2^-sh + off                          code - zero, exactly (off = -(128·2^-sh + zero))
    HFMA2 p = d · s_lo + (-0)                          exact (≤ 4 + 3 significant bits)
    HFMA2 w = d · s_hi + p                             = bf16((code - zero) · scale), one rounding

bf16 has 7 mantissa bits: a field must end at bit 6 of its byte. The high nibble (int4), the top field
(int2) and int3's fields 2, 5, 7 (two straddle a byte) do not; they are read from ``words >> 4`` (one
shift per word, shared by its fields), where each sits inside one byte at a shift ≤ 4.
The fp16 scale has 11 significant bits, bf16 8: ``s_hi = bf16(scale)``, ``s_lo = scale - s_hi``
(≤ 3 bits, exact), so ``d·s_hi + d·s_lo`` is the exact product and the last FMA rounds it once.
Float zero points: ``d = code``, ``p = d·s_lo + bf16(-zero·scale)`` (rounded), ``w = d·s_hi + p``.

8-bit codes do not fit 7 mantissa bits. They go through fp32 instead, still bit-exact::

    LOP3  a = (src & 0xFF << 8b) | 0x4B000000          fp32 2^23 + code·2^8b (b = 0, 1; bytes 2, 3 of
                                                       words >> 16: one shift per word)
    FFMA  d = a · 2^-8b - (2^(23-8b) + zero)           code - zero, exactly (float zeros: the code,
                                                       then FADD - zero as the reference rounds it)
    FMUL  w = d · scale                                exact for integer zeros (≤ 8 + 11 bits)
    F2FP  pair = bf16x2(w0, w1)                        one rounding, two codes per instruction

The interpreter cannot run inline assembly (``ASM = False``) and converts fp32 → bf16 by truncation;
the twin computes the exact values in fp32 / fp64 and rounds to nearest-even with integer bit
operations (``round_bf16``). ``tests/kernels/test_dequant_bf16x2.py`` checks it against a torch model
of the PTX, bit for bit, and the decode kernel against the fp32 reference.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

from llmq.kernels.dequant_f16x2 import ZERO_FLOAT, ZERO_NONE

_NONE, _FLOAT = ZERO_NONE, ZERO_FLOAT
_NEG_ZERO_X2 = 0x80008000  # bf16 (-0, -0): the addend of a multiply (fma.rn.bf16x2 runs on sm_80, mul.bf16x2 needs sm_90)


def _bf16x2_bits(v: float) -> int:
    """The 32-bit pattern of the bf16 pair (v, v); ``v`` exact in bf16 (a power of two here)."""
    h = struct.unpack("<I", struct.pack("<f", v))[0] >> 16
    return h | (h << 16)


def supports(bits: int) -> bool:
    """2, 3, 4 and 8 bits: every 2/3/4-bit field lies within one byte of ``words`` or of ``words >> 4`` at a
    shift of at most 4 (int3: fields 2, 5 and 7 — the two that straddle a byte and the one ending at bit
    7 — come from ``words >> 4``)."""
    return bits in (2, 3, 4, 8)


def field_source(bits: int, i: int) -> tuple[bool, int, int]:
    """``(from words >> 4, byte, bit shift in the byte)`` of field ``i``: the field must end at bit 6."""
    byte, sh = divmod(i * bits, 8)
    if sh + bits <= 7:
        return False, byte, sh
    byte, sh = divmod(i * bits - 4, 8)
    return True, byte, sh


def _asm(bits: int, i: int, float_zeros: bool) -> str:
    """PTX for field ``i`` of 2/4-bit codes: $1, $2 = source words of columns n, n+1; $3 = s_hi pair;
    $4 = s_lo pair; $5 = off pair; $6 = bf16(-zero·scale) pair (float zeros); $0 = bf16 weight pair."""
    _, byte, sh = field_source(bits, i)
    mask = ((1 << bits) - 1) << sh
    return ("{ .reg .b32 t, a, k, d, p; "
            f"prmt.b32 t, $1, $2, {((4 + byte) << 8) | byte}; "
            f"lop3.b32 a, t, {mask | (mask << 16)}, {0x43004300}, 0xea; "  # (t & mask) | magic
            f"mov.b32 k, {_bf16x2_bits(1.0 / (1 << sh))}; "
            "fma.rn.bf16x2 d, a, k, $5; "
            + ("fma.rn.bf16x2 p, d, $4, $6; " if float_zeros else f"mov.b32 p, {_NEG_ZERO_X2}; fma.rn.bf16x2 p, d, $4, p; ")
            + "fma.rn.bf16x2 $0, d, $3, p; }")


def _asm8(byte: int, float_zeros: bool) -> str:
    """PTX for byte ``byte`` of 8-bit codes, in fp32: $1, $2 = source words of columns n, n+1 (``words`` for
    bytes 0, 1, ``words >> 16`` for 2, 3); $3, $4 = fp32 scales; $5, $6 = fp32 ``off`` =
    ``-(2^(23 - 8·b) + zero)`` for the byte's position b (float zeros: ``-2^(23 - 8·b)``); $7, $8 = fp32
    zeros (float zeros); $0 = bf16 pair. (A PRMT ``[w.byte, 0, 0, 0x4B]`` would be one op as well, but
    ptxas then copies its selector into a fresh register per use: 8 % more instructions.)"""
    b = byte % 2
    mask = 0xFF << (8 * b)
    k = struct.unpack("<I", struct.pack("<f", 1.0 / (1 << (8 * b))))[0]
    lines = ["{ .reg .b32 a0, a1, d0, d1; ",
             f"lop3.b32 a0, $1, {mask}, 0x4B000000, 0xea; ", f"lop3.b32 a1, $2, {mask}, 0x4B000000, 0xea; ",
             f"fma.rn.f32 d0, a0, 0f{k:08X}, $5; ", f"fma.rn.f32 d1, a1, 0f{k:08X}, $6; "]  # exact
    if float_zeros:  # the code exactly, then code - zero rounded as the fp32 reference rounds it
        lines += ["sub.rn.f32 d0, d0, $7; ", "sub.rn.f32 d1, d1, $8; "]
    return "".join(lines) + "mul.rn.f32 d0, d0, $3; mul.rn.f32 d1, d1, $4; cvt.rn.bf16x2.f32 $0, d1, d0; }"


# indexed by BITS * 16 + field (8 bits: + byte); fields past 32 // BITS are unused
_BITS = range(9)
_ASM_INT: tl.constexpr = tl.constexpr(tuple((_asm8(i, False) if b == 8 else _asm(b, i, False)) if supports(b) and
                                            i < 32 // b else "" for b in _BITS for i in range(16)))
_ASM_FLOAT: tl.constexpr = tl.constexpr(tuple((_asm8(i, True) if b == 8 else _asm(b, i, True)) if supports(b) and
                                              i < 32 // b else "" for b in _BITS for i in range(16)))
# (from words >> 4, shift) of each field, same indexing
_SHIFTED: tl.constexpr = tl.constexpr(tuple(field_source(b, i)[0] if b in (2, 3, 4) and i < 32 // b else False
                                            for b in _BITS for i in range(16)))
_SH: tl.constexpr = tl.constexpr(tuple(field_source(b, i)[2] if b in (2, 3, 4) and i < 32 // b else 0
                                       for b in _BITS for i in range(16)))


@triton.jit
def round_bf16(v):
    """fp32 → bf16, round to nearest even (finite values), with integer ops: the interpreter truncates."""
    b = v.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_bf16_f64(v):
    """fp64 → bf16, one rounding to nearest even: to fp32 first, then a value that landed exactly on a bf16
    midpoint is nudged one fp32 ulp towards the fp64 remainder (double rounding errs only there)."""
    f = v.to(tl.float32)
    rem = v - f.to(tl.float64)
    b = f.to(tl.int32, bitcast=True)
    up = (rem > 0) == (f > 0)  # the remainder points away from zero: the magnitude grows
    b = tl.where(((b & 0xFFFF) == 0x8000) & (rem != 0), tl.where(up, b + 1, b - 1), b)
    return round_bf16(b.to(tl.float32, bitcast=True))


@triton.jit
def to_bf16(v, ASM: tl.constexpr):
    """fp32 → bf16 rounded to nearest even: ``cvt.rn`` on the GPU, ``round_bf16`` in the interpreter."""
    if ASM:
        out = v.to(tl.bfloat16)
    else:
        out = round_bf16(v)
    return out


@triton.jit
def group_rows_bf16(s_ptr, z_ptr, grp, offs_n, n_mask, N, BITS: tl.constexpr, ZERO_KIND: tl.constexpr,
                    ASM: tl.constexpr):
    """Rows ``[1, BLOCK_N]`` of group ``grp``: ``s_hi``, ``s_lo`` (bf16 halves of the fp16 scale), the bf16
    ``off`` rows for in-byte shifts 0, 2, 4 (``-(128·2^-sh + zero)``; float zeros: ``-128·2^-sh``),
    ``nzs = bf16(-zero·scale)`` (off rows for shifts 1 and 3: int3), and for 8-bit codes the fp32 scale, the fp32 zero and the fp32 ``off`` rows
    ``-(2^23 + zero)``, ``-(2^15 + zero)`` (float zeros: without the zero)."""
    s = tl.load(s_ptr + grp * N + offs_n, mask=n_mask, other=0.0)[None, :].to(tl.float32)
    if ZERO_KIND == _NONE:
        z = tl.full(s.shape, 1 << (BITS - 1), tl.float32)
    else:
        z = tl.load(z_ptr + grp * N + offs_n, mask=n_mask, other=0)[None, :].to(tl.float32)
    s_hi = to_bf16(s, ASM)
    s_lo = to_bf16(s - s_hi.to(tl.float32), ASM)  # exact: ≤ 3 significant bits
    if ZERO_KIND == _FLOAT:  # the zero is applied through nzs / z; off only removes the magic number
        zi = tl.zeros_like(z)
    else:  # integers below 256: every off is exact (bf16: ≤ 8 significant bits)
        zi = z
    o0 = to_bf16(-(zi + 128.0), ASM)
    o1 = to_bf16(-(zi + 64.0), ASM)
    o2 = to_bf16(-(zi + 32.0), ASM)
    o3 = to_bf16(-(zi + 16.0), ASM)
    o4 = to_bf16(-(zi + 8.0), ASM)
    nzs = to_bf16(-(z * s), ASM)  # exact product (≤ 11 + 11 bits), one rounding
    return s_hi, s_lo, o0, o1, o2, o3, o4, nzs, s, z, -(zi + 8388608.0), -(zi + 32768.0)


@triton.jit
def dequant_field_bf16(words, i, rows, BITS: tl.constexpr, ZERO_KIND: tl.constexpr, ASM: tl.constexpr):
    """Field ``i`` (constexpr) of ``words`` ``[TILE, BLOCK_N]`` int32 → bf16 weights; ``rows`` =
    ``group_rows_bf16(...)``. The shifted words the fields read (``words >> 4`` / ``>> 16``) are formed here
    per field; the compiler computes each once per tile."""
    s_hi, s_lo, o0, o1, o2, o3, o4, nzs, s32, z32, o8a, o8b = rows
    if BITS == 8:
        if i % 2 == 0:
            off = o8a
        else:
            off = o8b
        if i >= 2:
            src = words >> 16
        else:
            src = words
        if ASM and ZERO_KIND == _FLOAT:
            w = tl.inline_asm_elementwise(_ASM_FLOAT[128 + i], "=r,r,r,r,r,r,r,r,r", [src, s32, off, z32],
                                          dtype=tl.bfloat16, is_pure=True, pack=2)
        elif ASM:
            w = tl.inline_asm_elementwise(_ASM_INT[128 + i], "=r,r,r,r,r,r,r", [src, s32, off], dtype=tl.bfloat16,
                                          is_pure=True, pack=2)
        else:
            c = ((words >> (i * 8)) & 0xFF).to(tl.float32)
            if ZERO_KIND == _FLOAT:
                d = c - z32  # rounded as the reference rounds it
            else:
                d = c + (o8a + 8388608.0)  # exact: code - zero
            w = round_bf16(d * s32)
    else:
        SHIFTED: tl.constexpr = _SHIFTED[BITS * 16 + i]
        SH: tl.constexpr = _SH[BITS * 16 + i]
        if SH == 0:
            off = o0
        elif SH == 1:
            off = o1
        elif SH == 2:
            off = o2
        elif SH == 3:
            off = o3
        else:
            tl.static_assert(SH == 4, "2/3/4-bit fields start at bit 0..4 of their source byte")
            off = o4
        if ASM:
            if SHIFTED:
                src = words >> 4
            else:
                src = words
            if ZERO_KIND == _FLOAT:
                w = tl.inline_asm_elementwise(_ASM_FLOAT[BITS * 16 + i], "=r,r,r,r,r,r,r",
                                              [src, s_hi, s_lo, off, nzs], dtype=tl.bfloat16, is_pure=True, pack=2)
            else:
                w = tl.inline_asm_elementwise(_ASM_INT[BITS * 16 + i], "=r,r,r,r,r,r",
                                              [src, s_hi, s_lo, off], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            c = ((words >> (i * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            if ZERO_KIND == _FLOAT:  # p = bf16(c·s_lo + nzs), w = bf16(c·s_hi + p): exact sums in fp64
                p = round_bf16_f64(c.to(tl.float64) * s_lo.to(tl.float64) + nzs.to(tl.float64))
                w = round_bf16_f64(c.to(tl.float64) * s_hi.to(tl.float64) + p.to(tl.float64))
            else:  # code - zero exact; its product with the fp16 scale exact in fp32 (≤ 8 + 11 bits)
                d = c + (off.to(tl.float32) + 128.0 / (1 << SH))
                w = round_bf16(d * (s_hi.to(tl.float32) + s_lo.to(tl.float32)))
    return w


@triton.jit
def decode_tiles_bf16x2(x_ptr, qw_ptr, s_ptr, z_ptr, m_mask, offs_n, n_mask, t_start, t_end, N, K, num_groups,
                        stride_xm, BITS: tl.constexpr, P: tl.constexpr, TILE: tl.constexpr,
                        GROUP_FIELDS: tl.constexpr, ZERO_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    """``x[:BLOCK_M] @ W[tiles t_start..t_end)`` for bf16 activations, fp32 ``[BLOCK_M, BLOCK_N]``: per field
    of each tile, ``dequant_field_bf16`` then one tensor-core dot (K = TILE). ``x_ptr`` points at the
    block's first row, ``m_mask`` masks its rows (M = 1 runs a 16-row block with 15 rows masked)."""
    offs_r = tl.arange(0, TILE)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(t_start, t_end):
        words = tl.load(qw_ptr + (t * TILE + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        for i in tl.static_range(P):
            # a group starts at this field; when tiles and groups do not align (int3: P = 10 fields per
            # tile) every field looks its group up
            if i == 0 or (P % GROUP_FIELDS == 0 and i % GROUP_FIELDS == 0) or (P % GROUP_FIELDS != 0 and
                                                                               GROUP_FIELDS % P != 0):
                grp = tl.minimum((t * P + i) // GROUP_FIELDS, num_groups - 1)
                rows = group_rows_bf16(s_ptr, z_ptr, grp, offs_n, n_mask, N, BITS, ZERO_KIND, ASM)
            w = dequant_field_bf16(words, i, rows, BITS, ZERO_KIND, ASM)
            offs_k = (t * P + i) * TILE + offs_r
            xt = tl.load(x_ptr + tl.arange(0, BLOCK_M)[:, None] * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
            if ASM:
                acc = tl.dot(xt, w, acc, out_dtype=tl.float32)
            else:  # the interpreter multiplies bf16 bit patterns as integers: the same exact products in fp32
                acc = tl.dot(xt.to(tl.float32), w.to(tl.float32), acc, out_dtype=tl.float32)
    return acc
