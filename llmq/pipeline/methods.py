"""Per-layer glue between the pipeline and the algorithms: the sequential sub-groups of a layer
(from its architecture map, ``llmq.arch``) and one ``SubgroupQuantizer`` per method.

A decoder layer is quantized *true-sequentially* in sub-groups of Linears that
read the same input, in the order the forward pass reaches them; each
sub-group's statistics are collected with the earlier sub-groups already
quantized, so later Linears compensate for earlier rounding::

    x ─ input_layernorm ─▶ [q_proj k_proj v_proj] ─ attn ─▶ [o_proj] ─(+)─ post_attention_layernorm
      ─▶ [gate_proj up_proj] ─ act·mul ─▶ [down_proj] ─(+)─▶ next layer        (Llama; other families:
                                                                                  llmq.arch.maps)

Linears the map does not cover (or every Linear of a layer with no map) are quantized
one by one after the mapped ones (still with statistics from the partly quantized
layer); AWQ only clips them, and says so with a warning naming each of them.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from llmq.algorithms import AWQ, GPTQ, HQQ, RTNClip
from llmq.arch import Subgroup as MapSubgroup
from llmq.arch import arch_for, check_map, fold
from llmq.arch.folding import fake_quantize_, head_groups, tie_heads
from llmq.options import OPTIONS, options_for
from llmq.pipeline.block_loss import BlockOutputLoss
from llmq.quant.levels import quantize_weight_levels
from llmq.quant.primitives import QuantizedWeight, quantize_weight
from llmq.recipes import Levels, WeightMethod, WeightRecipe, ZeroPoint

# Algorithm parameters each method accepts in ``recipe.method_args`` (with defaults): the typed options of
# ``llmq.options`` (one frozen dataclass per method, validated there); "calibration" records the data used
# and is not an algorithm parameter.
log = logging.getLogger(__name__)

METHOD_DEFAULTS: dict[WeightMethod, dict[str, Any]] = {m: cls().to_dict() for m, cls in OPTIONS.items()}
NEEDS_CALIBRATION = (WeightMethod.GPTQ, WeightMethod.AWQ)


def method_args(recipe: WeightRecipe) -> dict[str, Any]:
    """``recipe.method_args`` merged over the method's defaults (``llmq.options.options_for``, as a dict);
    an unknown method, key or value raises ``ValueError``, as does a clip that non-uniform levels cannot take."""
    args = options_for(recipe.method, recipe.method_args).to_dict()
    if recipe.levels is not Levels.UNIFORM and recipe.method is WeightMethod.RTN and args["clip"] not in (None, "mse"):
        raise ValueError(f"rtn clip={args['clip']!r} clips a uniform grid; {recipe.levels.value} levels take "
                         "clip=None (absmax scales) or clip='mse' (an error-minimising scale per group)")
    return args


@dataclass
class Subgroup:
    names: tuple[str, ...]  # selected Linears reading one input (local names inside the decoder layer)
    mapped: MapSubgroup | None = None  # its entry in the layer's architecture map (AWQ folds into its producer)
    gqa_clip_only: bool = False  # AWQ's o_proj under GQA without gqa_fold: clipped by choice, not for want of a map

    @property
    def producer(self) -> str | None:
        return None if self.mapped is None else self.mapped.producer.name

    @property
    def block(self) -> str | None:  # module whose output scores AWQ's scales, if not the Linears' own
        return None if self.mapped is None else self.mapped.block


def plan_subgroups(layer: nn.Module, selected: list[str], prefix: str = "layer",
                   gqa_clip_only: bool = False) -> list[Subgroup]:
    """Split the selected Linears of ``layer`` (local names, module order) into sequential sub-groups:
    the map's sub-groups first (``llmq.arch.arch_for``), then every other Linear alone.

    ``gqa_clip_only`` (AWQ without ``gqa_fold``, ``llmq.options.AWQOptions``): the map's ``v → o`` sub-group
    under grouped-query attention is planned with the other Linears, alone and after the mapped ones, and
    AWQ only clips it. The MLP's statistics then come from the float ``o_proj``, as in the reference AWQ
    (every scale searched on the float layer's inputs); on SmolLM2 that order measured better than
    clipping ``o_proj`` in its place (docs/quality.md, "AWQ under GQA").
    """
    plan, covered, deferred = [], set(), set()
    arch = arch_for(layer)
    if arch is not None:
        check_map(arch, layer, prefix)
        for mapped in arch.subgroups:
            names = tuple(n for n in mapped.consumers if n in selected)
            if names and gqa_clip_only and mapped.heads and head_groups(layer, mapped)[0] > 1:
                deferred.update(names)
            elif names:
                plan.append(Subgroup(names, mapped))
                covered.update(names)
    plan += [Subgroup((n,), gqa_clip_only=n in deferred) for n in selected if n not in covered]
    return plan


def warn_clip_only(layer: nn.Module, prefix: str, plan: list[Subgroup]) -> None:
    """AWQ on Linears with no producer to fold into only clips: say so, naming each of them (a warning);
    ``o_proj`` under grouped-query attention without ``gqa_fold`` is a choice, logged at INFO."""
    lone = [f"{prefix}.{n}" for sub in plan if sub.mapped is None and not sub.gqa_clip_only for n in sub.names]
    if lone:
        arch = arch_for(layer)
        why = (f"{type(layer).__name__} has no architecture map (llmq.arch.maps)" if arch is None
               else f"the {arch.family} map has no producer for them")
        warnings.warn(f"AWQ only clips (no activation-aware scales) {len(lone)} Linears because {why}: "
                      f"{', '.join(lone)}", stacklevel=2)
    chosen = [f"{prefix}.{n}" for sub in plan if sub.gqa_clip_only for n in sub.names]
    if chosen:
        log.info("AWQ only clips %s, after the MLP: grouped-query attention and gqa_fold=False (--method-arg "
                 "gqa_fold=true folds scales tied across each KV head's query heads into v_proj)", ", ".join(chosen))


class SubgroupQuantizer:
    """Statistics and quantization for one sub-group of Linears that share an input.

    ``add_batch(x)`` receives the sub-group's input ``[..., K]`` (GPTQ/AWQ only);
    ``quantize(layer, qweights, probe)`` returns ``{local name: QuantizedWeight}`` and,
    for AWQ, folds the scales into the producer (``llmq.arch.folding``, checked with ``probe``).
    """

    def __init__(self, sub: Subgroup, layer: nn.Module, recipe: WeightRecipe, prefix: str) -> None:
        self.sub, self.recipe, self.args, self.prefix = sub, recipe, method_args(recipe), prefix
        self.folded: torch.Tensor | None = None  # AWQ scales divided out of the producer
        # AWQ with scale_loss="block": fed by a pre-hook on ``layer.<sub.block>`` during calibration
        self.block_loss: BlockOutputLoss | None = None
        self.linears = [layer.get_submodule(n) for n in sub.names]
        self.full_names = [f"{prefix}.{n}" for n in sub.names]
        r, a = recipe, self.args
        if r.method is WeightMethod.GPTQ:
            self.algos = [
                GPTQ(lin.weight.data, r.bits, r.group_size, r.symmetric, blocksize=a["blocksize"],
                     percdamp=a["percdamp"], act_order=a["act_order"], clip_search=a["clip_search"], name=name,
                     levels=r.levels.value, error_feedback=a["error_feedback"], refit=a["refit"])
                for lin, name in zip(self.linears, self.full_names)
            ]
        elif r.method is WeightMethod.AWQ:
            self.awq = AWQ([lin.weight.data for lin in self.linears], r.bits, r.group_size, r.symmetric,
                           n_grid=a["n_grid"], clip=a["clip"], clip_grid=a["clip_grid"],
                           max_shrink=a["max_shrink"], names=self.full_names)
            if a["scale_loss"] == "block" and sub.block is not None and sub.producer is not None:
                self.block_loss = BlockOutputLoss(layer.get_submodule(sub.block), self.linears, a["block_windows"],
                                                  name=f"{prefix}.{sub.block}")

    @property
    def needs_data(self) -> bool:
        return self.recipe.method in NEEDS_CALIBRATION

    def add_batch(self, x: torch.Tensor) -> None:
        if self.recipe.method is WeightMethod.GPTQ:
            self.algos[0].add_batch(x)  # one Hessian for the whole sub-group
        elif self.recipe.method is WeightMethod.AWQ:
            self.awq.add_batch(x)

    @torch.no_grad()
    def quantize(self, layer: nn.Module, qweights: dict[str, QuantizedWeight],
                 probe: Callable[[], torch.Tensor] | None = None) -> dict[str, QuantizedWeight]:
        """Quantize the sub-group; ``probe`` runs the float layer on one calibration batch (the fold check)."""
        r, a = self.recipe, self.args
        if r.method is WeightMethod.GPTQ:
            first = self.algos[0]
            for other in self.algos[1:]:
                other.H, other.nsamples = first.H, first.nsamples
            out = [g.quantize() for g in self.algos]
        elif r.method is WeightMethod.AWQ:
            s, mapped = None, self.sub.mapped
            if mapped is not None:
                if self.block_loss is not None:
                    self.block_loss.finish_recording()
                tie = None
                if mapped.heads:  # v -> o: one scale per KV-head channel (GQA)
                    groups, head_dim = head_groups(layer, mapped)
                    tie = lambda x: tie_heads(x, groups, head_dim)  # noqa: E731
                s = self.awq.search_scales(self.block_loss, tie=tie)
                self.block_loss = None  # frees the recorded block inputs
            out = self.awq.quantize(s)
            if s is not None:
                # every consumer is compensated, quantized or excluded; AWQ keeps the unscaled weights
                fold(layer, mapped, s, self.prefix, probe=probe, qweights=qweights)
                self.folded = s
        elif r.method is WeightMethod.HQQ:
            out = [HQQ(lin.weight.data, r.bits, r.group_size, r.symmetric, iters=a["iters"],
                       lp_norm=a["lp_norm"], beta=a["beta"], kappa=a["kappa"], select_norm=a["select_norm"],
                       keep=a["keep"], zero_point=(r.zero_point or ZeroPoint.INT).value, name=name).quantize()
                   for lin, name in zip(self.linears, self.full_names)]
        elif r.levels is not Levels.UNIFORM:  # data free: absmax scales, or searched with clip="mse"
            out = [quantize_weight_levels(lin.weight.data, r.levels, r.bits, r.group_size, search=a["clip"] == "mse",
                                          name=name) for lin, name in zip(self.linears, self.full_names)]
        elif a["clip"] is not None:
            out = [RTNClip(lin.weight.data, r.bits, r.group_size, r.symmetric, clip=a["clip"], name=name).quantize()
                   for lin, name in zip(self.linears, self.full_names)]
        else:
            out = [quantize_weight(lin.weight.data, r.bits, r.group_size, r.symmetric, name=name)
                   for lin, name in zip(self.linears, self.full_names)]
        for lin, qw in zip(self.linears, out):
            fake_quantize_(lin, qw)
        return dict(zip(self.sub.names, out))
