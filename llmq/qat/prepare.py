"""Swap a model's selected Linears for fake-quantized ones (``prepare_qat``) and back to packed
``QuantLinear``s when training is done (``convert_qat``)."""

from __future__ import annotations

from torch import nn

from llmq.model.swap import find_linears, set_submodule
from llmq.qat.fake_levels import FakeLevelsLinear
from llmq.qat.fake_quant import FakeQuantLinear, FakeQuantizedLinear
from llmq.recipes import Levels, WeightRecipe, ZeroPoint


def prepare_qat(model: nn.Module, recipe: WeightRecipe) -> list[str]:
    """Replace every Linear ``recipe`` selects by a fake-quantized one (in place); returns their names.

    Only ``recipe.bits``, ``group_size``, ``symmetric`` and ``levels`` matter here: uniform recipes
    get ``FakeQuantLinear`` (asymmetric ones keep integer zeros), non-uniform levels (binary, nf,
    log2, kmeans) ``FakeLevelsLinear``. The learned parameters are the weights and the scales.
    """
    if recipe.zero_point is ZeroPoint.FLOAT:
        raise ValueError("QAT keeps integer zero points (it learns the scales): use zero_point='int' or None")
    linears = find_linears(model, recipe)
    if not linears:
        raise ValueError(f"the recipe selects no nn.Linear (include={list(recipe.include)}, "
                         f"exclude={list(recipe.exclude)})")
    for name, linear in linears:
        if recipe.levels is Levels.UNIFORM:
            fq = FakeQuantLinear(linear, recipe.bits, recipe.group_size, recipe.symmetric, name=name)
        else:
            fq = FakeLevelsLinear(linear, recipe.levels, recipe.bits, recipe.group_size, name=name)
        set_submodule(model, name, fq.to(linear.weight.device))
    return [name for name, _ in linears]


def qat_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(weights and biases, scales)`` of the model's fake-quantized Linears, for two optimizer groups."""
    weights, scales = [], []
    for m in model.modules():
        if isinstance(m, FakeQuantizedLinear):
            weights += [m.weight] + ([m.bias] if m.bias is not None else [])
            scales.append(m.scale)
    return weights, scales


def convert_qat(model: nn.Module) -> int:
    """Replace every fake-quantized Linear by the ``QuantLinear`` it simulates (in place); returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_quant_linear())
    return len(names)
