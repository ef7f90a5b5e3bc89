"""The real model: SmolLM2-135M generating with the quantized KV cache (fused attention, CPU torch path)."""

import pytest
import torch
from transformers import DynamicCache

from llmq.kv import QuantizedKVCache, cache_kwarg, enable_fused_attention
from llmq.model.source import DEFAULT_MODEL, load_model

pytestmark = pytest.mark.slow


def test_int8_greedy_agreement_64_tokens():
    model, tok, _ = load_model(DEFAULT_MODEL)
    enable_fused_attention(model)
    ids = tok("Quantization of large language models reduces memory because", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        ref = model.generate(ids, **kw, **{cache_kwarg(model): DynamicCache(config=model.config)})
        cache = QuantizedKVCache(model.config, bits=8, residual_length=16, group_size=32)
        out = model.generate(ids, **kw, **{cache_kwarg(model): cache})
    assert cache.memory().quantized_tokens >= 32  # most of the sequence was read from the int8 cache
    agreement = (out[0, ids.shape[1]:] == ref[0, ids.shape[1]:]).float().mean().item()
    assert agreement >= 0.95, f"int8 KV greedy agreement {agreement:.2%}"
