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

Tensors/modules in, modules modified in place; ``smooth_llama_layers`` applies all
of it to a Llama-style decoder (``tests/algorithms/test_smoothquant.py`` checks the
float model's logits are unchanged).
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


@torch.no_grad()
def smooth_llama_layers(model: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float,
                        smooth_vo: bool = True, smooth_up_down: bool = True) -> list[str]:
    """Apply SmoothQuant to every decoder layer of a Llama-style model, in place.

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
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    groups = n_heads // n_kv
    smoothed = []
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}"
        try:
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
            gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        except AttributeError as e:
            raise ValueError(f"{prefix}: not a Llama-style decoder layer ({e}); SmoothQuant folding needs "
                             f"input_layernorm -> q/k/v and post_attention_layernorm -> gate/up") from None

        def stats(name: str) -> torch.Tensor:
            key = f"{prefix}.{name}"
            if key not in act_absmax:
                raise ValueError(f"no activation statistics for {key}: calibration never reached it")
            return act_absmax[key]

        s = smoothing_factors(stats("self_attn.q_proj"), [q.weight, k.weight, v.weight], alpha)
        fold_into_norm(ln1, [q, k, v], s)
        s = smoothing_factors(stats("mlp.gate_proj"), [gate.weight, up.weight], alpha)
        fold_into_norm(ln2, [gate, up], s)
        smoothed += [f"{prefix}.self_attn.{n}" for n in "qkv"] + [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"]
        if smooth_vo:
            a = reduce_kv(stats("self_attn.o_proj"), n_kv, groups)
            w = reduce_kv(o.weight.abs().amax(dim=0), n_kv, groups)
            s = smoothing_factors(a, [w[None, :]], alpha)
            v.weight.div_(s.to(v.weight.dtype)[:, None])
            if v.bias is not None:
                v.bias.div_(s.to(v.bias.dtype))
            o.weight.mul_(expand_kv(s, n_kv, groups).to(o.weight.dtype)[None, :])
            smoothed.append(f"{prefix}.self_attn.o_proj")
        if smooth_up_down:
            s = smoothing_factors(stats("mlp.down_proj"), [down.weight], alpha)
            fold_into_linear(up, down, s)
            smoothed.append(f"{prefix}.mlp.down_proj")
    return smoothed
