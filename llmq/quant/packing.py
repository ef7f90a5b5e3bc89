"""Pack unsigned integer codes into int32 words, and back. Pure torch, vectorized.

Layout (the one ``QuantLinear`` stores and every kernel reads)::

    codes   [K, N]  uint8, K = input features, N = output features
    packed  [ceil(K / P), N] int32,  P = codes_per_word(bits)

    packed[r, n] bit field i (bits [i*b, (i+1)*b)) = codes[r*P + i, n]

i.e. ``P`` consecutive input features of one output column share a word, lowest
bits first — for 4 and 8 bits this is exactly GPTQ's ``qweight`` layout. Words
are stored as int32 two's complement (the top field may set the sign bit).

=====  ========  ==============================
bits   P         notes
=====  ========  ==============================
1      32       binary levels (sign codes, ``--levels binary``)
2      16
3      10        bits 30-31 unused (3.2 bits/code); every code stays inside one
                 word so a kernel unpacks any word on its own
4      8
8      4
=====  ========  ==============================

When K is not a multiple of P the last word is filled with ``pad_code``
(callers pass the zero-point code so padded weights dequantize to 0); ``unpack``
takes K back and drops them.
"""

from __future__ import annotations

import torch

_CODES_PER_WORD = {1: 32, 2: 16, 3: 10, 4: 8, 8: 4}


def codes_per_word(bits: int) -> int:
    """How many ``bits``-wide codes one int32 word holds."""
    try:
        return _CODES_PER_WORD[bits]
    except KeyError:
        raise ValueError(f"cannot pack {bits}-bit codes: supported widths are {sorted(_CODES_PER_WORD)}") from None


def packed_rows(k: int, bits: int) -> int:
    """Rows of the packed tensor for K codes: ``ceil(K / P)``."""
    return -(-k // codes_per_word(bits))


def pack(codes: torch.Tensor, bits: int, pad_code: int = 0) -> torch.Tensor:
    """Pack ``[K, N]`` codes along K into ``[ceil(K/P), N]`` int32 words (layout above).

    Raises ``ValueError`` if a code does not fit in ``bits``.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D [K, N] code tensor, got shape {tuple(codes.shape)}")
    p = codes_per_word(bits)
    k, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > (1 << bits) - 1):
        raise ValueError(f"codes out of range for {bits} bits: min {int(c.min())}, max {int(c.max())}")
    rows = packed_rows(k, bits)
    if rows * p != k:
        c = torch.cat([c, c.new_full((rows * p - k, n), pad_code)])
    shifts = torch.arange(p, device=c.device, dtype=torch.int64) * bits  # [P]
    words = (c.reshape(rows, p, n) << shifts[None, :, None]).sum(dim=1)  # [rows, N] int64, fields disjoint
    # reinterpret the low 32 bits as signed int32 (two's complement)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack``: ``[ceil(K/P), N]`` int32 → ``[K, N]`` uint8 codes."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack expects a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    p = codes_per_word(bits)
    rows, n = packed.shape
    if rows != packed_rows(k, bits):
        raise ValueError(f"packed tensor has {rows} rows but K={k} {bits}-bit codes need {packed_rows(k, bits)}")
    shifts = torch.arange(p, device=packed.device, dtype=torch.int32) * bits
    fields = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [rows, P, N]
    return fields.reshape(rows * p, n)[:k].to(torch.uint8)


def pack_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[R, C]`` unsigned codes of each row as one dense little-endian bit stream.

    ``out[r]`` holds ``ceil(C·b / 32)`` int32 words; code ``c`` of row ``r`` occupies bits
    ``[c·b, (c+1)·b)`` of the row's stream, so a field may straddle two words (3-bit codes do).
    This is the layout of GPTQ's ``qweight`` (packed along K, after a transpose) and of
    compressed-tensors' ``pack-quantized`` format; for 2, 4 and 8 bits it equals ``pack``'s
    fields word for word. Bits past the last code are 0.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack_bitstream expects a 2-D [rows, codes] tensor, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bitstream packs 1- to 8-bit codes, got {bits}")
    rows, c = codes.shape
    v = codes.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > (1 << bits) - 1):
        raise ValueError(f"codes out of range for {bits} bits: min {int(v.min())}, max {int(v.max())}")
    words = -(-c * bits // 32)
    start = torch.arange(c, device=v.device, dtype=torch.int64) * bits
    word, offset = (start // 32).expand(rows, c), (start % 32).expand(rows, c)
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=v.device)
    out.scatter_add_(1, word, (v << offset) & 0xFFFFFFFF)  # the field's low part (fields are disjoint)
    out.scatter_add_(1, word + 1, v >> (32 - offset))  # what spills into the next word (0 if nothing)
    out = out[:, :words]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_bitstream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bitstream``: ``[R, ceil(count·b/32)]`` int32 → ``[R, count]`` uint8 codes."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"unpack_bitstream expects a 2-D int32 tensor, got {words.dtype} {tuple(words.shape)}")
    if words.shape[1] != -(-count * bits // 32):
        raise ValueError(f"{words.shape[1]} words per row, but {count} {bits}-bit codes need {-(-count * bits // 32)}")
    w = torch.cat([words.to(torch.int64) & 0xFFFFFFFF, words.new_zeros(words.shape[0], 1, dtype=torch.int64)], 1)
    start = torch.arange(count, device=words.device, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    v = (w[:, word] >> offset) | (w[:, word + 1] << (32 - offset))
    return (v & ((1 << bits) - 1)).to(torch.uint8)
