"""The MoE part of one decoder layer in the layer pipeline: quantize its fused experts, swap in ``QuantExperts``.

Runs after the layer's Linears (attention, shared experts) are quantized, so the experts are
calibrated on what the partly quantized layer feeds them. The router stays in float.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmq.algorithms import HQQ, RTNClip
from llmq.model.swap import find_experts_modules, set_submodule
from llmq.moe.calibrated import STAGES, ExpertsCalibrator
from llmq.moe.quantize import build_quant_experts, float_weights, quantize_experts, rtn_quantizer
from llmq.recipes import WeightMethod, WeightRecipe, ZeroPoint


def experts_statistics_mb(layer: nn.Module, recipe: WeightRecipe, args: dict) -> float:
    """fp32 MB of per-expert statistics GPTQ / AWQ hold for the largest stage of ``layer``'s experts."""
    if recipe.method not in (WeightMethod.GPTQ, WeightMethod.AWQ):
        return 0.0
    total = 0.0
    for _, experts in find_experts_modules(layer, lambda n: True):
        gate_up, down = float_weights(experts)
        e, k_max = gate_up.shape[0], max(gate_up.shape[2], down.shape[2])
        held = min(e, args["expert_chunk"]) if args["expert_chunk"] > 0 else e  # experts per calibration pass
        pooled = 1 if args["expert_fallback"] == "pooled" else 0
        total += (held + pooled) * k_max * k_max * 4 / 1e6
    return total


def weight_quantizer(recipe: WeightRecipe, args: dict):
    """``(w [N, K], name) -> QuantizedWeight`` for the calibration-free methods."""
    r = recipe
    if r.method is WeightMethod.HQQ:
        return lambda w, name: HQQ(w, r.bits, r.group_size, r.symmetric, iters=args["iters"], lp_norm=args["lp_norm"],
                                   beta=args["beta"], kappa=args["kappa"], select_norm=args["select_norm"],
                                   keep=args["keep"], zero_point=(r.zero_point or ZeroPoint.INT).value,
                                   name=name).quantize()
    if r.method is WeightMethod.RTN and args.get("clip") is not None:
        return lambda w, name: RTNClip(w, r.bits, r.group_size, r.symmetric, clip=args["clip"], name=name).quantize()
    return rtn_quantizer(r.bits, r.group_size, r.symmetric)


@torch.no_grad()
def quantize_layer_experts(layer: nn.Module, prefix: str, recipe: WeightRecipe, args: dict,
                           run_layer: Callable[[], None] | None, stop: type[Exception],
                           report: dict) -> tuple[int, int]:
    """Quantize every selected fused-experts module of ``layer`` and swap it for ``QuantExperts``.

    Args:
        run_layer: runs the layer on every calibration batch (hooks observe); ``None`` without data.
        stop: the exception ``run_layer`` treats as "this batch is done" (raised once the experts' input is seen).
        report: filled per experts module with its fallbacks (calibrated methods) and token counts.

    Returns ``(#experts modules, #weights)``.
    """
    selected = find_experts_modules(layer, lambda n: recipe.matches(f"{prefix}.{n}"))
    if selected and recipe.levels.value != "uniform":
        raise ValueError(f"{recipe.levels.value} levels are not implemented for fused MoE experts "
                         f"({prefix}.{selected[0][0]}): exclude them (--exclude) or use levels='uniform'")
    weights = 0
    for local, experts in selected:
        name = f"{prefix}.{local}"
        gate_up, down = float_weights(experts)
        weights += gate_up.numel() + down.numel()
        if recipe.method not in (WeightMethod.GPTQ, WeightMethod.AWQ):
            set_submodule(layer, local, quantize_experts(experts, name, weight_quantizer(recipe, args)))
            continue
        if run_layer is None:
            raise ValueError(f"{name}: {recipe.method.value} needs calibration data for the experts")
        cal = ExpertsCalibrator(experts, name, recipe, args)
        for stage in STAGES:  # every subset of gate_up before down (the pooled down statistics read them all)
            for subset in cal.passes():
                cal.start(stage, subset)

                def hook(module, hook_args, kwargs, stage=stage):
                    x, top_k_index = hook_args[0], hook_args[1]
                    cal.add_batch(stage, x, top_k_index)
                    raise stop

                handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
                try:
                    run_layer()
                finally:
                    handle.remove()
                cal.quantize(stage)
        report[name] = {"fallback": cal.fallback, "min_tokens": cal.min_tokens,
                        "experts": {e: n for e, n in sorted(cal.fell_back.items())},
                        "tokens": cal.tokens.tolist()}
        set_submodule(layer, local, build_quant_experts(experts, cal.qweights["gate_up"], cal.qweights["down"]))
    return len(selected), weights
