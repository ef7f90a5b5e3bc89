"""GPTQ and AWQ on fused experts, each expert calibrated on the tokens the router sends it.

One MoE block, true-sequential in two stages (the layer's other Linears are already quantized)::

    stage "gate_up":  x [T, H] ── route ──▶ expert e gets x[tokens of e]   → statistics of gate_up_e
                      quantize every gate_up_e; write the dequantized weights back (the block now runs them)
    stage "down":     h_e = act(gate_e(x)) · up_e(x) with the quantized gate_up_e → statistics of down_e
                      quantize every down_e

GPTQ keeps one Hessian per expert (``E·(H² + I²)`` fp32 in all). AWQ searches per-expert
input scales for ``down_e`` and folds them into the rows of ``up_e`` (``act(g)·u`` is linear in
``u``'s rows: exact); ``gate_up_e`` shares its input with every expert and the float router, so
it gets AWQ's clip search weighted by its own tokens' ``XᵀX`` and no scales.

An expert that received fewer than ``min_tokens`` (token, slot) pairs (or none at all) cannot
support a Hessian: it falls back to ``fallback`` — ``"rtn"`` (plain round-to-nearest) or ``"pooled"``
(the method with statistics pooled over all experts of the block) — and is reported.

**Expert subsets bound the memory** (``expert_chunk = c > 0``): each stage runs in ``ceil(E / c)``
passes over the calibration data, a pass holding the statistics of ``c`` experts only (plus the pooled
ones): ``(c + 1)·K²`` fp32 instead of ``(E + 1)·K²`` — for a 128-expert block with K = 2,048 that is
4.3 GB at once, or 0.3 GB with ``c = 8``. Each expert sees exactly the same tokens in the same order,
so the codes are identical to one pass (a test checks it bit for bit); the price is the replay of the
layer up to its experts once per pass. The pooled statistics are collected in a stage's first pass
(every expert's tokens feed them) and kept until its last. All of ``gate_up`` is quantized before
``down`` starts, because the pooled ``down`` statistics read every expert's quantized ``gate_up``.
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.algorithms import AWQ, GPTQ
from llmq.moe.quantize import float_weights
from llmq.nn.quant_experts import route_tokens
from llmq.quant.primitives import QuantizedWeight, quantize_weight
from llmq.recipes import WeightMethod, WeightRecipe

FALLBACKS = ("rtn", "pooled")
STAGES = ("gate_up", "down")


class ExpertsCalibrator:
    """Per-expert statistics and quantization of one fused-experts module (GPTQ or AWQ).

    Per stage and expert subset (``passes()``): ``start(stage, experts)``, then ``add_batch(stage, x,
    top_k_index)`` for every calibration batch (the block's experts input ``x`` ``[T, H]`` and routing
    ``[T, k]``), then ``quantize(stage)``, which quantizes that stage of the subset's experts and
    writes their dequantized weights back into the float module. ``qweights[stage]`` holds one
    ``QuantizedWeight`` per expert once every subset is done, ``tokens`` the routed pairs per expert.
    """

    def __init__(self, experts: nn.Module, name: str, recipe: WeightRecipe, args: dict) -> None:
        if recipe.method not in (WeightMethod.GPTQ, WeightMethod.AWQ):
            raise ValueError(f"ExpertsCalibrator runs gptq or awq, not {recipe.method.value}")
        self.experts, self.name, self.recipe, self.args = experts, name, recipe, args
        self.min_tokens, self.fallback = int(args["expert_min_tokens"]), args["expert_fallback"]
        self.chunk = int(args.get("expert_chunk", 0))
        if self.fallback not in FALLBACKS:
            raise ValueError(f"expert_fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        gate_up, down = float_weights(experts)
        self.weights = {"gate_up": gate_up, "down": down}
        self.num_experts = gate_up.shape[0]
        self.act = experts.act_fn
        self.tokens = torch.zeros(self.num_experts, dtype=torch.long)
        self.qweights: dict[str, list[QuantizedWeight]] = {}
        self.fell_back: dict[int, int] = {}  # expert -> routed pairs, for the summary
        self._algos: dict[str, dict[int, object]] = {}  # stage -> {expert of the current subset: statistics}
        self._pooled: dict[str, object] = {}
        self._first_pass = False  # the current pass also feeds the pooled statistics and counts tokens

    def _make(self, w: torch.Tensor, name: str):
        r, a = self.recipe, self.args
        if r.method is WeightMethod.GPTQ:
            return GPTQ(w, r.bits, r.group_size, r.symmetric, blocksize=a["blocksize"], percdamp=a["percdamp"],
                        act_order=a["act_order"], clip_search=a["clip_search"], name=name)
        return AWQ([w], r.bits, r.group_size, r.symmetric, n_grid=a["n_grid"], clip=a["clip"],
                   clip_grid=a["clip_grid"], max_shrink=a["max_shrink"], names=[name])

    def passes(self) -> list[range]:
        """The expert subsets, one calibration pass each: every expert at once, or ``expert_chunk`` at a time."""
        c = self.chunk if self.chunk > 0 else self.num_experts
        return [range(s, min(s + c, self.num_experts)) for s in range(0, self.num_experts, c)]

    def start(self, stage: str, experts: range) -> None:
        """Allocate the statistics of ``stage`` for ``experts`` (plus the pooled ones on the stage's first pass)."""
        w = self.weights[stage]
        self._algos[stage] = {e: self._make(w[e], f"{self.name}.{stage}[{e}]") for e in experts}
        self._first_pass = experts.start == 0
        if self._first_pass:
            self._pooled[stage] = (self._make(w[0], f"{self.name}.{stage}[pooled]") if self.fallback == "pooled"
                                   else None)
            self.qweights[stage] = [None] * self.num_experts

    @torch.no_grad()
    def add_batch(self, stage: str, x: torch.Tensor, top_k_index: torch.Tensor) -> None:
        k = top_k_index.shape[1]
        order, counts, offsets = route_tokens(top_k_index, self.num_experts)
        if stage == "gate_up" and self._first_pass:
            self.tokens += counts.cpu()
        algos, pooled = self._algos[stage], self._pooled[stage] if self._first_pass else None
        for e in counts.nonzero().flatten().tolist():
            if e not in algos and pooled is None:
                continue
            xe = x[order[offsets[e]:offsets[e + 1]] // k].float()
            if stage == "down":  # the expert's intermediate activations, through its quantized gate_up
                gate, up = (xe @ self.weights["gate_up"][e].float().T).chunk(2, dim=-1)
                xe = self.act(gate) * up
            if e in algos:
                algos[e].add_batch(xe)
            if pooled is not None:
                pooled.add_batch(xe)

    @torch.no_grad()
    def quantize(self, stage: str) -> None:
        """Quantize the current subset's experts; the stage's last subset also frees the pooled statistics."""
        r, w = self.recipe, self.weights[stage]
        for e, algo in self._algos[stage].items():
            n = int(self.tokens[e])
            if n < max(self.min_tokens, 1):  # an expert no token reached has no statistics at all
                self.fell_back[e] = n
                pooled = self._pooled[stage]
                if self.fallback == "rtn" or pooled.nsamples == 0:  # (no token reached the whole block: RTN)
                    qw = quantize_weight(w[e], r.bits, r.group_size, r.symmetric, name=f"{self.name}[{e}]")
                    self._store(stage, e, qw)
                    continue
                if r.method is WeightMethod.GPTQ:
                    algo.H, algo.nsamples = pooled.H.clone(), pooled.nsamples
                else:
                    algo.H, algo.x_abs_sum, algo.nsamples = pooled.H, pooled.x_abs_sum, pooled.nsamples
            self._store(stage, e, self._quantize_one(stage, e, algo))
        last = max(self._algos[stage], default=-1) == self.num_experts - 1
        self._algos[stage] = {}  # frees the statistics
        if last:
            self._pooled[stage] = None

    def _store(self, stage: str, e: int, qw: QuantizedWeight) -> None:
        self.qweights[stage][e] = qw
        w = self.weights[stage]
        w[e].copy_(qw.dequantize().to(w.dtype))  # the block now runs the quantized weight

    def _quantize_one(self, stage: str, e: int, algo) -> QuantizedWeight:
        if self.recipe.method is WeightMethod.GPTQ:
            return algo.quantize()
        if stage == "gate_up" or algo.nsamples == 0:
            return algo.quantize(None)[0]  # clip search weighted by this expert's tokens, no scales
        s = algo.search_scales()  # [I]: down_e's input channels = up_e's output rows
        qw = algo.quantize(s)[0]
        # fold 1/s into up_e: rows I..2I-1 of the quantized gate_up_e (codes kept, scales re-rounded to fp16)
        up = self.qweights["gate_up"][e]
        i = s.shape[0]
        scales = up.scales.clone()
        scales[i:] = (scales[i:] / s[:, None]).to(torch.float16).float().clamp(min=torch.finfo(torch.float16).tiny)
        up.scales = scales
        self.weights["gate_up"][e].copy_(up.dequantize().to(self.weights["gate_up"].dtype))
        return qw
