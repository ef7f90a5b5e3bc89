"""Calibration activations of a decoder stack: capture layer 0's inputs, run one layer on all of them.

::

    ids [n, T] ─▶ embeddings ─▶ [pre-hook on layer 0 raises StopForward] ─▶ LayerInputs (hidden + kwargs)
    forward_all(layer, inputs):  every batch through one layer, hooks observe; blocks in ``replays``
                                 return one Linear of a cached input instead of recomputing (GPTQ/AWQ)
    forward_all(..., advance=True): each batch's output replaces its input (the next layer's inputs)

Tensors and modules only: the driver (``llmq.pipeline.driver``) decides where they live.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llmq.arch import replay_block
from llmq.model.swap import set_submodule


class StopForward(Exception):
    """Raised by a hook once it has what it needs; the rest of the forward is skipped."""


_StopForward = StopForward  # the name llmq.pipeline.experts and older callers use


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
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in input_ids.split(batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
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


def forward_all(layer, inputs: LayerInputs, device, replays: dict | None = None, state: dict | None = None,
                advance: bool = False) -> None:
    """Run ``layer`` on every batch (blocks in ``replays`` replayed from their caches); hooks observe.

    ``replays`` maps a Linear's local name to its cached inputs (one per batch); ``state`` is shared with
    the replays (``{"batch", "device"}``). With ``advance``, each batch's output replaces its input in
    ``inputs.hidden`` as soon as it exists (the next layer's inputs), so the calibration activations are
    held once plus one batch, never as an input list and an output list side by side.
    """
    replays = replays or {}
    state = {"batch": 0, "device": device} if state is None else state
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
            except StopForward:
                continue
            if advance:
                inputs.hidden[b] = (out[0] if isinstance(out, tuple) else out).to(hidden.device)
    finally:
        for container, module in originals.items():
            set_submodule(layer, container, module)


def layer_output(layer: nn.Module, inputs: LayerInputs, device: torch.device) -> torch.Tensor:
    """``layer``'s fp32 output on the first calibration batch (no replay): the fold check's probe."""
    out = layer(inputs.hidden[0].to(device), **to_device(inputs.kwargs[0], device))
    return (out[0] if isinstance(out, tuple) else out).float()
