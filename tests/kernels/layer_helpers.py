"""A ``QuantLinear`` per zero kind for the packed-dequantization tests (fp16x2 and bf16x2)."""

import torch

from llmq.nn.quant_linear import QuantLinear
from llmq.quant.primitives import quantize_weight


def make_layer(k: int, n: int, bits: int, group: int | None, kind: str) -> QuantLinear:
    """Random ``[n, k]`` weight quantized with ``kind`` zeros (``"none"`` symmetric, ``"int"``, ``"float"`` via
    HQQ) and a bias, on the torch backend: the canonical layout held, not the cpu backend's."""
    w = torch.randn(n, k) / k**0.5
    if kind == "float":
        from llmq.algorithms import HQQ
        return QuantLinear.from_quantized(HQQ(w, bits, group, symmetric=False).quantize(), bias=torch.randn(n),
                                          backend="torch")
    return QuantLinear.from_quantized(quantize_weight(w, bits, group, kind == "none"), bias=torch.randn(n),
                                      backend="torch")
