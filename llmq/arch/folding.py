"""The one scale fold (AWQ and SmoothQuant), and the check that it kept the layer's float function.

For a subgroup of the map (``llmq.arch.maps``) and per-input-channel scales ``s`` ``[K]`` of
its consumers::

    producer output channel j   /= s_j      (norm: w → w / s, or 1 + w → (1 + w) / s; Linear: row j)
    every consumer's column j   *= s_j      (quantized or not: an excluded consumer is compensated too)

With ``heads`` (``v → o`` under grouped-query attention) ``s`` lives on the consumers' ``num_heads ·
head_dim`` input channels and must be tied across the ``groups`` query heads of each KV head; the
producer's ``num_kv_heads · head_dim`` channels take one copy (``reduce_heads`` / ``expand_heads``)::

    o_proj input  [ h0 h1 | h2 h3 ]      (4 query heads, 2 KV heads: groups = 2)
    v_proj output [ v0    | v1    ]      s(v0) = s(h0) = s(h1)

**Fold check.** ``fold`` runs ``probe()`` (the layer on one calibration batch, fp32) before and
after and raises ``FoldError`` naming the layer and the producer when
``‖after − before‖ / ‖before‖ > FOLD_RTOL``. A correct fold changes the output only by fp32
rounding (7e-9 … 3e-7 relative for SmoothQuant on SmolLM2-135M, docs/arch.md); a wrong wiring
(a producer that is not the consumers' input, a ``1 + w`` norm scaled as ``w``) changes it by
the size of ``s − 1`` (0.5 … 4 for the wrong wirings of tests/arch/test_fold.py).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from llmq.arch.maps import NormKind, Subgroup
from llmq.quant.primitives import QuantizedWeight

# relative change of a layer's float output that a fold may cause (fp32 rounding is ~1e-7)
FOLD_RTOL = 1e-3

log = logging.getLogger("llmq.arch")


class FoldError(ValueError):
    """A fold changed the layer's float output: the architecture map is wrong for this layer."""


def fake_quantize_(linear: nn.Linear, qw: QuantizedWeight) -> None:
    """Put the dequantized weight into the float Linear (so the layer runs as quantized)."""
    linear.weight.data = qw.dequantize().to(linear.weight.dtype)


def head_groups(layer: nn.Module, sub: Subgroup) -> tuple[int, int]:
    """``(groups, head_dim)`` of a ``heads`` subgroup: query heads per KV head, channels per head."""
    attn = layer.get_submodule(sub.attention)
    return attn.num_key_value_groups, attn.head_dim


def producer_channels(layer: nn.Module, sub: Subgroup) -> int:
    """Output channels of the producer that the consumers read (``K``, or ``K / groups`` with ``heads``)."""
    k = layer.get_submodule(sub.consumers[0]).in_features
    return k // head_groups(layer, sub)[0] if sub.heads else k


def reduce_heads(x: torch.Tensor, groups: int, head_dim: int, how: str = "max") -> torch.Tensor:
    """``[kv_heads · groups · head_dim]`` → ``[kv_heads · head_dim]``: ``max`` or ``mean`` over each group."""
    v = x.view(-1, groups, head_dim)
    return (v.amax(dim=1) if how == "max" else v.mean(dim=1)).reshape(-1)


def expand_heads(s: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """``[kv_heads · head_dim]`` → ``[kv_heads · groups · head_dim]``: each KV head's copy for its query heads."""
    return s.view(-1, 1, head_dim).expand(-1, groups, -1).reshape(-1)


def tie_heads(x: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """``x`` ``[num_heads · head_dim]`` averaged over the query heads of each KV head (so a scale derived
    from it elementwise can fold into the KV head's channels)."""
    return x if groups == 1 else expand_heads(reduce_heads(x, groups, head_dim, "mean"), groups, head_dim)


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """``‖after − before‖ / ‖before‖`` in fp32 (``inf`` for a non-finite ``after``)."""
    b, a = before.float(), after.float()
    return ((a - b).norm() / b.norm().clamp(min=torch.finfo(torch.float32).tiny)).item()


@torch.no_grad()
def fold(layer: nn.Module, sub: Subgroup, s: torch.Tensor, prefix: str,
         probe: Callable[[], torch.Tensor] | None = None, before: torch.Tensor | None = None,
         qweights: dict[str, QuantizedWeight] | None = None) -> torch.Tensor | None:
    """Divide ``sub``'s producer by ``s`` and multiply every consumer's input columns by ``s``, in place.

    Args:
        layer: the decoder layer; ``sub``: one subgroup of its map.
        s: ``[K]`` positive scales on the consumers' input channels (tied across query heads with
            ``sub.heads``, else ``ValueError``).
        prefix: the layer's name, for messages.
        probe: runs the layer on one calibration batch and returns its output (fp32); when given,
            the fold is checked (``FoldError`` if the output changed by more than ``FOLD_RTOL``).
        before: ``probe()``'s value before the fold, if the caller has it (saves one forward).
        qweights: already quantized Linears by local name: a quantized producer has its per-row
            scales divided (codes unchanged; scales re-rounded to fp16, as stored) after the check.

    Each consumer's weight is *replaced* by a new tensor (``weight.data = …``): an algorithm
    holding the old tensor (AWQ's ``weights``) still sees the unscaled weight.
    Returns ``probe()`` after the fold (``None`` without a probe).
    """
    s = _wide(s)
    s_prod = s
    if sub.heads:
        groups, head_dim = head_groups(layer, sub)
        s_prod = s.view(-1, groups, head_dim)[:, 0].reshape(-1)
        if not torch.equal(expand_heads(s_prod, groups, head_dim), s):
            raise ValueError(f"{prefix}.{sub.producer.name}: scales for {sub.consumers} must be equal across the "
                             f"{groups} query heads of each KV head")
    producer = layer.get_submodule(sub.producer.name)
    rows = producer.weight.shape[0]
    if rows != s_prod.numel() and not (sub.producer.fused_tail and rows > s_prod.numel()):
        raise FoldError(f"{prefix}: cannot fold scales into {sub.producer.name}: it has {rows} output channels, "
                        f"{', '.join(sub.consumers)} read {s_prod.numel()}: {type(layer).__name__}'s architecture "
                        f"map is wrong for this layer")
    if probe is not None and before is None:
        before = probe()
    _divide_producer(producer, sub, s_prod)
    for name in sub.consumers:
        w = layer.get_submodule(name).weight
        w.data = (_wide(w) * s).to(w.dtype)
    after = None
    if probe is not None:
        after = probe()
        err = relative_change(before, after)
        log.debug("%s: folded %s -> %s, relative change %.1e", prefix, sub.producer.name, sub.consumers, err)
        if not err <= FOLD_RTOL:
            raise FoldError(f"{prefix}: folding scales into {sub.producer.name} (for {', '.join(sub.consumers)}) "
                            f"changed the layer's float output by {err:.1e} relative (bound {FOLD_RTOL:g}): "
                            f"{type(layer).__name__}'s architecture map is wrong for this layer")
    if qweights is not None and sub.producer.name in qweights:
        qw = qweights[sub.producer.name]
        rows = slice(qw.scales.shape[0] - s_prod.numel(), None)
        scales = qw.scales.clone()
        scales[rows] = (scales[rows] / s_prod[:, None]).to(torch.float16).float().clamp(
            min=torch.finfo(torch.float16).tiny)
        qw.scales = scales
        fake_quantize_(producer, qw)
    return after


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or fp64 if it is fp64 (folds compute in at least fp32, whatever the model's dtype)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _divide_producer(module: nn.Module, sub: Subgroup, s: torch.Tensor) -> None:
    """Output channels of ``module`` ``/= s`` ``[C]``: a norm's (1 +) weight and bias, or a Linear's
    rows (its last ``C`` rows when ``fused_tail``) and bias."""
    kind = sub.producer.norm
    w = module.weight
    if kind is NormKind.ONE_PLUS_W:
        w.data = ((1.0 + _wide(w)) / s - 1.0).to(w.dtype)
    elif kind is NormKind.W:
        w.data = (_wide(w) / s).to(w.dtype)
    else:
        rows = slice(w.shape[0] - s.numel(), None)  # all of them, or a fused Linear's last ones
        new = _wide(w).clone()
        new[rows] = new[rows] / s[:, None]
        w.data = new.to(w.dtype)
    bias = getattr(module, "bias", None)
    if bias is not None:
        rows = slice(bias.shape[0] - s.numel(), None)
        new = _wide(bias).clone()
        new[rows] = new[rows] / s
        bias.data = new.to(bias.dtype)
