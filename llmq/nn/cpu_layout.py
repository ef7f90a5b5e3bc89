"""The ``"cpu"`` qweight layout: what torch's built-in CPU kernels read.

* 2/3/4-bit → ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` of the ``[N, Kp]`` codes
  (``Kp = K`` rounded up to a multiple of ``INT4_K_MULTIPLE``, padded codes 0): ``[N, Kp / 2]``
  uint8 in torch's own, CPU-capability-dependent nibble order (AVX-512 interleaves 64-row blocks,
  AVX2 32-row blocks). 2- and 3-bit codes are held as 4-bit codes ``code - 2**(bits-1) + 8`` (the
  middle code lands on the kernel's 8, so a symmetric zero costs no rounding), so the layer's packed
  weight grows 2x (2-bit) or 1.33x (3-bit): still 8x smaller than fp32, and the int4 kernel runs them.
* 8-bit per channel → ``[N, Kp]`` int8 ``code - 128`` (``Kp = K`` rounded up to ``INT8_K_MULTIPLE``, padded
  codes 0): the signed weight ``torch.ops.aten._weight_int8pack_mm`` reads. The kernel reads K
  only in whole 16-element steps (K = 24 gives NaN, K = 7 crashes), hence the padding.
* 8-bit with groups → layout ``"cpu-split"``: two int4 packs, of the codes' high and low nibbles
  (``code = 16 * hi + lo``), ``[2N, Kp / 2]`` uint8 — the same bytes as int8. The int8 kernel has no
  groups; two int4 calls with per-group scales ``16 s`` and ``s`` are exact algebra and, measured,
  faster than fp32 (``docs/cpu_backend.md``).

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
    """Added to llmq's 2/3/4-bit codes in the cpu layout: the middle code lands on the kernel's 8."""
    return INT4_MID - (1 << (bits - 1))


def padded_k(k: int, int8_kernel: bool) -> int:
    """K as held (rounded up to whole kernel steps): 16 for the int8 kernel, 32 for the int4 kernel."""
    m = INT8_K_MULTIPLE if int8_kernel else INT4_K_MULTIPLE
    return -(-k // m) * m


def _codes_nk(canonical: torch.Tensor, bits: int, k: int, int8_kernel: bool) -> torch.Tensor:
    """Canonical words ``[ceil(K / P), N]`` → ``[N, Kp]`` int32 codes, zero-padded along K (padded codes
    meet zero activations: any value works)."""
    codes = unpack(canonical, bits, k).t().to(torch.int32)  # [N, K]
    return torch.nn.functional.pad(codes, (0, padded_k(k, int8_kernel) - k))


def _int4_pack(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)


def _int4_unpack(held: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_int4_pack``: ``[N, Kp / 2]`` uint8 → ``[N, Kp]`` int32 codes."""
    n, kp = held.shape[0], held.shape[1] * 2
    nibbles = torch.stack([held & 15, held >> 4], dim=-1).reshape(-1)  # packed order, low nibble first
    codes = torch.empty(n * kp, dtype=torch.uint8)
    codes[int4_order(n, kp)] = nibbles
    return codes.view(n, kp).to(torch.int32)


def to_cpu(canonical: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Canonical words → the ``"cpu"`` layout (see the module docstring)."""
    if bits == 8:
        return (_codes_nk(canonical, bits, k, True) - INT8_OFFSET).to(torch.int8).contiguous()
    return _int4_pack(_codes_nk(canonical, bits, k, False) + code_shift(bits))


def from_cpu(held: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The ``"cpu"`` layout → canonical words ``[ceil(K / P), N]`` int32, bit-exact."""
    if bits == 8:
        codes = held.to(torch.int32) + INT8_OFFSET  # [N, Kp]
    else:
        codes = _int4_unpack(held) - code_shift(bits)
    return pack(codes[:, :k].t().to(torch.uint8).contiguous(), bits)


def to_cpu_split(canonical: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """8-bit canonical words → the ``"cpu-split"`` layout: ``[2N, Kp / 2]`` uint8, the int4 packs of the
    codes' high nibbles (rows ``:N``) and low nibbles (rows ``N:``)."""
    if bits != 8:
        raise ValueError(f"the cpu-split layout holds 8-bit codes, got {bits}-bit")
    codes = _codes_nk(canonical, bits, k, False)
    return torch.cat([_int4_pack(codes >> 4), _int4_pack(codes & 15)])


def from_cpu_split(held: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The ``"cpu-split"`` layout → canonical 8-bit words, bit-exact."""
    n = held.shape[0] // 2
    codes = _int4_unpack(held[:n]) * 16 + _int4_unpack(held[n:])
    return pack(codes[:, :k].t().to(torch.uint8).contiguous(), bits)


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
