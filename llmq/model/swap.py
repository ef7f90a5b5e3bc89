"""Find the Linears a recipe selects and swap modules in place."""

from __future__ import annotations

import re

from torch import nn

from llmq.recipes import WeightRecipe

_LAYER_PREFIX = re.compile(r"^(.*?\.\d+)\.")


def find_linears(model: nn.Module, recipe: WeightRecipe) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` in ``model`` that ``recipe`` selects, in module order.

    MoE experts stored as fused 3-D parameters (transformers 5.x) are not ``nn.Linear``:
    ``find_experts_modules`` selects those.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and recipe.matches(n)]


def find_experts_modules(model: nn.Module, matches) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every fused-experts module (MoE) that ``matches(name)`` selects.

    Raises ``ValueError`` naming a selected fused-experts class llmq does not know (``llmq.moe.families``).
    """
    from llmq.moe.families import find_experts

    return find_experts(model, matches)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def group_by_layer(names: list[str]) -> dict[str, list[str]]:
    """Group module names by their repeated-block prefix (``model.layers.3``); others by own name.

    Keeps first-seen order, so the groups follow the model's layers.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        m = _LAYER_PREFIX.match(name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    return groups
