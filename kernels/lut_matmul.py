"""Entry point of the lookup-table (non-uniform levels) matmul: picks the regime from M.

* M <= 16 — ``lut_gemv`` (split-K decode; register tables and fp16x2 at M = 1 with fp16 activations);
* M > 16 — ``lut_scratch`` (dequantize to the shared scratch buffer, then cuBLAS).

There is no fused LUT GEMM for the middle range: at M > 16 dequantize+cuBLAS pays ~2.5 bytes per weight
of extra traffic once per call, which the uniform kernels' cost report models at ≤ 1.1x cuBLAS from
M ≈ 1024; below that a fused GEMM would be faster (not written; docs/kernels.md).
"""

from __future__ import annotations

import torch

from llmq.kernels.lut_gemv import lut_gemv
from llmq.kernels.lut_lookup import lut_matmul_reference  # noqa: F401  (the reference, re-exported)
from llmq.kernels.lut_scratch import lut_scratch_matmul

DECODE_MAX_M = 16
REGIMES = ("gemv", "scratch")


def lut_regime_for(m: int) -> str:
    return "gemv" if m <= DECODE_MAX_M else "scratch"


def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor,
               bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
               force: str | None = None, split_k: int = 0) -> torch.Tensor:
    """``y = x @ W + bias`` with ``W[k, n] = codebook[0 or n, code[k, n]] · scales[k // group_size, n]``.

    Args:
        x: ``[..., K]`` fp16/bf16/fp32 activations (leading dims flattened to M rows).
        qweight: ``[tiled_rows(K, bits), N]`` int32, the tiled layout (``dequant_tile.repack_tiled``).
        codebook: ``[1, 2**bits]`` (shared) or ``[N, 2**bits]`` (per column) float16.
        scales: ``[G, N]`` float group scales; bias: ``[N]`` or ``None``.
        bits: 1..4; group_size: effective group length (K per channel); in_features: K.
        force: ``"gemv"`` / ``"scratch"`` to bypass the choice by M; split_k: decode K splits (0 = auto).

    Returns ``[..., N]`` in ``x.dtype``.
    """
    if force is not None and force not in REGIMES:
        raise ValueError(f"unknown regime {force!r}: choose one of {REGIMES} or None")
    n = qweight.shape[-1]
    if x.shape[-1] != in_features:
        raise ValueError(f"x must end in K={in_features}, got {tuple(x.shape)}")
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    regime = force or lut_regime_for(m)
    if regime == "gemv":
        if m > DECODE_MAX_M:
            raise ValueError(f"the gemv regime runs M <= {DECODE_MAX_M} rows, got M={m}")
        y = lut_gemv(x2, qweight, codebook, scales, bias, bits, group_size, in_features, split_k)
    else:
        y = lut_scratch_matmul(x2, qweight, codebook, scales, bias, bits, group_size, in_features)
    return y.reshape(*x.shape[:-1], n)
