"""Quantized KV cache (KIVI-style int2/4/8) and the decode attention that reads it.

``QuantizedKVCache(model.config, bits=4)`` is a transformers ``Cache``;
``QuantizedStaticCache(model.config, max_cache_len, bits=4)`` is its static-shape twin for
``torch.compile`` / CUDA graphs; ``enable_fused_attention(model)`` routes decode steps through the packed-cache kernel.
"""

from llmq.kv.attention import enable_fused_attention, register
from llmq.kv.cache import ATTN_IMPLEMENTATION, KVMemory, QuantizedKVCache, QuantizedKVLayer, head_dim_of
from llmq.kv.generate import cache_kwarg
from llmq.kv.static_cache import QuantizedStaticCache, QuantizedStaticLayer

__all__ = ["ATTN_IMPLEMENTATION", "KVMemory", "QuantizedKVCache", "QuantizedKVLayer", "QuantizedStaticCache",
           "QuantizedStaticLayer", "cache_kwarg",
           "enable_fused_attention", "head_dim_of", "register"]
