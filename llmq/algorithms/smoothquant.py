"""SmoothQuant (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", eq. 4): migrate activation outliers into weights.

For a Linear ``Y = X W^T`` and any per-input-channel ``s > 0``::

    Y = (X diag(s)^-1) (W diag(s))^T        # exact in real arithmetic

With ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` the activation channels that
carry outliers are divided down and the weights (easy to quantize per output
channel) absorb them; ``alpha`` sets how much difficulty moves (0.5 = balanced).

The division by ``s`` costs nothing at inference because it is folded into the
op that *produces* ``X`` — a norm (``w`` or Gemma's ``1 + w``), ``v_proj`` for ``o_proj``
(with grouped-query attention the query heads that read one KV head share that head's
``s``: factors are computed from the max over the group), ``up_proj`` for ``down_proj``.
Which module produces which Linears' input is the layer's architecture map
(``llmq.arch.maps``); the fold itself, and the check that the layer's float output did
not change, is ``llmq.arch.folding``. A layer with no map is refused (``ValueError`` naming
its class): guessing the wiring from module names silently changes Gemma-style layers.

Tensors/modules in, modules modified in place; ``smooth_layer`` applies all of it to one
decoder layer (the layer-sequential W8A8 pipeline, ``llmq.w8a8.layerwise``),
``smooth_model`` to every layer of a model in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from llmq.arch import MAPS, ArchMap, arch_for, check_map, fold
from llmq.arch.folding import expand_heads, head_groups, reduce_heads

EPS = 1e-5


def smoothing_factors(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s [K]`` float32 for activations with per-channel ``max|X_j|`` ``act_absmax [K]``.

    Args:
        weights: the ``[N_i, K]`` weights that read this activation (their column
            absmax is taken jointly, as they will share one folded ``s``).
        alpha: migration strength in ``[0, 1]``.

    Channels whose activation or weight column is all zero get ``s = 1`` (nothing
    to migrate; avoids 0 ** 0 and division by zero).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    a = act_absmax.float()
    w = torch.stack([wt.detach().float().abs().amax(dim=0) for wt in weights]).amax(dim=0)
    if w.shape != a.shape:
        raise ValueError(f"activation statistics have {a.shape[0]} channels but the weights have {w.shape[0]} "
                         f"input features")
    s = a.clamp(min=EPS).pow(alpha) / w.clamp(min=EPS).pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(min=EPS)


def layer_map(layer: nn.Module, prefix: str) -> ArchMap:
    """The architecture map SmoothQuant folds ``layer`` with (works on ``meta`` too); ``ValueError`` naming
    ``prefix`` and the layer class when it has none."""
    arch = arch_for(layer)
    if arch is None:
        families = ", ".join(sorted({m.family for m in MAPS}))
        raise ValueError(f"{prefix}: SmoothQuant cannot smooth {type(layer).__name__}: it has no architecture map "
                         f"(llmq.arch.maps knows {families}), so which norm or Linear produces each Linear's input "
                         f"is unknown; use --alpha none (W8A8 without smoothing)")
    check_map(arch, layer, prefix)
    return arch


@torch.no_grad()
def smooth_layer(layer: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float, prefix: str = "layer",
                 probe: Callable[[], torch.Tensor] | None = None) -> list[str]:
    """Apply SmoothQuant to one decoder ``layer`` with an architecture map, in place; its float function is
    unchanged.

    Args:
        act_absmax: per-input-channel ``max|X|`` ``[K]`` float32 of the layer's Linears by *local* name
            (the first consumer of each map subgroup is read, e.g. ``"self_attn.q_proj"``), collected on
            this layer before smoothing.
        prefix: the layer's name in the model, for error messages.
        probe: runs the layer on one calibration batch, returns its output: every fold is checked with it
            (``llmq.arch.FoldError`` naming the layer and the producer).
    Returns:
        local names of the Linears whose inputs were smoothed.
    """
    arch = layer_map(layer, prefix)

    def stats(name: str) -> torch.Tensor:
        if name not in act_absmax:
            raise ValueError(f"no activation statistics for {prefix}.{name}: calibration never reached it")
        return act_absmax[name]

    smoothed, before = [], None
    for sub in arch.subgroups:
        weights = [layer.get_submodule(n).weight for n in sub.consumers]
        if sub.heads:  # v -> o: one factor per KV-head channel, from the max over its query heads
            groups, head_dim = head_groups(layer, sub)
            a = reduce_heads(stats(sub.consumers[0]), groups, head_dim)
            w = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
            s = expand_heads(smoothing_factors(a, [reduce_heads(w, groups, head_dim)[None, :]], alpha),
                             groups, head_dim)
        else:
            s = smoothing_factors(stats(sub.consumers[0]), weights, alpha)
        before = fold(layer, sub, s, prefix, probe=probe, before=before)
        smoothed += sub.consumers
    return smoothed


@torch.no_grad()
def smooth_model(model: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float,
                 check_ids: torch.Tensor | None = None) -> list[str]:
    """Apply SmoothQuant to every decoder layer of a model in memory, in place (``smooth_layer``).

    Args:
        act_absmax: per-input-channel ``max|X|`` ``[K]`` of each Linear, by module name
            (e.g. ``"model.layers.0.self_attn.q_proj"``), collected on the float model.
        check_ids: ``[b, T]`` token ids: each layer's inputs on them are captured first and every fold is
            checked on them (``llmq.arch.folding``); ``None`` skips the check.
    Returns:
        names of the Linears whose inputs were smoothed.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("SmoothQuant folding supports decoder-only models with model.model.layers[i] and an "
                         f"architecture map (llmq.arch.maps); {type(model).__name__} has no model.layers")
    for i, layer in enumerate(layers):
        layer_map(layer, f"model.layers.{i}")  # every layer is known before anything changes
    captured = {} if check_ids is None else _layer_inputs(model, layers, check_ids)
    smoothed = []
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}"
        local = {k[len(prefix) + 1:]: v for k, v in act_absmax.items() if k.startswith(prefix + ".")}
        probe = None
        if i in captured:
            args, kwargs = captured[i]
            probe = (lambda layer=layer, args=args, kwargs=kwargs: _first(layer(*args, **kwargs)).float())
        smoothed += [f"{prefix}.{n}" for n in smooth_layer(layer, local, alpha, prefix, probe)]
    return smoothed


# the name llmq.ptq and scripts/ call it by
smooth_llama_layers = smooth_model


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> dict[int, tuple]:
    """``{i: (args, kwargs)}`` each decoder layer's float inputs on ``ids`` (one forward, ``use_cache=False``)."""
    captured = {}
    handles = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: captured.__setitem__(i, (args, dict(kwargs))), with_kwargs=True)
        for i, layer in enumerate(layers)]
    try:
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured
