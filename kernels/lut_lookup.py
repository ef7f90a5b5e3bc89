"""Lookup-table dequantization: the codebook in registers, four codes looked up per ``PRMT``.

Storage (``llmq.nn.QuantLinear`` with non-uniform levels)::

    qweight   [ceil(K/P), N] int32   canonical packed codes (``llmq.quant.packing``), 1/2/3/4 bits;
                                      the kernels read the tiled layout (``dequant_tile.repack_tiled``)
    codebook  [T, 2**bits]   float16  T = 1 (one table for every column: nf, log2, binary) or
                                      T = N (one table per output column: kmeans)
    scales    [G, N]         float    group scales, no zero points
    w[k, n] = codebook[0 if T == 1 else n, code[k, n]] * scales[k // group_size, n]

The table lives in registers, split into a **high-byte table and a low-byte table** of the fp16
entries (4 bytes per register: 2 registers for 1 and 2 bits, 4 for 3 bits, 8 for 4 bits; per column
for per-column tables, loaded once per program for the whole K loop). ``PRMT`` picks 4 bytes out of 8
with four 3-bit selector nibbles, so one ``PRMT`` looks up four codes. A *quad* is four fields of one
word whose codes can be moved into the four selector nibbles cheaply (``QUAD_FIELDS``): for 1, 2 and 4
bits one shift and one mask (fields ``4j + s`` at 1 bit, ``2j + s/2`` at 2 bits, ``j + s/4`` at 4 bits),
for 3 bits one shift-and-mask per field. Per quad (sm_90 SASS, one column)::

    SHF/LOP3  s = nibble selectors                      (4 codes)
    PRMT      h = hi bytes of entries s   (4 bits: two PRMTs over entries 0-7 / 8-15 and a LOP3
    PRMT      l = lo bytes of entries s    select by each code's bit 3, from a PRMT sign-replicate mask;
                                           selector bit 3 is PRMT's sign mode, so it is masked off)
    PRMT x2   p, q = (l.b0, h.b0, l.b1, h.b1), (l.b2, h.b2, l.b3, h.b3)  fp16 pairs of fields (a, b), (c, d)
    HMUL2 x2  p, q *= (scale, scale) pairs              w = round16(entry · scale), one rounding
    HFMA2 x2  acc += p · (x_a, x_b) + q · (x_c, x_d)    fp16x2 partial sums (two fields per register)

The interpreter cannot run inline assembly: ``quad_dot(..., ASM=False)`` computes the same values in
plain Triton (entry bytes from the same table registers, the exact fp32 product rounded once to fp16,
fused multiply-adds formed exactly in fp64 and rounded once). ``tests/kernels/test_lut_lookup.py`` runs
the PTX text itself through a small model of its instructions and checks it against the twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmq.quant.packing import unpack

LUT_BITS = (1, 2, 3, 4)


def quad_fields(bits: int) -> list[tuple[int, ...]]:
    """The quads of one word: fields in selector-nibble order (the last 3-bit one has two fields)."""
    if bits == 3:
        return [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    return [tuple((4 * j + s) // bits for j in range(4)) for h in (0, 16) for s in range(h, h + 4, bits)]


def table_regs(bits: int) -> int:
    """32-bit registers of one table half (hi or lo bytes): 2**bits bytes, at least one register."""
    return max(1, (1 << bits) // 4)


def _selector_ptx(bits: int, fields: tuple[int, ...]) -> list[str]:
    """PTX putting the index bits of ``fields`` into the selector nibbles of ``s`` (4 bits: low 3 bits)."""
    idx = 7 if bits == 4 else (1 << bits) - 1
    terms: dict[int, int] = {}
    for j, f in enumerate(fields):
        sh = bits * f - 4 * j
        terms[sh] = terms.get(sh, 0) | (idx << (4 * j))
    out = []
    for n, (sh, mask) in enumerate(sorted(terms.items())):
        dst = "s" if n == 0 else "t"
        src = "$1"
        if sh > 0:
            out.append(f"shr.u32 {dst}, $1, {sh}; ")
            src = dst
        elif sh < 0:
            out.append(f"shl.b32 {dst}, $1, {-sh}; ")
            src = dst
        out.append(f"and.b32 {dst}, {src}, {mask}; ")
        if n:
            out.append("or.b32 s, s, t; ")
    return out


def quad_ptx(bits: int, q: int, first: bool) -> str:
    """PTX of quad ``q``. Operands: $0 acc out (fp16x2); $1 word; $2 acc in; then per pair of fields its
    scale pair and activation pair; then the table registers (hi halves, then lo halves); 4 bits: last the
    word shifted left by 4 (computed once per word, outside). ``first``:
    ignore acc in (the partial sum starts at 0)."""
    fields = quad_fields(bits)[q]
    pairs = len(fields) // 2
    r = table_regs(bits)
    tab = 3 + 2 * pairs
    hi = [f"${tab + i}" for i in range(r)]
    lo = [f"${tab + r + i}" for i in range(r)]
    lines = ["{ .reg .b32 s, t, h, l, u, m, p, a; "] + _selector_ptx(bits, fields)
    if bits <= 2:
        lines += [f"prmt.b32 h, {hi[0]}, {lo[0]}, s; ", f"prmt.b32 l, {lo[0]}, {hi[0]}, s; "]
    elif bits == 3:
        lines += [f"prmt.b32 h, {hi[0]}, {hi[1]}, s; ", f"prmt.b32 l, {lo[0]}, {lo[1]}, s; "]
    else:  # entries 8-15 where the code's bit 3 is set: m = 0xff bytes from PRMT's sign-replicate mode
        msel = 0xD9C8 if fields[0] == 0 else 0xFBEA
        lines += [f"prmt.b32 m, ${tab + 2 * r}, $1, {msel}; ",  # last operand: the word << 4 (one per word)
                  f"prmt.b32 h, {hi[0]}, {hi[1]}, s; ", f"prmt.b32 u, {hi[2]}, {hi[3]}, s; ",
                  "lop3.b32 h, h, u, m, 0xD8; ",  # (m & u) | (~m & h)
                  f"prmt.b32 l, {lo[0]}, {lo[1]}, s; ", f"prmt.b32 u, {lo[2]}, {lo[3]}, s; ",
                  "lop3.b32 l, l, u, m, 0xD8; "]
    acc = "$2"
    for i, sel in enumerate((0x5140, 0x7362)[:pairs]):
        s_op, x_op = f"${3 + 2 * i}", f"${4 + 2 * i}"
        lines += [f"prmt.b32 p, l, h, {sel}; ", f"mul.rn.f16x2 p, p, {s_op}; "]
        lines.append(f"mul.rn.f16x2 a, p, {x_op}; " if first and i == 0 else f"fma.rn.f16x2 a, p, {x_op}, {acc}; ")
        acc = "a"
    return "".join(lines) + "mov.b32 $0, a; }"


def quad_constraints(bits: int, q: int) -> str:
    pairs = len(quad_fields(bits)[q]) // 2
    return "=r,r,r" + ",r,r" * pairs + ",r" * (2 * table_regs(bits)) + ",r" * (bits == 4)


_MAXQ = 8
# flat constexpr tables indexed by (FIRST * 5 + BITS) * _MAXQ + q (unused slots empty)
_ASM: tl.constexpr = tl.constexpr(tuple(quad_ptx(b, q, f) if 1 <= b <= 4 and q < len(quad_fields(b)) else ""
                                        for f in (False, True) for b in range(5) for q in range(_MAXQ)))
_CONSTRAINTS: tl.constexpr = tl.constexpr(tuple(quad_constraints(b, q) if 1 <= b <= 4 and q < len(quad_fields(b))
                                                else "" for b in range(5) for q in range(_MAXQ)))
# fields of quad q: FIELDS[BITS * 32 + q * 4 + j] (j < 4; -1 where the quad has two fields)
FIELDS: tl.constexpr = tl.constexpr(tuple((quad_fields(b)[q] + (-1, -1))[j] if 1 <= b <= 4 and q < len(quad_fields(b))
                                           else -1 for b in range(5) for q in range(_MAXQ) for j in range(4)))
NQUADS: tl.constexpr = tl.constexpr(tuple(len(quad_fields(b)) if b else 0 for b in range(5)))


@triton.jit
def f16_bits(v):
    """fp16 tensor → int32 holding its 16 bits (upper half 0)."""
    return v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def pack_f16x2(a, b):
    """Two fp16 tensors → int32 fp16x2 pairs (``a`` in the low half, as PTX's ``.f16x2`` lane 0)."""
    return f16_bits(a) | (f16_bits(b) << 16)


@triton.jit
def half_f16(v, HIGH: tl.constexpr):
    """The low (``HIGH=False``) or high fp16 half of int32 fp16x2 pairs."""
    if HIGH:
        v = v >> 16
    return (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def load_tables(cb_ptr, tab_offs, tab_mask, BITS: tl.constexpr):
    """The hi-byte and lo-byte table registers ``(h0, h1, h2, h3, l0, l1, l2, l3)``: byte ``j`` of ``h_r`` is
    the high byte of entry ``4r + j``. ``tab_offs``: element offsets of each column's table row in the codebook
    (``n · 2**BITS`` for a per-column codebook ``[N, 2**BITS]``, shaped like the columns of a tile), or a
    single 0 (shape ``[1, ..., 1]``) for one shared table: one set of registers for every column. Registers
    past ``table_regs(BITS)`` stay 0."""
    S: tl.constexpr = 1 << BITS
    ptrs = cb_ptr + tab_offs
    msk = tab_mask
    z = tl.zeros(ptrs.shape, tl.int32)
    h0, h1, h2, h3, l0, l1, l2, l3 = z, z, z, z, z, z, z, z
    for e in tl.static_range(S):
        v = f16_bits(tl.load(ptrs + e, mask=msk, other=0.0))
        hb = (v >> 8) << (8 * (e % 4))
        lb = (v & 0xFF) << (8 * (e % 4))
        if e // 4 == 0:
            h0, l0 = h0 | hb, l0 | lb
        elif e // 4 == 1:
            h1, l1 = h1 | hb, l1 | lb
        elif e // 4 == 2:
            h2, l2 = h2 | hb, l2 | lb
        else:
            h3, l3 = h3 | hb, l3 | lb
    return h0, h1, h2, h3, l0, l1, l2, l3


@triton.jit
def _entry(code, h0, h1, h2, h3, l0, l1, l2, l3):
    """fp16 entry ``code`` of the byte tables (plain Triton: what the PRMTs select)."""
    sh = (code & 3) * 8
    hr = tl.where(code < 4, h0, tl.where(code < 8, h1, tl.where(code < 12, h2, h3)))
    lr = tl.where(code < 4, l0, tl.where(code < 8, l1, tl.where(code < 12, l2, l3)))
    v = (((hr >> sh) & 0xFF) << 8) | ((lr >> sh) & 0xFF)
    return v.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _fma_half(code, s2, x2, acc, h0, h1, h2, h3, l0, l1, l2, l3, HIGH: tl.constexpr, FIRST: tl.constexpr):
    """One lane of the asm: round16(round16(entry · s) · x + acc), acc ignored when ``FIRST``."""
    w = (_entry(code, h0, h1, h2, h3, l0, l1, l2, l3).to(tl.float32) * half_f16(s2, HIGH).to(tl.float32)).to(tl.float16)
    prod = w.to(tl.float64) * half_f16(x2, HIGH).to(tl.float64)
    if not FIRST:
        prod = prod + half_f16(acc, HIGH).to(tl.float64)
    return prod.to(tl.float16)


@triton.jit
def quad_dot(words, acc, sA, xA, sB, xB, h0, h1, h2, h3, l0, l1, l2, l3, BITS: tl.constexpr, q: tl.constexpr,
             FIRST: tl.constexpr, ASM: tl.constexpr):
    """``acc + w_a·x_a + w_c·x_c`` (low halves) and ``+ w_b·x_b + w_d·x_d`` (high halves) for the fields
    ``(a, b, c, d)`` of quad ``q`` of ``words`` ``[TILE, BLOCK_N]`` int32; ``acc`` int32 fp16x2 pairs;
    ``sA``/``xA`` the (scale, activation) pairs of fields (a, b), ``sB``/``xB`` of (c, d) (ignored for a
    two-field quad); ``w = round16(entry · scale)``. ``FIRST``: ``acc`` is taken as 0."""
    R: tl.constexpr = 1 if BITS <= 2 else (2 if BITS == 3 else 4)
    PAIRS: tl.constexpr = 1 if FIELDS[BITS * 32 + q * 4 + 2] < 0 else 2
    if ASM:
        if FIRST:
            acc = words  # the asm ignores acc in: no zeroed registers
        if PAIRS == 1:
            args = [words, acc, sA, xA]
        else:
            args = [words, acc, sA, xA, sB, xB]
        if R == 1:
            args = args + [h0, l0]
        elif R == 2:
            args = args + [h0, h1, l0, l1]
        else:  # + the word shifted left by 4 (bit 3 of each code at a byte's msb), shared by both quads
            args = args + [h0, h1, h2, h3, l0, l1, l2, l3, words << 4]
        out = tl.inline_asm_elementwise(_ASM[(FIRST * 5 + BITS) * 8 + q], _CONSTRAINTS[BITS * 8 + q], args,
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        MASK: tl.constexpr = (1 << BITS) - 1
        ca = (words >> (FIELDS[BITS * 32 + q * 4 + 0] * BITS)) & MASK
        cb = (words >> (FIELDS[BITS * 32 + q * 4 + 1] * BITS)) & MASK
        lo = _fma_half(ca, sA, xA, acc, h0, h1, h2, h3, l0, l1, l2, l3, False, FIRST)
        hi = _fma_half(cb, sA, xA, acc, h0, h1, h2, h3, l0, l1, l2, l3, True, FIRST)
        if PAIRS == 2:
            cc = (words >> (FIELDS[BITS * 32 + q * 4 + 2] * BITS)) & MASK
            cd = (words >> (FIELDS[BITS * 32 + q * 4 + 3] * BITS)) & MASK
            acc1 = pack_f16x2(lo, hi)
            lo = _fma_half(cc, sB, xB, acc1, h0, h1, h2, h3, l0, l1, l2, l3, False, False)
            hi = _fma_half(cd, sB, xB, acc1, h0, h1, h2, h3, l0, l1, l2, l3, True, False)
        out = pack_f16x2(lo, hi)
    return out


# ---- the pure-torch reference and the argument checks -------------------------------------------------

def dequantize_lut_reference(qweight: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor, bits: int,
                             group_size: int, k: int) -> torch.Tensor:
    """Float32 ``[K, N]`` weight from *canonical* packed codes: ``codebook[row, code] · scale`` (rule above)."""
    codes = unpack(qweight, bits, k).long()  # [K, N]
    cb = codebook.float()
    entry = cb[0][codes] if cb.shape[0] == 1 else torch.gather(cb.t(), 0, codes)  # cb.t(): [2**bits, N]
    gidx = torch.arange(k, device=codes.device) // group_size
    return entry * scales.float()[gidx]


def lut_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor,
                         bias: torch.Tensor | None, bits: int, group_size: int, k: int) -> torch.Tensor:
    """``x @ W + bias`` in float32 from canonical codes, returned in ``x.dtype`` ([..., K] → [..., N])."""
    y = x.float() @ dequantize_lut_reference(qweight, codebook, scales, bits, group_size, k)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def check_lut_args(x: torch.Tensor, qweight: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None, bits: int, group_size: int, k: int) -> None:
    """Raise ``ValueError`` naming the problem for anything the LUT kernels cannot run."""
    from llmq.kernels._launch import ACT_DTYPES
    from llmq.kernels.dequant_tile import tiled_rows
    if bits not in LUT_BITS:
        raise ValueError(f"unsupported bits {bits}: the lookup-table kernels run {LUT_BITS}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}; cast the input")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, K={k}], got {tuple(x.shape)}")
    if group_size % 16 != 0 and group_size != k:
        raise ValueError(f"group size {group_size} must be a multiple of 16 (or K for per-channel)")
    n = qweight.shape[1] if qweight.dim() == 2 else -1
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] != tiled_rows(k, bits):
        raise ValueError(f"qweight must be the tiled int32 layout [{tiled_rows(k, bits)}, N] "
                         f"(kernels.dequant_tile.repack_tiled), got {qweight.dtype} {tuple(qweight.shape)}")
    if codebook.dtype != torch.float16 or codebook.dim() != 2 or codebook.shape[1] != 1 << bits \
            or codebook.shape[0] not in (1, n):
        raise ValueError(f"codebook must be float16 [1 or N={n}, {1 << bits}], got {codebook.dtype} "
                         f"{tuple(codebook.shape)}")
    g = -(-k // group_size)
    if scales.shape != (g, n) or not scales.is_floating_point():
        raise ValueError(f"scales must be float [{g}, {n}], got {scales.dtype} {tuple(scales.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("codebook", codebook), ("scales", scales), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move the layer to the input's device")
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
