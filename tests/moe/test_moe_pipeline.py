"""MoE in the layer pipeline: checkpoint conversion, GPTQ / AWQ per expert, fallbacks, the memory plan."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmq.nn.quant_experts import QuantExperts
from llmq.pipeline import quantize_layerwise
from llmq.pipeline.conversion import ConvertedCheckpoint
from llmq.pipeline.lazy import LazyCheckpoint, empty_model
from llmq.recipes import WeightMethod, WeightRecipe

sys.path.insert(0, str(Path(__file__).parents[1]))
from moe_tiny import FAMILIES, tiny_moe  # noqa: E402

# fewer, cheaper steps than the defaults: the tests compare methods, not tune them
FAST = {WeightMethod.GPTQ: {"clip_search": False}, WeightMethod.AWQ: {"n_grid": 10, "clip_grid": 10}}


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """``(family, folder, float model)``: the folder as ``save_pretrained`` writes it (per-expert tensors)."""
    model = tiny_moe(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "src"
    model.save_pretrained(folder)
    return request.param, folder, model


def test_checkpoint_is_per_expert_and_converted_reads_match_the_model(saved):
    family, folder, model = saved
    names = set(load_file(folder / "model.safetensors"))
    per_expert = {"mixtral": "model.layers.0.block_sparse_moe.experts.3.w1.weight",
                  "qwen3_moe": "model.layers.0.mlp.experts.3.gate_proj.weight"}[family]
    assert per_expert in names and "model.layers.0.mlp.experts.gate_up_proj" not in names
    skeleton = empty_model(folder)
    ckpt = ConvertedCheckpoint(LazyCheckpoint(folder), skeleton)
    for name, param in model.named_parameters():
        assert torch.equal(ckpt.get(name), param.data), name


def test_missing_expert_tensor_in_checkpoint_is_a_clear_error(saved, tmp_path):
    family, folder, _ = saved
    tensors = load_file(folder / "model.safetensors")
    gone = next(k for k in tensors if ".experts.2." in k and "layers.1" in k and ("w2" in k or "down_proj" in k))
    del tensors[gone]
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "bad" / "config.json").write_text((folder / "config.json").read_text())
    ckpt = ConvertedCheckpoint(LazyCheckpoint(tmp_path / "bad"), empty_model(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts.down_proj: the checkpoint tensors it is built "
                                         r"from \(3: .*\) give shape \(3, 64, 96\), but the model needs \(4, 64, 96\)"):
        ckpt.get("model.layers.1.mlp.experts.down_proj")


def _held_out_error(model, float_model, ids) -> float:
    with torch.no_grad():
        return (model(ids).logits - float_model(ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("method", [WeightMethod.GPTQ, WeightMethod.AWQ], ids=["gptq", "awq"])
def test_int4_calibrated_experts_beat_rtn(saved, method):
    """Experts only (attention left float): per-expert GPTQ / AWQ give a lower held-out logit error than RTN."""
    family, folder, model = saved
    torch.manual_seed(1)
    calib, held_out = torch.randint(0, 128, (16, 32)), torch.randint(0, 128, (8, 32))
    recipe = dict(bits=4, group_size=32, symmetric=False, include=("*experts*",))
    rtn, _ = quantize_layerwise(folder, WeightRecipe(**recipe), device="cpu", progress=False)
    q, summary = quantize_layerwise(folder, WeightRecipe(**recipe, method=method, method_args=FAST[method]), calib,
                                    device="cpu", progress=False)
    assert summary.experts_modules == 2 and summary.expert_fallbacks == {}  # 16x32x2 pairs: every expert had enough
    assert isinstance(q.model.layers[1].mlp.experts, QuantExperts)
    err_rtn, err = _held_out_error(rtn, model, held_out), _held_out_error(q, model, held_out)
    assert err < 0.95 * err_rtn, (err, err_rtn)


@pytest.mark.parametrize("fallback", ["rtn", "pooled"])
def test_experts_below_the_token_threshold_fall_back_and_are_reported(saved, fallback):
    family, folder, _ = saved
    calib = torch.randint(0, 128, (2, 8))  # 32 (token, slot) pairs over 4 experts
    args = {**FAST[WeightMethod.GPTQ], "expert_min_tokens": 10**6, "expert_fallback": fallback}
    q, summary = quantize_layerwise(folder, WeightRecipe(bits=4, group_size=32, include=("*experts*",),
                                                         method=WeightMethod.GPTQ, method_args=args),
                                    calib, device="cpu", progress=False)
    report = summary.expert_fallbacks["model.layers.0.mlp.experts"]
    assert report["fallback"] == fallback and sorted(report["experts"]) == [0, 1, 2, 3]
    assert sum(report["experts"].values()) == 2 * 8 * 2  # every routed pair counted once
    assert f"fell back to {fallback}" in str(summary)


def test_rtn_fallback_is_plain_rtn(saved):
    """With every expert below the threshold and fallback "rtn", the experts equal the RTN run's bit for bit."""
    family, folder, _ = saved
    recipe = dict(bits=4, group_size=32, symmetric=False, include=("*experts*",))
    rtn, _ = quantize_layerwise(folder, WeightRecipe(**recipe), device="cpu", progress=False)
    args = {**FAST[WeightMethod.GPTQ], "expert_min_tokens": 10**6, "expert_fallback": "rtn"}
    q, _ = quantize_layerwise(folder, WeightRecipe(**recipe, method=WeightMethod.GPTQ, method_args=args),
                              torch.randint(0, 128, (2, 8)), device="cpu", progress=False)
    for a, b in zip(rtn.model.layers, q.model.layers):
        assert torch.equal(a.mlp.experts.down.qweight, b.mlp.experts.down.qweight)
        assert torch.equal(a.mlp.experts.gate_up.scales, b.mlp.experts.gate_up.scales)


def test_unknown_fallback_is_refused(saved):
    _, folder, _ = saved
    args = {"expert_fallback": "mean"}
    with pytest.raises(ValueError, match="expert_fallback must be one of"):
        quantize_layerwise(folder, WeightRecipe(bits=4, method=WeightMethod.GPTQ, method_args=args),
                           torch.randint(0, 128, (2, 8)), device="cpu", progress=False)


def test_memory_plan_counts_expert_statistics(saved):
    _, folder, _ = saved
    with pytest.raises(ValueError, match=r"expert statistics \d+ MB.*--max-memory is 1 MB"):
        quantize_layerwise(folder, WeightRecipe(bits=4, method=WeightMethod.GPTQ), torch.randint(0, 128, (2, 8)),
                           device="cpu", max_memory_mb=1, progress=False)
