"""W8A8's hooks and weight recipe, shared by the layer quantizer (``llmq.w8a8.layerwise``) and ``llmq.ptq``.

* ``absmax_hooks``: forward pre-hooks recording each Linear's per-input-channel ``max|x|`` (SmoothQuant);
* ``observer_hooks``: forward pre-hooks feeding each Linear's input to a per-tensor observer
  (``llmq.observers``); Linears that read the same tensor (q/k/v, gate/up) share one observer;
* ``static_scales``: the observers' scales, refusing a Linear calibration never reached.

The entry points that lived here are deprecated aliases: ``quantize_w8a8`` of
``llmq.quantize(folder, ActivationRecipe(...))`` (the layer-wise driver), ``quantize_model_w8a8``
of ``llmq.ptq`` (prepare / calibrate / convert: whole-model passes over the *float* model in
memory, the path behind the measured quality table in ``docs/w8a8.md``), ``calibration_batches``
of ``llmq.calibration.calibration_batch`` (the one sampler).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from llmq.observers import Observer, make_observer
from llmq.pipeline.summary import QuantizationSummary, model_bytes, summarize
from llmq.recipes import DEFAULT_EXCLUDE, ActivationRecipe, ActScheme, WeightMethod, WeightRecipe

W8A8Summary = QuantizationSummary  # the one summary (its W8A8 fields: scheme, observer, alpha, smoothed)


def w8a8_weight_recipe(include=("*",), exclude=DEFAULT_EXCLUDE) -> WeightRecipe:
    """The weight half of W8A8 (int8, per output channel, symmetric) as a ``WeightRecipe``."""
    return WeightRecipe(bits=8, group_size=None, symmetric=True, method=WeightMethod.SMOOTHQUANT,
                        include=tuple(include), exclude=tuple(exclude))


def calibration_batches(tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0) -> list[torch.Tensor]:
    """Deprecated: ``llmq.calibration.calibration_batch(tokenizer, CalibrationSpec(nsamples=..., seqlen=...))``,
    the one sampler (its windows may also start at the last possible offset, so they differ from
    this function's before it became an alias). Returns its rows as ``[1, seq_len]`` windows."""
    from llmq.calibration import CalibrationSpec, calibration_batch

    warnings.warn("llmq.w8a8.calibration_batches is deprecated: use llmq.calibration.calibration_batch",
                  DeprecationWarning, stacklevel=2)
    return list(calibration_batch(tokenizer, CalibrationSpec(nsamples=n_samples, seqlen=seq_len, seed=seed)).split(1))


@torch.no_grad()
def run_calibration(model: nn.Module, batches: list[torch.Tensor], desc: str, progress: bool) -> None:
    """Forward every ``[1, T]`` batch through ``model`` (no cache); hooks do the observing."""
    device = next(model.parameters()).device
    for ids in tqdm(batches, desc=desc, unit="sample", disable=not progress):
        model(input_ids=ids.to(device), use_cache=False)


@contextmanager
def absmax_hooks(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, forward pre-hooks record each named Linear's per-input-channel ``max|x|`` ``[K]`` (float32).

    Yields the ``{name: max|x|}`` dict, filled by whatever forward passes run inside the block.
    """
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            stats[name] = a if name not in stats else torch.maximum(stats[name], a)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextmanager
def observer_hooks(model: nn.Module, names: list[str], recipe: ActivationRecipe) -> Iterator[dict[str, Observer]]:
    """While open, forward pre-hooks feed each named Linear's input to a per-tensor observer.

    Linears that read the same tensor (q/k/v, gate/up) share one observer, which sees
    that tensor once. Each calibration window is one observation: a ``[b, T, K]`` input
    is observed as ``b`` windows of ``[1, T, K]``, so the result does not depend on the
    batch size the model runs at. Yields the ``{name: observer}`` dict.
    """
    observers: dict[str, Observer] = {}
    # the input tensor the previous hook saw and its observer. The tensor itself is held (not its
    # address): an address can be reused by the next, unrelated activation of the same shape (o_proj's
    # input then gate_proj's, hidden size = heads x head_dim), which made gate/up share o_proj's observer
    # whenever the allocator happened to hand the freed block back.
    last: dict[str, object] = {}

    def hook(name):
        def fn(_module, args):
            x = args[0]
            same_input = last.get("input") is x
            if name not in observers:  # first batch: share with the previous Linear if it was fed this tensor
                shared = last.get("obs") if same_input else None
                observers[name] = shared or make_observer(recipe.observer, momentum=recipe.momentum,
                                                          percentile=recipe.percentile, bits=recipe.bits)
            obs = observers[name]
            if not (same_input and last.get("obs") is obs):
                for window in (x.split(1) if x.dim() >= 3 else (x,)):
                    obs.observe(window)
            last["input"], last["obs"] = x, obs
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()
        last.clear()


def collect_input_absmax(model: nn.Module, names: list[str], batches: list[torch.Tensor],
                         progress: bool = True) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max|x|`` ``[K]`` (float32) of each named Linear over ``batches``."""
    with absmax_hooks(model, names) as stats:
        run_calibration(model, batches, "smoothquant stats", progress)
    return stats


def observe_inputs(model: nn.Module, names: list[str], batches: list[torch.Tensor], recipe: ActivationRecipe,
                   progress: bool = True) -> dict[str, Observer]:
    """One per-tensor observer per distinct Linear input (shared by Linears reading the same tensor)."""
    with observer_hooks(model, names, recipe) as observers:
        run_calibration(model, batches, f"calibrating ({recipe.observer.value})", progress)
    return observers


def static_scales(observers: dict[str, Observer], names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: act scale}`` for every name; a Linear no calibration data reached is a ``ValueError``."""
    for n in names:
        if n not in observers:
            raise ValueError(f"{n}: calibration never reached this Linear, so it has no static activation "
                             f"scale; exclude it or check the calibration data")
    return {n: observers[n].scale() for n in names}


def quantize_model_w8a8(model: nn.Module, recipe: ActivationRecipe, batches: list[torch.Tensor] | None,
                        weight_recipe: WeightRecipe | None = None, progress: bool = True,
                        backend: str | None = None) -> QuantizationSummary:
    """Deprecated: ``llmq.ptq`` (``prepare``, ``calibrate(batches)``, ``convert``) — which this now runs, with the
    same result: whole-model passes over the *float* model. ``llmq.quantize(model, recipe)`` instead
    calibrates layer by layer on the quantized layers' outputs (``llmq.w8a8.layerwise``)."""
    import llmq.ptq as ptq

    warnings.warn("llmq.w8a8.quantize_model_w8a8 is deprecated: use llmq.ptq.prepare / calibrate / convert (the same "
                  "whole-model passes) or llmq.quantize(model, recipe) (layer by layer)", DeprecationWarning,
                  stacklevel=2)
    start, before_mb = time.perf_counter(), model_bytes(model) / 1e6
    needs_data = recipe.smoothquant_alpha is not None or recipe.scheme is ActScheme.STATIC
    if needs_data and not batches:
        raise ValueError("static activation scales and SmoothQuant need calibration data: pass token batches "
                         "(llmq.calibration.calibration_batch) or use --act-scheme dynamic without --alpha")
    ptq.prepare(model, recipe, weight_recipe, backend)
    names = ptq._state(model).names
    params = sum(model.get_submodule(n).weight.numel() for n in names)
    if needs_data:
        ptq.calibrate(model, batches)
    smoothed = len(ptq._state(model).smoothed)
    ptq.convert(model)
    return summarize(model, len(names), params, before_mb, start, calibration_samples=len(batches or []),
                     scheme=recipe.scheme.value, alpha=recipe.smoothquant_alpha, smoothed=smoothed,
                     observer=recipe.observer.value if recipe.scheme is ActScheme.STATIC else None)


def quantize_w8a8(model: str | os.PathLike, recipe: ActivationRecipe, out_dir: str | os.PathLike | None = None,
                  force: bool = False, exclude: tuple[str, ...] = (), n_samples: int = 128, seq_len: int = 512,
                  progress: bool = True, trust_remote_code: bool = False, device: str | None = None,
                  max_memory_mb: float | None = None, batch_size: int = 8, backend: str | None = None):
    """Deprecated: ``llmq.quantize(model, recipe, out_dir, exclude=..., calibration=CalibrationSpec(nsamples=...,
    seqlen=...))`` — which this calls."""
    from llmq.api import quantize
    from llmq.calibration import CalibrationSpec

    warnings.warn("llmq.w8a8.quantize_w8a8 is deprecated: use llmq.quantize(model, ActivationRecipe(...), out_dir)",
                  DeprecationWarning, stacklevel=2)
    from llmq.w8a8.layerwise import needs_calibration

    if needs_calibration(recipe) and (n_samples < 1 or seq_len < 1):
        raise ValueError(f"SmoothQuant and static activation scales need calibration data, but n_samples={n_samples} "
                         f"and seq_len={seq_len}; use --calib-samples >= 1, or --act-scheme dynamic --alpha none")
    return quantize(model, recipe, out_dir, force=force, progress=progress, trust_remote_code=trust_remote_code,
                    calibration=CalibrationSpec(nsamples=n_samples, seqlen=seq_len), max_memory_mb=max_memory_mb,
                    device=device, batch_size=batch_size, exclude=exclude, backend=backend)
