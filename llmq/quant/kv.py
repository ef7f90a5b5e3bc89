"""Quantize / dequantize key and value blocks in the KV-cache layout. Pure torch; THE reference.

The math is ``llmq.quant.primitives`` (``choose_qparams`` / ``quantize`` /
``dequantize``); this module only decides which elements share a group and how
the codes are laid out so the decode-attention kernel can read them directly.

Layout of one cache side (keys or values) holding ``T`` quantized tokens of
``H`` KV heads, head dimension ``D``, ``P = codes_per_word(bits)``::

    codes   [B, H, T // P, D] int32   packed along T: field i of word row w = token w*P + i
                                      (the bit layout of ``llmq.quant.packing.pack``, applied
                                      to the token axis, as GPTQ packs along K)
    per-token  (values; keys with key_axis='token'), groups of g channels:
    scales  [B, H, T, D // g] fp16
    zeros   [B, H, T, D // g] uint8   (asymmetric only; symmetric zero = 2**(bits-1))
    per-channel (keys, KIVI), groups of g consecutive tokens:
    scales  [B, H, T // g, D] fp16
    zeros   [B, H, T // g, D] uint8

Why pack along the tokens: the decode kernel then gets field ``i`` of a
``[BLOCK_W, D]`` block of word rows — the ``[BLOCK_W, D]`` tile of tokens ``w*P + i`` —
with a shift and a mask, no ``[BLOCK_N, D/P, P] → [BLOCK_N, D]`` interleave (which
packing along D needed), and the exact codes go into the attention dots with the
scales folded into q, the scores and p (``kernels/kv_attention.py``, ``docs/kv_cache.md``).
Attention does not care in which order a block's tokens arrive, so each field is one
online-softmax step. The price: tokens are quantized in multiples of ``P``
(``KVRecipe.flush_block``), so ``T`` is always a multiple of ``P`` here.

Scales are rounded up to fp16 by ``choose_qparams`` before the codes are made,
so storing them as fp16 is lossless and ``(code - zero) * scale`` in fp32 is
exact: kernel and reference dequantize to identical values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.quant.packing import codes_per_word, pack, unpack
from llmq.quant.primitives import choose_qparams, dequantize, quantize, symmetric_zero


@dataclass
class QuantizedKVBlock:
    """Codes and parameters of ``T`` tokens of one cache side (layout in the module docstring)."""

    codes: torch.Tensor  # [B, H, T // P, D] int32
    scales: torch.Tensor  # [B, H, T, D // g] or [B, H, T // g, D] fp16
    zeros: torch.Tensor | None  # same shape as scales, uint8; None when symmetric


def pack_tokens(codes: torch.Tensor, bits: int, check_range: bool = True) -> torch.Tensor:
    """Pack uint8 codes ``[B, H, T, D]`` along the token axis into int32 ``[B, H, T // P, D]`` (T % P == 0).

    ``check_range=False`` skips the check that every code fits in ``bits`` (a data-dependent branch, which
    ``torch.compile`` cannot trace): for codes from ``quantize``, which clamps them to ``[0, Qmax]`` by
    construction. Both ways give ``llmq.quant.packing.pack``'s bits exactly (tested).
    """
    b, h, t, d = codes.shape
    p = codes_per_word(bits)
    if t % p:
        raise ValueError(f"{t} tokens is not a multiple of {p} ({bits}-bit codes per int32 word); "
                         f"the cache quantizes tokens in blocks of KVRecipe.flush_block")
    if not check_range:
        return _pack_fields(codes, bits)
    words = pack(codes.permute(2, 0, 1, 3).reshape(t, b * h * d), bits)  # [T // P, B*H*D]
    return words.reshape(t // p, b, h, d).permute(1, 2, 0, 3).contiguous()


def _pack_fields(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack``'s bit layout along dim 2 of ``[B, H, T, D]`` codes in ``[0, 2**bits)``, branch-free."""
    b, h, t, d = codes.shape
    p = codes_per_word(bits)
    shifts = torch.arange(p, device=codes.device, dtype=torch.int64) * bits  # [P]
    words = (codes.to(torch.int64).reshape(b, h, t // p, p, d) << shifts[:, None]).sum(dim=3)  # fields disjoint
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # low 32 bits, signed


def unpack_tokens(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_tokens``: int32 ``[B, H, W, D]`` → uint8 ``[B, H, W * P, D]``."""
    b, h, w, d = words.shape
    t = w * codes_per_word(bits)
    codes = unpack(words.permute(2, 0, 1, 3).reshape(w, b * h * d).contiguous(), bits, t)  # [T, B*H*D]
    return codes.reshape(t, b, h, d).permute(1, 2, 0, 3)


def quantize_per_token(x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedKVBlock:
    """Per-token quantization of ``x [B, H, T, D]``: groups of ``group_size`` channels share a scale.

    Free of data-dependent Python branches (``torch.compile(fullgraph=True)`` traces it)."""
    b, h, t, d = x.shape
    groups = x.float().reshape(b, h, t, d // group_size, group_size)
    scale, zero = choose_qparams(groups, bits, symmetric)  # [B, H, T, D/g]
    codes = quantize(groups, scale[..., None], zero[..., None], bits).reshape(b, h, t, d)
    return QuantizedKVBlock(pack_tokens(codes, bits, check_range=False), scale.to(torch.float16),
                            None if symmetric else zero.to(torch.uint8))


def quantize_per_channel(x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedKVBlock:
    """Per-channel (KIVI) quantization of ``x [B, H, T, D]``, ``T % group_size == 0``:
    each channel of each run of ``group_size`` consecutive tokens shares a scale (traceable, as above)."""
    b, h, t, d = x.shape
    if t % group_size:
        raise ValueError(f"per-channel key quantization needs whole groups of {group_size} tokens, got {t}")
    groups = x.float().reshape(b, h, t // group_size, group_size, d).transpose(-1, -2)  # [B, H, T/g, D, g]
    scale, zero = choose_qparams(groups, bits, symmetric)  # [B, H, T/g, D]
    codes = quantize(groups, scale[..., None], zero[..., None], bits).transpose(-1, -2).reshape(b, h, t, d)
    return QuantizedKVBlock(pack_tokens(codes, bits, check_range=False), scale.to(torch.float16),
                            None if symmetric else zero.to(torch.uint8))


def dequantize_kv(block: QuantizedKVBlock, bits: int, group_size: int, per_channel: bool,
                  n_tokens: int | None = None) -> torch.Tensor:
    """Float32 ``[B, H, T, D]`` from a block (optionally only its first ``n_tokens`` tokens)."""
    p = codes_per_word(bits)
    codes_w = block.codes if n_tokens is None else block.codes[:, :, : -(-n_tokens // p)]
    codes = unpack_tokens(codes_w, bits)  # [B, H, T, D]
    if n_tokens is not None:
        codes = codes[:, :, :n_tokens]
    t, d = codes.shape[2], codes.shape[3]
    if per_channel:
        idx = torch.arange(t, device=codes.device) // group_size
        scale = block.scales[:, :, idx].float()  # [B, H, T, D]
        zero = symmetric_zero(bits) if block.zeros is None else block.zeros[:, :, idx].float()
    else:
        idx = torch.arange(d, device=codes.device) // group_size
        scale = block.scales[:, :, :t][..., idx].float()
        zero = symmetric_zero(bits) if block.zeros is None else block.zeros[:, :, :t][..., idx].float()
    return dequantize(codes, scale, zero)


def kv_block_nbytes(n_tokens: int, batch: int, heads: int, head_dim: int, bits: int, group_size: int,
                    per_channel: bool, symmetric: bool) -> int:
    """Theoretical bytes of ``n_tokens`` quantized tokens of one cache side (codes + scales + zeros)."""
    code_bytes = -(-n_tokens // codes_per_word(bits)) * head_dim * 4  # whole word rows
    n_params = (n_tokens // group_size) * head_dim if per_channel else n_tokens * (head_dim // group_size)
    param_bytes = n_params * (2 + (0 if symmetric else 1))  # fp16 scale + uint8 zero
    return batch * heads * (code_bytes + param_bytes)
