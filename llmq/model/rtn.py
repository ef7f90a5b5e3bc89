"""Round-to-nearest quantization of a whole in-memory model, layer by layer."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmq.model.swap import find_experts_modules, find_linears, group_by_layer, set_submodule
from llmq.moe.quantize import rtn_quantizer, swap_experts
from llmq.nn.quant_linear import QuantLinear
from llmq.quant.levels import quantize_weight_levels
from llmq.quant.primitives import quantize_weight
from llmq.recipes import Levels, WeightRecipe
from llmq.resources import memory_postfix, peak_rss_mb


@dataclass
class QuantizationSummary:
    """What a quantization run did; ``str()`` gives the human-readable table."""

    linears: int
    quantized_params: int
    model_mb_before: float
    model_mb_after: float
    linear_mb_before: float  # the quantized Linears in their float dtype
    linear_mb_after: float  # their packed codes + scales + zeros
    bits_per_weight: float  # effective, scales/zeros included
    seconds: float
    peak_rss_mb: float
    experts_modules: int = 0  # fused MoE expert blocks quantized (their weights are counted above too)
    # per decoder layer, calibrated methods only: experts that fell back for lack of routed tokens
    # {layer: {"fallback": method, "experts": {expert: tokens}}}
    expert_fallbacks: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"quantized {self.linears} linears ({self.quantized_params / 1e6:.1f}M weights) in {self.seconds:.1f} s\n"
            f"  model size     {self.model_mb_before:8.1f} MB -> {self.model_mb_after:8.1f} MB\n"
            f"  linear weights {self.linear_mb_before:8.1f} MB -> {self.linear_mb_after:8.1f} MB "
            f"({self.bits_per_weight:.2f} bits/weight incl. scales and zeros)\n"
            f"  peak RSS       {self.peak_rss_mb:8.1f} MB"
        ) + self._experts_lines()

    def _experts_lines(self) -> str:
        if not self.experts_modules:
            return ""
        lines = [f"\n  MoE            {self.experts_modules} fused expert blocks quantized (included above)"]
        for layer, info in self.expert_fallbacks.items():
            tokens = ", ".join(f"{e}:{t}" for e, t in info["experts"].items())
            lines.append(f"\n    {layer}: {len(info['experts'])} expert(s) below {info['min_tokens']} routed tokens "
                         f"fell back to {info['fallback']} (expert:tokens {tokens})")
        return "".join(lines)


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, counting tied tensors once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def quantize_model_rtn(model: nn.Module, recipe: WeightRecipe, progress: bool = True) -> QuantizationSummary:
    """Replace every ``nn.Linear`` that ``recipe`` selects by a round-to-nearest ``QuantLinear``, and every
    selected fused MoE experts module by a ``QuantExperts`` (``llmq.moe``).

    Modifies ``model`` in place (the caller's copy; source files are never touched).
    Raises ``ValueError`` naming the module if a weight has NaN/Inf, and if the
    recipe selects no Linear at all.
    """
    start = time.perf_counter()
    bytes_before = model_bytes(model)
    linears = find_linears(model, recipe)
    experts = find_experts_modules(model, recipe.matches)  # an unknown experts class fails before any work
    if not linears and not experts:
        raise ValueError(
            f"the recipe selects no nn.Linear (nor MoE experts) in this model (include={list(recipe.include)}, "
            f"exclude={list(recipe.exclude)}); check the patterns against `llmq inspect` module names"
        )
    if experts and recipe.levels is not Levels.UNIFORM:
        raise ValueError(f"{recipe.levels.value} levels are not implemented for fused MoE experts "
                         f"({experts[0][0]!r}): exclude them (--exclude) or use levels='uniform'")
    by_name = dict(linears)
    lin_before = lin_after = params = 0
    groups = group_by_layer([n for n, _ in linears])
    bar = tqdm(groups.items(), desc="quantize (rtn)", unit="layer", disable=not progress)
    for _, names in bar:
        for name in names:
            linear = by_name[name]
            if recipe.levels is Levels.UNIFORM:
                qw = quantize_weight(linear.weight.data, recipe.bits, recipe.group_size, recipe.symmetric, name=name)
            else:
                qw = quantize_weight_levels(linear.weight.data, recipe.levels, recipe.bits, recipe.group_size, name=name)
            qlinear = QuantLinear.from_quantized(qw, linear.bias)
            set_submodule(model, name, qlinear)
            lin_before += linear.weight.numel() * linear.weight.element_size()
            lin_after += qlinear.storage_bytes()
            params += linear.weight.numel()
        bar.set_postfix(memory_postfix())
    n_experts, e_params, e_before, e_after = swap_experts(
        model, recipe.matches, rtn_quantizer(recipe.bits, recipe.group_size, recipe.symmetric))
    params, lin_before, lin_after = params + e_params, lin_before + e_before, lin_after + e_after
    return QuantizationSummary(
        experts_modules=n_experts,
        linears=len(linears),
        quantized_params=params,
        model_mb_before=bytes_before / 1e6,
        model_mb_after=model_bytes(model) / 1e6,
        linear_mb_before=lin_before / 1e6,
        linear_mb_after=lin_after / 1e6,
        bits_per_weight=8 * lin_after / params,
        seconds=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
    )
