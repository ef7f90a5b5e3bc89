"""The one layer-wise driver: every method (RTN, GPTQ, AWQ, HQQ, W8A8) walks the decoder layers here.

::

    llmq quantize / llmq.quantize(model_or_path, recipe)                     (llmq.api)
      └─ run_layerwise(source, quantizer, calibration_ids)                   (this module)
           lazy skeleton (a folder) or the model in memory
           quantizer.check(layers)              refuse before any work (selection, maps, on meta)
           memory plan vs max_memory_mb         refuse before any work; CUDA: activations to the host
           layer-0 capture (llmq.pipeline.capture)      only when the quantizer needs calibration data
           for each decoder layer i:
               materialise layer i (from the safetensors, or move it to ``device``)
               quantizer.quantize_layer(layer_i, X_i)  ─▶ Linears swapped; X_{i+1} in place of X_i
               offload (CUDA: the finished layer waits on the host), release freed memory
           materialise the final norm and lm_head (a folder)
      └─ QuantizationSummary (llmq.pipeline.summary)

A *layer quantizer* is whatever satisfies ``LayerQuantizer``: the weight-only methods
(``llmq.pipeline.layerwise.WeightQuantizer``: GPTQ / AWQ / HQQ / RTN, MoE experts through
``llmq.pipeline.experts``) and W8A8 (``llmq.w8a8.layerwise.W8A8Quantizer``: smooth, observe, swap).

Memory: the embeddings, one float decoder layer, the calibration activations (one
``[nsamples, seqlen, hidden]`` fp32 copy, a layer's outputs replacing its inputs batch by batch, plus what
the quantizer caches) and the quantized layers done so far — never the float model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from llmq.model.swap import find_experts_modules
from llmq.pipeline.capture import LayerInputs, capture_layer0_inputs, find_decoder_layers
from llmq.pipeline.conversion import ConvertedCheckpoint
from llmq.pipeline.lazy import LazyCheckpoint, empty_model, materialise, materialise_inputs_side, materialise_rest_on_host
from llmq.pipeline.summary import QuantizationSummary, model_bytes, summarize
from llmq.recipes import WeightRecipe
from llmq.resources import current_rss_mb, memory_postfix, release_freed_memory


@dataclass
class LayerCounts:
    """What one ``quantize_layer`` call did (summed over the layers into the summary)."""

    linears: int = 0  # Linears swapped for a quantized module
    params: int = 0  # weights quantized, fused experts included
    smoothed: int = 0  # Linears whose inputs SmoothQuant rescaled


class LayerQuantizer(Protocol):
    """One method's work on one decoder layer; ``run_layerwise`` does everything else."""

    selection: WeightRecipe  # which Linears (include / exclude, by full module name)
    needs_calibration: bool  # capture layer 0's inputs and hand every layer its inputs
    desc: str  # progress bar label

    def check(self, layers: nn.ModuleList, prefix: str) -> None:
        """Refuse (``ValueError``) before any work; ``layers`` may still be on ``meta``."""

    def memory_mb(self, config, layers: nn.ModuleList, decoder_numel: int, ids: torch.Tensor | None,
                  batch_size: int) -> dict[str, float]:
        """The quantizer's parts of the memory plan (calibration activations, quantized layers, ...)."""

    def quantize_layer(self, layer: nn.Module, prefix: str, inputs: LayerInputs | None, device: torch.device,
                       advance: bool) -> LayerCounts:
        """Quantize ``layer`` (named ``prefix``) in place from ``inputs`` (its calibration inputs, ``None``
        without calibration); with ``advance``, replace ``inputs`` by the quantized layer's outputs."""

    def summary_fields(self) -> dict:
        """Extra ``QuantizationSummary`` fields (MoE fallbacks, W8A8 scheme, ...)."""


def check_memory_plan(max_memory_mb, parts: dict[str, float], device: torch.device) -> bool:
    """``True`` if the activations must live on the host (CUDA only); raises if the plan cannot fit."""
    if max_memory_mb is None:
        return False
    total = sum(parts.values())
    if total <= max_memory_mb:
        return False
    acts = parts.get("calibration activations", 0.0)
    if device.type == "cuda" and total - acts <= max_memory_mb:
        return True
    detail = ", ".join(f"{k} {v:.0f} MB" for k, v in parts.items())
    raise ValueError(f"the layer-wise plan needs about {total:.0f} MB ({detail}) but --max-memory is "
                     f"{max_memory_mb:.0f} MB; use fewer or shorter calibration windows (--nsamples/--seqlen) "
                     f"or raise --max-memory")


def check_selection(model: nn.Module, prefix: str, recipe: WeightRecipe) -> None:
    """Every selected Linear must sit in a decoder layer; at least one must be selected."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and recipe.matches(n)]
    names += [n for n, _ in find_experts_modules(model, recipe.matches)]  # fused MoE experts; unknown class: refused
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"the layer pipeline quantizes Linears inside the decoder layers only, but the recipe "
                         f"selects {outside}; exclude them (e.g. --exclude {outside[0]!r}; the output head: "
                         f"--lm-head)")
    if not names:
        raise ValueError(f"the recipe selects no nn.Linear (include={list(recipe.include)}, "
                         f"exclude={list(recipe.exclude)}); check the patterns against `llmq inspect` module names")


def check_calibration_ids(quantizer: LayerQuantizer, ids: torch.Tensor | None) -> None:
    if quantizer.needs_calibration and ids is None:
        raise ValueError(f"{quantizer.desc} needs calibration data (calibration_ids / --calib)")
    if ids is not None and (ids.dim() != 2 or ids.numel() == 0):
        raise ValueError(f"calibration ids must be a non-empty [nsamples, seqlen] tensor, got {tuple(ids.shape)}")


def default_device(device) -> torch.device:
    from llmq.devices import resolve_device

    return resolve_device(device)  # None: CUDA when available; a bad name or a missing GPU: ValueError


def run_layerwise(source: str | Path | nn.Module, quantizer: LayerQuantizer, calibration_ids: torch.Tensor | None,
                  device: str | torch.device | None = None, max_memory_mb: float | None = None, batch_size: int = 8,
                  progress: bool = True, trust_remote_code: bool = False) -> tuple[nn.Module, QuantizationSummary]:
    """Quantize ``source`` one decoder layer at a time with ``quantizer`` (see the module docstring).

    Args:
        source: a Hugging Face model folder (safetensors; read one layer at a time, never whole) or a
            model in memory (modified in place, returned where it was).
        calibration_ids: ``[nsamples, seqlen]`` int64 (``llmq.calibration.calibration_batch``); read only
            when ``quantizer.needs_calibration``.
        device: where layers run (default CUDA when available, else CPU).
        max_memory_mb: memory budget (a folder only) checked before any work (host RSS on CPU, device
            memory on CUDA).
        batch_size: calibration windows per layer forward.

    Returns:
        the model (quantized modules in the decoder layers; from a folder everything else materialised on
        the host in fp32) and the summary. Problems found before any layer is read raise ``ValueError``.
    """
    start = time.perf_counter()
    check_calibration_ids(quantizer, calibration_ids)
    ids = calibration_ids if quantizer.needs_calibration else None
    device = default_device(device)
    in_memory = isinstance(source, nn.Module)
    if in_memory:
        if max_memory_mb is not None:
            raise ValueError("max_memory_mb plans reading a model folder layer by layer; this model is already "
                             "in memory: pass its folder instead")
        model, ckpt = source, None
        before_mb = model_bytes(model) / 1e6
    else:
        model = empty_model(source, trust_remote_code)
        ckpt = ConvertedCheckpoint(LazyCheckpoint(source), model)  # by module name, as from_pretrained converts
        before_mb = ckpt.nbytes() / 1e6
    prefix, layers = find_decoder_layers(model)
    check_selection(model, prefix, quantizer.selection)
    quantizer.check(layers, prefix)
    store = device
    if ckpt is not None:
        store = _plan(model, ckpt, prefix, layers, quantizer, ids, batch_size, device, max_memory_mb)
        materialise_inputs_side(model, ckpt, device)
        load_layer = lambda i: materialise(model, f"{prefix}.{i}", ckpt, device)  # noqa: E731
    else:
        home = next(model.parameters()).device
        if ids is not None:
            for module in model.modules():
                if isinstance(module, nn.Embedding):
                    module.to(device)
        load_layer = lambda i: layers[i].to(device)  # noqa: E731
    inputs = None if ids is None else capture_layer0_inputs(model, layers, ids, batch_size, device, store)

    bar = tqdm(range(len(layers)), desc=quantizer.desc, unit="layer", disable=not progress)
    total = LayerCounts()
    for i in bar:
        t0 = time.perf_counter()
        layer = load_layer(i)
        counts = quantizer.quantize_layer(layer, f"{prefix}.{i}", inputs, device,
                                          advance=inputs is not None and i < len(layers) - 1)
        total = LayerCounts(*(a + b for a, b in zip(vars(total).values(), vars(counts).values())))
        if device.type == "cuda":
            layer.to("cpu")  # finished layers wait on the host
        release_freed_memory()
        bar.set_postfix({"layer_s": f"{time.perf_counter() - t0:.1f}", **memory_postfix()})
    del inputs
    if ckpt is not None:
        materialise_rest_on_host(model, ckpt)  # final norm, head
    else:
        model.to(home)
    samples = 0 if ids is None else ids.shape[0]
    return model, summarize(model, total.linears, total.params, before_mb, start, smoothed=total.smoothed,
                            calibration_samples=samples, **quantizer.summary_fields())


def _plan(model, ckpt, prefix, layers, quantizer, ids, batch_size, device, max_memory_mb) -> torch.device:
    """Check the memory plan against ``max_memory_mb`` (raises before any work); where activations live."""
    inner = tuple(f"{prefix}.{i}." for i in range(len(layers)))
    # everything is computed in fp32, whatever the dtype on disk;
    # one layer in fp32, plus as much again for the algorithms' working copies
    layer_mb = 2 * max(ckpt.numel(p) for p in inner) * 4 / 1e6
    outer_mb = sum(ckpt.numel(n) for n in ckpt.files if not n.startswith(inner)) * 4 / 1e6
    base = current_rss_mb() if device.type == "cpu" else 0.0
    parts = {"process": base, "embeddings and head": outer_mb, "one layer": layer_mb,
             **quantizer.memory_mb(model.config, layers, ckpt.numel(f"{prefix}."), ids, batch_size)}
    acts_on_host = check_memory_plan(max_memory_mb, parts, device)
    return torch.device("cpu") if acts_on_host else device
