"""Post-training quantization in PyTorch's (torch.ao's) shape: prepare → calibrate → convert.

::

    import llmq.ptq as ptq
    from llmq.recipes import ActivationRecipe

    ptq.prepare(model, ActivationRecipe(scheme="static", observer="kl"))   # observers on every Linear input
    ptq.calibrate(model, batches)      # or run your own forward calls, any number (see SmoothQuant below)
    ptq.convert(model)                 # nn.Linear -> W8A8Linear with the observed scales

Nothing here is a second implementation: ``prepare`` opens the W8A8 driver's own forward
pre-hooks (``llmq.w8a8.quantize.absmax_hooks`` / ``observer_hooks``, the observers of
``llmq.observers``), and ``convert`` calls ``W8A8Linear.from_linear`` with
``static_scales``, exactly as ``quantize_model_w8a8`` does — so the result equals it bit for bit
for the same batches (``tests/test_ptq.py``). Linears reading the same tensor (q/k/v, gate/up)
share one observer, and each ``[b, T, K]`` input counts as ``b`` windows.

SmoothQuant (``recipe.smoothquant_alpha`` set, the default for Llama-style models) needs two
passes: its factors come from every batch's per-channel ``max|x|``, and the static observers must
then see the *smoothed* inputs. ``calibrate`` runs both. With your own forward loop::

    ptq.prepare(model, recipe)
    for x in data: model(x)            # pass 1: per-channel max|x|
    ptq.smooth(model)                  # fold the factors into the norms / v_proj / up_proj
    for x in data: model(x)            # pass 2: static observers on the smoothed inputs
    ptq.convert(model)

A plain ``nn.Sequential`` of Linears works with ``smoothquant_alpha=None`` (SmoothQuant folds
into Llama-style decoder layers only) and float batches ``[..., K]``.

Differences from ``llmq quantize --method smoothquant``: that path reads one decoder layer at a
time from disk and calibrates layer i+1 on the outputs of the *quantized* layers before it
(``llmq.w8a8.layerwise``); prepare/calibrate/convert observe the model you hold, in float, in
whole-model passes (the in-memory path). For a one-layer model, and for dynamic W8A8 without
SmoothQuant, the two give the same modules (tested); deeper models get different static scales
after layer 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from llmq.algorithms.smoothquant import smooth_llama_layers
from llmq.model.swap import find_linears, set_submodule
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.observers import Observer
from llmq.recipes import ActivationRecipe, ActScheme, WeightRecipe
from llmq.w8a8.quantize import absmax_hooks, observer_hooks, static_scales, w8a8_weight_recipe

_ATTR = "_llmq_ptq"

SMOOTH, OBSERVE, READY = "collecting SmoothQuant statistics", "observing activations", "ready to convert"


@dataclass
class PTQState:
    """What ``prepare`` attached to a model (``model._llmq_ptq``); removed by ``convert``."""

    recipe: ActivationRecipe
    names: list[str]
    backend: str | None
    phase: str
    hooks: ExitStack = field(default_factory=ExitStack)
    absmax: dict[str, torch.Tensor] | None = None  # SmoothQuant pass: {name: [K] float32}
    observers: dict[str, Observer] | None = None  # static pass: {name: observer}
    smoothed: list[str] = field(default_factory=list)
    batches: int = 0


def prepare(model: nn.Module, recipe: ActivationRecipe, weight_recipe: WeightRecipe | None = None,
            backend: str | None = None) -> nn.Module:
    """Attach calibration hooks to every ``nn.Linear`` ``weight_recipe`` selects (in place); returns ``model``.

    Args:
        recipe: W8A8 activation recipe (scheme, observer, SmoothQuant alpha, ...).
        weight_recipe: which Linears (default ``w8a8_weight_recipe()``: all but ``lm_head``/embeddings).
        backend: forced ``W8A8Linear`` backend for ``convert`` (default: chosen per device).

    Raises ``ValueError`` for a model already prepared, a recipe that selects no Linear, or SmoothQuant
    on a model without Llama-style decoder layers.
    """
    if not isinstance(recipe, ActivationRecipe):
        raise TypeError(f"recipe must be an llmq.recipes.ActivationRecipe, got {type(recipe).__name__}")
    if hasattr(model, _ATTR):
        raise ValueError("model is already prepared: call llmq.ptq.convert(model) first (or reload it)")
    names = [n for n, _ in find_linears(model, weight_recipe or w8a8_weight_recipe())]
    if not names:
        raise ValueError("the recipe selects no nn.Linear in this model; check include/exclude patterns")
    if recipe.smoothquant_alpha is not None and getattr(getattr(model, "model", None), "layers", None) is None:
        raise ValueError(f"SmoothQuant folds into Llama-style decoder layers (model.model.layers); "
                         f"{type(model).__name__} has none: pass ActivationRecipe(..., smoothquant_alpha=None)")
    model.eval()
    state = PTQState(recipe, names, backend, READY)
    if recipe.smoothquant_alpha is not None:
        state.absmax = state.hooks.enter_context(absmax_hooks(model, names))
        state.phase = SMOOTH
    elif recipe.scheme is ActScheme.STATIC:
        state.observers = state.hooks.enter_context(observer_hooks(model, names, recipe))
        state.phase = OBSERVE
    setattr(model, _ATTR, state)
    return model


def smooth(model: nn.Module, check_ids: torch.Tensor | None = None) -> list[str]:
    """Fold SmoothQuant factors from the batches seen so far; static recipes then observe the next ones.

    ``check_ids`` (``[b, T]`` token ids): every fold is checked on them — the layer's float output must
    not change (``llmq.arch.FoldError`` otherwise). Returns the smoothed Linears' names. Only valid right
    after the first calibration pass.
    """
    state = _state(model)
    if state.phase != SMOOTH:
        raise ValueError(f"nothing to smooth: the model is {state.phase} (SmoothQuant off, or already folded)")
    if not state.absmax:
        raise ValueError("no calibration batch has run through the model yet: run forward calls (or "
                         "llmq.ptq.calibrate) before smoothing")
    state.hooks.close()
    state.smoothed = smooth_llama_layers(model, state.absmax, state.recipe.smoothquant_alpha, check_ids=check_ids)
    state.hooks = ExitStack()
    if state.recipe.scheme is ActScheme.STATIC:
        state.observers = state.hooks.enter_context(observer_hooks(model, state.names, state.recipe))
        state.phase = OBSERVE
    else:
        state.phase = READY
    return state.smoothed


@torch.no_grad()
def calibrate(model: nn.Module, data: Iterable[torch.Tensor]) -> nn.Module:
    """Run ``data`` through a prepared model: both passes when SmoothQuant is on; returns ``model``.

    ``data``: token ids ``[b, T]`` (integer; fed as ``input_ids`` without a KV cache) or float
    inputs ``[..., K]`` for a plain module stack. It is iterated twice with SmoothQuant, so pass
    a list, not a generator.
    """
    state = _state(model)
    data = list(data)
    if not data:
        raise ValueError("calibrate needs at least one batch")
    _run(model, data)
    if state.phase == SMOOTH:
        smooth(model, check_ids=None if data[0].is_floating_point() else data[0])  # folds checked on batch 0
        if state.phase == OBSERVE:
            _run(model, data)
    state.batches += len(data)
    return model


def convert(model: nn.Module) -> nn.Module:
    """Swap every prepared Linear for a ``W8A8Linear`` with the observed static scale (in place).

    Removes the hooks and the attached state; returns ``model``. Raises ``ValueError`` when the
    SmoothQuant factors were collected but not folded, or when a Linear saw no calibration data.
    """
    state = _state(model)
    if state.phase == SMOOTH:
        raise ValueError("SmoothQuant statistics were collected but not folded: call llmq.ptq.smooth(model), run "
                         "the calibration batches again, then convert (llmq.ptq.calibrate does all of this)")
    state.hooks.close()
    scales: dict[str, torch.Tensor] = {}
    if state.recipe.scheme is ActScheme.STATIC:
        scales = static_scales(state.observers, state.names)
    for name in state.names:
        linear = model.get_submodule(name)
        set_submodule(model, name, W8A8Linear.from_linear(linear, scales.get(name), name=name, backend=state.backend))
    delattr(model, _ATTR)
    return model


def _state(model: nn.Module) -> PTQState:
    state = getattr(model, _ATTR, None)
    if state is None:
        raise ValueError("model is not prepared: call llmq.ptq.prepare(model, recipe) first")
    return state


def _run(model: nn.Module, data: list[torch.Tensor]) -> None:
    device = next(model.parameters()).device
    for x in data:
        if x.is_floating_point():
            model(x.to(device))
        else:
            model(input_ids=x.to(device), use_cache=False)
