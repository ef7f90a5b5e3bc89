"""QuantizedKVCache on a tiny random Llama: exactness, incremental quantization, memory, generate."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from llmq.kv import QuantizedKVCache, cache_kwarg, enable_fused_attention
from llmq.quant.kv import dequantize_kv, kv_block_nbytes, quantize_per_channel, quantize_per_token


def tiny_config(**kw):
    cfg = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)  # head_dim 32, GQA 2
    cfg.update(kw)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def _generate(model, ids, cache, n, **kw):
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0, **{cache_kwarg(model): cache}, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)


def test_residual_covering_sequence_equals_fp_cache(tiny_model):
    ids = torch.randint(0, 128, (2, 9))
    ref_tokens, ref_logits = _generate(tiny_model, ids, DynamicCache(config=tiny_model.config), 24)
    cache = QuantizedKVCache(tiny_model.config, bits=2, group_size=16, residual_length=64)
    tokens, logits = _generate(tiny_model, ids, cache, 24)
    assert cache.memory().quantized_tokens == 0
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("fused", [False, True], ids=["dequantized-sdpa", "fused-torch-path"])
def test_int8_greedy_agreement(fused, tiny_model):
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config()).eval()
    if fused:
        enable_fused_attention(model)
    ids = torch.randint(0, 128, (1, 12))
    ref, _ = _generate(model, ids, DynamicCache(config=model.config), 64)
    cache = QuantizedKVCache(model.config, bits=8, group_size=16, residual_length=16)
    tokens, _ = _generate(model, ids, cache, 64)
    assert cache.memory().quantized_tokens >= 48  # the quantized part was really used
    assert (tokens == ref).float().mean() >= 0.95


def test_fused_and_dequantized_paths_agree_with_padding():
    """Left-padded batch: the packed-cache attention (decode) matches sdpa over dequantized tensors."""
    torch.manual_seed(2)
    model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # row 1 left-padded
    ids[1, :7] = 0
    kw = dict(attention_mask=mask)
    _, ref = _generate(model, ids, QuantizedKVCache(model.config, bits=4, group_size=16, residual_length=4), 16, **kw)
    enable_fused_attention(model)
    _, fused = _generate(model, ids, QuantizedKVCache(model.config, bits=4, group_size=16, residual_length=4), 16,
                         **kw)
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)


def test_triton_kernel_in_generate(monkeypatch):
    """generate with the Triton kernel (interpreted) in the loop gives the torch path's tokens."""
    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    enable_fused_attention(model)
    ids = torch.randint(0, 128, (1, 10))
    ref, ref_logits = _generate(model, ids, QuantizedKVCache(model.config, bits=4, group_size=16,
                                                             residual_length=2), 8)
    monkeypatch.setenv("LLMQ_BACKEND", "triton-interpret")
    tokens, logits = _generate(model, ids, QuantizedKVCache(model.config, bits=4, group_size=16,
                                                            residual_length=2), 8)
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key_axis, symmetric", [("channel", False), ("token", True)], ids=["channel-asym",
                                                                                            "token-sym"])
def test_incremental_quantization_and_memory(key_axis, symmetric):
    """Feed states directly: tokens are quantized once, in blocks, never re-quantized; bytes match the count."""
    cfg = tiny_config(num_hidden_layers=1)
    bits, group, residual, d = 4, 16, 8, 32
    cache = QuantizedKVCache(cfg, bits=bits, key_axis=key_axis, group_size=group, residual_length=residual,
                             symmetric=symmetric)
    layer = cache.layers[0]
    k_all = torch.randn(2, 2, 80, d, dtype=torch.float16)
    v_all = torch.randn(2, 2, 80, d, dtype=torch.float16)
    cache.update(k_all[:, :, :21], v_all[:, :, :21], 0)  # prefill
    block = layer.recipe.flush_block  # group (channel keys) or P = 8 codes per word (token keys)
    assert block == (group if key_axis == "channel" else 8)
    seen_codes = None
    for t in range(21, 80):
        cache.update(k_all[:, :, t:t + 1], v_all[:, :, t:t + 1], 0)
        n_res = layer.keys.shape[2]
        assert layer.n_quant + n_res == t + 1 and layer.n_quant % block == 0
        assert residual + 1 <= n_res <= residual + block  # window (+ current token) stays full precision
        if seen_codes is not None:  # earlier codes untouched: nothing is re-quantized
            assert torch.equal(layer.k_codes.data[:, :, :seen_codes.shape[2]], seen_codes)
        if layer.n_quant:  # word rows of 8 tokens (codes packed along the tokens)
            seen_codes = layer.k_codes.data[:, :, :layer.n_quant // 8].clone()
    n = layer.n_quant
    # stored content == quantizing the original tokens block by block
    quant_k = quantize_per_channel if key_axis == "channel" else quantize_per_token
    expect_k = dequantize_kv(quant_k(k_all[:, :, :n], bits, group, symmetric), bits, group, key_axis == "channel")
    expect_v = dequantize_kv(quantize_per_token(v_all[:, :, :n], bits, group, symmetric), bits, group, False)
    k, v = layer.dequantized()
    assert torch.equal(k[:, :, :n], expect_k.half()) and torch.equal(v[:, :, :n], expect_v.half())
    assert torch.equal(k[:, :, n:], k_all[:, :, n:]) and torch.equal(v[:, :, n:], v_all[:, :, n:])
    # bytes used == theoretical count
    mem = cache.memory()
    expect = (kv_block_nbytes(n, 2, 2, d, bits, group, key_axis == "channel", symmetric)
              + kv_block_nbytes(n, 2, 2, d, bits, group, False, symmetric) + 2 * (80 - n) * 2 * 2 * d * 2)
    assert mem.used_bytes == expect and mem.fp16_bytes == 2 * 80 * 2 * 2 * d * 2
    assert mem.reserved_bytes >= mem.used_bytes


def test_beam_search_runs_and_fused_matches():
    torch.manual_seed(4)
    model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 128, (1, 12))
    kw = dict(num_beams=3, max_new_tokens=10, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw, **{cache_kwarg(model): QuantizedKVCache(model.config, bits=8, group_size=16,
                                                                         residual_length=4)})
    enable_fused_attention(model)
    out = model.generate(ids, **kw, **{cache_kwarg(model): QuantizedKVCache(model.config, bits=8, group_size=16,
                                                                         residual_length=4)})
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kw, match", [
    pytest.param(dict(bits=3), "unsupported KV-cache bits 3", id="bits3"),
    pytest.param(dict(residual_length=-2), "residual_length must be an integer >= 0", id="residual"),
    pytest.param(dict(group_size=64), "does not divide the model's head_dim 32", id="group"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache(tiny_config(), **kw)


def tiny_hybrid_qwen2(**kw):
    """A 2-layer Qwen2 whose layer 0 is full attention and layer 1 slides over 8 tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                      max_window_layers=1, max_position_embeddings=256, **kw)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    torch.manual_seed(7)
    return Qwen2ForCausalLM(cfg).eval()


def test_sliding_window_layers_stay_full_precision_and_full_layers_quantize():
    """Hybrid model: full-attention layers get the quantized cache, sliding-window layers transformers' own
    window cache. With the residual covering the sequence it equals DynamicCache exactly; with int8 the
    quantized layer is used, the sliding layer holds at most its window, and greedy decoding agrees; the
    fused attention (packed cache for the full layer, sdpa with the window mask for the sliding one)
    matches the dequantized path."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from llmq.kv.cache import QuantizedKVLayer

    model = tiny_hybrid_qwen2()
    ids = torch.randint(0, 128, (1, 12))
    ref_tokens, ref_logits = _generate(model, ids, DynamicCache(config=model.config), 40)
    covering = QuantizedKVCache(model.config, bits=2, group_size=16, residual_length=64)
    assert [type(layer) for layer in covering.layers] == [QuantizedKVLayer, DynamicSlidingWindowLayer]
    tokens, logits = _generate(model, ids, covering, 40)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)

    cache = QuantizedKVCache(model.config, bits=8, group_size=16, residual_length=4)
    tokens, logits = _generate(model, ids, cache, 40)
    mem = cache.memory()
    assert mem.tokens == 51 and mem.quantized_tokens == 32  # (51 - 4) tokens left the window: 2 blocks of 16
    assert cache.layers[1].keys.shape[2] <= 8  # the window, in full precision
    window_bytes = 2 * cache.layers[1].keys.numel() * 4  # fp32 model
    assert mem.used_bytes == cache.layers[0].memory().used_bytes + window_bytes
    assert (tokens == ref_tokens).float().mean() >= 0.9
    enable_fused_attention(model)
    fused_tokens, fused_logits = _generate(model, ids, QuantizedKVCache(model.config, bits=8, group_size=16,
                                                                        residual_length=4), 40)
    assert torch.equal(fused_tokens, tokens)
    torch.testing.assert_close(fused_logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer_types, match", [
    (["full_attention", "linear_attention"], r"also has \['linear_attention'\] layers"),
    (["sliding_attention", "sliding_attention"], "nothing to quantize"),
], ids=["linear-attention", "all-sliding"])
def test_unsupported_layer_kinds_refused(layer_types, match):
    cfg = tiny_config()
    cfg.layer_types = layer_types
    cfg.sliding_window = 8
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache(cfg, group_size=16)


def _filled_layer(key_axis, symmetric, n=80):
    cfg = tiny_config(num_hidden_layers=1)
    cache = QuantizedKVCache(cfg, bits=4, key_axis=key_axis, group_size=16, residual_length=8, symmetric=symmetric)
    torch.manual_seed(5)
    k_all, v_all = torch.randn(2, 2, n, 32, dtype=torch.float16), torch.randn(2, 2, n, 32, dtype=torch.float16)
    cache.update(k_all[:, :, :21], v_all[:, :, :21], 0)
    for t in range(21, n):
        cache.update(k_all[:, :, t:t + 1], v_all[:, :, t:t + 1], 0)
    return cache, k_all, v_all


@pytest.mark.parametrize("key_axis, symmetric", [("channel", False), ("token", True)],
                         ids=["channel-asym", "token-sym"])
@pytest.mark.parametrize("where", ["residual", "mid-block", "block-boundary", "everything"])
def test_crop(key_axis, symmetric, where):
    """crop keeps exactly the first `keep` tokens as attention saw them, wherever the cut falls; the cache
    goes on quantizing afterwards and its byte count stays the theoretical one."""
    cache, k_all, v_all = _filled_layer(key_axis, symmetric)
    layer = cache.layers[0]
    k_before, v_before = layer.dequantized()
    n_quant, n_res = layer.n_quant, layer.keys.shape[2]
    assert (n_quant, n_res) == (64, 16)  # flush blocks: 16 (channel keys' group) or 8 (int4 codes per word)
    remove = {"residual": 3, "mid-block": n_res + 5, "block-boundary": n_res + 16, "everything": 80}[where]
    keep = 80 - remove
    assert cache.is_croppable
    cache.crop(-remove)
    assert cache.get_seq_length() == keep and layer.n_quant % layer.recipe.flush_block == 0
    k, v = layer.dequantized()
    assert torch.equal(k, k_before[:, :, :keep]) and torch.equal(v, v_before[:, :, :keep])
    if where == "residual":
        assert layer.n_quant == n_quant
    elif where == "mid-block" and key_axis == "channel":  # the cut block went back to full precision
        assert layer.n_quant == 48 and layer.keys.shape[2] == keep - 48
    for t in range(keep, keep + 40):  # go on: new tokens, flushes, memory accounting
        cache.update(k_all[:, :, t % 80:t % 80 + 1], v_all[:, :, t % 80:t % 80 + 1], 0)
    assert cache.get_seq_length() == keep + 40
    n = layer.n_quant
    mem = cache.memory()
    expect = (kv_block_nbytes(n, 2, 2, 32, 4, 16, key_axis == "channel", symmetric)
              + kv_block_nbytes(n, 2, 2, 32, 4, 16, False, symmetric) + 2 * (keep + 40 - n) * 2 * 2 * 32 * 2)
    assert mem.used_bytes == expect


def test_crop_legacy_argument_is_the_length_to_keep():
    a, _, _ = _filled_layer("channel", False)
    b, _, _ = _filled_layer("channel", False)
    a.crop(-21)
    b.layers[0].crop(59)  # transformers before 5.x: crop(max_length)
    assert torch.equal(a.layers[0].dequantized()[0], b.layers[0].dequantized()[0])
    b.crop(0)  # 5.x: remove nothing (generate calls it when assisted decoding ends)
    assert b.get_seq_length() == 59


def test_assisted_generation(tiny_model):
    """Assisted (speculative) decoding crops the cache after each rejected draft: with the residual window
    covering the sequence it equals greedy decoding with DynamicCache exactly; with int8 and a short window
    (crops inside the quantized part) it agrees with it token for token in most positions."""
    torch.manual_seed(6)
    assistant = LlamaForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    ids = torch.randint(0, 128, (1, 10))
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0, assistant_model=assistant)
    ref = tiny_model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    covering = QuantizedKVCache(tiny_model.config, bits=2, group_size=16, residual_length=64)
    assert torch.equal(tiny_model.generate(ids, **kw, **{cache_kwarg(tiny_model): covering}), ref)
    short = QuantizedKVCache(tiny_model.config, bits=8, group_size=16, residual_length=2)
    out = tiny_model.generate(ids, **kw, **{cache_kwarg(tiny_model): short})
    assert short.memory().quantized_tokens > 0
    assert (out == ref).float().mean() >= 0.9


def test_compiled_model_with_quantized_cache_matches_eager():
    """``torch.compile(model.forward)`` with the quantized cache gives eager's tokens. (It graph-breaks in
    the cache's flush and recompiles; compiling it into one graph would need a static-shape cache.)"""
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 128, (2, 9))

    def run(m):
        return _generate(m, ids, QuantizedKVCache(model.config, bits=4, group_size=16, residual_length=4), 20)[0]

    eager = run(model)
    model.forward = torch.compile(model.forward, backend="eager")  # dynamo only: what compile traces
    try:
        assert torch.equal(run(model), eager)
    finally:
        torch._dynamo.reset()


def test_int4_memory_at_8k_is_under_0_3x_fp16():
    """Issue target: default int4 recipe (keys per channel, group 64, residual 128), scales, zeros and the
    fp16 residual window included, at 8k context (SmolLM2's KV shape: 3 heads x 64)."""
    cfg = tiny_config(num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=3, hidden_size=192)
    cache = QuantizedKVCache(cfg, bits=4)
    k = torch.randn(1, 3, 8192, 64, dtype=torch.float16)
    cache.update(k[:, :, :-1], k[:, :, :-1], 0)
    cache.update(k[:, :, -1:], k[:, :, -1:], 0)
    mem = cache.memory()
    assert mem.tokens == 8192 and 128 < 8192 - mem.quantized_tokens <= 128 + 64  # window + partial key group
    assert mem.ratio <= 0.3, f"int4 KV uses {mem.ratio:.3f}x fp16"


def test_works_with_llmq_weight_quantized_model():
    from llmq.model.rtn import quantize_model_rtn
    from llmq.nn import QuantLinear
    from llmq.recipes import WeightRecipe

    torch.manual_seed(5)
    model = LlamaForCausalLM(tiny_config()).eval()
    quantize_model_rtn(model, WeightRecipe(bits=4, group_size=32), progress=False)
    assert isinstance(model.model.layers[0].self_attn.k_proj, QuantLinear)
    enable_fused_attention(model)
    ids = torch.randint(0, 128, (1, 12))
    ref, _ = _generate(model, ids, DynamicCache(config=model.config), 32)
    cache = QuantizedKVCache(model.config, bits=8, group_size=16, residual_length=8)
    tokens, _ = _generate(model, ids, cache, 32)
    assert cache.memory().quantized_tokens >= 32
    assert (tokens == ref).float().mean() >= 0.95


@pytest.mark.gpu
def test_cuda_generate_with_triton_kernel(monkeypatch):
    """On a GPU, generate reads the packed cache through the compiled kernel: int8 agrees with the fp cache,
    int4 with the torch path over the same quantized cache."""
    torch.manual_seed(5)
    model = LlamaForCausalLM(tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)).cuda().half()
    model.eval()
    enable_fused_attention(model)
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    ref, _ = _generate(model, ids, DynamicCache(config=model.config), 64)
    cache = QuantizedKVCache(model.config, bits=8, group_size=32, residual_length=16)
    tokens, _ = _generate(model, ids, cache, 64)
    assert cache.uses_fused_attention() and cache.memory().quantized_tokens >= 64  # of 104 per sequence
    assert (tokens == ref).float().mean() >= 0.95

    def int4_run():
        return _generate(model, ids, QuantizedKVCache(model.config, bits=4, group_size=32, residual_length=16), 16)

    t_tokens, t_logits = int4_run()
    monkeypatch.setenv("LLMQ_BACKEND", "torch")
    r_tokens, r_logits = int4_run()
    # logits of step i depend on the tokens before it: compare up to the first step where greedy picks differ
    same = int((t_tokens == r_tokens).all(0).long().cumprod(0).sum())
    torch.testing.assert_close(t_logits[:same + 1].float(), r_logits[:same + 1].float(), atol=2e-2, rtol=2e-2)
