"""SmoothQuant (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", eq. 4): migrate activation outliers into weights.

For a Linear ``Y = X W^T`` and any per-input-channel ``s > 0``::

    Y = (X diag(s)^-1) (W diag(s))^T        # exact in real arithmetic

With ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` the activation channels that
carry outliers are divided down and the weights (easy to quantize per output
channel) absorb them; ``alpha`` sets how much difficulty moves (0.5 = balanced).

The division by ``s`` costs nothing at inference because it is folded into the
op that *produces* ``X``:

* RMSNorm / LayerNorm → Linear(s): ``norm.weight /= s`` (and ``norm.bias``); exact,
  the norm's output is linear in its weight. (q/k/v after ``input_layernorm``,
  gate/up after ``post_attention_layernorm``.)
* ``v_proj`` → ``o_proj``: attention output = softmax(QK^T) V is linear in V per
  channel, so scaling ``v_proj``'s output rows (and bias) by ``1/s`` scales the
  attention output's matching channels by ``1/s``; ``o_proj`` columns take ``s``.
  With grouped-query attention the ``num_heads/num_kv_heads`` query heads that read
  one KV head share that head's ``s`` (factors are computed from the max over the
  group), so the identity stays exact.
* ``up_proj`` → ``down_proj``: ``down``'s input is ``act(gate) * up``, linear in
  ``up``'s output per channel; ``up`` rows take ``1/s``, ``down`` columns ``s``.

Tensors/modules in, modules modified in place; ``smooth_llama_layer`` applies all
of it to one Llama-style decoder layer (the layer-sequential W8A8 pipeline,
``llmq.w8a8.layerwise``), ``smooth_llama_layers`` to every layer of a model in
memory (``tests/algorithms/test_smoothquant.py`` checks the float model's logits
are unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

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


@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """``norm.weight /= s`` (and bias), each Linear's ``weight[:, j] *= s_j``."""
    if getattr(norm, "weight", None) is None:
        raise ValueError(f"cannot fold SmoothQuant scales into {type(norm).__name__}: it has no weight")
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, nxt: nn.Linear, s: torch.Tensor) -> None:
    """``prev``'s output rows (and bias) ``/= s``; ``nxt``'s input columns ``*= s``.

    Exact when everything between ``prev`` and ``nxt`` is linear per channel in
    ``prev``'s output (``act(gate) * up`` for ``up -> down``).
    """
    prev.weight.div_(s.to(prev.weight.dtype)[:, None])
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    nxt.weight.mul_(s.to(nxt.weight.dtype)[None, :])


def expand_kv(s: torch.Tensor, num_kv_heads: int, groups: int) -> torch.Tensor:
    """Per-KV-channel ``[kv_heads * head_dim]`` → per-query-channel ``[kv_heads * groups * head_dim]``."""
    return s.view(num_kv_heads, 1, -1).expand(-1, groups, -1).reshape(-1)


def reduce_kv(x: torch.Tensor, num_kv_heads: int, groups: int) -> torch.Tensor:
    """Max over the query heads sharing a KV head: ``[kv_heads * groups * hd]`` → ``[kv_heads * hd]``."""
    return x.view(num_kv_heads, groups, -1).amax(dim=1).reshape(-1)


def llama_layer_parts(layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """The modules SmoothQuant folds through in one Llama-style decoder ``layer`` (works on ``meta`` too).

    Returns ``{"q", "k", "v", "o", "gate", "up", "down", "ln1", "ln2"}`` → module; raises ``ValueError``
    naming ``prefix`` when the layer does not have that structure.
    """
    try:
        attn, mlp = layer.self_attn, layer.mlp
        return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj, "gate": mlp.gate_proj,
                "up": mlp.up_proj, "down": mlp.down_proj, "ln1": layer.input_layernorm,
                "ln2": layer.post_attention_layernorm}
    except AttributeError as e:
        raise ValueError(f"{prefix}: not a Llama-style decoder layer ({e}); SmoothQuant folding needs "
                         f"input_layernorm -> q/k/v and post_attention_layernorm -> gate/up") from None


def kv_groups(config) -> tuple[int, int]:
    """``(num_kv_heads, query heads per KV head)`` of a model config (no GQA: ``(num_heads, 1)``)."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return n_kv, n_heads // n_kv


@torch.no_grad()
def smooth_llama_layer(layer: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float, num_kv_heads: int,
                       groups: int, prefix: str = "layer", smooth_vo: bool = True,
                       smooth_up_down: bool = True) -> list[str]:
    """Apply SmoothQuant to one Llama-style decoder ``layer``, in place; its float function is unchanged.

    Args:
        act_absmax: per-input-channel ``max|X|`` ``[K]`` float32 of the layer's Linears by *local* name
            (``"self_attn.q_proj"``, ``"self_attn.o_proj"``, ``"mlp.gate_proj"``, ``"mlp.down_proj"`` are read),
            collected on this layer before smoothing.
        num_kv_heads, groups: ``kv_groups(model.config)``; ``v_proj -> o_proj`` shares factors across the
            ``groups`` query heads of each KV head.
        prefix: the layer's name in the model, for error messages.
    Returns:
        local names of the Linears whose inputs were smoothed.
    """
    m = llama_layer_parts(layer, prefix)

    def stats(name: str) -> torch.Tensor:
        if name not in act_absmax:
            raise ValueError(f"no activation statistics for {prefix}.{name}: calibration never reached it")
        return act_absmax[name]

    s = smoothing_factors(stats("self_attn.q_proj"), [m["q"].weight, m["k"].weight, m["v"].weight], alpha)
    fold_into_norm(m["ln1"], [m["q"], m["k"], m["v"]], s)
    s = smoothing_factors(stats("mlp.gate_proj"), [m["gate"].weight, m["up"].weight], alpha)
    fold_into_norm(m["ln2"], [m["gate"], m["up"]], s)
    smoothed = [f"self_attn.{n}_proj" for n in "qkv"] + ["mlp.gate_proj", "mlp.up_proj"]
    if smooth_vo:
        v, o = m["v"], m["o"]
        a = reduce_kv(stats("self_attn.o_proj"), num_kv_heads, groups)
        w = reduce_kv(o.weight.abs().amax(dim=0), num_kv_heads, groups)
        s = smoothing_factors(a, [w[None, :]], alpha)
        v.weight.div_(s.to(v.weight.dtype)[:, None])
        if v.bias is not None:
            v.bias.div_(s.to(v.bias.dtype))
        o.weight.mul_(expand_kv(s, num_kv_heads, groups).to(o.weight.dtype)[None, :])
        smoothed.append("self_attn.o_proj")
    if smooth_up_down:
        fold_into_linear(m["up"], m["down"], smoothing_factors(stats("mlp.down_proj"), [m["down"].weight], alpha))
        smoothed.append("mlp.down_proj")
    return smoothed


@torch.no_grad()
def smooth_llama_layers(model: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float,
                        smooth_vo: bool = True, smooth_up_down: bool = True) -> list[str]:
    """Apply SmoothQuant to every decoder layer of a Llama-style model, in place (``smooth_llama_layer``).

    Args:
        act_absmax: per-input-channel ``max|X|`` ``[K]`` of each Linear, by module name
            (e.g. ``"model.layers.0.self_attn.q_proj"``), collected on the float model.
    Returns:
        names of the Linears whose inputs were smoothed.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("SmoothQuant folding supports Llama-style models (model.model.layers[i] with "
                         "self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input/post_attention_layernorm); "
                         f"{type(model).__name__} has no model.layers")
    n_kv, groups = kv_groups(model.config)
    smoothed = []
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}"
        local = {k[len(prefix) + 1:]: v for k, v in act_absmax.items() if k.startswith(prefix + ".")}
        done = smooth_llama_layer(layer, local, alpha, n_kv, groups, prefix, smooth_vo, smooth_up_down)
        smoothed += [f"{prefix}.{n}" for n in done]
    return smoothed
