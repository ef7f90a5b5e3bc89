"""Layer-sequential W8A8: calibrate, smooth, observe and quantize one decoder layer at a time.

::

    calibration windows ─▶ embeddings ─▶ [pre-hook on layer 0 raises] ─▶ inputs X₀ (+ mask, rotary, …)
    for each decoder layer i:
        materialise layer i from the safetensors files (float32)
        SmoothQuant: run layer i on X_i, hooks record each Linear's max|x| per input channel;
                     fold the factors into the producers its architecture map names (norms / v_proj /
                     up_proj), each fold checked on one batch: its float outputs do not change
        static:      run the smoothed float layer on X_i, observers on its Linears' inputs → act scales
        swap the selected Linears for W8A8Linear
        X_{i+1} = quantized layer_i(X_i), in place of X_i                 (not needed after the last layer)
    materialise the final norm and lm_head

The layer-0 capture, the per-layer forward and the memory plan are the weight-only
pipeline's (``llmq.pipeline.layerwise``); the lazy skeleton and the per-layer reads
are ``llmq.pipeline.lazy``'s.

**Sequential choice.** Layer i+1 is calibrated (SmoothQuant statistics and static
observers) on the outputs of the *quantized* layer i — the inputs it will really
see at inference, int8 rounding of the earlier layers included. The in-memory path
(``llmq.w8a8.quantize.quantize_model_w8a8``) instead observes the whole *float*
smoothed model, so the two give different static scales and smoothing factors after
layer 0 (layer 0's are the same: both see the same embeddings). Dynamic W8A8
without SmoothQuant uses no calibration and gives identical checkpoints.

Memory: the embeddings, one float decoder layer, the calibration activations (one
``[nsamples, seqlen, hidden]`` fp32 copy: a layer's outputs replace its inputs batch
by batch) and the int8 layers done so far — never the float model. ``max_memory_mb`` checks that plan
before any work starts.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmq.algorithms import smoothquant
from llmq.model.rtn import model_bytes
from llmq.model.swap import set_submodule
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.pipeline.layerwise import (
    LayerInputs, capture_layer0_inputs, check_memory_plan, check_selection, default_device, find_decoder_layers,
    forward_all, layer_output,
)
from llmq.pipeline.conversion import ConvertedCheckpoint
from llmq.pipeline.lazy import (
    LazyCheckpoint, empty_model, materialise, materialise_inputs_side, materialise_rest_on_host,
)
from llmq.recipes import ActivationRecipe, ActScheme, WeightRecipe
from llmq.resources import current_rss_mb, memory_postfix, peak_rss_mb, release_freed_memory
from llmq.w8a8.quantize import W8A8Summary, absmax_hooks, observer_hooks, static_scales, w8a8_weight_recipe


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


def _calibration_inputs(model, layers, batches, batch_size, device, store) -> LayerInputs:
    """Decoder layer 0's inputs for every window of ``batches`` (``[b, T]`` each), ``batch_size`` at a time."""
    chunks = [torch.cat(batches)] if len({b.shape[1] for b in batches}) == 1 else batches
    inputs = LayerInputs()
    for ids in chunks:
        part = capture_layer0_inputs(model, layers, ids, batch_size, device, store)
        inputs.hidden += part.hidden
        inputs.kwargs += part.kwargs
    return inputs


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
        forward_all(layer, inputs, device, {}, {"batch": 0, "device": device})
    return smoothquant.smooth_layer(layer, stats, alpha, prefix, probe=lambda: layer_output(layer, inputs, device))


@torch.no_grad()
def observe_layer(layer: nn.Module, prefix: str, names: list[str], inputs: LayerInputs, device: torch.device,
                  recipe: ActivationRecipe) -> dict[str, torch.Tensor]:
    """Static per-tensor activation scales ``{local name: [] float32}`` of ``names`` in ``layer``.

    Linears reading the same tensor share one observer (decided by tensor identity,
    ``observer_hooks``). A Linear the forward never reaches is a ``ValueError``.
    """
    with observer_hooks(layer, names, recipe) as observers:
        forward_all(layer, inputs, device, {}, {"batch": 0, "device": device})
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
        forward_all(layer, inputs, device, {}, {"batch": 0, "device": device}, advance=True)
    return len(names), len(smoothed)


def quantize_layerwise_w8a8(
    folder: str | Path,
    recipe: ActivationRecipe,
    batches: list[torch.Tensor] | None,
    weight_recipe: WeightRecipe | None = None,
    device: str | torch.device | None = None,
    max_memory_mb: float | None = None,
    batch_size: int = 8,
    progress: bool = True,
    backend: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, W8A8Summary]:
    """W8A8-quantize the float model in ``folder`` reading one decoder layer at a time from its safetensors.

    Args:
        folder: Hugging Face model folder (safetensors weights).
        batches: calibration token ids, ``[b, T]`` int64 each (``llmq.w8a8.calibration_batches`` gives
            ``[1, T]`` windows); required for SmoothQuant and static scales, unused otherwise.
        weight_recipe: which Linears (default ``w8a8_weight_recipe()``: all but ``lm_head`` / embeddings);
            they must sit inside the decoder layers.
        device: where layers run (default CUDA when available, else CPU).
        max_memory_mb: memory budget checked before any work (host RSS on CPU, device memory on CUDA).
        batch_size: calibration windows per layer forward (observers still see one window at a time).

    Returns:
        the model (``W8A8Linear`` in the decoder layers, everything else materialised on the host in
        fp32) and a summary. Calibration problems (no data, SmoothQuant on a layer with no architecture map, a recipe
        selecting Linears outside the decoder, a plan over ``max_memory_mb``) raise before any layer is read.
    """
    start = time.perf_counter()
    check_calibration_batches(recipe, batches)
    weight_recipe = weight_recipe or w8a8_weight_recipe()
    device = default_device(device)
    model = empty_model(folder, trust_remote_code)
    ckpt = ConvertedCheckpoint(LazyCheckpoint(folder), model)  # by module name, as from_pretrained converts
    prefix, layers = find_decoder_layers(model)
    check_selection(model, prefix, weight_recipe)
    if recipe.smoothquant_alpha is not None:
        for i, layer in enumerate(layers):
            smoothquant.layer_map(layer, f"{prefix}.{i}")  # on meta: the structure is known before any work
    data = batches if needs_calibration(recipe) else None
    store = _plan(model, ckpt, prefix, len(layers), data, batch_size, device, max_memory_mb)

    materialise_inputs_side(model, ckpt, device)
    inputs = None if data is None else _calibration_inputs(model, layers, data, batch_size, device, store)

    desc = f"W8A8 {recipe.scheme.value}" + (f" + SmoothQuant {recipe.smoothquant_alpha}"
                                             if recipe.smoothquant_alpha is not None else "")
    bar = tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress)
    n_linears = n_smoothed = 0
    for i in bar:
        t0 = time.perf_counter()
        layer = materialise(model, f"{prefix}.{i}", ckpt, device)
        more = inputs is not None and i < len(layers) - 1
        k, s = quantize_layer_w8a8(layer, f"{prefix}.{i}", recipe, weight_recipe, inputs, device,
                                   advance_inputs=more, backend=backend)
        n_linears, n_smoothed = n_linears + k, n_smoothed + s
        if device.type == "cuda":
            layer.to("cpu")  # finished layers wait on the host
        release_freed_memory()
        bar.set_postfix({"layer_s": f"{time.perf_counter() - t0:.1f}", **memory_postfix()})
    del inputs
    materialise_rest_on_host(model, ckpt)  # final norm, head
    summary = W8A8Summary(n_linears, n_smoothed, recipe.scheme.value,
                          recipe.observer.value if recipe.scheme is ActScheme.STATIC else None,
                          recipe.smoothquant_alpha, sum(b.shape[0] for b in data or []),
                          time.perf_counter() - start, peak_rss_mb=peak_rss_mb(),
                          model_mb_before=ckpt.numel() * 4 / 1e6, model_mb_after=model_bytes(model) / 1e6)
    return model, summary


def _plan(model, ckpt, prefix, n_layers, batches, batch_size, device, max_memory_mb) -> torch.device:
    """Check the memory plan against ``max_memory_mb`` (raises before any work); where activations live."""
    cfg = model.config
    hidden = cfg.hidden_size
    inner = tuple(f"{prefix}.{i}." for i in range(n_layers))
    # one layer in fp32, plus as much again for from_linear's working copies
    layer_mb = 2 * max(ckpt.numel(p) for p in inner) * 4 / 1e6
    outer_mb = sum(ckpt.numel(n) for n in ckpt.files if not n.startswith(inner)) * 4 / 1e6
    acts_mb = 0.0
    if batches:
        tokens = sum(b.numel() for b in batches)
        seq = max(b.shape[1] for b in batches)
        intermediate = getattr(cfg, "intermediate_size", 4 * hidden)
        acts_mb = tokens * hidden * 4 / 1e6  # a layer's inputs, replaced by its outputs batch by batch
        batch = min(batch_size, sum(b.shape[0] for b in batches))
        acts_mb += batch * seq * (3 * intermediate + 4 * hidden) * 4 / 1e6  # one batch inside the layer
    quant_mb = ckpt.numel(f"{prefix}.") * 1 / 1e6  # int8 codes (scales: one per row)
    base = current_rss_mb() if device.type == "cpu" else 0.0
    acts_on_host = check_memory_plan(max_memory_mb, {"process": base, "embeddings and head": outer_mb,
                                               "one layer": layer_mb, "calibration activations": acts_mb,
                                               "quantized layers": quant_mb}, device)
    return torch.device("cpu") if acts_on_host else device
