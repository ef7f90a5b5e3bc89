"""QuantExperts: packing per expert, forward vs transformers' own experts, the swap, save/load, generate."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import llmq
from llmq.model.rtn import quantize_model_rtn
from llmq.model.swap import find_experts_modules
from llmq.moe.quantize import quantize_experts, rtn_quantizer
from llmq.nn.quant_experts import QuantExpertLinear, QuantExperts, route_tokens
from llmq.quant.primitives import quantize_weight
from llmq.recipes import WeightRecipe

sys.path.insert(0, str(Path(__file__).parents[1]))
from moe_tiny import FAMILIES, save_tiny_moe, tiny_moe  # noqa: E402


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, None], ids=["g32", "channel"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_stack_packs_each_expert_exactly(bits, group_size, symmetric):
    """Each expert of a stack dequantizes bit-exactly to its QuantizedWeight (K=80: a partial group)."""
    w = torch.randn(3, 48, 80)  # E=3 experts of [N=48, K=80]
    qws = [quantize_weight(w[e], bits, group_size, symmetric) for e in range(3)]
    stack = QuantExpertLinear.from_quantized(qws)
    assert stack.qweight.shape[0] == 3 and stack.scales.dtype == torch.float16
    assert (stack.qzeros is None) == symmetric
    for e in range(3):
        assert torch.equal(stack.dequantize(e), qws[e].dequantize().T)
    assert torch.equal(stack.dequantize(torch.tensor([2, 0])), torch.stack([qws[2].dequantize().T,
                                                                             qws[0].dequantize().T]))


def test_stack_float_zero_points():
    from llmq.algorithms import HQQ

    w = torch.randn(2, 32, 64)
    qws = [HQQ(w[e], 4, 32, False, zero_point="float").quantize() for e in range(2)]
    stack = QuantExpertLinear.from_quantized(qws)
    assert stack.zeros is not None and stack.qzeros is None
    for e in range(2):
        assert torch.equal(stack.dequantize(e), qws[e].dequantize().T)


def test_route_tokens_sorts_by_expert_and_skips_out_of_range():
    idx = torch.tensor([[2, 0], [2, 4], [1, 2]])  # 4 = an expert another rank holds (E=4 here: out of range)
    order, counts, offsets = route_tokens(idx, 4)
    assert counts.tolist() == [1, 1, 3, 0]
    assert offsets.tolist() == [0, 1, 2, 5, 5]
    assert idx.reshape(-1)[order[:5]].tolist() == [0, 1, 2, 2, 2]


def _fake_quantized_copy(experts, qe):
    """The float experts module holding ``qe``'s dequantized weights: transformers' own forward on them."""
    ref = copy.deepcopy(experts)
    e = qe.num_experts
    ref.gate_up_proj.data = torch.stack([qe.gate_up.dequantize(i).T for i in range(e)])
    ref.down_proj.data = torch.stack([qe.down.dequantize(i).T for i in range(e)])
    return ref


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_matches_transformers_experts_on_the_same_weights(family, dtype, kernel_tol):
    model = tiny_moe(family, num_experts=6)
    experts = model.model.layers[0].mlp.experts
    qe = quantize_experts(experts, "experts", rtn_quantizer(4, 32, False))
    ref = _fake_quantized_copy(experts, qe).to(dtype)
    qe = qe.to(dtype)
    x = torch.randn(7, 64, dtype=dtype)
    idx = torch.tensor([[0, 3], [3, 0], [5, 3], [0, 5], [3, 0], [5, 0], [0, 3]])  # experts 1, 2, 4: no tokens
    w = torch.softmax(torch.randn(7, 2), -1).to(dtype)
    torch.testing.assert_close(qe(x, idx, w), ref(x, idx, w), **kernel_tol[dtype])


def test_forward_rejects_bad_shapes():
    qe = quantize_experts(tiny_moe("mixtral").model.layers[0].mlp.experts, "e", rtn_quantizer(8, 32, True))
    with pytest.raises(ValueError, match=r"hidden_states \[T, 64\]"):
        qe(torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    with pytest.raises(ValueError, match="top_k_index"):
        qe(torch.randn(3, 64), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_rtn_model_close_to_float_and_router_stays_float(family):
    model = tiny_moe(family)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    experts_only = copy.deepcopy(model)
    summary = quantize_model_rtn(experts_only, WeightRecipe(bits=8, group_size=32, symmetric=False,
                                                            include=("*experts*",)), progress=False)
    assert summary.experts_modules == 2 and summary.linears == 0
    for i, layer in enumerate(experts_only.model.layers):
        assert isinstance(layer.mlp.experts, QuantExperts)
        assert torch.equal(layer.mlp.gate.weight, model.model.layers[i].mlp.gate.weight)  # router untouched
    with torch.no_grad():
        out = experts_only(ids).logits
    assert sqnr_db(ref, out) >= 55  # measured 61.5 (Mixtral) / 62.1 dB (Qwen3-MoE)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)  # measured max |diff| 6e-4, logits up to 0.63
    everything = copy.deepcopy(model)
    quantize_model_rtn(everything, WeightRecipe(bits=8, group_size=32, symmetric=False), progress=False)
    with torch.no_grad():  # attention too: a token near a routing tie may switch experts
        assert sqnr_db(ref, everything(ids).logits) >= 35  # measured 46.8 / 39.2 dB


def test_excluded_experts_stay_float():
    q = tiny_moe("qwen3_moe")
    quantize_model_rtn(q, WeightRecipe(bits=4, exclude=("lm_head", "*embed*", "*experts*")), progress=False)
    assert type(q.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"


class FooExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8, 8))


def test_unknown_fused_experts_class_is_refused_by_name():
    model = tiny_moe("mixtral")
    model.model.layers[0].mlp.experts = FooExperts()
    with pytest.raises(ValueError, match="'FooExperts' is not one llmq knows"):
        find_experts_modules(model, lambda n: True)
    with pytest.raises(ValueError, match="FooExperts"):
        quantize_model_rtn(model, WeightRecipe(bits=4), progress=False)


def test_convolutions_are_not_experts():
    from llmq.moe.families import is_fused_experts

    assert not is_fused_experts(nn.Conv1d(4, 4, 3))


@pytest.fixture(scope="module")
def saved_int4(tmp_path_factory):
    """A tiny Qwen3-MoE float folder and its RTN int4 checkpoint (via llmq.quantize)."""
    root = tmp_path_factory.mktemp("moe")
    save_tiny_moe("qwen3_moe", root / "src")
    result = llmq.quantize(root / "src", WeightRecipe(bits=4, group_size=32, symmetric=False), out_dir=root / "q",
                           progress=False)
    return root, result


def test_save_load_round_trip_identical_logits(saved_int4):
    from transformers import AutoModelForCausalLM

    root, result = saved_int4
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        before = result.model(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(root / "q")
        after = loaded(ids).logits
    assert isinstance(loaded.model.layers[1].mlp.experts, QuantExperts)
    assert torch.equal(before, after)


def test_inspect_lists_the_experts(saved_int4, capsys):
    from llmq.checkpoint.describe import describe

    root, _ = saved_int4
    info = describe(root / "q")
    experts = [m for m in info["modules"] if m["kind"] == "quant_experts"]
    assert [m["name"] for m in experts] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert experts[0]["num_experts"] == 4 and 4 < experts[0]["bits_per_weight"] < 5.5


def test_generate_with_quantized_kv_cache(saved_int4):
    from llmq.kv import QuantizedKVCache, cache_kwarg

    root, _ = saved_int4
    model, _ = llmq.load(root / "q")
    ids = torch.randint(0, 128, (1, 8))
    cache = QuantizedKVCache(model.config, bits=4, group_size=16, residual_length=4)
    out = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0,
                         **{cache_kwarg(model): cache})
    assert out.shape == (1, 32) and cache.memory().quantized_tokens >= 16


@pytest.mark.parametrize("where, match", [
    ("quantization_config", r"experts.gate_up.qweight is I32 \[4, 8, 192\] in the shards but .* needs I32 \[8, 8, 192\]"),
    ("model config", "num_experts 4 in the checkpoint vs 8 in the model"),
], ids=["recipe-vs-shards", "recipe-vs-architecture"])
def test_expert_count_mismatch_is_a_clear_error(saved_int4, tmp_path, where, match):
    import shutil

    from transformers import AutoModelForCausalLM

    root, _ = saved_int4
    bad = tmp_path / "bad"
    shutil.copytree(root / "q", bad)
    cfg = json.loads((bad / "config.json").read_text())
    if where == "model config":
        cfg["num_local_experts"] = 8  # (Qwen3MoeConfig maps num_experts to it)
    else:
        cfg["quantization_config"]["modules"]["model.layers.0.mlp.experts"]["num_experts"] = 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(bad)


def test_missing_quantized_expert_tensor_is_a_clear_error(saved_int4, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    root, _ = saved_int4
    bad = tmp_path / "bad"
    shutil.copytree(root / "q", bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down.scales"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.experts.down.scales'\]"):
        llmq.load(bad)
