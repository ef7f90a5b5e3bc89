"""Packed fp16x2 dequantization: two codes per 32-bit instruction (the ``0x6400`` exponent trick).

For fp16 activations with fp16 scales and 2-, 4- or 8-bit codes (fields never straddle a byte).
One field ``i`` of a tiled word block ``[TILE, BLOCK_N]`` (``dequant_tile``) becomes fp16 weights
``(code - zero) * scale`` two columns at a time: ``tl.inline_asm_elementwise(pack=2)`` hands the asm
the words of columns ``n`` and ``n + 1`` (adjacent in a thread's registers: the words are loaded 16
bytes at a time), and the scale / zero rows of those columns arrive as one fp16x2 register each
(adjacent in memory). Per pair of codes (sm_90 SASS)::

    PRMT  t = [w0.byte(b), -, w1.byte(b), -]        the byte holding field i, of both columns
    LOP3  a = (t & (MASK << sh) x2) | 0x64006400    fp16 1024 + code·2^sh, exactly (code·2^sh < 1024)
    HFMA2 c = a · 2^-sh + off                       code - zero, exactly (off = -(1024·2^-sh + zero))
    HMUL2 w = c · scale                             one rounding, as fp32 (code - zero)·scale → fp16

Float zero points (HQQ-style) cannot ride in ``off`` (``1024 + zero`` has no fraction bits), so ``c``
is the code itself and ``w = fma(c, scale, -round16(zero·scale))`` (one rounding of the product-sum).

The interpreter cannot run inline assembly (``ASM = False``): the same values are computed with
plain Triton arithmetic, bit for bit — the code minus an integer zero and its product with an fp16
scale are exact in fp32 (≤ 9 + 11 significant bits), so one fp32 → fp16 rounding equals HMUL2's;
fused multiply-adds are formed exactly in fp64 (≤ 22 + 11 bits within 53) and rounded once to fp16.
``tests/kernels/test_dequant_f16x2.py`` checks both against the reference and each other.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

def _f16x2_bits(v: float) -> int:
    """The 32-bit pattern of the fp16 pair (v, v)."""
    h = struct.unpack("<H", struct.pack("<e", v))[0]
    return h | (h << 16)


def field_window(bits: int, i: int) -> tuple[int, int, bool]:
    """``(byte, bit shift in it, two bytes)`` of field ``i``: a field that straddles a byte (int3 fields 2
    and 5, bits 6-8 and 15-17) is read from a 16-bit window of bytes ``byte, byte + 1`` instead; fp16's 10
    mantissa bits hold it there (shift + bits <= 10), so ``1024 + code·2^sh`` is still exact."""
    byte, sh = divmod(i * bits, 8)
    assert sh + bits <= 10, (bits, i)
    return byte, sh, sh + bits > 8


def _selector(byte: int, two: bool) -> int:
    """PRMT selector: the field's byte (and the next, for a two-byte window) of $1 into the low half and of
    $2 into the high half: ``[w0.b, (w0.b+1), w1.b, (w1.b+1)]``; unused lanes are masked off afterwards."""
    if two:
        return byte | ((byte + 1) << 4) | ((4 + byte) << 8) | ((5 + byte) << 12)
    return ((4 + byte) << 8) | byte


def _asm(bits: int, i: int, float_zeros: bool) -> str:
    """PTX for field ``i``: operands $1, $2 = words of columns n, n+1; $3 = scale pair; $4 = off pair;
    $5 = -zero·scale pair (float zeros); $0 = the fp16 weight pair."""
    byte, sh, two = field_window(bits, i)
    mask = ((1 << bits) - 1) << sh
    head = ("{ .reg .b32 t, a, c, k; "
            f"prmt.b32 t, $1, $2, {_selector(byte, two)}; "  # [w0.byte(s), w1.byte(s)]
            f"lop3.b32 a, t, {mask | (mask << 16)}, {0x64006400}, 0xea; "  # (t & mask) | magic
            f"mov.b32 k, {_f16x2_bits(1.0 / (1 << sh))}; "
            "fma.rn.f16x2 c, a, k, $4; ")
    return head + ("fma.rn.f16x2 $0, c, $3, $5; }" if float_zeros else "mul.rn.f16x2 $0, c, $3; }")


def _asm_dot_byte(bits: int, byte: int, float_zeros: bool, first: bool = False) -> str:
    """PTX accumulating the fields of byte ``byte`` times their activations: one PRMT for the byte, then per
    field LOP3, HFMA2 (code - zero), HMUL2 (scale; float zeros: HFMA2) and HFMA2 (· x + acc). Operands:
    $0 = acc out; $1, $2 = words of columns n, n+1; $3 = scale pair; $4 = acc in; then per field its off
    pair and its x pair; last, -zero·scale (float zeros). ``first``: ignore acc in (start from 0), so the
    caller needs no zeroed accumulator registers."""
    f = 8 // bits
    nzs = f"${5 + 2 * f}"
    lines = ["{ .reg .b32 t, a, c, w, k, s; ", f"prmt.b32 t, $1, $2, {((4 + byte) << 8) | byte}; ",
             "mov.b32 s, 0; " if first else "mov.b32 s, $4; "]
    for j in range(f):
        sh = j * bits
        mask = ((1 << bits) - 1) << sh
        lines += [f"lop3.b32 a, t, {mask | (mask << 16)}, {0x64006400}, 0xea; ",
                  f"mov.b32 k, {_f16x2_bits(1.0 / (1 << sh))}; ",
                  f"fma.rn.f16x2 c, a, k, ${5 + 2 * j}; ",
                  f"fma.rn.f16x2 w, c, $3, {nzs}; " if float_zeros else "mul.rn.f16x2 w, c, $3; ",
                  f"fma.rn.f16x2 s, w, ${6 + 2 * j}, s; "]
    return "".join(lines) + "mov.b32 $0, s; }"


# indexed by FIRST * 12 + (BITS // 4) * 4 + byte
_ASM_DOT_INT: tl.constexpr = tl.constexpr(tuple(_asm_dot_byte(b, y, False, f) for f in (False, True) for b in (2, 4, 8)
                                                for y in range(4)))
_ASM_DOT_FLOAT: tl.constexpr = tl.constexpr(tuple(_asm_dot_byte(b, y, True, f) for f in (False, True) for b in (2, 4, 8)
                                                  for y in range(4)))
_CONSTRAINTS: tl.constexpr = tl.constexpr(tuple("=r,r,r,r,r" + ",r,r" * (8 // b) + ",r" * fz
                                                for fz in (0, 1) for b in (2, 4, 8)))

# indexed by BITS * 16 + field (fields past 32 // BITS and other bit widths unused)
_ASM_INT: tl.constexpr = tl.constexpr(tuple(_asm(b, i, False) if b in (2, 3, 4, 8) and i < 32 // b else ""
                                            for b in range(9) for i in range(16)))
_ASM_FLOAT: tl.constexpr = tl.constexpr(tuple(_asm(b, i, True) if b in (2, 3, 4, 8) and i < 32 // b else ""
                                              for b in range(9) for i in range(16)))


# zero-point kinds (constexpr ZERO_KIND): symmetric (no zero points), uint8 zero points, float zero points
ZERO_NONE: tl.constexpr = tl.constexpr(0)
ZERO_INT: tl.constexpr = tl.constexpr(1)
ZERO_FLOAT: tl.constexpr = tl.constexpr(2)
_NONE, _FLOAT = ZERO_NONE, ZERO_FLOAT


def supports(bits: int) -> bool:
    """Whether ``dequant_field_f16`` handles ``bits``: 2, 4, 8 (fields inside one byte) and 3 (the two
    fields that straddle a byte read a two-byte window, ``field_window``)."""
    return bits in (2, 3, 4, 8)


def supports_byte_loop(bits: int) -> bool:
    """Whether the M = 1 per-byte loop (``dot_byte_f16x2``: all fields of a byte in one asm block) applies:
    the fields must tile the bytes (2, 4, 8 bits; int3 runs tensor-core dots at M = 1)."""
    return bits in (2, 4, 8)


@triton.jit
def field_shift(i, BITS: tl.constexpr):
    """(byte, bit shift inside the byte) of field ``i`` (constexpr)."""
    return (i * BITS) // 8, (i * BITS) % 8


@triton.jit
def field_offset(zero, i, BITS: tl.constexpr, ZERO_KIND: tl.constexpr):
    """fp16 ``off`` of field ``i`` for ``zero`` (a row of zero points, or ignored): ``-(1024·2^-sh + zero)``
    for integer / symmetric zeros, ``-(1024·2^-sh)`` for float zeros (the zero is applied after the scale)."""
    sh: tl.constexpr = (i * BITS) % 8
    base: tl.constexpr = 1024.0 / (1 << sh)
    if ZERO_KIND == _FLOAT:
        off = tl.full(zero.shape, -base, tl.float16)
    elif ZERO_KIND == _NONE:
        off = tl.full(zero.shape, -(base + (1 << (BITS - 1))), tl.float16)
    else:
        off = (-(zero.to(tl.float32) + base)).to(tl.float16)  # exact: integers below 2048
    return off


@triton.jit
def dequant_field_f16(words, i, scale, off, nzs, BITS: tl.constexpr, ZERO_KIND: tl.constexpr, ASM: tl.constexpr):
    """Field ``i`` (constexpr) of ``words`` ``[TILE, BLOCK_N]`` int32 → fp16 ``(code - zero) · scale``.

    ``scale``: fp16 row ``[1, BLOCK_N]``; ``off``: fp16 row from ``field_offset``; ``nzs``: fp16 row
    ``-round16(zero · scale)`` for float zeros (ignored otherwise)."""
    byte: tl.constexpr = (i * BITS) // 8
    sh: tl.constexpr = (i * BITS) % 8
    mask: tl.constexpr = ((1 << BITS) - 1) << sh
    if ASM:
        if ZERO_KIND == _FLOAT:
            w = tl.inline_asm_elementwise(_ASM_FLOAT[BITS * 16 + i], "=r,r,r,r,r,r", [words, scale, off, nzs],
                                          dtype=tl.float16, is_pure=True, pack=2)
        else:
            w = tl.inline_asm_elementwise(_ASM_INT[BITS * 16 + i], "=r,r,r,r,r", [words, scale, off],
                                          dtype=tl.float16, is_pure=True, pack=2)
    else:
        codes = ((words >> (byte * 8)) & mask) >> sh  # the code, as the asm's a·2^-sh - 1024·2^-sh
        if ZERO_KIND == _FLOAT:
            c = codes.to(tl.float64)
            w = (c * scale.to(tl.float64) + nzs.to(tl.float64)).to(tl.float16)
        else:
            c = codes.to(tl.float32) + (off.to(tl.float32) + 1024.0 / (1 << sh))  # code - zero, exact
            w = (c * scale.to(tl.float32)).to(tl.float16)
    return w


@triton.jit
def dot_byte_f16x2(words, byte, scale, o0, o1, o2, o3, x0, x1, x2, x3, nzs, acc, BITS: tl.constexpr,
                   ZERO_KIND: tl.constexpr, ASM: tl.constexpr, FIRST: tl.constexpr = False):
    """``acc + Σ_j x_j · w_j`` over the ``8 // BITS`` fields ``j`` of byte ``byte`` (constexpr) of ``words``,
    in fp16 (each product-sum rounded once: HFMA2); ``x_j`` ``[TILE, 1]`` fp16 activations of field j,
    ``o_j`` its ``off`` row. Fields past ``8 // BITS`` ignore their arguments. ``FIRST``: ``acc`` is
    taken as 0 (its registers need not be zeroed)."""
    F: tl.constexpr = 8 // BITS
    if ASM:
        if ZERO_KIND == _FLOAT:
            if F == 1:
                args = [words, scale, acc, o0, x0, nzs]
            elif F == 2:
                args = [words, scale, acc, o0, x0, o1, x1, nzs]
            else:
                args = [words, scale, acc, o0, x0, o1, x1, o2, x2, o3, x3, nzs]
            acc = tl.inline_asm_elementwise(_ASM_DOT_FLOAT[FIRST * 12 + (BITS // 4) * 4 + byte], _CONSTRAINTS[3 + BITS // 4], args, dtype=tl.float16, is_pure=True, pack=2)
        else:
            if F == 1:
                args = [words, scale, acc, o0, x0]
            elif F == 2:
                args = [words, scale, acc, o0, x0, o1, x1]
            else:
                args = [words, scale, acc, o0, x0, o1, x1, o2, x2, o3, x3]
            acc = tl.inline_asm_elementwise(_ASM_DOT_INT[FIRST * 12 + (BITS // 4) * 4 + byte], _CONSTRAINTS[BITS // 4], args, dtype=tl.float16, is_pure=True, pack=2)
    else:
        if FIRST:
            acc = tl.zeros_like(acc)
        acc = fma_f16x2(dequant_field_f16(words, byte * F, scale, o0, nzs, BITS, ZERO_KIND, False), x0, acc, False)
        if F > 1:
            acc = fma_f16x2(dequant_field_f16(words, byte * F + 1, scale, o1, nzs, BITS, ZERO_KIND, False), x1, acc, False)
        if F > 2:
            acc = fma_f16x2(dequant_field_f16(words, byte * F + 2, scale, o2, nzs, BITS, ZERO_KIND, False), x2, acc, False)
            acc = fma_f16x2(dequant_field_f16(words, byte * F + 3, scale, o3, nzs, BITS, ZERO_KIND, False), x3, acc, False)
    return acc


@triton.jit
def fma_f16x2(w, x, acc, ASM: tl.constexpr):
    """fp16 ``w · x + acc`` with one rounding (HFMA2, two columns per instruction); ``x`` broadcasts."""
    if ASM:
        out = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [w, x, acc], dtype=tl.float16,
                                        is_pure=True, pack=2)
    else:
        out = (w.to(tl.float64) * x.to(tl.float64) + acc.to(tl.float64)).to(tl.float16)
    return out


@triton.jit
def _group_rows(s_ptr, z_ptr, grp, offs_n, n_mask, N, BITS: tl.constexpr, ZERO_KIND: tl.constexpr):
    """Scale row (fp16 ``[1, BLOCK_N]``), the four ``off`` rows (in-byte shifts 0, 1, 2, 3 × BITS; only
    ``8 // BITS`` are used; int3 forms its own from the zero row, last), ``-round16(zero · scale)`` and the
    zero row of group ``grp``."""
    s = tl.load(s_ptr + grp * N + offs_n, mask=n_mask, other=0.0)[None, :]
    if ZERO_KIND == _NONE:
        z = tl.zeros_like(s)
    else:
        z = tl.load(z_ptr + grp * N + offs_n, mask=n_mask, other=0)[None, :]
    nzs = (-(z.to(tl.float32) * s.to(tl.float32))).to(tl.float16)
    return (s, field_offset(z, 0, BITS, ZERO_KIND), field_offset(z, 1, BITS, ZERO_KIND),
            field_offset(z, 2, BITS, ZERO_KIND), field_offset(z, 3, BITS, ZERO_KIND), nzs, z)


@triton.jit
def _x_field(x_ptr, t, i, offs_r, K, P: tl.constexpr, TILE: tl.constexpr, EVEN_K: tl.constexpr):
    """Activations ``[TILE, 1]`` fp16 of field ``i`` of tile ``t`` (0 past K unless ``EVEN_K``)."""
    offs_k = (t * P + i) * TILE + offs_r
    if EVEN_K:
        xv = tl.load(x_ptr + offs_k)
    else:
        xv = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
    return xv[:, None]


@triton.jit
def decode_tiles_f16x2(x_ptr, qw_ptr, s_ptr, z_ptr, m_mask, offs_n, n_mask, t_start, t_end, N, K,
                       num_groups, stride_xm, BITS: tl.constexpr, P: tl.constexpr, TILE: tl.constexpr,
                       GROUP_FIELDS: tl.constexpr, ZERO_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, TILES_PER_STEP: tl.constexpr,
                       ASM: tl.constexpr):
    """``x[:BLOCK_M] @ W[tiles t_start..t_end)`` for fp16 activations, fp32 ``[BLOCK_M, BLOCK_N]``; ``x_ptr``
    points at the block's first row, ``m_mask`` masks its rows.

    Field ``i`` of tile ``t`` holds input features ``(t·P + i)·TILE + r``; its group is
    ``(t·P + i) // GROUP_FIELDS`` (``GROUP_FIELDS = group_size / 16``, a constexpr: no integer division at
    run time; scale / zero rows are loaded when a field starts a new group). ``BLOCK_M = 1``: per byte of
    the words, one asm block dequantizes its fields and accumulates ``x · w`` in fp16x2 (``dot_byte_f16x2``);
    the fp16 partial sums of ``TILES_PER_STEP`` tiles (which divides every split's tile count) are added to
    the fp32 sum at once. ``BLOCK_M = 16``: one
    tensor-core dot per field (K = TILE).
    """
    offs_r = tl.arange(0, TILE)
    F: tl.constexpr = 8 // BITS  # fields per byte
    if BLOCK_M == 1:
        acc2 = tl.zeros([TILE, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if BLOCK_M == 1:  # fp16 partial sums over TILES_PER_STEP tiles, then one fp32 add
        for t0 in range(t_start, t_end, TILES_PER_STEP):
            part = tl.zeros([TILE, BLOCK_N], dtype=tl.float16)  # ignored by the first byte (FIRST)
            for u in tl.static_range(TILES_PER_STEP):
                t = t0 + u
                w_ptrs = qw_ptr + (t * TILE + offs_r)[:, None] * N + offs_n[None, :]
                if EVEN_N:  # no masked-off lanes to zero (N a multiple of BLOCK_N, as in LLM layers)
                    words = tl.load(w_ptrs)
                else:
                    words = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
                for y in tl.static_range(P // F):  # bytes of the words
                    if y * F == 0 or (y * F) % GROUP_FIELDS == 0:
                        grp = tl.minimum((t * P + y * F) // GROUP_FIELDS, num_groups - 1)
                        s, o0, o1, o2, o3, nzs, z = _group_rows(s_ptr, z_ptr, grp, offs_n, n_mask, N, BITS, ZERO_KIND)
                    tl.static_assert(GROUP_FIELDS >= F, "a group boundary inside a byte: not on the fp16x2 path")
                    x0 = _x_field(x_ptr, t, y * F, offs_r, K, P, TILE, EVEN_K)
                    x1 = x0
                    x2 = x0
                    x3 = x0
                    if F > 1:
                        x1 = _x_field(x_ptr, t, y * F + 1, offs_r, K, P, TILE, EVEN_K)
                    if F > 2:
                        x2 = _x_field(x_ptr, t, y * F + 2, offs_r, K, P, TILE, EVEN_K)
                        x3 = _x_field(x_ptr, t, y * F + 3, offs_r, K, P, TILE, EVEN_K)
                    part = dot_byte_f16x2(words, y, s, o0, o1, o2, o3, x0, x1, x2, x3, nzs, part, BITS, ZERO_KIND,
                                          ASM, u == 0 and y == 0)
            acc2 += part.to(tl.float32)
        acc = tl.sum(acc2, axis=0)[None, :]
    else:
        for t in range(t_start, t_end):
            words = tl.load(qw_ptr + (t * TILE + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            # int3 (P = 10 fields per tile) with groups of >= 8 fields: a tile spans at most two groups (it
            # starts at field (10t) % GF <= GF - 2 of its first group and ends 9 fields later, < 2·GF), so both
            # groups' rows load once per tile and each field selects; fields from `cut` on are in the second
            TWO_GROUPS: tl.constexpr = P % GROUP_FIELDS != 0 and GROUP_FIELDS % P != 0 and GROUP_FIELDS >= 8
            if TWO_GROUPS:
                g0 = (t * P) // GROUP_FIELDS
                cut = (g0 + 1) * GROUP_FIELDS - t * P
                s_a, _, _, _, _, nzs_a, z_a = _group_rows(s_ptr, z_ptr, tl.minimum(g0, num_groups - 1), offs_n, n_mask,
                                                          N, BITS, ZERO_KIND)
                s_b, _, _, _, _, nzs_b, z_b = _group_rows(s_ptr, z_ptr, tl.minimum(g0 + 1, num_groups - 1), offs_n,
                                                          n_mask, N, BITS, ZERO_KIND)
            for i in tl.static_range(P):
                if TWO_GROUPS:
                    second = i >= cut
                    s = tl.where(second, s_b, s_a)
                    nzs = tl.where(second, nzs_b, nzs_a)
                    z = tl.where(second, z_b, z_a)
                # a group starts at this field; when tiles and groups do not align otherwise (int3 with groups
                # of 4 fields) every field looks its group up (L1 hits)
                elif i == 0 or (P % GROUP_FIELDS == 0 and i % GROUP_FIELDS == 0) or (P % GROUP_FIELDS != 0 and
                                                                                     GROUP_FIELDS % P != 0):
                    grp = tl.minimum((t * P + i) // GROUP_FIELDS, num_groups - 1)
                    s, o0, o1, o2, o3, nzs, z = _group_rows(s_ptr, z_ptr, grp, offs_n, n_mask, N, BITS, ZERO_KIND)
                if BITS == 3:  # in-byte shifts (3i) % 8 take 8 values: one off row per field
                    off = field_offset(z, i, BITS, ZERO_KIND)
                elif i % F == 0:
                    off = o0
                elif i % F == 1:
                    off = o1
                elif i % F == 2:
                    off = o2
                else:
                    off = o3
                w = dequant_field_f16(words, i, s, off, nzs, BITS, ZERO_KIND, ASM)  # [TILE, BLOCK_N] fp16
                offs_k = (t * P + i) * TILE + offs_r
                xt = tl.load(x_ptr + tl.arange(0, BLOCK_M)[:, None] * stride_xm + offs_k[None, :],
                             mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
                acc = tl.dot(xt, w, acc, out_dtype=tl.float32)
    return acc
