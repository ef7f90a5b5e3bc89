"""The ``"cpu"`` qweight layout: what torch's built-in CPU kernels read.

* 2/3/4-bit → ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` of the ``[N, Kp]`` codes
  (``Kp = K`` rounded up to a multiple of ``INT4_K_MULTIPLE``, padded codes 0): ``[N, Kp / 2]``
  uint8 in torch's own, CPU-capability-dependent nibble order (AVX-512 interleaves 64-row blocks,
  AVX2 32-row blocks). 2- and 3-bit codes are held as 4-bit codes ``code - 2**(bits-1) + 8`` (the
  middle code lands on the kernel's 8, so a symmetric zero costs no rounding), so the layer's packed
  weight grows 2x (2-bit) or 1.33x (3-bit): still 8x smaller than fp32, and the int4 kernel runs them.
* 8-bit → ``[N, Kp]`` int8 ``code - 128`` (``Kp = K`` rounded up to ``INT8_K_MULTIPLE``, padded
  codes 0): the signed weight ``torch.ops.aten._weight_int8pack_mm`` reads. The kernel reads K
  only in whole 16-element steps (K = 24 gives NaN, K = 7 crashes), hence the padding.

Converting back (``to_canonical``, for ``state_dict`` and other backends) unpacks exactly. torch has
no int4 unpack op and its nibble order depends on the CPU, so ``int4_order`` *probes* the pack op:
packing the 4-bit digits of each element's own index tells where every code lands. The probe costs
``ceil(log2(N * Kp) / 4)`` pack calls and an int64 index of N * Kp elements, transiently, once per
conversion back (e.g. 6 packs and 128 MB for a 4096 x 4096 layer).
"""

from __future__ import annotations

import torch

from llmq.quant.packing import pack, unpack

INT4_K_MULTIPLE = 32  # smallest group the int4 kernel takes; K must be a multiple of its group
INT8_K_MULTIPLE = 16  # the int8 kernel's K step
INT8_OFFSET = 128     # unsigned 8-bit code -> signed int8
INT4_MID = 8          # the code the int4 kernel maps to 0 (it computes (q - 8) * scale + zero)


def code_shift(bits: int) -> int:
    """Added to llmq's codes in the cpu layout: the middle code lands on the kernel's zero."""
    return -INT8_OFFSET if bits == 8 else INT4_MID - (1 << (bits - 1))


def padded_k(k: int, bits: int) -> int:
    """K as held in the cpu layout (rounded up to whole kernel steps)."""
    m = INT8_K_MULTIPLE if bits == 8 else INT4_K_MULTIPLE
    return -(-k // m) * m


def _codes_nk(canonical: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Canonical words ``[ceil(K / P), N]`` → ``[N, Kp]`` int32 codes, zero-padded along K."""
    codes = unpack(canonical, bits, k).t().to(torch.int32)  # [N, K]
    return torch.nn.functional.pad(codes, (0, padded_k(k, bits) - k))


def to_cpu(canonical: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Canonical words → the cpu layout (see the module docstring)."""
    codes = _codes_nk(canonical, bits, k) + code_shift(bits)  # padded codes meet x = 0: any value
    if bits == 8:
        return codes.to(torch.int8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)


def from_cpu(held: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The cpu layout → canonical words ``[ceil(K / P), N]`` int32, bit-exact."""
    if bits == 8:
        codes = held.to(torch.int32)  # [N, Kp]
    else:
        n = held.shape[0]
        kp = held.shape[1] * 2
        nibbles = torch.stack([held & 15, held >> 4], dim=-1).reshape(-1)  # packed order, low nibble first
        codes = torch.empty(n * kp, dtype=torch.uint8)
        codes[int4_order(n, kp)] = nibbles
        codes = codes.view(n, kp).to(torch.int32)
    return pack((codes[:, :k] - code_shift(bits)).t().to(torch.uint8).contiguous(), bits)


def int4_order(n: int, kp: int) -> torch.Tensor:
    """``[n * kp]`` int64: the flat ``[n, kp]`` index of the code held at each packed nibble position.

    Found by packing the index itself, 4 bits at a time, with this machine's pack op.
    """
    index = torch.arange(n * kp, dtype=torch.int64)
    order = torch.zeros(n * kp, dtype=torch.int64)
    for shift in range(0, max(1, (n * kp - 1).bit_length()), 4):
        digit = ((index >> shift) & 15).to(torch.int32).view(n, kp)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)
        order |= torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int64) << shift
    return order
