"""Checkpoints with non-uniform levels: codebooks in the shards, levels in config.json, plain
``from_pretrained``, ``inspect``, and exports that refuse what their formats cannot hold."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmq
from conftest import make_tiny_llama
from llmq.checkpoint import build_quantization_config, save_quantized
from llmq.checkpoint.describe import describe
from llmq.checkpoint.export import export_checkpoint
from llmq.model.rtn import quantize_model_rtn
from llmq.recipes import WeightRecipe

RECIPES = [WeightRecipe(3, 32, True, levels="kmeans"), WeightRecipe(4, 64, True, levels="nf"),
           WeightRecipe(1, 32, True, levels="binary"), WeightRecipe(2, None, True, levels="log2")]


def _saved(tmp_path, recipe):
    model = make_tiny_llama()
    quantize_model_rtn(model, recipe, progress=False)
    return model, save_quantized(model, None, tmp_path / "q", build_quantization_config(model, recipe))


@pytest.mark.parametrize("recipe", RECIPES, ids=["kmeans3-g32", "nf4-g64", "binary-g32", "log2-2-chan"])
def test_save_then_plain_from_pretrained_gives_equal_logits(tmp_path, recipe):
    model, out = _saved(tmp_path, recipe)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["weight"]["levels"] == recipe.levels.value
    cfg = qcfg["modules"]["model.layers.0.mlp.up_proj"]
    assert cfg["levels"] == recipe.levels.value
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        cb = f.get_tensor("model.layers.0.mlp.up_proj.codebook")
    assert cb.dtype == torch.float16 and cb.shape == (160 if recipe.levels.value == "kmeans" else 1, 1 << recipe.bits)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    up = loaded.model.layers[0].mlp.up_proj
    assert isinstance(up, llmq.QuantLinear) and up.levels == recipe.levels.value and torch.equal(up.codebook, cb)
    x = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_inspect_shows_the_levels_and_counts_codebooks_in_bits_per_weight(tmp_path, capsys):
    from llmq.cli.main import main

    _, out = _saved(tmp_path, RECIPES[0])
    info = describe(out)
    up = next(m for m in info["modules"] if m["name"] == "model.layers.0.mlp.up_proj")
    # 3-bit codes of 64 inputs (7 words of 10 codes) + 2 fp16 scales + 8 fp16 levels per output channel
    assert up["levels"] == "kmeans" and up["bytes"] == 160 * (7 * 4 + 2 * 2 + 8 * 2)
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "levels" in printed and "kmeans" in printed


def test_a_missing_codebook_is_refused_before_loading(tmp_path):
    from safetensors.torch import load_file, save_file

    _, out = _saved(tmp_path, RECIPES[1])
    shard = next(out.glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors["model.layers.1.self_attn.o_proj.codebook"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="codebook"):
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_exports_refuse_non_uniform_levels_with_the_reason(tmp_path, fmt):
    _, out = _saved(tmp_path, RECIPES[1])
    with pytest.raises(ValueError, match="nf levels .*no codebook"):
        export_checkpoint(out, tmp_path / "e", fmt)
    assert not (tmp_path / "e").exists()


def test_onnx_export_refuses_a_codebook_layer():
    pytest.importorskip("onnx")
    from llmq.onnx.builder import GraphBuilder
    from llmq.onnx.linears import emit_linear
    from llmq.quant.levels import quantize_weight_levels

    layer = llmq.QuantLinear.from_quantized(quantize_weight_levels(torch.randn(8, 64), "log2", 3, 32))
    with pytest.raises(ValueError, match="log2 levels .*--levels uniform"):
        emit_linear(GraphBuilder(), layer, "x", "layer")
