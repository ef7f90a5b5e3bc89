"""Which fused-expert modules of transformers 5.x llmq knows how to quantize, as data.

In transformers 5.x a mixture-of-experts layer keeps its E experts as fused 3-D
parameters (one module, not E ``nn.Linear``s)::

    gate_up_proj  [E, 2·I, H]   rows 0..I-1 = gate_proj, rows I..2I-1 = up_proj of each expert
    down_proj     [E, H, I]
    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
        y[t] = Σ_j w[t, j] · down_e(act(gate_e(x[t])) · up_e(x[t])),   e = top_k_index[t, j]

Each row of ``EXPERT_FAMILIES`` names a class with exactly that wiring (checked by
reading its source in transformers 5.25); an experts class not listed is refused
with its name (``check_experts_module``), never skipped silently: a new family is
added here after checking its forward against this picture (bias? transposed?
interleaved gate/up?).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ExpertsFamily:
    """Attribute names of one fused-experts class (all of them: ``[gate; up]`` concatenated, no bias)."""

    num_experts: str = "num_experts"
    gate_up: str = "gate_up_proj"  # [E, 2I, H]
    down: str = "down_proj"  # [E, H, I]
    act: str = "act_fn"


# class name -> wiring; every entry follows the picture in the module docstring
EXPERT_FAMILIES: dict[str, ExpertsFamily] = {
    "MixtralExperts": ExpertsFamily(),  # Mixtral, MiniMax (model_type mixtral conversion)
    "Qwen3MoeExperts": ExpertsFamily(),
    "Qwen2MoeExperts": ExpertsFamily(),  # its shared expert is a plain MLP of nn.Linear (the Linear swap takes it)
}


def is_fused_experts(module: nn.Module) -> bool:
    """True for a module that holds experts as fused 3-D parameters (known family or not).

    Recognised by a class name ending in ``Experts`` that owns a 3-D parameter directly
    (convolutions, whose weights are 3-D too, are not experts).
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    own_3d = any(p.dim() == 3 for p in module.parameters(recurse=False))
    return own_3d and type(module).__name__.endswith("Experts")


def family_of(module: nn.Module) -> ExpertsFamily:
    """The wiring of a fused-experts ``module``; raises ``ValueError`` naming an unknown class."""
    name = type(module).__name__
    family = EXPERT_FAMILIES.get(name)
    if family is None:
        raise ValueError(
            f"fused-expert module class {name!r} is not one llmq knows how to quantize (knows "
            f"{sorted(EXPERT_FAMILIES)}); exclude it to keep its experts in float (--exclude '*experts*'), "
            f"or add its wiring to llmq.moe.families.EXPERT_FAMILIES after checking its forward")
    return family


def find_experts(model: nn.Module, matches) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every fused-experts module ``matches(name)`` selects, in module order.

    Raises ``ValueError`` for a selected fused-experts module of an unknown class.
    """
    found = []
    for name, module in model.named_modules():
        if is_fused_experts(module) and matches(name):
            family_of(module)  # unknown class: refuse with its name
            found.append((name, module))
    return found
