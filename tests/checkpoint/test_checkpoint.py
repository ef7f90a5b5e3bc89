import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmq
from conftest import make_tiny_llama
from llmq.checkpoint import build_quantization_config, save_quantized
from llmq.model.rtn import quantize_model_rtn
from llmq.recipes import WeightRecipe


def _quantized_tiny(recipe):
    model = make_tiny_llama()
    summary = quantize_model_rtn(model, recipe, progress=False)
    return model, summary


@pytest.mark.parametrize(
    "recipe",
    [WeightRecipe(4, 128, False), WeightRecipe(3, 32, True), WeightRecipe(8, None, True), WeightRecipe(2, 64, False)],
    ids=["int4-g128-asym", "int3-g32-sym", "int8-chan-sym", "int2-g64-asym"],
)
def test_save_load_same_logits_and_generate(tmp_path, recipe):
    model, summary = _quantized_tiny(recipe)
    assert summary.linears == 14  # 2 layers x 7 projections; lm_head excluded
    out = save_quantized(model, None, tmp_path / "q", build_quantization_config(model, recipe))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    q_proj = loaded.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, llmq.QuantLinear) and q_proj.bits == recipe.bits
    assert type(loaded.lm_head) is torch.nn.Linear
    x = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
        out_ids = loaded.generate(x[:1], max_new_tokens=6, do_sample=False)
    assert out_ids.shape == (1, 17)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_load_with_dtype(tmp_path, dtype):
    recipe = WeightRecipe(4, 32, False)
    model, _ = _quantized_tiny(recipe)
    out = save_quantized(model, None, tmp_path / "q", build_quantization_config(model, recipe))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map="cpu")
    layer = loaded.model.layers[0].mlp.down_proj
    # integer buffers keep their dtype (the cpu backend, automatic here, holds its own uint8 layout)
    assert layer.canonical_qweight().dtype == torch.int32 and layer.qzeros.dtype == torch.uint8
    x = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        ref, got = model(x).logits, loaded(x).logits
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=0.15, rtol=0.05)


def test_from_pretrained_prepares_layers_so_the_first_call_may_be_compiled(tmp_path, monkeypatch):
    """After loading, every QuantLinear holds the layout its backend reads (forced here to the Triton
    interpreter, whose tiled layout differs from the checkpoint's), so a full-graph torch.compile needs
    no eager call first; logits match the torch backend."""
    recipe = WeightRecipe(4, 32, False)
    model, _ = _quantized_tiny(recipe)
    out = save_quantized(model, None, tmp_path / "q", build_quantization_config(model, recipe))
    monkeypatch.setenv("LLMQ_BACKEND", "triton-interpret")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layers = [m for m in loaded.modules() if isinstance(m, llmq.QuantLinear)]
    assert len(layers) == 14 and {m.qweight_layout for m in layers} == {"tiled"}
    x = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        got = torch.compile(loaded, backend="aot_eager", fullgraph=True)(x).logits
        llmq.nn.set_backend(model, "torch")
        ref = model(x).logits
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_float_zero_checkpoint_round_trip_and_dtype_check(tiny_model_dir, tmp_path):
    """--method hqq (float zeros by default): the shards hold "<name>.zeros" float16, from_pretrained
    rebuilds the same model, and zeros stored with the wrong dtype are refused by name."""
    from safetensors.torch import load_file, save_file

    result = llmq.quantize(tiny_model_dir, WeightRecipe(4, 32, False, method="hqq"), tmp_path / "q", progress=False)
    cfg = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]
    assert cfg["weight"]["zero_point"] == "float"
    assert {m.get("zero_point") for m in cfg["modules"].values()} == {"float"}
    tensors = load_file(result.out_dir / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    assert tensors[f"{name}.zeros"].dtype == torch.float16 and f"{name}.qzeros" not in tensors
    loaded = AutoModelForCausalLM.from_pretrained(result.out_dir)
    x = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, result.model(x).logits)
    tensors[f"{name}.zeros"] = tensors[f"{name}.zeros"].to(torch.uint8)
    save_file(tensors, result.out_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.zeros is U8 .* needs F16/BF16/F32"):
        AutoModelForCausalLM.from_pretrained(result.out_dir)


def test_llmq_load_returns_model_and_tokenizer(tiny_model_dir, tmp_path):
    result = llmq.quantize(tiny_model_dir, WeightRecipe(4, 32, False), tmp_path / "q", progress=False)
    model, tok = llmq.load(result.out_dir)
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(x).logits, result.model(x).logits)
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    assert (tmp_path / "q" / "generation_config.json").is_file()


def test_config_block_lists_modules_and_recipe(tmp_path):
    recipe = WeightRecipe(4, 64, True)
    model, _ = _quantized_tiny(recipe)
    out = save_quantized(model, None, tmp_path / "q", build_quantization_config(model, recipe))
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "llmq" and qcfg["format_version"] == llmq.FORMAT_VERSION
    assert WeightRecipe.from_dict(qcfg["weight"]) == recipe
    assert len(qcfg["modules"]) == 14
    assert qcfg["modules"]["model.layers.0.mlp.up_proj"] == {
        "kind": "quant_linear", "in_features": 64, "out_features": 160, "bits": 4, "group_size": 64, "symmetric": True}


# ---------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path):
    recipe = WeightRecipe(4, 32, False)
    model, _ = _quantized_tiny(recipe)
    return save_quantized(model, None, tmp_path / "q", build_quantization_config(model, recipe))


def test_existing_output_not_clobbered_without_force(saved):
    before = sorted(p.name for p in saved.iterdir())
    model, _ = _quantized_tiny(WeightRecipe(8, None, True))
    with pytest.raises(FileExistsError, match="pass --force"):
        save_quantized(model, None, saved, build_quantization_config(model, WeightRecipe(8, None, True)))
    assert sorted(p.name for p in saved.iterdir()) == before
    save_quantized(model, None, saved, build_quantization_config(model, WeightRecipe(8, None, True)), force=True)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["weight"]["bits"] == 8
    assert [p.name for p in saved.parent.iterdir() if "llmq-" in p.name] == []  # no temp/old leftovers


def test_output_inside_source_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="overlaps the source model folder"):
        llmq.quantize(tiny_model_dir, WeightRecipe(), tiny_model_dir / "q")


def test_truncated_shard(saved):
    shard = saved / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_garbage_header(saved):
    (saved / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="corrupt"):
        llmq.load(saved)


def test_unknown_format_version(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        llmq.load(saved)
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_config_and_weights_mismatch(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["bits"] = 2
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_missing_tensor(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.qzeros"]
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.self_attn.k_proj.qzeros'\]"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_nan_weights_name_module_and_leave_no_output(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad-model"
    bad.mkdir()
    for f in tiny_model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.gate_proj.weight"][3, 3] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj: weight has 1 NaN/Inf"):
        llmq.quantize(bad, WeightRecipe(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if "llmq-" in p.name] == []


def test_recipe_selecting_nothing(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        llmq.quantize(tiny_model_dir, WeightRecipe(include=("nothing*",)), tmp_path / "out", progress=False)


def test_source_never_modified(tiny_model_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()}
    llmq.quantize(tiny_model_dir, WeightRecipe(2, 32, True), tmp_path / "out", progress=False)
    assert {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()} == before
