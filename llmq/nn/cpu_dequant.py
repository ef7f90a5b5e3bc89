"""Large-M (prefill) path of the ``cpu`` backend: dequantize the held weight to bf16 in column chunks,
then one bf16 GEMM per chunk.

torch's int4 / int8 CPU kernels are tuned for small M: at M = 128 the int4 kernel took 4x fp32's time
for SmolLM2's 576x1536 (``scripts/bench_cpu_prefill.py``), while a bf16 ``torch.mm`` on this AMX-BF16
CPU ran 5x faster than fp32. From ``INT4_MIN_M`` / ``INT8_MIN_M`` rows on, ``CpuBackend.forward`` therefore rebuilds
``W.T`` chunk by chunk and multiplies in bf16; the held layout is unchanged (no second copy of the
weight is kept: each chunk is a temporary of ``K x CHUNK_N``).

Reading the held layouts (``llmq.nn.cpu_layout``):

* int4 pack, AVX-512 (``torch.backends.cpu.get_cpu_capability()`` and a probe, ``block64_layout``):
  rows come in blocks of 64; for each input feature ``k`` a block holds 32 bytes, byte ``d`` carrying
  row ``d`` in its low nibble and row ``d + 32`` in its high one. So ``held.view(N / 64, Kp, 32)``
  unpacks with one ``& 15`` and one ``>> 4`` straight into ``W.T`` order. Other CPUs (AVX2 packs
  32-row blocks differently) and N not a multiple of 64: the kernel runs at every M.
* int8 per channel: ``[N, Kp]`` int8, its transpose is ``W.T`` up to the per-column scale.

Arithmetic (same convention as the kernels, ``llmq.nn.cpu_backend``): int4 pack ``w = q * s' + (z' -
8 s')`` in fp32 from the kernel's bf16 ``s'``, ``z'`` (``q * s'`` exact), rounded once to bf16;
split 8-bit ``w = code * s' + (z' - 128 s')`` with ``code = 16 hi + lo``; int8 ``(x @ q.T) * s'`` (+ the
asymmetric zero term). The extra rounding of ``w`` to bf16 is at most ``u |w_k|``, inside the
``u * sum |x_k| e_k`` term of the backend's bound (``|w_k| <= e_k``), which ``tests/nn/test_cpu_dequant.py``
asserts past the crossover.
"""

from __future__ import annotations

import torch

# Rows of x from which dequantize + bf16 GEMM beats the kernels (scripts/bench_cpu_prefill.py, 1 thread,
# SmolLM2-135M's 576x1536 and 1536x576, best of 15 at load ~9): the int4 kernel costs ~21 us per row there,
# the int4 dequantize ~1 ms per 0.9M weights (+ ~5 us per row of bf16 GEMM): crossover ~M = 50. int8 weights
# only need a convert (~0.5 ms): crossover ~M = 20. Split 8-bit (two int4 calls / two unpacks) as int4.
INT4_MIN_M = 64
INT8_MIN_M = 32
CHUNK_N = 1024  # output columns dequantized at once: a K x 1024 fp32 temporary (2.4 MB at K = 576)
BLOCK_N = 64  # rows per block of the AVX-512 int4 pack

_block64: bool | None = None


def block64_layout() -> bool:
    """True when this machine's int4 pack is the AVX-512 64-row block layout (probed once per process)."""
    global _block64
    if _block64 is None:
        n, kp = 2 * BLOCK_N, 64
        codes = torch.arange(n * kp, dtype=torch.int32).view(n, kp) % 16
        held = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        _block64 = held.shape == (n, kp // 2) and torch.equal(_unpack_t(held).t(), codes.to(torch.uint8))
    return _block64


def _unpack_t(held: torch.Tensor) -> torch.Tensor:
    """``[c, Kp / 2]`` uint8 int4 pack (block-64 layout, c a multiple of 64) → ``[Kp, c]`` uint8 codes."""
    c, kp = held.shape[0], held.shape[1] * 2
    v = held.view(c // BLOCK_N, kp, BLOCK_N // 2)
    out = torch.empty(kp, c // BLOCK_N, BLOCK_N, dtype=torch.uint8)
    out[..., : BLOCK_N // 2] = (v & 15).transpose(0, 1)
    out[..., BLOCK_N // 2:] = (v >> 4).transpose(0, 1)
    return out.view(kp, c)


def use_dequant(layer, m: int, int8_kernel: bool) -> bool:
    """Whether ``m`` rows of x take the dequantize + bf16 GEMM path: past the crossover, and a held
    weight this machine's unpack can read (int8 always; int4 packs in the AVX-512 block-64 layout)."""
    if int8_kernel:
        return m >= INT8_MIN_M
    return m >= INT4_MIN_M and layer.out_features % BLOCK_N == 0 and block64_layout()


def _dequant_chunk(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, d: int) -> torch.Tensor:
    """``[Kp, c]`` uint8 codes, ``[Kp / d, c]`` fp32 scale and offset → ``[Kp, c]`` bf16
    ``codes * scale + offset``."""
    kp, c = codes.shape
    w = codes.view(kp // d, d, c).to(torch.float32)
    w.mul_(scale[:, None]).add_(offset[:, None])
    return w.view(kp, c).to(torch.bfloat16)


def int4_pack_matmul(xb: torch.Tensor, held: torch.Tensor, scale_zeros: tuple[torch.Tensor, ...],
                     d: int) -> torch.Tensor:
    """``xb @ W.T`` for an int4-packed weight, dequantized in chunks of ``CHUNK_N`` columns.

    Args:
        xb: ``[M, Kp]`` bf16 activations (padded features zero).
        held: ``[N, Kp / 2]`` uint8 (``"cpu"`` layout) or ``[2N, Kp / 2]`` (``"cpu-split"``, 8-bit).
        scale_zeros: the kernel's ``[Kp / d, N, 2]`` bf16 ``(s', z')`` (one tensor; two for split 8-bit).
        d: kernel group length along K.

    Returns ``[M, N]`` bf16.
    """
    split = len(scale_zeros) == 2
    n = held.shape[0] // 2 if split else held.shape[0]
    s = scale_zeros[0][..., 0].float()  # [Kp/d, N]
    if split:  # the high pack holds 16 s' and z'; code = 16 hi + lo runs from 0 to 255 around 128
        s = s / 16
        offset = scale_zeros[0][..., 1].float() - 128 * s
    else:
        offset = scale_zeros[0][..., 1].float() - 8 * s
    y = torch.empty(xb.shape[0], n, dtype=torch.bfloat16)
    for n0 in range(0, n, CHUNK_N):
        n1 = min(n, n0 + CHUNK_N)
        codes = _unpack_t(held[n0:n1])
        if split:
            codes = codes * 16 + _unpack_t(held[n + n0:n + n1])  # uint8: 16 hi + lo <= 255
        y[:, n0:n1] = xb @ _dequant_chunk(codes, s[:, n0:n1], offset[:, n0:n1], d)
    return y


def int8_matmul(xb: torch.Tensor, held: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(xb @ q.T) * s'`` for the ``[N, Kp]`` int8 weight, in bf16 column chunks; ``[M, N]`` fp32.

    The int8 codes are exact in bf16; the product is rounded to bf16 once before the scale.
    """
    n = held.shape[0]
    s = scales.float()
    y = torch.empty(xb.shape[0], n, dtype=torch.float32)
    for n0 in range(0, n, CHUNK_N):
        n1 = min(n, n0 + CHUNK_N)
        y[:, n0:n1] = (xb @ held[n0:n1].t().to(torch.bfloat16)).float() * s[n0:n1]
    return y
