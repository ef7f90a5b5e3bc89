"""``llmq export``: llmq checkpoints as compressed-tensors ``pack-quantized`` folders."""

import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer
from safetensors.torch import load_file

import llmq
from llmq.checkpoint import build_quantization_config, save_quantized
from llmq.checkpoint.export import export_checkpoint
from llmq.cli.main import main
from llmq.model.rtn import quantize_model_rtn
from llmq.nn import set_backend
from llmq.nn.backends import dequantize_packed
from llmq.quant.packing import unpack_bitstream
from llmq.recipes import WeightRecipe

RECIPES = [WeightRecipe(4, 32, False), WeightRecipe(4, 32, True), WeightRecipe(8, None, False),
           WeightRecipe(3, 32, False), WeightRecipe(2, 32, True)]
IDS = ["int4-g32-asym", "int4-g32-sym", "int8-chan-asym", "int3-g32-asym", "int2-g32-sym"]


def _checkpoint(tmp_path, recipe, name="q", **shape):
    model = make_tiny_llama(**shape)
    quantize_model_rtn(model, recipe, progress=False)
    out = save_quantized(model, make_tiny_tokenizer(), tmp_path / name, build_quantization_config(model, recipe))
    return model, out


def _quant_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, llmq.QuantLinear)}


def _decode(tensors, name, bits, symmetric):
    """The exported module's weight ``[N, K]`` decoded from the format's documented layout (no llmq reader)."""
    n, k = tensors[f"{name}.weight_shape"].tolist()
    scale = tensors[f"{name}.weight_scale"].float()  # [N, G]
    g = k // scale.shape[1]
    codes = unpack_bitstream(tensors[f"{name}.weight_packed"], bits, k).float()  # [N, K] unsigned
    if symmetric:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = unpack_bitstream(tensors[f"{name}.weight_zero_point"].t().contiguous(), bits, n).t().float()
    return (codes - zero.repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1)


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_export_holds_exactly_the_llmq_weights(tmp_path, recipe):
    model, src = _checkpoint(tmp_path, recipe)
    out = export_checkpoint(src, tmp_path / "ct")
    tensors = load_file(out / "model.safetensors")
    linears = _quant_linears(model)
    for name, layer in linears.items():
        assert torch.equal(_decode(tensors, name, recipe.bits, recipe.symmetric), dequantize_packed(layer).t()), name
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert (f"{name}.weight_zero_point" in tensors) == (not recipe.symmetric)
        assert not any(f"{name}.{leaf}" in tensors for leaf in ("qweight", "scales", "qzeros"))
    source = load_file(src / "model.safetensors")
    for key, value in source.items():  # embeddings, norms: copied unchanged
        if key.rpartition(".")[0] not in linears:
            assert torch.equal(tensors[key], value), key
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert (q["quant_method"], q["format"], q["quantization_status"]) == ("compressed-tensors", "pack-quantized",
                                                                          "compressed")
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"]) == (recipe.bits, recipe.symmetric,
                                                                                  recipe.group_size)
    assert weights["strategy"] == ("channel" if recipe.group_size is None else "group")
    assert q["ignore"] == ["lm_head"]  # the one nn.Linear llmq left in float
    assert (out / "tokenizer.json").is_file() and (src / "model.safetensors").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_compressed_tensors_decompresses_the_export(tmp_path, recipe):
    """The format's own reader (the ``compressed-tensors`` package; skipped where absent, as in CI)
    gives llmq's weights, rounded once to the fp16 of the scales."""
    base = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model, src = _checkpoint(tmp_path, recipe)
    out = export_checkpoint(src, tmp_path / "ct")
    tensors = load_file(out / "model.safetensors")
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    for name, layer in _quant_linears(model).items():
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        weight = base.PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(weight, dequantize_packed(layer).t().half()), name


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.symmetric],
                         ids=[i for i, r in zip(IDS, RECIPES) if r.symmetric])
def test_transformers_loads_a_symmetric_export(tmp_path, recipe):
    """Plain ``from_pretrained`` through transformers' compressed-tensors integration gives llmq's logits.
    (Asymmetric exports hold the packed zero points vLLM reads, which transformers' integration cannot
    load yet: vllm-project/llm-compressor#1618.)"""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, src = _checkpoint(tmp_path, recipe)
    out = export_checkpoint(src, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.randint(0, 320, (2, 11))
    set_backend(model, "torch")  # llmq's reference numerics, not the bf16 `cpu` backend
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-4, rtol=0)


def test_export_refuses_what_the_format_cannot_hold(tiny_model_dir, tmp_path):
    from llmq.pipeline import quantize_layerwise

    recipe = WeightRecipe(4, 32, False, method="hqq")  # float zeros
    hqq, _ = quantize_layerwise(tiny_model_dir, recipe, progress=False)
    src = save_quantized(hqq, None, tmp_path / "hqq", build_quantization_config(hqq, recipe))
    with pytest.raises(ValueError, match=r"float zero points .* re-quantize with --zero-point int"):
        export_checkpoint(src, tmp_path / "a")
    _, src = _checkpoint(tmp_path, WeightRecipe(4, 128, False), "g128")  # K = 64, 160: partial groups
    with pytest.raises(ValueError, match="is not a multiple of group size 128"):
        export_checkpoint(src, tmp_path / "b")
    _, src = _checkpoint(tmp_path, WeightRecipe(4, 32, True), "ok")
    with pytest.raises(ValueError, match="unknown export format 'gguf'"):
        export_checkpoint(src, tmp_path / "c", fmt="gguf")
    with pytest.raises(ValueError, match="overlaps the source model folder"):
        export_checkpoint(src, src / "inside")
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        export_checkpoint(tmp_path / "missing", tmp_path / "d")
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_cli_export_and_force(tmp_path, capsys):
    _, src = _checkpoint(tmp_path, WeightRecipe(4, 32, False))
    out = tmp_path / "ct"
    assert main(["export", str(src), "--out", str(out)]) == 0
    assert "compressed-tensors" in capsys.readouterr().out and (out / "model.safetensors").is_file()
    assert main(["export", str(src), "--out", str(out)]) == 2  # exists: refused, left as it was
    assert "pass --force" in capsys.readouterr().err
    before = (out / "model.safetensors").read_bytes()
    assert main(["export", str(src), "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() == before  # deterministic
    assert main(["export", str(src), "--format", "gptq", "--out", str(tmp_path / "g")]) == 2
    assert "symmetric checkpoints only" in capsys.readouterr().err and not (tmp_path / "g").exists()


GPTQ_RECIPES = [WeightRecipe(4, 32, True), WeightRecipe(8, None, True), WeightRecipe(3, 32, True),
                WeightRecipe(2, 32, True)]


@pytest.mark.parametrize("recipe", GPTQ_RECIPES, ids=["int4-g32", "int8-chan", "int3-g32", "int2-g32"])
def test_gptq_export_decodes_to_the_llmq_weights(tmp_path, recipe):
    """GPTQ v1 semantics: ``W[k, n] = scales[g_idx[k], n] · (q[k, n] − (qzeros[g_idx[k], n] + 1))``, with
    qweight packed along K and qzeros along N."""
    model, src = _checkpoint(tmp_path, recipe)
    out = export_checkpoint(src, tmp_path / "gptq", fmt="gptq")
    tensors = load_file(out / "model.safetensors")
    b = recipe.bits
    for name, layer in _quant_linears(model).items():
        k, n = layer.in_features, layer.out_features
        qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
        assert qweight.shape == (k * b // 32, n) and qzeros.shape == (layer.scales.shape[0], n * b // 32)
        q = unpack_bitstream(qweight.t().contiguous(), b, k).t().float()  # [K, N]
        z = unpack_bitstream(qzeros, b, n).float() + 1  # [G, N]
        g_idx = tensors[f"{name}.g_idx"].long()
        assert torch.equal(g_idx, torch.arange(k) // (recipe.group_size or k))
        w = tensors[f"{name}.scales"].float()[g_idx] * (q - z[g_idx])
        assert torch.equal(w, dequantize_packed(layer)), name
        if b == 4:  # the word GPTQ loaders read: nibble i of row r is input feature 8r + i
            codes = (qweight[:, None, :] >> (4 * torch.arange(8))[None, :, None]) & 0xF
            assert torch.equal(codes.reshape(k, n).float(), q)
            assert (qzeros == 0x77777777).all()
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["checkpoint_format"], q["bits"], q["sym"], q["desc_act"]) == (
        "gptq", "gptq", b, True, False)
    assert q["group_size"] == (recipe.group_size or -1)


def test_gptq_export_refuses_what_v1_cannot_hold(tmp_path):
    _, src = _checkpoint(tmp_path, WeightRecipe(4, 32, False), "asym")
    with pytest.raises(ValueError, match="symmetric checkpoints only .* --format compressed-tensors"):
        export_checkpoint(src, tmp_path / "a", fmt="gptq")
    _, src = _checkpoint(tmp_path, WeightRecipe(4, 32, True, exclude=("lm_head", "*.down_proj")), "partial")
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj' \(2 such modules\) was left in float"):
        export_checkpoint(src, tmp_path / "b", fmt="gptq")
    ct = export_checkpoint(src, tmp_path / "ct")  # compressed-tensors lists them instead
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["ignore"] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    _, src = _checkpoint(tmp_path, WeightRecipe(3, None, True), "k72", hidden=72)
    with pytest.raises(ValueError, match="_features 72 × 3 bits is not a whole number of int32 words"):
        export_checkpoint(src, tmp_path / "c", fmt="gptq")
    assert not any((tmp_path / x).exists() for x in "abc")
