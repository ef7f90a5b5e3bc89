"""Decode attention over the quantized cache, plugged into transformers' ``AttentionInterface``.

``enable_fused_attention(model)`` registers the attention function under the name
``"llmq_kv"`` (plus sdpa's mask builder under the same name, so padding masks are
still built) and switches the model to it. Then, at every single-token decode step
where ``QuantizedKVCache`` holds quantized tokens, the cache hands attention its
residual keys tagged with the layer (``HANDLE_ATTR``) instead of dequantized tensors,
and this function reads the packed cache:

* CUDA: the Triton split-K kernel (``llmq.kernels.kv_attention.kv_decode_attention``);
* CPU (and anything else): the pure-torch reference, the same math.

The choice is ``llmq.backend_choice.KV_ATTENTION``'s (op kind ``kv-attention``), made per
decode step: ``LLMQ_BACKEND=torch|triton`` forces one, and ``LLMQ_BACKEND=triton-interpret``
runs the Triton kernel on CPU under ``TRITON_INTERPRET=1`` (tests). Every other call —
prefill, chunks of several tokens, caches with nothing quantized, other caches — goes to
sdpa unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llmq.backend_choice import INTERPRET, KV_ATTENTION, triton_device_check
from llmq.kernels.kv_attention import kv_decode_attention, kv_decode_attention_reference
from llmq.kv.cache import ATTN_IMPLEMENTATION, HANDLE_ATTR


@dataclass(frozen=True)
class KVAttentionSpec:
    """What a decode-attention backend needs to know: where the query lives and its dtype."""

    device_type: str  # "cpu", "cuda", ...
    act_dtype: torch.dtype


class TorchKVAttention:
    """``kv_decode_attention_reference``: dequantize the packed cache and attend, in torch, anywhere."""

    name = "torch"

    def can_implement(self, spec: KVAttentionSpec) -> tuple[bool, str]:
        return True, "pure-torch reference runs every decode step on every device"

    attend = staticmethod(kv_decode_attention_reference)


class TritonKVAttention:
    """``kv_decode_attention``: the Triton split-K kernel reading the packed cache (CUDA, or forced
    ``triton-interpret`` on CPU)."""

    def __init__(self, interpret: bool = False) -> None:
        self.interpret = interpret
        self.name = INTERPRET if interpret else "triton"

    def can_implement(self, spec: KVAttentionSpec) -> tuple[bool, str]:
        return triton_device_check(spec.device_type, self.interpret) or (True, "split-K Triton decode kernel")

    attend = staticmethod(kv_decode_attention)


KV_ATTENTION.register(TritonKVAttention())
KV_ATTENTION.register(TorchKVAttention())
KV_ATTENTION.register(TritonKVAttention(interpret=True))


def _decode_mask(attention_mask: torch.Tensor | None, batch: int, n_tokens: int) -> torch.Tensor | None:
    """sdpa-style decode mask ``[B, 1, 1, T]`` (bool, or additive float) → ``[B, T]`` bool, or None."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dtype != torch.bool:
        m = m == 0  # additive mask: 0 = attend, dtype-min = masked
    if m.dim() == 4:
        if m.shape[1] != 1 or m.shape[2] != 1:
            raise ValueError(f"decode attention expects a [B, 1, 1, T] mask, got {tuple(m.shape)}")
        m = m[:, 0, 0]
    m = m[:, -n_tokens:].expand(batch, n_tokens)
    return None if bool(m.all()) else m


def choose_kv_attention_backend(query: torch.Tensor):
    """The backend whose ``attend(query [B, H_q, D], kv, sm_scale, mask)`` runs this decode step."""
    return KV_ATTENTION.choose(KVAttentionSpec(query.device.type, query.dtype))


def kv_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs):
    """transformers attention function: ``query [B, H_q, q_len, D]`` → (``[B, q_len, H_q, D]``, None)."""
    layer = getattr(key, HANDLE_ATTR, None)
    if layer is None:  # not a quantized decode step: ordinary sdpa on whatever tensors we got
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if getattr(layer, "static_shape", False):  # QuantizedStaticLayer: lengths are device tensors
        from llmq.kv.static_attention import static_decode_attention

        return static_decode_attention(query, layer, attention_mask, scaling)
    b, hq, q_len, d = query.shape
    if q_len != 1:
        raise RuntimeError("quantized-KV decode attention got several query tokens; the cache only hands "
                           "the packed handle to single-token steps")
    kv = layer.packed()
    n_tokens = kv.n_quant + kv.k_res.shape[2]
    mask = _decode_mask(attention_mask, b, n_tokens)
    sm_scale = scaling if scaling is not None else d ** -0.5
    out = choose_kv_attention_backend(query).attend(query[:, :, 0], kv, sm_scale, mask)
    return out[:, None], None  # [B, 1, H_q, D], as sdpa returns it


_registered = False


def register() -> None:
    """Register ``"llmq_kv"`` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_IMPLEMENTATION, kv_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered = True


def enable_fused_attention(model) -> None:
    """Make ``model`` attend through llmq's quantized-KV attention (sdpa for everything else)."""
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
