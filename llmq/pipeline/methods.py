"""Per-layer glue between the pipeline and the algorithms: which Linears share an input,
where AWQ's scales fold, and one ``SubgroupQuantizer`` per method.

A decoder layer is quantized *true-sequentially* in sub-groups of Linears that
read the same input, in the order the forward pass reaches them; each
sub-group's statistics are collected with the earlier sub-groups already
quantized, so later Linears compensate for earlier rounding::

    x ─ input_layernorm ─▶ [q_proj k_proj v_proj] ─ attn ─▶ [o_proj] ─(+)─ post_attention_layernorm
      ─▶ [gate_proj up_proj] ─ act·mul ─▶ [down_proj] ─(+)─▶ next layer

Linears of other architectures that this table does not know are quantized one
by one after the known ones (still with statistics from the partly quantized
layer) and AWQ only clips them (no scale folding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmq.algorithms import AWQ, GPTQ, HQQ, RTNClip
from llmq.pipeline.block_loss import BlockOutputLoss
from llmq.quant.primitives import QuantizedWeight, quantize_weight
from llmq.recipes import WeightMethod, WeightRecipe, ZeroPoint

# (Linears reading one input, the module producing that input: AWQ folds 1/s into it,
#  the block whose output scores AWQ's scales: None where that output is the Linear's own).
LLAMA_SUBGROUPS: tuple[tuple[tuple[str, ...], str, str | None], ...] = (
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "self_attn"),
    (("self_attn.o_proj",), "self_attn.v_proj", None),  # only when v_proj's outputs are o_proj's inputs (no GQA)
    (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"),
    (("mlp.down_proj",), "mlp.up_proj", None),  # act(gate(x)) * up(x) is linear in up's rows
)

# MoE experts (llmq.moe.calibrated): an expert routed fewer (token, slot) pairs than this during
# calibration is quantized with the fallback ("pooled": the method on statistics pooled over the
# block's experts; "rtn": round to nearest) — see docs/moe.md for the measurement behind the default
MOE_DEFAULTS: dict[str, Any] = {"expert_min_tokens": 64, "expert_fallback": "pooled"}

# Algorithm parameters each method accepts in ``recipe.method_args`` (with defaults);
# "calibration" records the data used and is not an algorithm parameter.
METHOD_DEFAULTS: dict[WeightMethod, dict[str, Any]] = {
    WeightMethod.RTN: {"clip": None},
    WeightMethod.GPTQ: {"blocksize": 128, "percdamp": 0.01, "act_order": True, "clip_search": True,
                        **MOE_DEFAULTS},
    WeightMethod.AWQ: {"n_grid": 20, "clip": True, "clip_grid": 20, "max_shrink": 0.5,
                       "scale_loss": "block", "block_windows": 16, **MOE_DEFAULTS},
    WeightMethod.HQQ: {"iters": 20, "lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "select_norm": 2.0,
                       "keep": "group"},
}
NEEDS_CALIBRATION = (WeightMethod.GPTQ, WeightMethod.AWQ)


def method_args(recipe: WeightRecipe) -> dict[str, Any]:
    """``recipe.method_args`` merged over the method's defaults; unknown keys raise ``ValueError``."""
    if recipe.method not in METHOD_DEFAULTS:
        hint = {WeightMethod.QAT: " (QAT trains the model: llmq.qat, scripts/qat_finetune.py)",
                WeightMethod.SMOOTHQUANT: " (W8A8: llmq quantize --method smoothquant)"}.get(recipe.method, "")
        raise ValueError(f"method {recipe.method.value!r} does not run in the weight-only layer pipeline{hint}; "
                         f"choose one of {[m.value for m in METHOD_DEFAULTS]}")
    defaults = METHOD_DEFAULTS[recipe.method]
    given = {k: v for k, v in recipe.method_args.items() if k != "calibration"}
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {recipe.method.value} arguments {sorted(unknown)}; allowed: {sorted(defaults)}")
    args = {**defaults, **given}
    if recipe.method is WeightMethod.AWQ:
        if args["scale_loss"] not in ("block", "linear"):
            raise ValueError(f"awq scale_loss must be 'block' (the attention / MLP output, as the reference code) "
                             f"or 'linear' (the Linears' outputs), got {args['scale_loss']!r}")
        if not isinstance(args["block_windows"], int) or args["block_windows"] < 1:
            raise ValueError(f"awq block_windows must be a positive number of calibration windows, "
                             f"got {args['block_windows']!r}")
    if recipe.method in NEEDS_CALIBRATION:
        if args["expert_fallback"] not in ("rtn", "pooled"):
            raise ValueError(f"expert_fallback must be one of ('rtn', 'pooled') (what an MoE expert routed fewer "
                             f"than expert_min_tokens calibration tokens gets), got {args['expert_fallback']!r}")
        if not isinstance(args["expert_min_tokens"], int) or args["expert_min_tokens"] < 0:
            raise ValueError(f"expert_min_tokens must be an integer >= 0, got {args['expert_min_tokens']!r}")
    if recipe.method is WeightMethod.HQQ and args["keep"] not in ("group", "tensor"):
        raise ValueError(f"hqq keep must be 'group' (each group's best zero) or 'tensor' (the reference's one "
                         f"choice per tensor), got {args['keep']!r}")
    return args


@dataclass
class Subgroup:
    names: tuple[str, ...]  # local names inside the decoder layer
    producer: str | None  # module whose output is their input (AWQ folding), if foldable
    block: str | None = None  # module whose output scores AWQ's scales, if not the Linears' own


def plan_subgroups(layer: nn.Module, selected: list[str]) -> list[Subgroup]:
    """Split the selected Linears of ``layer`` (local names, module order) into sequential sub-groups."""
    plan, covered = [], set()
    modules = dict(layer.named_modules())
    for names, producer, block in LLAMA_SUBGROUPS:
        names = tuple(n for n in names if n in selected)
        if not names:
            continue
        k = modules[names[0]].in_features
        prod = modules.get(producer)
        if isinstance(prod, nn.Linear) and prod.out_features != k:
            prod = None  # e.g. v_proj -> o_proj under grouped-query attention
        elif prod is not None and not isinstance(prod, nn.Linear):
            w = getattr(prod, "weight", None)
            prod = prod if isinstance(w, torch.Tensor) and w.shape == (k,) else None
        block = block if isinstance(modules.get(block), nn.Module) else None
        plan.append(Subgroup(names, producer if prod is not None else None, block))
        covered.update(names)
    plan += [Subgroup((n,), None) for n in selected if n not in covered]
    return plan


def fake_quantize_(linear: nn.Linear, qw: QuantizedWeight) -> None:
    """Put the dequantized weight into the float Linear (so the layer runs as quantized)."""
    linear.weight.data = qw.dequantize().to(linear.weight.dtype)


def fold_scales(layer: nn.Module, producer: str, s: torch.Tensor, qweights: dict[str, QuantizedWeight]) -> None:
    """Divide the output channels of ``layer.<producer>`` by ``s`` ``[K]`` (AWQ's folding).

    A norm has its weight (and bias) divided. A Linear that is already quantized
    has its per-row scales divided (codes unchanged; scales re-rounded to fp16);
    an unquantized Linear has its weight rows divided.
    """
    module = layer.get_submodule(producer)
    with torch.no_grad():
        if producer in qweights:
            qw = qweights[producer]
            scales = (qw.scales / s[:, None]).to(torch.float16).float()
            qw.scales = scales.clamp(min=torch.finfo(torch.float16).tiny)
            fake_quantize_(module, qw)
        else:
            w = module.weight
            w.data = (w.float() / (s if w.dim() == 1 else s[:, None])).to(w.dtype)
        if getattr(module, "bias", None) is not None:
            module.bias.data = (module.bias.float() / s).to(module.bias.dtype)


class SubgroupQuantizer:
    """Statistics and quantization for one sub-group of Linears that share an input.

    ``add_batch(x)`` receives the sub-group's input ``[..., K]`` (GPTQ/AWQ only);
    ``quantize(layer, qweights)`` returns ``{local name: QuantizedWeight}`` and,
    for AWQ, folds the scales into the producer.
    """

    def __init__(self, sub: Subgroup, layer: nn.Module, recipe: WeightRecipe, prefix: str) -> None:
        self.sub, self.recipe, self.args = sub, recipe, method_args(recipe)
        self.folded: torch.Tensor | None = None  # AWQ scales divided out of the producer
        # AWQ with scale_loss="block": fed by a pre-hook on ``layer.<sub.block>`` during calibration
        self.block_loss: BlockOutputLoss | None = None
        self.linears = [layer.get_submodule(n) for n in sub.names]
        self.full_names = [f"{prefix}.{n}" for n in sub.names]
        r, a = recipe, self.args
        if r.method is WeightMethod.GPTQ:
            self.algos = [
                GPTQ(lin.weight.data, r.bits, r.group_size, r.symmetric, blocksize=a["blocksize"],
                     percdamp=a["percdamp"], act_order=a["act_order"], clip_search=a["clip_search"], name=name)
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
    def quantize(self, layer: nn.Module, qweights: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
        r, a = self.recipe, self.args
        if r.method is WeightMethod.GPTQ:
            first = self.algos[0]
            for other in self.algos[1:]:
                other.H, other.nsamples = first.H, first.nsamples
            out = [g.quantize() for g in self.algos]
        elif r.method is WeightMethod.AWQ:
            s = None
            if self.sub.producer is not None:
                if self.block_loss is not None:
                    self.block_loss.finish_recording()
                s = self.awq.search_scales(self.block_loss)
                self.block_loss = None  # frees the recorded block inputs
            out = self.awq.quantize(s)
            if s is not None:
                fold_scales(layer, self.sub.producer, s, qweights)
                self.folded = s
        elif r.method is WeightMethod.HQQ:
            out = [HQQ(lin.weight.data, r.bits, r.group_size, r.symmetric, iters=a["iters"],
                       lp_norm=a["lp_norm"], beta=a["beta"], kappa=a["kappa"], select_norm=a["select_norm"],
                       keep=a["keep"], zero_point=(r.zero_point or ZeroPoint.INT).value, name=name).quantize()
                   for lin, name in zip(self.linears, self.full_names)]
        elif a["clip"] is not None:
            out = [RTNClip(lin.weight.data, r.bits, r.group_size, r.symmetric, clip=a["clip"], name=name).quantize()
                   for lin, name in zip(self.linears, self.full_names)]
        else:
            out = [quantize_weight(lin.weight.data, r.bits, r.group_size, r.symmetric, name=name)
                   for lin, name in zip(self.linears, self.full_names)]
        for lin, qw in zip(self.linears, out):
            fake_quantize_(lin, qw)
        return dict(zip(self.sub.names, out))
