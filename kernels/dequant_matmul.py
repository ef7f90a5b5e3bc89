"""Entry point of the fused dequantize-matmul: picks the regime from M and the crossover table
(``kernels/crossover.py``): ``gemv`` up to 16 rows, the fused ``gemm`` in the middle, ``scratch``
(dequantize to a reused fp16 buffer, then cuBLAS) from the table's ``scratch_min_m`` on.

The reasoning behind the first boundary (``DECODE_MAX_M = 16``):

* M <= 16 — ``dequant_gemv`` (split-K). Arithmetic intensity is ~2·M FLOP per weight element
  (~4·M FLOP per byte at 4 bits), far below an H100's ~300 FLOP/byte ridge, so time = bytes of
  packed weight / bandwidth; what matters is that every SM streams words, which split-K ensures
  when N / BLOCK_N column blocks alone cannot. 16 is also the smallest tensor-core M tile, so up to
  16 rows one dot per field costs the same as one row.
* M > 16 — ``dequant_gemm`` (tiled, no split-K): enough ``BLOCK_M x BLOCK_N`` output tiles exist to
  fill the GPU, the weight tile is reused across ``BLOCK_M`` rows and the problem turns compute
  bound as M grows (~M = 300 at 4 bits on an H100).

The boundary is a design choice from this reasoning, not a measurement: no GPU was available when
it was written (docs/kernels.md). ``scripts/bench_kernels.py`` times both kernels at every M on
CUDA, so the crossover can be re-checked on real hardware (``force=`` runs either regime).
"""

from __future__ import annotations

import torch

from llmq.kernels import crossover
from llmq.kernels._launch import through_op
from llmq.kernels.dequant_gemm import dequant_gemm, dequant_gemm_launch
from llmq.kernels.dequant_scratch import dequant_scratch_matmul
from llmq.kernels.dequant_gemv import dequant_gemv, dequant_gemv_launch
from llmq.kernels.dequant_tile import dequant_matmul_reference, repack_tiled, tiled_rows  # noqa: F401

DECODE_MAX_M = 16
REGIMES = crossover.REGIMES


def regime_for(m: int, bits: int = 4, k: int = 4096, n: int = 4096, device: torch.device | None = None) -> str:
    """``"gemv"`` (M <= the table's decode bound, never above DECODE_MAX_M), ``"gemm"`` or ``"scratch"``."""
    r = crossover.regime_for(m, bits, k, n, device)
    return "gemm" if r == "gemv" and m > DECODE_MAX_M else r


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                   bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                   force: str | None = None, split_k: int = 0) -> torch.Tensor:
    """``y = x @ dequant(W) + bias`` straight from tiled packed words.

    Args:
        x: ``[..., K]`` fp16/bf16/fp32 activations (any leading shape, flattened to M rows).
        qweight: ``[tiled_rows(K, bits), N]`` int32 (``repack_tiled`` of the canonical qweight).
        scales ``[G, N]`` float, qzeros ``[G, N]`` uint8 (integer zero points) or float (float zero points) or ``None`` (symmetric), bias ``[N]`` or ``None``.
        bits: 2/3/4/8; group_size: effective group length (K per channel); in_features: K.
        force: ``"gemv"`` / ``"gemm"`` / ``"scratch"`` to bypass the table (benchmarks, tests); ``None`` = table.
        split_k: decode K splits (0 = automatic).

    Returns ``[..., N]`` in ``x.dtype``.
    """
    if force is not None and force not in REGIMES:
        raise ValueError(f"unknown regime {force!r}: choose one of {REGIMES} or None")
    n = qweight.shape[-1]
    x2 = x.reshape(-1, in_features) if x.shape[-1] == in_features else x
    if x2.shape[-1] != in_features:
        raise ValueError(f"x must end in K={in_features}, got {tuple(x.shape)}")
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    regime = force or regime_for(m, bits, in_features, n, x.device)
    if regime == "gemv" and m > DECODE_MAX_M:
        raise ValueError(f"the gemv regime runs M <= {DECODE_MAX_M} rows, got M={m}")
    # the torch.library ops when tracing / for gradients, else the plain launchers (same kernels, no
    # dispatcher round trip)
    op = through_op(x2, qweight, scales, qzeros, bias)
    if regime == "gemv":
        y = (dequant_gemv if op else dequant_gemv_launch)(x2, qweight, scales, qzeros, bias, bits, group_size,
                                                          in_features, split_k)
    elif regime == "scratch" and not op:
        y = dequant_scratch_matmul(x2, qweight, scales, qzeros, bias, bits, group_size, in_features)
    else:  # the fused GEMM (also for "scratch" while tracing: the scratch buffer is Python-side state)
        y = (dequant_gemm if op else dequant_gemm_launch)(x2, qweight, scales, qzeros, bias, bits, group_size,
                                                          in_features)
    return y.reshape(*x.shape[:-1], n)
