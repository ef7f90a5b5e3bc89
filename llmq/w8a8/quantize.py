"""Quantize a float causal LM to W8A8: calibrate, smooth, observe, swap in ``W8A8Linear``.

    ids = calibration_batches(tokenizer, n_samples=128, seq_len=512)   # BBC business+sports
    summary = quantize_model_w8a8(model, ActivationRecipe(scheme="static", observer="kl"), ids)

Two drivers share the hooks below (``absmax_hooks``, ``observer_hooks``) and the
SmoothQuant folding:

* ``quantize_w8a8`` (``llmq quantize --method smoothquant``) goes layer by layer
  from the safetensors files, never holding the float model
  (``llmq.w8a8.layerwise``; each layer calibrated on the quantized layers' outputs);
* ``quantize_model_w8a8`` quantizes a model already in memory, in whole-model passes
  that observe the *float* smoothed model (any module tree; the path behind the
  measured quality table in ``docs/w8a8.md``):

1. if ``recipe.smoothquant_alpha`` is set: one calibration pass with forward
   pre-hooks recording each selected Linear's per-input-channel ``max|x|``, then
   ``llmq.algorithms.smoothquant.smooth_model`` folds the factors into the
   norms / ``v_proj`` / ``up_proj`` (the float model's outputs do not change);
2. if the scheme is static: a second pass (on the smoothed model) feeding every
   Linear's input to an observer (``llmq.observers``, per tensor); Linears that
   read the same tensor (q/k/v, gate/up) share one observer;
3. every selected ``nn.Linear`` becomes a ``W8A8Linear`` (int8 weight per output
   channel; static: the observer's scale).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmq.algorithms.smoothquant import smooth_model
from llmq.model.swap import find_linears, set_submodule
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.observers import Observer, make_observer
from llmq.recipes import DEFAULT_EXCLUDE, ActivationRecipe, ActScheme, WeightMethod, WeightRecipe
from llmq.resources import peak_rss_mb


def w8a8_weight_recipe(include=("*",), exclude=DEFAULT_EXCLUDE) -> WeightRecipe:
    """The weight half of W8A8 (int8, per output channel, symmetric) as a ``WeightRecipe``."""
    return WeightRecipe(bits=8, group_size=None, symmetric=True, method=WeightMethod.SMOOTHQUANT,
                        include=tuple(include), exclude=tuple(exclude))


def calibration_batches(tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` random ``[1, seq_len]`` token windows of the BBC calibration articles (seeded)."""
    from llmq.data.bbc import calibration_text

    ids = tokenizer(calibration_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return [ids[s:s + seq_len][None] for s in starts.tolist()]


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


@dataclass
class W8A8Summary:
    linears: int
    smoothed: int
    scheme: str
    observer: str | None
    alpha: float | None
    calibration_samples: int
    seconds: float
    peak_rss_mb: float | None = None  # of the whole process, at the end
    model_mb_before: float | None = None  # float model, fp32
    model_mb_after: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        obs = f", observer {self.observer}" if self.observer else ""
        sq = f"SmoothQuant alpha={self.alpha} on {self.smoothed} Linears" if self.alpha is not None else "no SmoothQuant"
        out = (f"W8A8 {self.scheme}{obs}: {self.linears} Linears -> W8A8Linear, {sq}, "
               f"{self.calibration_samples} calibration samples, {self.seconds:.1f} s")
        if self.model_mb_before is not None and self.model_mb_after is not None:
            out += f"\n  model size {self.model_mb_before:8.1f} MB -> {self.model_mb_after:8.1f} MB"
        if self.peak_rss_mb is not None:
            out += f"\n  peak RSS   {self.peak_rss_mb:8.1f} MB"
        return out


def quantize_model_w8a8(model: nn.Module, recipe: ActivationRecipe, batches: list[torch.Tensor] | None,
                        weight_recipe: WeightRecipe | None = None, progress: bool = True,
                        backend: str | None = None) -> W8A8Summary:
    """Quantize ``model`` in place (see module docstring). ``batches``: ``[1, T]`` token ids.

    Raises ``ValueError`` when static scales or SmoothQuant are asked for without
    calibration data, or when a selected Linear never sees any (its observer is empty).
    """
    start = time.perf_counter()
    weight_recipe = weight_recipe or w8a8_weight_recipe()
    linears = find_linears(model, weight_recipe)
    if not linears:
        raise ValueError("the recipe selects no nn.Linear in this model; check include/exclude patterns")
    names = [n for n, _ in linears]
    needs_data = recipe.smoothquant_alpha is not None or recipe.scheme is ActScheme.STATIC
    if needs_data and not batches:
        raise ValueError("static activation scales and SmoothQuant need calibration data: pass token batches "
                         "(llmq.w8a8.calibration_batches) or use --act-scheme dynamic without --alpha")
    model.eval()
    smoothed: list[str] = []
    if recipe.smoothquant_alpha is not None:
        stats = collect_input_absmax(model, names, batches, progress)
        smoothed = smooth_model(model, stats, recipe.smoothquant_alpha, check_ids=batches[0])
    scales: dict[str, torch.Tensor] = {}
    if recipe.scheme is ActScheme.STATIC:
        scales = static_scales(observe_inputs(model, names, batches, recipe, progress), names)
    for name, lin in tqdm(linears, desc="W8A8Linear", unit="linear", disable=not progress):
        set_submodule(model, name, W8A8Linear.from_linear(lin, scales.get(name), name=name, backend=backend))
    return W8A8Summary(len(linears), len(smoothed), recipe.scheme.value,
                       recipe.observer.value if recipe.scheme is ActScheme.STATIC else None,
                       recipe.smoothquant_alpha, len(batches or []), time.perf_counter() - start,
                       peak_rss_mb=peak_rss_mb())


def quantize_w8a8(model: str | os.PathLike, recipe: ActivationRecipe, out_dir: str | os.PathLike | None = None,
                  force: bool = False, exclude: tuple[str, ...] = (), n_samples: int = 128, seq_len: int = 512,
                  progress: bool = True, trust_remote_code: bool = False, device: str | None = None,
                  max_memory_mb: float | None = None, batch_size: int = 8, backend: str | None = None):
    """``llmq quantize --method smoothquant``: calibrate and quantize layer by layer, (optionally) save.

    The float model is never loaded whole: ``llmq.w8a8.layerwise.quantize_layerwise_w8a8``
    reads one decoder layer at a time from the safetensors files, and calibrates each
    layer on the outputs of the already quantized layers before it (see that module).
    ``max_memory_mb`` checks the plan before any work; ``device``: where layers run.
    Bad calibration settings and output folders fail before anything is loaded.

    The checkpoint's ``quantization_config`` has ``"weight"`` (int8 per channel,
    method smoothquant), ``"activation"`` (the recipe) and ``"calibration"``; static
    activation scales are ``act_scale`` buffers of each ``W8A8Linear``.
    Returns ``llmq.api.QuantizeResult``.
    """
    from transformers import AutoTokenizer

    from llmq.api import QuantizeResult, check_float_source
    from llmq.checkpoint import build_quantization_config, save_quantized
    from llmq.checkpoint.save import check_output_dir
    from llmq.model.source import resolve_model_path
    from llmq.w8a8.layerwise import needs_calibration, quantize_layerwise_w8a8

    if needs_calibration(recipe) and (n_samples < 1 or seq_len < 1):
        raise ValueError(f"SmoothQuant and static activation scales need calibration data, but n_samples={n_samples} "
                         f"and seq_len={seq_len}; use --calib-samples >= 1, or --act-scheme dynamic --alpha none")
    if device is not None:
        from llmq.devices import resolve_device

        device = resolve_device(device)  # a missing GPU or a bad name: one line, before any work
    source = resolve_model_path(model)
    check_float_source(source)
    if out_dir is not None:
        check_output_dir(out_dir, force, source_dir=source)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    wrecipe = w8a8_weight_recipe(exclude=DEFAULT_EXCLUDE + tuple(exclude))
    batches = calibration_batches(tokenizer, n_samples, seq_len) if needs_calibration(recipe) else None
    q_model, summary = quantize_layerwise_w8a8(source, recipe, batches, wrecipe, device=device,
                                               max_memory_mb=max_memory_mb, batch_size=batch_size,
                                               progress=progress, backend=backend,
                                               trust_remote_code=trust_remote_code)
    saved = None
    if out_dir is not None:
        extra = {"activation": recipe.to_dict(),
                 "calibration": {"samples": summary.calibration_samples, "seq_len": seq_len, "seed": 0,
                                 "text": "bbc business+sports, odd file numbers", "sequential": True}}
        qcfg = build_quantization_config(q_model, wrecipe, extra)
        saved = save_quantized(q_model, tokenizer, out_dir, qcfg, force=force, source_dir=source)
    return QuantizeResult(q_model, tokenizer, summary, None if saved is None else Path(saved))
