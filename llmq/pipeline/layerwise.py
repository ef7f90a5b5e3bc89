"""Layer-sequential quantization: one decoder layer in memory at a time.

::

    calibration ids ─▶ embeddings ─▶ [pre-hook on layer 0 raises] ─▶ inputs X₀ (+ kwargs: mask, rotary, …)
    for each decoder layer i:
        materialise layer i from the safetensors files (or take it from an in-memory model)
        for each sub-group (q/k/v, o, gate/up, down):         true-sequential
            run the layer on X_i, hooks feed the sub-group's input to the algorithm, stop early
            quantize the sub-group, write the dequantized weights back (the layer now runs quantized)
        swap the Linears for QuantLinear, run the quantized layer: X_{i+1} = layer_i(X_i)
    materialise the final norm and lm_head

Memory: the embeddings, one float decoder layer, the calibration activations
(one ``[nsamples, seqlen, hidden]`` fp32 copy: a layer's outputs replace its inputs batch
by batch; plus the replay caches of o_proj / down_proj inputs) and the quantized layers
done so far — never the float model. ``max_memory_mb`` checks that plan
before any work starts; on CUDA it moves the activations to host memory when
they do not fit beside the layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmq.arch import replay_block
from llmq.model.rtn import QuantizationSummary, model_bytes
from llmq.model.swap import find_experts_modules, set_submodule
from llmq.nn.quant_experts import QuantExperts
from llmq.nn.quant_linear import QuantLinear
from llmq.pipeline.conversion import ConvertedCheckpoint
from llmq.pipeline.experts import experts_statistics_mb, quantize_layer_experts
from llmq.pipeline.lazy import LazyCheckpoint, empty_model, materialise, materialise_inputs_side, materialise_rest_on_host
from llmq.pipeline.methods import NEEDS_CALIBRATION, SubgroupQuantizer, method_args, plan_subgroups, warn_clip_only
from llmq.quant.primitives import QuantizedWeight
from llmq.recipes import WeightMethod, WeightRecipe
from llmq.resources import current_rss_mb, memory_postfix, peak_rss_mb, release_freed_memory


class _StopForward(Exception):
    """Raised by a hook once it has what it needs; the rest of the forward is skipped."""


@dataclass
class LayerInputs:
    """Inputs of one decoder layer for every calibration batch."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # [b, T, hidden] each
    kwargs: list[dict] = field(default_factory=list)  # attention mask, position embeddings, ...


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(prefix, layers)`` of the repeated decoder blocks (the ``ModuleList`` of ``num_hidden_layers``)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"{type(model).__name__}: no ModuleList of num_hidden_layers={n} decoder layers found; "
                     f"the layer pipeline supports decoder-only transformers (Llama, Mistral, Qwen2, ...)")


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                          device: torch.device, store: torch.device) -> LayerInputs:
    """Run the model up to decoder layer 0 for each batch of ``input_ids`` ``[n, T]``; keep its inputs."""
    captured = LayerInputs()

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.to(store))
        captured.kwargs.append(to_device({k: v for k, v in kwargs.items() if k != "hidden_states"}, store))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in input_ids.split(batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


# Blocks whose output is one Linear of a cached input (``llmq.arch.replay_block``): once that Linear's
# sub-group has been calibrated, later passes replay the block from its cached input instead of
# recomputing everything before it (the attention, or gate/up) — about half the work.
_WRAP = {  # how each kind of block returns its last Linear's output
    "self_attn": lambda container, y: (y, None),  # attention returns (out, weights)
    "mlp": lambda container, y: y,
}


class _Replay(nn.Module):
    """Stands in for a block: returns ``last_linear(cached input of the current batch)``."""

    def __init__(self, block: nn.Module, linear: str, wrap, cached: list[torch.Tensor], state: dict) -> None:
        super().__init__()
        self.block, self.linear, self.wrap, self.cached, self.state = block, linear, wrap, cached, state

    def forward(self, *args, **kwargs):
        x = self.cached[self.state["batch"]].to(self.state["device"])
        return self.wrap(self.block, self.block.get_submodule(self.linear)(x))


def forward_all(layer, inputs, device, replays, state, advance: bool = False) -> None:
    """Run ``layer`` on every batch (blocks in ``replays`` replayed from their caches); hooks observe.

    With ``advance``, each batch's output replaces its input in ``inputs.hidden`` as soon as it
    exists (the next layer's inputs), so the calibration activations are held once plus one batch,
    never as an input list and an output list side by side.
    """
    originals = {}
    for linear, cached in replays.items():
        container = replay_block(layer, linear)
        originals[container] = layer.get_submodule(container)
        local = linear[len(container) + 1:]
        set_submodule(layer, container, _Replay(originals[container], local, _WRAP[container], cached, state))
    try:
        for b, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            state["batch"] = b
            try:
                out = layer(hidden.to(device), **to_device(kwargs, device))
            except _StopForward:
                continue
            if advance:
                inputs.hidden[b] = (out[0] if isinstance(out, tuple) else out).to(hidden.device)
    finally:
        for container, module in originals.items():
            set_submodule(layer, container, module)


@torch.no_grad()
def quantize_layer(layer: nn.Module, prefix: str, recipe: WeightRecipe, inputs: LayerInputs | None,
                   device: torch.device, moe_report: dict | None = None) -> tuple[int, int, int]:
    """Quantize the selected Linears of one decoder ``layer`` in place (swapped for ``QuantLinear``),
    then its fused MoE experts, if any (swapped for ``QuantExperts``; ``llmq.pipeline.experts``).

    ``inputs`` (when given) then become the quantized layer's outputs, the next layer's inputs.
    Returns ``(#linears, #weights, float bytes of the linears and experts)``; ``moe_report`` (when
    given) collects ``"experts_modules"`` and, per experts module, its fallbacks and token counts.
    """
    selected = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and recipe.matches(f"{prefix}.{n}")]
    qweights: dict[str, QuantizedWeight] = {}
    replays: dict[str, list[torch.Tensor]] = {}
    state = {"batch": 0, "device": device}
    # replay caches live with the calibration activations (on the host when --max-memory moved them there)
    store = inputs.hidden[0].device if inputs is not None and inputs.hidden else device
    plan = plan_subgroups(layer, selected, prefix)
    if recipe.method is WeightMethod.AWQ:
        warn_clip_only(layer, prefix, plan)
    probe = None if inputs is None else (lambda: layer_output(layer, inputs, device))
    for sub in plan:
        quantizer = SubgroupQuantizer(sub, layer, recipe, prefix)
        first = sub.names[0]
        cache = [] if replay_block(layer, first) is not None else None
        if quantizer.needs_data:

            def hook(module, args, q=quantizer, cache=cache):
                q.add_batch(args[0])
                if cache is not None:
                    cache.append(args[0].to(store))
                raise _StopForward

            handles = [layer.get_submodule(first).register_forward_pre_hook(hook)]
            if quantizer.block_loss is not None:  # AWQ scored on the attention / MLP output
                block = layer.get_submodule(sub.block)
                handles.append(block.register_forward_pre_hook(quantizer.block_loss.record, with_kwargs=True))
            try:
                forward_all(layer, inputs, device, replays, state)
            finally:
                for handle in handles:
                    handle.remove()
            if cache is not None:
                replays[first] = cache
        qweights.update(quantizer.quantize(layer, qweights, probe))
        if quantizer.folded is not None and sub.producer is not None:
            # AWQ divided the producer of this input by s: the cached inputs shrink alike
            for other, cached in replays.items():
                if other in sub.names:
                    replays[other] = [c / quantizer.folded.to(c.device) for c in cached]
    n_weights = n_bytes = 0
    # CPU: propagate through the fp32 reference (the cpu backend's bf16 path depends on the batch's row count)
    propagate_with = "torch" if device.type == "cpu" else None
    for name in selected:
        linear = layer.get_submodule(name)
        n_weights += linear.weight.numel()
        n_bytes += linear.weight.numel() * 4
        set_submodule(layer, name, QuantLinear.from_quantized(qweights[name], linear.bias, backend=propagate_with))
    report = {} if moe_report is None else moe_report
    run = None if inputs is None else (lambda: forward_all(layer, inputs, device, replays, state))
    n_experts, e_weights = quantize_layer_experts(layer, prefix, recipe, method_args(recipe), run, _StopForward,
                                                  report.setdefault("modules", {}))
    report["experts_modules"] = report.get("experts_modules", 0) + n_experts
    n_weights, n_bytes = n_weights + e_weights, n_bytes + e_weights * 4
    if inputs is not None:
        forward_all(layer, inputs, device, replays, state, advance=True)
    for module in [layer.get_submodule(name) for name in selected]:  # propagated: the automatic backend now
        module.set_backend(None)
        module.prepare()
    return len(selected), n_weights, n_bytes


def layer_output(layer: nn.Module, inputs: LayerInputs, device: torch.device) -> torch.Tensor:
    """``layer``'s fp32 output on the first calibration batch (no replay): the fold check's probe."""
    out = layer(inputs.hidden[0].to(device), **to_device(inputs.kwargs[0], device))
    return (out[0] if isinstance(out, tuple) else out).float()


def _block_loss_mb(recipe: WeightRecipe, calibration_ids: torch.Tensor, hidden: int, batch_size: int) -> float:
    """AWQ's block-output loss keeps a block's inputs and float outputs for ``block_windows`` windows
    (rounded up to whole batches)."""
    args = method_args(recipe) if recipe.method is WeightMethod.AWQ else {}
    if args.get("scale_loss") != "block":
        return 0.0
    n, seqlen = calibration_ids.shape
    windows = min(n, -(-args["block_windows"] // batch_size) * batch_size)
    return 2 * windows * seqlen * hidden * 4 / 1e6


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
                     f"{max_memory_mb:.0f} MB; use fewer or shorter calibration windows (--nsamples/--seqlen, "
                     f"--calib-samples for --method smoothquant) or raise --max-memory")


def _check_calibration(recipe: WeightRecipe, input_ids: torch.Tensor | None) -> None:
    method_args(recipe)  # unknown arguments fail now
    if recipe.method in NEEDS_CALIBRATION and input_ids is None:
        raise ValueError(f"method {recipe.method.value!r} needs calibration data (calibration_ids / --calib)")
    if input_ids is not None and (input_ids.dim() != 2 or input_ids.numel() == 0):
        raise ValueError(f"calibration ids must be a non-empty [nsamples, seqlen] tensor, got {tuple(input_ids.shape)}")


def check_selection(model: nn.Module, prefix: str, recipe: WeightRecipe) -> None:
    """Every selected Linear must sit in a decoder layer; at least one must be selected."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and recipe.matches(n)]
    names += [n for n, _ in find_experts_modules(model, recipe.matches)]  # fused MoE experts; unknown class: refused
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"the layer pipeline quantizes Linears inside the decoder layers only, but the recipe "
                         f"selects {outside}; exclude them (e.g. --exclude {outside[0]!r})")
    if not names:
        raise ValueError(f"the recipe selects no nn.Linear (include={list(recipe.include)}, "
                         f"exclude={list(recipe.exclude)}); check the patterns against `llmq inspect` module names")


def default_device(device) -> torch.device:
    from llmq.devices import resolve_device

    return resolve_device(device)  # None: CUDA when available; a bad name or a missing GPU: ValueError


def quantize_layerwise(
    folder: str | Path,
    recipe: WeightRecipe,
    calibration_ids: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    max_memory_mb: float | None = None,
    batch_size: int = 8,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, QuantizationSummary]:
    """Quantize the float model in ``folder`` reading one decoder layer at a time from its safetensors.

    Args:
        folder: Hugging Face model folder (safetensors weights).
        calibration_ids: ``[nsamples, seqlen]`` int64 (``llmq.calibration.calibration_batch``);
            required by GPTQ and AWQ, unused by RTN and HQQ.
        device: where layers run (default CUDA when available, else CPU).
        max_memory_mb: memory budget checked before any work (host RSS on CPU, device memory on CUDA).

    Returns:
        the model (``QuantLinear`` in the decoder layers, everything else materialised
        on the host in fp32) and a summary.
    """
    start = time.perf_counter()
    _check_calibration(recipe, calibration_ids)
    device = default_device(device)
    model = empty_model(folder, trust_remote_code)
    ckpt = ConvertedCheckpoint(LazyCheckpoint(folder), model)  # by module name, as from_pretrained converts
    prefix, layers = find_decoder_layers(model)
    check_selection(model, prefix, recipe)
    hidden = model.config.hidden_size
    # everything is computed in fp32, whatever the dtype on disk;
    # one layer in fp32, plus as much again for the algorithms' working copies
    layer_mb = 2 * max(ckpt.numel(f"{prefix}.{i}.") for i in range(len(layers))) * 4 / 1e6
    inner = tuple(f"{prefix}.{i}." for i in range(len(layers)))
    outer_mb = sum(ckpt.numel(n) for n in ckpt.files if not n.startswith(inner)) * 4 / 1e6
    # a layer's inputs, replaced by its outputs batch by batch
    acts_mb = 0.0 if calibration_ids is None else calibration_ids.numel() * hidden * 4 / 1e6
    if calibration_ids is not None:  # replay caches: attention outputs + MLP activations
        acts_mb += calibration_ids.numel() * (hidden + getattr(model.config, "intermediate_size", 4 * hidden)) * 4 / 1e6
        acts_mb += _block_loss_mb(recipe, calibration_ids, hidden, batch_size)
    quant_mb = ckpt.numel(f"{prefix}.") * (recipe.bits + 1) / 8 / 1e6  # codes + scales/zeros, roughly
    # GPTQ / AWQ on fused experts: one [K, K] statistic per expert (llmq.pipeline.experts); layer 0's
    # skeleton gives the shapes (every MoE layer of the families llmq knows has the same experts)
    stats_mb = max(experts_statistics_mb(layer, recipe, method_args(recipe)) for layer in layers)
    base = current_rss_mb() if device.type == "cpu" else 0.0
    acts_on_host = check_memory_plan(max_memory_mb, {"process": base, "embeddings and head": outer_mb,
                                                     "one layer": layer_mb, "calibration activations": acts_mb,
                                                     "quantized layers": quant_mb,
                                                     "expert statistics": stats_mb}, device)
    store = torch.device("cpu") if acts_on_host else device

    materialise_inputs_side(model, ckpt, device)
    inputs = None
    if calibration_ids is not None:
        inputs = capture_layer0_inputs(model, layers, calibration_ids, batch_size, device, store)

    def load_layer(i):
        return materialise(model, f"{prefix}.{i}", ckpt, device)

    moe_report: dict = {}
    n, weights, fp_bytes = _run_layers(layers, prefix, recipe, inputs, device, load_layer, progress, moe_report)
    materialise_rest_on_host(model, ckpt)  # final norm, head
    return model, _summary(model, n, weights, fp_bytes, ckpt.nbytes() / 1e6, start, moe_report)


def quantize_model(
    model: nn.Module,
    recipe: WeightRecipe,
    calibration_ids: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantizationSummary:
    """Same as ``quantize_layerwise`` for a model already in memory (modified in place)."""
    start = time.perf_counter()
    _check_calibration(recipe, calibration_ids)
    device = default_device(device)
    before = model_bytes(model) / 1e6
    prefix, layers = find_decoder_layers(model)
    check_selection(model, prefix, recipe)
    home = next(model.parameters()).device
    inputs = None
    if calibration_ids is not None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding):
                module.to(device)
        inputs = capture_layer0_inputs(model, layers, calibration_ids, batch_size, device, device)
    moe_report: dict = {}
    n, weights, fp_bytes = _run_layers(layers, prefix, recipe, inputs, device, lambda i: layers[i].to(device),
                                       progress, moe_report)
    model.to(home)
    return _summary(model, n, weights, fp_bytes, before, start, moe_report)


def _run_layers(layers, prefix, recipe, inputs, device, load_layer, progress, moe_report) -> tuple[int, int, int]:
    bar = tqdm(range(len(layers)), desc=f"quantize ({recipe.method.value})", unit="layer", disable=not progress)
    n = weights = fp_bytes = 0
    for i in bar:
        t0 = time.perf_counter()
        layer = load_layer(i)
        k, w, b = quantize_layer(layer, f"{prefix}.{i}", recipe, inputs, device, moe_report)
        n, weights, fp_bytes = n + k, weights + w, fp_bytes + b
        if device.type == "cuda":
            layer.to("cpu")  # finished layers wait on the host
        release_freed_memory()
        bar.set_postfix({"layer_s": f"{time.perf_counter() - t0:.1f}", **memory_postfix()})
    return n, weights, fp_bytes


def _summary(model, n, weights, fp_bytes, before_mb, start, moe_report) -> QuantizationSummary:
    after = sum(m.storage_bytes() for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts)))
    fallbacks = {name: {k: v for k, v in info.items() if k != "tokens"}
                 for name, info in moe_report.get("modules", {}).items() if info["experts"]}
    return QuantizationSummary(
        experts_modules=moe_report.get("experts_modules", 0), expert_fallbacks=fallbacks,
        linears=n, quantized_params=weights, model_mb_before=before_mb, model_mb_after=model_bytes(model) / 1e6,
        linear_mb_before=fp_bytes / 1e6, linear_mb_after=after / 1e6, bits_per_weight=8 * after / weights,
        seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(),
    )
