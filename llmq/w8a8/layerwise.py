"""The W8A8 layer quantizer (SmoothQuant, static observers, ``W8A8Linear`` swap), run by ``llmq.pipeline.driver``.

::

    for each decoder layer i (the driver materialises it in float32 and hands over its inputs X_i):
        SmoothQuant: run layer i on X_i, hooks record each Linear's max|x| per input channel;
                     fold the factors into the producers its architecture map names (norms / v_proj /
                     up_proj), each fold checked on one batch: its float outputs do not change
        static:      run the smoothed float layer on X_i, observers on its Linears' inputs → act scales
        swap the selected Linears for W8A8Linear
        X_{i+1} = quantized layer_i(X_i), in place of X_i                 (not needed after the last layer)

**Sequential choice.** Layer i+1 is calibrated (SmoothQuant statistics and static
observers) on the outputs of the *quantized* layer i — the inputs it will really
see at inference, int8 rounding of the earlier layers included. ``llmq.ptq``
(prepare / calibrate / convert) instead observes the whole *float* smoothed model in
memory, so the two give different static scales and smoothing factors after layer 0
(layer 0's are the same: both see the same embeddings). Dynamic W8A8 without
SmoothQuant uses no calibration and gives identical checkpoints.

``quantize_layerwise_w8a8`` is deprecated: ``llmq.quantize(folder, ActivationRecipe(...))`` runs this quantizer.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from llmq.algorithms import smoothquant
from llmq.model.swap import set_submodule
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.pipeline.capture import LayerInputs, capture_layer0_inputs, forward_all, layer_output  # noqa: F401
from llmq.pipeline.driver import LayerCounts, run_layerwise
from llmq.pipeline.summary import QuantizationSummary
from llmq.recipes import ActivationRecipe, ActScheme, WeightRecipe
from llmq.w8a8.quantize import absmax_hooks, observer_hooks, static_scales, w8a8_weight_recipe


def needs_calibration(recipe: ActivationRecipe) -> bool:
    """SmoothQuant statistics and static activation scales need calibration data; dynamic W8A8 alone does not."""
    return recipe.smoothquant_alpha is not None or recipe.scheme is ActScheme.STATIC


def check_calibration_batches(recipe: ActivationRecipe, batches: list[torch.Tensor] | None) -> None:
    """Raise ``ValueError`` unless ``batches`` are non-empty ``[b, T]`` token ids (when the recipe needs data)."""
    if not needs_calibration(recipe):
        return
    if not batches:
        raise ValueError("static activation scales and SmoothQuant need calibration data: pass token batches "
                         "(llmq.w8a8.calibration_batches) or use --act-scheme dynamic without --alpha")
    for b in batches:
        if b.dim() != 2 or b.numel() == 0:
            raise ValueError(f"calibration batches must be non-empty [batch, seq_len] token ids, got a batch of "
                             f"shape {tuple(b.shape)}")


class W8A8Quantizer:
    """``LayerQuantizer`` of W8A8: ``recipe`` (scheme, observer, SmoothQuant alpha) on the Linears ``selection``
    picks (default ``w8a8_weight_recipe()``: all but ``lm_head`` / embeddings); ``backend`` forces the
    ``W8A8Linear`` backend."""

    def __init__(self, recipe: ActivationRecipe, selection: WeightRecipe | None = None,
                 backend: str | None = None) -> None:
        self.recipe, self.backend = recipe, backend
        self.selection = selection or w8a8_weight_recipe()
        self.needs_calibration = needs_calibration(recipe)
        self.desc = f"W8A8 {recipe.scheme.value}" + (f" + SmoothQuant {recipe.smoothquant_alpha}"
                                                      if recipe.smoothquant_alpha is not None else "")

    def check(self, layers: nn.ModuleList, prefix: str) -> None:
        if self.recipe.smoothquant_alpha is not None:
            for i, layer in enumerate(layers):
                smoothquant.layer_map(layer, f"{prefix}.{i}")  # on meta: the structure is known before any work

    def memory_mb(self, config, layers, decoder_numel, ids, batch_size) -> dict[str, float]:
        acts_mb = 0.0
        if ids is not None:
            hidden = config.hidden_size
            intermediate = getattr(config, "intermediate_size", 4 * hidden)
            acts_mb = ids.numel() * hidden * 4 / 1e6  # a layer's inputs, replaced by its outputs batch by batch
            batch = min(batch_size, ids.shape[0])
            acts_mb += batch * ids.shape[1] * (3 * intermediate + 4 * hidden) * 4 / 1e6  # one batch inside the layer
        return {"calibration activations": acts_mb,
                "quantized layers": decoder_numel * 1 / 1e6}  # int8 codes (scales: one per row)

    def quantize_layer(self, layer, prefix, inputs, device, advance) -> LayerCounts:
        names = [n for n, m in layer.named_modules()
                 if isinstance(m, nn.Linear) and self.selection.matches(f"{prefix}.{n}")]
        params = sum(layer.get_submodule(n).weight.numel() for n in names)
        n, smoothed = quantize_layer_w8a8(layer, prefix, self.recipe, self.selection, inputs, device, advance,
                                          self.backend)
        return LayerCounts(linears=n, params=params, smoothed=smoothed)

    def summary_fields(self) -> dict:
        r = self.recipe
        return {"scheme": r.scheme.value, "observer": r.observer.value if r.scheme is ActScheme.STATIC else None,
                "alpha": r.smoothquant_alpha}


@torch.no_grad()
def smooth_layer(layer: nn.Module, prefix: str, inputs: LayerInputs, device: torch.device,
                 alpha: float) -> list[str]:
    """SmoothQuant one float decoder ``layer`` in place from its calibration ``inputs``.

    Runs the layer on ``inputs`` with hooks recording every Linear's per-input-channel
    ``max|x|``, then folds the factors (``llmq.algorithms.smoothquant.smooth_layer``), each
    fold checked on the first batch: the layer's float outputs do not change (else
    ``llmq.arch.FoldError``). Returns the smoothed Linears' local names.
    """
    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    with absmax_hooks(layer, names) as stats:
        forward_all(layer, inputs, device)
    return smoothquant.smooth_layer(layer, stats, alpha, prefix, probe=lambda: layer_output(layer, inputs, device))


@torch.no_grad()
def observe_layer(layer: nn.Module, prefix: str, names: list[str], inputs: LayerInputs, device: torch.device,
                  recipe: ActivationRecipe) -> dict[str, torch.Tensor]:
    """Static per-tensor activation scales ``{local name: [] float32}`` of ``names`` in ``layer``.

    Linears reading the same tensor share one observer (decided by tensor identity,
    ``observer_hooks``). A Linear the forward never reaches is a ``ValueError``.
    """
    with observer_hooks(layer, names, recipe) as observers:
        forward_all(layer, inputs, device)
    scales = static_scales({f"{prefix}.{n}": o for n, o in observers.items()}, [f"{prefix}.{n}" for n in names])
    return {n: scales[f"{prefix}.{n}"] for n in names}


@torch.no_grad()
def quantize_layer_w8a8(layer: nn.Module, prefix: str, recipe: ActivationRecipe, weight_recipe: WeightRecipe,
                        inputs: LayerInputs | None, device: torch.device, advance_inputs: bool,
                        backend: str | None = None) -> tuple[int, int]:
    """Smooth, observe and swap the selected Linears of one float decoder ``layer`` for ``W8A8Linear``.

    With ``advance_inputs``, ``inputs`` then become the quantized layer's outputs (the next
    layer's inputs). Returns ``(#W8A8Linear, #smoothed)``.
    """
    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and weight_recipe.matches(f"{prefix}.{n}")]
    smoothed = []
    if recipe.smoothquant_alpha is not None:
        smoothed = smooth_layer(layer, prefix, inputs, device, recipe.smoothquant_alpha)
    scales = observe_layer(layer, prefix, names, inputs, device, recipe) if recipe.scheme is ActScheme.STATIC else {}
    for name in names:
        linear = layer.get_submodule(name)
        set_submodule(layer, name, W8A8Linear.from_linear(linear, scales.get(name), name=f"{prefix}.{name}",
                                                          backend=backend))
    if advance_inputs:
        forward_all(layer, inputs, device, advance=True)
    return len(names), len(smoothed)


def quantize_layerwise_w8a8(folder: str | Path, recipe: ActivationRecipe, batches: list[torch.Tensor] | None,
                            weight_recipe: WeightRecipe | None = None, device: str | torch.device | None = None,
                            max_memory_mb: float | None = None, batch_size: int = 8, progress: bool = True,
                            backend: str | None = None, trust_remote_code: bool = False,
                            ) -> tuple[nn.Module, QuantizationSummary]:
    """Deprecated: ``llmq.quantize(folder, recipe, calibration_ids=torch.cat(batches))`` (same driver, same
    result). ``batches``: ``[b, T]`` token ids of one length ``T``."""
    warnings.warn("llmq.w8a8.quantize_layerwise_w8a8 is deprecated: use llmq.quantize(folder, ActivationRecipe(...), "
                  "calibration_ids=...), the one entry point for every method", DeprecationWarning, stacklevel=2)
    check_calibration_batches(recipe, batches)
    ids = None
    if needs_calibration(recipe):
        if len({b.shape[1] for b in batches}) != 1:
            raise ValueError(f"calibration windows of different lengths {sorted({b.shape[1] for b in batches})}: "
                             f"the layer pipeline takes one [nsamples, seqlen] tensor")
        ids = torch.cat(batches)
    return run_layerwise(folder, W8A8Quantizer(recipe, weight_recipe, backend), ids, device, max_memory_mb,
                         batch_size, progress, trust_remote_code)
