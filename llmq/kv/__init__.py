"""Quantized KV cache (KIVI-style int2/4/8) and the decode attention that reads it.

``QuantizedKVCache(model.config, bits=4)`` is a transformers ``Cache``;
``enable_fused_attention(model)`` routes decode steps through the packed-cache kernel.
"""

from llmq.kv.attention import enable_fused_attention, register
from llmq.kv.cache import ATTN_IMPLEMENTATION, KVMemory, QuantizedKVCache, QuantizedKVLayer, head_dim_of
from llmq.kv.generate import cache_kwarg

__all__ = ["ATTN_IMPLEMENTATION", "KVMemory", "QuantizedKVCache", "QuantizedKVLayer", "cache_kwarg",
           "enable_fused_attention", "head_dim_of", "register"]
