"""Decode attention over a ``QuantizedStaticLayer``: fixed shapes, lengths read from device tensors.

The static cache's buffers always have the same shapes (``Qc`` quantized slots, ``R + F`` residual
slots); which of them hold tokens is in the 0-d tensors ``n_quant`` and ``cumulative_length``. This
path never turns a length into a Python int (that would end the compiled graph, or bake the length
into a CUDA graph): it hands the decode kernel the *whole* capacity (``n_quant = Qc``, the whole
residual buffer) and a ``[B, Qc + R + F]`` slot mask, built with tensor ops, that is False for
empty slots and for positions transformers' mask hides. So it runs the same kernel as the dynamic
cache, unchanged:

* CUDA: ``llmq.kernels.kv_attention.kv_decode_attention`` (the custom op while compiling);
* elsewhere: ``kv_decode_attention_reference``, the same math

(chosen by ``llmq.kv.attention.choose_kv_attention_backend``).

The cost: every step reads every slot of the capacity, so size ``max_cache_len`` to the need.
transformers' mask covers positions ``[0, Qc + R + F)``, position = token; quantized slot ``i`` is
token ``i``, residual slot ``j`` is token ``n_quant + j``.
"""

from __future__ import annotations

import torch

from llmq.kv.attention import choose_kv_attention_backend
from llmq.kv.static_cache import QuantizedStaticLayer


def static_mask(attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """transformers' decode mask ``[B, 1, 1, W]`` (bool, or additive float) → ``[B, W]`` bool, or None."""
    if attention_mask is None:
        return None
    m = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if m.dim() == 4:
        if m.shape[1] != 1 or m.shape[2] != 1:
            raise ValueError(f"decode attention expects a [B, 1, 1, T] mask, got {tuple(m.shape)}")
        m = m[:, 0, 0]
    return m.expand(batch, m.shape[-1])


def slot_mask(layer: QuantizedStaticLayer, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """``[B, Qc + R + F]`` bool: slot holds a token that ``mask`` (``[B, W]`` by position, or None) lets in."""
    n_quant = layer.n_quant
    n_res = layer.cumulative_length - n_quant
    slots_q = torch.arange(layer.quant_capacity, device=n_quant.device)
    slots_r = torch.arange(layer.res_capacity, device=n_quant.device)
    keep = torch.cat([slots_q < n_quant, slots_r < n_res])[None].expand(batch, -1)
    if mask is None:
        return keep
    pos = torch.cat([slots_q, n_quant + slots_r])
    return keep & mask.gather(1, pos[None].expand(batch, -1))


def static_decode_attention(query: torch.Tensor, layer: QuantizedStaticLayer, attention_mask: torch.Tensor | None,
                            scaling: float | None):
    """transformers attention function body: ``query [B, H_q, 1, D]`` → (``[B, 1, H_q, D]``, None)."""
    b, _, q_len, d = query.shape
    if q_len != 1:
        raise RuntimeError("static quantized-KV decode attention got several query tokens; the cache only hands "
                           "the packed handle to single-token steps")
    sm_scale = scaling if scaling is not None else d ** -0.5
    keep = slot_mask(layer, static_mask(attention_mask, b), b)
    out = choose_kv_attention_backend(query).attend(query[:, :, 0], layer.packed(), sm_scale, keep)
    return out[:, None], None
