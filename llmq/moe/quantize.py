"""Quantize the fused experts of a model with calibration-free methods (RTN, RTN+clip, HQQ) and swap them.

Each expert's two weights are quantized as the ``[N, K]`` weights of ``nn.Linear``s would be
(``gate_up_proj[e]`` is ``[2I, H]``, ``down_proj[e]`` is ``[H, I]``), so every bit width, group
size, symmetric/asymmetric and integer/float zero point of ``QuantLinear`` applies per expert.
Calibrated methods (GPTQ, AWQ) live in ``llmq.moe.calibrated``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmq.moe.families import family_of
from llmq.nn.quant_experts import QuantExpertLinear, QuantExperts
from llmq.quant.primitives import QuantizedWeight, quantize_weight

# (weight [N, K], name) -> QuantizedWeight
WeightQuantizer = Callable[[torch.Tensor, str], QuantizedWeight]


def rtn_quantizer(bits: int, group_size: int | None, symmetric: bool) -> WeightQuantizer:
    return lambda w, name: quantize_weight(w, bits, group_size, symmetric, name=name)


def float_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up [E, 2I, H], down [E, H, I])`` of a fused-experts module of a known family."""
    family = family_of(experts)
    gate_up, down = getattr(experts, family.gate_up), getattr(experts, family.down)
    e = getattr(experts, family.num_experts, gate_up.shape[0])
    if gate_up.shape[0] != e or down.shape[0] != e:
        raise ValueError(f"{type(experts).__name__} declares {e} experts but holds gate_up {tuple(gate_up.shape)} "
                         f"and down {tuple(down.shape)}")
    if gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]:
        raise ValueError(f"{type(experts).__name__}: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} "
                         "are not [E, 2I, H] and [E, H, I]")
    return gate_up.data, down.data


@torch.no_grad()
def quantize_experts(experts: nn.Module, name: str, quantize: WeightQuantizer) -> QuantExperts:
    """A ``QuantExperts`` holding ``quantize(weight, name)`` of each expert's gate_up and down weight."""
    gate_up, down = float_weights(experts)
    gu = [quantize(gate_up[e], f"{name}.gate_up_proj[{e}]") for e in range(gate_up.shape[0])]
    dn = [quantize(down[e], f"{name}.down_proj[{e}]") for e in range(down.shape[0])]
    return build_quant_experts(experts, gu, dn)


def build_quant_experts(experts: nn.Module, gate_up: list[QuantizedWeight],
                        down: list[QuantizedWeight]) -> QuantExperts:
    """Pack per-expert quantized weights into a ``QuantExperts`` replacing the float ``experts``."""
    family = family_of(experts)
    return QuantExperts(QuantExpertLinear.from_quantized(gate_up), QuantExpertLinear.from_quantized(down),
                        getattr(experts, family.act), type(experts).__name__)


def expert_weight_count(experts: nn.Module) -> int:
    gate_up, down = float_weights(experts)
    return gate_up.numel() + down.numel()


@torch.no_grad()
def swap_experts(model: nn.Module, matches, quantize: WeightQuantizer, progress=None) -> tuple[int, int, int, int]:
    """Replace every fused-experts module ``matches(name)`` selects by its ``QuantExperts``.

    Returns ``(#experts modules, #weights, float bytes before, packed bytes after)``.
    Raises ``ValueError`` naming a selected experts class llmq does not know.
    """
    from llmq.model.swap import find_experts_modules, set_submodule

    count = weights = before = after = 0
    for name, experts in find_experts_modules(model, matches):
        gate_up, down = float_weights(experts)
        quantized = quantize_experts(experts, name, quantize)
        set_submodule(model, name, quantized)
        count += 1
        weights += gate_up.numel() + down.numel()
        before += gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size()
        after += quantized.storage_bytes()
    return count, weights, before, after
