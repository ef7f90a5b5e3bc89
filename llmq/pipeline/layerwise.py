"""The weight-only layer quantizer (RTN, GPTQ, AWQ, HQQ; fused MoE experts), run by ``llmq.pipeline.driver``.

::

    for each decoder layer i (the driver materialises it and hands over its inputs X_i):
        for each sub-group (q/k/v, o, gate/up, down):         true-sequential (llmq.pipeline.methods)
            run the layer on X_i, hooks feed the sub-group's input to the algorithm, stop early
            quantize the sub-group, write the dequantized weights back (the layer now runs quantized)
        swap the Linears for QuantLinear, quantize the fused experts (llmq.pipeline.experts)
        run the quantized layer: X_{i+1} = layer_i(X_i), in place of X_i

Memory beyond the driver's: the replay caches of o_proj / down_proj inputs (the attention and the MLP are
replayed from them instead of recomputed) and AWQ's block-output loss windows.

``quantize_layerwise`` and ``quantize_model`` are deprecated: ``llmq.quantize`` runs this quantizer.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from llmq.arch import replay_block
from llmq.model.swap import set_submodule
from llmq.nn.quant_linear import QuantLinear
from llmq.pipeline.capture import (  # noqa: F401  (LayerInputs, capture_layer0_inputs: re-exported)
    LayerInputs, StopForward, capture_layer0_inputs, find_decoder_layers, forward_all, layer_output,
)
from llmq.pipeline.driver import LayerCounts, check_memory_plan, run_layerwise  # noqa: F401
from llmq.pipeline.experts import experts_statistics_mb, quantize_layer_experts
from llmq.pipeline.methods import NEEDS_CALIBRATION, SubgroupQuantizer, method_args, plan_subgroups, warn_clip_only
from llmq.pipeline.summary import QuantizationSummary
from llmq.quant.primitives import QuantizedWeight
from llmq.recipes import WeightMethod, WeightRecipe

_StopForward = StopForward


class WeightQuantizer:
    """``LayerQuantizer`` of the weight-only methods: ``recipe`` selects the Linears and the algorithm."""

    def __init__(self, recipe: WeightRecipe) -> None:
        self.args = method_args(recipe)  # unknown method or arguments: ValueError now
        self.selection = self.recipe = recipe
        self.needs_calibration = recipe.method in NEEDS_CALIBRATION
        self.desc = f"quantize ({recipe.method.value})"
        self.moe_report: dict = {}

    def check(self, layers: nn.ModuleList, prefix: str) -> None:
        pass  # the sub-group plan and its map are checked per layer (an unmapped layer is still quantized)

    def memory_mb(self, config, layers, decoder_numel, ids, batch_size) -> dict[str, float]:
        hidden = config.hidden_size
        acts_mb = 0.0
        if ids is not None:  # a layer's inputs (replaced by its outputs) + replay caches: attention and MLP inputs
            acts_mb = ids.numel() * hidden * 4 / 1e6
            acts_mb += ids.numel() * (hidden + getattr(config, "intermediate_size", 4 * hidden)) * 4 / 1e6
            acts_mb += _block_loss_mb(self.recipe, ids, hidden, batch_size)
        # GPTQ / AWQ on fused experts: one [K, K] statistic per expert (llmq.pipeline.experts); layer 0's
        # skeleton gives the shapes (every MoE layer of the families llmq knows has the same experts)
        stats_mb = max(experts_statistics_mb(layer, self.recipe, self.args) for layer in layers)
        return {"calibration activations": acts_mb,
                "quantized layers": decoder_numel * (self.recipe.bits + 1) / 8 / 1e6,  # codes + scales, roughly
                "expert statistics": stats_mb}

    def quantize_layer(self, layer, prefix, inputs, device, advance) -> LayerCounts:
        n, params = quantize_layer(layer, prefix, self.recipe, inputs, device, self.moe_report, advance)
        return LayerCounts(linears=n, params=params)

    def summary_fields(self) -> dict:
        fallbacks = {name: {k: v for k, v in info.items() if k != "tokens"}
                     for name, info in self.moe_report.get("modules", {}).items() if info["experts"]}
        return {"experts_modules": self.moe_report.get("experts_modules", 0), "expert_fallbacks": fallbacks}


@torch.no_grad()
def quantize_layer(layer: nn.Module, prefix: str, recipe: WeightRecipe, inputs: LayerInputs | None,
                   device: torch.device, moe_report: dict | None = None, advance: bool = True) -> tuple[int, int]:
    """Quantize the selected Linears of one decoder ``layer`` in place (swapped for ``QuantLinear``),
    then its fused MoE experts, if any (swapped for ``QuantExperts``; ``llmq.pipeline.experts``).

    With ``advance``, ``inputs`` (when given) then become the quantized layer's outputs, the next layer's
    inputs. Returns ``(#linears, #weights of the linears and experts)``; ``moe_report`` (when
    given) collects ``"experts_modules"`` and, per experts module, its fallbacks and token counts.
    """
    selected = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and recipe.matches(f"{prefix}.{n}")]
    qweights: dict[str, QuantizedWeight] = {}
    replays: dict[str, list[torch.Tensor]] = {}
    state = {"batch": 0, "device": device}
    # replay caches live with the calibration activations (on the host when --max-memory moved them there)
    store = inputs.hidden[0].device if inputs is not None and inputs.hidden else device
    awq = recipe.method is WeightMethod.AWQ
    plan = plan_subgroups(layer, selected, prefix, gqa_clip_only=awq and not method_args(recipe)["gqa_fold"])
    if awq:
        warn_clip_only(layer, prefix, plan)
    probe = None if inputs is None else (lambda: layer_output(layer, inputs, device))
    for sub in plan:
        quantizer = SubgroupQuantizer(sub, layer, recipe, prefix)
        first = sub.names[0]
        cache = [] if replay_block(layer, first) is not None else None
        if quantizer.needs_data:

            def hook(module, args, q=quantizer, cache=cache):
                q.add_batch(args[0])
                if cache is not None:
                    cache.append(args[0].to(store))
                raise _StopForward

            handles = [layer.get_submodule(first).register_forward_pre_hook(hook)]
            if quantizer.block_loss is not None:  # AWQ scored on the attention / MLP output
                block = layer.get_submodule(sub.block)
                handles.append(block.register_forward_pre_hook(quantizer.block_loss.record, with_kwargs=True))
            try:
                forward_all(layer, inputs, device, replays, state)
            finally:
                for handle in handles:
                    handle.remove()
            if cache is not None:
                replays[first] = cache
        qweights.update(quantizer.quantize(layer, qweights, probe))
        if quantizer.folded is not None and sub.producer is not None:
            # AWQ divided the producer of this input by s: the cached inputs shrink alike
            for other, cached in replays.items():
                if other in sub.names:
                    replays[other] = [c / quantizer.folded.to(c.device) for c in cached]
    n_weights = 0
    # CPU: propagate through the fp32 reference (the cpu backend's bf16 path depends on the batch's row count)
    propagate_with = "torch" if device.type == "cpu" else None
    for name in selected:
        linear = layer.get_submodule(name)
        n_weights += linear.weight.numel()
        set_submodule(layer, name, QuantLinear.from_quantized(qweights[name], linear.bias, backend=propagate_with))
    report = {} if moe_report is None else moe_report
    run = None if inputs is None else (lambda: forward_all(layer, inputs, device, replays, state))
    n_experts, e_weights = quantize_layer_experts(layer, prefix, recipe, method_args(recipe), run, _StopForward,
                                                  report.setdefault("modules", {}))
    report["experts_modules"] = report.get("experts_modules", 0) + n_experts
    n_weights += e_weights
    if inputs is not None and advance:
        forward_all(layer, inputs, device, replays, state, advance=True)
    for module in [layer.get_submodule(name) for name in selected]:  # propagated: the automatic backend now
        module.set_backend(None)
        module.prepare()
    return len(selected), n_weights


def _block_loss_mb(recipe: WeightRecipe, calibration_ids: torch.Tensor, hidden: int, batch_size: int) -> float:
    """AWQ's block-output loss keeps a block's inputs and float outputs for ``block_windows`` windows
    (rounded up to whole batches)."""
    args = method_args(recipe) if recipe.method is WeightMethod.AWQ else {}
    if args.get("scale_loss") != "block":
        return 0.0
    n, seqlen = calibration_ids.shape
    windows = min(n, -(-args["block_windows"] // batch_size) * batch_size)
    return 2 * windows * seqlen * hidden * 4 / 1e6



def _deprecated(old: str) -> None:
    warnings.warn(f"{old} is deprecated: use llmq.quantize(model_or_folder, recipe, calibration_ids=...), "
                  f"the one entry point for every method", DeprecationWarning, stacklevel=3)


def quantize_layerwise(folder: str | Path, recipe: WeightRecipe, calibration_ids: torch.Tensor | None = None,
                       device: str | torch.device | None = None, max_memory_mb: float | None = None,
                       batch_size: int = 8, progress: bool = True, trust_remote_code: bool = False,
                       ) -> tuple[nn.Module, QuantizationSummary]:
    """Deprecated: ``llmq.quantize(folder, recipe, calibration_ids=...)`` (same driver, same result)."""
    _deprecated("llmq.pipeline.quantize_layerwise")
    return run_layerwise(folder, WeightQuantizer(recipe), calibration_ids, device, max_memory_mb, batch_size,
                         progress, trust_remote_code)


def quantize_model(model: nn.Module, recipe: WeightRecipe, calibration_ids: torch.Tensor | None = None,
                   device: str | torch.device | None = None, batch_size: int = 8,
                   progress: bool = True) -> QuantizationSummary:
    """Deprecated: ``llmq.quantize(model, recipe, calibration_ids=...)`` (same driver, same result)."""
    _deprecated("llmq.pipeline.quantize_model")
    return run_layerwise(model, WeightQuantizer(recipe), calibration_ids, device, None, batch_size, progress)[1]
