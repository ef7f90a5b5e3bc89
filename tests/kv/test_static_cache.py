"""QuantizedStaticCache: same tokens and bytes as QuantizedKVCache, one compiled graph, no recompiles.

Graph counts come from ``torch._dynamo``'s counters with the ``eager`` backend: graph breaks and
recompiles are decided by dynamo, before any backend runs, so inductor would count the same and
only cost minutes of CPU per test.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import CompileConfig

from llmq.kv import QuantizedKVCache, QuantizedStaticCache, cache_kwarg, enable_fused_attention
from llmq.quant.kv import pack_tokens
from llmq.quant.packing import pack

from conftest import make_tiny_llama

# tiny Llama: head_dim 16, so group 16; a residual of 8 makes the first flush come after 24 tokens
KV = dict(group_size=16, residual_length=8)
RECIPES = [dict(bits=4, key_axis="channel"), dict(bits=2, key_axis="token"), dict(bits=8, key_axis="channel",
                                                                                  symmetric=True)]
RECIPE_IDS = ["int4-channel", "int2-token", "int8-channel-sym"]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_branch_free_packing_equals_pack(bits):
    codes = torch.randint(0, 1 << bits, (2, 3, 64, 16), dtype=torch.uint8)
    p = 32 // bits
    ref = pack(codes.permute(2, 0, 1, 3).reshape(64, -1), bits).reshape(64 // p, 2, 3, 16).permute(1, 2, 0, 3)
    assert torch.equal(pack_tokens(codes, bits, check_range=False), ref)
    assert torch.equal(pack_tokens(codes, bits), ref)


def _generate(model, cache, ids, new_tokens=40):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **{cache_kwarg(model): cache})


@pytest.mark.parametrize("fused", [False, True], ids=["model-attention", "llmq-attention"])
@pytest.mark.parametrize("recipe", RECIPES, ids=RECIPE_IDS)
def test_tokens_and_memory_equal_dynamic_cache(recipe, fused):
    model = make_tiny_llama()
    if fused:
        enable_fused_attention(model)
    ids = torch.randint(2, 300, (1, 37))
    dyn = QuantizedKVCache(model.config, **KV, **recipe)
    st = QuantizedStaticCache(model.config, max_cache_len=100, **KV, **recipe)
    out_dyn, out_st = _generate(model, dyn, ids), _generate(model, st, ids)
    assert torch.equal(out_dyn, out_st)
    m_dyn, m_st = dyn.memory(), st.memory()
    assert m_st.quantized_tokens > 37  # decode steps flushed after the prefill did
    assert (m_st.used_bytes, m_st.tokens, m_st.quantized_tokens) == (m_dyn.used_bytes, m_dyn.tokens,
                                                                      m_dyn.quantized_tokens)
    assert m_st.reserved_bytes >= m_st.used_bytes


def _compiled_decode(model, cache, ids, steps):
    """Eager prefill, then ``steps`` greedy decode steps of a ``fullgraph=True`` compiled forward."""
    kw = cache_kwarg(model)
    with torch.no_grad():
        nxt = model(input_ids=ids, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        step = torch.compile(lambda x: model(input_ids=x, use_cache=True, **{kw: cache}).logits,
                             fullgraph=True, backend="eager")
        toks = []
        for _ in range(steps):
            nxt = step(nxt)[:, -1:].argmax(-1)
            toks.append(nxt)
    return torch.cat(toks, 1)


def _eager_decode(model, cache, ids, steps):
    kw = cache_kwarg(model)
    toks = []
    with torch.no_grad():
        nxt = model(input_ids=ids, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        for _ in range(steps):
            nxt = model(input_ids=nxt, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
            toks.append(nxt)
    return torch.cat(toks, 1)


@pytest.mark.parametrize("fused", [False, True], ids=["model-attention", "llmq-attention"])
def test_compiled_decode_one_graph_no_recompiles(fused):
    model = make_tiny_llama()
    if fused:
        enable_fused_attention(model)
    ids = torch.randint(2, 300, (2, 30))
    torch._dynamo.reset()
    counters.clear()
    cache = QuantizedStaticCache(model.config, max_cache_len=128, bits=4, **KV)
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile raises
        toks = _compiled_decode(model, cache, ids, steps=64)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
    assert cache.memory().quantized_tokens == 80  # 30 + 64 = 94 tokens: flushes at 24 (prefill), 40, 56, 72, 88
    eager = _eager_decode(model, QuantizedKVCache(model.config, bits=4, **KV), ids, steps=64)
    assert torch.equal(toks, eager)


def test_compiled_decode_with_quantlinear_weights():
    from llmq.model.rtn import quantize_model_rtn
    from llmq.recipes import WeightRecipe

    model = make_tiny_llama()
    quantize_model_rtn(model, WeightRecipe(bits=4, group_size=32), progress=False)
    enable_fused_attention(model)
    ids = torch.randint(2, 300, (1, 30))
    torch._dynamo.reset()
    counters.clear()
    cache = QuantizedStaticCache(model.config, max_cache_len=96, bits=4, **KV)
    with torch._dynamo.config.patch(error_on_recompile=True):
        toks = _compiled_decode(model, cache, ids, steps=40)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(toks, _eager_decode(model, QuantizedKVCache(model.config, bits=4, **KV), ids, steps=40))


def test_generate_compiles_its_forward_with_the_static_cache():
    """transformers' own static-cache compile path: ``generate`` compiles the decode forward itself."""
    model = make_tiny_llama()
    enable_fused_attention(model)
    cfg = CompileConfig(fullgraph=True, backend="eager", mode=None)
    cfg._compile_all_devices = True  # generate compiles only on accelerators unless told otherwise
    model.generation_config.compile_config = cfg
    ids = torch.randint(2, 300, (1, 30))
    torch._dynamo.reset()
    counters.clear()
    cache = QuantizedStaticCache(model.config, max_cache_len=96, bits=4, **KV)
    out = _generate(model, cache, ids, new_tokens=40)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward was compiled
    assert sum(counters["graph_break"].values()) == 0
    model.generation_config.compile_config = None
    ref = _generate(model, QuantizedKVCache(model.config, bits=4, **KV), ids, new_tokens=40)
    assert torch.equal(out, ref)


def test_bad_use_raises():
    model = make_tiny_llama()
    cache = QuantizedStaticCache(model.config, max_cache_len=16, bits=4, **KV)
    with torch.no_grad(), pytest.raises(ValueError, match="max_cache_len"):
        model(input_ids=torch.randint(2, 300, (1, 20)), use_cache=True, **{cache_kwarg(model): cache})
    with pytest.raises(NotImplementedError, match="QuantizedKVCache"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="max_cache_len"):
        QuantizedStaticCache(model.config, max_cache_len=0)
    model.config.layer_types = ["full_attention", "sliding_attention"]
    model.config.sliding_window = 8
    with pytest.raises(ValueError, match="sliding-window"):
        QuantizedStaticCache(model.config, max_cache_len=64, **KV)


@pytest.mark.parametrize("recipe", RECIPES, ids=RECIPE_IDS)
def test_static_attention_triton_matches_reference(recipe, monkeypatch):
    """The Triton kernel (interpreted) over the whole capacity with the slot mask equals the reference,
    with a left-padding mask, and equals attention over the dynamic cache's packed tokens."""
    from llmq.kernels.kv_attention import kv_decode_attention_reference
    from llmq.kv.static_attention import static_decode_attention

    b, h, d, n = 2, 2, 16, 45
    recipe = dict(recipe)
    layer_st = QuantizedStaticCache(make_tiny_llama().config, max_cache_len=64, **KV, **recipe).layers[0]
    layer_dyn = QuantizedKVCache(make_tiny_llama().config, **KV, **recipe).layers[0]
    k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    for layer in (layer_st, layer_dyn):
        layer.update(k[:, :, :30], v[:, :, :30])
        for t in range(30, n):
            layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
    q = torch.randn(b, 4, 1, d)
    width = layer_st.quant_capacity + layer_st.res_capacity
    mask = torch.zeros(b, 1, 1, width, dtype=torch.bool)
    mask[:, :, :, :n] = True
    mask[1, :, :, :5] = False  # row 1 is left-padded by 5 tokens
    outs = {}
    for backend in ("torch", "triton-interpret"):
        monkeypatch.setenv("LLMQ_BACKEND", backend)
        outs[backend] = static_decode_attention(q, layer_st, mask, None)[0][:, 0]
    torch.testing.assert_close(outs["triton-interpret"], outs["torch"], atol=1e-4, rtol=1e-4)
    ref = kv_decode_attention_reference(q[:, :, 0], layer_dyn.packed(), d ** -0.5, mask[:, 0, 0, :n])
    torch.testing.assert_close(outs["torch"], ref, atol=1e-5, rtol=1e-5)
